"""The demand-paging workload end to end, on each configuration, under each schedule policy,
and interrupted at any switch point."""

import gc
import signal
import weakref

import pytest
from parity_util import distinct_digests

import mmu_core.workloads.demand_paging as dp
from mmu_core.params import CONFIGURATIONS
from mmu_core.sim.cost import CostModel
from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging


@pytest.fixture(scope="module")
def reports():
    opts = DemandPagingOptions(vcpus=4, bytes_per_vcpu=1 << 20, seed=3)
    return {name: run_demand_paging(opts, p) for name, p in CONFIGURATIONS.items()}


def test_every_page_is_verified_in_every_configuration(reports):
    for r in reports.values():
        assert (r.verified, r.mismatches, r.pages) == (True, 0, 4 * 256)


def test_configurations_are_indistinguishable_to_the_guest(reports):
    assert len(distinct_digests(reports.values())) == 1


def test_time_categories_add_up_per_vcpu(reports):
    for r in reports.values():
        for v in r.per_vcpu:
            t = v.time
            parts = (t.guest_ns + t.walk_ns + t.exit_ns + t.lock_wait_ns + t.lock_held_ns
                     + t.gup_ns + t.tlb_flush_ns + t.other_ns)
            assert parts == t.total_ns == v.time_ns


def test_tdp_metadata_is_nil_while_legacy_and_shadow_report_rmap_and_structs(reports):
    tdp, legacy, shadow = reports["tdp"], reports["legacy"], reports["shadow"]
    assert (tdp.memory.rmap_bytes, tdp.memory.mmu_page_structs) == (0, 0)
    assert tdp.memory.page_table_pages > 0
    for r in (legacy, shadow):
        assert r.memory.rmap_bytes > 0 and r.memory.mmu_page_structs > 0


