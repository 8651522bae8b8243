"""The host model's contention: the mmap lock in get_user_pages and UFFDIO_COPY, a shared
userfaultfd's thundering herd, and what the report says about on-CPU time (docs/engine.md)."""

import numpy as np
import pytest

from mmu_core.host.memory import HostMemory
from mmu_core.host.mm import NO_PFN, HostMM
from mmu_core.host.userfault import Userfaultfd
from mmu_core.params import CONFIGURATIONS
from mmu_core.sim import Engine
from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging


def new_mm(engine):
    mem = HostMemory()
    return HostMM(mem, engine), mem


def test_gup_fast_takes_no_mmap_lock_and_the_slow_path_drops_it_while_waiting_for_a_userfault():
    engine = Engine(0)
    mm, _ = new_mm(engine)
    r = mm.mmap(4 * 4096)
    present = r.start
    mm.populate(present)
    uffd = Userfaultfd(engine, mm, r.start + 4096, 3 * 4096)
    held_while_waiting = []

    def handler():
        msg = uffd.read()
        # The faulting task sleeps in handle_userfault without the mmap lock.
        held_while_waiting.append(mm.mmap_lock.readers)
        uffd.copy(msg.hva, np.array([7], dtype=np.int64))

    def vcpu():
        assert mm.get_user_pages(present, False) != NO_PFN
        assert mm.mmap_lock.line.owner is None  # GUP-fast touched nothing
        assert mm.get_user_pages(r.start + 4096, True) != NO_PFN

    engine.spawn("uffd", handler, daemon=True)
    engine.spawn("vcpu", vcpu)
    engine.run()
    assert held_while_waiting == [0]
    assert mm.mmap_lock.readers == 0 and not mm.mmap_lock.writer
    # The vCPU and the handler took the line from each other: slow path, copy, retry.
    assert mm.mmap_lock.line.transfers >= 2
    engine.close()


def test_munmap_sleeps_off_its_cpu_until_a_reader_of_the_mmap_lock_is_done():
    engine = Engine(0, host_cpus=2)
    mm, _ = new_mm(engine)
    r = mm.mmap(2 * 4096)
    mm.populate(r.start)
    order = []

    def reader():
        with mm.mmap_lock.read():
            engine.delay(10_000)
            order.append("reader done")

    def unmapper():
        engine.delay(10)
        mm.unmap(r.start, 4096)  # munmap: the mmap lock for write
        order.append("unmapped")

    def other():
        order.append("other ran")

    engine.spawn("reader", reader)
    engine.spawn("unmapper", unmapper)
    engine.spawn("other", other)  # no CPU free until the unmapper sleeps
    engine.run()
    assert order == ["other ran", "reader done", "unmapped"]
    assert mm.mmap_lock.contended == 1
    engine.close()


def test_a_fault_on_a_shared_uffd_wakes_every_polling_reader_and_one_gets_it():
    engine = Engine(0)
    mm, mem = new_mm(engine)
    r = mm.mmap(8 * 4096)
    uffd = Userfaultfd(engine, mm, r.start, r.size)
    got = []

    def reader(k):
        while True:
            msg = uffd.read()
            got.append(k)
            uffd.copy(msg.hva, np.array([40 + k], dtype=np.int64))

    def vcpu():
        engine.delay(10_000)  # every reader is asleep in poll() by now
        while mm.fault_in(r.start) == NO_PFN:
            uffd.wait_for(r.start, False)

    for k in range(4):
        engine.spawn(f"uffd.{k}", reader, k, daemon=True)
    engine.spawn("vcpu", vcpu)
    engine.run()
    assert len(got) == 1 and uffd.copies == 1
    assert uffd.empty_reads == 3  # the herd: three woke for nothing
    assert int(mem.tag[mm.lookup(r.start)]) == 40 + got[0]
    engine.close()


def _rate(vcpus: int, shared: bool) -> float:
    opts = DemandPagingOptions(vcpus=vcpus, bytes_per_vcpu=16 << 12, seed=1, uffd_shared=shared)
    report = run_demand_paging(opts, CONFIGURATIONS["tdp"])
    assert report.verified
    return report.pages_per_sec


def test_a_shared_uffd_scales_up_then_down_while_one_uffd_per_vcpu_keeps_scaling():
    # The shape of the 2023 measurements (docs/engine.md): with one uffd and a reader per
    # vCPU the paging rate first rises with vCPUs, then falls as the wait-queue work under
    # the uffd's lock grows with them.
    shared = {v: _rate(v, True) for v in (1, 8, 64)}
    assert shared[8] > 2 * shared[1]
    assert shared[64] < shared[8] / 2
    assert _rate(64, False) > 3 * shared[64]


