"""userfaultfd: missing pages in a registered region are resolved by a handler task.

The model follows the demand-paging selftest: a vCPU whose get_user_pages hits a missing page
posts a message on the region's channel and sleeps on a per-page completion; a handler task
reads messages, optionally waits (the selftest's -d delay), and resolves the page with
UFFDIO_COPY, which populates it with the supplied contents and wakes every waiter. Messages for
a page already being resolved are not sent twice, as the kernel does not report an address
again while a fault on it is pending.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmu_core.host.mm import PAGE_1G, PAGE_4K, HostMM
from mmu_core.sim import Channel, Completion, Engine


@dataclass(frozen=True)
class UffdMsg:
    hva: int
    write: bool


class Userfaultfd:
    def __init__(self, engine: Engine, mm: HostMM, start: int, size: int) -> None:
        self.engine = engine
        self.mm = mm
        self.start = start
        self.end = start + size
        self.region = mm.region_of(start)
        self.channel = Channel(engine)
        self._pending: dict[int, Completion] = {}
        self.faults = 0
        self.copies = 0
        mm.register_userfault(start, self.end, self)

    def wait_for(self, hva: int, write: bool) -> int:
        """Called by a faulting task: report the missing page and sleep until it is no longer
        missing. Returns the pfn, or NO_PFN if the page was copied in and then swapped out
        before this task ran again (the caller faults it in again).

        A page copied in and dropped again (MADV_DONTNEED) before the waiter ran is missing
        once more, and its completion is spent: it is reported anew rather than spun on.
        """
        page = hva & ~0xFFF
        while self.mm.is_missing(page):
            done = self._pending.get(page)
            if done is None:
                done = Completion(self.engine)
                self._pending[page] = done
                self.faults += 1
                self.engine.delay(self.engine.cost.uffd_notify, "userfault")
                self.channel.put(UffdMsg(page, write))
            done.wait("userfault")
        return self.mm.lookup(hva)

    def read(self) -> UffdMsg:
        """The handler's read(2) on the uffd: blocks until a fault is reported."""
        return self.channel.get("uffd_wait")

    def copy_range(self, hva: int) -> tuple[int, int]:
        """(first hva, number of 4 KiB pages) that one UFFDIO_COPY for hva fills: a small page,
        except in hugetlbfs, which only has huge ones."""
        if self.region.backing.level == PAGE_1G:
            return hva & ~((1 << 30) - 1), 1 << 18
        return hva & ~0xFFF, 1

    def copy(self, hva: int, tags: np.ndarray) -> int:
        """UFFDIO_COPY of the pages of copy_range(hva) with contents `tags` (one per 4 KiB);
        wakes the waiters. Returns the pfn behind hva."""
        page = hva & ~0xFFF
        first, npages = self.copy_range(hva)
        cost = self.engine.cost
        self.engine.delay(cost.uffd_copy + (npages - 1) * cost.copy_4k, "uffd_copy")
        pfn = self.mm.lookup(page)
        if self.mm.is_missing(page):  # a present or swapped-out page: EEXIST, nothing copied
            level = PAGE_4K if npages == 1 else PAGE_1G
            pfn = self.mm.populate(page, level=level)
            base = self.mm.lookup(first)
            self.mm.memory.tag[base : base + npages] = tags.astype(np.uint64)
            self.copies += 1
        done = self._pending.pop(page, None)
        if done is not None:
            done.complete()
        return pfn
