"""Backend discovery and validation: entry points, hook signatures, duplicate names."""

import pytest

from mmu_core import BackendInfo, PluginError, Role, discover, hookimpl, register_backend
from mmu_core.plugins import unregister_backend


def test_in_tree_backends_are_found_through_entry_points():
    found = discover()
    assert {"tdp", "shadow"} <= set(found)
    assert found["tdp"].source.startswith("entry point 'tdp'")
    assert found["tdp"].info.roles == (Role.DIRECT,)
    assert Role.SHADOW in found["shadow"].info.roles


def _info(name):
    return BackendInfo(name=name, version="0", roles=(Role.DIRECT,), description="test")


def test_backend_with_mismatched_hook_arguments_is_rejected():
    class Bad:
        @staticmethod
        @hookimpl
        def mmu_backend_info():
            return _info("bad")

        @hookimpl
        def mmu_page_fault(self, vcpu, fault, extra):
            return None

    with pytest.raises(PluginError) as exc:
        register_backend(Bad)
    assert "does not match the MMU interface" in str(exc.value)


def test_backend_with_unknown_hook_is_rejected():
    class Typo:
        @staticmethod
        @hookimpl
        def mmu_backend_info():
            return _info("typo")

        @hookimpl
        def mmu_page_fualt(self, vcpu, fault):
            return None

    with pytest.raises(PluginError):
        register_backend(Typo)


def test_backend_missing_required_hooks_is_rejected_with_their_names():
    class Partial:
        @staticmethod
        @hookimpl
        def mmu_backend_info():
            return _info("partial")

    with pytest.raises(PluginError) as exc:
        register_backend(Partial)
    assert "mmu_page_fault" in str(exc.value)


def test_two_backends_claiming_one_name_is_an_error():
    from mmu_tdp import TdpMMU

    class Impostor(TdpMMU):
        pass

    register_backend(Impostor)
    try:
        with pytest.raises(PluginError) as exc:
            discover()
        assert "two backends claim the name 'tdp'" in str(exc.value)
    finally:
        unregister_backend("tdp")
    assert discover()["tdp"].cls is TdpMMU


def test_core_imports_no_plugin_and_plugins_import_only_public_core():
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    for path in (root / "mmu_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.startswith(("mmu_tdp", "mmu_shadow")) for n in names), path
    public = ("mmu_core", "mmu_core.backend", "mmu_core.arch.x86", "mmu_core.hw", "mmu_core.sim")
    for plugin in ("tdp", "shadow"):
        for path in (root / "plugins" / plugin).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmu_core"):
                    assert node.module in public, f"{path}: imports {node.module}"
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmu_"):
                    other = "mmu_shadow" if plugin == "tdp" else "mmu_tdp"
                    assert not node.module.startswith(other), path


def test_observers_see_root_allocations_and_tlb_flushes():
    from parity_util import data_gva, spec_for

    from mmu_core import VMConfig, register_observer, unregister_observer
    from mmu_core.arch.x86 import paging as P
    from mmu_core.guest.machine import build_machine
    from mmu_core.guest.program import Program
    from mmu_core.params import CONFIGURATIONS

    class Counter:
        def __init__(self):
            self.events = []

        @hookimpl
        def mmu_on_root_alloc(self, vm, as_id, role, root):
            self.events.append(("root", as_id, role.value))

        @hookimpl
        def mmu_on_tlb_flush(self, vm, nr_vcpus):
            self.events.append(("flush", nr_vcpus))

    counter = Counter()
    register_observer(counter)
    try:
        m = build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=CONFIGURATIONS["tdp"]))
        m.run_programs([Program().read(data_gva(0)).build()])
        m.vm.zap_all()
        m.vm.destroy()
    finally:
        unregister_observer(counter)
    assert counter.events[0] == ("root", 0, "direct")
    assert ("flush", 1) in counter.events
