"""The benchmark suite (pytest-benchmark): run it with `python benchmarks/run.py`.

Every figure of issue 12's table, each beside QEMU's where QEMU has one (benchmarks/qemu_side.py,
through Unicorn, skipped with a message when Unicorn is not installed), the NRT allocation
counts of the hot paths, the range operations on a 1M-leaf EPT, and the exact engine's
simulated faults per second on the demand-paging workload at two sizes. See docs/benchmarks.md.
"""

from __future__ import annotations

import hot_paths as H
import numpy as np
import pytest
import qemu_side as Q
from conftest import TABLE, record

from mmu_core.hw import cpu as C

MISS_1D = "TLB miss, 1-D walk (shadow paging)"
MISS_2D = "TLB miss, 2-D walk (tdp)"
PSC_NOTE = "paging-structure caches on, as the model's hardware runs"
FULL_NOTE = "no paging-structure caches: every level read, as QEMU walks"


def rounds(quick: bool) -> int:
    return 3 if quick else 9


# --- QEMU's softmmu through Unicorn ----------------------------------------------------------
@pytest.mark.parametrize("what", ["hit", "miss"])
def test_qemu(benchmark, quick, what):
    if not Q.available():
        TABLE.qemu_missing = Q.MISSING
        pytest.skip(Q.MISSING)
    npages, reads = (H.HIT_PAGES, H.HIT_READS) if what == "hit" else (H.MISS_PAGES, H.MISS_READS)
    chase = Q.Chase(npages)
    assert chase.run(npages) == chase.start
    benchmark.pedantic(chase.run, args=(reads,), rounds=rounds(quick), warmup_rounds=1)
    ns = benchmark.stats.stats.min / reads * 1e9
    benchmark.extra_info.update(figure=f"qemu_{what}", value=ns, unit="ns/access")
    for key in (["tlb_hit"] if what == "hit" else ["miss_1d", "miss_1d_full"]):
        TABLE.qemu[key] = ns


# --- our access paths --------------------------------------------------------------------------
def test_tlb_hit(benchmark, quick):
    m = H.build(H.HIT_PAGES, two_d=False)
    run = m.runner(H.HIT_READS, 1024, True)
    benchmark.pedantic(run, rounds=rounds(quick), warmup_rounds=1)
    assert int(run.stats[C.ST_WALKS]) == H.HIT_PAGES  # the first lap only
    record(benchmark, "tlb_hit", "TLB hit, 5M reads over 64 pages",
           benchmark.stats.stats.min / H.HIT_READS * 1e9, "ns/access", target=5)


@pytest.mark.parametrize("two_d", [False, True], ids=["1d", "2d"])
@pytest.mark.parametrize("psc", [True, False], ids=["psc", "full"])
def test_tlb_miss(benchmark, quick, two_d, psc):
    m = H.build(H.MISS_PAGES, two_d=two_d)
    run = m.runner(H.MISS_READS, 1, psc)  # a one-entry TLB: every access walks
    benchmark.pedantic(run, rounds=rounds(quick), warmup_rounds=1)
    assert int(run.stats[C.ST_TLB_HITS]) == 0
    key = ("miss_2d" if two_d else "miss_1d") + ("" if psc else "_full")
    record(benchmark, key, MISS_2D if two_d else MISS_1D,
           benchmark.stats.stats.min / H.MISS_READS * 1e9, "ns/access",
           target=130 if two_d else 45, note=PSC_NOTE if psc else FULL_NOTE)


# --- no NRT allocation per access or per SPTE ----------------------------------------------------
def test_nrt_allocations_per_access(benchmark):
    runs = []
    for two_d in (False, True):
        m = H.build(1024, two_d)
        for tlb, psc in ((1, True), (1, False), (1024, True)):
            run = m.runner(100_000, tlb, psc)
            run()
            runs.append(run)
    total = benchmark.pedantic(lambda: sum(H.nrt_allocations(r) for r in runs), rounds=1)
    record(benchmark, "nrt_access", "NRT allocations per 1M accesses (hits, 1-D and 2-D walks)",
           total / (len(runs) * 100_000) * 1e6, "allocations", target=0)


def test_nrt_allocations_per_spte(benchmark):
    from mmu_tdp import ops

    sizes = (1 << 12, 1 << 16)
    counts = []
    for leaves in sizes:
        mem, root, _ = H.ept_with_leaves(leaves)
        u = np.zeros(6, np.int64)

        def work(mem=mem, root=root, leaves=leaves, u=u):
            for mode in (ops.WRPROT, ops.CLEAR_DIRTY, ops.AGE, ops.ZAP):
                ops.update_leafs_in_range(mem.pt, mem.pt_slot, root, 4, 0, leaves, 1 << 40, mode,
                                          1, u)

        work()
        counts.append(H.nrt_allocations(work))
    benchmark.pedantic(lambda: None, rounds=1)
    per_spte = (counts[1] - counts[0]) / (4 * (sizes[1] - sizes[0]))
    record(benchmark, "nrt_spte", "NRT allocations per 1M SPTEs (range operations)",
           per_spte * 1e6, "allocations", target=0)


# --- range operations on a 1M-leaf EPT -------------------------------------------------------------
RANGE_PATHS = {
    "zap": "zap of 1M 4K leaves (zap_leafs_in_range)",
    "wrprot": "write-protect (update_leafs_in_range WRPROT)",
    "clear_dirty": "D-bit clearing (update_leafs_in_range CLEAR_DIRTY)",
    "age": "aging (update_leafs_in_range AGE)",
    "collect": "collect_tables over the same EPT",
    "census": "leaf_census (the audit's count)",
    "freeze": "freeze_subtree of the whole EPT (handle_removed_pt)",
}


@pytest.mark.parametrize("op", list(RANGE_PATHS))
def test_range_operation(benchmark, quick, op):
    mem, root, pristine = H.ept_with_leaves()
    call = H.range_call(op, mem, root)
    benchmark.pedantic(call, setup=lambda: mem.pt.__setitem__(slice(None), pristine),
                       rounds=rounds(quick), warmup_rounds=1)
    ns = benchmark.stats.stats.min / H.RANGE_LEAVES * 1e9
    benchmark.extra_info["ns_per_spte"] = ns
    record(benchmark, op, RANGE_PATHS[op], 1e3 / ns, "M SPTEs/s", better="higher", target=500,
           note=f"{ns:.2f} ns/SPTE")


# --- the exact engine: demand paging ----------------------------------------------------------------
POINTS = ("8x16M", "64x4M")


@pytest.mark.parametrize("config", ["tdp", "legacy", "shadow"])
@pytest.mark.parametrize("point", POINTS)
def test_demand_paging(benchmark, quick, point, config):
    from mmu_core.params import configuration
    from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging

    if quick and point != POINTS[0]:
        pytest.skip("--bench-quick: the smaller point only")
    vcpus, size = point.split("x")
    opts = DemandPagingOptions(vcpus=int(vcpus), bytes_per_vcpu=int(size[:-1]) << 20)
    reports = []

    def run():
        reports.append(run_demand_paging(opts, configuration(config)))

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    report = reports[-1]
    faults = sum(report.faults.values())
    cpu = benchmark.stats.stats.min
    record(benchmark, f"dp_{point}_{config}", f"demand paging -v {vcpus} -b {size}, {config}",
           faults / cpu, "faults/s", better="higher",
           note=f"exact engine, {faults} faults; {report.wall.sim_faults_per_sec:,.0f}/s wall")
