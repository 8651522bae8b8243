"""The race explorer: a bounded explore on every run, replays of the races it was built to
find, and the seeded mutants it must catch."""

import numpy as np
import pytest
from shadow_util import race_a_reader

from mmu_core import VMConfig, mutants
from mmu_core.errors import InvalidConfig, UseAfterFree
from mmu_core.guest.machine import DATA_GPA, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.params import CONFIGURATIONS
from mmu_core.sim.cost import CostModel
from mmu_core.testing.audit import audit
from mmu_core.testing.explore import SCENARIOS, explore, plan, run_schedule
from mmu_core.testing.mutant_cases import MUTANT_CASES

CONFIGS = list(CONFIGURATIONS)


@pytest.mark.parametrize("policy", ["random", "pct"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_bounded_explore_finds_no_violation(scenario, policy):
    outcomes = explore(plan([scenario], CONFIGS, policy, seed=0, schedules=4),
                       stop_on_failure=False)
    failed = [o for o in outcomes if not o.ok]
    assert len(outcomes) == 3 * 4
    assert not failed, f"{failed[0].invariant}: {failed[0].detail} ({failed[0].replay_command()})"


def test_same_seed_replays_the_same_execution():
    a = run_schedule("zap-all", "tdp", "random", 7)
    b = run_schedule("zap-all", "tdp", "random", 7)
    c = run_schedule("zap-all", "tdp", "random", 8)
    assert a == b
    assert a.ok and c.ok
    assert a.steps > 0


def test_outcome_names_the_replay_command():
    o = run_schedule("first-touch", "tdp", "random", 0, mutant_names=("plain-write-not-cmpxchg",))
    assert not o.ok and o.invariant == "table-leak"
    assert o.replay_command() == ("mmu explore --scenario first-touch --config tdp --policy "
                                  "random --seed 0 --schedules 1 --mutant plain-write-not-cmpxchg")
    assert not mutants.active()  # switched off again after the run


def test_bad_names_are_typed_errors():
    with pytest.raises(InvalidConfig, match="unknown scenario"):
        plan(["nope"], CONFIGS, "random", 0, 1)
    with pytest.raises(InvalidConfig, match="unknown configuration"):
        plan(["zap-all"], ["nope"], "random", 0, 1)
    with pytest.raises(InvalidConfig, match="unknown mutant"):
        plan(["zap-all"], CONFIGS, "random", 0, 1, ("nope",))


def _caught(scenario, config, policy, mutant, seeds):
    for seed in seeds:
        o = run_schedule(scenario, config, policy, seed, mutant_names=(mutant,))
        if not o.ok:
            return o
    return None




@pytest.mark.parametrize(("mutant", "scenario", "config", "policy", "schedules"),
                         [(*case, 40)[:5] for case in MUTANT_CASES])
def test_seeded_mutant_is_caught_and_the_fixed_code_passes(mutant, scenario, config, policy,
                                                          schedules):
    bad = _caught(scenario, config, policy, mutant, range(schedules))
    assert bad is not None, (f"{mutant} survived {schedules} {policy} schedules of "
                             f"{scenario}/{config}")
    fixed = run_schedule(scenario, config, policy, bad.seed)
    assert fixed.ok, f"{fixed.invariant}: {fixed.detail}"


def test_every_mutant_but_the_unreachable_one_has_a_case():
    assert {c[0] for c in MUTANT_CASES} == set(mutants.REGISTRY) - {"skip-frozen-wait"}


def test_spte_access_to_a_freed_table_is_a_use_after_free():
    m = build_machine(MachineSpec(vcpus=1, data_size=8 * 4096),
                      VMConfig(params=CONFIGURATIONS["tdp"]))
    try:
        pfn = m.vm.alloc_pt_page()
        m.vm.free_pt_page(pfn)
        with pytest.raises(UseAfterFree):
            m.vm.spte_read(pfn, 0)
    finally:
        m.vm.destroy()


def test_an_mmio_spte_made_while_a_slot_is_created_goes_stale():
    # Found by the 1,000-schedule random explore: the VMM created a slot between a fault's
    # retry check and its MMIO SPTE, which took the new generation and hid the slot.
    bad = _caught("memslots", "tdp", "random", "mmio-generation-at-install", range(60))
    assert bad is not None and bad.invariant == "mmio-current"
    fixed = run_schedule("memslots", "tdp", "random", bad.seed)
    assert fixed.ok, f"{fixed.invariant}: {fixed.detail}"


def _enable_logging_inside_a_fault(monkeypatch, mutant: str | None):
    """One vCPU writes a page of an unlogged slot; a VMM task enables dirty logging 1 ns after
    the TDP fault has decided its SPTE (writable: the slot was not logged) and, with
    `spte_build` stretched to 100 us, well before it installs it (PCT found the schedule in
    which the install waited that long for the SPTE's cache line). The violations the audit
    finds once both are done."""
    import mmu_tdp.tdp_mmu as tdp

    params = CONFIGURATIONS["tdp"].model_copy(update={"pml": False})
    decided: list[int] = []
    real = tdp.TdpMMU._map_target

    def map_target(self, vcpu, fault, it, res, gfn, level, gen):
        if gfn == DATA_GPA >> 12:  # (the guest's page-table pages fault first)
            decided.append(self.vm.engine.now)  # no switch point: the decision is made now
        return real(self, vcpu, fault, it, res, gfn, level, gen)

    monkeypatch.setattr(tdp.TdpMMU, "_map_target", map_target)
    prog = Program().write(DATA_GPA, 7).read(DATA_GPA).build()
    at = None
    for _ in range(2):  # the first run finds when the fault decides; the second races it
        m = build_machine(MachineSpec(vcpus=1, data_size=8 * 4096),
                          VMConfig(params=params, cost=CostModel(spte_build=100_000)))
        vm = m.vm
        try:
            if at is not None:
                def vmm(vm=vm, at=at):
                    vm.engine.delay(at + 1)
                    vm.set_dirty_logging(0, 1, True)
                vm.engine.spawn("vmm", vmm)
            decided.clear()
            with mutants.enabled(*([mutant] if mutant else [])):
                m.run_programs([prog])
            at = decided[0]
            found = [v.invariant for v in audit(vm)]
        finally:
            vm.destroy()
    return found


def test_enabling_dirty_logging_waits_for_a_fault_that_saw_the_old_memslots(monkeypatch):
    # Found by PCT in session 5 (dirty-log-wrprot/tdp): a TDP write fault built a writable
    # SPTE while the slot was not logged yet and installed it after the VMM had enabled
    # logging and write-protected the slot, so later writes to the page went unlogged. KVM's
    # memslot update waits for an SRCU grace period (kvm_swap_active_memslots) before it
    # write-protects, and so does the model; the mutant does not.
    assert _enable_logging_inside_a_fault(monkeypatch, "memslot-update-no-srcu-sync") \
        == ["dirty-log"]
    assert _enable_logging_inside_a_fault(monkeypatch, None) == []


def test_zap_all_while_vcpus_fault_reloads_instead_of_crashing():
    # Problem 3 of the issue: a fault walked with vcpu.mmu_root = None (TypeError).
    for seed in range(10):
        o = run_schedule("zap-all", "tdp", "random", seed)
        assert o.ok, f"{o.invariant}: {o.detail}"


def test_readonly_slot_stays_unwritable_after_an_emulated_write_sets_d():
    # Problem 6: one vCPU, write (MMIO exit, guest D set) then read: never a writable SPTE.
    for name in CONFIGS:
        m = build_machine(MachineSpec(vcpus=1, data_size=8 * 4096, readonly=True),
                          VMConfig(params=CONFIGURATIONS[name]))
        try:
            res = m.run_programs([Program().write(DATA_GPA, 5).read(DATA_GPA).build()])[0]
            assert res[1, 0] == 0
            assert m.vm.vcpus[0].mmio[0][1:3] == (DATA_GPA, 1)
            assert audit(m.vm) == []
        finally:
            m.vm.destroy()


def test_range_zap_charges_per_spte_and_yields_when_contended():
    # Problem 9: zapping thousands of SPTEs cost 10 ns and never yielded the lock.
    m = build_machine(MachineSpec(vcpus=1, data_size=2048 * 4096),
                      VMConfig(params=CONFIGURATIONS["tdp"]))
    vm = m.vm
    try:
        prog = np.zeros((2048, 3), dtype=np.int64)
        prog[:, 0] = 0  # read every page
        prog[:, 1] = DATA_GPA + (np.arange(2048) << 12)
        m.run_programs([prog])
        assert audit(vm) == []  # 2048 leaves: the audit's jitted walk grows its buffers
        t0 = vm.engine.now
        times = race_a_reader(vm, lambda: vm.zap_gfn_range(0, DATA_GPA >> 12,
                                                           (DATA_GPA >> 12) + 2048))
        cost = vm.engine.cost
        assert times["work_end"] - t0 >= 2048 * (cost.spte_write + cost.atomic_read)
        assert times["reader_got_lock"] < times["work_end"]  # the zap yielded the lock midway
        assert vm.backend_instances["tdp"].stats["resched"] > 0
    finally:
        vm.destroy()


def test_outcomes_do_not_depend_on_how_the_work_is_split():
    jobs = plan(["zap-all", "readonly"], ["tdp", "shadow"], "pct", seed=0, schedules=3)
    local = explore(jobs, workers=1, stop_on_failure=False)
    assert explore(jobs, workers=2, stop_on_failure=False) == local
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        assert explore(jobs, scheduler=cluster.scheduler_address,
                       stop_on_failure=False) == local


@pytest.mark.parametrize("config", CONFIGS)
def test_every_scenario_holds_on_one_host_cpu(config):
    # One CPU: tasks wait in the run queue and only one runs at a time, spinning waiters
    # keep the CPU; interleavings the default 448 CPUs never produce (docs/engine.md).
    for scenario in SCENARIOS:
        o = run_schedule(scenario, config, "random", 0, host_cpus=1)
        assert o.ok, f"{scenario}: {o.invariant}: {o.detail}\n{o.replay_command()}"
    assert "--host-cpus 1" in o.replay_command()
    assert "--host-cpus" not in run_schedule(scenario, config, "random", 0).replay_command()
