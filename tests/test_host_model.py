"""The host model on its own: frame map counts, KSM copy-on-write, swap, THP split and
collapse, migration by the actual mapping level, and the notifier protocol inside tasks."""

import numpy as np
import pytest

from mmu_core.errors import HostStateError
from mmu_core.host import (
    FRAME_FREE,
    NO_PFN,
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    Backing,
    HostMemory,
    HostMM,
    Purpose,
    UnsupportedHostEvent,
)
from mmu_core.host.userfault import Userfaultfd
from mmu_core.sim import CostModel, Engine

MIB2 = 2 << 20


class Recorder:
    """An MMU notifier that records what it is told and what the mm looked like then."""

    def __init__(self, mm, engine=None, switch_ns=0):
        self.mm = mm
        self.engine = engine
        self.switch_ns = switch_ns
        self.log = []

    def invalidate_range_start(self, start, end, event):
        i = self.mm.index(start)
        self.log.append(("start", start, end, event, int(self.mm.hva_pfn[i])))
        if self.engine is not None and self.switch_ns:
            self.engine.delay(self.switch_ns)  # a switch point inside the notifier, as a zap

    def invalidate_range_end(self, start, end, event):
        i = self.mm.index(start)
        self.log.append(("end", start, end, event, int(self.mm.hva_pfn[i])))

    def clear_young(self, start, end):
        return 0

    def events(self, kind):
        return [e for e in self.log if e[0] == kind]


def new_mm(engine=None):
    mem = HostMemory()
    mm = HostMM(mem, engine)
    rec = Recorder(mm, engine)
    mm.notifiers.append(rec)
    return mm, mem, rec


def assert_consistent(mm):
    assert mm.audit() == []


# --- HostMemory ---------------------------------------------------------------------------------

def test_map_counts_free_a_frame_only_with_its_last_mapping():
    mem = HostMemory()
    pfn = mem.alloc(Purpose.GUEST_DATA)
    assert mem.mapcount[pfn] == 1 and mem.frame_live(pfn)
    mem.get(pfn)
    with pytest.raises(HostStateError, match="still mapped 2 times"):
        mem.free(pfn)
    assert mem.put(pfn) is False
    assert mem.frame_live(pfn) and mem.frames_in_use[Purpose.GUEST_DATA] == 1
    assert mem.put(pfn) is True
    assert not mem.frame_live(pfn) and not mem.is_allocated(pfn)
    assert mem.frame_state[pfn] == FRAME_FREE
    assert mem.frames_in_use[Purpose.GUEST_DATA] == 0


def test_a_map_count_refuses_to_wrap_its_two_bytes():
    from mmu_core.host.memory import MAPCOUNT_MAX

    mem = HostMemory()
    pfn = mem.alloc(Purpose.GUEST_DATA)
    for _ in range(MAPCOUNT_MAX - 1):
        mem.get(pfn)
    assert int(mem.mapcount[pfn]) == MAPCOUNT_MAX
    with pytest.raises(HostStateError, match=f"already mapped {MAPCOUNT_MAX} times"):
        mem.get(pfn)
    assert int(mem.mapcount[pfn]) == MAPCOUNT_MAX and mem.put(pfn) is False


def test_frame_state_covers_every_frame_of_an_allocation_and_sees_frees():
    mem = HostMemory()
    base = mem.alloc(Purpose.GUEST_DATA, 512)
    pt = mem.alloc(Purpose.MMU_PT)
    assert mem.frame_live(base + 300) and not mem.is_allocated(base + 300)
    assert mem.allocation_of(base + 300) == (base, 512)
    assert mem.frame_state[pt] == Purpose.MMU_PT
    assert not mem.frame_live(0)
    mem.free(base)
    assert not mem.frame_live(base + 300)
    assert (mem.frame_state[base : base + 512] == FRAME_FREE).all()
    assert mem.allocation_of(base + 300) is None
    assert mem.frame_live(pt)


