"""The conformance suite: what every MMU backend is held to, the in-tree ones included.

Run it with `pytest --mmu-backend NAME` (the pytest plugin in mmu_core.testing.pytest_plugin
adds this file to the run) or `mmu conformance NAME`. Each test belongs to one capability
group, and the run ends with a table, group by group:

discovery     the backend is installed, validates, and describes its capabilities
parity        random single-vCPU programs in every paging mode, with dirty logging and MMIO,
              and kernels switching PCID-tagged address spaces with global pages, are
              indistinguishable from the reference configuration (hypothesis, seeds)
memslots      READONLY slots, MMIO, deleting a slot, SMM address spaces
concurrency   every explorer scenario (first touch, guest PTE races, zap-all, dirty logging,
              READONLY, host events, memslot changes, THP split and collapse) under random
              and pct schedules, with the invariant audit after every step and the reference
              model of guest memory
teardown      destroy frees every page-table page
liveness      a demand-paging run completes and every page reads back right
costs         faults and exits per access within 2x the reference (catches, e.g., an MMIO
              SPTE that never matches)
capabilities  what BackendInfo.capabilities declares is checked; what it does not is skipped
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmu_core.arch.x86 import paging as P
from mmu_core.config import VMConfig
from mmu_core.guest.machine import DATA_GPA, DATA_SLOT, MMIO_GPA, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.hw import cpu as C
from mmu_core.params import configuration
from mmu_core.plugins import choose, discover
from mmu_core.testing.audit import _walk_tree, audit
from mmu_core.testing.explore import SCENARIOS, run_schedule
from mmu_core.testing.programs import (
    DATA_PAGES,
    assert_parity,
    build,
    pcid_kernel,
    run_everywhere,
    spec_for,
)
from mmu_core.testing.strategies import op_strategy
from mmu_core.types import Role
from mmu_core.vm.vcpu import REQ_MMU_RELOAD
from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging


def capability(name: str):
    return pytest.mark.mmu_capability(name)


def _serving(config: str):
    """The backend that builds the tables for configuration `config` (a built-in name, or
    an installed backend, on EPT)."""
    params = configuration(config)
    return choose(params)[Role.DIRECT if params.ept else Role.SHADOW]


def _caps(config: str):
    return _serving(config).info.capabilities


def _machine(backend: str, **spec):
    spec = MachineSpec(**{"vcpus": 1, "data_size": DATA_PAGES * 4096, **spec})
    return build_machine(spec, VMConfig(params=configuration(backend)))


# --- discovery ------------------------------------------------------------------------------
@capability("discovery")
def test_backend_is_installed_and_serves_its_role(mmu_backend):
    params = configuration(mmu_backend)
    found = discover()
    assert params.backend in found, f"backend {params.backend!r} is not installed " \
        f"(installed: {', '.join(sorted(found))})"
    role = Role.DIRECT if params.ept else Role.SHADOW
    assert role in _serving(mmu_backend).info.roles, f"no installed backend serves {role}"


# --- parity -----------------------------------------------------------------------------------
def _not_the_reference(backend, reference):
    """A backend is not compared with itself: that run would agree whatever it does."""
    if configuration(backend) == configuration(reference):
        pytest.skip(f"{backend} is the reference configuration: nothing to compare it with "
                    "(pass another with --mmu-reference)")


def _parity(backend, reference, spec_factory, mode, examples, max_ops=40):
    _not_the_reference(backend, reference)
    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(ops=st.lists(op_strategy, min_size=1, max_size=max_ops))
    def check(ops):
        runs = run_everywhere(spec_factory(), build(ops, mode), configs=(reference, backend))
        assert_parity(runs, reference)

    check()


@capability("parity")
def test_random_4level_programs_match_the_reference(mmu_backend, mmu_reference, mmu_examples):
    _parity(mmu_backend, mmu_reference, lambda: spec_for(P.MODE_4LEVEL), P.MODE_4LEVEL,
            mmu_examples)


@capability("parity")
@pytest.mark.parametrize("seed", range(3))
def test_pcid_kernels_match(mmu_backend, mmu_reference, seed):
    """A kernel with two PCID-tagged address spaces sharing its tables and global pages
    (switches with and without the no-flush bit, INVPCID of every type, INVLPG of global
    pages) is indistinguishable from the reference."""
    _not_the_reference(mmu_backend, mmu_reference)
    runs = run_everywhere(spec_for(P.MODE_4LEVEL), pcid_kernel(seed), seed=seed,
                          configs=(mmu_reference, mmu_backend))
    assert_parity(runs, mmu_reference)


@capability("parity")
@pytest.mark.parametrize("mode", [P.MODE_5LEVEL, P.MODE_PAE, P.MODE_32, P.MODE_NONE],
                         ids=["5level", "pae", "32bit", "none"])
def test_random_programs_in_other_modes_match(mmu_backend, mmu_reference, mmu_examples, mode):
    _parity(mmu_backend, mmu_reference, lambda: spec_for(mode), mode,
            max(2, mmu_examples // 4), max_ops=30)


@capability("parity")
@pytest.mark.parametrize("backing", ["anon", "thp"])
def test_dirty_logs_match(mmu_backend, mmu_reference, mmu_examples, backing):
    def spec():
        s = spec_for(P.MODE_4LEVEL, log_dirty=True, backing=backing)
        if backing == "thp":
            s.data_size = 2 << 20
        return s
    _parity(mmu_backend, mmu_reference, spec, P.MODE_4LEVEL, max(2, mmu_examples // 3),
            max_ops=30)


# --- memslots ---------------------------------------------------------------------------------
@capability("memslots")
def test_readonly_slot_writes_exit_as_mmio_and_never_map_writable(mmu_backend):
    m = _machine(mmu_backend, readonly=True)
    try:
        res = m.run_programs([Program().write(DATA_GPA, 5).read(DATA_GPA).write(DATA_GPA, 6)
                              .read(DATA_GPA).build()])[0]
        assert [w[1:3] for w in m.vm.vcpus[0].mmio] == [(DATA_GPA, 1), (DATA_GPA, 1)], \
            "writes to a READONLY slot must exit to userspace as MMIO"
        assert res[1, C.RES_VALUE] == 0 and res[3, C.RES_VALUE] == 0
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


@capability("memslots")
def test_a_deleted_slot_reads_as_mmio(mmu_backend):
    m = _machine(mmu_backend)
    try:
        m.run_programs([Program().write(DATA_GPA, 5).read(DATA_GPA).build()])
        m.vm.delete_memslot(0, DATA_SLOT)
        res = m.run_programs([Program().read(DATA_GPA).build()])[0]
        assert m.vm.vcpus[0].mmio[-1][1] == DATA_GPA, "after the delete the gpa must be MMIO"
        assert res[0, C.RES_VALUE] != 5
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


@capability("memslots")
def test_smm_memory_is_reachable_only_in_smm(mmu_backend):
    smram = 0x3000_0000
    m = _machine(mmu_backend, mode=P.MODE_NONE)
    try:
        m.vm.add_memslot(9, smram, 4096, as_id=1)
        vcpu = m.vm.vcpus[0]
        outside = m.run_programs([Program().read(smram).build()])[0]
        assert vcpu.mmio and vcpu.mmio[-1][1] == smram, "SMRAM outside SMM must be MMIO"
        vcpu.smm = True
        vcpu.make_request(REQ_MMU_RELOAD)  # as an SMM entry does: the address space changed
        inside = m.run_programs([Program().write(smram, 4).read(smram).build()])[0]
        assert inside[1, C.RES_VALUE] == 4
        assert audit(m.vm) == []
        vcpu.smm = False
        vcpu.make_request(REQ_MMU_RELOAD)
        again = m.run_programs([Program().read(smram).build()])[0]
        assert again[0, C.RES_VALUE] == outside[0, C.RES_VALUE] != 4
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


# --- concurrency -------------------------------------------------------------------------------
@capability("concurrency")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_survives_every_schedule(mmu_backend, mmu_schedules, scenario):
    for policy in ("random", "pct"):
        for seed in range(mmu_schedules):
            o = run_schedule(scenario, mmu_backend, policy, seed)
            assert o.ok, f"{o.invariant}: {o.detail} (replay: {o.replay_command()})"


# --- teardown ----------------------------------------------------------------------------------
@capability("teardown")
def test_destroy_frees_every_page_table_page(mmu_backend):
    m = _machine(mmu_backend, vcpus=2)
    progs = [Program().write(DATA_GPA + 4096 * i, i + 1).read(MMIO_GPA).build() for i in (0, 1)]
    m.run_programs(progs)
    m.vm.zap_all()
    m.run_programs(progs)
    assert m.vm.pt_pages_in_use() > 0
    m.vm.destroy()
    assert m.vm.pt_pages_in_use() == 0, "page-table pages leaked at destroy"


# --- liveness and costs -----------------------------------------------------------------------
def _demand_paging(config: str, vcpus: int = 2, size: int = 1 << 20):
    opts = DemandPagingOptions(vcpus=vcpus, bytes_per_vcpu=size, uffd=True)
    return run_demand_paging(opts, configuration(config))


@capability("liveness")
def test_demand_paging_completes_and_reads_every_page_right(mmu_backend):
    report = _demand_paging(mmu_backend)
    assert report.verified, f"{report.mismatches} pages read back wrong"


@capability("costs")
def test_faults_and_exits_stay_within_twice_the_reference(mmu_backend, mmu_reference):
    mine, ref = _demand_paging(mmu_backend), _demand_paging(mmu_reference)
    for what in ("faults", "exits"):
        have, want = sum(getattr(mine, what).values()), sum(getattr(ref, what).values())
        assert have <= 2 * want + 16, f"{have} {what} where {mmu_reference} takes {want}"


@capability("costs")
def test_repeated_mmio_accesses_exit_once_each(mmu_backend):
    m = _machine(mmu_backend)
    try:
        prog = Program()
        for _ in range(20):
            prog.read(MMIO_GPA)
        m.run_programs([prog.build()])
        exits = m.vm.vcpus[0].exits
        # Hardware exits (the userspace "mmio" exit is counted apart); 8 spare for the first
        # access, which also faults in the guest's page tables.
        hw = sum(n for kind, n in exits.items() if kind != "mmio")
        assert hw <= 20 + 8, f"{hw} exits for 20 MMIO reads ({exits}): an access should " \
            "exit once"
    finally:
        m.vm.destroy()


# --- declared capabilities ---------------------------------------------------------------------
@capability("capabilities")
def test_declared_mmio_spte_cache_hits_as_misconfigurations(mmu_backend):
    if not _caps(mmu_backend).mmio_spte:
        pytest.skip("mmio_spte not declared")
    if not configuration(mmu_backend).ept:
        pytest.skip("checked on EPT (direct roles); shadow paging reports MMIO as #PF")
    m = _machine(mmu_backend)
    try:
        prog = Program()
        for _ in range(10):
            prog.read(MMIO_GPA)
        m.run_programs([prog.build()])
        exits = m.vm.vcpus[0].exits
        assert exits.get("ept_misconfig", 0) >= 9, \
            f"MMIO SPTEs declared, but repeated MMIO accesses exit as {exits}"
    finally:
        m.vm.destroy()


@capability("capabilities")
def test_declared_huge_pages_map_a_thp_with_one_leaf(mmu_backend):
    if not _caps(mmu_backend).huge_pages:
        pytest.skip("huge_pages not declared")
    if not configuration(mmu_backend).ept:
        pytest.skip("checked on EPT (direct roles); shadow paging maps guest pages 4 KiB")
    m = _machine(mmu_backend, data_size=2 << 20, backing="thp")
    try:
        m.run_programs([Program().write(DATA_GPA, 1).read(DATA_GPA + 4096).build()])
        vcpu = m.vm.vcpus[0]
        _tables, entries = _walk_tree(m.vm.host.pt, m.vm.host.pt_slot, vcpu.mmu_root,
                                      m.vm.root_levels(vcpu))
        large = [e for e in entries.tolist() if e[2] == 2 and (e[4] & (1 << 7))]
        assert large, "huge_pages declared, but a THP-backed 2 MiB region got no 2 MiB leaf"
    finally:
        m.vm.destroy()


@capability("capabilities")
def test_declared_read_lock_faults_take_the_lock_for_read(mmu_backend):
    if _caps(mmu_backend).fault_lock != "read":
        pytest.skip("fault_lock is 'write': nothing more to check")
    m = _machine(mmu_backend, vcpus=2)
    try:
        m.vm.engine.trace_enabled = True
        m.run_programs([Program().write(DATA_GPA + 4096 * i, 1).build() for i in range(2)])
        modes = [d[1] for _t, task, ev, d in m.vm.engine.trace
                 if ev == "lock" and task.startswith("vcpu") and d[0] == "mmu_lock"]
        assert modes and modes.count("read") >= modes.count("write"), \
            f"fault_lock='read' declared, but vCPUs took the MMU lock as {modes}"
    finally:
        m.vm.destroy()


@capability("capabilities")
def test_declared_audit_reports_every_loaded_root(mmu_backend):
    if not _caps(mmu_backend).audit:
        pytest.skip("audit not declared: the explorer audits with the vCPUs' roots only")
    m = _machine(mmu_backend)
    try:
        m.run_programs([Program().read(DATA_GPA).build()])
        info = m.vm.hook.mmu_audit(vm=m.vm)
        assert info is not None, "audit declared, but mmu_audit is not implemented"
        roots = {pfn for _as, _lv, pfn in info.roots}
        assert m.vm.vcpus[0].mmu_root in roots
    finally:
        m.vm.destroy()


@capability("capabilities")
def test_declared_aging_clears_young(mmu_backend):
    if not _caps(mmu_backend).aging:
        pytest.skip("aging not declared: the core reports every page young")
    m = _machine(mmu_backend)
    try:
        m.run_programs([Program().read(DATA_GPA).build()])
        hva = m.vm.memslots[0].by_id(DATA_SLOT).userspace_addr
        assert m.vm.mm.age(hva, 4096) == 1
        assert m.vm.mm.age(hva, 4096) == 0, "aging declared, but clear_young left it young"
    finally:
        m.vm.destroy()

