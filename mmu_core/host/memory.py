"""Host physical memory: frames, their purposes, data tags, and page-table page contents.

Every frame has a 64-bit *tag*, which stands for the page's data: a guest data access reads or
writes the tag, which is enough to prove that the access reached the right page without keeping
4 KiB per page. Frames that hold paging structures (the guest's own page tables, EPT and shadow
tables) also get a *table slot*: a row of 512 uint64 entries in one 2-D array. All three arrays
are plain numpy so that the jitted walkers take them as arguments; they grow by reallocation,
so always read them through this object, never keep an old reference across an allocation.

Frames are handed out in *allocations* (one frame, or an aligned run for a huge page), named by
their base pfn. Each allocation has a map count, as a struct page's _mapcount: the host mm takes
one reference per hva that maps it (KSM shares one frame between several hvas), and the frames
return to the allocator only when the last reference goes (`put`). `frame_state` says for every
frame whether it belongs to a live allocation and for what purpose, so that an audit can check
in one numpy expression that nothing still points at a freed frame.
"""

from __future__ import annotations

import enum
import mmap

import numpy as np

from mmu_core.errors import HostStateError, InvalidConfig, OutOfMemory

ENTRIES_PER_TABLE = 512
#: pt_slot of a frame that holds no table. Row 0 of `pt` is never handed out and stays zero,
#: so such a frame reads as 512 zero entries through it; and 0 is what an untouched page
#: holds, so the OS commits pt_slot's pages only where tables are (HostMemory._grow).
NO_SLOT = 0
FRAME_FREE = -1  # frame_state of a frame outside every live allocation (free or never used)


#: A pfn as the host's page tables store it (HostMM.hva_pfn, one per 4 KiB of hva): 4 bytes,
#: 1.7 GB less than 8 at the seed's 436 M pages. So a machine has at most PFN_LIMIT frames
#: (8 TiB; HostMemory refuses more). Take a pfn out with int() before any arithmetic: a numpy
#: int32 shifted left by 12 wraps silently (NumPy 2 keeps the array's type), and jitted code
#: widens it with np.int64 where it reads one.
PFN_DTYPE = np.int32
PFN_LIMIT = 1 << 31

MAPCOUNT_DTYPE = np.int16
MAPCOUNT_MAX = int(np.iinfo(MAPCOUNT_DTYPE).max)


class Purpose(enum.IntEnum):
    """Who a frame was handed to; the allocator accounts frames per purpose."""

    GUEST_DATA = 0  # backs guest memory (anonymous, THP or hugetlb)
    MMU_PT = 1  # a page-table page of the MMU (EPT / shadow page)
    MMU_ROOT = 2  # reserved for special roots


