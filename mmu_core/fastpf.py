"""The lockless fast page fault the two direct-role MMUs share (KVM mmu.c fast_page_fault).

KVM has one fast_page_fault for the TDP MMU and the legacy (shadow) MMU: only the lookup of
the last SPTE differs (kvm_tdp_mmu_fast_pf_get_last_sptep under RCU, fast_pf_get_last_sptep
inside walk_shadow_page_lockless_begin/end), and so here: a backend passes a function that
returns the last SPTE on the fault's path, and runs this inside its own lockless protection.
What is shared: page_fault_can_be_fast, is_access_allowed, the new SPTE (an access-tracked
SPTE restored, W added to an MMU-writable one), the refusal of a huge SPTE in a logged slot,
fast_pf_fix_direct_spte (the cmpxchg, then mark_page_dirty_in_slot) and the retries.
"""

from __future__ import annotations

from collections.abc import Callable

from mmu_core import mutants
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import spte as S
from mmu_core.types import FaultKind, PageFault, Ret

FAST_PF_RETRIES = 4  # fast_page_fault gives up after this many lost cmpxchgs

#: What a backend's lookup returns: (table pfn, index, level, SPTE) of the last SPTE on the
#: fault's path (a present leaf, or the first entry that is not present), or None without one.
LastSpte = tuple[int, int, int, int]


def page_fault_can_be_fast(vm, fault: PageFault) -> bool:
    """page_fault_can_be_fast: an EPT violation (a misconfiguration is an MMIO SPTE, never
    fixable here) that is either not present while KVM runs without A/D bits (maybe an
    access-tracked SPTE) or a write to a present SPTE (maybe write-protected for dirty
    logging)."""
    if fault.kind is not FaultKind.EPT_VIOLATION:
        return False
    if not fault.error_code & EC.PFERR_PRESENT:
        return not vm.params.ept_ad
    return fault.write


def is_access_allowed(fault: PageFault, spte: int) -> bool:
    """is_access_allowed: the SPTE grants what the faulting access needs (EPT bits)."""
    if fault.write:
        return bool(spte & S.PT_WRITABLE_MASK)
    if fault.fetch:
        return bool(spte & S.VMX_EPT_EXECUTABLE_MASK)
    return bool(spte & S.VMX_EPT_READABLE_MASK)


def fast_page_fault(vm, vcpu, fault: PageFault, last_spte: Callable[[int], LastSpte | None],
                    stats: dict) -> Ret | None:
    """The loop of fast_page_fault, for a caller that checked page_fault_can_be_fast and
    holds its lockless protection. `last_spte(gfn)` reads the path (a switch point per
    entry). Returns Ret.SPURIOUS, Ret.FIXED, or None for the slow path; counts fast_spurious,
    fast_fixed and cmpxchg_lost in `stats`."""
    gfn = fault.gpa >> 12
    for _ in range(FAST_PF_RETRIES + 1):
        found = last_spte(gfn)
        if found is None:
            return None
        table, idx, level, spte = found
        if not S.is_shadow_present_pte(spte) or not S.is_last_spte(spte, level):
            return None
        # Another vCPU fixed it, or a stale TLB entry faulted: nothing to do.
        if is_access_allowed(fault, spte):
            stats["fast_spurious"] += 1
            return Ret.SPURIOUS
        new = spte
        if S.is_access_track_spte(spte):
            new = S.restore_acc_track_spte(new) | S.VMX_EPT_ACCESS_BIT
        # Only an MMU-writable SPTE (write-protected for dirty logging or access tracking,
        # never for a READONLY slot, a read-only host page or a shadowed page table) may be
        # made writable without the lock.
        if fault.write and (S.is_mmu_writable_spte(spte, True)
                            or mutants.on("fast-pf-ignores-mmu-writable")):
            new |= S.PT_WRITABLE_MASK
        # A huge SPTE of a logged slot is left to the slow path, which maps 4K: the fix
        # would mark only the first page of it dirty.
        if level > 1:
            slot = vm.gfn_to_memslot(vcpu.as_id, gfn)
            if slot is not None and slot.log_dirty:
                return None
        if new == spte or not is_access_allowed(fault, new):
            return None
        if fast_pf_fix_direct_spte(vm, vcpu.as_id, gfn, table, idx, spte, new):
            stats["fast_fixed"] += 1
            fault.level = level
            return Ret.FIXED
        stats["cmpxchg_lost"] += 1
    return None


def fast_pf_fix_direct_spte(vm, as_id: int, gfn: int, table: int, idx: int, old: int,
                            new: int) -> bool:
    """fast_pf_fix_direct_spte: cmpxchg the SPTE (False if it changed since it was read);
    a page made writable is marked dirty in its slot (mark_page_dirty_in_slot)."""
    if not vm.spte_cmpxchg(table, idx, old, new):
        return False
    if S.is_writable_pte(new) and not S.is_writable_pte(old) \
            and not mutants.on("fast-pf-no-mark-dirty"):
        vm.mark_page_dirty(as_id, gfn)
    return True