def test_split_makes_each_frame_its_own_allocation_with_contents_in_place():
    mem = HostMemory()
    base = mem.alloc(Purpose.GUEST_DATA, 512)
    mem.tag[base + 7] = 77
    mem.table(base + 9)[3] = 33
    mem.split(base)
    assert mem.is_allocated(base + 7) and mem.mapcount[base + 7] == 1
    assert mem.tag[base + 7] == 77 and mem.table(base + 9)[3] == 33
    for off in range(512):
        assert mem.put(base + off)
    assert mem.frames_in_use[Purpose.GUEST_DATA] == 0
    assert mem.tables_in_use() == 0


def test_table_slots_survive_growth_and_a_frame_without_one_reads_zeros():
    # pt_slot holds 0 (NO_SLOT) for "no table" and is grown by copying only the table
    # frames' slots; row 0 of pt belongs to no table and stays zero
    from mmu_core.host.memory import NO_SLOT

    mem = HostMemory(initial_frames=16)
    first = [mem.alloc(Purpose.MMU_PT) for _ in range(3)]
    for k, pfn in enumerate(first):
        mem.table(pfn)[k] = 100 + k
    plain = mem.alloc(Purpose.GUEST_DATA)
    many = [mem.alloc(Purpose.MMU_PT) for _ in range(200)]  # grows the frames and the rows
    for pfn in many:
        mem.table(pfn)[1] = pfn
    assert len(mem.pt_slot) >= many[-1] and len(mem.pt) > 64
    assert [int(mem.table(p)[k]) for k, p in enumerate(first)] == [100, 101, 102]
    assert all(mem.read_u64((p << 12) + 8) == p for p in many)
    assert not mem.has_table(plain) and int(mem.pt_slot[plain]) == NO_SLOT
    assert mem.read_u64((plain << 12) + 8) == 0 and not mem.pt[NO_SLOT].any()
    assert mem.tables_in_use() == 203 and NO_SLOT not in mem.pt_slot[first + many]
    for pfn in first + many:
        mem.free(pfn)
    assert mem.tables_in_use() == 0 and not mem.pt_slot.any()


def test_copy_and_same_contents_cover_tags_and_tables():
    mem = HostMemory()
    a, b = mem.alloc(Purpose.GUEST_DATA), mem.alloc(Purpose.GUEST_DATA)
    assert mem.same_contents(a, b)
    mem.table(a)[5] = 1
    assert not mem.same_contents(a, b)
    mem.copy(b, a)
    assert mem.same_contents(a, b) and mem.table(b)[5] == 1
    mem.table(a)[5] = 0  # an all-zero table reads like no table at all
    c = mem.alloc(Purpose.GUEST_DATA)
    assert mem.same_contents(a, c)


# --- KSM ------------------------------------------------------------------------------------------

def test_ksm_shares_equal_pages_read_only_and_a_write_copies():
    mm, mem, rec = new_mm()
    r = mm.mmap(16 * 4096)
    keep, dup = r.start, r.start + 4096
    pk, pd = mm.populate(keep, tag=5), mm.populate(dup, tag=5)
    assert mm.ksm_merge(keep, dup)
    assert mm.lookup(dup) == pk and mem.mapcount[pk] == 2 and not mem.frame_live(pd)
    assert not mm.host_writable(keep) and not mm.host_writable(dup)
    assert [e[3] for e in rec.events("start")] == ["ksm_merge", "ksm_merge"]
    assert mm.fault_in(dup) == pk  # a read keeps sharing
    new = mm.fault_in(dup, write=True)
    assert new != pk and mm.host_writable(dup) and mem.tag[new] == 5
    assert mem.mapcount[pk] == 1 and mm.stats.cow_copies == 1
    assert rec.events("start")[-1][3] == "cow" and rec.events("start")[-1][4] == pk
    mem.tag[new] = 6  # the write lands in the private copy
    assert mem.tag[pk] == 5
    # The kept page is now mapped once: a write makes it writable in place, no copy.
    assert mm.fault_in(keep, write=True) == pk and mm.stats.cow_reuses == 1
    assert_consistent(mm)


