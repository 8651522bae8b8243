"""Everything a backend author imports, in one module: ``from mmu_core.backend import ...``.

The hooks and the contracts are in ``mmu_core.hookspecs`` (the manual); a walk from an empty
directory to a conforming backend is ``docs/plugin-guide.md``. Each name here is re-exported
from its one home (``mmu_core.types``, ``mmu_core.vm``, ``mmu_core.arch.x86.spte``), so that a
backend depends on this module only. The SPTE helpers are numba-jitted: SPTEs are Python ints
in 0 .. 2**64-1, pfns and gfns plain ints.

The fault protocol, step by step, for a direct-role backend (EPT; ``mmu_page_fault``):

 1. ``mmu_fast_page_fault``, if the backend implements it, has already run and returned None.
 2. An MMIO SPTE that faulted (``fault.kind is FaultKind.EPT_MISCONFIG``) whose
    ``get_mmio_spte_generation(spte)`` still equals ``vm.memslots_generation() &
    MMIO_SPTE_GEN_MASK`` may be answered at once: ``fault.mmio = True``, ``Ret.EMULATE``.
    A stale one is treated as absent and the fault goes on.
 3. ``gfn = fault.gpa >> 12``, ``as_id = vcpu.as_id``; then ``seq = vm.mmu_invalidate_seq``
    and ``gen = vm.memslots_generation()``, read *before* the next step.
 4. ``res = vm.gfn_to_pfn(as_id, gfn, fault.write)``, with no lock held: it may block on a
    userfault, read a page back from swap or break copy-on-write. ``None`` means MMIO.
 5. A write to a READONLY slot (``res.slot.readonly``): ``fault.mmio = True``,
    ``Ret.EMULATE``; nothing is installed.
 6. The level: ``vm.max_mapping_level(res.slot, gfn, res.level)`` (1 without huge pages, and
    1 for MMIO).
 7. Take ``vm.mmu_lock`` in the mode ``Capabilities.fault_lock`` declares (with lockless
    walkers, inside ``vm.rcu.read()`` too). If the vCPU's root is stale (zapped by
    ``mmu_zap_all``), ``vcpu.make_request(REQ_MMU_RELOAD)`` and return ``Ret.RETRY``. If
    ``vm.mmu_invalidate_retry_gfn(seq, as_id, gfn)``, return ``Ret.RETRY``: the pfn from
    step 4 may already belong to someone else.
 8. Walk from ``vcpu.mmu_root`` (``vm.root_levels(vcpu)`` levels, ``spte_index(gfn, level)``
    at each) down to the level of step 6, linking a ``vm.alloc_pt_page()`` with
    ``make_nonleaf_spte(child)`` where an entry is empty. Under the read lock every change is
    a ``vm.spte_cmpxchg``; on a lost race free what you allocated and return ``Ret.RETRY``.
    Skip ``FROZEN_SPTE`` entries by retrying: another task is changing them.
 9. MMIO (``res is None``): install ``make_mmio_spte(gfn, access, gen, True)`` with the
    ``gen = vm.memslots_generation()`` read in step 3 (the memslots this fault resolved
    against: a slot created meanwhile must find the SPTE stale), set ``fault.mmio = True``,
    return ``Ret.EMULATE``.
10. The writable policy: ``writable = res.writable and not res.slot.readonly and (not
    res.slot.log_dirty or fault.write)``; ``new = make_leaf_spte(res.pfn - (gfn -
    gfn_round_for_level(gfn, level)), level, writable, True)``.
11. The SPTE is already there (another vCPU won): ``Ret.SPURIOUS``.
12. Dirty marking: if ``writable and res.slot.log_dirty``, call ``vm.mark_page_dirty(as_id,
    gfn)`` now, before the SPTE is visible.
13. Install it. If it replaced a present SPTE, flush (``vm.flush_remote_tlbs()``) before the
    old table page can be freed, and free that page after an RCU grace period if walkers are
    lockless. Set ``fault.level = level`` and return ``Ret.FIXED``.

A shadow-role backend (``fault.kind is FaultKind.SHADOW_PF``, keyed by ``fault.gva``) first
walks the guest's tables in software: a guest fault is ``Ret.INJECT`` with
``fault.inject_error_code``; it write-tracks the guest tables it shadows
(``vm.track_gfn``), honours the guest's W/U/NX and D bits, rechecks the guest entries under
the lock, and answers writes to tracked pages with ``Ret.EMULATE``. Steps 3-7 and 10-13 are
the same, with ``make_shadow_leaf_spte``/``make_shadow_nonleaf_spte`` and ``ept=False``.
"""