class HostMemory:
    """A frame allocator over a growable physical address space.

    Frames are handed out by a bump pointer with alignment (for THP and hugetlb backing) and
    recycled through per-size free lists. `max_frames` is a configured limit; exceeding it
    raises OutOfMemory instead of growing without bound.

    Lifetime: `alloc` returns an allocation with map count 1; `get` adds a mapping, `put` drops
    one and frees the frames with the last; `free` is `put` for an allocation that must have
    exactly one owner (page-table pages), and refuses a shared one rather than free a frame
    that is still mapped. `split` turns a huge allocation into single-frame ones (THP split).
    """

    def __init__(self, max_frames: int = PFN_LIMIT, initial_frames: int = 1 << 12) -> None:
        if not 0 < max_frames <= PFN_LIMIT:
            raise InvalidConfig("max_frames", f"{max_frames} frames: pfns are 4 bytes "
                                f"(PFN_DTYPE), so at most {PFN_LIMIT} (8 TiB)")
        self.max_frames = max_frames
        self.tag = np.zeros(initial_frames, dtype=np.uint64)
        self.pt_slot = _uncommitted(initial_frames, np.int32)
        self.pt = np.zeros((64, ENTRIES_PER_TABLE), dtype=np.uint64)
        self._free_slots: list[int] = list(range(63, NO_SLOT, -1))
        self._next_pfn = 1  # pfn 0 stays unused so that a zero entry never names a real frame
        self._free: dict[int, list[int]] = {}
        self.frames_in_use = np.zeros(len(Purpose), dtype=np.int64)
        self.frames_peak = np.zeros(len(Purpose), dtype=np.int64)
        # Per frame: log2 of the allocation's frame count at an allocation's base, -1 at every
        # other frame (the purpose is frame_state's). An array, not a dict of bases: at the
        # seed's scale a Python object per 4 KiB frame costs more than the rest of the model.
        self.order = np.full(initial_frames, -1, dtype=np.int8)
        # Per frame, meaningful at an allocation's base: how many mappings hold it. Two bytes
        # (0.9 GB less at the seed's 436 M frames): a page is mapped once but for KSM, which
        # stops at max_page_sharing (256, HostMM.ksm_merge); get() refuses to wrap.
        self.mapcount = np.zeros(initial_frames, dtype=MAPCOUNT_DTYPE)
        # Per frame: the Purpose of the live allocation it belongs to, or FRAME_FREE.
        self.frame_state = np.full(initial_frames, FRAME_FREE, dtype=np.int8)
        self._sizes: set[int] = set()  # allocation sizes ever handed out (for allocation_of)

    # --- frames -------------------------------------------------------------------------
    def alloc(self, purpose: Purpose, count: int = 1) -> int:
        """Allocate `count` contiguous frames aligned to `count` (a power of two)."""
        if count <= 0 or count & (count - 1):
            raise ValueError(f"allocation of {count} frames: not a power of two")
        free = self._free.get(count)
        if free:
            base = free.pop()
        else:
            base = (self._next_pfn + count - 1) & ~(count - 1)
            end = base + count
            self._grow(end)
            self._next_pfn = end
        self.tag[base : base + count] = 0
        self.order[base] = count.bit_length() - 1
        self._sizes.add(count)
        self.mapcount[base] = 1
        self.frame_state[base : base + count] = int(purpose)
        self.frames_in_use[purpose] += count
        self.frames_peak[purpose] = max(self.frames_peak[purpose], self.frames_in_use[purpose])
        return base

    def free(self, base: int) -> None:
        """Free an allocation that has a single owner (its map count must be 1)."""
        if not self.is_allocated(base):
            raise HostStateError(f"free of pfn {base:#x}, which is not an allocated base frame")
        if int(self.mapcount[base]) != 1:
            # Freeing here would leave the other mappings pointing at a recycled frame.
            raise HostStateError(f"free of pfn {base:#x} still mapped {int(self.mapcount[base])} times")
        self._release(base)

    def get(self, base: int) -> None:
        """One more mapping of the allocation at `base` (get_page / page_add_anon_rmap)."""
        if not self.is_allocated(base):
            raise HostStateError(f"get of pfn {base:#x}, which is not an allocated base frame")
        if int(self.mapcount[base]) >= MAPCOUNT_MAX:
            raise HostStateError(f"get of pfn {base:#x}: already mapped {MAPCOUNT_MAX} times")
        self.mapcount[base] += 1

    def put(self, base: int) -> bool:
        """Drop one mapping of the allocation at `base`; frees it with the last. Returns whether
        the frames were freed."""
        if not self.is_allocated(base):
            raise HostStateError(f"put of pfn {base:#x}, which is not an allocated base frame")
        self.mapcount[base] -= 1
        if self.mapcount[base] > 0:
            return False
        self._release(base)
        return True

    def _release(self, base: int) -> None:
        count, purpose = 1 << int(self.order[base]), int(self.frame_state[base])
        self.order[base] = -1
        for off in np.flatnonzero(self.pt_slot[base : base + count] != NO_SLOT):
            self.drop_table(base + int(off))
        self.mapcount[base] = 0
        self.frame_state[base : base + count] = FRAME_FREE
        self.frames_in_use[purpose] -= count
        self._free.setdefault(count, []).append(base)

    def split(self, base: int) -> None:
        """Make each frame of the allocation at `base` an allocation of its own, map count 1
        (split_huge_page: the compound page becomes ordinary pages, contents in place)."""
        count = 1 << int(self.order[base])
        if int(self.mapcount[base]) != 1:
            raise HostStateError(f"split of pfn {base:#x} mapped {int(self.mapcount[base])} times")
        self.order[base : base + count] = 0
        self._sizes.add(1)
        self.mapcount[base : base + count] = 1

    def is_allocated(self, base: int) -> bool:
        """Whether `base` is the first frame of a live allocation."""
        return 0 <= base < len(self.order) and int(self.order[base]) >= 0

    def frame_live(self, pfn: int) -> bool:
        """Whether frame `pfn` belongs to a live allocation (at any offset of it)."""
        return 0 <= pfn < len(self.frame_state) and int(self.frame_state[pfn]) != FRAME_FREE

    def allocation_of(self, pfn: int) -> tuple[int, int] | None:
        """(base, count) of the live allocation holding `pfn`, or None. Allocations are aligned
        to their size, so the base is found by rounding down through the sizes in use."""
        if not self.frame_live(pfn):
            return None
        for count in sorted(self._sizes):
            base = pfn & ~(count - 1)
            if int(self.order[base]) == count.bit_length() - 1:
                return base, count
        return None

    def copy(self, dst: int, src: int, count: int = 1) -> None:
        """Copy the contents (tags and table entries) of `count` frames from src to dst."""
        self.tag[dst : dst + count] = self.tag[src : src + count]
        src_tables = self.pt_slot[src : src + count] != NO_SLOT
        for off in np.flatnonzero(src_tables).tolist():
            self.table(dst + off)[:] = self.table(src + off)
        for off in np.flatnonzero(~src_tables & (self.pt_slot[dst : dst + count] != NO_SLOT)).tolist():
            self.drop_table(dst + off)

    def same_contents(self, a: int, b: int) -> bool:
        """Whether frames a and b hold the same data: tag and table entries (a frame without a
        table reads as 512 zero entries, as read_u64 does)."""
        if int(self.tag[a]) != int(self.tag[b]):
            return False
        ta = self.table(a) if self.has_table(a) else None
        tb = self.table(b) if self.has_table(b) else None
        if ta is None and tb is None:
            return True
        if ta is None:
            return not tb.any()
        if tb is None:
            return not ta.any()
        return bool(np.array_equal(ta, tb))

    def _grow(self, end: int) -> None:
        """Make room for frames below `end` (the one place frames are grown: the allocator,
        and the compiled loop's growth up front)."""
        if end > self.max_frames:
            raise OutOfMemory(f"host memory limit of {self.max_frames} frames reached" + (
                " (the most 4-byte pfns name: 8 TiB)" if self.max_frames == PFN_LIMIT else ""))
        size = len(self.tag)
        if end <= size:
            return
        new = min(max(end, size * 2), self.max_frames)
        tag = np.zeros(new, dtype=np.uint64)
        tag[:size] = self.tag
        slot = _uncommitted(new, np.int32)
        tables = np.flatnonzero(self.pt_slot)  # copying the zeros would commit every page
        slot[tables] = self.pt_slot[tables]
        mapcount = np.zeros(new, dtype=MAPCOUNT_DTYPE)
        mapcount[:size] = self.mapcount
        state = np.full(new, FRAME_FREE, dtype=np.int8)
        state[:size] = self.frame_state
        order = np.full(new, -1, dtype=np.int8)
        order[:size] = self.order
        self.tag, self.pt_slot = tag, slot
        self.mapcount, self.frame_state, self.order = mapcount, state, order

    # --- table contents -----------------------------------------------------------------
    def table(self, pfn: int) -> np.ndarray:
        """The 512 entries of a frame used as a page table, created zeroed on first use."""
        slot = int(self.pt_slot[pfn])
        if slot == NO_SLOT:
            slot = self._new_slot()
            self.pt_slot[pfn] = slot
        return self.pt[slot]

    def has_table(self, pfn: int) -> bool:
        return int(self.pt_slot[pfn]) != NO_SLOT

    def drop_table(self, pfn: int) -> None:
        slot = int(self.pt_slot[pfn])
        if slot != NO_SLOT:
            self.pt[slot] = 0
            self.pt_slot[pfn] = NO_SLOT
            self._free_slots.append(slot)

    def _new_slot(self) -> int:
        if not self._free_slots:
            n = len(self.pt)
            grown = np.zeros((n * 2, ENTRIES_PER_TABLE), dtype=np.uint64)
            grown[:n] = self.pt
            self.pt = grown
            self._free_slots = list(range(2 * n - 1, n - 1, -1))
        return self._free_slots.pop()

    def tables_in_use(self) -> int:
        return len(self.pt) - 1 - len(self._free_slots)  # row NO_SLOT is never in use

    def read_u64(self, hpa: int) -> int:
        pfn = hpa >> 12
        if not self.has_table(pfn):
            return 0
        return int(self.pt[self.pt_slot[pfn], (hpa & 0xFFF) >> 3])

    def write_u64(self, hpa: int, value: int) -> None:
        self.table(hpa >> 12)[(hpa & 0xFFF) >> 3] = np.uint64(value & ((1 << 64) - 1))


def _uncommitted(n: int, dtype) -> np.ndarray:
    """n zeros in pages of their own that the OS commits only when written: an anonymous
    mmap, as numpy's zeros would be but without its madvise(MADV_HUGEPAGE), which commits
    2 MiB at the first write. For pt_slot: 4 bytes per frame, of which only table frames
    (1 in 256, in clusters: docs/fastloop.md) are written, so about 1 page in 100 is."""
    nbytes = max(1, n) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype, count=n)
