"""The compiled demand-paging loop against the exact engine (docs/fastloop.md).

Exact equality, no tolerance: on every configuration the compiled loop supports, both engines
give the same report apart from its `wall` group: the guest digest, the total virtual time,
every vCPU's time in every phase, lock wait and hold, the schedule's steps, the lock lines'
transfers, the fault outcomes and the backend's statistics and memory.
"""

from __future__ import annotations

import numpy as np
import pytest

from mmu_core.errors import InvalidConfig
from mmu_core.params import configuration
from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging


def _both(config: str, **kw):
    reports = {}
    for engine in ("exact", "compiled"):
        opts = DemandPagingOptions(engine=engine, **kw)
        reports[engine] = run_demand_paging(opts, configuration(config))
    return reports["exact"], reports["compiled"]


def _same(exact, compiled) -> None:
    a = exact.model_dump(exclude={"wall"})
    b = compiled.model_dump(exclude={"wall"})
    assert exact.wall.engine == "exact" and compiled.wall.engine == "compiled"
    differ = sorted(k for k in a if a[k] != b[k])
    assert not differ, {k: (a[k], b[k]) for k in differ}
    assert exact.verified and compiled.verified


# vCPUs x pages per vCPU: one vCPU alone; two racing for the shared tables (lost cmpxchgs,
# spurious faults on the guest's page-table pages); 4 and 8 queueing for the MMU lock's
# line and, at mmu_load, for the lock itself; regions across a 2 MiB boundary (1 MiB each)
GRID = [(1, 4), (2, 2), (2, 64), (4, 256), (8, 33), (8, 256)]


#: the configurations with compiled kernels: the TDP MMU, and the legacy MMU with its rmap
CONFIGS = ["tdp", "legacy"]


@pytest.mark.parametrize("uffd", [False, True])
@pytest.mark.parametrize(("vcpus", "pages"), GRID)
@pytest.mark.parametrize("config", CONFIGS)
def test_agrees_with_the_exact_engine(config, vcpus, pages, uffd):
    exact, compiled = _both(config, vcpus=vcpus, bytes_per_vcpu=pages * 4096, uffd=uffd)
    _same(exact, compiled)
    assert compiled.total_time_ns > 0


@pytest.mark.parametrize("config", CONFIGS)
def test_userfaults_with_a_handler_delay_agree(config):
    exact, compiled = _both(config, vcpus=4, bytes_per_vcpu=32 * 4096, uffd=True,
                            uffd_delay_ns=2_500)
    _same(exact, compiled)
    assert compiled.time.gup_ns > 0 and compiled.host.all_on_cpu_ns > compiled.host.vcpu_on_cpu_ns


@pytest.mark.parametrize(("vcpus", "pages", "seed", "jitter_ns", "uffd"),
                         [(2, 64, 1, 100, False), (8, 64, 3, 100, False), (4, 33, 7, 500, False),
                          (4, 16, 2, 0, False), (4, 33, 5, 100, True), (8, 16, 9, 200, True)])
@pytest.mark.parametrize("config", CONFIGS)
def test_random_policy_agrees_with_the_exact_engine(config, vcpus, pages, seed, jitter_ns, uffd):
    exact, compiled = _both(config, vcpus=vcpus, bytes_per_vcpu=pages * 4096, uffd=uffd,
                            policy="random", seed=seed, jitter_ns=jitter_ns)
    _same(exact, compiled)


