"""Host events reach the MMU through notifiers; teardown returns every page-table page.

Contents-preserving events (migration, swap out and in, KSM of equal pages, THP split and
collapse) must be invisible to the guest in every configuration: each guest read returns the
value the guest last wrote there, writes after a KSM merge stay private, the host leaks no
frame (HostMM.audit) and teardown frees every page-table page.
"""

import numpy as np
import pytest
from parity_util import data_gva, spec_for

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import DATA_SLOT, PT_SLOT, MachineSpec, build_machine, page_patterns
from mmu_core.guest.program import Program
from mmu_core.host import PAGE_2M, PAGE_4K
from mmu_core.hw import cpu as C
from mmu_core.params import CONFIGURATIONS
from mmu_core.sim import CostModel
from mmu_core.testing.parity import guest_digest

MIB2 = 2 << 20


def machine_for(name, backing="anon", data_size=None, userfault=False, seed=0, policy="fifo",
                cost=None):
    if backing == "anon" and data_size is None and not userfault:
        spec = spec_for(P.MODE_4LEVEL)
    else:
        spec = MachineSpec(vcpus=1, data_size=data_size or MIB2, backing=backing,
                           mode=P.MODE_4LEVEL, userfault=userfault)
    config = VMConfig(params=CONFIGURATIONS[name], seed=seed, policy=policy,
                      cost=cost or CostModel())
    return build_machine(spec, config)


def hva_of(machine, page):
    slot = machine.vm.memslots[0].by_id(DATA_SLOT)
    return slot.userspace_addr + page * 4096


def run(machine, prog):
    return machine.run_programs([prog.build()])[0]


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_unmapped_page_faults_again_and_reads_a_fresh_zero_page(name):
    m = machine_for(name)
    try:
        run(m, Program().write(data_gva(2), 41).read(data_gva(2)))
        exits_before = sum(v.exits.get("ept_violation", 0) + v.exits.get("shadow_pf", 0)
                           for v in m.vm.vcpus)
        m.vm.mm.madvise_dontneed(hva_of(m, 2), 4096)
        res = run(m, Program().read(data_gva(2)))
        exits_after = sum(v.exits.get("ept_violation", 0) + v.exits.get("shadow_pf", 0)
                          for v in m.vm.vcpus)
        assert res[0, C.RES_VALUE] == 0
        assert exits_after == exits_before + 1
        assert m.vm.mm.stats.notifier_calls["madvise_dontneed"] == 1
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_migrated_page_keeps_its_contents_at_a_new_frame(name):
    m = machine_for(name)
    try:
        run(m, Program().write(data_gva(3), 99))
        old = m.vm.mm.lookup(hva_of(m, 3))
        new = m.vm.mm.migrate(hva_of(m, 3))
        res = run(m, Program().read(data_gva(3)))
        assert new != old
        assert res[0, C.RES_VALUE] == 99
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_ksm_does_not_merge_pages_with_different_contents(name):
    m = machine_for(name)
    try:
        run(m, Program().write(data_gva(4), 5).write(data_gva(5), 6).read(data_gva(5)))
        assert not m.vm.mm.ksm_merge(hva_of(m, 4), hva_of(m, 5))
        res = run(m, Program().read(data_gva(4)).read(data_gva(5)))
        assert res[:, C.RES_VALUE].tolist() == [5, 6]
    finally:
        m.vm.destroy()


def test_aging_without_an_age_hook_reports_every_page_young():
    m = machine_for("legacy")
    try:
        run(m, Program().read(data_gva(0)))
        assert m.vm.mm.age(hva_of(m, 0), 4 * 4096) == 1  # the shadow MMU ages its rmaps
        # Every in-tree backend has mmu_age_gfn_range now: take it away for the core's rule.
        m.vm._age_gfn_range = None
        assert m.vm.mm.age(hva_of(m, 0), 4 * 4096) == 4
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_teardown_returns_every_page_table_page(name):
    m = machine_for(name)
    run(m, Program().read(data_gva(0)).write(data_gva(9), 1).read(0xF000_0000))
    assert m.vm.pt_pages_in_use() > 0
    m.vm.destroy()
    assert m.vm.pt_pages_in_use() == 0


