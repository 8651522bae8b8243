"""The host process address space: hva -> pfn, populated on first touch, with MMU notifiers.

This is the part of the Linux mm that KVM depends on. Regions are anonymous memory with 4 KiB
pages, THP-backed memory (a first touch populates a whole 2 MiB page), or hugetlbfs (1 GiB);
any of them may be registered with userfaultfd, in which case a missing page is not populated
by the kernel but reported to a handler (see userfault.py). Host events that take a page away
or change it (unmap, MADV_DONTNEED, migration, swap-out, KSM merge, copy-on-write, THP split
and collapse) and page aging call the registered MMU notifiers first, as mm/mmu_notifier.c
does, so that KVM can drop its SPTEs.

Per 4 KiB of hva, dense numpy arrays are this process's page tables, read by the jitted
walkers and by audits:

- `hva_pfn`: the frame, or NO_PFN when nothing is mapped (missing, or swapped out);
- `hva_level`: the size of the mapping (PAGE_4K/2M/1G; 0 when not mapped);
- `hva_writable`: whether the host maps the page writable. KSM pages are mapped read-only
  in every process that shares them; a write breaks copy-on-write (`fault_in(write=True)`);
- `hva_swapped`: the page is in the swap store (a swap entry in the pte): its contents are
  kept and come back on the next access, in a new frame.

Each frame is held by a map count in HostMemory: one reference per hva mapping it (a huge
mapping holds one reference to its whole allocation). A frame goes back to the allocator only
with its last mapping, so unmapping one of two KSM-shared hvas leaves the other intact.

Concurrency. Every method may run inside an engine task (host events race vCPUs in scenarios)
or outside the engine (setup code; time does not pass there). Work the kernel spends time on
is charged with `engine.delay`, a switch point; state is therefore looked up again after each
delay. Events that fire notifiers hold the mm's event lock from before invalidate_range_start
until after invalidate_range_end: only one such event is in flight at a time, as the VM's
notifier assumes (ranges end in the order they started), and the state an event checked stays
as it was, except that missing or swapped-out pages may be faulted in meanwhile (that needs no
notifier, and a fault that raced retries through the notifier sequence). The page is changed
or freed only after invalidate_range_start has returned, and notifier windows always end,
even if the task is killed inside one.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mmu_core import mutants
from mmu_core.errors import HostStateError, InvalidConfig, MMUError
from mmu_core.host.memory import PFN_DTYPE, HostMemory, Purpose
from mmu_core.sim.cost import DEFAULT_COSTS, CostModel
from mmu_core.sim.sync import RWSem

HVA_BASE = 0x7F00_0000_0000  # where the bump allocator starts: looks like a user mmap area
NO_PFN = -1
PAGE_4K, PAGE_2M, PAGE_1G = 1, 2, 3  # mapping levels, as KVM's PG_LEVEL_*
_LEVEL_PAGES = {PAGE_4K: 1, PAGE_2M: 512, PAGE_1G: 512 * 512}
_THP_PAGES = 512


class UnsupportedHostEvent(MMUError):
    """A host event that Linux does not perform on this kind of memory (e.g. swapping or
    splitting a hugetlbfs page, KSM on hugetlbfs)."""


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


@dataclass(frozen=True)
class SwapEntry:
    """What swap-out wrote: the page's tag and, if it held a table, its 512 entries."""

    tag: int
    table: np.ndarray | None


@dataclass
class MMStats:
    populated_4k: int = 0
    populated_huge: int = 0
    unmapped_pages: int = 0
    swap_outs: int = 0
    swap_ins: int = 0
    migrations: int = 0
    ksm_merges: int = 0
    cow_copies: int = 0  # write faults on a shared read-only page: a private copy
    cow_reuses: int = 0  # write faults on a read-only page mapped once: made writable in place
    thp_splits: int = 0
    thp_collapses: int = 0
    slab_shrinks: int = 0  # shrink_slab events
    slab_freed: int = 0  # objects (page-table pages) the shrinkers gave back
    notifier_calls: dict[str, int] = field(default_factory=dict)