def test_the_schedule_stream_is_left_where_the_exact_engine_leaves_it():
    # The loop draws ahead in chunks; afterwards the engine's stream must be exactly as far
    # along as the draws consumed, across refills of the ring
    import numpy as np

    from mmu_core.sim import Engine
    from mmu_core.sim import fastloop as F

    for consumed in (0, 1, 5, F._Draws.SIZE - 1, F._Draws.SIZE + 3, 3 * F._Draws.SIZE // 2):
        engine = Engine(seed=11, policy="random", jitter_ns=100)
        Ea = np.zeros(F.E_SIZE, dtype=np.int64)
        draws = F._Draws(engine, Ea)
        draws.refill()
        taken = []
        while int(Ea[F.E_DRAWN]) < consumed:
            k = int(Ea[F.E_DRAWN])
            taken.append(int(draws.ring[k % draws.SIZE]))
            Ea[F.E_DRAWN] = k + 1
            if Ea[F.E_RLIM] - Ea[F.E_DRAWN] < F.J_MARGIN:
                draws.refill()
        draws.settle()
        reference = Engine(seed=11, policy="random", jitter_ns=100)._sched_rng
        expect = [int(reference.random() * 101) for _ in range(consumed)]
        assert taken == expect
        assert engine._sched_rng.random() == reference.random()


@pytest.mark.parametrize("config", CONFIGS)
def test_finite_host_cpus_at_least_the_tasks_agree(config):
    # As many CPUs as tasks: nobody waits in the run queue, as with unlimited CPUs
    exact, compiled = _both(config, vcpus=4, bytes_per_vcpu=64 * 4096, uffd=False, host_cpus=4)
    _same(exact, compiled)
    exact, compiled = _both(config, vcpus=4, bytes_per_vcpu=64 * 4096, uffd=True, host_cpus=8)
    _same(exact, compiled)
    exact, compiled = _both(config, vcpus=4, bytes_per_vcpu=64 * 4096, uffd=False,
                            host_cpus=None)
    _same(exact, compiled)


# Fewer host CPUs than tasks: the run queue, context switches, and (with a short slice)
# preemption at a delay past the slice. With userfaultfd every fault sleeps (a new slice), so
# only a slice shorter than a fault's path preempts there.
@pytest.mark.parametrize(("vcpus", "pages", "uffd", "cpus", "slice_ns", "policy"), [
    (4, 64, False, 1, 20_000, "fifo"), (4, 64, False, 3, 20_000, "fifo"),
    (4, 64, True, 1, 3_000, "fifo"), (4, 64, True, 5, 3_000, "fifo"),
    (8, 32, True, 5, 3_000_000, "fifo"), (4, 33, True, 3, 3_000, "random"),
    (4, 33, False, 2, 20_000, "random"),
])
@pytest.mark.parametrize("config", CONFIGS)
def test_fewer_host_cpus_than_tasks_agree(config, vcpus, pages, uffd, cpus, slice_ns, policy):
    from mmu_core.sim.cost import CostModel

    reports = [run_demand_paging(DemandPagingOptions(vcpus=vcpus, bytes_per_vcpu=pages * 4096,
                                                     uffd=uffd, host_cpus=cpus, engine=engine,
                                                     policy=policy, seed=5),
                                 configuration(config), CostModel(sched_slice=slice_ns))
               for engine in ("exact", "compiled")]
    _same(*reports)
    assert reports[1].host.runqueue_ns > 0


# -a: one userfaultfd for all vCPUs and a reader per vCPU: the message queue, the thundering
# herd of readers woken from poll() (empty reads), wake_userfault visiting every waiter, the
# wait-queue lock's line; with a handler delay, several faults pending at once
@pytest.mark.parametrize(("vcpus", "pages", "delay_ns", "cpus", "policy"), [
    (1, 8, 0, None, "fifo"), (2, 16, 0, None, "fifo"), (4, 33, 0, 448, "fifo"),
    (8, 32, 2_500, 448, "fifo"), (8, 16, 0, 6, "fifo"), (4, 16, 0, 2, "fifo"),
    (4, 33, 1_000, None, "random"),
])
@pytest.mark.parametrize("config", CONFIGS)
def test_one_shared_userfaultfd_agrees(config, vcpus, pages, delay_ns, cpus, policy):
    exact, compiled = _both(config, vcpus=vcpus, bytes_per_vcpu=pages * 4096, uffd=True,
                            uffd_shared=True, uffd_delay_ns=delay_ns, host_cpus=cpus,
                            policy=policy, seed=3)
    _same(exact, compiled)
    if vcpus > 2:
        assert compiled.host.uffd_empty_reads > 0


@pytest.mark.parametrize("config", CONFIGS)
def test_a_cost_model_other_than_the_default_agrees(config):
    from mmu_core.sim.cost import CostModel

    # (the legacy MMU's own costs too: hash lookup, SPTE store, rmap add)
    cost = CostModel(lock_handoff=250, gup_present=7, host_page_alloc=3_333, quantum=64,
                     sp_hash_lookup=37, spte_write=11, rmap_add=71, spte_build=29)
    reports = [run_demand_paging(DemandPagingOptions(vcpus=3, bytes_per_vcpu=40 * 4096,
                                                     uffd=False, engine=engine),
                                 configuration(config), cost) for engine in ("exact", "compiled")]
    _same(*reports)


def _states_of_both(monkeypatch, state, config: str, **kw) -> list[dict]:
    """Run both engines (seed 4, jitter 300 ns), check their reports agree, and return
    `state(vm)` of each VM as it is destroyed, with the host mm's statistics ("mm"), both
    free of audit violations."""
    import dataclasses

    from mmu_core.vm.vm import VM

    states = []
    destroy = VM.destroy

    def capture(vm):
        states.append({**state(vm), "mm": dataclasses.asdict(vm.mm.stats)})
        destroy(vm)

    monkeypatch.setattr(VM, "destroy", capture)
    _same(*_both(config, seed=4, jitter_ns=300, **kw))
    assert [s["violations"] for s in states] == [[], []]
    return states


def _legacy_state(vm) -> dict:
    """The legacy MMU's structures after a run, as plain data: the shadow pages in hash,
    by_pfn and active-list order with their parent links and root references, the vCPUs'
    roots, the rmap entries, the page count and the statistics; with the audit's verdict."""
    from mmu_core.testing.audit import audit

    mmu = _shadow_mmu(vm)
    pages = [(sp.pfn, sp.gfn, sp.role, sorted(sp.parent_ptes), sp.root_count, sp.unsync,
              sp.mmu_valid_gen) for sp in mmu.by_pfn.values()]
    return {
        "violations": [str(v) for v in audit(vm)],
        "pages": pages,
        "hash": [(k, sp.pfn) for k, sp in mmu.pages.items()],
        "active": list(mmu.active),
        "roots": {vid: (st.root.pfn if st.root else None, [sp.pfn for sp in st.prev])
                  for vid, st in mmu.vroots.items()},
        "rmap": sorted(mmu.rmaps.all_entries()),
        "rmap_bytes": mmu.rmaps.nbytes(),
        "n_used": mmu.n_used,
        "stats": mmu.counters(),
        "tables": vm.host.pt[[int(vm.host.pt_slot[p]) for p, *_ in pages]].tolist(),
    }


def _shadow_mmu(vm):
    from mmu_shadow.shadow_mmu import ShadowMMU

    (mmu,) = [p for p in vm.managers[vm.role].get_plugins() if isinstance(p, ShadowMMU)]
    return mmu


@pytest.mark.parametrize(("vcpus", "pages", "uffd", "policy"),
                         [(8, 256, True, "fifo"), (4, 64, False, "random"), (2, 33, True,
                                                                              "random")])
def test_legacy_structures_agree_and_pass_the_audit(monkeypatch, vcpus, pages, uffd, policy):
    # The report agreeing is not all: the shadow pages, the rmap and the statistics the
    # compiled run leaves must be the exact run's, and pass the invariant audit (rmap
    # complete and not stale, root references, the page count, every leaf's pfn)
    a, b = _states_of_both(monkeypatch, _legacy_state, "legacy", vcpus=vcpus,
                           bytes_per_vcpu=pages * 4096, uffd=uffd, policy=policy)
    assert a == b
    assert b["stats"]["direct_prefetched"] >= 7 and b["rmap"] and len(b["pages"]) >= 5


def _tdp_state(vm) -> dict:
    """The TDP MMU's structures after a run, as plain data: its roots, the page-size gauges,
    every statistic it keeps (beyond the report's MMUStats: lost cmpxchgs, spurious faults,
    tables linked), the table pages and their entries; with the audit's verdict."""
    import hashlib

    from mmu_core.testing.audit import audit
    from mmu_tdp.tdp_mmu import TdpMMU

    (mmu,) = [p for p in vm.managers[vm.role].get_plugins() if isinstance(p, TdpMMU)]
    tables = np.flatnonzero(vm.host.pt_slot >= 0)
    return {
        "violations": [str(v) for v in audit(vm)],
        "roots": sorted((k, r.pfn, r.refcount, r.invalid) for k, r in mmu.roots.items()),
        "all_roots": sorted(mmu.all_roots),
        "pages": list(mmu.pages),
        "stats": {k: list(v) if isinstance(v, list) else v for k, v in mmu.stats.items()},
        "tables": tables.tolist(),
        "entries": hashlib.sha256(vm.host.pt[vm.host.pt_slot[tables]].tobytes()).hexdigest(),
    }


@pytest.mark.parametrize(("vcpus", "pages", "uffd", "policy"),
                         [(8, 256, True, "fifo"), (2, 2, False, "fifo"),
                          (4, 64, False, "random"), (2, 33, True, "random")])
def test_tdp_structures_agree_and_pass_the_audit(monkeypatch, vcpus, pages, uffd, policy):
    # The report holds MMUStats only: the TDP MMU's other statistics (cmpxchg_lost,
    # spurious, tables_linked, which the kernel counts and finish() writes back), its roots
    # and its tables must be the exact run's too
    a, b = _states_of_both(monkeypatch, _tdp_state, "tdp", vcpus=vcpus,
                           bytes_per_vcpu=pages * 4096, uffd=uffd, policy=policy)
    assert a == b
    assert b["stats"]["tables_linked"] >= 4 and b["roots"] and len(b["tables"]) >= 5
    assert b["mm"]["populated_4k"] >= vcpus * pages  # written back by the compiled loop


@pytest.mark.parametrize(("config", "kw", "why"), [
    ("tdp", {"uffd": False, "policy": "pct"}, "policy pct"),
    ("tdp", {"uffd": False, "backing": "thp", "bytes_per_vcpu": 2 << 20}, "THP"),
    ("shadow", {"uffd": False}, "no compiled kernels"),
    ("legacy", {"uffd": False, "policy": "pct"}, "policy pct"),
    ("legacy", {"uffd": False, "backing": "thp", "bytes_per_vcpu": 2 << 20}, "THP"),
    ("legacy-no-ad", {"uffd": False}, "ept_ad=0"),
])
def test_auto_runs_the_exact_engine_and_says_why(config, kw, why):
    kw = {"vcpus": 2, "bytes_per_vcpu": 8 * 4096, **kw}
    params = configuration(config.removesuffix("-no-ad"))
    if config.endswith("-no-ad"):
        params = params.model_copy(update={"ept_ad": False})
    report = run_demand_paging(DemandPagingOptions(**kw), params)
    assert report.wall.engine == "exact"
    assert why in report.wall.engine_note
    with pytest.raises(InvalidConfig, match="compiled loop cannot run this"):
        run_demand_paging(DemandPagingOptions(engine="compiled", **kw), params)


@pytest.mark.parametrize("config", CONFIGS)
def test_a_seeded_mutant_runs_on_the_exact_engine(config):
    # the kernels implement the fixed code only: a mutant must not be silently ignored
    from mmu_core import mutants

    with mutants.enabled("no-flush-after-zap"):
        report = run_demand_paging(DemandPagingOptions(vcpus=2, bytes_per_vcpu=8 * 4096),
                                   configuration(config))
    assert report.wall.engine == "exact" and "mutant" in report.wall.engine_note


def test_legacy_near_its_page_limit_runs_the_exact_engine():
    # make_mmu_pages_available's reclaim is not compiled: a VM whose shadow page limit the
    # run could reach is refused up front, not stopped halfway
    from mmu_core.config import VMConfig
    from mmu_core.guest.machine import MachineSpec, build_machine
    from mmu_core.workloads.demand_paging import MODES
    from mmu_shadow.compiled import LegacyCompiled, direct_tables_needed

    spec = MachineSpec(vcpus=1, data_size=256 << 20, backing="anon", mode=MODES["4level"],
                       userfault=False, uffd_shared=False)
    vm = build_machine(spec, VMConfig(vcpus=1, params=configuration("legacy"))).vm
    try:
        kernels = LegacyCompiled(_shadow_mmu(vm))
        assert kernels.unsupported(vm) is None
        need = direct_tables_needed(vm.memslots[0].slots, vm.root_levels(vm.vcpus[0]))
        assert need > 64
        vm.hook.mmu_set_nr_mmu_pages(vm=vm, nr=64)
        assert "page limit (64 pages) could be reached" in kernels.unsupported(vm)
    finally:
        vm.destroy()


def test_a_legacy_kernel_state_it_does_not_model_is_one_clear_error(monkeypatch):
    # Were the page limit check bypassed, the kernel would reach reclaim, which it does not
    # model: the run stops with an error naming it rather than run on without reclaiming
    from mmu_core import MMUError
    from mmu_shadow.compiled import LegacyCompiled
    from mmu_shadow.shadow_mmu import ShadowMMU

    monkeypatch.setattr(ShadowMMU, "default_mmu_pages", lambda self: 64)
    monkeypatch.setattr(LegacyCompiled, "unsupported", lambda self, vm: None)
    with pytest.raises(MMUError, match="page limit was reached"):
        run_demand_paging(DemandPagingOptions(vcpus=1, bytes_per_vcpu=256 << 20, uffd=False,
                                              engine="compiled"), configuration("legacy"))


@pytest.mark.parametrize("config", CONFIGS)
def test_auto_takes_the_compiled_loop_when_it_can(config):
    report = run_demand_paging(DemandPagingOptions(vcpus=2, bytes_per_vcpu=8 * 4096,
                                                   uffd=False), configuration(config))
    assert report.wall.engine == "compiled" and report.wall.engine_note is None
    assert report.verified


def test_bad_engine_name_is_one_clear_error():
    with pytest.raises(ValueError, match="engine"):
        DemandPagingOptions(engine="fast")


def test_streamed_results_put_the_unexpected_ones_in_their_places():
    # The loop keeps only results unlike the expected ones (vCPU, op, the 3 words); the
    # sequence the report and the digest read rebuilds each vCPU's array from both
    import numpy as np

    from mmu_core.sim import fastloop as F

    def expected(i):
        return np.full((4, 3), i, dtype=np.int64)

    kept = np.array([[1, 2, 7, 8, 9], [0, 0, 5, 0, 0]], dtype=np.int64)
    res = F.StreamedResults(expected, kept, 2)
    assert len(res) == 2
    assert res[0].tolist() == [[5, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert res[1].tolist() == [[1, 1, 1], [1, 1, 1], [7, 8, 9], [1, 1, 1]]
    with pytest.raises(IndexError):
        res[2]


def test_programs_are_made_per_vcpu_and_expect_the_patterns():
    from mmu_core.guest.machine import DATA_GPA, page_patterns
    from mmu_core.hw import cpu as C
    from mmu_core.workloads.demand_paging import Programs

    progs = Programs(DemandPagingOptions(vcpus=3, bytes_per_vcpu=4 * 4096, uffd=False))
    assert len(progs) == 3 and progs[2].shape == (8, 3)
    assert progs[1][0].tolist() == [C.OP_WRITE, DATA_GPA + 4 * 4096,
                                    int(page_patterns(np.array([(DATA_GPA >> 12) + 4]))[0])]
    exp = progs.expected_results(1)
    assert (exp[:4] == 0).all() and (exp[4:, 0] == progs[1][:4, 2]).all()


def test_a_small_allocation_log_flushed_between_slices_agrees(monkeypatch):
    # The loop pauses when its allocation log is nearly full and Python replays it into
    # HostMemory.order: with 128 rows that happens every few dozen allocations
    from mmu_core.sim import fastloop as F

    monkeypatch.setattr(F, "LOG_ROWS", 128)
    exact, compiled = _both("tdp", vcpus=4, bytes_per_vcpu=64 * 4096, uffd=False)
    _same(exact, compiled)
    exact, compiled = _both("tdp", vcpus=2, bytes_per_vcpu=64 * 4096, uffd=True)
    _same(exact, compiled)


def test_a_kernel_not_importable_by_name_runs_uncached(monkeypatch):
    # A kernel defined in a function (a plugin author's experiment) cannot be named by the
    # loop's generated module: the loop is compiled in-process with it as an argument.
    import sys

    from numba import njit

    from mmu_core.sim import fastloop
    from mmu_tdp import compiled as tdp_compiled

    inner = tdp_compiled.tdp_kernel

    @njit(_nrt=False)
    def local_kernel(op, t, ks, ksu, kg, kstats, mem, free1, free_slots, pt, pt_slot, tag,
                     mapcount, frame_state, log, hva_pfn, hva_writable):
        return inner(op, t, ks, ksu, kg, kstats, mem, free1, free_slots, pt, pt_slot, tag,
                     mapcount, frame_state, log, hva_pfn, hva_writable)

    opts = dict(vcpus=2, bytes_per_vcpu=16 * 4096, uffd=True)
    named = run_demand_paging(DemandPagingOptions(engine="compiled", **opts), configuration("tdp"))
    monkeypatch.setattr(tdp_compiled.TdpCompiled, "kernel", staticmethod(local_kernel))
    local = run_demand_paging(DemandPagingOptions(engine="compiled", **opts), configuration("tdp"))
    assert None in fastloop._LOOP_MODULES  # the in-process loop ran
    a, b = named.model_dump(exclude={"wall"}), local.model_dump(exclude={"wall"})
    assert a == b and local.wall.engine == "compiled"
    # a kernel claiming a module that cannot be imported: the same, and no module left behind
    def unimportable(*args):
        return inner(*args)

    unimportable.__module__, unimportable.__qualname__ = "mmu_no_such_module", "kernel"
    monkeypatch.setattr(tdp_compiled.TdpCompiled, "kernel",
                        staticmethod(njit(_nrt=False)(unimportable)))
    lost = run_demand_paging(DemandPagingOptions(engine="compiled", **opts), configuration("tdp"))
    assert lost.model_dump(exclude={"wall"}) == a
    assert not [m for m in sys.modules if "mmu_no_such_module" in m]


def test_the_loop_comes_from_numbas_cache_in_a_new_process(tmp_path):
    # The point of the generated loop module: a second process loads the compiled loop from
    # disk instead of compiling it again (about 5 s). Each process reports its cache hits.
    import subprocess
    import sys

    script = (
        "from mmu_core.params import configuration\n"
        "from mmu_core.sim import fastloop\n"
        "from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging\n"
        "r = run_demand_paging(DemandPagingOptions(vcpus=2, bytes_per_vcpu=8 * 4096,"
        " engine='compiled'), configuration('legacy'))\n"
        "(m,) = [m for k, m in fastloop._LOOP_MODULES.items() if k is not None]\n"
        "print(r.wall.engine, sum(m.run_loop.stats.cache_hits.values()), r.digest)\n")
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=600, check=True).stdout.split() for _ in range(2)]
    assert runs[0][0] == runs[1][0] == "compiled" and runs[0][2] == runs[1][2]
    assert int(runs[1][1]) == 1  # the second process compiled nothing