def test_zap_all_forces_reload_and_refault_with_same_data():
    m = machine_for("tdp")
    try:
        run(m, Program().write(data_gva(1), 8))
        m.vm.zap_all()
        res = run(m, Program().read(data_gva(1)))
        assert res[0, C.RES_VALUE] == 8
    finally:
        m.vm.destroy()


# --- contents-preserving events --------------------------------------------------------------

def expected_reads(rows, memory=None):
    """The value each read of a single-vCPU program must return: the last value written to
    that page before it (program order), else memory.get(page, 0)."""
    mem = dict(memory or {})
    out = []
    for k, (op, gva, value) in enumerate(rows):
        if op == C.OP_WRITE:
            mem[gva >> 12] = value
        elif op == C.OP_READ:
            out.append((k, mem.get(gva >> 12, 0)))
    return mem, out


def run_checked(m, prog, memory):
    """Run prog; assert every read against the reference; return the updated reference."""
    memory, reads = expected_reads(prog.rows, memory)
    res = run(m, prog)
    rows = [k for k, _ in reads]
    assert res[rows, C.RES_VALUE].tolist() == [v for _, v in reads]
    assert not res[:, C.RES_VECTOR].any()  # no #PF reached the guest
    return memory


def assert_host_consistent(m):
    assert m.vm.mm.audit() == []


def value(page, rnd=0):
    return 1000 * (rnd + 1) + page


def _migrate(m):
    old = m.vm.mm.lookup(hva_of(m, 1))
    assert m.vm.mm.migrate(hva_of(m, 1)) not in (old, -1)


def _swap(m):
    assert m.vm.mm.swap_out(hva_of(m, 1))
    assert m.vm.mm.is_swapped(hva_of(m, 1))


def _ksm(m):
    assert m.vm.mm.ksm_merge(hva_of(m, 2), hva_of(m, 3))
    assert m.vm.mm.lookup(hva_of(m, 2)) == m.vm.mm.lookup(hva_of(m, 3))


def _split(m):
    assert m.vm.mm.split_huge_page(hva_of(m, 0))
    assert m.vm.mm.mapping_level(hva_of(m, 0)) == PAGE_4K


def _collapse(m):
    mm = m.vm.mm
    assert mm.split_huge_page(hva_of(m, 0))
    assert mm.swap_out(hva_of(m, 5))
    assert mm.collapse_huge_page(hva_of(m, 0))
    assert mm.mapping_level(hva_of(m, 5)) == PAGE_2M


EVENTS = {
    ("anon", "migrate"): _migrate,
    ("anon", "swap"): _swap,
    ("anon", "ksm"): _ksm,
    ("thp", "migrate"): _migrate,
    ("thp", "swap"): _swap,
    ("thp", "ksm"): _ksm,
    ("thp", "split"): _split,
    ("thp", "collapse"): _collapse,
}


