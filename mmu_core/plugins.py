"""Backend discovery (entry points), validation, and the per-VM choice of backend per role.

A backend is a class published under the entry-point group ``mmu_core.backends``; the in-tree
TDP and shadow backends are found exactly this way. Validation registers the class in a
scratch plugin manager: pluggy rejects hookimpls whose arguments do not match a hookspec, and
we reject unknown hook names and missing required hooks. Selection happens once per VM, from
its snapshotted parameters: the chosen backend serves the roles it declares, and the shadow
backend serves the rest (as KVM's TDP MMU falls back to the shadow MMU for nested roles).

A third-party package whose entry point fails to load or to validate must not hide the other
backends: discovery skips it, records it (`broken_backends()`, one line each, which `mmu
backends` and the other commands print) and warns once (`PluginWarning`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from typing import Any

import pluggy

from mmu_core import hookspecs
from mmu_core.errors import PluginError
from mmu_core.params import Params
from mmu_core.types import BackendInfo, Capabilities, Role

GROUP = "mmu_core.backends"
FALLBACK = "shadow"


@dataclass(frozen=True)
class Backend:
    name: str
    cls: type
    info: BackendInfo
    source: str  # "entry point <dist>" or "registered"


@dataclass(frozen=True)
class BrokenBackend:
    """An installed entry point that discovery skipped, and why (one line)."""

    name: str  # the entry point's name
    value: str  # "module:Class"
    distribution: str  # the distribution that declares it, or "?"
    reason: str

    def line(self) -> str:
        return (f"backend entry point '{self.name}' ({self.value}, from {self.distribution}) "
                f"skipped: {self.reason}")


class PluginWarning(UserWarning):
    """A backend entry point is broken; the others were loaded."""


_extra: dict[str, type] = {}
_broken: list[BrokenBackend] = []  # filled by discover()
#: capability flags that promise a hook (types.Capabilities), checked at validation
_CAPABILITY_HOOKS = {"aging": "mmu_age_gfn_range", "fast_page_fault": "mmu_fast_page_fault",
                     "audit": "mmu_audit"}


def register_backend(cls: type) -> None:
    """Make a backend class available without an entry point (tests, notebooks)."""
    info = _validate(cls, "registered")
    _extra[info.name] = cls
    discover.cache_clear()


def unregister_backend(name: str) -> None:
    _extra.pop(name, None)
    discover.cache_clear()


def _new_pm() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _validate(cls: Any, where: str) -> BackendInfo:
    pm = _new_pm()
    try:
        pm.register(cls, name="candidate")
        pm.check_pending()
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"backend from {where} does not match the MMU interface: {exc}") from None
    impls = {name for name in dir(cls) if name.startswith("mmu_")}
    missing = [name for name in hookspecs.REQUIRED if name not in impls]
    if missing:
        raise PluginError(f"backend from {where} lacks required hooks: {', '.join(missing)}")
    info = pm.hook.mmu_backend_info()
    if not isinstance(info, BackendInfo):
        raise PluginError(f"backend from {where}: mmu_backend_info must return a BackendInfo")
    if not isinstance(info.capabilities, Capabilities):
        raise PluginError(f"backend from {where}: BackendInfo.capabilities must be Capabilities")
    # A declared capability is what the conformance suite goes on to require: a missing hook
    # is a contradiction best reported here, in one line, not as a failure deep in a run.
    unkept = [f"{cap} needs {hook}" for cap, hook in _CAPABILITY_HOOKS.items()
              if getattr(info.capabilities, cap) and hook not in impls]
    # dirty_log names how the backend re-protects logged pages: "zap" leaves it to the core,
    # the other two need the dirty-log hooks.
    logs = {"mmu_enable_dirty_log", "mmu_clear_dirty_log"} & impls
    if info.capabilities.dirty_log == "zap" and logs:
        unkept.append(f"dirty_log='zap' but it implements {', '.join(sorted(logs))}")
    elif info.capabilities.dirty_log != "zap" and len(logs) < 2:
        unkept.append(f"dirty_log={info.capabilities.dirty_log!r} needs mmu_enable_dirty_log "
                      "and mmu_clear_dirty_log")
    if unkept:
        raise PluginError(f"backend '{info.name}' from {where} declares capabilities it does not "
                          f"implement: {', '.join(unkept)}")
    return info


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, PluginError):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 240 else text[:237] + "..."


@functools.cache
def discover() -> dict[str, Backend]:
    """Every installed backend by name. An entry point that fails to load or validate is
    skipped and recorded (`broken_backends()`); two backends claiming one name is an error,
    since neither can be chosen safely."""
    found: dict[str, Backend] = {}
    broken: list[BrokenBackend] = []
    for ep in entry_points(group=GROUP):
        where = f"entry point '{ep.name}' ({ep.value})"
        try:
            cls = ep.load()
            info = _validate(cls, where)
        except Exception as exc:  # any error of third-party code, import-time ones included
            dist = ep.dist.name if getattr(ep, "dist", None) is not None else "?"
            broken.append(BrokenBackend(ep.name, ep.value, dist, _one_line(exc)))
            continue
        _claim(found, Backend(info.name, cls, info, where))
    for cls in _extra.values():
        info = _validate(cls, "registered")
        _claim(found, Backend(info.name, cls, info, "registered"))
    _broken[:] = broken
    for b in broken:
        warnings.warn(b.line(), PluginWarning, stacklevel=2)
    return found


def broken_backends() -> tuple[BrokenBackend, ...]:
    """The entry points the last discovery skipped (discovering first if needed)."""
    discover()
    return tuple(_broken)


def _claim(found: dict[str, Backend], backend: Backend) -> None:
    other = found.get(backend.name)
    if other is not None and other.cls is not backend.cls:
        raise PluginError(
            f"two backends claim the name '{backend.name}': {other.source} and {backend.source}"
        )
    found[backend.name] = backend


def installed_names() -> str:
    return ", ".join(sorted(discover())) or "(none)"


def choose(params: Params) -> dict[Role, Backend]:
    """The backend for each role, for a VM created with `params`."""
    backends = discover()
    if params.backend not in backends:
        raise PluginError(f"unknown backend '{params.backend}'; installed: {installed_names()}")
    if FALLBACK not in backends:
        raise PluginError(f"the fallback backend '{FALLBACK}' is not installed")
    chosen = backends[params.backend]
    fallback = backends[FALLBACK]
    roles: dict[Role, Backend] = {}
    for role in Role:
        roles[role] = chosen if role in chosen.info.roles else fallback
    if not params.ept:
        roles[Role.DIRECT] = fallback  # no TDP hardware: nobody builds direct tables for L1
    return roles


def local_to_this_process(params: Params) -> bool:
    """Whether a VM created with `params` in another process would differ from one created
    here: a backend it uses, or an observer, was registered in this process
    (`register_backend`, `register_observer`) rather than installed."""
    backends = discover()
    return bool(_observers) or any(
        backends[b.name].source == "registered" for b in choose(params).values())


def build_managers(vm: Any, roles: dict[Role, Backend]) -> dict[Role, pluggy.PluginManager]:
    """One plugin manager per role, each with that role's backend instance for this VM."""
    instances: dict[str, Any] = {}
    managers: dict[Role, pluggy.PluginManager] = {}
    for role, backend in roles.items():
        if backend.name not in instances:
            instances[backend.name] = backend.cls(vm)
        pm = _new_pm()
        pm.register(instances[backend.name], name=backend.name)
        managers[role] = pm
    vm.backend_instances = instances
    l1 = getattr(vm, "role", None)
    if l1 is Role.DIRECT:
        # Nested EPT: the core calls the L1 role's hooks; the router passes on what the
        # nested-role backend needs (docs/nested.md).
        nested = instances[roles[Role.NESTED].name]
        separate = nested is not instances[roles[l1].name]
        managers[l1].register(_NestedRouter(managers[Role.NESTED], nested if separate else None),
                              name="nested-router")
        if separate:
            managers[l1].register(_NestedSlotsRouter(managers[Role.NESTED]),
                                  name="nested-slots-router")
            hooks = managers[l1].hook
            if hooks.mmu_enable_dirty_log.get_hookimpls() \
                    and hooks.mmu_clear_dirty_log.get_hookimpls():
                managers[l1].register(_NestedDirtyRouter(managers[Role.NESTED]),
                                      name="nested-dirty-router")
            if not hooks.mmu_set_nr_mmu_pages.get_hookimpls() \
                    and not hooks.mmu_shrink_scan.get_hookimpls():
                managers[l1].register(_NestedLimitRouter(managers[Role.NESTED]),
                                      name="nested-limit-router")
    return managers


