"""The backend author's manual is true: every hook it specifies is called, every VM and vCPU
name it mentions exists with the arity it shows, and every name mmu_core.backend exports
imports (and is re-exported from its one home, not defined there)."""

import ast
import dataclasses
import inspect
import pathlib
import re

import pluggy
import pytest

import mmu_core.backend as backend
from mmu_core import VMConfig, create_vm, hookspecs
from mmu_core.params import CONFIGURATIONS
from mmu_core.types import BackendInfo, Capabilities, FaultKind, HostPfn, PageFault
from mmu_core.vm.memslot import Memslot

ROOT = pathlib.Path(__file__).resolve().parent.parent
MANUAL = (ROOT / "mmu_core" / "hookspecs.py", ROOT / "mmu_core" / "backend.py")


def _hookspec_names() -> list[str]:
    tree = ast.parse((ROOT / "mmu_core" / "hookspecs.py").read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
                "hookspec" in ast.unparse(d) for d in node.decorator_list):
            names.append(node.name)
    return names


def _sources(*dirs: pathlib.Path, skip: pathlib.Path | None = None) -> str:
    return "\n".join(p.read_text() for d in dirs for p in sorted(d.rglob("*.py")) if p != skip)


def _called(name: str, text: str) -> bool:
    return bool(re.search(rf"\bhook\.{name}\b|hook_all\(\s*[\"']{name}[\"']|"
                          rf"\bobserve\.{name}\b", text))


def test_every_hook_the_manual_specifies_is_called():
    names = _hookspec_names()
    assert {"mmu_page_fault", "mmu_fast_page_fault", "mmu_stats", "mmu_audit"} <= set(names)
    assert set(hookspecs.REQUIRED) <= set(names)
    core = _sources(ROOT / "mmu_core", skip=ROOT / "mmu_core" / "hookspecs.py")
    in_tree = _sources(ROOT / "plugins" / "tdp", ROOT / "plugins" / "shadow")
    uncalled = []
    for name in names:
        if name.startswith("mmu_on_"):
            # Observer hooks: the manual says backends raise root events themselves.
            ok = _called(name, core) or _called(name, in_tree)
        else:
            ok = _called(name, core)
        if not ok:
            uncalled.append(name)
    assert not uncalled, f"specified but never called: {uncalled}"


# `vm.a.b(args)` / `vcpu.x` in the manual's text; `vm.spte_*` style wildcards are skipped.
_MENTION = re.compile(r"(?<![\w.])(vm|vcpu|fault|res|slot)((?:\.[A-Za-z_]\w*)+)(\*?)(\(([^()]*)\))?")


def _mentions():
    for path in MANUAL:
        for m in _MENTION.finditer(path.read_text()):
            if m.group(3):
                continue
            args = m.group(5)
            yield path.name, m.group(1), m.group(2)[1:].split("."), args


def _arity_ok(obj, args: str) -> str | None:
    """None if a call with the documented arguments binds; else what is wrong."""
    given = [a.strip() for a in " ".join(args.split()).split(",") if a.strip()]
    if isinstance(obj, pluggy.HookCaller):  # observers: called with every argument named
        want = list(obj.spec.argnames)
        return None if len(given) == len(want) else f"takes {want}"
    sig = inspect.signature(obj)
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    star = any(p.kind is p.VAR_POSITIONAL for p in params)
    plain = [a for a in given if not a.startswith("*") and "=" not in a]
    named = [a.split("=")[0].strip() for a in given if "=" in a]
    if len(plain) < len(required) and not named:
        return f"needs {[p.name for p in required]}"
    if len(plain) > len(positional) and not star:
        return f"takes at most {[p.name for p in positional]}"
    unknown = [n for n in named if n not in sig.parameters]
    if unknown:
        return f"has no parameter {unknown}"
    if any(a.startswith("*") for a in given) and not star:
        return "takes no *args"
    return None


@pytest.fixture(scope="module")
def subjects():
    vm = create_vm(VMConfig(params=CONFIGURATIONS["tdp"]))
    slot = Memslot(0, 0, 0, 1, 0)
    try:
        yield {"vm": vm, "vcpu": vm.vcpus[0],
               "fault": PageFault(FaultKind.EPT_VIOLATION, gva=0, gpa=0, error_code=0),
               "res": HostPfn(0, 1, slot, True), "slot": slot}
    finally:
        vm.destroy()