def test_ksm_shares_a_page_at_most_max_page_sharing_times():
    from mmu_core.host.mm import KSM_MAX_PAGE_SHARING

    mm, mem, _ = new_mm()
    r = mm.mmap((KSM_MAX_PAGE_SHARING + 2) * 4096)
    pages = [r.start + 4096 * i for i in range(KSM_MAX_PAGE_SHARING + 1)]
    pk = mm.populate(pages[0], tag=7)
    for hva in pages[1:]:
        mm.populate(hva, tag=7)
    assert all(mm.ksm_merge(pages[0], hva) for hva in pages[1:-1])
    assert int(mem.mapcount[pk]) == KSM_MAX_PAGE_SHARING
    assert not mm.ksm_merge(pages[0], pages[-1])  # full: the page stays its own
    assert mm.lookup(pages[-1]) != pk and int(mem.mapcount[pk]) == KSM_MAX_PAGE_SHARING
    assert_consistent(mm)


def test_ksm_refuses_pages_with_different_contents():
    mm, mem, rec = new_mm()
    r = mm.mmap(16 * 4096)
    mm.populate(r.start, tag=5)
    mm.populate(r.start + 4096, tag=6)
    assert not mm.ksm_merge(r.start, r.start + 4096)
    assert mm.host_writable(r.start + 4096) and rec.log == []
    assert not mm.ksm_merge(r.start, r.start + 8192)  # a missing page is not merged either


def test_ksm_compares_table_contents_too():
    mm, mem, _ = new_mm()
    r = mm.mmap(16 * 4096)
    a, b = mm.populate(r.start), mm.populate(r.start + 4096)
    mem.table(a)[1] = 0x1003
    assert not mm.ksm_merge(r.start, r.start + 4096)
    mem.table(b)[1] = 0x1003
    assert mm.ksm_merge(r.start, r.start + 4096)


def test_dontneed_on_a_merged_duplicate_keeps_the_shared_frame_for_the_other():
    mm, mem, _ = new_mm()
    r = mm.mmap(16 * 4096)
    pk = mm.populate(r.start, tag=9)
    mm.populate(r.start + 4096, tag=9)
    mm.ksm_merge(r.start, r.start + 4096)
    mm.madvise_dontneed(r.start + 4096, 4096)
    assert mem.frame_live(pk) and mem.mapcount[pk] == 1 and mm.lookup(r.start) == pk
    assert mem.tag[pk] == 9
    mm.madvise_dontneed(r.start, 4096)
    assert not mem.frame_live(pk)
    assert_consistent(mm)


def test_three_way_merge_and_unmapping_in_any_order():
    mm, mem, _ = new_mm()
    r = mm.mmap(16 * 4096)
    hvas = [r.start + i * 4096 for i in range(3)]
    for h in hvas:
        mm.populate(h, tag=4)
    assert mm.ksm_merge(hvas[0], hvas[1]) and mm.ksm_merge(hvas[1], hvas[2])
    shared = mm.lookup(hvas[0])
    assert mem.mapcount[shared] == 3 and mm.sharers(hvas[2]) == 3
    assert mem.frames_in_use[Purpose.GUEST_DATA] == 1
    assert_consistent(mm)
    for h in (hvas[1], hvas[0]):
        mm.unmap(h, 4096)
        assert mem.frame_live(shared)
        assert_consistent(mm)
    mm.unmap(hvas[2], 4096)
    assert not mem.frame_live(shared)
    assert_consistent(mm)


def test_ksm_on_a_thp_splits_it_first():
    mm, mem, rec = new_mm()
    r = mm.mmap(MIB2, Backing.THP)
    base = mm.populate(r.start)
    mem.tag[base + 1] = mem.tag[base + 2] = 3
    assert mm.ksm_merge(r.start + 4096, r.start + 2 * 4096)
    assert mm.mapping_level(r.start) == PAGE_4K and mm.stats.thp_splits == 1
    split = rec.events("start")[0]
    assert split[1:4] == (r.start, r.start + MIB2, "thp_split")
    assert mm.lookup(r.start + 2 * 4096) == base + 1
    assert not mem.frame_live(base + 2)
    assert mm.lookup(r.start + 3 * 4096) == base + 3  # the rest stays where it was
    assert_consistent(mm)