from __future__ import annotations

from mmu_core.arch.x86.spte import (
    EPT_LARGE_MASK,
    EPT_SPTE_MMU_WRITABLE,
    FROZEN_SPTE,
    MMIO_SPTE_GEN_MASK,
    PG_LEVEL_1G,
    PG_LEVEL_2M,
    PG_LEVEL_4K,
    PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK,
    SPTE_BASE_ADDR_MASK,
    SPTE_ENT_PER_PAGE,
    SPTE_MMU_PRESENT_MASK,
    SPTE_TDP_AD_DISABLED,
    SPTE_TDP_AD_MASK,
    VMX_EPT_ACCESS_BIT,
    VMX_EPT_DIRTY_BIT,
    VMX_EPT_EXECUTABLE_MASK,
    VMX_EPT_READABLE_MASK,
    clear_writable,
    get_mmio_spte_generation,
    get_mmio_spte_gfn,
    gfn_round_for_level,
    is_access_track_spte,
    is_accessed_spte,
    is_frozen_spte,
    is_large_pte,
    is_last_spte,
    is_mmio_spte,
    is_mmu_writable_spte,
    is_shadow_present_pte,
    is_writable_pte,
    make_leaf_spte,
    make_mmio_spte,
    make_nonleaf_spte,
    make_shadow_leaf_spte,
    make_shadow_nonleaf_spte,
    mark_spte_for_access_track,
    pages_per_level,
    restore_acc_track_spte,
    spte_index,
    spte_to_pfn,
)
from mmu_core.direct_spte import make_direct_leaf
from mmu_core.hookspecs import hookimpl
from mmu_core.types import (
    BackendAudit,
    BackendInfo,
    Capabilities,
    FaultKind,
    HostPfn,
    MMUMemory,
    MMUStats,
    PageFault,
    Ret,
    Role,
)
from mmu_core.vm.memslot import Memslot
from mmu_core.vm.vcpu import REQ_MMU_RELOAD, REQ_TLB_FLUSH, Vcpu
from mmu_core.vm.vm import VM

__all__ = [
    # the interface
    "hookimpl",
    "BackendInfo",
    "Capabilities",
    "BackendAudit",
    "MMUMemory",
    "MMUStats",
    # faults
    "PageFault",
    "FaultKind",
    "Ret",
    "Role",
    "HostPfn",
    # the VM, its vCPUs and memslots (for annotations; the services are VM methods)
    "VM",
    "Vcpu",
    "Memslot",
    "REQ_MMU_RELOAD",
    "REQ_TLB_FLUSH",
    # levels and table geometry
    "PG_LEVEL_4K",
    "PG_LEVEL_2M",
    "PG_LEVEL_1G",
    "SPTE_ENT_PER_PAGE",
    "spte_index",
    "gfn_round_for_level",
    "pages_per_level",
    # building SPTEs the walker reads: EPT (direct roles) and x86 (shadow paging)
    "make_leaf_spte",
    "make_direct_leaf",
    "make_nonleaf_spte",
    "make_mmio_spte",
    "make_shadow_leaf_spte",
    "make_shadow_nonleaf_spte",
    "clear_writable",
    "mark_spte_for_access_track",
    "restore_acc_track_spte",
    # reading SPTEs
    "is_shadow_present_pte",
    "is_last_spte",
    "is_large_pte",
    "is_writable_pte",
    "is_mmu_writable_spte",
    "is_accessed_spte",
    "is_access_track_spte",
    "is_frozen_spte",
    "is_mmio_spte",
    "spte_to_pfn",
    "get_mmio_spte_gfn",
    "get_mmio_spte_generation",
    # values and masks
    "FROZEN_SPTE",
    "MMIO_SPTE_GEN_MASK",
    "SPTE_BASE_ADDR_MASK",
    "SPTE_MMU_PRESENT_MASK",
    "EPT_LARGE_MASK",
    # dirty logging and access tracking bits
    "EPT_SPTE_MMU_WRITABLE",
    "PT_PAGE_SIZE_MASK",
    "PT_WRITABLE_MASK",
    "SPTE_TDP_AD_DISABLED",
    "SPTE_TDP_AD_MASK",
    "VMX_EPT_ACCESS_BIT",
    "VMX_EPT_DIRTY_BIT",
    "VMX_EPT_EXECUTABLE_MASK",
    "VMX_EPT_READABLE_MASK",
]
