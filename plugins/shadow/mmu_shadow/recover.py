"""Huge mappings back when dirty logging stops, for the shadow MMU's rmaps.

KVM (x86.c kvm_mmu_slot_apply_flags, logging off, not for a READONLY slot) calls
kvm_mmu_recover_huge_pages, which for the rmaps is kvm_rmap_zap_collapsible_sptes under the
MMU lock held for write: every leaf at 4K and 2M (PG_LEVEL_4K .. KVM_MAX_HUGEPAGE_LEVEL - 1)
in the slot's rmaps whose shadow page is direct and could now map a larger page
(sp->role.level < kvm_mmu_max_mapping_level(kvm, slot, sp->gfn): the host mapping level, the
slot's alignment and no write-tracked gfn) is zapped (kvm_mmu_zap_collapsible_spte,
kvm_zap_one_rmap_spte), and the slot's TLB entries are flushed once under the lock
(kvm_flush_remote_tlbs_memslot). The next fault maps the huge page, replacing the table link
(mmu_set_spte drops the child). Indirect pages are left alone: they follow the guest's 4K
mappings. Unlike the TDP MMU, which since 6.12 replaces the table by a huge leaf in place, the
shadow MMU still zaps.
"""

from __future__ import annotations

from mmu_core import mutants

MAX_COLLAPSIBLE_LEVEL = 2  # KVM_MAX_HUGEPAGE_LEVEL - 1: a 1G leaf is already the largest


def recover_huge_pages(mmu, slot) -> bool:
    """kvm_mmu_recover_huge_pages for the rmaps; flushes itself. Returns False (nothing left
    for the caller to flush)."""
    if slot.readonly:
        return False  # kvm_mmu_slot_apply_flags: nothing to do for read-only slots
    vm = mmu.vm
    cost = vm.engine.cost
    zapped = visited = 0
    with vm.mmu_lock.write():
        allowed: dict[int, int] = {}  # sp.gfn -> kvm_mmu_max_mapping_level
        for level in range(1, MAX_COLLAPSIBLE_LEVEL + 1):
            for p in mmu.rmaps.in_range(slot.as_id, slot.base_gfn, slot.end_gfn, level):
                visited += 1
                sp = mmu.by_pfn.get(p >> 9)
                if sp is None or not sp.role.direct or sp.role.invalid:
                    continue
                if sp.gfn not in allowed:
                    host = vm.mm.mapping_level(slot.gfn_to_hva(sp.gfn)) \
                        if slot.base_gfn <= sp.gfn < slot.end_gfn else 1
                    allowed[sp.gfn] = vm.max_mapping_level(slot, sp.gfn, host)
                if sp.role.level >= allowed[sp.gfn]:
                    continue
                if mutants.on("recover-keeps-rmap"):
                    vm.spte_write(sp.pfn, p & 511, 0)
                else:
                    mmu._zap_spte(sp, p & 511)
                zapped += 1
        vm.engine.delay(visited * cost.atomic_read)
        if zapped:
            vm.flush_remote_tlbs()
    mmu.stats["collapsible_zapped"] += zapped
    return False
