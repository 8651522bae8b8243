"""The TDP MMU's compiled kernel for the compiled demand-paging loop (docs/fastloop.md).

`tdp_kernel` is `mmu_load` and the demand-paging part of `mmu_page_fault` (tdp_mmu.py) as a
state machine: each call runs to the next switch point of the Python code and returns it as a
request (mmu_core.sim.fastloop R_*). It reads and writes the VM's own SPTE arrays
(`vm.host.pt` through `pt_slot`) and allocates table pages from the VM's host memory, so the
tables after the run are the ones the Python code would have built. States it does not model
(a frozen entry, a huge leaf in the way, a table replaced by a leaf: none occurs in demand
paging, where nothing zaps) return R_ERROR rather than guess.

Per-task kernel state (ks row, from fastloop.KS_FREE): the iterator's level, gfn, next
last-level gfn, the SPTE's table and index, the child table of a link, the outcome and the
table path; ksu row: the iterator's old SPTE.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmu_core import Ret
from mmu_core.arch.x86 import spte as S
from mmu_core.sim import fastloop as F

# ks columns
_LEVEL = F.KS_FREE
_IGFN = F.KS_FREE + 1
_NLL = F.KS_FREE + 2
_TABLE = F.KS_FREE + 3
_IDX = F.KS_FREE + 4
_CHILD = F.KS_FREE + 5
_RET = F.KS_FREE + 6
_PATH = F.KS_FREE + 8  # 6 entries

# kg: the VM's part
G_ROOT = 0  # the root's pfn, -1 until the first mmu_load creates it
G_ROOT_LEVEL = 1
G_LOADS = 2  # kvm_tdp_mmu_get_root references taken by mmu_load
G_PT_ALLOC = 3  # cost.pt_page_alloc
G_SPTE_BUILD = 4  # cost.spte_build
G_NONLEAF = 5  # make_nonleaf_spte(0) (int64 bits)
G_LEAF = 8  # leaf_spte(0, level, writable, ...) at G_LEAF + 2 * level + writable
G_SIZE = 16

# kstats: TdpMMU.stats and the page-size gauges
S_FAULTS, S_RETRIES, S_LOST, S_SPURIOUS, S_LINKED = range(5)
S_MAPPED = 5  # + level (1..3)
S_PAGES = 9  # + level (1..3)
S_SIZE = 13

_RETRY = int(Ret.RETRY)
_FIXED = int(Ret.FIXED)
_SPURIOUS = int(Ret.SPURIOUS)

ERR_FROZEN_OR_ZAPPED = 1
ERR_HUGE_IN_THE_WAY = 2
ERR_TABLE_REPLACED = 3


@njit(cache=True, _nrt=False)
def _spte(pt, pt_slot, table, idx):
    return pt[pt_slot[table], idx]


@njit(cache=True, _nrt=False)
def _cmpxchg(t, ks, ksu, kstats, pt, pt_slot, new):
    """vm.spte_cmpxchg of the iterator's SPTE from its old value to `new`, after the atomic's
    switch point: False (the old value refreshed, as try_cmpxchg64 does) if it changed."""
    slot = pt_slot[ks[t, _TABLE]]
    idx = ks[t, _IDX]
    cur = pt[slot, idx]
    if cur != ksu[t, 0]:
        kstats[S_LOST] += 1
        ksu[t, 0] = cur
        return False
    pt[slot, idx] = new
    ksu[t, 0] = new
    return True


@njit(cache=True, _nrt=False)
def tdp_kernel(op, t, ks, ksu, kg, kstats, mem, free1, free_slots, pt, pt_slot, tag, mapcount,
               frame_state, log, hva_pfn, hva_writable):
    while True:
        st = ks[t, F.KS_STATE]
        if op == F.K_LOAD:
            # TdpMMU.mmu_load
            if st == 0:
                ks[t, F.KS_STATE] = 1
                return F.R_RLOCK, 0
            if st == 1:
                if kg[G_ROOT] >= 0:
                    kg[G_LOADS] += 1
                    ks[t, F.KS_ROOT] = kg[G_ROOT]
                    ks[t, F.KS_STATE] = 9
                else:
                    ks[t, F.KS_STATE] = 2
                return F.R_RUNLOCK, 0
            if st == 2:
                ks[t, F.KS_STATE] = 3
                return F.R_WLOCK, 0
            if st == 3:
                if kg[G_ROOT] < 0:
                    ks[t, F.KS_STATE] = 4
                    return F.R_DELAY, kg[G_PT_ALLOC]
                ks[t, F.KS_STATE] = 5
                continue
            if st == 4:  # vm.alloc_pt_page after its delay
                pfn = F.mem_alloc(mem, free1, tag, mapcount, frame_state, log, F.MMU_PT)
                F.mem_table(mem, free_slots, pt_slot, pfn)
                kg[G_ROOT] = pfn
                ks[t, F.KS_STATE] = 5
                continue
            if st == 5:
                kg[G_LOADS] += 1
                ks[t, F.KS_ROOT] = kg[G_ROOT]
                ks[t, F.KS_STATE] = 9
                return F.R_WUNLOCK, 0
            return F.R_DONE, 0
        # TdpMMU.mmu_page_fault from the lock on (gfn_to_pfn ran in the core)
        if st == 0:
            kstats[S_FAULTS] += 1
            ks[t, F.KS_STATE] = 1
            return F.R_RLOCK, 0
        if st == 1:
            ks[t, F.KS_STATE] = 2
            return F.R_RCU_LOCK, 0
        if st == 2:  # TdpIter.__init__ / restart: read the root's entry
            level = kg[G_ROOT_LEVEL]
            ks[t, _LEVEL] = level
            ks[t, _PATH + level] = ks[t, F.KS_ROOT]
            ks[t, _NLL] = ks[t, F.KS_GFN]
            ks[t, _IGFN] = S.gfn_round_for_level(ks[t, F.KS_GFN], level)
            ks[t, _TABLE] = ks[t, F.KS_ROOT]
            ks[t, _IDX] = S.spte_index(ks[t, _IGFN], level)
            ks[t, F.KS_STATE] = 3
            return F.R_READ, 0
        if st == 3:  # a read landed: the loop body on (level, old)
            old = _spte(pt, pt_slot, ks[t, _TABLE], ks[t, _IDX])
            ksu[t, 0] = old
            level = ks[t, _LEVEL]
            if S.is_frozen_spte(old):
                ks[t, F.KS_STATE] = 19
                continue
            if level == ks[t, F.KS_LEVEL]:
                ks[t, F.KS_STATE] = 12
                return F.R_DELAY, kg[G_SPTE_BUILD]
            if S.is_shadow_present_pte(old):
                if not S.is_last_spte(old, level):
                    ks[t, F.KS_STATE] = 4  # next(): step down, re-reading this entry
                    return F.R_READ, 0
                return F.R_ERROR, ERR_HUGE_IN_THE_WAY
            ks[t, F.KS_STATE] = 10  # _link_table: alloc_pt_page's delay first
            return F.R_DELAY, kg[G_PT_ALLOC]
        if st == 4:  # _step_down: the re-read entry, then the child's
            old = _spte(pt, pt_slot, ks[t, _TABLE], ks[t, _IDX])
            level = ks[t, _LEVEL]
            if not S.is_shadow_present_pte(old) or S.is_last_spte(old, level):
                return F.R_ERROR, ERR_FROZEN_OR_ZAPPED
            level -= 1
            child = S.spte_to_pfn(old)
            ks[t, _LEVEL] = level
            ks[t, _PATH + level] = child
            ks[t, _IGFN] = S.gfn_round_for_level(ks[t, _NLL], level)
            ks[t, _TABLE] = child
            ks[t, _IDX] = S.spte_index(ks[t, _IGFN], level)
            ks[t, F.KS_STATE] = 3
            return F.R_READ, 0
        if st == 10:  # alloc_pt_page's frame, then the cmpxchg
            child = F.mem_alloc(mem, free1, tag, mapcount, frame_state, log, F.MMU_PT)
            F.mem_table(mem, free_slots, pt_slot, child)
            ks[t, _CHILD] = child
            ks[t, F.KS_STATE] = 11
            return F.R_CMPXCHG, 0
        if st == 11:
            new = np.uint64(kg[G_NONLEAF]) | (np.uint64(ks[t, _CHILD]) << np.uint64(12))
            if not _cmpxchg(t, ks, ksu, kstats, pt, pt_slot, new):
                # lost the race: the winner's table stays, ours was never visible
                F.mem_free(mem, free1, free_slots, pt, pt_slot, mapcount, frame_state, log,
                           ks[t, _CHILD])
                ks[t, F.KS_STATE] = 19
                return F.R_CMPXCHG_FAILED, 0
            kstats[S_LINKED] += 1
            ks[t, F.KS_STATE] = 4  # continue: next() steps down into the new table
            return F.R_READ, 0
        if st == 12:  # _map_target after spte_build's delay
            gfn = ks[t, F.KS_GFN]
            level = ks[t, _LEVEL]
            base_pfn = ks[t, F.KS_PFN] - (gfn - S.gfn_round_for_level(gfn, level))
            writable = ks[t, F.KS_WRITABLE]
            new = (np.uint64(kg[G_LEAF + 2 * level + writable])
                   | (np.uint64(base_pfn) << np.uint64(12)))
            ksu[t, 1] = new
            old = ksu[t, 0]
            if (S.is_shadow_present_pte(old) and S.spte_to_pfn(old) == base_pfn
                    and S.is_last_spte(old, level)):
                if ks[t, F.KS_WRITE]:
                    allowed = (old & np.uint64(S.PT_WRITABLE_MASK)) != 0
                else:
                    allowed = (old & np.uint64(S.VMX_EPT_READABLE_MASK)) != 0
                if allowed:
                    kstats[S_SPURIOUS] += 1
                    ks[t, _RET] = _SPURIOUS
                    ks[t, F.KS_STATE] = 20
                    continue
            ks[t, F.KS_STATE] = 13
            return F.R_CMPXCHG, 0
        if st == 13:
            if S.is_shadow_present_pte(ksu[t, 0]):
                return F.R_ERROR, ERR_TABLE_REPLACED
            if not _cmpxchg(t, ks, ksu, kstats, pt, pt_slot, ksu[t, 1]):
                ks[t, F.KS_STATE] = 19
                return F.R_CMPXCHG_FAILED, 0
            level = ks[t, _LEVEL]
            kstats[S_PAGES + level] += 1
            kstats[S_MAPPED + level] += 1
            ks[t, _RET] = _FIXED
            ks[t, F.KS_STATE] = 20
            continue
        if st == 19:  # _retry
            kstats[S_RETRIES] += 1
            ks[t, _RET] = _RETRY
            ks[t, F.KS_STATE] = 20
            continue
        if st == 20:  # leaving `with vm.mmu_lock.read(), vm.rcu.read()`: RCU first
            ks[t, F.KS_STATE] = 21
            return F.R_RCU_UNLOCK, 0
        if st == 21:
            ks[t, F.KS_STATE] = 22
            return F.R_RUNLOCK, 0
        return F.R_DONE, ks[t, _RET]


def _i64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


class TdpCompiled:
    """What `mmu_compiled_kernels` returns for the TDP MMU (mmu_core.backend.CompiledKernels)."""

    name = "tdp"
    kernel = staticmethod(tdp_kernel)

    def __init__(self, mmu) -> None:
        self.mmu = mmu

    def unsupported(self, vm) -> str | None:
        mmu = self.mmu
        if not vm.params.ept_ad:
            return "ept_ad=0 (fast page faults on non-present SPTEs walk locklessly)"
        if mmu.all_roots:
            return "the VM already has a root"
        return None

    def prepare(self, vm) -> tuple[np.ndarray, np.ndarray]:
        kg = np.zeros(G_SIZE, dtype=np.int64)
        kg[G_ROOT] = -1
        kg[G_ROOT_LEVEL] = vm.root_levels(vm.vcpus[0])
        cost = vm.engine.cost
        kg[G_PT_ALLOC] = cost.pt_page_alloc
        kg[G_SPTE_BUILD] = cost.spte_build
        nonleaf = int(S.make_nonleaf_spte(0))
        if int(S.make_nonleaf_spte(12345)) != nonleaf | (12345 << 12):
            raise AssertionError("make_nonleaf_spte is not template | pfn << 12")
        kg[G_NONLEAF] = _i64(nonleaf)
        for level in (1, 2, 3):
            executable = not (level > 1 and vm.params.nx_huge_pages)
            for writable in (0, 1):
                bits = self.mmu.leaf_spte(0, level, bool(writable), dirty=True,
                                          mmu_writable=bool(writable), executable=executable)
                probe = self.mmu.leaf_spte(512 * 12345, level, bool(writable), dirty=True,
                                           mmu_writable=bool(writable), executable=executable)
                if probe != bits | ((512 * 12345) << 12):
                    raise AssertionError("leaf_spte is not template | pfn << 12")
                kg[G_LEAF + 2 * level + writable] = _i64(bits)
        return kg, np.zeros(S_SIZE, dtype=np.int64)

    def finish(self, vm, kg: np.ndarray, kstats: np.ndarray) -> None:
        """Write the run back into the backend's Python state: the root, the statistics."""
        from mmu_core import Role
        from mmu_tdp.tdp_mmu import TdpRoot

        mmu = self.mmu
        if kg[G_ROOT] >= 0:
            root = TdpRoot(int(kg[G_ROOT]), 0, int(kg[G_ROOT_LEVEL]),
                           refcount=1 + int(kg[G_LOADS]))
            mmu.roots[(0, root.level)] = root
            mmu.all_roots[root.pfn] = root
            vm.observe.mmu_on_root_alloc(vm=vm, as_id=0, role=Role.DIRECT, root=root.pfn)
        st = mmu.stats
        st["faults"] += int(kstats[S_FAULTS])
        st["retries"] += int(kstats[S_RETRIES])
        st["cmpxchg_lost"] += int(kstats[S_LOST])
        st["spurious"] += int(kstats[S_SPURIOUS])
        st["tables_linked"] += int(kstats[S_LINKED])
        for level in (1, 2, 3):
            st["mapped"][level] += int(kstats[S_MAPPED + level])
            mmu.pages[level] += int(kstats[S_PAGES + level])
