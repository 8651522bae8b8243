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

    # for the typo, not for the required hooks it lacks too
    with pytest.raises(PluginError, match="does not match the MMU interface.*mmu_page_fualt"):
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
    # (the loops below check nothing if the paths found no file)
    assert len(list((root / "mmu_core").rglob("*.py"))) > 50
    assert all(len(list((root / "plugins" / p).rglob("*.py"))) > 5 for p in ("tdp", "shadow"))
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
        def mmu_on_root_free(self, vm, as_id, role, root):
            self.events.append(("root_free", as_id, role.value))

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
    # zap-all invalidated the root, the teardown freed it
    assert counter.events.count(("root_free", 0, "direct")) == 1


# --- discovery survives broken third-party entry points -----------------------------------------
@pytest.fixture
def broken_entry_points(monkeypatch):
    """Two installed entry points beside the real ones: one whose module does not exist, one
    that loads a class with no hooks at all."""
    from importlib.metadata import EntryPoint

    from mmu_core import plugins

    real = plugins.entry_points
    fakes = [EntryPoint("ghost", "no_such_module_for_mmu_tests:Backend", plugins.GROUP),
             EntryPoint("hookless", "collections:OrderedDict", plugins.GROUP)]

    def entry_points(group):
        found = list(real(group=group))
        return found + fakes if group == plugins.GROUP else found

    monkeypatch.setattr(plugins, "entry_points", entry_points)
    discover.cache_clear()
    yield
    monkeypatch.undo()
    discover.cache_clear()


def test_a_broken_entry_point_is_reported_in_one_line_and_the_rest_load(broken_entry_points):
    from mmu_core.plugins import PluginWarning, broken_backends

    with pytest.warns(PluginWarning) as caught:
        found = discover()
    assert {"tdp", "shadow"} <= set(found)
    broken = {b.name: b for b in broken_backends()}
    assert set(broken) == {"ghost", "hookless"}
    assert "No module named 'no_such_module_for_mmu_tests'" in broken["ghost"].reason
    assert "lacks required hooks" in broken["hookless"].reason
    for b in broken.values():
        assert "\n" not in b.line() and f"'{b.name}'" in b.line()
    assert sorted(str(w.message) for w in caught) == sorted(b.line() for b in broken.values())


def test_a_declared_capability_without_its_hook_is_rejected():
    from simple_mmu import Backend as Simple

    from mmu_core import Capabilities

    class Boasting(Simple):
        @staticmethod
        @hookimpl
        def mmu_backend_info():
            return BackendInfo("boasting", "0", (Role.DIRECT,), "declares aging it lacks",
                               Capabilities(fault_lock="read", aging=True, fast_page_fault=True))

    with pytest.raises(PluginError) as exc:
        register_backend(Boasting)
    assert "aging needs mmu_age_gfn_range" in str(exc.value)
    assert "fast_page_fault needs mmu_fast_page_fault" in str(exc.value)
    assert "boasting" not in discover()


def test_fast_page_fault_runs_before_the_slow_path_and_none_falls_through():
    from parity_util import data_gva, spec_for

    from mmu_core import Ret, VMConfig
    from mmu_core.arch.x86 import paging as P
    from mmu_core.guest.machine import build_machine
    from mmu_core.guest.program import Program
    from mmu_core.params import configuration
    from mmu_tdp import TdpMMU

    class FastProbe(TdpMMU):
        """The TDP MMU, logging both paths; its fast path sends the first fault back
        (RETRY) and lets every later one through (None)."""

        def __init__(self, vm):
            super().__init__(vm)
            self.log = []

        @staticmethod
        @hookimpl
        def mmu_backend_info():
            return BackendInfo("fastprobe", "0", (Role.DIRECT,), "test",
                               TdpMMU.mmu_backend_info().capabilities)

        @hookimpl
        def mmu_fast_page_fault(self, vcpu, fault):
            self.log.append(("fast", fault.gpa))
            return Ret.RETRY if len(self.log) == 1 else None

        @hookimpl
        def mmu_page_fault(self, vcpu, fault):
            self.log.append(("slow", fault.gpa))
            return super().mmu_page_fault(vcpu, fault)

    register_backend(FastProbe)
    try:
        m = build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=configuration("fastprobe")))
        try:
            m.run_programs([Program().read(data_gva(0)).build()])
            log = m.vm.backend_instances["fastprobe"].log
            faults = m.vm.vcpus[0].faults
        finally:
            m.vm.destroy()
    finally:
        unregister_backend("fastprobe")
    kinds = [k for k, _ in log]
    assert kinds[:3] == ["fast", "fast", "slow"]  # the retried fault came back, then fell through
    assert kinds.count("fast") == kinds.count("slow") + 1
    assert all(kinds[i] == "fast" for i in range(len(kinds)) if i == 0 or kinds[i - 1] == "slow")
    assert faults["fast_retry"] == 1
    assert sum(n for k, n in faults.items() if not k.startswith("fast_")) == kinds.count("slow")


def test_dirty_log_and_root_level_capabilities_are_held_to_what_the_backend_does():
    from dataclasses import replace

    from simple_mmu import Backend as Simple

    from mmu_core import Capabilities, VMConfig, create_vm
    from mmu_core.params import Params
    from mmu_tdp import TdpMMU

    class Claims(Simple):
        @staticmethod
        @hookimpl
        def mmu_backend_info():
            return BackendInfo("claims", "0", (Role.DIRECT,), "says write-protect, has no hooks",
                               Capabilities(dirty_log="write-protect"))

    with pytest.raises(PluginError, match="dirty_log='write-protect' needs"):
        register_backend(Claims)

    class Shallow(TdpMMU):
        @staticmethod
        @hookimpl
        def mmu_backend_info():
            return BackendInfo("shallow", "0", (Role.DIRECT,), "4-level EPT only",
                               replace(TdpMMU.mmu_backend_info().capabilities,
                                       max_root_level=4))

    register_backend(Shallow)
    try:
        with pytest.raises(PluginError, match="needs 5-level EPT"):
            create_vm(VMConfig(maxphyaddr=52, params=Params(backend="shallow")))
        create_vm(VMConfig(maxphyaddr=46, params=Params(backend="shallow"))).destroy()
    finally:
        unregister_backend("shallow")