def test_ksm_migrate_and_swap_of_a_shared_page_cover_every_sharer():
    mm, mem, rec = new_mm()
    r = mm.mmap(16 * 4096)
    a, b = r.start, r.start + 4096
    mm.populate(a, tag=8)
    mm.populate(b, tag=8)
    mm.ksm_merge(a, b)
    old = mm.lookup(a)
    new = mm.migrate(b)
    assert mm.lookup(a) == mm.lookup(b) == new != old
    assert mem.mapcount[new] == 2 and not mem.frame_live(old) and mem.tag[new] == 8
    assert {e[1] for e in rec.events("start")[-2:]} == {a, b}
    assert_consistent(mm)
    assert mm.swap_out(a)
    assert mm.is_swapped(a) and mm.is_swapped(b) and not mem.frame_live(new)
    assert mm.tag_of(b) == 8
    pa, pb = mm.fault_in(a), mm.fault_in(b, write=True)
    assert pa != pb and mem.tag[pa] == mem.tag[pb] == 8  # back as two private pages
    assert_consistent(mm)


def test_ksm_is_not_offered_on_hugetlbfs():
    mm, _, _ = new_mm()
    r = mm.mmap(1 << 30, Backing.HUGETLB)
    mm.populate(r.start)
    with pytest.raises(UnsupportedHostEvent):
        mm.ksm_merge(r.start, r.start + 4096)


# --- swap ----------------------------------------------------------------------------------------

def test_swap_round_trip_keeps_tag_and_table_and_frees_the_frame_after_the_notifier():
    mm, mem, rec = new_mm()
    r = mm.mmap(16 * 4096)
    hva = r.start + 3 * 4096
    pfn = mm.populate(hva, tag=0xABC)
    mem.table(pfn)[7] = 0x5007
    mem.table(pfn)[511] = 0x8000_0000_0000_0001
    tables = mem.tables_in_use()
    assert mm.swap_out(hva)
    start, end = rec.events("start")[0], rec.events("end")[0]
    assert start[3] == "swap_out" and start[4] == pfn  # still mapped when KVM was told
    assert end[4] == NO_PFN
    assert not mem.frame_live(pfn) and mem.tables_in_use() == tables - 1
    assert mm.is_swapped(hva) and mm.lookup(hva) == NO_PFN and not mm.is_missing(hva)
    assert mm.tag_of(hva) == 0xABC
    swapped = mm.page_contents(hva)
    assert swapped.tag == 0xABC and swapped.table[7] == 0x5007
    assert not mm.swap_out(hva)  # already out
    back = mm.fault_in(hva)
    assert mem.tag[back] == 0xABC
    assert mem.table(back)[7] == 0x5007 and mem.table(back)[511] == 0x8000_0000_0000_0001
    assert not mm.is_swapped(hva) and mm.stats.swap_ins == 1
    assert mm.mapping_level(hva) == PAGE_4K and mm.host_writable(hva)
    present = mm.page_contents(hva)
    assert present.tag == 0xABC and np.array_equal(present.table, swapped.table)
    assert mm.page_contents(r.start) is None
    assert_consistent(mm)


def test_swap_out_of_a_thp_splits_it_and_hugetlb_refuses():
    mm, mem, _ = new_mm()
    r = mm.mmap(MIB2, Backing.THP)
    base = mm.populate(r.start)
    mem.tag[base + 10] = 10
    assert mm.swap_out(r.start + 10 * 4096)
    assert mm.stats.thp_splits == 1 and mm.mapping_level(r.start) == PAGE_4K
    assert mm.tag_of(r.start + 10 * 4096) == 10
    assert mem.frames_in_use[Purpose.GUEST_DATA] == 511
    assert_consistent(mm)
    h = mm.mmap(1 << 30, Backing.HUGETLB)
    mm.populate(h.start)
    with pytest.raises(UnsupportedHostEvent, match="never swapped"):
        mm.swap_out(h.start)
    with pytest.raises(UnsupportedHostEvent):
        mm.split_huge_page(h.start)


