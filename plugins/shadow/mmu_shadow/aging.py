"""Aging and access tracking through the rmaps (KVM mmu.c kvm_age_rmap, kvm_test_age_rmap).

The host's page aging (clear_young) asks each MMU whether a range of gfns was accessed since
the last time, and makes it look unaccessed: kvm_age_gfn -> kvm_age_rmap for the shadow MMU,
over every SPTE in the rmaps of the range at every level. An SPTE with A/D bits (shadow
paging's x86 leaves: the hardware's Accessed bit, bit 5; the legacy MMU's EPT leaves with
`ept_ad`: bit 8) has its Accessed bit cleared; without them (the legacy MMU with `ept_ad=0`:
role.ad_disabled) it is marked for access tracking (mark_spte_for_access_track: R and X
parked in high bits, RWX cleared, W dropped), so the next access faults and the fast page
fault (fastpf.py) restores it. No TLB flush, as KVM's clear_young does none: a vCPU may use
its cached translation until it is evicted.

Locking: the MMU lock held for write around the rmap walk, as KVM did until its 2025
lockless rmap aging (which takes each rmap head's own lock instead). The hardware and the
lockless fast page fault still change the SPTEs meanwhile; each SPTE is read and written with
no switch point in between, as KVM's atomic clear_bit / mmu_spte_update_no_track are.
"""

from __future__ import annotations

from mmu_core import hookimpl, mutants
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S


class Aging:
    """mmu_age_gfn_range for the shadow MMU (a mixin of ShadowMMU)."""

    @hookimpl
    def mmu_age_gfn_range(self, vm, as_id, start, end):
        """kvm_age_gfn for the rmaps: True if any SPTE of [start, end) was young."""
        with vm.mmu_lock.write():
            return self._age_range(as_id, start, end)

    def _age_range(self, as_id: int, start: int, end: int) -> bool:
        vm = self.vm
        cost = vm.engine.cost
        young = False
        aged = 0
        for level in (1, 2, 3):
            for p in self.rmaps.in_range(as_id, start, end, level):
                vm.engine.delay(cost.atomic_read)  # the rmap walk reaches the next SPTE
                row = vm.spte_table(p >> 9)
                spte = int(row[p & 511])
                new = self._aged(spte)
                if new is None:
                    continue
                young = True
                if new != spte:
                    row[p & 511] = new
                    aged += 1
        vm.engine.delay(aged * cost.cmpxchg)  # LOCK BTR / the update, per SPTE aged
        self.stats["aged"] += aged
        return young

    def _aged(self, spte: int) -> int | None:
        """The SPTE made old, or None if it was not young (kvm_age_rmap's is_accessed_spte,
        then clear_bit of the Accessed bit or mark_spte_for_access_track)."""
        if not S.is_shadow_present_pte(spte):
            return None
        if self.direct:
            if not S.is_accessed_spte(spte):
                return None
            new = S.mark_spte_for_access_track(spte)
            if mutants.on("access-track-not-present") and S.is_access_track_spte(new):
                new &= ~S.SPTE_MMU_PRESENT_MASK
            return new
        if not spte & P.PT_ACCESSED:
            return None
        return spte & ~P.PT_ACCESSED