class _EventLock:
    """A sleeping mutex, FIFO with handoff, that serialises the mm's notifier-firing events.

    Not an engine lock (RWLock/SpinLock) on purpose: those count as "lock held" in the task
    accounting, which stands for the MMU lock; time waiting here is the phase "host_lock".
    Outside the engine it is taken if free; waiting there would never end, so that raises.
    """

    def __init__(self, engine) -> None:
        self.engine = engine
        self.held = False
        self.owner = None  # the holding task (None outside the engine)
        self._waiters: deque = deque()

    def acquire(self) -> None:
        task = self.engine.current if self.engine is not None else None
        if not self.held:
            self.held, self.owner = True, task
            return
        if task is None:
            raise RuntimeError("host mm event lock is held by a parked task: a host event "
                               "outside the engine would wait forever")
        if self.owner is task:
            raise RuntimeError(f"host mm event lock: {task.name} would deadlock against itself")
        self._waiters.append(task)
        try:
            while self.owner is not task:  # release() hands the lock over, then wakes us
                self.engine.block("host_lock")
        except BaseException:
            # Killed while waiting (engine.close): leave no dead task in line or as owner.
            if self.owner is task:
                self.release()
            elif task in self._waiters:
                self._waiters.remove(task)
            raise

    def release(self) -> None:
        if self._waiters:
            nxt = self._waiters.popleft()
            self.owner = nxt
            self.engine.wake(nxt)
        else:
            self.held, self.owner = False, None


#: /sys/kernel/mm/ksm/max_page_sharing's default (mm/ksm.c, ksm_max_page_sharing): the most
#: mappings KSM lets share one page
KSM_MAX_PAGE_SHARING = 256


def _grown(a: np.ndarray, n: int, fill: int = 0) -> np.ndarray:
    """`a` grown to n entries, the new ones `fill`. With fill 0 the OS commits the new pages
    only as entries are set (hva_swapped at the seed's scale: 436 MB never touched)."""
    out = np.zeros(n, dtype=a.dtype) if fill == 0 else np.full(n, fill, dtype=a.dtype)
    out[:len(a)] = a
    return out


