"""The leaf SPTE of a direct (TDP) role, as KVM's make_spte builds it for both direct-role
MMUs: the TDP MMU's and the legacy MMU's (spte.c make_spte with EPT masks, a non-prefetch
fault)."""

from __future__ import annotations

from mmu_core.arch.x86 import spte as S


def make_direct_leaf(vm, pfn: int, level: int, writable: bool, dirty: bool,
                     mmu_writable: bool, executable: bool) -> int:
    """An EPT leaf, Accessed; W only when `writable`, D only when `dirty` too (a clean
    writable SPTE lets PML log the first write); MMU-writable when the SPTE may be made
    writable without the lock (shadow_mmu_writable_mask: the slot and the host page allow
    writes; the fast page fault relies on it). Without EPT A/D (ept_ad=0: role.ad_disabled)
    it is marked A/D-disabled (SPTE_TDP_AD_DISABLED) with D clear, and the A bit is the
    software Accessed bit that access tracking clears."""
    spte = S.make_leaf_spte(pfn, level, writable, executable)
    if writable and not dirty:
        spte &= ~S.VMX_EPT_DIRTY_BIT
    if not writable and mmu_writable:
        spte |= S.EPT_SPTE_MMU_WRITABLE
    if not vm.params.ept_ad:
        spte = (spte & ~S.VMX_EPT_DIRTY_BIT) | S.SPTE_TDP_AD_DISABLED
    return spte
