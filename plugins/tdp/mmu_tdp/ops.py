"""Range operations over a TDP structure, jitted: the same pre-order walk as tdp_iter.

A call has no switch point inside, so under the write lock it is what KVM's plain stores are,
and under the read lock each SPTE change in it is an atomic read-modify-write that no other
task can split (KVM: try_cmpxchg64 or an atomic AND, retried on failure; here it cannot fail).
Callers work in chunks of a bounded number of SPTEs, charge what a chunk did, and between
chunks yield the lock when it is contended, so other tasks interleave at chunk granularity.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmu_core.arch.x86 import spte as S

_PRESENT = S.SPTE_MMU_PRESENT_MASK
_LARGE = S.EPT_LARGE_MASK
_ADDR = S.SPTE_BASE_ADDR_MASK
_FROZEN = S.FROZEN_SPTE
_W = S.PT_WRITABLE_MASK
_D = S.VMX_EPT_DIRTY_BIT
_A = S.VMX_EPT_ACCESS_BIT
_AD_MASK = S.SPTE_TDP_AD_MASK
_AD_DISABLED = S.SPTE_TDP_AD_DISABLED

# update_leafs_in_range modes
WRPROT = 0  # clear W, keep MMU-writable (dirty logging by write-protection)
CLEAR_DIRTY = 1  # clear D; W instead for an SPTE without A/D (kvm_tdp_mmu_clear_dirty_slot)
AGE = 2  # clear A, or park RWX of an SPTE without A/D (kvm_tdp_mmu_age_gfn_range)
ZAP = 3  # clear leaves, MMIO SPTEs included (zap_gfn_range under the write lock)


@njit(cache=True)
def _is_table(spte, level):
    return level > 1 and (spte & _PRESENT) != 0 and (spte & _LARGE) == 0 and spte != S.FROZEN_SPTE


@njit(cache=True)
def _is_leaf(spte, level):
    """A present leaf that maps memory (not MMIO: those lack the MMU-present bit)."""
    return (spte & _PRESENT) != 0 and spte != _FROZEN and (level == 1 or (spte & _LARGE) != 0)


@njit(cache=True)
def zap_leafs_in_range(pt, pt_slot, root, root_level, start, end, budget, unmapped):
    """Clear leaf SPTEs (MMIO ones included) mapping gfns in [start, end), visiting at most
    about `budget` SPTEs; returns (visited, zapped, next gfn). unmapped[level] counts the
    present leaves removed per level (for the page-size gauges). The caller charges the visits
    and stores, may yield the lock, and calls again from the next gfn, which restarts from the
    root as tdp_iter does after a yield (the tables visited may be gone)."""
    visited, zapped, _, nxt = update_leafs_in_range(pt, pt_slot, root, root_level, start, end,
                                                    budget, ZAP, 1, unmapped)
    return visited, zapped, nxt


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


@njit(cache=True)
def _update(spte, level, mode, min_level):
    """The new value of a leaf for `mode` (spte itself when nothing changes)."""
    if level < min_level:
        return spte
    ad = (spte & _AD_MASK) != _AD_DISABLED
    if mode == WRPROT or (mode == CLEAR_DIRTY and not ad):
        return spte & ~np.uint64(_W)
    if mode == CLEAR_DIRTY:
        return spte & ~np.uint64(_D)
    if mode == AGE:
        if (spte & np.uint64(_A)) == 0:
            return spte
        return S.mark_spte_for_access_track(spte)
    return spte


@njit(cache=True)
def update_leafs_in_range(pt, pt_slot, root, root_level, start, end, budget, mode, min_level,
                          unmapped):
    """Apply `mode` to the leaves at `min_level` or above mapping gfns in [start, end),
    visiting at most about `budget` SPTEs; returns (visited, changed, young, next gfn).
    `young` counts present leaves whose Accessed bit was set (for AGE);
    unmapped[level] counts present leaves ZAP removed.

    The loop is tdp_iter's pre-order (step down / side / up). The caller charges what a call
    did, may yield the lock, and calls again from the next gfn, which restarts from the root
    as tdp_iter does after a yield (the tables visited may be gone)."""
    tables = np.empty(6, np.int64)
    level = root_level
    tables[level] = root
    next_last = start
    gfn = start & ~((1 << (9 * (level - 1))) - 1)
    changed = 0
    young = 0
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
        if mode == ZAP:
            if spte != 0 and spte != np.uint64(_FROZEN):
                if _is_leaf(spte, level):
                    unmapped[level] += 1
                row[idx] = 0
                changed += 1
        elif _is_leaf(spte, level):
            if (spte & np.uint64(_A)) != 0:
                young += 1
            new = _update(spte, level, mode, min_level)
            if new != spte:
                row[idx] = new
                changed += 1
        while True:
            if ((gfn >> (9 * (level - 1))) & 511) != 511:
                gfn += 1 << (9 * (level - 1))
                next_last = gfn
                break
            if level == root_level:
                return visited, changed, young, end
            level += 1
            gfn = gfn & ~((1 << (9 * (level - 1))) - 1)
        if visited >= budget and next_last < end:
            return visited, changed, young, next_last
    return visited, changed, young, end


@njit(cache=True)
def freeze_subtree(pt, pt_slot, table, level, unmapped):
    """handle_removed_pt for a table nobody can reach any more except through stale
    pointers: xchg FROZEN_SPTE into each of its entries and those of the tables below.
    Returns (tables, waits): every table of the subtree (to free after a grace period), and
    (table, idx, level) of entries that were already frozen (another task is changing them;
    the caller waits for their final value and takes it over). unmapped[level] counts the
    present leaves removed."""
    out = np.empty(64, np.int64)
    waits = np.empty((8, 3), np.int64)
    nw = 0
    n = 0
    stack = np.empty((64, 2), np.int64)
    stack[0, 0] = table
    stack[0, 1] = level
    sp = 1
    while sp > 0:
        sp -= 1
        t = stack[sp, 0]
        lvl = stack[sp, 1]
        if n == out.shape[0]:
            grown = np.empty(n * 2, np.int64)
            grown[:n] = out
            out = grown
        out[n] = t
        n += 1
        row = pt[pt_slot[t]]
        for idx in range(512):
            old = row[idx]
            row[idx] = np.uint64(_FROZEN)
            if old == np.uint64(_FROZEN):
                if nw == waits.shape[0]:
                    g = np.empty((nw * 2, 3), np.int64)
                    g[:nw] = waits
                    waits = g
                waits[nw, 0] = t
                waits[nw, 1] = idx
                waits[nw, 2] = lvl
                nw += 1
            elif _is_table(old, lvl):
                if sp == stack.shape[0]:
                    g2 = np.empty((sp * 2, 2), np.int64)
                    g2[:sp] = stack
                    stack = g2
                stack[sp, 0] = (old & _ADDR) >> 12
                stack[sp, 1] = lvl - 1
                sp += 1
            elif _is_leaf(old, lvl):
                unmapped[lvl] += 1
    return out[:n], waits[:nw]


@njit(cache=True)
def leaf_census(pt, pt_slot, root, root_level, counts):
    """Add the present leaves under root, per level, to counts (for the audit)."""
    stack = np.empty((64, 2), np.int64)
    stack[0, 0] = root
    stack[0, 1] = root_level
    sp = 1
    while sp > 0:
        sp -= 1
        t = stack[sp, 0]
        lvl = stack[sp, 1]
        row = pt[pt_slot[t]]
        for idx in range(512):
            e = row[idx]
            if _is_table(e, lvl):
                if sp == stack.shape[0]:
                    g = np.empty((sp * 2, 2), np.int64)
                    g[:sp] = stack
                    stack = g
                stack[sp, 0] = (e & _ADDR) >> 12
                stack[sp, 1] = lvl - 1
                sp += 1
            elif _is_leaf(e, lvl):
                counts[lvl] += 1


@njit(cache=True)
def split_children(huge, level, nx_exec):
    """The 512 SPTEs of a table that maps what the huge leaf `huge` at `level` mapped
    (spte.c make_small_spte, formerly make_huge_page_split_spte): same bits, consecutive
    frames, the large bit kept above 4K. At 4K, `nx_exec` makes them executable again: the
    NX huge-page mitigation removed X only because the mapping was huge."""
    child_level = level - 1
    step = np.uint64(1) << np.uint64(9 * (child_level - 1) + 12)
    base = huge & ~np.uint64(_ADDR)
    pfn0 = huge & np.uint64(_ADDR)
    if child_level == 1:
        base &= ~np.uint64(_LARGE)
        if nx_exec:
            base |= np.uint64(S.VMX_EPT_EXECUTABLE_MASK)
    out = np.empty(512, np.uint64)
    for i in range(512):
        out[i] = base | (pfn0 + np.uint64(i) * step)
    return out
