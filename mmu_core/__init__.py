"""mmu_core: a pluggable model of the Linux KVM x86 MMU.

The core owns the hardware (page walker, TLB, exits), the host (memory, mm, userfaultfd), the
VM (memslots, lock, RCU), the virtual-time engine and the formal MMU interface
(`mmu_core.hookspecs`). Backends (plugins) build the paging structures the hardware walks.
This module is the public API: plugins and tools import from here and from the documented
subpackages (`mmu_core.arch.x86`, `mmu_core.hw`, `mmu_core.sim`), nothing else.
"""

from mmu_core import _jitcache

_jitcache.configure()  # before any jitted module is imported

from mmu_core.config import MemslotConfig, VMConfig, validate
from mmu_core.errors import GuestError, InvalidConfig, MMUError, OutOfMemory, PluginError
from mmu_core.hookspecs import hookimpl
from mmu_core.params import Params, load_params
from mmu_core.plugins import (
    discover,
    register_backend,
    register_observer,
    unregister_backend,
    unregister_observer,
)
from mmu_core.types import (
    BackendAudit,
    BackendInfo,
    Capabilities,
    FaultKind,
    HostPfn,
    MMUMemory,
    PageFault,
    Ret,
    Role,
)
from mmu_core.vm.vcpu import REQ_MMU_RELOAD, REQ_TLB_FLUSH
from mmu_core.vm.vm import VM, create_vm

__version__ = "0.1.0"

__all__ = [
    "REQ_MMU_RELOAD",
    "REQ_TLB_FLUSH",
    "VM",
    "BackendAudit",
    "BackendInfo",
    "Capabilities",
    "FaultKind",
    "GuestError",
    "HostPfn",
    "InvalidConfig",
    "MMUError",
    "MMUMemory",
    "MemslotConfig",
    "OutOfMemory",
    "PageFault",
    "Params",
    "PluginError",
    "Ret",
    "Role",
    "VMConfig",
    "create_vm",
    "discover",
    "hookimpl",
    "load_params",
    "register_backend",
    "register_observer",
    "unregister_backend",
    "unregister_observer",
    "validate",
]
