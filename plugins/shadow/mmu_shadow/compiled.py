"""The legacy MMU's compiled kernel for the compiled demand-paging loop (docs/fastloop.md).

`legacy_kernel` is ShadowMMU.mmu_load and the demand-paging part of `_direct_fault`
(shadow_mmu.py, pages.py, direct_prefetch.py) for a direct role as a state machine: each
call runs to the next switch point of the Python code and returns it as a request
(mmu_core.sim.fastloop R_*). In KVM's terms: direct_page_fault under write_lock(mmu_lock),
direct_map linking missing tables with kvm_mmu_get_child_sp (kvm_mmu_find_shadow_page's
hash lookup, kvm_mmu_alloc_shadow_page, link_shadow_page), mmu_set_spte for the leaf with
its rmap_add, then direct_pte_prefetch / __direct_pte_prefetch for the leaf's aligned group
of PTE_PREFETCH_NUM. The fast page fault is not tried: with EPT A/D bits a non-present fault
is not a fast case (page_fault_can_be_fast), and the exact path returns before any switch
point.

It works on the VM's own arrays: SPTEs in `pt` (through `pt_slot`), table pages from the
host memory, and the rmap heads, which `prepare` makes views into `kg` (rmap.py keeps one
int64 head per gfn per level per memslot, and so does the kernel: the arrays the audit and
`mmu_memory` read after the run are the ones the kernel wrote). The shadow pages it creates
(struct kvm_mmu_page: gfn, level, parent SPTE) are logged in `kg` and turned into the
backend's ShadowPage objects by `finish`, in creation order, as the hash, `by_pfn` and the
active list would have them. States it does not model return R_ERROR rather than guess: a
huge mapping, an MMIO SPTE, a second SPTE for one gfn (a pte_list_desc chain: impossible
with one direct root), a page limit reached (reclaim). `unsupported` keeps every run that
could reach one of them on the exact engine.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmu_core import MMUError, Ret
from mmu_core.arch.x86 import spte as S
from mmu_core.backend import make_direct_leaf
from mmu_core.sim import fastloop as F
from mmu_shadow import role as R
from mmu_shadow.direct_prefetch import PTE_PREFETCH_NUM
from mmu_shadow.pages import KVM_MIN_FREE_MMU_PAGES, ShadowPage
from mmu_shadow.rmap import LEVELS

# ks columns (from fastloop.KS_FREE)
_LV = F.KS_FREE  # the level of the table being walked
_TBL = F.KS_FREE + 1  # its pfn; the leaf's table once the walk is down
_CHILD = F.KS_FREE + 2  # a new shadow page being linked
_IDX = F.KS_FREE + 3  # the entry being linked, then the leaf's index
_RET = F.KS_FREE + 4
_PF_IDX = F.KS_FREE + 5  # direct_pte_prefetch: the entry the loop looks at next
_PF_START = F.KS_FREE + 6  # the start of the run of free entries (-1: none)
_PF_N = F.KS_FREE + 7  # pages of the run get_user_pages_fast_only found
_PF_I = F.KS_FREE + 8  # the one being installed
_PF_DONE = F.KS_FREE + 9
_PF_GFN = F.KS_FREE + 10  # the run's first gfn
_PF_PFNS = F.KS_FREE + 11  # PTE_PREFETCH_NUM - 1 entries: a run never includes the fault
if _PF_PFNS + PTE_PREFETCH_NUM - 1 > F.KS_SIZE:
    raise AssertionError("the kernel's state does not fit fastloop's ks row")

# kg: the VM's part, then the tables below
G_ROOT = 0  # the root's pfn, -1 until the first mmu_load creates it
G_ROOT_LEVEL = 1
G_LOADS = 2  # root references taken (mmu_load): the root's root_count
G_N_USED = 3  # n_used_mmu_pages
G_N_MAX = 4  # n_max_mmu_pages
G_HASH = 5  # cost.sp_hash_lookup
G_PT_ALLOC = 6  # cost.pt_page_alloc
G_SPTE_WRITE = 7  # cost.spte_write
G_SPTE_BUILD = 8  # cost.spte_build
G_RMAP_ADD = 9  # cost.rmap_add
G_NONLEAF = 10  # make_nonleaf_spte(0)
G_LEAF = 11  # + writable: the 4K leaf make_direct_leaf builds for a fault, pfn 0
G_PREFETCH_LEAF = 13  # the 4K leaf a prefetch installs (writable, Accessed clear), pfn 0
G_PREFETCH = 14  # 1: direct_pte_prefetch runs (A/D bits on, no invalidation in progress)
G_NSLOTS = 15
G_SLOTS = 16  # offset of the slot table (SL_* columns per memslot of address space 0)
G_NPAGES = 17  # shadow pages created so far
G_PAGES = 18  # offset of the page log (PG_* columns per page, in creation order)
G_PAGES_CAP = 19
G_NLOADED = 20
G_LOADED = 21  # offset of the load log: the tasks that took a root reference, in order
G_ERROR = 22  # what an R_ERROR was about (ERR_*), for the message
G_HDR = 32
(SL_BASE, SL_NPAGES, SL_HVAI, SL_RMAP) = range(4)  # SL_RMAP + level - 1: the heads' offset
SL_SIZE = 6
(PG_PFN, PG_GFN, PG_LEVEL, PG_PARENT) = range(4)
PG_SIZE = 4

# kstats: ShadowMMU.stats
(S_FAULTS, S_SPURIOUS, S_MAPPED_4K, S_CREATED, S_ROOT_ALLOCS, S_PREFETCHED) = range(6)
S_SIZE = 8

_FIXED = int(Ret.FIXED)
_SPURIOUS = int(Ret.SPURIOUS)

ERR_PAGE_LIMIT = 1
ERR_HUGE = 2
ERR_MMIO = 3
ERR_RMAP_CHAIN = 4
ERR_PAGE_LOG = 5
ERROR_TEXT = {
    ERR_PAGE_LIMIT: "the shadow page limit was reached (reclaim is not compiled)",
    ERR_HUGE: "a huge mapping (not compiled)",
    ERR_MMIO: "an MMIO SPTE on the fault's path",
    ERR_RMAP_CHAIN: "a second SPTE for one gfn (pte_list_desc chains are not compiled)",
    ERR_PAGE_LOG: "more shadow pages than the memslots need",
}


@njit(cache=True)
def _slot_of(kg, gfn):
    """The row of the memslot holding gfn (memslots do not overlap), or -1."""
    for s in range(kg[G_NSLOTS]):
        row = kg[G_SLOTS] + s * SL_SIZE
        if kg[row + SL_BASE] <= gfn < kg[row + SL_BASE] + kg[row + SL_NPAGES]:
            return row
    return -1


@njit(cache=True)
def _rmap_head(kg, gfn, level):
    """Where gfn's rmap head for `level` lives in kg (rmap.py gfn_to_index), or -1 without
    an rmap (Rmaps.find: no slot)."""
    row = _slot_of(kg, gfn)
    if row < 0:
        return -1
    shift = 9 * (level - 1)
    return kg[row + SL_RMAP + level - 1] + (gfn >> shift) - (kg[row + SL_BASE] >> shift)


@njit(cache=True)
def _rmap_add(kg, gfn, level, sptep):
    """Rmaps.add (pte_list_add) for an empty head; False for a head already in use."""
    h = _rmap_head(kg, gfn, level)
    if h < 0:
        return True
    if kg[h] != 0:
        return False
    kg[h] = sptep + 1
    return True


@njit(cache=True)
def _rmap_remove(kg, gfn, level, sptep):
    """Rmaps.remove (pte_list_remove) of the head's only SPTE (an SPTE not there is left
    alone, as Rmaps.remove does); False for a chain."""
    h = _rmap_head(kg, gfn, level)
    if h < 0:
        return True
    if kg[h] == sptep + 1:
        kg[h] = 0
    return kg[h] >= 0


@njit(cache=True)
def _new_page(kg, kstats, mem, free1, free_slots, pt_slot, tag, mapcount, frame_state, log,
              gfn, level, parent):
    """kvm_mmu_alloc_shadow_page after alloc_pt_page's delay: the frame, its table row, and
    the page logged for finish() (hash, by_pfn, active list); -1 if the log is full."""
    n = kg[G_NPAGES]
    if n >= kg[G_PAGES_CAP]:
        return -1
    pfn = F.mem_alloc(mem, free1, tag, mapcount, frame_state, log, F.MMU_PT)
    F.mem_table(mem, free_slots, pt_slot, pfn)
    row = kg[G_PAGES] + n * PG_SIZE
    kg[row + PG_PFN] = pfn
    kg[row + PG_GFN] = gfn
    kg[row + PG_LEVEL] = level
    kg[row + PG_PARENT] = parent
    kg[G_NPAGES] = n + 1
    kg[G_N_USED] += 1
    kstats[S_CREATED] += 1
    return pfn


@njit(cache=True)
def _error(kg, code):
    kg[G_ERROR] = code
    return F.R_ERROR, code


@njit(cache=True)
def legacy_kernel(op, t, ks, ksu, kg, kstats, mem, free1, free_slots, pt, pt_slot, tag,
                  mapcount, frame_state, log, hva_pfn, hva_writable):
    while True:
        st = ks[t, F.KS_STATE]
        if op == F.K_LOAD:
            # ShadowMMU.mmu_load for a direct role: all under the write lock
            if st == 0:
                ks[t, F.KS_STATE] = 1
                return F.R_WLOCK, 0
            if st == 1:  # _make_pages_available, then _get_sp's hash lookup
                if kg[G_N_MAX] - kg[G_N_USED] < KVM_MIN_FREE_MMU_PAGES:
                    return _error(kg, ERR_PAGE_LIMIT)
                ks[t, F.KS_STATE] = 2
                return F.R_DELAY, kg[G_HASH]
            if st == 2:
                if kg[G_ROOT] < 0:
                    ks[t, F.KS_STATE] = 3
                    return F.R_DELAY, kg[G_PT_ALLOC]
                ks[t, F.KS_STATE] = 4
                continue
            if st == 3:  # _alloc_sp of the root (root_allocs: it was not in the hash)
                pfn = _new_page(kg, kstats, mem, free1, free_slots, pt_slot, tag, mapcount,
                                frame_state, log, 0, kg[G_ROOT_LEVEL], -1)
                if pfn < 0:
                    return _error(kg, ERR_PAGE_LOG)
                kg[G_ROOT] = pfn
                kstats[S_ROOT_ALLOCS] += 1
                ks[t, F.KS_STATE] = 4
                continue
            if st == 4:  # root_count += 1, the vCPU's root
                kg[G_LOADS] += 1
                kg[kg[G_LOADED] + kg[G_NLOADED]] = t
                kg[G_NLOADED] += 1
                ks[t, F.KS_ROOT] = kg[G_ROOT]
                ks[t, F.KS_STATE] = 5
                return F.R_WUNLOCK, 0
            return F.R_DONE, 0

        gfn = ks[t, F.KS_GFN]
        # ShadowMMU._direct_fault from the lock on (gfn_to_pfn ran in the core)
        if st == 0:
            kstats[S_FAULTS] += 1
            if ks[t, F.KS_LEVEL] != 1:
                return _error(kg, ERR_HUGE)
            ks[t, F.KS_STATE] = 1
            return F.R_WLOCK, 0
        if st == 1:  # _make_pages_available; _fetch_chain from the vCPU's root
            if kg[G_N_MAX] - kg[G_N_USED] < KVM_MIN_FREE_MMU_PAGES:
                return _error(kg, ERR_PAGE_LIMIT)
            ks[t, _LV] = kg[G_ROOT_LEVEL]
            ks[t, _TBL] = ks[t, F.KS_ROOT]
            ks[t, F.KS_STATE] = 2
            continue
        if st == 2:  # _fetch_from: one level down (plain reads under the write lock)
            level = ks[t, _LV]
            if level == 1:
                ks[t, F.KS_STATE] = 10
                continue
            idx = (gfn >> (9 * (level - 1))) & 511
            spte = pt[pt_slot[ks[t, _TBL]], idx]
            if S.is_shadow_present_pte(spte):
                if S.is_last_spte(spte, level):
                    return _error(kg, ERR_HUGE)
                ks[t, _TBL] = S.spte_to_pfn(spte)
                ks[t, _LV] = level - 1
                continue
            if spte != 0:
                return _error(kg, ERR_MMIO)
            ks[t, _IDX] = idx
            ks[t, F.KS_STATE] = 3
            return F.R_DELAY, kg[G_HASH]  # _get_sp: kvm_mmu_find_shadow_page misses
        if st == 3:
            ks[t, F.KS_STATE] = 4
            return F.R_DELAY, kg[G_PT_ALLOC]
        if st == 4:  # _alloc_sp of the child at level - 1
            level = ks[t, _LV] - 1
            child_gfn = gfn & ~((1 << (9 * level)) - 1)
            parent = ks[t, _TBL] * 512 + ks[t, _IDX]
            child = _new_page(kg, kstats, mem, free1, free_slots, pt_slot, tag, mapcount,
                              frame_state, log, child_gfn, level, parent)
            if child < 0:
                return _error(kg, ERR_PAGE_LOG)
            ks[t, _CHILD] = child
            ks[t, F.KS_STATE] = 5
            return F.R_DELAY, kg[G_SPTE_WRITE]  # _link's spte_write
        if st == 5:
            child = ks[t, _CHILD]
            pt[pt_slot[ks[t, _TBL]], ks[t, _IDX]] = (np.uint64(kg[G_NONLEAF])
                                                     | (np.uint64(child) << np.uint64(12)))
            ks[t, _TBL] = child
            ks[t, _LV] -= 1
            ks[t, F.KS_STATE] = 2
            continue
        if st == 10:  # the leaf: old is read before spte_build's delay
            idx = gfn & 511
            ks[t, _IDX] = idx
            ksu[t, 0] = pt[pt_slot[ks[t, _TBL]], idx]
            ks[t, F.KS_STATE] = 11
            return F.R_DELAY, kg[G_SPTE_BUILD]
        if st == 11:
            new = (np.uint64(kg[G_LEAF + ks[t, F.KS_WRITABLE]])
                   | (np.uint64(ks[t, F.KS_PFN]) << np.uint64(12)))
            ksu[t, 1] = new
            old = ksu[t, 0]
            if old == new:
                kstats[S_SPURIOUS] += 1
                ks[t, _RET] = _SPURIOUS
                ks[t, F.KS_STATE] = 30
                continue
            ks[t, F.KS_STATE] = 12 if old != np.uint64(0) else 14
            continue
        if st == 12:  # _zap_spte of what was there (a leaf: drop its rmap, then clear)
            cur = pt[pt_slot[ks[t, _TBL]], ks[t, _IDX]]
            if cur == 0:
                ks[t, F.KS_STATE] = 14
                continue
            if not S.is_shadow_present_pte(cur):
                return _error(kg, ERR_MMIO)
            if not _rmap_remove(kg, gfn, 1, ks[t, _TBL] * 512 + ks[t, _IDX]):
                return _error(kg, ERR_RMAP_CHAIN)
            ks[t, F.KS_STATE] = 13
            return F.R_DELAY, kg[G_SPTE_WRITE]
        if st == 13:
            pt[pt_slot[ks[t, _TBL]], ks[t, _IDX]] = 0
            ks[t, F.KS_STATE] = 14
            continue
        if st == 14:
            ks[t, F.KS_STATE] = 15
            return F.R_DELAY, kg[G_SPTE_WRITE]
        if st == 15:
            pt[pt_slot[ks[t, _TBL]], ks[t, _IDX]] = ksu[t, 1]
            ks[t, F.KS_STATE] = 16
            return F.R_DELAY, kg[G_RMAP_ADD]
        if st == 16:
            if not _rmap_add(kg, gfn, 1, ks[t, _TBL] * 512 + ks[t, _IDX]):
                return _error(kg, ERR_RMAP_CHAIN)
            kstats[S_MAPPED_4K] += 1
            ks[t, _RET] = _FIXED
            if not kg[G_PREFETCH]:
                ks[t, F.KS_STATE] = 30
                continue
            ks[t, _PF_IDX] = ks[t, _IDX] & ~(PTE_PREFETCH_NUM - 1)
            ks[t, _PF_START] = -1
            ks[t, _PF_DONE] = 0
            ks[t, F.KS_STATE] = 20
            continue
        if st == 20:  # direct_pte_prefetch: the next entry of the group
            base = ks[t, _IDX] & ~(PTE_PREFETCH_NUM - 1)
            idx = ks[t, _PF_IDX]
            if idx > base + PTE_PREFETCH_NUM:
                kstats[S_PREFETCHED] += ks[t, _PF_DONE]
                ks[t, F.KS_STATE] = 30
                continue
            ks[t, _PF_IDX] = idx + 1
            busy = idx == base + PTE_PREFETCH_NUM or idx == ks[t, _IDX] \
                or S.is_shadow_present_pte(pt[pt_slot[ks[t, _TBL]], idx])
            start = ks[t, _PF_START]
            if not busy:
                if start < 0:
                    ks[t, _PF_START] = idx
                continue
            if start < 0:
                continue
            # direct_pte_prefetch_many for [start, idx): the pages the host maps writable,
            # up to the first that it does not (get_user_pages_fast_only), looked up at once
            first = (gfn & ~511) + start
            row = _slot_of(kg, first)
            n = 0
            if row >= 0 and first + (idx - start) <= kg[row + SL_BASE] + kg[row + SL_NPAGES]:
                hvai = kg[row + SL_HVAI] + first - kg[row + SL_BASE]
                while n < idx - start:
                    pfn = np.int64(hva_pfn[hvai + n])  # stored in 4 bytes
                    if pfn < 0 or not hva_writable[hvai + n]:
                        break
                    ks[t, _PF_PFNS + n] = pfn
                    n += 1
            if n == 0:  # nothing mapped: the whole prefetch stops
                kstats[S_PREFETCHED] += ks[t, _PF_DONE]
                ks[t, F.KS_STATE] = 30
                continue
            ks[t, _PF_GFN] = first
            ks[t, _PF_N] = n
            ks[t, _PF_I] = 0
            ks[t, F.KS_STATE] = 21
            continue
        if st == 21:
            if ks[t, _PF_I] >= ks[t, _PF_N]:
                ks[t, _PF_DONE] += ks[t, _PF_N]
                ks[t, _PF_START] = -1
                ks[t, F.KS_STATE] = 20
                continue
            ks[t, F.KS_STATE] = 22
            return F.R_DELAY, kg[G_SPTE_BUILD]
        if st == 22:
            ks[t, F.KS_STATE] = 23
            return F.R_DELAY, kg[G_SPTE_WRITE]
        if st == 23:
            i = ks[t, _PF_I]
            pt[pt_slot[ks[t, _TBL]], ks[t, _PF_START] + i] = (
                np.uint64(kg[G_PREFETCH_LEAF])
                | (np.uint64(ks[t, _PF_PFNS + i]) << np.uint64(12)))
            ks[t, F.KS_STATE] = 24
            return F.R_DELAY, kg[G_RMAP_ADD]
        if st == 24:
            i = ks[t, _PF_I]
            if not _rmap_add(kg, ks[t, _PF_GFN] + i, 1,
                             ks[t, _TBL] * 512 + ks[t, _PF_START] + i):
                return _error(kg, ERR_RMAP_CHAIN)
            ks[t, _PF_I] = i + 1
            ks[t, F.KS_STATE] = 21
            continue
        if st == 30:  # leaving `with vm.mmu_lock.write()`
            ks[t, F.KS_STATE] = 31
            return F.R_WUNLOCK, 0
        return F.R_DONE, ks[t, _RET]


def _i64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _template(build) -> int:
    """The SPTE `build(pfn)` makes for pfn 0, checked to be that template | pfn << 12."""
    bits = int(build(0))
    probe = 12345
    if int(build(probe)) != bits | (probe << 12):
        raise AssertionError("an SPTE builder is not template | pfn << 12")
    return _i64(bits)


def _intervals(slots, shift: int) -> int:
    """How many distinct gfn >> shift the slots' gfns take (the tables a level needs)."""
    spans = sorted((s.base_gfn >> shift, (s.base_gfn + s.npages - 1) >> shift) for s in slots)
    n, end = 0, -1
    for lo, hi in spans:
        lo = max(lo, end + 1)
        if hi >= lo:
            n += hi - lo + 1
            end = hi
    return n