def test_every_vm_and_vcpu_name_the_manual_mentions_exists_with_that_arity(subjects):
    seen, wrong = set(), []
    for where, base, chain, args in _mentions():
        obj, path = subjects[base], base
        for attr in chain:
            path += "." + attr
            if not hasattr(obj, attr):
                wrong.append(f"{where}: {path} does not exist")
                break
            obj = getattr(obj, attr)
        else:
            seen.add(path)
            if args is not None:
                problem = _arity_ok(obj, args)
                if problem:
                    wrong.append(f"{where}: {path}({args}) {problem}")
    assert not wrong, "\n".join(sorted(set(wrong)))
    # The services the manual must cover are among what it mentions (and so were checked).
    services = ("gfn_to_pfn gfn_to_memslot max_mapping_level alloc_pt_page free_pt_page "
                "spte_table spte_read spte_cmpxchg spte_xchg spte_write flush_remote_tlbs "
                "mark_page_dirty memslots_generation track_gfn untrack_gfn is_tracked "
                "invalidating_gfn mmu_invalidate_retry_gfn collecting_dirty host_writable "
                "root_levels engine rcu mmu_lock observe host mmu_invalidate_seq").split()
    missing = [s for s in services if f"vm.{s}" not in seen]
    assert not missing, f"hookspecs/backend.py do not mention: {missing}"


def test_the_arity_check_catches_the_old_manual_error(subjects):
    # The manual once said vm.memslots_generation(as_id); the method takes no argument.
    assert _arity_ok(subjects["vm"].memslots_generation, "as_id") is not None
    assert _arity_ok(subjects["vm"].memslots_generation, "") is None
    assert _arity_ok(subjects["vm"].rcu.call_rcu, "fn, *args") is None
    assert _arity_ok(subjects["vm"].observe.mmu_on_root_alloc, "vm, as_id, role, root") is None


def test_every_documented_vm_service_has_a_docstring(subjects):
    vm = subjects["vm"]
    names = {chain[0] for _, base, chain, args in _mentions() if base == "vm" and len(chain) == 1
             and args is not None}
    assert "gfn_to_pfn" in names
    bare = [n for n in sorted(names) if not inspect.getdoc(getattr(vm, n))]
    assert not bare, f"VM services without a docstring: {bare}"


def test_class_attributes_the_manual_names_exist():
    classes = {"HostPfn": HostPfn, "Capabilities": Capabilities, "BackendInfo": BackendInfo,
               "PageFault": PageFault, "Ret": backend.Ret, "FaultKind": FaultKind,
               "MMUStats": backend.MMUStats}
    wrong = []
    for path in MANUAL:
        for m in re.finditer(r"(?<![\w.])(" + "|".join(classes) + r")\.([A-Za-z_]\w*)",
                             path.read_text()):
            cls = classes[m.group(1)]
            fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) \
                else set()
            if m.group(2) not in fields and not hasattr(cls, m.group(2)):
                wrong.append(f"{path.name}: {m.group(0)}")
    assert not wrong, wrong


def test_every_export_of_mmu_core_backend_imports_and_lives_elsewhere():
    namespace: dict = {}
    exec("from mmu_core.backend import *", namespace)
    assert set(backend.__all__) <= set(namespace)
    assert len(set(backend.__all__)) == len(backend.__all__)
    for name in backend.__all__:
        obj = getattr(backend, name)
        if inspect.isclass(obj) or callable(obj):
            home = getattr(obj, "__module__", None)
            assert home and home != "mmu_core.backend", f"{name} is defined in backend.py"


def test_mmu_core_backend_exports_every_spte_name_the_in_tree_backends_use():
    used = set(re.findall(r"\bS\.([A-Za-z_]\w*)",
                          _sources(ROOT / "plugins" / "tdp", ROOT / "plugins" / "shadow")))
    assert "make_leaf_spte" in used
    assert not used - set(backend.__all__), sorted(used - set(backend.__all__))