def test_dontneed_discards_swap_entries():
    mm, mem, _ = new_mm()
    r = mm.mmap(16 * 4096)
    mm.populate(r.start, tag=1)
    mm.swap_out(r.start)
    mm.madvise_dontneed(r.start, 4096)
    assert mm.is_missing(r.start) and mm.tag_of(r.start) == 0
    assert mem.tag[mm.fault_in(r.start)] == 0
    assert_consistent(mm)


# --- migration, THP split and collapse ------------------------------------------------------

def test_migrate_uses_the_actual_mapping_level_in_a_userfault_thp_region():
    engine = Engine(0)
    mm, mem, rec = new_mm(engine)
    r = mm.mmap(2 * MIB2, Backing.THP)
    uffd = Userfaultfd(engine, mm, r.start, r.size)
    hva = r.start + 5 * 4096
    pfn = uffd.copy(hva, np.array([55], dtype=np.int64))
    assert mm.mapping_level(hva) == PAGE_4K
    new = mm.migrate(hva)
    assert new != pfn and mem.tag[new] == 55 and not mem.frame_live(pfn)
    assert rec.events("start")[0][1:3] == (hva, hva + 4096)
    huge = mm.populate(r.start + MIB2)  # a huge page migrates whole
    moved = mm.migrate(r.start + MIB2 + 4096)
    assert moved - 1 != huge and mm.mapping_level(r.start + MIB2) == PAGE_2M
    assert rec.events("start")[-1][1:3] == (r.start + MIB2, r.start + 2 * MIB2)
    assert_consistent(mm)
    engine.close()


def test_thp_split_keeps_frames_and_notifies_the_whole_huge_page():
    mm, mem, rec = new_mm()
    r = mm.mmap(MIB2, Backing.THP)
    base = mm.populate(r.start)
    assert mm.split_huge_page(r.start + 4096)
    assert (mm.hva_pfn[mm.index(r.start) : mm.index(r.start) + 512] == base + np.arange(512)).all()
    assert mm.mapping_level(r.start + 100 * 4096) == PAGE_4K
    assert rec.events("start") == [("start", r.start, r.start + MIB2, "thp_split", base)]
    assert not mm.split_huge_page(r.start)  # already small
    assert_consistent(mm)


def test_dontneed_of_part_of_a_huge_thp_splits_and_drops_only_that_part():
    mm, mem, _ = new_mm()
    r = mm.mmap(MIB2, Backing.THP)
    base = mm.populate(r.start)
    mem.tag[base + 4] = 44
    assert (mm.stats.populated_huge, mm.stats.populated_4k) == (1, 0)
    mm.madvise_dontneed(r.start + 3 * 4096, 4096)
    assert mm.is_missing(r.start + 3 * 4096)
    assert mm.tag_of(r.start + 4 * 4096) == 44
    assert mem.frames_in_use[Purpose.GUEST_DATA] == 511 and mm.stats.unmapped_pages == 1
    assert_consistent(mm)


def test_first_touch_next_to_small_pages_in_a_thp_region_maps_a_small_page():
    mm, mem, _ = new_mm()
    r = mm.mmap(MIB2, Backing.THP)
    mm.populate(r.start, level=PAGE_4K)
    pfn = mm.fault_in(r.start + 4096)
    assert mm.mapping_level(r.start + 4096) == PAGE_4K and mm.lookup(r.start) != NO_PFN
    assert mem.frames_in_use[Purpose.GUEST_DATA] == 2 and mem.frame_live(pfn)
    with pytest.raises(HostStateError, match="orphan|mapped or swapped"):
        mm.populate(r.start, level=PAGE_2M)