class _NestedRouter:
    """Passes the L1 backend's zaps (before them: the host may free the pages once the L1
    backend's flush is done) and, when the nested role has an instance of its own (tdp), the
    VM's teardown on to the nested-role backend. Returns None from firstresult hooks, so the
    L1 backend's answer stands."""

    def __init__(self, nested_pm: pluggy.PluginManager, separate: Any) -> None:
        self.hook = nested_pm.hook
        self.separate = separate

    @hookspecs.hookimpl(tryfirst=True)
    def mmu_zap_gfn_range(self, vm: Any, as_id: int, start: int, end: int) -> None:
        self.hook.mmu_nested_zap_gfn_range(vm=vm, as_id=as_id, start=start, end=end)

    @hookspecs.hookimpl(tryfirst=True)
    def mmu_zap_all(self, vm: Any) -> None:
        self.hook.mmu_nested_zap_gfn_range(vm=vm, as_id=0, start=0, end=None)

    @hookspecs.hookimpl
    def mmu_destroy_vm(self, vm: Any) -> None:
        if self.separate is not None:
            self.separate.mmu_destroy_vm(vm)


class _NestedSlotsRouter:
    """When the nested role has an instance of its own (tdp): its rmaps hold EPT02 leaves by
    L1 gfn, so they follow L1's memslots and dirty logging as L1's rmaps would (KVM has one
    set of rmaps for both), and L1's emulated stores to the EPT12 tables it write-tracks
    reach it (KVM has one kvm_mmu_track_write for both). The dirty-log hooks are registered
    only where the L1 backend has them (else the core's fallback, a zap, reaches EPT02
    through the zap router)."""

    def __init__(self, nested_pm: pluggy.PluginManager) -> None:
        self.hook = nested_pm.hook

    @hookspecs.hookimpl
    def mmu_memslot_changed(self, vm: Any, as_id: int, old: Any, new: Any, change: str) -> None:
        self.hook.mmu_memslot_changed(vm=vm, as_id=as_id, old=old, new=new, change=change)

    @hookspecs.hookimpl
    def mmu_track_write(self, vcpu: Any, gpa: int, nbytes: int, new: int) -> None:
        """An L1 store to a write-tracked gfn (an EPT12 table the nested instance shadows
        above the last level) that L1's backend kept read-only and the core emulated:
        kvm_page_track_write -> kvm_mmu_track_write, the shadow MMU's."""
        self.hook.mmu_track_write(vcpu=vcpu, gpa=gpa, nbytes=nbytes, new=new)

    @hookspecs.hookimpl(wrapper=True)
    def mmu_memory(self, vm: Any) -> Any:
        """The L1 backend's memory plus the nested instance's structs and rmaps (the table
        pages are counted once: both count every MMU table page of the VM)."""
        mem = yield
        nested = self.hook.mmu_memory(vm=vm)
        if mem is None or nested is None:
            return mem
        return replace(mem, mmu_page_structs=mem.mmu_page_structs + nested.mmu_page_structs,
                       mmu_page_struct_bytes=mem.mmu_page_struct_bytes
                       + nested.mmu_page_struct_bytes,
                       rmap_bytes=mem.rmap_bytes + nested.rmap_bytes)


