"""The host process address space: hva -> pfn, populated on first touch, with MMU notifiers.

This is the part of the Linux mm that KVM depends on. Regions are anonymous memory with 4 KiB
pages, THP-backed memory (a first touch populates a whole 2 MiB page), or hugetlbfs (1 GiB);
any of them may be registered with userfaultfd, in which case a missing page is not populated
by the kernel but reported to a handler (see userfault.py). Host events that take a page away
or change it (unmap, MADV_DONTNEED, migration, swap-out, KSM merge) and page aging call the
registered MMU notifiers first, as mm/mmu_notifier.c does, so that KVM can drop its SPTEs.

`hva_pfn` and `hva_level` are dense numpy arrays over the mapped hva range; they are the host
page tables of this process, read by the jitted walkers when they need gfn -> pfn.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mmu_core.errors import InvalidConfig
from mmu_core.host.memory import HostMemory, Purpose

HVA_BASE = 0x7F00_0000_0000  # where the bump allocator starts: looks like a user mmap area
NO_PFN = -1
PAGE_4K, PAGE_2M, PAGE_1G = 1, 2, 3  # mapping levels, as KVM's PG_LEVEL_*
_LEVEL_PAGES = {PAGE_4K: 1, PAGE_2M: 512, PAGE_1G: 512 * 512}


class Backing(enum.StrEnum):
    ANON = "anon"
    THP = "thp"
    HUGETLB = "hugetlb"

    @property
    def level(self) -> int:
        return {Backing.ANON: PAGE_4K, Backing.THP: PAGE_2M, Backing.HUGETLB: PAGE_1G}[self]


class MMUNotifier(Protocol):
    """What a registered listener (a VM) is told; ranges are [start, end) in hva."""

    def invalidate_range_start(self, start: int, end: int, event: str) -> None: ...

    def invalidate_range_end(self, start: int, end: int, event: str) -> None: ...

    def clear_young(self, start: int, end: int) -> int: ...


@dataclass
class Region:
    start: int
    size: int
    backing: Backing
    name: str = ""

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass
class MMStats:
    populated_4k: int = 0
    populated_huge: int = 0
    unmapped_pages: int = 0
    notifier_calls: dict[str, int] = field(default_factory=dict)


class HostMM:
    def __init__(self, memory: HostMemory) -> None:
        self.memory = memory
        self.regions: list[Region] = []
        self._next = HVA_BASE
        self.hva_pfn = np.full(0, NO_PFN, dtype=np.int64)
        self.hva_level = np.zeros(0, dtype=np.int8)
        self.notifiers: list[MMUNotifier] = []
        self._uffds: list[tuple[int, int, object]] = []  # (start, end, Userfaultfd)
        self.stats = MMStats()

    # --- address space ------------------------------------------------------------------
    def mmap(self, size: int, backing: Backing = Backing.ANON, name: str = "") -> Region:
        page = 4096 * _LEVEL_PAGES[backing.level]
        if size <= 0 or size % page:
            raise InvalidConfig(
                "size", f"{size} is not a positive multiple of the {backing.value} page size {page}")
        # Align every region to 2 MiB at least, so that memslots can map huge pages.
        align = max(page, 2 << 20)
        start = (self._next + align - 1) & ~(align - 1)
        self._next = start + size
        need = (self._next - HVA_BASE) >> 12
        if need > len(self.hva_pfn):
            grow = need - len(self.hva_pfn)
            self.hva_pfn = np.concatenate([self.hva_pfn, np.full(grow, NO_PFN, dtype=np.int64)])
            self.hva_level = np.concatenate([self.hva_level, np.zeros(grow, dtype=np.int8)])
        region = Region(start, size, backing, name=name)
        self.regions.append(region)
        return region

    def region_of(self, hva: int) -> Region:
        for r in self.regions:
            if r.start <= hva < r.end:
                return r
        raise InvalidConfig("hva", f"{hva:#x} is not mapped in the host process")

    def register_userfault(self, start: int, end: int, uffd: object) -> None:
        """UFFDIO_REGISTER (MISSING mode) of [start, end)."""
        self.region_of(start)
        self._uffds.append((start, end, uffd))

    def userfault_of(self, hva: int):
        """The userfaultfd registered over hva, or None."""
        for start, end, uffd in self._uffds:
            if start <= hva < end:
                return uffd
        return None

    @staticmethod
    def index(hva: int) -> int:
        return (hva - HVA_BASE) >> 12

    def lookup(self, hva: int) -> int:
        """The pfn behind `hva`, or NO_PFN if not populated."""
        return int(self.hva_pfn[self.index(hva)])

    def mapping_level(self, hva: int) -> int:
        """The size of the host mapping of hva, as KVM's host_pfn_mapping_level reads it."""
        return int(self.hva_level[self.index(hva)])

    # --- population -----------------------------------------------------------------------
    def populate(self, hva: int, tag: int = 0, level: int | None = None) -> int:
        """Back the page containing hva with new frames (first touch or UFFDIO_COPY).

        `level` defaults to the region's backing; a userfault copy into a THP region passes
        PAGE_4K, as UFFDIO_COPY installs small pages. Returns the pfn for hva.
        """
        region = self.region_of(hva)
        level = region.backing.level if level is None else level
        npages = _LEVEL_PAGES[level]
        first = self.index(hva) & ~(npages - 1)
        base = self.memory.alloc(Purpose.GUEST_DATA, npages)
        self.hva_pfn[first : first + npages] = np.arange(base, base + npages, dtype=np.int64)
        self.hva_level[first : first + npages] = level
        if tag:
            self.memory.tag[base + (self.index(hva) - first)] = np.uint64(tag)
        if level == PAGE_4K:
            self.stats.populated_4k += 1
        else:
            self.stats.populated_huge += 1
        return base + (self.index(hva) - first)

    def fault_in(self, hva: int) -> int:
        """get_user_pages without waiting: the pfn, populating non-userfault memory on the way.

        Returns NO_PFN when the page is missing in a userfault region; the caller then waits
        for the region's handler (see userfault.Userfaultfd.wait_for).
        """
        pfn = self.lookup(hva)
        if pfn != NO_PFN:
            return pfn
        if self.userfault_of(hva) is not None:
            return NO_PFN
        return self.populate(hva)

    # --- host events (fire MMU notifiers first) --------------------------------------------
    def _notify(self, kind: str) -> None:
        self.stats.notifier_calls[kind] = self.stats.notifier_calls.get(kind, 0) + 1

    def _drop(self, start: int, end: int) -> None:
        lo, hi = self.index(start), self.index(end)
        pfns = self.hva_pfn[lo:hi]
        present = pfns[pfns != NO_PFN]
        # Free whole allocations: a huge page goes when its first frame's hva range is dropped.
        levels = self.hva_level[lo:hi][pfns != NO_PFN]
        for pfn, level in zip(present.tolist(), levels.tolist(), strict=True):
            if self.memory.is_allocated(pfn) and _LEVEL_PAGES[level] <= hi - lo:
                self.memory.free(pfn)
        self.stats.unmapped_pages += len(present)
        self.hva_pfn[lo:hi] = NO_PFN
        self.hva_level[lo:hi] = 0

    def _range(self, hva: int, size: int) -> tuple[int, int]:
        region = self.region_of(hva)
        page = 4096 * _LEVEL_PAGES[region.backing.level]
        start = hva & ~(page - 1)
        end = (hva + size + page - 1) & ~(page - 1)
        return start, min(end, region.end)

    def unmap(self, hva: int, size: int, event: str = "unmap") -> None:
        """munmap-like removal of the pages (the region stays reserved, as after DONTNEED)."""
        start, end = self._range(hva, size)
        self._notify(event)
        for n in self.notifiers:
            n.invalidate_range_start(start, end, event)
        self._drop(start, end)
        for n in self.notifiers:
            n.invalidate_range_end(start, end, event)

    def madvise_dontneed(self, hva: int, size: int) -> None:
        self.unmap(hva, size, event="madvise_dontneed")

    def swap_out(self, hva: int) -> None:
        self.unmap(hva, 4096, event="swap_out")

    def migrate(self, hva: int) -> int:
        """Move the page to a new frame with the same contents; returns the new pfn for hva."""
        old = self.lookup(hva)
        if old == NO_PFN:
            return NO_PFN
        start, end = self._range(hva, 4096)
        self._notify("migrate")
        for n in self.notifiers:
            n.invalidate_range_start(start, end, "migrate")
        first, npages = self.index(start), (end - start) >> 12
        old_base = int(self.hva_pfn[first])
        new_base = self.memory.alloc(Purpose.GUEST_DATA, npages)  # before freeing: a new frame
        mem = self.memory
        mem.tag[new_base : new_base + npages] = mem.tag[old_base : old_base + npages]
        for off in np.flatnonzero(mem.pt_slot[old_base : old_base + npages] >= 0).tolist():
            mem.table(new_base + off)[:] = mem.table(old_base + off)
        mem.free(old_base)
        self.hva_pfn[first : first + npages] = np.arange(new_base, new_base + npages)
        for n in self.notifiers:
            n.invalidate_range_end(start, end, "migrate")
        return new_base + (self.index(hva) - first)

    def ksm_merge(self, hva_keep: int, hva_dup: int) -> None:
        """KSM: the duplicate page now maps the kept page's frame (read-only in the host).

        Invalidates the duplicate's range (KVM no longer implements change_pte), then swaps
        the pfn.
        """
        keep = self.lookup(hva_keep)
        dup = self.lookup(hva_dup)
        if keep == NO_PFN or dup == NO_PFN:
            return
        start, end = self._range(hva_dup, 4096)
        self._notify("ksm_merge")
        for n in self.notifiers:
            n.invalidate_range_start(start, end, "ksm_merge")
        self.memory.free(dup)
        self.hva_pfn[self.index(hva_dup)] = keep
        for n in self.notifiers:
            n.invalidate_range_end(start, end, "ksm_merge")

    def age(self, hva: int, size: int) -> int:
        """Page aging (kswapd/MGLRU): ask the notifiers whether the range was young."""
        start, end = self._range(hva, size)
        self._notify("clear_young")
        return sum(n.clear_young(start, end) for n in self.notifiers)