def direct_tables_needed(slots, root_level: int) -> int:
    """The direct shadow pages that map every gfn of `slots`: a root and, for each level
    below it, one per aligned region a table at that level covers."""
    return 1 + sum(_intervals(slots, 9 * level) for level in range(1, root_level))


class LegacyCompiled:
    """What `mmu_compiled_kernels` returns for the legacy MMU (a direct role without the
    TDP MMU): the kernel and its Python side."""

    name = "legacy"
    kernel = staticmethod(legacy_kernel)

    def __init__(self, mmu) -> None:
        self.mmu = mmu

    def unsupported(self, vm) -> str | None:
        mmu = self.mmu
        if not vm.params.ept_ad:
            return "ept_ad=0 (A/D-disabled SPTEs: no prefetch, fast page faults on " \
                   "non-present SPTEs)"
        if mmu.by_pfn or mmu.vroots:
            return "the VM already has shadow pages or roots"
        if vm.mmu_invalidate_in_progress:
            return "an MMU-notifier invalidation is in progress"
        if not mmu.rmaps.allocated or mmu.rmaps.descs \
                or any(h.any() for rm in mmu.rmaps.slots.values() for h in rm.heads):
            return "the rmaps are not empty"
        slots = vm.memslots[0].slots
        if any(rm.as_id != 0 for rm in mmu.rmaps.slots.values()) \
                or len(mmu.rmaps.slots) != len(slots):
            return "rmaps for other address spaces"
        need = direct_tables_needed(slots, vm.root_levels(vm.vcpus[0]))
        if mmu.n_max - need < KVM_MIN_FREE_MMU_PAGES:
            return (f"the shadow page limit ({mmu.n_max} pages) could be reached "
                    "(make_mmu_pages_available's reclaim is not compiled)")
        return None

    def prepare(self, vm) -> tuple[np.ndarray, np.ndarray]:
        mmu = self.mmu
        root_level = vm.root_levels(vm.vcpus[0])
        slots = vm.memslots[0].slots
        rmaps = list(mmu.rmaps.slots.values())
        cap = direct_tables_needed(slots, root_level)
        nv = len(vm.vcpus)
        heads = sum(h.size for rm in rmaps for h in rm.heads)
        size = G_HDR + len(rmaps) * SL_SIZE + cap * PG_SIZE + nv + heads
        # np.zeros: the heads' pages are committed only as the kernel writes them
        kg = np.zeros(size, dtype=np.int64)
        kg[G_ROOT] = -1
        kg[G_ROOT_LEVEL] = root_level
        kg[G_N_USED] = mmu.n_used
        kg[G_N_MAX] = mmu.n_max
        cost = vm.engine.cost
        kg[G_HASH] = cost.sp_hash_lookup
        kg[G_PT_ALLOC] = cost.pt_page_alloc
        kg[G_SPTE_WRITE] = cost.spte_write
        kg[G_SPTE_BUILD] = cost.spte_build
        kg[G_RMAP_ADD] = cost.rmap_add
        kg[G_NONLEAF] = _template(S.make_nonleaf_spte)
        for writable in (False, True):
            # _direct_fault's leaf for a 4K page of a slot that is neither logged nor
            # read-only, the gfn not write-tracked: writable as the host maps it
            kg[G_LEAF + writable] = _template(
                lambda pfn, w=writable: make_direct_leaf(vm, pfn, 1, w, True, w, True))
        kg[G_PREFETCH_LEAF] = _template(lambda pfn: S.mark_spte_for_access_track(
            np.uint64(make_direct_leaf(vm, pfn, 1, True, True, True, True))))
        kg[G_PREFETCH] = 1  # ept_ad on (unsupported), no invalidation in progress
        kg[G_NSLOTS] = len(rmaps)
        kg[G_SLOTS] = G_HDR
        kg[G_PAGES] = G_HDR + len(rmaps) * SL_SIZE
        kg[G_PAGES_CAP] = cap
        kg[G_LOADED] = kg[G_PAGES] + cap * PG_SIZE
        off = int(kg[G_LOADED]) + nv
        by_id = {s.id: s for s in slots}
        for k, rm in enumerate(rmaps):
            row = G_HDR + k * SL_SIZE
            slot = by_id[rm.slot_id]
            kg[row + SL_BASE] = rm.base
            kg[row + SL_NPAGES] = rm.npages
            kg[row + SL_HVAI] = vm.mm.index(slot.userspace_addr)
            for level in LEVELS:
                n = rm.heads[level - 1].size
                kg[row + SL_RMAP + level - 1] = off
                # the backend's heads become views of kg: the kernel writes what the audit,
                # mmu_memory and later rmap walks read (all empty now: unsupported)
                rm.heads[level - 1] = kg[off:off + n]
                off += n
        return kg, np.zeros(S_SIZE, dtype=np.int64)

    def finish(self, vm, kg: np.ndarray, kstats: np.ndarray) -> None:
        """Write the run back into the backend's Python state: the shadow pages (hash,
        by_pfn, active list, parent links, the root's references, the vCPUs' roots), the
        page count and the statistics."""
        mmu = self.mmu
        ctx = mmu._context(vm.vcpus[0])
        roles = {level: R.make_role(ctx, level, direct=True)
                 for level in range(1, int(kg[G_ROOT_LEVEL]) + 1)}
        base = int(kg[G_PAGES])
        log = kg[base:base + int(kg[G_NPAGES]) * PG_SIZE].reshape(-1, PG_SIZE).tolist()
        for pfn, gfn, level, parent in log:
            sp = ShadowPage(gfn, roles[level], pfn, mmu_valid_gen=mmu.mmu_valid_gen)
            if parent >= 0:
                sp.parent_ptes.add(parent)
            mmu.pages[sp.key] = sp
            mmu.by_pfn[pfn] = sp
            mmu.active[pfn] = sp
        mmu.n_used = int(kg[G_N_USED])
        root = mmu.by_pfn.get(int(kg[G_ROOT]))
        if root is not None:
            root.root_count += int(kg[G_LOADS])
            first = int(kg[G_LOADED])
            for t in kg[first:first + int(kg[G_NLOADED])].tolist():
                mmu._vstate(vm.vcpus[t]).root = root
        st = mmu.stats
        st["faults"] += int(kstats[S_FAULTS])
        st["spurious"] += int(kstats[S_SPURIOUS])
        st["mapped"][1] += int(kstats[S_MAPPED_4K])
        st["pages_created"] += int(kstats[S_CREATED])
        st["root_allocs"] += int(kstats[S_ROOT_ALLOCS])
        st["direct_prefetched"] += int(kstats[S_PREFETCHED])
        if root is not None and kstats[S_ROOT_ALLOCS]:
            vm.observe.mmu_on_root_alloc(vm=vm, as_id=0, role=vm.role, root=root.pfn)
        if kg[G_ERROR]:  # the loop stopped at the kernel's R_ERROR: say which state it was
            raise MMUError(f"compiled loop, legacy kernel: "
                               f"{ERROR_TEXT.get(int(kg[G_ERROR]), 'error')}")
