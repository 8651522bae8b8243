"""The generation-based fast zap of every shadow page (KVM mmu.c kvm_mmu_zap_all_fast,
kvm_zap_obsolete_pages, is_obsolete_sp).

Under the MMU lock held for write, kvm_mmu_zap_all_fast toggles kvm->arch.mmu_valid_gen,
which makes every existing page obsolete at once: lookups skip obsolete pages
(for_each_valid_sp), so from then on faults build new pages; every vCPU is told to drop its
obsolete roots and load new ones (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS). Then
kvm_zap_obsolete_pages zaps the obsolete pages oldest first, in batches of BATCH_ZAP_PAGES,
yielding the lock between batches when someone waits for it (cond_resched_rwlock_write), and
commits them all at the end: one remote flush, which also waits for lockless walks, then the
pages are freed. Compared with kvm_mmu_zap_all (prepare every page, one commit) the end state
is the same; what differs is that the lock is not held for the whole zap, and vCPUs fault
on new pages while the old ones are being zapped.

Here a page's generation is `ShadowPage.mmu_valid_gen`, set at creation. KVM toggles the
generation between 0 and 1, which is safe because slots_lock serializes fast zaps (at most one
invalid generation exists); the model's callers hold no such lock, so the generation counts
up and a second fast zap during a first cannot make old pages valid again. The change also takes
the obsolete pages out of the hash (`pages`), which is what for_each_valid_sp's skip amounts to
(the hash holds one page per key, and a new page of the same key must not find the old one).
They stay in `by_pfn`, `active`, `by_gfn` and the rmaps until they are zapped, as in KVM.

Which paths use it (current KVM): the MMIO generation wrap (kvm_mmu_invalidate_mmio_sptes),
and memslot deletion and move with KVM_X86_QUIRK_SLOT_ZAP_ALL (kvm_arch_flush_shadow_memslot).
The core calls `mmu_zap_all` for the first (and the explorer's zap-all task); memslot changes
zap the slot's range for every backend, KVM's quirk-off path (docs/shadow.md).
"""

from __future__ import annotations

from mmu_core import REQ_MMU_RELOAD, mutants

BATCH_ZAP_PAGES = 10  # mmu.c


def is_obsolete_sp(mmu, sp) -> bool:
    """is_obsolete_sp: invalid, or of a generation before the last fast zap."""
    return sp.role.invalid or sp.mmu_valid_gen != mmu.mmu_valid_gen


def zap_all_fast(mmu) -> None:
    """kvm_mmu_zap_all_fast."""
    vm = mmu.vm
    with vm.mmu_lock.write():
        mmu.mmu_valid_gen += 1  # a counter, not KVM's 0/1 toggle (module docstring)
        for key, sp in list(mmu.pages.items()):  # for_each_valid_sp skips them from now on
            if is_obsolete_sp(mmu, sp):
                del mmu.pages[key]
        for vcpu in vm.vcpus:
            vcpu.make_request(REQ_MMU_RELOAD)  # KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
        _zap_obsolete_pages(mmu)
    mmu.stats["fast_zaps"] += 1


def _zap_obsolete_pages(mmu) -> None:
    """kvm_zap_obsolete_pages: oldest first, stopping at the first valid page (pages are on
    the active list in creation order, so every obsolete one comes before it); the lock is
    yielded between batches when contended; one commit for all."""
    vm = mmu.vm
    zapped: list = []
    batch = 0
    while True:
        restart = False
        for sp in list(mmu.active.values()):
            if not is_obsolete_sp(mmu, sp):
                break
            if sp.pfn not in mmu.active:
                continue  # zapped meanwhile (as a child of a page zapped before it)
            if batch >= BATCH_ZAP_PAGES and vm.mmu_lock.contended:
                mmu.stats["fast_zap_yields"] += 1
                vm.mmu_lock.cond_resched("write")
                batch = 0
                restart = True
                break
            batch += mmu._prepare_zap(sp, zapped)
        if not restart:
            break
    if mutants.on("fast-zap-no-kick"):
        for sp in zapped:  # freed without the flush that kicks vCPUs out of lockless walks
            mmu.by_pfn.pop(sp.pfn, None)
            vm.free_pt_page(sp.pfn)
        return
    mmu._commit_zap(zapped)
