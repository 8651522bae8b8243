"""Host physical memory: frames, their purposes, data tags, and page-table page contents.

Every frame has a 64-bit *tag*, which stands for the page's data: a guest data access reads or
writes the tag, which is enough to prove that the access reached the right page without keeping
4 KiB per page. Frames that hold paging structures (the guest's own page tables, EPT and shadow
tables) also get a *table slot*: a row of 512 uint64 entries in one 2-D array. All three arrays
are plain numpy so that the jitted walkers take them as arguments; they grow by reallocation,
so always read them through this object, never keep an old reference across an allocation.
"""

from __future__ import annotations

import enum

import numpy as np

from mmu_core.errors import OutOfMemory

ENTRIES_PER_TABLE = 512
NO_SLOT = -1


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
    """

    def __init__(self, max_frames: int = 1 << 34, initial_frames: int = 1 << 12) -> None:
        self.max_frames = max_frames
        self.tag = np.zeros(initial_frames, dtype=np.uint64)
        self.pt_slot = np.full(initial_frames, NO_SLOT, dtype=np.int32)
        self.pt = np.zeros((64, ENTRIES_PER_TABLE), dtype=np.uint64)
        self._free_slots: list[int] = list(range(63, -1, -1))
        self._next_pfn = 1  # pfn 0 stays unused so that a zero entry never names a real frame
        self._free: dict[int, list[int]] = {}
        self.frames_in_use = np.zeros(len(Purpose), dtype=np.int64)
        self.frames_peak = np.zeros(len(Purpose), dtype=np.int64)
        self._owner: dict[int, tuple[int, int]] = {}  # base pfn -> (count, purpose)

    # --- frames -------------------------------------------------------------------------
    def alloc(self, purpose: Purpose, count: int = 1) -> int:
        """Allocate `count` contiguous frames aligned to `count` (a power of two)."""
        free = self._free.get(count)
        if free:
            base = free.pop()
        else:
            base = (self._next_pfn + count - 1) & ~(count - 1)
            end = base + count
            if end > self.max_frames:
                raise OutOfMemory(f"host memory limit of {self.max_frames} frames reached")
            self._grow(end)
            self._next_pfn = end
        self.tag[base : base + count] = 0
        self._owner[base] = (count, int(purpose))
        self.frames_in_use[purpose] += count
        self.frames_peak[purpose] = max(self.frames_peak[purpose], self.frames_in_use[purpose])
        return base

    def free(self, base: int) -> None:
        count, purpose = self._owner.pop(base)
        for off in np.flatnonzero(self.pt_slot[base : base + count] != NO_SLOT):
            self.drop_table(base + int(off))
        self.frames_in_use[purpose] -= count
        self._free.setdefault(count, []).append(base)

    def is_allocated(self, base: int) -> bool:
        return base in self._owner

    def _grow(self, end: int) -> None:
        size = len(self.tag)
        if end <= size:
            return
        new = max(end, size * 2)
        tag = np.zeros(new, dtype=np.uint64)
        tag[:size] = self.tag
        slot = np.full(new, NO_SLOT, dtype=np.int32)
        slot[:size] = self.pt_slot
        self.tag, self.pt_slot = tag, slot

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
        return len(self.pt) - len(self._free_slots)

    def read_u64(self, hpa: int) -> int:
        pfn = hpa >> 12
        if not self.has_table(pfn):
            return 0
        return int(self.pt[self.pt_slot[pfn], (hpa & 0xFFF) >> 3])

    def write_u64(self, hpa: int, value: int) -> None:
        self.table(hpa >> 12)[(hpa & 0xFFF) >> 3] = np.uint64(value & ((1 << 64) - 1))
