"""Records that cross the MMU interface: faults, fault results, backend info, memory figures,
statistics."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Role(enum.StrEnum):
    """Which paging structures a backend builds (KVM's kvm_mmu_page_role.direct and friends)."""

    DIRECT = "direct"  # TDP for an L1 guest: gpa -> hpa, one structure per address space
    SHADOW = "shadow"  # shadow paging: gva -> hpa, following the guest's page tables
    NESTED = "nested"  # shadowing L1's EPT for an L2 guest


class FaultKind(enum.StrEnum):
    EPT_VIOLATION = "ept_violation"  # gpa-keyed: the direct role
    EPT_MISCONFIG = "ept_misconfig"  # an MMIO SPTE (or a stale one) was hit
    SHADOW_PF = "shadow_pf"  # gva-keyed: #PF intercepted under shadow paging


class Ret(enum.IntEnum):
    """What a fault handler did (KVM's RET_PF_*)."""

    FIXED = 0  # a mapping was installed; re-enter the guest
    SPURIOUS = 1  # the mapping was already there (another vCPU won); re-enter
    RETRY = 2  # something changed under us (race, notifier); re-enter and fault again
    EMULATE = 3  # the core must emulate the access (write-tracked page, MMIO)
    INJECT = 4  # the guest's own tables forbid the access: inject #PF (error_code, cr2)


@dataclass
class PageFault:
    """One fault handed to mmu_page_fault. Fields a handler may fill are at the end."""

    kind: FaultKind
    gva: int
    gpa: int  # for the direct role; for shadow faults the handler computes it
    error_code: int  # PFERR_* (direct role: derived from the exit qualification, as KVM does)
    exit_qualification: int = 0
    write: bool = False
    fetch: bool = False
    user: bool = False
    # Filled by the handler:
    inject_error_code: int = 0  # with Ret.INJECT
    mmio: bool = False  # with Ret.EMULATE: the gpa has no memslot
    level: int = 0  # level of the mapping installed
    walked_gfns: tuple[int, ...] = field(default=())  # shadow: the guest tables walked


class HostPfn(NamedTuple):
    """What ``vm.gfn_to_pfn`` resolved (KVM: the pfn, mapping level and map_writable that
    __kvm_faultin_pfn leaves in the fault)."""

    pfn: int
    level: int  # host mapping level (1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB)
    slot: Any  # the Memslot
    writable: bool  # the host maps the page writable: an SPTE may be writable (else COW/KSM)


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers beyond the required hooks; the conformance suite requires what is
    declared, skips what is not, and says which (mmu_core.testing.conformance)."""

    fault_lock: str = "write"  # MMU lock mode its faults take: "read" (atomic SPTEs) or "write"
    huge_pages: bool = False  # maps 2 MiB / 1 GiB pages where the host and slot allow
    mmio_spte: bool = True  # caches MMIO in SPTEs with the memslots generation
    dirty_log: str = "zap"  # how it re-protects: "zap" (core fallback), "write-protect", "d-bit"
    aging: bool = False  # implements mmu_age_gfn_range
    fast_page_fault: bool = False  # implements mmu_fast_page_fault
    audit: bool = False  # implements mmu_audit (needed for the per-step invariant audit)
    max_root_level: int = 5  # deepest EPT structure it builds (4 or 5): a VM whose MAXPHYADDR
    #                          needs 5-level EPT refuses a backend that declares 4

    def __post_init__(self) -> None:
        if self.fault_lock not in ("read", "write"):
            raise ValueError(f"fault_lock must be 'read' or 'write', not {self.fault_lock!r}")
        if self.dirty_log not in ("zap", "write-protect", "d-bit"):
            raise ValueError(f"dirty_log must be zap, write-protect or d-bit, not "
                             f"{self.dirty_log!r}")
        if self.max_root_level not in (4, 5):
            raise ValueError(f"max_root_level must be 4 or 5, not {self.max_root_level}")


@dataclass(frozen=True)
class BackendInfo:
    name: str
    version: str
    roles: tuple[Role, ...]
    description: str
    capabilities: Capabilities = field(default_factory=Capabilities)


@dataclass(frozen=True)
class BackendAudit:
    """What a backend tells the invariant audit (hook ``mmu_audit``)."""

    roots: tuple[tuple[int, int, int], ...]  # (as_id, root level, root pfn): every live root
    held_tables: frozenset[int]  # table pages it holds that may be unreachable from a root
    violations: tuple[tuple[str, str], ...] = ()  # its own invariants: (name, detail)
    direct: bool = True  # roots are indexed by gfn (TDP), not by guest-virtual page (shadow)
    # Roots no vCPU may enter the guest through again (KVM: role.invalid, after the fast
    # zap), still walked until they are torn down; the dirty-log rule skips them once every
    # vCPU that has one loaded must reload first.
    invalid_roots: frozenset[int] = frozenset()
    # (as_id, gfn) of guest tables it shadows with a page in sync: besides the write-tracked
    # gfns (vm.is_tracked), no SPTE of any backend of the VM may map them writable (the
    # audit checks the direct roots' leaves: with tdp, L1's TDP MMU beside the nested
    # shadow MMU; docs/nested.md).
    write_protected: frozenset[tuple[int, int]] = frozenset()


@dataclass(frozen=True)
class MMUMemory:
    """The MMU's own memory, as the kernel would spend it (bytes)."""

    page_table_pages: int  # EPT / shadow table pages in use (4 KiB each)
    page_table_bytes: int
    mmu_page_structs: int  # struct kvm_mmu_page count
    mmu_page_struct_bytes: int  # at KVM's ~ 200 bytes each (x86-64, 6.x)
    rmap_bytes: int  # 8 bytes per gfn per level for slots the backend keeps rmaps for
    peak_page_table_pages: int = 0

    @property
    def metadata_bytes(self) -> int:
        return self.mmu_page_struct_bytes + self.rmap_bytes

    @property
    def total_bytes(self) -> int:
        return self.page_table_bytes + self.metadata_bytes


@dataclass(frozen=True)
class MMUStats:
    """What a backend counted since the VM was created (hook ``mmu_stats``). The core counts
    fault outcomes and exits itself (``vcpu.faults``, ``vcpu.exits``); these are the figures
    only the backend can know."""

    faults: int = 0  # mmu_page_fault calls it handled (the slow path)
    retries: int = 0  # of those, how many it answered Ret.RETRY (lost race, invalidation, ...)
    mapped_4k: int = 0  # leaf SPTEs faults installed, by level
    mapped_2m: int = 0
    mapped_1g: int = 0
    mmio_sptes: int = 0  # MMIO SPTEs faults installed
    # Gauges: present leaf SPTEs mapped now, by level (KVM's pages_4k/2m/1g statistics);
    # None when the backend does not keep them.
    pages_4k: int | None = None
    pages_2m: int | None = None
    pages_1g: int | None = None
    # The shadow MMU's own events; None when the backend has no such thing (the TDP MMU has
    # no page limit, no unsync pages and no write-tracked guest tables).
    reclaimed_pages: int | None = None  # shadow pages zapped to respect the page limit or by
    # the shrinker (make_mmu_pages_available, kvm_mmu_change_mmu_pages, mmu_shrink_scan)
    unsync_pages: int | None = None  # times a shadowed level-1 table was marked unsync
    syncs: int | None = None  # unsync pages synced again (kvm_sync_page)
    emulated_pte_writes: int | None = None  # emulated guest writes to write-tracked tables
    # (kvm_mmu_track_write calls)

    @property
    def mapped_by_level(self) -> dict[str, int]:
        return {"4K": self.mapped_4k, "2M": self.mapped_2m, "1G": self.mapped_1g}
