"""Dirty logging in the shadow MMU: eager page splitting, then write-protection or D bits.

KVM (x86.c kvm_mmu_slot_apply_flags, mmu.c) when KVM_MEM_LOG_DIRTY_PAGES is set on a slot
whose SPTEs live in the shadow MMU's rmaps:

1. ``eager_page_split``: kvm_mmu_slot_try_split_huge_pages ->
   kvm_shadow_mmu_try_split_huge_pages, under the MMU lock held for *write*, from the largest
   huge level down to 4K (a 1G leaf becomes 512 2M leaves, which the next pass splits): for
   each huge leaf of the slot's rmaps, shadow_mmu_try_split_huge_page gets the direct child
   page (shadow_mmu_get_sp_for_split: found in the hash or new), fills its empty entries with
   the huge leaf's bits and consecutive frames (make_huge_page_split_spte), adds each to its
   rmap (__rmap_add) and links it in place of the leaf (__link_shadow_page, flushing only when
   a child entry already pointed at a lower table). This is David Matlack's "Extend Eager
   Page Splitting to the shadow MMU" as posted (v1, 2022), whose figures docs/shadow.md
   ("Fidelity") reproduces; the merged version (6.0) keeps it for nested MMUs only and returns
   early without the TDP MMU (``if (!tdp_mmu_enabled) return``). The model splits the huge
   leaves of *direct* pages only: the legacy MMU's (ept on, tdp_mmu off) and, under shadow
   paging, those below a guest huge page; a huge leaf in a page that shadows a guest page
   directory (shadow paging with guest 2M pages) is left to split on its first write, as the
   merged KVM leaves every shadow-paging huge page.
2. With PML (kvm_x86_ops.cpu_dirty_log_size, EPT with A/D): kvm_mmu_slot_leaf_clear_dirty
   clears the D bit of every 4K leaf and kvm_mmu_slot_remove_write_access write-protects the
   huge ones (PML logs a write that sets D; a huge leaf must fault to be split). Without PML
   (shadow paging, or no EPT A/D): every leaf is write-protected (W cleared, MMU-writable
   kept: spte_write_protect with pt_protect false).
3. Flush once (the caller, on our True).

KVM_GET/CLEAR_DIRTY_LOG re-protect the harvested gfns the same way
(kvm_arch_mmu_enable_log_dirty_pt_masked: kvm_mmu_clear_dirty_pt_masked or
kvm_mmu_write_protect_pt_masked on the 4K rmaps; with KVM_DIRTY_LOG_INITIALLY_SET the huge
pages over the range are split first, or write-protected). Everything here holds the MMU lock
for write, as every shadow-MMU fault does, so nothing here races a fault: only the hardware
(guest accesses through present SPTEs and their TLB entries, D bits and PML) runs beside it.
"""

from __future__ import annotations

import numpy as np

from mmu_core import mutants
from mmu_core.arch.x86 import spte as S
from mmu_shadow import role as R

_W = np.uint64(S.PT_WRITABLE_MASK)
_D = np.uint64(S.VMX_EPT_DIRTY_BIT)
_LARGE = np.uint64(S.PT_PAGE_SIZE_MASK)
_ADDR = np.uint64(S.SPTE_BASE_ADDR_MASK)
_AD_MASK = np.uint64(S.SPTE_TDP_AD_MASK)
_AD_DISABLED = np.uint64(S.SPTE_TDP_AD_DISABLED)
KVM_MAX_HUGEPAGE_LEVEL = 3


def split_children(huge: int, level: int, nx_exec: bool = False) -> np.ndarray:
    """make_huge_page_split_spte: the 512 entries of a table mapping what the huge leaf at
    `level` mapped: same bits, consecutive frames, the large bit kept above 4K. With
    `nx_exec` (an EPT leaf made non-executable by the NX huge page mitigation) 4K children
    are executable again, as KVM's make_spte_executable does."""
    child_level = level - 1
    step = np.uint64(1) << np.uint64(9 * (child_level - 1) + 12)
    h = np.uint64(huge)
    base = h & ~_ADDR
    if child_level == 1:
        base &= ~_LARGE
        if nx_exec:
            base |= np.uint64(S.VMX_EPT_EXECUTABLE_MASK)
    return base | ((h & _ADDR) + np.arange(512, dtype=np.uint64) * step)


def _split_one(mmu, sp, idx: int) -> None:
    """shadow_mmu_try_split_huge_page for the huge leaf at sp[idx]. Flushes at once if a child
    entry already pointed at a lower table, which the link unmaps (__link_shadow_page)."""
    vm = mmu.vm
    cost = vm.engine.cost
    level = sp.role.level
    huge = int(vm.spte_table(sp.pfn)[idx])
    gfn = sp.leaf_gfn(idx) & ~((1 << (9 * (level - 1))) - 1)
    role = sp.role._replace(level=level - 1, direct=True, quadrant=0, guest_level=0,
                            special=False, invalid=False)
    key = R.Key(gfn, role)
    vm.engine.delay(cost.sp_hash_lookup)
    child = mmu.pages.get(key)
    if child is None:
        child = mmu._alloc_sp(key)  # from the split caches: the page limit is not consulted
        vm.engine.delay(cost.pt_page_alloc)
    # make_huge_page_split_spte makes 4K children executable only where the role allows
    # execution; an EPT02 page's permissions come from EPT12, so only L1's direct pages here.
    children = split_children(huge, level, mmu.direct and vm.params.nx_huge_pages
                              and not sp.role.guest_mode)
    row = vm.spte_table(child.pfn)
    flush = False
    step = 1 << (9 * (level - 2))
    filled = 0
    for i in range(512):
        old = int(row[i])
        if S.is_shadow_present_pte(old):
            flush |= not S.is_last_spte(old, level - 1)
            continue
        vm.spte_write(child.pfn, i, children[i])
        if not mutants.on("shadow-split-no-rmap"):
            mmu.rmaps.add(sp.role.as_id, gfn + i * step, level - 1, child.pfn * 512 + i)
        filled += 1
    vm.engine.delay(filled * (cost.spte_write + cost.rmap_add))
    # __link_shadow_page: drop the huge leaf (its rmap entry), then point the entry at child.
    mmu._zap_spte(sp, idx)
    if flush:
        vm.flush_remote_tlbs()
    mmu._link(sp.pfn, idx, child)
    mmu.stats["eager_split"] = mmu.stats.get("eager_split", 0) + 1