def test_the_whole_test_adds_the_fixed_phases_and_legacy_pays_for_its_rmaps(reports):
    # The seed's lazily allocated rmap: the TDP MMU allocates none with the memslot; the
    # legacy MMU zeroes one 8-byte head per page and level when the slot is created.
    cost = CostModel()
    for r in reports.values():
        f = r.fixed
        assert f.vm_create_ns == cost.vm_create and f.vcpu_create_ns == 4 * cost.vcpu_create
        assert f.threads_ns == (4 + 4) * cost.thread_start_join  # vCPUs and uffd handlers
        assert f.total_ns == f.vm_create_ns + f.vcpu_create_ns + f.memslot_create_ns \
            + f.threads_ns
        assert r.test_time_ns == f.total_ns + r.total_time_ns
    tdp, legacy = reports["tdp"], reports["legacy"]
    rmap_pages = -(-legacy.memory.rmap_bytes // 4096)
    assert rmap_pages >= 1024 * 8 // 4096
    assert legacy.fixed.memslot_create_ns - tdp.fixed.memslot_create_ns \
        == rmap_pages * cost.host_page_alloc


def test_backend_statistics_agree_with_the_faults_the_core_counted(reports):
    for name, r in reports.items():
        st = r.backend_stats
        assert st is not None, name
        # One backend serves the VM's role and every fault reached its mmu_page_fault.
        assert st.faults == sum(r.faults.values()), name
        assert st.retries == r.faults.get("retry", 0), name
        assert r.mappings_by_level == {"4K": st.mapped_4k, "2M": st.mapped_2m,
                                       "1G": st.mapped_1g}
    # Under TDP every fixed fault installed exactly one leaf (anon memory: 4 KiB leaves).
    tdp = reports["tdp"]
    assert tdp.backend_stats.mapped_4k == tdp.faults["fixed"] >= 4 * 256


def test_a_backend_whose_mmu_stats_is_not_mmu_stats_is_named():
    from mmu_core import BackendInfo, Role, hookimpl, register_backend
    from mmu_core.errors import BackendError
    from mmu_core.params import configuration
    from mmu_core.plugins import unregister_backend
    from mmu_tdp import TdpMMU

    class DictStats(TdpMMU):
        @staticmethod
        @hookimpl
        def mmu_backend_info():
            return BackendInfo("dictstats", "0", (Role.DIRECT,), "test",
                               TdpMMU.mmu_backend_info().capabilities)

        @hookimpl
        def mmu_stats(self, vm):
            return {"mapped": [0, 1, 0, 0]}  # what the report used to read

    register_backend(DictStats)
    try:
        with pytest.raises(BackendError, match="'dictstats': mmu_stats returned dict, not "
                                               "MMUStats"):
            run_demand_paging(DemandPagingOptions(bytes_per_vcpu=64 << 10),
                              configuration("dictstats"))
    finally:
        unregister_backend("dictstats")


def test_same_seed_same_report_figures():
    opts = DemandPagingOptions(vcpus=3, bytes_per_vcpu=256 << 10, seed=11, uffd_delay_ns=5000)
    a = run_demand_paging(opts, CONFIGURATIONS["tdp"])
    b = run_demand_paging(opts, CONFIGURATIONS["tdp"])
    assert (a.total_time_ns, a.faults, a.time, a.digest) == (b.total_time_ns, b.faults, b.time, b.digest)


def test_thp_backing_maps_2m_pages_under_tdp_without_uffd():
    opts = DemandPagingOptions(vcpus=1, bytes_per_vcpu=4 << 20, backing="thp", uffd=False)
    r = run_demand_paging(opts, CONFIGURATIONS["tdp"])
    assert r.verified
    assert r.mappings_by_level["2M"] == 2 and r.mappings_by_level["4K"] >= 1


def test_legacy_lock_wait_share_exceeds_tdp_with_many_vcpus():
    # Without userfaultfd: with it, at this scale both configurations queue for the mmap
    # lock's cache line in get_user_pages and UFFDIO_COPY far more than for the MMU lock
    opts = DemandPagingOptions(vcpus=32, bytes_per_vcpu=64 << 10, seed=1, uffd=False)
    tdp = run_demand_paging(opts, CONFIGURATIONS["tdp"])
    legacy = run_demand_paging(opts, CONFIGURATIONS["legacy"])
    assert legacy.lock_wait_share > 2 * tdp.lock_wait_share
    assert tdp.digest == legacy.digest


@pytest.mark.parametrize("mode", ["5level", "pae", "32bit", "none"])
def test_other_paging_modes_run_and_agree(mode):
    opts = DemandPagingOptions(vcpus=2, bytes_per_vcpu=128 << 10, mode=mode)
    digests = distinct_digests([run_demand_paging(opts, p) for p in CONFIGURATIONS.values()])
    assert len(digests) == 1


def test_bad_options_are_rejected():
    from mmu_core import InvalidConfig, validate

    with pytest.raises(InvalidConfig) as exc:
        validate(DemandPagingOptions, vcpus=0)
    assert exc.value.field == "vcpus"
    with pytest.raises(InvalidConfig):
        validate(DemandPagingOptions, bytes_per_vcpu=3072)


@pytest.mark.parametrize("name", ["tdp", "legacy"])
def test_hugetlb_with_userfault_copies_whole_1g_pages_and_maps_them_at_1g(name):
    opts = DemandPagingOptions(vcpus=1, bytes_per_vcpu=1 << 30, backing="hugetlb")
    r = run_demand_paging(opts, CONFIGURATIONS[name])
    assert (r.verified, r.mappings_by_level["1G"]) == (True, 1)


# --- schedule policies ---------------------------------------------------------------------------

def test_same_policy_and_seed_give_the_same_report_apart_from_wall_clock():
    for policy in ("random", "pct"):
        opts = DemandPagingOptions(vcpus=4, bytes_per_vcpu=256 << 10, seed=1, policy=policy)
        a = run_demand_paging(opts, CONFIGURATIONS["tdp"]).model_dump(exclude={"wall"})
        b = run_demand_paging(opts, CONFIGURATIONS["tdp"]).model_dump(exclude={"wall"})
        assert a == b, policy
        assert a["schedule"]["policy"] == policy and a["schedule"]["steps"] > 1000


def test_random_seeds_change_interleaving_dependent_figures_but_not_the_guest_view():
    def run(seed, policy="random"):
        opts = DemandPagingOptions(vcpus=4, bytes_per_vcpu=256 << 10, seed=seed, policy=policy)
        return run_demand_paging(opts, CONFIGURATIONS["legacy"])

    one, two, fifo = run(1), run(2), run(1, "fifo")
    assert [v.time for v in one.per_vcpu] != [v.time for v in two.per_vcpu]
    assert one.time.lock_wait_ns != two.time.lock_wait_ns
    assert one.digest == two.digest == fifo.digest
    assert (one.schedule.jitter_ns, one.schedule.pct_depth) == (100, None)
    # The jitter costs some preemption latency, not much (docs/engine.md).
    assert fifo.total_time_ns <= one.total_time_ns < 1.05 * fifo.total_time_ns


@pytest.mark.parametrize("name", ["tdp", "legacy", "shadow"])
def test_pct_schedules_run_every_configuration_to_the_same_guest_view(name):
    fifo = run_demand_paging(DemandPagingOptions(vcpus=3, bytes_per_vcpu=128 << 10),
                             CONFIGURATIONS[name])
    for seed in range(3):
        opts = DemandPagingOptions(vcpus=3, bytes_per_vcpu=128 << 10, seed=seed, policy="pct",
                                   pct_steps=5_000)
        r = run_demand_paging(opts, CONFIGURATIONS[name])
        assert r.verified and r.digest == fifo.digest
        assert (r.schedule.pct_depth, r.schedule.pct_steps, r.schedule.jitter_ns) == (
            3, 5_000, None)


# --- interrupted runs ------------------------------------------------------------------------------

def interrupted_run(name: str, n: int, how: str, uffd: bool = True) -> dict:
    """Run a small demand-paging workload and interrupt it at the n-th switch point a task
    passes: `raise` throws KeyboardInterrupt right there, inside the task (possibly inside an
    RCU read section, holding the MMU lock, or queued for it); `signal` delivers a real SIGINT
    there, which the engine defers to the next switch point. The workload's own `finally`
    destroys the VM; returns what that left behind."""
    box = {}
    real_build = dp.build_machine

    def build(spec, config):
        machine = real_build(spec, config)
        vm = machine.vm
        engine = vm.engine
        real_delay = engine.delay
        count = [0]

        def delay(ns, phase=None):
            if engine.current is not None:
                count[0] += 1
                if count[0] == n:
                    box["inside_rcu"] = bool(vm.rcu._readers)
                    lock = vm.mmu_lock
                    box["lock_busy"] = bool(lock.readers or lock.writer or lock.contended)
                    if how == "raise":
                        raise KeyboardInterrupt
                    signal.raise_signal(signal.SIGINT)
            real_delay(ns, phase)

        engine.delay = delay
        box["vm"] = weakref.ref(vm)
        box["count"] = count
        return machine

    dp.build_machine = build
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        opts = DemandPagingOptions(vcpus=3, bytes_per_vcpu=64 << 10, uffd=uffd)
        run_demand_paging(opts, CONFIGURATIONS[name])
        box["outcome"] = "completed"
    except KeyboardInterrupt:
        box["outcome"] = "interrupted"
    finally:
        dp.build_machine = real_build
        signal.signal(signal.SIGINT, old_handler)
    vm = box["vm"]()
    lock = vm.mmu_lock
    box.update(
        switch_points=box["count"][0], pt_pages=vm.pt_pages_in_use(), closed=vm.engine.closed,
        lock_free=not (lock.readers or lock.writer or lock.contended),
        rcu_idle=not vm.rcu._readers and vm.rcu.pending == 0)
    return box


@pytest.mark.parametrize("name", ["tdp", "legacy", "shadow"])
def test_ctrl_c_at_any_switch_point_leaves_a_vm_that_destroy_tears_down_cleanly(name):
    total = interrupted_run(name, 0, "raise")["switch_points"]
    assert total > 300
    seen = {"inside_rcu": 0, "lock_busy": 0}
    # Every switch point of the first hundred (tables are being linked, roots loaded), then
    # a spread over the rest of the run.
    points = list(range(1, 100)) + list(range(100, total, total // 40))
    for n in points:
        left = interrupted_run(name, n, "raise" if n % 4 else "signal")
        # No exception from destroy (it would have replaced the KeyboardInterrupt), every
        # page-table page freed, the engine closed, no lock holder or RCU reader left.
        assert (left["outcome"], left["pt_pages"], left["closed"], left["lock_free"],
                left["rcu_idle"]) == ("interrupted", 0, True, True, True), (n, left)
        for key in seen:
            seen[key] += left[key]
    assert seen["lock_busy"] > 10
    if name == "tdp":  # only the TDP MMU faults inside RCU read sections
        assert seen["inside_rcu"] > 10


def test_an_interrupted_vm_is_freed_and_an_uninterrupted_one_completes():
    left = interrupted_run("tdp", 150, "raise", uffd=False)
    gc.collect()
    assert left["outcome"] == "interrupted" and left["vm"]() is None
    left = interrupted_run("tdp", 10**9, "raise", uffd=False)
    assert (left["outcome"], left["pt_pages"]) == ("completed", 0)


def test_the_page_table_slot_moves_above_data_it_cannot_fit_below(monkeypatch):
    # Up to about 256 GiB of data the guest's page tables sit below it, at gpa 0 (the layout
    # every other test pins). The seed's 416 x 4 GiB needs a 7 GB slot for them: it goes above the
    # data, and so does the guest's window onto them (PT_GVA_64 + gpa), clear of the data's
    # identity map.
    from mmu_core.guest.machine import DATA_GPA, pt_slot_gpa, pt_slot_size
    from mmu_core.guest.pagetables import PT_GVA_64

    small = 250 << 30
    assert pt_slot_gpa(small, pt_slot_size(small >> 12)) == 0
    for data in (300 << 30, 416 << 32):
        size = pt_slot_size(data >> 12)
        gpa = pt_slot_gpa(data, size)
        assert size > DATA_GPA and gpa >= DATA_GPA + data and gpa % (1 << 30) == 0
        assert PT_GVA_64 + gpa >= DATA_GPA + data  # the window lies above the data's map
        assert PT_GVA_64 + gpa + size <= 1 << 47  # and is canonical under 4-level paging
    monkeypatch.setattr(dp, "host_bytes_available", lambda: 1 << 45)
    opts = DemandPagingOptions(vcpus=416, bytes_per_vcpu=4 << 30)  # accepted, not refused
    assert opts.guest_bytes() == 416 << 32


def test_a_run_planned_compiled_but_sent_to_the_exact_engine_is_checked_again(monkeypatch):
    # With a mutant seeded the core refuses the compiled loop, which the options cannot show:
    # the run is planned at the compiled loop's bytes per page, built, then refused with the
    # exact engine's figure instead of running out of memory.
    from mmu_core import mutants
    from mmu_core.errors import InvalidConfig

    opts = DemandPagingOptions(vcpus=1, bytes_per_vcpu=1 << 30, uffd=False)
    assert dp.may_stream(opts, CONFIGURATIONS["tdp"])
    have = (dp.host_bytes_needed(1 << 30, True) + dp.host_bytes_needed(1 << 30)) // 2
    monkeypatch.setattr(dp, "host_bytes_available", lambda: have)
    with mutants.enabled("no-flush-after-zap"), pytest.raises(InvalidConfig) as exc:
        run_demand_paging(opts, CONFIGURATIONS["tdp"])
    assert exc.value.field == "engine" and "a mutant is active" in str(exc.value)
    assert "on the exact engine it needs about 0.6 GiB" in str(exc.value)