@pytest.mark.parametrize("configuration", ["tdp", "legacy"])
def test_the_report_puts_lock_wait_against_on_cpu_time(configuration):
    opts = DemandPagingOptions(vcpus=16, bytes_per_vcpu=16 << 12, seed=2, uffd=False)
    r = run_demand_paging(opts, CONFIGURATIONS[configuration])
    h = r.host
    assert h.host_cpus == 448 and h.runqueue_ns == 0  # 16 vCPUs fit
    # vCPUs spin for the MMU lock on their CPU, so its wait is part of on-CPU time, and the
    # share of on-CPU time is at least the share of all their time.
    assert 0 < r.time.lock_wait_ns <= h.vcpu_on_cpu_ns <= r.time.total_ns
    assert h.lock_wait_share_on_cpu >= r.lock_wait_share
    assert h.vcpu_on_cpu_ns <= h.all_on_cpu_ns
    assert h.mmu_lock_transfers > 0 and h.mmap_lock_transfers > 0


def test_too_few_host_cpus_queue_the_vcpus_and_nothing_else_changes():
    opts = dict(vcpus=8, bytes_per_vcpu=16 << 12, seed=3)
    wide = run_demand_paging(DemandPagingOptions(**opts), CONFIGURATIONS["tdp"])
    narrow = run_demand_paging(DemandPagingOptions(**opts, host_cpus=2), CONFIGURATIONS["tdp"])
    assert narrow.digest == wide.digest
    assert narrow.host.runqueue_ns > 0 and wide.host.runqueue_ns == 0
    assert narrow.total_time_ns > wide.total_time_ns
    assert narrow.host.all_on_cpu_ns <= 2 * narrow.total_time_ns


def test_userfault_lookup_finds_the_right_range_among_many_and_refuses_overlaps():
    from mmu_core.errors import HostStateError

    engine = Engine(0)
    mm, _ = new_mm(engine)
    r = mm.mmap(64 * 4096)
    uffds = [Userfaultfd(engine, mm, r.start + k * 4 * 4096, 4 * 4096) for k in (3, 0, 9, 5)]
    for k, u in zip((3, 0, 9, 5), uffds, strict=True):
        for page in range(4):
            assert mm.userfault_of(r.start + (4 * k + page) * 4096 + 7) is u
    assert mm.userfault_of(r.start + 4 * 4 * 4096) is None  # between registrations
    assert mm.region_of(r.start + 63 * 4096) is r
    with pytest.raises(HostStateError, match="EBUSY"):
        Userfaultfd(engine, mm, r.start + 10 * 4096, 4 * 4096)  # pages 10-13: overlaps 12-15
    engine.close()


@pytest.mark.parametrize(("configuration", "gives_back"), [("legacy", True), ("tdp", False)])
def test_the_hosts_shrinker_reaches_the_mmu(configuration, gives_back):
    from mmu_core.config import VMConfig
    from mmu_core.guest.machine import DATA_GPA, MachineSpec, build_machine
    from mmu_core.guest.program import Program
    from mmu_core.testing.audit import audit

    m = build_machine(MachineSpec(vcpus=1, data_size=8 * 512 * 4096),
                      VMConfig(params=CONFIGURATIONS[configuration]))
    try:
        prog = Program()
        for region in range(8):  # eight last-level tables, none of them a root
            prog.read(DATA_GPA + region * (2 << 20))
        m.run_programs([prog.build()])
        before = m.vm.memory().page_table_pages
        freed = m.vm.mm.shrink_slab(4)
        assert m.vm.mm.stats.slab_shrinks == 1 and m.vm.mm.stats.slab_freed == freed
        if gives_back:  # KVM's MMU shrinker zaps the oldest pages no vCPU holds as a root
            assert 0 < freed <= 4 and m.vm.memory().page_table_pages == before - freed
        else:  # the TDP MMU keeps no cache of pages to give back
            assert freed == 0 and m.vm.memory().page_table_pages == before
        assert audit(m.vm) == []
        with pytest.raises(Exception, match="nr_to_scan"):
            m.vm.mm.shrink_slab(0)
    finally:
        m.vm.destroy()
    assert m.vm._shrink not in m.vm.mm.shrinkers
