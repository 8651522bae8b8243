"""userfaultfd: missing pages in a registered region are resolved by handler tasks.

The model follows the demand-paging selftest and fs/userfaultfd.c. A vCPU whose
get_user_pages hits a missing page (handle_userfault) queues a message and wakes every reader
asleep in poll() on the uffd, then sleeps until its page is copied in. A reader takes a
message, optionally waits (the selftest's -d delay) and resolves the page with UFFDIO_COPY,
which populates it with the supplied contents and wakes the faults waiting for it. Messages
for a page already being resolved are not sent twice, as the kernel does not report an
address again while a fault on it is pending.

The uffd's wait queues are guarded by one spinlock (ctx->fault_pending_wqh.lock and
fd_wqh.lock, always taken together on the read side), whose word is a contended cache line.
Under it, wake_up_poll visits every reader asleep in poll() and wakes them all (poll waiters
are not exclusive: a thundering herd, of which one reader gets the message and the rest find
the queue empty and poll again), and UFFDIO_COPY's wake_userfault walks every fault waiting
on the uffd to find the ones in its range. Each entry visited lives in another CPU's cache: a
`lock_handoff` transfer. With one uffd and one reader per vCPU (demand_paging_test -u -a)
that work grows with the vCPUs and is serialized by the lock, so the paging rate falls as
vCPUs are added, as Anish Moorthy's 2023 measurements show (docs/engine.md); with a uffd per
vCPU (the seed's setup) each lock sees two CPUs and none of it grows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from mmu_core.host.mm import PAGE_1G, PAGE_4K, HostMM
from mmu_core.sim import Completion, Engine, SpinLock, Task


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
        # The wait queues' lock: not the MMU lock, so its wait counts in the caller's phase.
        self.wqh = SpinLock(engine, f"uffd@{start:#x}", accounted=False)
        self._msgs: deque[UffdMsg] = deque()  # fault_pending_wqh: reported, not yet read
        self._pollers: list[Task] = []  # readers asleep in poll() (fd_wqh)
        self._pending: dict[int, Completion] = {}  # page -> woken by its UFFDIO_COPY
        self._waiting = 0  # faults asleep until their page is copied (fault_wqh)
        self.faults = 0
        self.copies = 0
        self.empty_reads = 0  # readers woken by a fault another reader took first
        mm.register_userfault(start, self.end, self)

    def wait_for(self, hva: int, write: bool) -> int:
        """Called by a faulting task: report the missing page and sleep until it is no longer
        missing. Returns the pfn, or NO_PFN if the page was copied in and then swapped out
        before this task ran again (the caller faults it in again).

        A page copied in and dropped again (MADV_DONTNEED) before the waiter ran is missing
        once more, and its completion is spent: it is reported anew rather than spun on.
        """
        engine = self.engine
        page = hva & ~0xFFF
        while self.mm.is_missing(page):
            done = self._pending.get(page)
            if done is None:
                done = Completion(engine)
                self._pending[page] = done
                self.faults += 1
                # Building the message and waking the first reader (uffd_notify); every
                # further reader asleep in poll() is visited and woken too.
                engine.delay(engine.cost.uffd_notify, "userfault")
                with engine.phase("userfault"), self.wqh:
                    self._msgs.append(UffdMsg(page, write))
                    self._wake_pollers()
            self._waiting += 1
            try:
                done.wait("userfault")
            finally:
                self._waiting -= 1
        return self.mm.lookup(hva)

    def _wake_pollers(self) -> None:
        """wake_up_poll(&ctx->fd_wqh) under the lock: every reader asleep in poll() wakes."""
        pollers, self._pollers = self._pollers, []
        engine = self.engine
        if len(pollers) > 1:
            engine.delay((len(pollers) - 1) * 2 * engine.cost.lock_handoff)  # entry + task
        for task in pollers:
            engine.wake(task)

    def read(self) -> UffdMsg:
        """A reader's poll(2) then read(2) on the uffd: blocks until it gets a message."""
        engine = self.engine
        task = engine.current
        if task is None:
            if not self._msgs:
                raise RuntimeError("Userfaultfd.read with no message outside a task would "
                                   "never return")
            return self._msgs.popleft()
        woken = False
        while True:
            with self.wqh:
                if self._msgs:
                    return self._msgs.popleft()
                if woken:
                    self.empty_reads += 1  # another reader took the message that woke us
                self._pollers.append(task)  # poll(): on fd_wqh until a fault wakes it
            # The unlock is a switch point: a fault may have taken us off the list (and
            # found us not yet asleep) meanwhile. Then look again instead of sleeping.
            if task in self._pollers:
                engine.block("uffd_wait")
            woken = True

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
        lock = self.mm.mmap_lock  # mfill_atomic: the mmap lock for read, around the copy
        with self.engine.phase("uffd_copy"):
            if lock is not None:
                lock.read_lock()
            try:
                self.engine.delay(cost.uffd_copy + (npages - 1) * cost.copy_4k)
            finally:
                if lock is not None:
                    lock.read_unlock()
        pfn = self.mm.lookup(page)
        if self.mm.is_missing(page):  # a present or swapped-out page: EEXIST, nothing copied
            level = PAGE_4K if npages == 1 else PAGE_1G
            pfn = self.mm.populate(page, level=level)
            base = self.mm.lookup(first)
            self.mm.memory.tag[base : base + npages] = tags.astype(np.uint64)
            self.copies += 1
        # wake_userfault: under the wait queues' lock, every waiting fault is visited to find
        # those in the copied range (the first visit is part of uffd_copy)
        with self.engine.phase("uffd_copy"), self.wqh:
            if self._waiting > 1:
                self.engine.delay((self._waiting - 1) * self.engine.cost.lock_handoff)
            done = self._pending.pop(page, None)
            if done is not None:
                done.complete()
        return pfn