class _NestedDirtyRouter:
    """See _NestedSlotsRouter."""

    def __init__(self, nested_pm: pluggy.PluginManager) -> None:
        self.hook = nested_pm.hook

    @hookspecs.hookimpl(tryfirst=True)
    def mmu_enable_dirty_log(self, vm: Any, slot: Any, protect: bool) -> None:
        if self.hook.mmu_enable_dirty_log(vm=vm, slot=slot, protect=protect):
            vm.flush_remote_tlbs()

    @hookspecs.hookimpl(tryfirst=True)
    def mmu_clear_dirty_log(self, vm: Any, slot: Any, gfns: Any) -> None:
        if self.hook.mmu_clear_dirty_log(vm=vm, slot=slot, gfns=gfns):
            vm.flush_remote_tlbs()


class _NestedLimitRouter:
    """Beside an L1 backend without a page limit (KVM's TDP MMU), KVM_SET_NR_MMU_PAGES and
    the MMU shrinker still govern the shadow MMU's pages, the nested role's (KVM's
    n_max_mmu_pages counts shadow pages only)."""

    def __init__(self, nested_pm: pluggy.PluginManager) -> None:
        self.hook = nested_pm.hook

    @hookspecs.hookimpl
    def mmu_set_nr_mmu_pages(self, vm: Any, nr: int) -> int | None:
        return self.hook.mmu_set_nr_mmu_pages(vm=vm, nr=nr)

    @hookspecs.hookimpl
    def mmu_shrink_scan(self, vm: Any, nr_to_scan: int) -> int | None:
        return self.hook.mmu_shrink_scan(vm=vm, nr_to_scan=nr_to_scan)


