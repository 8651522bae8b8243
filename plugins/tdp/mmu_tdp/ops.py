"""Range operations over a TDP structure, jitted: the same pre-order walk as tdp_iter, run
under the MMU lock held for write, where no other task can interleave and no switch points
are needed (KVM's teardown and zap paths likewise use non-atomic stores under the write lock).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmu_core.arch.x86 import spte as S

_PRESENT = S.SPTE_MMU_PRESENT_MASK
_LARGE = S.EPT_LARGE_MASK
_ADDR = S.SPTE_BASE_ADDR_MASK


@njit(cache=True)
def _is_table(spte, level):
    return level > 1 and (spte & _PRESENT) != 0 and (spte & _LARGE) == 0 and spte != S.FROZEN_SPTE


@njit(cache=True)
def zap_leafs_in_range(pt, pt_slot, root, root_level, start, end, budget):
    """Clear leaf SPTEs (MMIO ones included) mapping gfns in [start, end), visiting at most
    about `budget` SPTEs; returns (visited, zapped, next gfn). The caller charges the visits
    and stores, may yield the lock, and calls again from the next gfn, which restarts from the
    root as tdp_iter does after a yield (the tables visited may be gone).

    The loop is tdp_iter's pre-order (step down / side / up) with plain stores.
    """
    tables = np.empty(6, np.int64)
    level = root_level
    tables[level] = root
    next_last = start
    gfn = start & ~((1 << (9 * (level - 1))) - 1)
    zapped = 0
    visited = 0
    while gfn < end:
        shift = 9 * (level - 1)
        row = pt[pt_slot[tables[level]]]
        idx = (gfn >> shift) & 511
        spte = row[idx]
        visited += 1
        if _is_table(spte, level):
            level -= 1
            tables[level] = (spte & _ADDR) >> 12
            gfn = next_last & ~((1 << (9 * (level - 1))) - 1)
            continue
        if spte != 0 and spte != S.FROZEN_SPTE:
            row[idx] = 0
            zapped += 1
        while True:
            if ((gfn >> (9 * (level - 1))) & 511) != 511:
                gfn += 1 << (9 * (level - 1))
                next_last = gfn
                break
            if level == root_level:
                return visited, zapped, end
            level += 1
            gfn = gfn & ~((1 << (9 * (level - 1))) - 1)
        if visited >= budget and next_last < end:
            return visited, zapped, next_last
    return visited, zapped, end


@njit(cache=True)
def collect_tables(pt, pt_slot, root, root_level):
    """Every page-table page of the tree under root, root included (pre-order)."""
    out = np.empty(1024, np.int64)
    n = 0
    stack_pfn = np.empty(4096, np.int64)
    stack_lvl = np.empty(4096, np.int64)
    sp = 0
    stack_pfn[0] = root
    stack_lvl[0] = root_level
    sp = 1
    while sp > 0:
        sp -= 1
        pfn = stack_pfn[sp]
        level = stack_lvl[sp]
        if n == out.shape[0]:
            grown = np.empty(n * 2, np.int64)
            grown[:n] = out
            out = grown
        out[n] = pfn
        n += 1
        row = pt[pt_slot[pfn]]
        for idx in range(512):
            spte = row[idx]
            if _is_table(spte, level):
                if sp == stack_pfn.shape[0]:
                    g1 = np.empty(sp * 2, np.int64)
                    g1[:sp] = stack_pfn
                    stack_pfn = g1
                    g2 = np.empty(sp * 2, np.int64)
                    g2[:sp] = stack_lvl
                    stack_lvl = g2
                stack_pfn[sp] = (spte & _ADDR) >> 12
                stack_lvl[sp] = level - 1
                sp += 1
    return out[:n]
