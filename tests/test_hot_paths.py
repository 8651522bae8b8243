"""The compiled hot paths: allocation-free, exact, and in bounds.

* The TDP range operations (plugins/tdp/mmu_tdp/ops.py) give exactly what tdp_iter's pre-order
  walk with KVM's per-SPTE rules gives, on random trees with huge leaves, MMIO and frozen
  entries, for random ranges, budgets (chunked calls) and modes; freeze_subtree, leaf_census
  and collect_tables against a plain depth-first reference.
* Nothing on the hot paths allocates per access or per SPTE: numba's runtime statistics count
  no NRT allocation in a run of the CPU loop (TLB hits, 1-D and 2-D walks, with and without the
  paging-structure caches) or in a range operation, whatever its length; the loop, the walker,
  the TLB and the range kernels are compiled without numba's runtime at all (`_nrt=False`),
  so they cannot allocate or reference-count.
* A data page beyond host memory reads as 0 in the CPU loop (walker tables beyond it are in
  test_walker_modes / test_ept_walk), and the whole of this file passes once more in a
  subprocess with numba's bounds checking on (NUMBA_BOUNDSCHECK=1): no index is out of range.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_core.host.memory import NO_SLOT, HostMemory, Purpose
from mmu_core.hw import cpu as C
from mmu_core.hw import tlb as T
from mmu_core.hw import walker as W
from mmu_tdp import ops
from mmu_tdp.tdp_iter import TdpIter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import hot_paths as H  # noqa: E402  (benchmarks/ is not a package)

LINK = S.SPTE_MMU_PRESENT_MASK | E.EPT_RWX | E.EPT_ACCESSED
MMIO = 0x6 | (0x5 << 3)  # write+exec (a misconfiguration), no MMU-present bit: an MMIO SPTE


# --- random TDP trees -------------------------------------------------------------------------
class Tree:
    """A 4-level TDP structure in a fresh HostMemory with a random mix of entries."""

    def __init__(self, seed: int, tables: int = 12) -> None:
        rng = random.Random(seed)
        self.mem = HostMemory()
        self.root = self._table()
        self.rng = rng
        frontier = [(self.root, 4)]
        made = 1
        while frontier:
            t, level = frontier.pop(rng.randrange(len(frontier)))
            for idx in rng.sample(range(512), rng.randint(1, 40)):
                if level > 1 and made < tables and rng.random() < 0.35:
                    child = self._table()
                    made += 1
                    self.mem.table(t)[idx] = np.uint64(LINK | (child << 12))
                    frontier.append((child, level - 1))
                else:
                    self.mem.table(t)[idx] = np.uint64(self.entry(level))

    def _table(self) -> int:
        pfn = self.mem.alloc(Purpose.MMU_PT)
        self.mem.table(pfn)
        return pfn

    def entry(self, level: int) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.08:
            return MMIO | (rng.getrandbits(20) << 12)
        if r < 0.12:
            return S.FROZEN_SPTE
        if level > 3 or (level > 1 and r < 0.6):
            return 0  # not present (no huge leaf above 1G)
        bits = S.SPTE_MMU_PRESENT_MASK | E.EPT_READ | E.EPT_EXEC | (E.EPT_MT_WB << E.EPT_MT_SHIFT)
        for bit in (E.EPT_WRITE, E.EPT_ACCESSED, E.EPT_DIRTY, S.EPT_SPTE_MMU_WRITABLE,
                    S.EPT_SPTE_HOST_WRITABLE):
            if rng.random() < 0.6:
                bits |= bit
        if rng.random() < 0.2:
            bits |= S.SPTE_TDP_AD_DISABLED
        if level > 1:
            bits |= E.EPT_LARGE
        return bits | (rng.getrandbits(24) << 12)

    def copy(self) -> np.ndarray:
        return self.mem.pt.copy()


class _Vm:
    """What TdpIter needs of a VM, reading the tables directly (no switch points)."""

    def __init__(self, mem: HostMemory) -> None:
        self.mem = mem

    def spte_table(self, pfn: int) -> np.ndarray:
        return self.mem.table(pfn)


def ref_update(mem, root, start, end, budget, mode, min_level, unmapped):
    """update_leafs_in_range by tdp_iter's walk and KVM's rules, one SPTE at a time."""
    it = TdpIter(_Vm(mem), root, 4, 1, start, end, atomic=False)
    visited = changed = young = 0
    while it.valid and it.gfn < end:
        visited += 1
        spte, level = it.old_spte, it.level
        table, idx = it.sptep
        is_table = level > 1 and S.is_shadow_present_pte(np.uint64(spte)) and not (
            spte & S.PT_PAGE_SIZE_MASK)
        if not is_table:
            leaf = S.is_shadow_present_pte(np.uint64(spte)) and S.is_last_spte(np.uint64(spte), level)
            new = spte
            if mode == ops.ZAP:
                if spte not in (0, S.FROZEN_SPTE):
                    unmapped[level] += leaf
                    new = 0
            elif leaf:
                young += bool(spte & E.EPT_ACCESSED)
                ad_off = spte & S.SPTE_TDP_AD_MASK == S.SPTE_TDP_AD_DISABLED
                if level < min_level:
                    pass
                elif mode == ops.WRPROT or (mode == ops.CLEAR_DIRTY and ad_off):
                    new = spte & ~S.PT_WRITABLE_MASK
                elif mode == ops.CLEAR_DIRTY:
                    new = spte & ~E.EPT_DIRTY
                elif spte & E.EPT_ACCESSED:  # AGE
                    new = int(S.mark_spte_for_access_track(np.uint64(spte)))
            if new != spte:
                mem.table(table)[idx] = np.uint64(new)
                changed += 1
        it.next()
        if not it.valid:
            break
        if not is_table and visited >= budget and it.next_last_level_gfn < end:
            return visited, changed, young, it.next_last_level_gfn
    return visited, changed, young, end


def children(mem, t, lvl):
    """The tables the table t (at level lvl) links, in index order."""
    row = mem.table(t)
    return [(int(row[i]) >> 12 & ((1 << 40) - 1), lvl - 1) for i in range(512)
            if lvl > 1 and S.is_shadow_present_pte(row[i]) and not int(row[i]) & S.PT_PAGE_SIZE_MASK]


RANGES = [(0, 1 << 36), (0, 1 << 27), (12345, 987654321), (1 << 27, (1 << 27) + 5000),
          (511, 513), (7 << 27, 1 << 36)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", [ops.WRPROT, ops.CLEAR_DIRTY, ops.AGE, ops.ZAP],
                         ids=["wrprot", "clear-dirty", "age", "zap"])
def test_update_leafs_in_range_is_tdp_iters_walk(seed, mode):
    rng = random.Random(seed * 31 + mode)
    for start, end in RANGES:
        budget = rng.choice((1, 3, 64, 700, 1 << 40))
        min_level = rng.choice((1, 1, 2))
        got_tree, want_tree = Tree(seed), Tree(seed)
        got_u, want_u = np.zeros(6, np.int64), [0] * 6
        gfn = start
        calls = []
        while gfn < end:
            r = ops.update_leafs_in_range(got_tree.mem.pt, got_tree.mem.pt_slot, got_tree.root, 4,
                                          gfn, end, budget, mode, min_level, got_u)
            w = ref_update(want_tree.mem, want_tree.root, gfn, end, budget, mode, min_level,
                           want_u)
            calls.append((tuple(int(v) for v in r), w))
            assert tuple(int(v) for v in r) == w, (start, end, budget, calls[-3:])
            gfn = w[3]
        assert np.array_equal(got_tree.mem.pt, want_tree.mem.pt)
        assert got_u.tolist() == want_u


def test_zap_leafs_in_range_counts_what_it_unmapped():
    got, want = Tree(3), Tree(3)
    u, wu = np.zeros(6, np.int64), [0] * 6
    r = ops.zap_leafs_in_range(got.mem.pt, got.mem.pt_slot, got.root, 4, 0, 1 << 36, 1 << 40, u)
    v, z, _, nxt = ref_update(want.mem, want.root, 0, 1 << 36, 1 << 40, ops.ZAP, 1, wu)
    assert tuple(int(x) for x in r) == (v, z, nxt)
    assert u.tolist() == wu and sum(wu) > 0
    assert np.array_equal(got.mem.pt, want.mem.pt)


def ref_collect(mem, root):
    out, stack = [], [(root, 4)]
    while stack:
        t, lvl = stack.pop()
        out.append(t)
        stack.extend(children(mem, t, lvl))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_collect_tables_and_leaf_census_match_a_plain_dfs(seed):
    tree = Tree(seed, tables=30)
    mem = tree.mem
    assert ops.collect_tables(mem.pt, mem.pt_slot, tree.root, 4).tolist() == ref_collect(mem, tree.root)
    counts = np.zeros(6, np.int64)
    ops.leaf_census(mem.pt, mem.pt_slot, tree.root, 4, counts)
    want = [0] * 6
    for t in ref_collect(mem, tree.root):
        lvl = table_level(mem, tree.root, t)
        want[lvl] += sum(1 for e in mem.table(t).tolist()
                         if S.is_shadow_present_pte(np.uint64(e)) and S.is_last_spte(np.uint64(e), lvl))
    assert counts.tolist() == want


def table_level(mem, root, target):
    stack = [(root, 4)]
    while stack:
        t, lvl = stack.pop()
        if t == target:
            return lvl
        stack.extend(children(mem, t, lvl))
    raise AssertionError(target)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("frozen", [0, 3, 40], ids=["none-frozen", "few-frozen", "many-frozen"])
def test_freeze_subtree_matches_a_plain_dfs(seed, frozen):
    tree = Tree(seed, tables=20)
    mem = tree.mem
    rng = random.Random(seed)
    for _ in range(frozen):  # entries another task is changing (waits beyond the first 8)
        mem.table(rng.choice(ref_collect(mem, tree.root)))[rng.randrange(512)] = np.uint64(S.FROZEN_SPTE)
    want_tables, want_waits, want_u = [], [], [0] * 6
    stack = [(tree.root, 4)]
    before = mem.pt.copy()
    while stack:
        t, lvl = stack.pop()
        want_tables.append(t)
        for idx, e in enumerate(mem.table(t).tolist()):
            if e == S.FROZEN_SPTE:
                want_waits.append([t, idx, lvl])
            elif lvl > 1 and S.is_shadow_present_pte(np.uint64(e)) and not e & S.PT_PAGE_SIZE_MASK:
                stack.append((e >> 12 & ((1 << 40) - 1), lvl - 1))
            elif S.is_shadow_present_pte(np.uint64(e)) and S.is_last_spte(np.uint64(e), lvl):
                want_u[lvl] += 1
    u = np.zeros(6, np.int64)
    tables, waits = ops.freeze_subtree(mem.pt, mem.pt_slot, tree.root, 4, u)
    assert tables.tolist() == want_tables
    assert waits.tolist() == want_waits
    assert u.tolist() == want_u
    for t in want_tables:
        assert (mem.table(t) == np.uint64(S.FROZEN_SPTE)).all()
    others = [int(s) for p, s in enumerate(mem.pt_slot) if s != NO_SLOT and p not in set(want_tables)]
    assert np.array_equal(mem.pt[others], before[others])


def test_split_children_maps_the_same_memory_in_512_pieces():
    huge = np.uint64(S.SPTE_MMU_PRESENT_MASK | E.EPT_RWX | E.EPT_LARGE | (0x4000_0000))
    kids = ops.split_children(huge, 2, True)
    assert kids.shape == (512,)
    assert int(kids[3]) == (int(huge) & ~E.EPT_LARGE) + 3 * 4096


# --- no allocation per access or per SPTE -------------------------------------------------------
@pytest.mark.parametrize("two_d", [False, True], ids=["1d", "2d"])
@pytest.mark.parametrize("psc", [False, True], ids=["no-psc", "psc"])
def test_the_cpu_loop_allocates_nothing_per_access(two_d, psc):
    machine = H.build(256, two_d)
    for reads, tlb_entries in ((100, 1), (20_000, 1), (20_000, 1024)):  # misses, then hits
        run = machine.runner(reads, tlb_entries, psc)
        run()  # compiled
        assert H.nrt_allocations(run) == 0
        assert int(run.res[reads - 1, C.RES_VALUE]) != 0  # it did read the pages
    assert int(run.stats[C.ST_WALKS]) > 0 and int(run.stats[C.ST_TLB_HITS]) > 0


def test_the_range_operations_allocate_nothing_per_spte():
    small, big = (H.ept_with_leaves(n) for n in (1 << 10, 1 << 16))
    counts = []
    for mem, root, pristine in (small, big):
        leaves = 1 << 10 if mem is small[0] else 1 << 16
        u = np.zeros(6, np.int64)
        found = np.zeros(6, np.int64)

        def work(mem=mem, root=root, leaves=leaves, u=u, found=found, pristine=pristine):
            mem.pt[:] = pristine  # numpy, not numba: no NRT allocation
            for mode in (ops.WRPROT, ops.CLEAR_DIRTY, ops.AGE):
                ops.update_leafs_in_range(mem.pt, mem.pt_slot, root, 4, 0, leaves, 1 << 40, mode,
                                          1, u)
            ops.leaf_census(mem.pt, mem.pt_slot, root, 4, found)
            ops.collect_tables(mem.pt, mem.pt_slot, root, 4)
            ops.zap_leafs_in_range(mem.pt, mem.pt_slot, root, 4, 0, leaves, 1 << 40, u)

        work()  # compiled
        counts.append(H.nrt_allocations(work))
        assert int(u[1]) == 2 * leaves  # zapped twice: the first run, and this one
    # Per call only (result arrays and fixed stacks): the same for 1K and 64K leaves.
    assert counts[0] == counts[1]
    assert counts[0] < 30  # a handful per call of the two that return or stack arrays


HOT = {
    "cpu": (C, ["run_ops", "_acc_of", "_host_ok"]),
    "walker": (W, ["walk", "walk_cached", "_walk", "ept_translate", "_ept_walk", "_ept_set_ad",
                   "_set_flags", "_xlate_read", "table_word", "read_entry", "or_entry",
                   "access_fault", "memslot_find"]),
    "tlb": (T, ["tlb_flush_all", "tlb_flush_va", "psc_lookup", "psc_fill", "invalidate_addr",
                "psc_enabled", "_psc_row"]),
    "ops": (ops, ["update_leafs_in_range", "zap_leafs_in_range", "_push_children",
                  "_freeze_table", "_census_table", "_table_slot"]),
}


@pytest.mark.parametrize("module", list(HOT))
def test_hot_functions_are_compiled_without_numbas_runtime(module):
    mod, names = HOT[module]
    for name in names:
        assert getattr(mod, name).targetoptions.get("_nrt") is False, f"{module}.{name}"


# --- memory beyond the host's frames ----------------------------------------------------------------
def test_a_data_page_beyond_host_memory_reads_as_zero_and_keeps_no_write():
    machine = H.build(4, two_d=False)
    mem = machine.mem
    far = len(mem.tag) + 12345  # a frame nobody has
    pte_hpa = None
    gva = machine.pages[0]
    table = machine.regs[W.R_CR3] >> 12
    for level in (4, 3, 2):
        e = int(mem.table(table)[(gva >> (12 + 9 * (level - 1))) & 511])
        table = (e & 0x000F_FFFF_FFFF_F000) >> 12
    pte_hpa = (table, (gva >> 12) & 511)
    mem.table(pte_hpa[0])[pte_hpa[1]] = np.uint64((far << 12) | H.LEAF)
    prog = C.new_program([(C.OP_WRITE, gva, 99), (C.OP_READ, gva, 0), (C.OP_RPTE, gva, 0)])
    res = np.zeros((3, C.RES_COLS), np.int64)
    xinfo = np.zeros(C.XI_SIZE, np.int64)
    stats = np.zeros(C.ST_SIZE, np.int64)
    pc = C.run_ops(prog, 0, 3, res, mem.pt, mem.pt_slot, mem.tag, machine.regs, False, True, 0, 4,
                   T.new_tlb(), W.NO_PML, xinfo, stats, 10)
    assert pc == 3 and xinfo[C.XI_KIND] == C.X_NONE
    assert res[:, C.RES_VALUE].tolist() == [0, 0, 0]
    assert res[:, C.RES_VECTOR].tolist() == [0, 0, 0]


def test_a_2d_walk_whose_guest_table_is_beyond_host_memory_is_an_ept_violation():
    machine = H.build(4, two_d=True)
    mem = machine.mem
    # The EPT leaf for the guest's root table now names a frame beyond host memory.
    root_gpa = int(machine.regs[W.R_CR3])
    far = len(mem.pt_slot) + 777
    table = machine.root
    for level in (4, 3, 2):
        e = int(mem.table(table)[(root_gpa >> (12 + 9 * (level - 1))) & 511])
        table = (e & 0x000F_FFFF_FFFF_F000) >> 12
    mem.table(table)[(root_gpa >> 12) & 511] = np.uint64((far << 12) | H.EPT_LEAF)
    out = W.new_out()
    W.walk_cached(mem.pt, mem.pt_slot, machine.regs, machine.pages[0], 0, True, W.XL_EPT,
                  machine.root, 4, True, W.EMPTY_MS, W.EMPTY_HVA, T.new_tlb(), W.NO_PML, out)
    assert int(out[W.OUT_STATUS]) == W.W_PF  # the far "table" reads as not present
    assert int(out[W.OUT_CODE]) == 0


# --- once more with numba's bounds checking ---------------------------------------------------------
@pytest.mark.skipif(os.environ.get("NUMBA_BOUNDSCHECK") == "1", reason="already bounds-checked")
def test_this_file_passes_with_numbas_bounds_checking(tmp_path):
    """NUMBA_BOUNDSCHECK=1 makes every array index in compiled code raise IndexError when out
    of range. A fresh cache directory (XDG_CACHE_HOME) makes numba compile everything anew with
    the checks rather than load the unchecked machine code cached by other runs."""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", XDG_CACHE_HOME=str(tmp_path))
    tests = [str(ROOT / "tests" / name) for name in
             ("test_hot_paths.py", "test_walker_modes.py", "test_ept_walk.py")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-p", "no:cacheprovider", "-k",
                           "not passes_with_numbas_bounds_checking and not reserved_pdpte_raises_gp",
                           *tests], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    tail = "\n".join(proc.stdout.splitlines()[-15:])
    assert proc.returncode == 0, tail + proc.stderr[-2000:]
    assert " passed" in tail and " skipped" not in tail, tail


@pytest.mark.skipif(os.environ.get("NUMBA_BOUNDSCHECK") != "1", reason="runs bounds-checked only")
def test_an_index_out_of_range_raises_when_bounds_are_checked():
    """So that the run above checks something: compiled code raises IndexError."""
    from numba import njit

    @njit(_nrt=False)
    def past_the_end(a):
        return a[a.shape[0]]

    with pytest.raises(IndexError):
        past_the_end(np.zeros(3, np.int64))


def test_paging_constants_the_benchmarks_rely_on():
    # hot_paths builds its guest tables with these: keep them valid 4-level entries
    assert H.LEAF & P.PT_PRESENT and H.UPPER & P.PT_ACCESSED
    assert H.EPT_LEAF & E.EPT_RWX == E.EPT_RWX