def test_collapse_copies_present_and_swapped_pages_and_zero_fills_missing_ones():
    mm, mem, rec = new_mm()
    r = mm.mmap(MIB2, Backing.THP)
    base = mm.populate(r.start)
    mem.tag[base + 1] = 11
    mem.tag[base + 2] = 22
    mem.table(base + 3)[0] = 0x33
    mm.split_huge_page(r.start)
    mm.swap_out(r.start + 2 * 4096)
    mm.madvise_dontneed(r.start + 5 * 4096, 4096)
    assert mm.collapse_huge_page(r.start + 7 * 4096)
    huge = mm.lookup(r.start)
    assert mm.mapping_level(r.start) == PAGE_2M and mem.is_allocated(huge)
    assert [mm.tag_of(r.start + i * 4096) for i in range(6)] == [0, 11, 22, 0, 0, 0]
    assert mem.table(huge + 3)[0] == 0x33
    assert not mm.is_swapped(r.start + 2 * 4096)
    assert rec.events("start")[-1][1:4] == (r.start, r.start + MIB2, "thp_collapse")
    assert mem.frames_in_use[Purpose.GUEST_DATA] == 512
    assert not mm.collapse_huge_page(r.start)  # already huge
    assert_consistent(mm)


def test_collapse_refuses_shared_pages_and_missing_pages_under_userfault():
    engine = Engine(0)
    mm, mem, _ = new_mm(engine)
    r = mm.mmap(2 * MIB2, Backing.THP)
    mm.populate(r.start, tag=1, level=PAGE_4K)
    mm.populate(r.start + 4096, tag=1, level=PAGE_4K)
    mm.ksm_merge(r.start, r.start + 4096)
    assert not mm.collapse_huge_page(r.start)
    Userfaultfd(engine, mm, r.start + MIB2, MIB2)
    mm.populate(r.start + MIB2, tag=2, level=PAGE_4K)
    assert not mm.collapse_huge_page(r.start + MIB2)
    anon = mm.mmap(MIB2)
    with pytest.raises(UnsupportedHostEvent):
        mm.collapse_huge_page(anon.start)
    assert_consistent(mm)
    engine.close()


# --- inside the engine ------------------------------------------------------------------------

def test_events_in_tasks_serialise_charge_time_and_free_only_after_the_notifier():
    cost = CostModel()
    engine = Engine(0, cost)
    mm, mem, rec = new_mm(engine)
    rec.engine, rec.switch_ns = engine, 700  # notifiers switch, as a zap taking the MMU lock
    r = mm.mmap(MIB2, Backing.THP)
    base = mm.populate(r.start)
    mem.tag[base + 1] = mem.tag[base + 2] = 6
    done = {}

    def host(name, fn, *args):
        t0 = engine.now
        done[name] = (fn(*args), engine.now - t0)

    engine.spawn("split", host, "split", mm.split_huge_page, r.start)
    engine.spawn("swap", host, "swap", mm.swap_out, r.start + 3 * 4096)
    engine.spawn("ksm", host, "ksm", mm.ksm_merge, r.start + 4096, r.start + 2 * 4096)
    engine.run()
    assert done["split"][0] and done["swap"][0] and done["ksm"][0]
    # One event at a time: each event's windows all end before the next event starts (KSM
    # opens two, one per page), and ends come in the order of their starts.
    runs = []
    for kind, start, _end, event, _pfn in rec.log:
        if not runs or runs[-1][0] != event:
            runs.append((event, []))
        runs[-1][1].append((kind, start))
    assert [event for event, _ in runs] == ["thp_split", "swap_out", "ksm_merge"]
    for _, log in runs:
        starts = [s for k, s in log if k == "start"]
        assert log == [("start", s) for s in starts] + [("end", s) for s in starts]
    assert done["split"][1] >= cost.thp_split + 700
    assert done["swap"][1] >= cost.swap_out + 700
    # Frames were still mapped when each start ran; swap-out freed its frame afterwards.
    swap_start = next(e for e in rec.log if e[0] == "start" and e[3] == "swap_out")
    assert swap_start[4] == base + 3 and not mem.frame_live(base + 3)
    assert_consistent(mm)
    engine.close()


