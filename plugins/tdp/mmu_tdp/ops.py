"""Range operations over a TDP structure, jitted: the same pre-order walk as tdp_iter.

A call has no switch point inside, so under the write lock it is what KVM's plain stores are,
and under the read lock each SPTE change in it is an atomic read-modify-write that no other
task can split (KVM: try_cmpxchg64 or an atomic AND, retried on failure; here it cannot fail).
Callers work in chunks of a bounded number of SPTEs, charge what a chunk did, and between
chunks yield the lock when it is contended, so other tasks interleave at chunk granularity.

Per SPTE nothing is allocated and nothing is reference-counted: the loops index tables by
(slot, index) instead of making a view per step, run compiled without numba's runtime
(`_nrt=False`, so they cannot allocate), and the functions that return arrays allocate them,
and their fixed-size stacks, once per call around such kernels.
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


#: DFS stacks hold at most 511 pending siblings per level plus one table's children, so this
#: many rows never overflow (5 levels); allocated once per call
STACK_ROWS = 512 * 6


@njit(cache=True, _nrt=False, inline="always")
def _is_table(spte, level):
    return level > 1 and (spte & _PRESENT) != 0 and (spte & _LARGE) == 0 and spte != S.FROZEN_SPTE


@njit(cache=True, _nrt=False, inline="always")
def _is_leaf(spte, level):
    """A present leaf that maps memory (not MMIO: those lack the MMU-present bit)."""
    return (spte & _PRESENT) != 0 and spte != _FROZEN and (level == 1 or (spte & _LARGE) != 0)


@njit(cache=True, _nrt=False)
def zap_leafs_in_range(pt, pt_slot, root, root_level, start, end, budget, unmapped):
    """Clear leaf SPTEs (MMIO ones included) mapping gfns in [start, end), visiting at most
    about `budget` SPTEs; returns (visited, zapped, next gfn). unmapped[level] counts the
    present leaves removed per level (for the page-size gauges). The caller charges the visits
    and stores, may yield the lock, and calls again from the next gfn, which restarts from the
    root as tdp_iter does after a yield (the tables visited may be gone)."""
    visited, zapped, _, nxt = update_leafs_in_range(pt, pt_slot, root, root_level, start, end,
                                                    budget, ZAP, 1, unmapped)
    return visited, zapped, nxt


@njit(cache=True, _nrt=False)
def _push_children(pt, s, level, stack_pfn, stack_lvl, sp):
    """Push the tables that the table in slot s (at `level`) links, in index order."""
    row = pt[s]
    for idx in range(512):
        spte = row[idx]
        if _is_table(spte, level):
            stack_pfn[sp] = (spte & _ADDR) >> 12
            stack_lvl[sp] = level - 1
            sp += 1
    return sp


@njit(cache=True)
def collect_tables(pt, pt_slot, root, root_level):
    """Every page-table page of the tree under root, root included (pre-order). Only tables
    above the last level are scanned: a level-1 table links none."""
    out = np.empty(1024, np.int64)
    n = 0
    stack_pfn = np.empty(STACK_ROWS, np.int64)
    stack_lvl = np.empty(STACK_ROWS, np.int64)
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
        if level > 1:
            sp = _push_children(pt, pt_slot[pfn], level, stack_pfn, stack_lvl, sp)
    return out[:n]


@njit(cache=True, _nrt=False, inline="always")
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


@njit(cache=True, _nrt=False)
def _scan_leaves(pt, s, first, count, mode, min_level):
    """Apply `mode` to entries first..first+count-1 of the last-level table in slot s; returns
    (changed, young, removed) as update_leafs_in_range counts them. One loop per mode, so that
    each is a short branch-light loop over the row (compiled on its own, where the compiler
    vectorizes it; inlined into the walk it was not)."""
    changed = 0
    young = 0
    removed = 0
    # Unsigned indices: numba then emits no negative-index wraparound, and the loops vectorize.
    row = pt[s]
    lo = np.uint64(first)
    end = np.uint64(first + count)
    frozen = np.uint64(_FROZEN)
    if mode == ZAP:
        for idx in range(lo, end):
            spte = row[idx]
            if spte != 0 and spte != frozen:
                removed += (spte & _PRESENT) != 0
                row[idx] = 0
                changed += 1
        return changed, young, removed
    if min_level > 1:  # nothing changes at this level: only count the young
        for idx in range(lo, end):
            spte = row[idx]
            if (spte & _PRESENT) != 0 and spte != frozen:
                young += (spte & np.uint64(_A)) != 0
        return changed, young, removed
    if mode == AGE:
        for idx in range(lo, end):
            spte = row[idx]
            if (spte & _PRESENT) != 0 and spte != frozen and (spte & np.uint64(_A)) != 0:
                young += 1
                # mark_spte_for_access_track: with A/D just clear A (the common case, inline)
                if (spte & _AD_MASK) != _AD_DISABLED:
                    row[idx] = spte & ~np.uint64(_A)
                    changed += 1
                else:
                    new = S.mark_spte_for_access_track(spte)
                    if new != spte:
                        row[idx] = new
                        changed += 1
        return changed, young, removed
    # WRPROT clears W; CLEAR_DIRTY clears D, or W of an SPTE without A/D.
    keep_w = ~np.uint64(_W)
    keep_d = keep_w if mode == WRPROT else ~np.uint64(_D)
    for idx in range(lo, end):
        spte = row[idx]
        if (spte & _PRESENT) != 0 and spte != frozen:
            young += (spte & np.uint64(_A)) != 0
            new = spte & (keep_w if (spte & _AD_MASK) == _AD_DISABLED else keep_d)
            if new != spte:
                row[idx] = new
                changed += 1
    return changed, young, removed


@njit(cache=True, _nrt=False, inline="always")
def _table_slot(pt, pt_slot, root, root_level, gfn, level):
    """The slot of the table at `level` on gfn's path from root (a path this call walked down:
    its upper entries are tables, and no call changes them)."""
    s = pt_slot[root]
    for lv in range(root_level, level, -1):
        spte = pt[s, (gfn >> (9 * (lv - 1))) & 511]
        s = pt_slot[(spte & _ADDR) >> 12]
    return s


@njit(cache=True, _nrt=False)
def update_leafs_in_range(pt, pt_slot, root, root_level, start, end, budget, mode, min_level,
                          unmapped):
    """Apply `mode` to the leaves at `min_level` or above mapping gfns in [start, end),
    visiting at most about `budget` SPTEs; returns (visited, changed, young, next gfn).
    `young` counts present leaves whose Accessed bit was set (for AGE);
    unmapped[level] counts present leaves ZAP removed.

    The loop is tdp_iter's pre-order (step down / side / up). The caller charges what a call
    did, may yield the lock, and calls again from the next gfn, which restarts from the root
    as tdp_iter does after a yield (the tables visited may be gone).

    The entries of one table are scanned in a tight inner loop, indexed by (slot, index); going
    back up finds the upper table again from the root, so the call keeps no stack and
    allocates nothing."""
    level = root_level
    s = pt_slot[root]
    next_last = start
    gfn = start & ~((1 << (9 * (level - 1))) - 1)
    changed = 0
    young = 0
    visited = 0
    while gfn < end:
        shift = 9 * (level - 1)
        step = 1 << shift
        idx = (gfn >> shift) & 511
        removed = 0  # present leaves ZAP removed at this level, added to unmapped below
        down = False
        stop = False  # out of budget, or past the end of the range
        if level == 1:
            # A last-level table links nothing: scan the run of entries up to whichever comes
            # first, the table's end, the range's end or the budget (at least one entry, as
            # the walk checks the budget after each), in one tight loop.
            count = min(512 - idx, end - gfn, max(budget - visited, 1))
            c, y, removed = _scan_leaves(pt, s, idx, count, mode, min_level)
            changed += c
            young += y
            visited += count
            unmapped[1] += removed
            removed = 0
            idx += count - 1
            gfn += count - 1  # the last entry scanned
            if idx != 511:
                gfn += 1
                next_last = gfn
                if visited >= budget and next_last < end:
                    return visited, changed, young, next_last
                break  # past the end of the range
        while level > 1:
            spte = pt[s, idx]
            visited += 1
            if _is_table(spte, level):
                down = True
                break
            if mode == ZAP:
                if spte != 0 and spte != np.uint64(_FROZEN):
                    if _is_leaf(spte, level):
                        removed += 1
                    pt[s, idx] = 0
                    changed += 1
            elif _is_leaf(spte, level):
                if (spte & np.uint64(_A)) != 0:
                    young += 1
                new = _update(spte, level, mode, min_level)
                if new != spte:
                    pt[s, idx] = new
                    changed += 1
            if idx == 511:
                break
            # Side step within the table.
            idx += 1
            gfn += step
            next_last = gfn
            if (visited >= budget and next_last < end) or gfn >= end:
                stop = True
                break
        unmapped[level] += removed
        if down:
            level -= 1
            s = pt_slot[(spte & _ADDR) >> 12]
            gfn = next_last & ~((1 << (9 * (level - 1))) - 1)
            continue
        if stop:
            if gfn >= end:
                break
            return visited, changed, young, next_last
        # Up until a level whose entry is not the table's last, and side step there.
        while True:
            if ((gfn >> (9 * (level - 1))) & 511) != 511:
                gfn += 1 << (9 * (level - 1))
                next_last = gfn
                break
            if level == root_level:
                return visited, changed, young, end
            level += 1
            gfn = gfn & ~((1 << (9 * (level - 1))) - 1)
        s = _table_slot(pt, pt_slot, root, root_level, gfn, level)
        if visited >= budget and next_last < end:
            return visited, changed, young, next_last
    return visited, changed, young, end


@njit(cache=True, _nrt=False, inline="always")
def _push_or_count(stack, sp, e, lvl):
    """Push the table that entry e (at level lvl) links, if it links one: (sp, 0); else
    (sp, 1) for a present leaf and (sp, 0) for anything else."""
    if _is_table(e, lvl):
        stack[sp, 0] = (e & _ADDR) >> 12
        stack[sp, 1] = lvl - 1
        return sp + 1, 0
    return sp, 1 if _is_leaf(e, lvl) else 0


@njit(cache=True, _nrt=False)
def _freeze_table(pt, s, t, lvl, first, stack, sp, waits, nw, unmapped):
    """Freeze entries first..511 of table t (slot s, level lvl): push the tables they linked,
    record (t, idx, lvl) of entries already frozen, count the leaves. Stops early, before an
    already-frozen entry, when `waits` is full; returns (sp, nw, index to go on from)."""
    removed = 0
    row = pt[s]
    idx = np.uint64(first)  # unsigned: no negative-index wraparound per entry
    while idx < 512:
        old = row[idx]
        if old == np.uint64(_FROZEN):
            if nw == waits.shape[0]:
                break
            row[idx] = np.uint64(_FROZEN)
            waits[nw, 0] = t
            waits[nw, 1] = idx
            waits[nw, 2] = lvl
            nw += 1
        else:
            row[idx] = np.uint64(_FROZEN)
            sp, leaf = _push_or_count(stack, sp, old, lvl)
            removed += leaf
        idx += np.uint64(1)
    unmapped[lvl] += removed
    return sp, nw, np.int64(idx)


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
    stack = np.empty((STACK_ROWS, 2), np.int64)
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
        s = pt_slot[t]
        idx = 0
        while True:
            sp, nw, idx = _freeze_table(pt, s, t, lvl, idx, stack, sp, waits, nw, unmapped)
            if idx == 512:
                break
            g = np.empty((nw * 2, 3), np.int64)
            g[:nw] = waits
            waits = g
    return out[:n], waits[:nw]


@njit(cache=True, _nrt=False)
def _census_table(pt, s, lvl, stack, sp, counts):
    """Count the leaves of the table in slot s (level lvl) and push the tables it links."""
    leaves = 0
    row = pt[s]
    for idx in range(512):
        sp, leaf = _push_or_count(stack, sp, row[idx], lvl)
        leaves += leaf
    counts[lvl] += leaves
    return sp


@njit(cache=True)
def leaf_census(pt, pt_slot, root, root_level, counts):
    """Add the present leaves under root, per level, to counts (for the audit)."""
    stack = np.empty((STACK_ROWS, 2), np.int64)
    stack[0, 0] = root
    stack[0, 1] = root_level
    sp = 1
    while sp > 0:
        sp -= 1
        t = stack[sp, 0]
        lvl = stack[sp, 1]
        sp = _census_table(pt, pt_slot[t], lvl, stack, sp, counts)


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
