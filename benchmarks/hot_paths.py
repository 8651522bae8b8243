"""The compiled hot paths, timed: TLB hits, 1-D and 2-D TLB-miss walks, the TDP range operations.

Each function builds its own tables in a fresh HostMemory and returns one figure (nanoseconds
per access, or per SPTE), the best of `repeat` timed runs after a warm-up (the minimum is the
figure least disturbed by other work on a shared machine). The access pattern is the one the
QEMU side (benchmarks/qemu_side.py) runs: the same pages, the same 4-level tables, visited in
the same random cyclic order, which in QEMU is a pointer chase.

- TLB hit: 5M reads cycling over 64 pages (every access after the first 64 hits).
- TLB miss: reads cycling over `MISS_PAGES` pages (64 MiB) through a one-entry TLB, so every
  access walks; the paging-structure caches are off, so every walk reads all four levels (as
  QEMU's softmmu does); with them on (`psc=True`) a walk reads only the PTE.
- 2-D: the same guest tables at guest-physical addresses, every guest table read and the final
  address translated through a 4-level EPT (5 translations, up to 24 entry reads per walk).
- Range operations on an EPT of 1M 4K leaves (4 GiB of guest memory): zap, write-protect,
  D-bit clearing, aging (update_leafs_in_range), collect_tables and leaf_census, each over the
  whole range in one call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_core.host.memory import HostMemory, Purpose
from mmu_core.hw import cpu as C
from mmu_core.hw import walker as W
from mmu_core.hw.tlb import new_tlb

HIT_PAGES = 64
HIT_READS = 5_000_000
MISS_PAGES = 16_384  # 64 MiB: more pages than QEMU's (256-entry) TLB and ours hold
MISS_READS = 1_000_000
RANGE_LEAVES = 1 << 20
DATA_GVA = 0x40_0000_0000  # 256 GiB: PML4 index 0, PDPT index 256 >> ... (any canonical address)
DATA_GPA = 0x1_0000_0000  # the data pages' guest-physical base under 2-D
UPPER = P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER | P.PT_ACCESSED
LEAF = UPPER | P.PT_DIRTY
EPT_UPPER = E.EPT_RWX | E.EPT_ACCESSED
EPT_LEAF = E.EPT_RWX | (E.EPT_MT_WB << E.EPT_MT_SHIFT) | E.EPT_ACCESSED | E.EPT_DIRTY


#: the clock: the benchmarking thread's CPU time, so that time other processes of a shared
#: machine take while this one waits for a core does not count (their cache pollution does)
clock = time.thread_time


def best_of(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None) -> float:
    """The shortest of `repeat` timed calls (seconds), after one untimed call; `setup` runs
    untimed before each."""
    if setup:
        setup()
    fn()
    best = float("inf")
    for _ in range(repeat):
        if setup:
            setup()
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


class Tables:
    """4-level tables in `mem`, built top-down on demand: `entry` values are written as given."""

    def __init__(self, mem: HostMemory, levels: int = 4) -> None:
        self.mem = mem
        self.levels = levels
        self.root = self.new_table()

    def new_table(self) -> int:
        pfn = self.mem.alloc(Purpose.MMU_PT)
        self.mem.table(pfn)
        return pfn

    def map(self, addr: int, leaf: int, upper: int, table_addr: Callable[[int], int]) -> None:
        """Point the 4K entry of `addr` at leaf (a full entry); missing tables get `upper`
        entries naming table_addr(pfn) (their address as the walker sees it)."""
        pfn = self.root
        for level in range(self.levels, 1, -1):
            t = self.mem.table(pfn)
            i = (addr >> (12 + 9 * (level - 1))) & 511
            if int(t[i]) == 0:
                child = self.new_table()
                self.mem.table(pfn)[i] = np.uint64(table_addr(child) | upper)
                t = self.mem.table(pfn)
            pfn = self.pfn_of(int(t[i]))
        self.mem.table(pfn)[(addr >> 12) & 511] = np.uint64(leaf)

    def pfn_of(self, entry: int) -> int:
        raise NotImplementedError


@dataclass
class Machine:
    """Everything run_ops needs for a program of reads."""

    mem: HostMemory
    regs: np.ndarray
    tdp: bool
    root: int
    pages: list[int]  # gva of each data page, in visiting order

    def program(self, reads: int) -> np.ndarray:
        gvas = np.array(self.pages, dtype=np.int64)
        prog = np.zeros((reads, 3), dtype=np.int64)
        prog[:, 0] = C.OP_READ
        prog[:, 1] = np.resize(gvas, reads) | 0x10
        return prog

    def runner(self, reads: int, tlb_entries: int, psc: bool) -> Callable[[], int]:
        prog = self.program(reads)
        res = np.zeros((reads, C.RES_COLS), dtype=np.int64)
        xinfo = np.zeros(C.XI_SIZE, dtype=np.int64)
        stats = np.zeros(C.ST_SIZE, dtype=np.int64)
        tlb = new_tlb(tlb_entries, None if psc else 0)
        mem = self.mem

        def run() -> int:
            pc = C.run_ops(prog, 0, reads, res, mem.pt, mem.pt_slot, mem.tag, self.regs, self.tdp,
                           True, self.root, 4, tlb, W.NO_PML, xinfo, stats, reads)
            assert pc == reads and xinfo[C.XI_KIND] == C.X_NONE, (pc, xinfo)
            return pc

        run.stats = stats  # type: ignore[attr-defined]
        run.res = res  # type: ignore[attr-defined]
        return run


def _order(n: int, seed: int = 12) -> list[int]:
    """A random cyclic order of n pages (the pointer chase's)."""
    return np.random.default_rng(seed).permutation(n).tolist()


def build(npages: int, two_d: bool, seed: int = 12) -> Machine:
    """npages 4K data pages mapped by 4-level guest tables; under 2-D the guest tables and
    the data sit at guest-physical addresses that a 4-level EPT maps."""
    mem = HostMemory(initial_frames=npages + 4096)
    data = [mem.alloc(Purpose.GUEST_DATA) for _ in range(npages)]
    mem.tag[data] = np.arange(1, npages + 1, dtype=np.uint64)

    class Guest(Tables):
        def pfn_of(self, entry: int) -> int:  # guest tables: gpa == hpa (identity in EPT)
            return (entry & 0x000F_FFFF_FFFF_F000) >> 12

    class Ept(Tables):
        def pfn_of(self, entry: int) -> int:
            return (entry & 0x000F_FFFF_FFFF_F000) >> 12

    guest = Guest(mem)
    regs = W.new_regs()
    regs[W.R_MODE] = P.MODE_4LEVEL
    regs[W.R_CR3] = guest.root << 12
    regs[W.R_FLAGS] = W.F_WP | W.F_NXE
    regs[W.R_MAXPHY] = 46
    for k, pfn in enumerate(data):
        target = (DATA_GPA + (k << 12)) if two_d else pfn << 12
        guest.map(DATA_GVA + (k << 12), target | LEAF, UPPER, lambda t: t << 12)
    if not two_d:
        return Machine(mem, regs, False, 0, [DATA_GVA + (k << 12) for k in _order(npages, seed)])
    ept = Ept(mem)
    for pfn in np.flatnonzero(mem.order >= 0).tolist():  # every guest table, identity-mapped
        if int(mem.frame_state[pfn]) == Purpose.MMU_PT and mem.has_table(pfn) and pfn != ept.root:
            ept.map(pfn << 12, (pfn << 12) | EPT_LEAF, EPT_UPPER, lambda t: t << 12)
    for k, pfn in enumerate(data):
        ept.map(DATA_GPA + (k << 12), (pfn << 12) | EPT_LEAF, EPT_UPPER, lambda t: t << 12)
    return Machine(mem, regs, True, ept.root, [DATA_GVA + (k << 12) for k in _order(npages, seed)])


# --- access paths ---------------------------------------------------------------------------
def tlb_hit_ns(repeat: int = 5) -> float:
    m = build(HIT_PAGES, two_d=False)
    run = m.runner(HIT_READS, 1024, True)
    secs = best_of(run, repeat)
    walks = int(run.stats[C.ST_WALKS])
    assert walks == HIT_PAGES, walks  # only the warm-up's first visits walked
    return secs / HIT_READS * 1e9


def tlb_miss_ns(two_d: bool, psc: bool = False, repeat: int = 5) -> float:
    m = build(MISS_PAGES, two_d=two_d)
    run = m.runner(MISS_READS, 1, psc)
    secs = best_of(run, repeat)
    assert int(run.stats[C.ST_TLB_HITS]) == 0
    return secs / MISS_READS * 1e9


# --- range operations ---------------------------------------------------------------------------
def ept_with_leaves(leaves: int = RANGE_LEAVES) -> tuple[HostMemory, int, np.ndarray]:
    """A 4-level TDP-MMU EPT mapping gfns [0, leaves) with 4K leaves (A and D set, writable,
    as after a write fault), built in numpy; returns (mem, root, pristine copy of mem.pt)."""
    ntables = leaves // 512
    npd = -(-ntables // 512)
    mem = HostMemory(initial_frames=leaves + ntables + npd + 16)
    data = mem.alloc(Purpose.GUEST_DATA, 1 << 20) if leaves <= 1 << 20 else None
    assert data is not None
    root = mem.alloc(Purpose.MMU_PT)
    pdpt = mem.alloc(Purpose.MMU_PT)
    pds = [mem.alloc(Purpose.MMU_PT) for _ in range(npd)]
    pts = [mem.alloc(Purpose.MMU_PT) for _ in range(ntables)]
    for pfn in [root, pdpt, *pds, *pts]:
        mem.table(pfn)
    link = np.uint64(S.SPTE_MMU_PRESENT_MASK | E.EPT_RWX | E.EPT_ACCESSED)
    leaf = np.uint64(S.SPTE_MMU_PRESENT_MASK | EPT_LEAF | S.EPT_SPTE_HOST_WRITABLE
                     | S.EPT_SPTE_MMU_WRITABLE)
    mem.table(root)[0] = link | np.uint64(pdpt << 12)
    for i, pd in enumerate(pds):
        mem.table(pdpt)[i] = link | np.uint64(pd << 12)
    for j, pt in enumerate(pts):
        mem.table(pds[j // 512])[j % 512] = link | np.uint64(pt << 12)
        frames = np.arange(data + j * 512, data + (j + 1) * 512, dtype=np.uint64)
        mem.table(pt)[:] = leaf | (frames << np.uint64(12))
    return mem, root, mem.pt.copy()


def range_call(name: str, mem: HostMemory, root: int, leaves: int = RANGE_LEAVES) -> Callable[[], None]:
    """One range operation over every leaf of the EPT under root."""
    from mmu_tdp import ops

    unmapped = np.zeros(6, np.int64)
    counts = np.zeros(6, np.int64)
    modes = {"wrprot": ops.WRPROT, "clear_dirty": ops.CLEAR_DIRTY, "age": ops.AGE}

    def call() -> None:
        if name == "zap":
            ops.zap_leafs_in_range(mem.pt, mem.pt_slot, root, 4, 0, leaves, 1 << 62, unmapped)
        elif name == "collect":
            ops.collect_tables(mem.pt, mem.pt_slot, root, 4)
        elif name == "census":
            ops.leaf_census(mem.pt, mem.pt_slot, root, 4, counts)
        elif name == "freeze":
            ops.freeze_subtree(mem.pt, mem.pt_slot, root, 4, unmapped)
        else:
            ops.update_leafs_in_range(mem.pt, mem.pt_slot, root, 4, 0, leaves, 1 << 62,
                                      modes[name], 1, unmapped)

    return call


def range_op_ns(name: str, repeat: int = 5, leaves: int = RANGE_LEAVES) -> float:
    """ns per SPTE for one range operation over every leaf of a fresh 1M-leaf EPT."""
    mem, root, pristine = ept_with_leaves(leaves)

    def reset() -> None:
        mem.pt[:] = pristine

    return best_of(range_call(name, mem, root, leaves), repeat, reset) / leaves * 1e9


def nrt_allocations(fn: Callable[[], object]) -> int:
    """NRT allocations (arrays and their meminfos, numba's runtime statistics) while fn runs."""
    from numba.core.runtime import _nrt_python, rtsys

    _nrt_python.memsys_enable_stats()
    try:
        before = rtsys.get_allocation_stats()
        fn()
        after = rtsys.get_allocation_stats()
    finally:
        _nrt_python.memsys_disable_stats()
    return (after.alloc - before.alloc) + (after.mi_alloc - before.mi_alloc)


RANGE_OPS = ("zap", "wrprot", "clear_dirty", "age", "collect", "census", "freeze")
