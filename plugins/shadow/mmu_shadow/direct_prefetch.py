"""The legacy MMU's prefetch of a fault's neighbours (KVM mmu.c direct_pte_prefetch,
__direct_pte_prefetch, direct_pte_prefetch_many).

After direct_map installs a 4K leaf, the other entries of its aligned group of
PTE_PREFETCH_NUM (8) that are not present are filled, run by run, with pages the host
already maps (kvm_prefetch_pages: get_user_pages_fast_only with FOLL_WRITE, so a page that is
missing, swapped out or read-only in the host ends the run and the prefetch). Not at all when
the page's SPTEs have no A/D bits (sp_ad_disabled: a prefetched page could not be told from
an accessed one), above 4K, or while an MMU-notifier invalidation is in progress; not in a
logged slot (gfn_to_memslot_dirty_bitmap refuses a writable prefetch there) nor a READONLY
one (gfn_to_hva_many refuses it for a write). Each prefetched leaf is what mmu_set_spte
builds with prefetch: writable and dirty as the access allows (a write-tracked gfn read-only,
mmu_try_to_unsync_pages), its Accessed bit clear (mark_spte_for_access_track on an A/D SPTE),
so that aging does not count it as used.
"""

from __future__ import annotations

from mmu_core import mutants
from mmu_core.arch.x86 import spte as S
from mmu_core.backend import make_direct_leaf

PTE_PREFETCH_NUM = 8


def direct_pte_prefetch(mmu, sp, fault_idx: int) -> int:
    """direct_pte_prefetch around the leaf sp[fault_idx]; the caller holds the write lock.
    Returns how many leaves it installed."""
    vm = mmu.vm
    if sp.role.ad_disabled or sp.role.level > 1 or vm.mmu_invalidate_in_progress:
        return 0
    row = vm.spte_table(sp.pfn)
    base = fault_idx & ~(PTE_PREFETCH_NUM - 1)
    done = 0
    start = None
    for idx in range(base, base + PTE_PREFETCH_NUM + 1):
        busy = idx == base + PTE_PREFETCH_NUM or idx == fault_idx \
            or S.is_shadow_present_pte(int(row[idx]))
        if not busy:
            if start is None:
                start = idx
            continue
        if start is None:
            continue
        n = _prefetch_many(mmu, sp, start, idx)
        if n < 0:
            break
        done += n
        start = None
    mmu.stats["direct_prefetched"] += done
    return done


def _prefetch_many(mmu, sp, start: int, end: int) -> int:
    """direct_pte_prefetch_many for entries [start, end): -1 when nothing could be mapped
    (the whole prefetch stops), else how many were."""
    vm = mmu.vm
    as_id = sp.role.as_id
    gfn = sp.leaf_gfn(start)
    slot = vm.memslots[as_id].find(gfn)
    if slot is None or slot.readonly or gfn + (end - start) > slot.end_gfn:
        return -1
    if slot.log_dirty and not mutants.on("direct-prefetch-logged-slot"):
        return -1  # gfn_to_memslot_dirty_bitmap: a writable prefetch would go unlogged
    pfns = []
    for i in range(end - start):  # get_user_pages_fast_only: stops at the first failure
        hva = slot.gfn_to_hva(gfn + i)
        pfn = vm.mm.lookup(hva)
        if pfn < 0 or not vm.host_writable(hva):
            break
        pfns.append(pfn)
    if not pfns:
        return -1
    for i, pfn in enumerate(pfns):
        # make_spte with prefetch: a shadowed gfn (an EPT12 table) stays read-only; a
        # prefetch never unsyncs (mmu_try_to_unsync_pages returns -EEXIST)
        writable = mmu._try_unsync(as_id, gfn + i, True, True)
        vm.engine.delay(vm.engine.cost.spte_build)
        spte = make_direct_leaf(vm, pfn, 1, writable, True, writable, True)
        vm.spte_write(sp.pfn, start + i, S.mark_spte_for_access_track(spte))
        mmu._add_rmap(sp, start + i, gfn + i)
    return len(pfns)