@pytest.mark.parametrize("backing,event", list(EVENTS))
@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_contents_preserving_event_is_invisible_to_the_guest(name, backing, event):
    m = machine_for(name, backing=backing)
    try:
        mem = {}
        setup = Program()
        for p in range(8):
            setup.write(data_gva(p), value(3 if p == 2 else p))  # pages 2 and 3 are equal
        for p in range(8):
            setup.read(data_gva(p))
        mem = run_checked(m, setup, mem)
        EVENTS[backing, event](m)
        assert_host_consistent(m)
        after = Program()
        for p in range(8):
            after.read(data_gva(p))
        after.write(data_gva(3), 77).read(data_gva(2)).read(data_gva(3))
        after.write(data_gva(1), 78).read(data_gva(1))
        for p in range(8):
            after.read(data_gva(p))
        run_checked(m, after, mem)
        if event == "ksm":
            assert m.vm.mm.stats.cow_copies == 1  # the write to page 3 got its own copy
            assert m.vm.mm.lookup(hva_of(m, 2)) != m.vm.mm.lookup(hva_of(m, 3))
        assert_host_consistent(m)
    finally:
        m.vm.destroy()
    assert m.vm.pt_pages_in_use() == 0


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_swapping_out_every_page_including_guest_page_tables_is_invisible(name):
    m = machine_for(name)
    try:
        prog = Program()
        for p in range(16):
            prog.write(data_gva(p), value(p))
        mem = run_checked(m, prog, {})
        mm = m.vm.mm
        tables = swapped = 0
        for slot_id in (PT_SLOT, DATA_SLOT):
            slot = m.vm.memslots[0].by_id(slot_id)
            for k in range(slot.npages):
                hva = slot.userspace_addr + 4096 * k
                pfn = mm.lookup(hva)
                if pfn != -1:
                    tables += m.vm.host.has_table(pfn)
                    assert mm.swap_out(hva)
                    swapped += 1
        assert tables >= 4  # the guest's PML4, PDPT, PD and PT went to swap with the data
        assert mm.stats.swap_outs == swapped >= 16 + 4
        assert_host_consistent(m)
        prog = Program()
        for p in range(16):
            prog.read(data_gva(p))
        prog.write(data_gva(4), 5).read(data_gva(4))
        run_checked(m, prog, mem)
        assert mm.stats.swap_ins >= 16 + 4
        assert_host_consistent(m)
    finally:
        m.vm.destroy()
    assert m.vm.pt_pages_in_use() == 0


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_dontneed_of_a_ksm_duplicate_leaves_the_kept_page_intact(name):
    m = machine_for(name)
    try:
        prog = Program().write(data_gva(2), 9).write(data_gva(3), 9).read(data_gva(3))
        run(m, prog)
        kept = m.vm.mm.lookup(hva_of(m, 2))
        assert m.vm.mm.ksm_merge(hva_of(m, 2), hva_of(m, 3))
        res = run(m, Program().read(data_gva(3)).read(data_gva(2)))
        assert res[:, C.RES_VALUE].tolist() == [9, 9]
        m.vm.mm.madvise_dontneed(hva_of(m, 3), 4096)
        assert m.vm.host.frame_live(kept) and m.vm.host.mapcount[kept] == 1
        res = run(m, Program().read(data_gva(2)).read(data_gva(3)).write(data_gva(2), 10)
                  .read(data_gva(2)))
        assert res[:, C.RES_VALUE].tolist() == [9, 0, 0, 10]
        assert m.vm.mm.stats.cow_reuses == 1  # the kept page, mapped once again, is reused
        assert_host_consistent(m)
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_migrate_in_the_thp_userfault_layout(name):
    m = machine_for(name, backing="thp", userfault=True)
    try:
        m.spawn_uffd_handlers()
        prog = Program()
        for p in (0, 3, 7):
            prog.read(data_gva(p))
        res = run(m, prog)
        gfns = np.array([(data_gva(p) >> 12) for p in (0, 3, 7)], dtype=np.int64)
        assert res[[0, 1, 2], C.RES_VALUE].tolist() == page_patterns(gfns).tolist()
        assert m.vm.mm.mapping_level(hva_of(m, 3)) == PAGE_4K
        old = m.vm.mm.lookup(hva_of(m, 3))
        new = m.vm.mm.migrate(hva_of(m, 3))
        assert new not in (old, -1) and not m.vm.host.frame_live(old)
        assert run(m, prog)[[0, 1, 2], C.RES_VALUE].tolist() == page_patterns(gfns).tolist()
        assert_host_consistent(m)
    finally:
        m.vm.destroy()


def _host_events(m, rounds, gap_ns):
    """A host task: content-preserving events on the data pages, while the vCPU runs."""
    mm, engine = m.vm.mm, m.vm.engine
    for _ in range(rounds):
        engine.delay(gap_ns)
        mm.split_huge_page(hva_of(m, 0))
        engine.delay(gap_ns)
        mm.migrate(hva_of(m, 1))
        mm.swap_out(hva_of(m, 2))
        engine.delay(gap_ns)
        mm.ksm_merge(hva_of(m, 4), hva_of(m, 5))  # equal unless a write is half done
        engine.delay(gap_ns)
        mm.swap_out(hva_of(m, 5))
        mm.collapse_huge_page(hva_of(m, 0))
        engine.delay(gap_ns)
        mm.migrate(hva_of(m, 6))
        assert mm.audit() == []