def try_split_huge_pages(mmu, slot, start: int, end: int) -> bool:
    """kvm_shadow_mmu_try_split_huge_pages to 4K over [start, end) of the slot; the caller
    holds the MMU lock for write. Returns False: the split leaves map what the huge ones
    did, with the same permissions, so the protection that follows decides the flush."""
    vm = mmu.vm
    for level in range(KVM_MAX_HUGEPAGE_LEVEL, 1, -1):
        for p in mmu.rmaps.in_range(slot.as_id, start, end, level):
            sp = mmu.by_pfn.get(p >> 9)
            if sp is None or sp.role.invalid or sp.unsync or not sp.role.direct:
                continue
            spte = int(vm.spte_table(sp.pfn)[p & 511])
            if not S.is_shadow_present_pte(spte) or not S.is_last_spte(spte, level):
                continue
            _split_one(mmu, sp, p & 511)
    return False


def _protect_range(mmu, as_id: int, start: int, end: int, levels, clear_dirty: bool) -> bool:
    """slot_rmap_write_protect / __rmap_clear_dirty over the rmaps of `levels`: clear W (or,
    with clear_dirty, the D bit of an A/D-enabled leaf, W of one without A/D). True if any
    SPTE changed."""
    vm = mmu.vm
    cost = vm.engine.cost
    visited = changed = 0
    for level in levels:
        for p in mmu.rmaps.in_range(as_id, start, end, level):
            visited += 1
            spte = np.uint64(vm.spte_table(p >> 9)[p & 511])
            if clear_dirty and (spte & _AD_MASK) != _AD_DISABLED:
                new = spte & ~_D
            else:
                new = spte & ~_W
            if new != spte:
                vm.spte_write(p >> 9, p & 511, new)
                changed += 1
    vm.engine.delay(visited * cost.atomic_read + changed * cost.spte_write)
    return changed > 0


def _pml(mmu) -> bool:
    return mmu.direct and mmu.vm.params.pml_enabled


def enable_dirty_log(mmu, slot, protect: bool) -> bool:
    """kvm_mmu_slot_apply_flags, logging on, for the shadow MMU (module docstring)."""
    if not protect:
        return False  # KVM_DIRTY_LOG_INITIALLY_SET: nothing until userspace clears bits
    vm = mmu.vm
    start, end = slot.base_gfn, slot.end_gfn
    flush = False
    with vm.mmu_lock.write():
        if vm.params.eager_page_split:
            flush |= try_split_huge_pages(mmu, slot, start, end)
        if _pml(mmu):
            flush |= _protect_range(mmu, slot.as_id, start, end, (1,), clear_dirty=True)
            flush |= _protect_range(mmu, slot.as_id, start, end, (2, 3), clear_dirty=False)
        elif not mutants.on("shadow-dirty-log-no-wrprot"):
            flush |= _protect_range(mmu, slot.as_id, start, end, (1, 2, 3), clear_dirty=False)
    return flush


def clear_dirty_log(mmu, slot, gfns) -> bool:
    """kvm_arch_mmu_enable_log_dirty_pt_masked for the harvested gfns, under the write lock."""
    gfns = np.asarray(gfns, dtype=np.int64)
    if not len(gfns):
        return False
    vm = mmu.vm
    breaks = np.flatnonzero(np.diff(gfns) != 1) + 1
    starts = np.concatenate(([gfns[0]], gfns[breaks])).tolist()
    ends = (np.concatenate((gfns[breaks - 1] + 1, [gfns[-1] + 1])) if len(breaks)
            else np.array([gfns[-1] + 1])).tolist()
    flush = False
    with vm.mmu_lock.write():
        if vm.config.dirty_log_initially_set:
            lo, hi = int(gfns[0]), int(gfns[-1]) + 1
            if vm.params.eager_page_split:
                flush |= try_split_huge_pages(mmu, slot, lo, hi)
            flush |= _protect_range(mmu, slot.as_id, lo, hi, (2, 3), clear_dirty=False)
        for lo, hi in zip(starts, ends, strict=True):
            flush |= _protect_range(mmu, slot.as_id, lo, hi, (1,), clear_dirty=_pml(mmu))
    return flush


def pml_may_log(mmu, sp, spte: int, as_id: int, gfn: int) -> bool:
    """For the audit: a writable leaf of a logged slot whose page is not in the bitmap is
    fine under PML when it is a clean 4K leaf with A/D (the write that sets D is logged), or
    when its gfn still waits in a vCPU's PML buffer."""
    vm = mmu.vm
    if not _pml(mmu):
        return False
    s = np.uint64(spte)
    if sp.role.level == 1 and not s & _D and (s & _AD_MASK) != _AD_DISABLED:
        return True
    return any(int(g) >> 12 == gfn for v in vm.vcpus for g in v.pml[1:int(v.pml[0]) + 1])