class HostMM:
    def __init__(self, memory: HostMemory, engine=None) -> None:
        """`engine` (optional) is where host work is charged: without one (a bare mm in a
        test, or setup code) every delay is free, as outside the engine."""
        self.memory = memory
        self.engine = engine
        self.regions: list[Region] = []
        self._next = HVA_BASE
        self.hva_pfn = np.full(0, NO_PFN, dtype=PFN_DTYPE)
        self.hva_level = np.zeros(0, dtype=np.int8)
        self.hva_writable = np.zeros(0, dtype=np.bool_)
        self.hva_swapped = np.zeros(0, dtype=np.bool_)
        self.notifiers: list[MMUNotifier] = []
        # Shrinkers (register_shrinker): called with nr_to_scan when the host reclaims slab
        # memory; each returns how many objects it freed. KVM registers its MMU shrinker.
        self.shrinkers: list = []
        # told (hva index lo, hi) when unmap discards pages' contents: reference models
        self.discard_listeners: list = []
        self._uffds: list[tuple[int, int, object]] = []  # (start, end, Userfaultfd), sorted
        self._uffd_starts: list[int] = []  # their starts, for bisection
        self._region_starts: list[int] = []
        self._swap: dict[int, SwapEntry] = {}  # hva index -> the swapped-out contents
        # Frames mapped by more than one hva (KSM): pfn -> the hva indices mapping it. The
        # reverse map that migration and swap-out of a shared page need (KSM's rmap_items).
        self._sharers: dict[int, set[int]] = {}
        self._lock = _EventLock(engine)
        # The mmap lock (mm->mmap_lock): get_user_pages' slow path and UFFDIO_COPY take it
        # for read, munmap and khugepaged's collapse for write. Without an engine nothing
        # waits or costs, so there is none.
        self.mmap_lock = RWSem(engine, "mmap_lock") if engine is not None else None
        self.stats = MMStats()

    @property
    def cost(self) -> CostModel:
        return self.engine.cost if self.engine is not None else DEFAULT_COSTS

    def _delay(self, ns: int) -> None:
        if self.engine is not None and ns:
            self.engine.delay(ns)

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
            self.hva_pfn = _grown(self.hva_pfn, need, NO_PFN)
            self.hva_level = _grown(self.hva_level, need)
            self.hva_writable = _grown(self.hva_writable, need)
            self.hva_swapped = _grown(self.hva_swapped, need)
        region = Region(start, size, backing, name=name)
        self.regions.append(region)
        self._region_starts.append(start)
        return region

    def region_of(self, hva: int) -> Region:
        # Regions come from a bump allocator, so they are sorted by start: a bisection, not
        # a scan (a fault looks its region up; 416 vCPUs' regions made the scan show up).
        k = bisect.bisect_right(self._region_starts, hva) - 1
        if k >= 0 and hva < self.regions[k].end:
            return self.regions[k]
        raise InvalidConfig("hva", f"{hva:#x} is not mapped in the host process")

    def register_userfault(self, start: int, end: int, uffd: object) -> None:
        """UFFDIO_REGISTER (MISSING mode) of [start, end). A range overlapping one already
        registered is refused, as the kernel's EBUSY."""
        self.region_of(start)
        k = bisect.bisect_right(self._uffd_starts, start)
        if (k and self._uffds[k - 1][1] > start) or (
                k < len(self._uffds) and self._uffds[k][0] < end):
            raise HostStateError(f"userfaultfd: [{start:#x}, {end:#x}) overlaps a registered "
                                 "range (EBUSY)")
        self._uffd_starts.insert(k, start)
        self._uffds.insert(k, (start, end, uffd))

    def userfault_of(self, hva: int):
        """The userfaultfd registered over hva, or None (a bisection over the sorted ranges:
        the seed's test registers one per vCPU and every fault asks)."""
        k = bisect.bisect_right(self._uffd_starts, hva) - 1
        if k >= 0 and hva < self._uffds[k][1]:
            return self._uffds[k][2]
        return None

    @staticmethod
    def index(hva: int) -> int:
        return (hva - HVA_BASE) >> 12

    @staticmethod
    def hva_at(index: int) -> int:
        return HVA_BASE + (index << 12)

    def lookup(self, hva: int) -> int:
        """The pfn behind `hva`, or NO_PFN if not mapped (missing or swapped out)."""
        return int(self.hva_pfn[self.index(hva)])

    def mapping_level(self, hva: int) -> int:
        """The size of the host mapping of hva, as KVM's host_pfn_mapping_level reads it."""
        return int(self.hva_level[self.index(hva)])

    def host_writable(self, hva: int) -> bool:
        """Whether the host maps hva writable (False for KSM pages and unmapped hvas)."""
        return bool(self.hva_writable[self.index(hva)])

    def is_swapped(self, hva: int) -> bool:
        return bool(self.hva_swapped[self.index(hva)])

    def is_missing(self, hva: int) -> bool:
        """Neither mapped nor swapped out: what userfaultfd's MISSING mode reports."""
        i = self.index(hva)
        return int(self.hva_pfn[i]) == NO_PFN and not self.hva_swapped[i]

    def tag_of(self, hva: int) -> int:
        """The page's data tag wherever it is (frame or swap); 0 for a missing page."""
        i = self.index(hva)
        pfn = int(self.hva_pfn[i])
        if pfn != NO_PFN:
            return int(self.memory.tag[pfn])
        entry = self._swap.get(i)
        return entry.tag if entry is not None else 0

    def page_contents(self, hva: int) -> SwapEntry | None:
        """The page's contents wherever they are (its frame, or the swap store), as a
        SwapEntry (table None when it holds none), or None for a missing page. For reference
        models and digests that must not see a difference between present and swapped."""
        i = self.index(hva)
        pfn = int(self.hva_pfn[i])
        if pfn == NO_PFN:
            return self._swap.get(i)
        mem = self.memory
        return SwapEntry(int(mem.tag[pfn]), mem.table(pfn).copy() if mem.has_table(pfn) else None)

    def sharers(self, hva: int) -> int:
        """How many hvas map the frame behind hva (0 if none; 1 unless KSM shares it)."""
        pfn = self.lookup(hva)
        if pfn == NO_PFN:
            return 0
        return len(self._sharers.get(pfn, ())) or 1

    # --- population -----------------------------------------------------------------------
    def populate(self, hva: int, tag: int = 0, level: int | None = None) -> int:
        """Back the page containing hva with new frames (first touch or UFFDIO_COPY).

        `level` defaults to the region's backing; a userfault copy into a THP region passes
        PAGE_4K, as UFFDIO_COPY installs small pages. A first touch in a THP region whose
        2 MiB range already has small pages (or swap entries) gets a small page, as the kernel
        falls back to a 4 KiB fault under an existing page table. Returns the pfn for hva.
        """
        region = self.region_of(hva)
        i = self.index(hva)
        if level is None:
            level = region.backing.level
            if level == PAGE_2M and self._range_in_use(i & ~(_THP_PAGES - 1), _THP_PAGES):
                level = PAGE_4K
        npages = _LEVEL_PAGES[level]
        first = i & ~(npages - 1)
        if self._range_in_use(first, npages):
            # Populating over a mapped page would orphan its frame: a caller's missed re-check.
            raise HostStateError(f"populate of {hva:#x} over pages that are mapped or swapped")
        base = self.memory.alloc(Purpose.GUEST_DATA, npages)
        self.hva_pfn[first : first + npages] = np.arange(base, base + npages, dtype=PFN_DTYPE)
        self.hva_level[first : first + npages] = level
        self.hva_writable[first : first + npages] = True
        if tag:
            self.memory.tag[base + (i - first)] = np.uint64(tag)
        if level == PAGE_4K:
            self.stats.populated_4k += 1
        else:
            self.stats.populated_huge += 1
        return base + (i - first)

    def _range_in_use(self, first: int, npages: int) -> bool:
        return bool((self.hva_pfn[first : first + npages] != NO_PFN).any()
                    or self.hva_swapped[first : first + npages].any())

    def fault_in(self, hva: int, write: bool = False) -> int:
        """get_user_pages without waiting: the pfn, after whatever the kernel's fault does.

        A swapped-out page is read back into a new frame (cost `swap_in`); a missing page
        outside userfault regions is populated (`host_page_alloc`); with `write`, a page the
        host maps read-only gets copy-on-write (a private copy if the frame is shared, else it
        is made writable in place), so the result is host-writable. Returns NO_PFN when the
        page is missing in a userfault region: the caller waits for the region's handler
        (userfault.Userfaultfd.wait_for) and calls again. Each delay is a switch point, so
        the state is read again after it.
        """
        i = self.index(hva)
        while True:
            pfn = int(self.hva_pfn[i])
            if pfn != NO_PFN:
                if not write or self.hva_writable[i]:
                    return pfn
                self._write_protect_fault(i)
                continue
            if self.hva_swapped[i]:
                self._delay(self.cost.swap_in)
                if self.hva_swapped[i]:  # nobody swapped it in while we read it
                    self._swap_in(i)
                continue
            if self.userfault_of(hva) is not None:
                return NO_PFN
            self._delay(self.cost.host_page_alloc)
            # populated (or swapped) by a racing task meanwhile?
            if self.is_missing(hva) or mutants.on("populate-no-recheck"):
                self.populate(hva)

    def get_user_pages(self, hva: int, write: bool) -> int:
        """The pfn behind hva as KVM's hva_to_pfn gets it, waiting for a userfault handler if
        the page is missing in a userfault region. Charged to the caller's current phase.

        GUP-fast first (`gup_present`: a lockless host page walk and a refcount atomic); it
        succeeds for a present page (writable, for a write). Otherwise the slow path runs
        under the mmap lock held for read (get_user_pages_unlocked). A missing page in a
        userfault region makes handle_userfault drop the mmap lock before it sleeps
        (VM_FAULT_RETRY); the fault is retried under the lock once the handler has copied
        the page in. So a userfault costs four acquire/release pairs on the mmap lock's
        line, two here and two in UFFDIO_COPY, which is what makes that line hot at scale.
        """
        self._delay(self.cost.gup_present)
        i = self.index(hva)
        pfn = int(self.hva_pfn[i])
        if pfn != NO_PFN and (not write or self.hva_writable[i]):
            return pfn
        lock = self.mmap_lock
        if lock is None:
            return self.fault_in(hva, write)
        lock.read_lock()
        held = True  # a Ctrl-C may land while the retry takes the lock again: not held then
        try:
            while True:
                pfn = self.fault_in(hva, write)
                if pfn != NO_PFN:
                    return pfn
                lock.read_unlock()
                held = False
                try:
                    self.userfault_of(hva).wait_for(hva, write)
                finally:
                    lock.read_lock()
                    held = True
        finally:
            if held:
                lock.read_unlock()

    def _swap_in(self, i: int) -> int:
        """Read the swap entry of hva index i back into a new frame (no switch point). A
        swapped-in page is a private 4 KiB page, even if it was a shared KSM page."""
        entry = self._swap.pop(i)
        pfn = self.memory.alloc(Purpose.GUEST_DATA)
        self.memory.tag[pfn] = np.uint64(entry.tag)
        if entry.table is not None:
            self.memory.table(pfn)[:] = entry.table
        self.hva_swapped[i] = False
        self.hva_pfn[i] = pfn
        self.hva_level[i] = PAGE_4K
        self.hva_writable[i] = True
        self.stats.swap_ins += 1
        return pfn

    def _write_protect_fault(self, i: int) -> None:
        """do_wp_page for hva index i: the host maps it read-only and someone writes."""
        with self._event_lock():
            pfn = int(self.hva_pfn[i])
            if pfn == NO_PFN or self.hva_writable[i]:
                return  # unmapped or made writable while we waited for the lock
            if i not in self._sharers.get(pfn, ()):
                # The last mapping of a former KSM page: nobody else can see a write, so it is
                # made writable in place. Making a pte more permissive needs no notifier.
                self.hva_writable[i] = True
                self.stats.cow_reuses += 1
                return
            start = self.hva_at(i)
            with self._invalidate([(start, start + 4096)], "cow"):
                cost = self.cost
                self._delay(cost.host_page_alloc + cost.copy_4k)
                if int(self.hva_pfn[i]) != pfn:
                    return
                new = self.memory.alloc(Purpose.GUEST_DATA)
                self.memory.copy(new, pfn)
                self._unshare(pfn, i)
                self.hva_pfn[i] = new
                self.hva_writable[i] = True
                self.memory.put(pfn)
                self.stats.cow_copies += 1

    # --- serialisation and notifiers --------------------------------------------------------
    @contextlib.contextmanager
    def _event_lock(self) -> Iterator[None]:
        self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _event(self, mmap: str | None = None) -> Iterator[None]:
        """A host event: its own phase in the task's accounting, under the event lock, and
        under the mmap lock first if `mmap` says how ("read" or "write")."""
        if self.engine is None:
            with self._event_lock():
                yield
            return
        sem = self.mmap_lock
        with self.engine.phase("host"):
            if mmap is not None:
                sem.write_lock() if mmap == "write" else sem.read_lock()
            try:
                with self._event_lock():
                    yield
            finally:
                if mmap is not None:
                    sem.write_unlock() if mmap == "write" else sem.read_unlock()

    @contextlib.contextmanager
    def _invalidate(self, ranges: list[tuple[int, int]], event: str) -> Iterator[None]:
        """invalidate_range_start over each range (in order) before the body, _end after it
        in the same order. Every start that ran gets its end, even when the body or a later
        start raises (a killed task must not leave the VM's invalidation in progress)."""
        self._notify(event)
        started: list[tuple[MMUNotifier, int, int]] = []
        try:
            for start, end in ranges:
                for n in self.notifiers:
                    started.append((n, start, end))
                    n.invalidate_range_start(start, end, event)
            yield
        finally:
            for n, start, end in started:
                n.invalidate_range_end(start, end, event)

    def _notify(self, kind: str) -> None:
        self.stats.notifier_calls[kind] = self.stats.notifier_calls.get(kind, 0) + 1

    # --- mappings ---------------------------------------------------------------------------
    def _span(self, i: int) -> tuple[int, int]:
        """(first index, pages) of the mapping that covers hva index i, by its actual level."""
        npages = _LEVEL_PAGES.get(int(self.hva_level[i]), 1)
        return i & ~(npages - 1), npages

    def _mappers(self, pfn: int, i: int) -> list[int]:
        """The hva indices that map frame pfn (i among them)."""
        return sorted(self._sharers.get(pfn, (i,)))

    def _unshare(self, pfn: int, i: int) -> None:
        """Forget that hva index i maps the shared frame pfn (the caller drops the reference)."""
        sharers = self._sharers.get(pfn)
        if sharers is not None:
            sharers.discard(i)
            if len(sharers) <= 1:
                del self._sharers[pfn]

    def _clear(self, first: int, npages: int) -> None:
        self.hva_pfn[first : first + npages] = NO_PFN
        self.hva_level[first : first + npages] = 0
        self.hva_writable[first : first + npages] = False

    def _drop(self, lo: int, hi: int) -> None:
        """Unmap hva indices [lo, hi) and discard their swap entries. Huge mappings must lie
        wholly inside or outside (callers split or round first). Each mapping drops its
        reference; frames are freed with their last mapping."""
        pfns = self.hva_pfn[lo:hi]
        levels = self.hva_level[lo:hi]
        present = np.flatnonzero(pfns != NO_PFN)
        for off in present.tolist():
            i = lo + off
            level = int(levels[off])
            if level != PAGE_4K and i & (_LEVEL_PAGES[level] - 1):
                continue  # not the head of its huge mapping: the head drops the reference
            pfn = int(pfns[off])
            self._unshare(pfn, i)
            self.memory.put(pfn)
        self.stats.unmapped_pages += len(present)
        self._clear(lo, hi - lo)
        for off in np.flatnonzero(self.hva_swapped[lo:hi]).tolist():
            del self._swap[lo + off]
        self.hva_swapped[lo:hi] = False

    def _range(self, hva: int, size: int) -> tuple[int, int]:
        """[start, end) in whole 4 KiB pages, clipped to the region; a hugetlbfs range is
        rounded out to whole 1 GiB pages (they are never mapped in part)."""
        region = self.region_of(hva)
        page = 4096 * (_LEVEL_PAGES[PAGE_1G] if region.backing is Backing.HUGETLB else 1)
        start = hva & ~(page - 1)
        end = (hva + size + page - 1) & ~(page - 1)
        return start, min(end, region.end)

    # --- host events (fire MMU notifiers first) --------------------------------------------
    def unmap(self, hva: int, size: int, event: str = "unmap") -> None:
        """munmap-like removal of the pages (the region stays reserved, as after DONTNEED).

        A THP mapped huge and only partly covered is split first, as zap_pmd_range splits a
        partly covered huge PMD; hugetlbfs ranges cover whole huge pages.
        """
        # munmap holds the mmap lock for write; MADV_DONTNEED only for read (madvise_need_mmap_write)
        with self._event("write" if event == "unmap" else "read"):
            start, end = self._range(hva, size)
            if end <= start:
                return
            for edge in (start, end - 1):
                i = self.index(edge)
                first, npages = self._span(i)
                if int(self.hva_level[i]) == PAGE_2M and (
                        self.hva_at(first) < start or self.hva_at(first + npages) > end):
                    self._split_locked(i)
            with self._invalidate([(start, end)], event):
                self._drop(self.index(start), self.index(end))
                for listener in self.discard_listeners:
                    listener(self.index(start), self.index(end))  # contents gone from now on

    def madvise_dontneed(self, hva: int, size: int) -> None:
        self.unmap(hva, size, event="madvise_dontneed")

    def swap_out(self, hva: int) -> bool:
        """Reclaim the 4 KiB page at hva to swap, keeping its contents in the swap store.

        A THP mapped huge is split first (reclaim without THP_SWAP splits); hugetlbfs pages
        are never swapped (UnsupportedHostEvent). A KSM page leaves every hva that shares it.
        Returns False if there is nothing to swap (missing, or already swapped).
        """
        with self._event():
            if self.region_of(hva).backing is Backing.HUGETLB:
                raise UnsupportedHostEvent(f"swap_out({hva:#x}): hugetlbfs pages are never swapped")
            i = self.index(hva)
            if int(self.hva_level[i]) == PAGE_2M:
                self._split_locked(i)
            pfn = int(self.hva_pfn[i])
            if pfn == NO_PFN:
                return False
            mappers = self._mappers(pfn, i)
            with self._invalidate([(self.hva_at(m), self.hva_at(m) + 4096) for m in mappers],
                                  "swap_out"):
                self._delay(self.cost.swap_out)
                if any(int(self.hva_pfn[m]) != pfn for m in mappers):
                    return False  # cannot happen under the event lock; never free blindly
                mem = self.memory
                table = mem.table(pfn).copy() if mem.has_table(pfn) else None
                entry = SwapEntry(int(mem.tag[pfn]), table)
                self._sharers.pop(pfn, None)
                for m in mappers:
                    self._clear(m, 1)
                    self.hva_swapped[m] = True
                    self._swap[m] = entry
                    mem.put(pfn)
                self.stats.swap_outs += 1
            return True

    def migrate(self, hva: int) -> int:
        """Move the page (its whole mapping, at its actual level) to a new frame with the same
        contents; returns the new pfn for hva, or NO_PFN if nothing is mapped there. A KSM page
        moves for every hva that shares it."""
        with self._event():
            i = self.index(hva)
            if int(self.hva_pfn[i]) == NO_PFN:
                return NO_PFN
            first, npages = self._span(i)
            old = int(self.hva_pfn[first])
            mappers = self._mappers(old, first) if npages == 1 else [first]
            size = npages << 12
            with self._invalidate([(self.hva_at(m), self.hva_at(m) + size) for m in mappers],
                                  "migrate"):
                cost = self.cost
                self._delay(cost.host_page_alloc + npages * cost.copy_4k)
                if any(int(self.hva_pfn[m]) != old for m in mappers):
                    return self.lookup(hva)
                mem = self.memory
                new = mem.alloc(Purpose.GUEST_DATA, npages)  # before freeing: a new frame
                mem.copy(new, old, npages)
                for _ in mappers[1:]:
                    mem.get(new)
                if old in self._sharers:
                    self._sharers[new] = self._sharers.pop(old)
                for m in mappers:
                    self.hva_pfn[m : m + npages] = np.arange(new, new + npages, dtype=PFN_DTYPE)
                    mem.put(old)
                self.stats.migrations += 1
            return new + (i - first)

    def ksm_merge(self, hva_keep: int, hva_dup: int) -> bool:
        """KSM: if the two 4 KiB pages hold the same contents, the duplicate now maps the kept
        page's frame, read-only in the host for both, and the duplicate's frame loses a map
        reference. Pages with different contents are not merged (KSM compares them): returns
        whether the merge happened. A THP mapped huge is split first, as ksmd does; KSM does not
        scan hugetlbfs (UnsupportedHostEvent). Both pages are invalidated (KVM no longer
        implements change_pte), and the comparison is repeated once the notifiers have zapped
        the SPTEs, since the guest could have written until then (write_protect_page).
        """
        with self._event():
            for hva in (hva_keep, hva_dup):
                if self.region_of(hva).backing is Backing.HUGETLB:
                    raise UnsupportedHostEvent(f"ksm_merge({hva:#x}): KSM does not merge hugetlbfs")
            k, d = self.index(hva_keep), self.index(hva_dup)
            pk, pd = int(self.hva_pfn[k]), int(self.hva_pfn[d])
            if k == d or not self._mergeable(pk, pd):
                return False
            self._delay(self.cost.ksm_merge)
            for i in (k, d):
                if int(self.hva_level[i]) == PAGE_2M:
                    self._split_locked(i)
            ranges = [(self.hva_at(k), self.hva_at(k) + 4096), (self.hva_at(d), self.hva_at(d) + 4096)]
            with self._invalidate(ranges, "ksm_merge"):
                pk, pd = int(self.hva_pfn[k]), int(self.hva_pfn[d])
                if not self._mergeable(pk, pd):
                    return False
                self._unshare(pd, d)
                self._sharers.setdefault(pk, {k}).add(d)
                self.hva_pfn[d] = pk
                self.hva_writable[k] = self.hva_writable[d] = False
                self.memory.get(pk)
                self.memory.put(pd)
                self.stats.ksm_merges += 1
            return True

    def _mergeable(self, pk: int, pd: int) -> bool:
        """Both mapped, distinct, equal in contents, and the kept page shared by fewer than
        max_page_sharing mappings (KSM then starts another copy; the model does not merge)."""
        return (NO_PFN not in (pk, pd) and pk != pd
                and int(self.memory.mapcount[pk]) < KSM_MAX_PAGE_SHARING
                and self.memory.same_contents(pk, pd))

    def split_huge_page(self, hva: int) -> bool:
        """Split the THP mapped huge at hva into 512 small mappings of the same frames
        (contents in place); the notifier covers the 2 MiB, since KVM must drop huge SPTEs.
        Returns False if hva is not mapped huge; hugetlbfs pages cannot be split."""
        with self._event():
            if self.region_of(hva).backing is Backing.HUGETLB:
                raise UnsupportedHostEvent(f"split_huge_page({hva:#x}): hugetlbfs pages do not split")
            return self._split_locked(self.index(hva))

    def _split_locked(self, i: int) -> bool:
        if int(self.hva_level[i]) != PAGE_2M:
            return False
        first = i & ~(_THP_PAGES - 1)
        base = int(self.hva_pfn[first])
        start = self.hva_at(first)
        with self._invalidate([(start, start + (_THP_PAGES << 12))], "thp_split"):
            self._delay(self.cost.thp_split)
            if int(self.hva_level[first]) != PAGE_2M or int(self.hva_pfn[first]) != base:
                return False
            self.memory.split(base)
            self.hva_level[first : first + _THP_PAGES] = PAGE_4K
            self.stats.thp_splits += 1
        return True

    def collapse_huge_page(self, hva: int) -> bool:
        """khugepaged: replace the small mappings of the 2 MiB-aligned range around hva (a THP
        region) by one huge page with the same contents.

        As khugepaged with its default limits: missing pages read as zero in the huge page,
        except in a userfault-registered range, where every page must be present (a missing
        page there must still raise a userfault); swapped-out pages are read back into it;
        a range holding a KSM (shared) page is left alone. Returns whether it collapsed.
        """
        with self._event("write"):  # collapse_huge_page: mmap_write_lock
            region = self.region_of(hva)
            if region.backing is not Backing.THP:
                raise UnsupportedHostEvent(
                    f"collapse_huge_page({hva:#x}): only THP regions collapse, not {region.backing}")
            first = self.index(hva) & ~(_THP_PAGES - 1)
            start = self.hva_at(first)
            if int(self.hva_level[first]) == PAGE_2M or not self._collapsible(first):
                return False
            swapped = int(self.hva_swapped[first : first + _THP_PAGES].sum())
            with self._invalidate([(start, start + (_THP_PAGES << 12))], "thp_collapse"):
                cost = self.cost
                self._delay(cost.host_page_alloc + _THP_PAGES * cost.copy_4k
                            + swapped * cost.swap_in)
                # Pages may have been faulted in meanwhile (no lock needed for that): look
                # again, and copy what is there now.
                if int(self.hva_level[first]) == PAGE_2M or not self._collapsible(first):
                    return False
                mem = self.memory
                new = mem.alloc(Purpose.GUEST_DATA, _THP_PAGES)
                for off in range(_THP_PAGES):
                    i = first + off
                    pfn = int(self.hva_pfn[i])
                    if pfn != NO_PFN:
                        mem.copy(new + off, pfn)
                        mem.put(pfn)
                    elif self.hva_swapped[i]:
                        entry = self._swap.pop(i)
                        mem.tag[new + off] = np.uint64(entry.tag)
                        if entry.table is not None:
                            mem.table(new + off)[:] = entry.table
                self.hva_swapped[first : first + _THP_PAGES] = False
                self.hva_pfn[first : first + _THP_PAGES] = np.arange(new, new + _THP_PAGES,
                                                                     dtype=PFN_DTYPE)
                self.hva_level[first : first + _THP_PAGES] = PAGE_2M
                self.hva_writable[first : first + _THP_PAGES] = True
                self.stats.thp_collapses += 1
            return True

    def _collapsible(self, first: int) -> bool:
        pfns = self.hva_pfn[first : first + _THP_PAGES]
        present = pfns != NO_PFN
        swapped = self.hva_swapped[first : first + _THP_PAGES]
        if not (present.any() or swapped.any()):
            return False  # nothing to collapse
        if any(int(p) in self._sharers for p in pfns[present].tolist()):
            return False  # khugepaged skips KSM pages
        if self.userfault_of(self.hva_at(first)) is not None and not (present | swapped).all():
            return False  # uffd-armed: a missing page must stay missing
        return True

    def shrink_slab(self, nr_to_scan: int) -> int:
        """The host is short of memory and reclaims from the shrinkers (mm/shrinker.c
        shrink_slab, run by kswapd and direct reclaim): each gets `nr_to_scan`. Returns the
        objects freed. The shrinkers charge their own work (a switch point each)."""
        if nr_to_scan <= 0:
            raise InvalidConfig("nr_to_scan", f"must be positive, not {nr_to_scan}")
        with (self.engine.phase("host") if self.engine is not None
              else contextlib.nullcontext()):
            freed = sum(shrink(nr_to_scan) or 0 for shrink in list(self.shrinkers))
        self.stats.slab_shrinks += 1
        self.stats.slab_freed += freed
        return freed

    def age(self, hva: int, size: int) -> int:
        """Page aging (kswapd/MGLRU): ask the notifiers whether the range was young."""
        start, end = self._range(hva, size)
        self._notify("clear_young")
        return sum(n.clear_young(start, end) for n in self.notifiers)

    # --- consistency -------------------------------------------------------------------------
    def audit(self) -> list[str]:
        """Cross-check the mm against HostMemory; returns the problems found (empty if none).

        Every mapped pfn is a live frame; each allocation's map count equals the number of
        mappings holding it; read-only pages are shared or former KSM pages; swap entries and
        the swapped flags agree; and the guest-data frames in use are exactly the mapped ones
        (no leak).
        """
        problems: list[str] = []
        mem = self.memory
        mapped = np.flatnonzero(self.hva_pfn != NO_PFN)
        pfns = self.hva_pfn[mapped]
        if len(pfns) and not (mem.frame_state[pfns] == int(Purpose.GUEST_DATA)).all():
            bad = pfns[mem.frame_state[pfns] != int(Purpose.GUEST_DATA)]
            problems.append(f"hvas map frames that are not live guest data: {bad[:8].tolist()}")
        # One reference per mapping: each small page, and the head of each huge mapping.
        levels = self.hva_level[mapped].astype(np.int64)
        spans = np.where(levels == PAGE_1G, _LEVEL_PAGES[PAGE_1G],
                         np.where(levels == PAGE_2M, _THP_PAGES, 1))
        heads = mapped[(mapped & (spans - 1)) == 0]
        bases, counts = np.unique(self.hva_pfn[heads], return_counts=True)
        for base, n in zip(bases.tolist(), counts.tolist(), strict=True):
            if not mem.is_allocated(base):
                problems.append(f"pfn {base:#x} is mapped but is not an allocation's base")
            elif int(mem.mapcount[base]) != n:
                problems.append(f"pfn {base:#x}: map count {int(mem.mapcount[base])}, "
                                f"mapped {n} times")
        for pfn, users in self._sharers.items():
            if len(users) < 2 or any(int(self.hva_pfn[u]) != pfn for u in users):
                problems.append(f"stale sharer set of pfn {pfn:#x}: {sorted(users)}")
        if set(np.flatnonzero(self.hva_swapped).tolist()) != set(self._swap):
            problems.append("swap entries and hva_swapped disagree")
        if (self.hva_swapped & (self.hva_pfn != NO_PFN)).any():
            problems.append("a page is both mapped and swapped")
        in_use = int(mem.frames_in_use[Purpose.GUEST_DATA])
        distinct = len(np.unique(pfns))
        if in_use != distinct:
            problems.append(f"{in_use} guest-data frames in use, {distinct} mapped (leak)")
        return problems