@pytest.mark.parametrize("seed,policy", [(0, "fifo"), (1, "random"), (2, "random")])
@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_host_events_in_a_task_racing_a_vcpu_are_invisible(name, seed, policy):
    # Slower guest accesses stretch the program over the host's events without a huge trace.
    m = machine_for(name, backing="thp", seed=seed, policy=policy,
                    cost=CostModel(guest_access=20))
    try:
        prog = Program()
        for rnd in range(150):
            for p in range(8):
                prog.write(data_gva(p), value(4 if p == 5 else p, rnd))  # 4 and 5 equal
            for _ in range(60):  # guest time between rounds, so that events land mid-run
                for p in range(8):
                    prog.read(data_gva(p))
        host = m.vm.engine.spawn("host", _host_events, m, 3, 20_000)
        run_checked(m, prog, {})
        vcpu = m.vm.vcpus[0].task
        assert host.finished and host.end < vcpu.end  # the events really ran mid-program
        stats = m.vm.mm.stats
        assert stats.thp_splits >= 3 and stats.thp_collapses >= 1 and stats.swap_ins >= 1
        assert stats.migrations >= 3 and stats.ksm_merges >= 1 and stats.cow_copies >= 1
        assert_host_consistent(m)
    finally:
        m.vm.destroy()
    assert m.vm.pt_pages_in_use() == 0


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_the_guest_digest_does_not_change_when_pages_go_to_swap(name):
    m = machine_for(name)
    try:
        results = [run(m, Program().write(data_gva(1), 7).write(data_gva(2), 9).read(data_gva(1)))]
        before = guest_digest(m.vm, results)
        for page in (1, 2):
            assert m.vm.mm.swap_out(hva_of(m, page))
        assert guest_digest(m.vm, results) == before
        m.vm.mm.madvise_dontneed(hva_of(m, 2), 4096)  # contents really gone: it must show
        assert guest_digest(m.vm, results) != before
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_an_emulated_store_into_a_ksm_page_copies_it_first(name):
    # The emulator writes guest memory itself (tracked guest tables, MMIO checks): into a
    # page KSM shares it must take the write fault, or the other page changes too.
    m = machine_for(name)
    try:
        run(m, Program().write(data_gva(4), 5).write(data_gva(5), 5))
        assert m.vm.mm.ksm_merge(hva_of(m, 4), hva_of(m, 5))
        prog = Program().write(data_gva(5), 42).build()
        results = np.zeros((1, C.RES_COLS), dtype=np.int64)
        assert m.vm.vcpus[0].emulate(prog, 0, results) == 1
        assert m.vm.mm.tag_of(hva_of(m, 5)) == 42
        assert m.vm.mm.tag_of(hva_of(m, 4)) == 5
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_the_digest_taken_in_chunks_is_the_digest_of_the_whole_slot(monkeypatch, chunk):
    # The seed's scale hashes memslots of 436 M pages a few million at a time; the bytes fed
    # to sha256 must be those of one pass (a slot of 512 pages is one chunk by default):
    # swapped-out pages, page-table pages and excluded gfns across chunk boundaries.
    from mmu_core.testing import parity

    m = machine_for("legacy", data_size=MIB2)
    try:
        prog = Program()
        for p in range(8):
            prog.write(data_gva(p), p + 1)
        res = m.run_programs([prog.build()])
        m.vm.mm.swap_out(hva_of(m, 3))
        data = m.vm.memslots[0].by_id(DATA_SLOT)
        exclude = frozenset({data.base_gfn + 1, data.base_gfn + 5})
        whole = [parity.guest_digest(m.vm, res), parity.guest_digest(m.vm, res, exclude)]
        monkeypatch.setattr(parity, "DIGEST_CHUNK", chunk)
        assert [parity.guest_digest(m.vm, res), parity.guest_digest(m.vm, res, exclude)] == whole
        assert whole[0] != whole[1]
    finally:
        m.vm.destroy()