def test_concurrent_write_faults_on_a_shared_page_copy_once_each():
    engine = Engine(0)
    mm, mem, rec = new_mm(engine)
    rec.engine, rec.switch_ns = engine, 500
    r = mm.mmap(16 * 4096)
    hvas = [r.start + i * 4096 for i in range(3)]
    for h in hvas:
        mm.populate(h, tag=2)
    mm.ksm_merge(hvas[0], hvas[1])
    mm.ksm_merge(hvas[0], hvas[2])
    got = {}

    def writer(h):
        got[h] = mm.fault_in(h, write=True)

    for h in hvas:
        engine.spawn(f"w{h:x}", writer, h)
    engine.run()
    assert len(set(got.values())) == 3 and all(mm.host_writable(h) for h in hvas)
    assert mm.stats.cow_copies == 2 and mm.stats.cow_reuses == 1
    assert all(mem.tag[p] == 2 for p in got.values())
    assert_consistent(mm)
    engine.close()


def test_a_swapped_page_is_read_back_once_by_racing_faults_and_costs_swap_in():
    cost = CostModel()
    engine = Engine(0, cost)
    mm, mem, _ = new_mm(engine)
    r = mm.mmap(16 * 4096)
    mm.populate(r.start, tag=31)
    mm.swap_out(r.start)
    got = []

    def reader():
        t0 = engine.now
        got.append((mm.fault_in(r.start), engine.now - t0))

    engine.spawn("a", reader)
    engine.spawn("b", reader)
    engine.run()
    assert got[0][0] == got[1][0] and mem.tag[got[0][0]] == 31
    assert mm.stats.swap_ins == 1 and all(dt == cost.swap_in for _, dt in got)
    assert_consistent(mm)
    engine.close()


def test_userfault_waiter_reports_again_when_the_copied_page_was_dropped_before_it_ran():
    # One host CPU: the waiter UFFDIO_COPY wakes cannot run before the handler sleeps again
    engine = Engine(0, host_cpus=1)
    mm, mem, _ = new_mm(engine)
    r = mm.mmap(16 * 4096)
    uffd = Userfaultfd(engine, mm, r.start, r.size)
    seen = []

    def handler():
        for n in range(2):
            msg = uffd.read()
            seen.append(msg.hva)
            uffd.copy(msg.hva, np.array([100 + n], dtype=np.int64))
            if n == 0:
                mm.madvise_dontneed(msg.hva, 4096)  # gone again before the waiter runs

    def vcpu():
        while mm.fault_in(r.start) == NO_PFN:
            uffd.wait_for(r.start, False)
        seen.append(int(mem.tag[mm.lookup(r.start)]))

    engine.spawn("uffd", handler, daemon=True)
    engine.spawn("vcpu", vcpu)
    engine.run()
    assert seen == [r.start, r.start, 101]
    engine.close()


def test_event_lock_held_by_a_parked_task_is_an_error_outside_the_engine():
    engine = Engine(0)
    mm, mem, rec = new_mm(engine)
    rec.engine, rec.switch_ns = engine, 1_000
    r = mm.mmap(16 * 4096)
    mm.populate(r.start)
    engine.spawn("migrate", mm.migrate, r.start)
    engine.run(until=500)  # parked inside the notifier, holding the lock
    with pytest.raises(RuntimeError, match="parked task"):
        mm.swap_out(r.start)
    engine.run()
    assert mm.stats.migrations == 1
    assert_consistent(mm)
    engine.close()


def test_hugetlb_pages_unmap_whole():
    mm, mem, _ = new_mm()
    r = mm.mmap(1 << 30, Backing.HUGETLB)
    mm.populate(r.start)
    assert mm.mapping_level(r.start) == PAGE_1G
    mm.madvise_dontneed(r.start + 4096, 4096)
    assert mm.is_missing(r.start) and mem.frames_in_use[Purpose.GUEST_DATA] == 0
    assert_consistent(mm)