def dispatcher(hook: pluggy.HookCaller, *argnames: str) -> Callable[..., Any] | None:
    """A callable taking `argnames` positionally that does what `hook(**kwargs)` does, for a
    hook called on a hot path (every fault): resolved once per VM, since a VM's managers are
    fixed when it is created. None when no plugin implements the hook.

    When exactly one plugin implements a firstresult hook, with no wrapper and the spec's
    arguments in the spec's order, it is the implementation's bound method itself: pluggy
    would call it with the same positional arguments and return its result as is (None
    included), so calling it directly keeps the hook's semantics and saves pluggy's call
    (about 1 us). Any other case (several implementations, wrappers, a hook that collects a
    list, an implementation taking a subset of the arguments) calls through pluggy, exactly
    as before. Hook-call monitoring (`add_hookcall_monitoring`) sees only the calls that go
    through pluggy."""
    impls = hook.get_hookimpls()
    if not impls:
        return None
    impl = impls[0]
    if (len(impls) == 1 and not impl.hookwrapper and not impl.wrapper and not impl.kwargnames
            and tuple(impl.argnames) == argnames and hook.spec is not None
            and tuple(hook.spec.argnames) == argnames and hook.spec.opts.get("firstresult")):
        return impl.function

    def call(*args: Any) -> Any:
        return hook(**dict(zip(argnames, args, strict=True)))

    return call


OBSERVER_GROUP = "mmu_core.observers"
_observers: list[Any] = []


def register_observer(obj: Any) -> None:
    """Add a tracing/statistics observer (an object with mmu_on_* hookimpls) to new VMs."""
    _observers.append(obj)


def unregister_observer(obj: Any) -> None:
    _observers.remove(obj)


def observer_manager() -> pluggy.PluginManager:
    """A plugin manager holding every observer, for one VM."""
    pm = _new_pm()
    for ep in entry_points(group=OBSERVER_GROUP):
        try:
            pm.register(ep.load(), name=f"observer:{ep.name}")
        except Exception as exc:
            raise PluginError(f"observer '{ep.name}' failed to load: {exc}") from None
    for i, obj in enumerate(_observers):
        try:
            pm.register(obj, name=f"observer:{i}")
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"observer does not match the MMU interface: {exc}") from None
    return pm
