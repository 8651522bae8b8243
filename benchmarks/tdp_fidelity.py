"""The TDP MMU patch letters, reproduced: each change measured with and without it.

Every experiment runs a workload twice on the tdp configuration, once with the change undone
(`tdp_mmu_revert`, or KVM's own `eager_page_split`) and once with it, with one cost model
(the default CostModel) for all of them and for demand paging. It prints the published figures
next to the measured ones and the two ratios. Scales are smaller than the letters' where the
ratio does not depend on them; docs/tdp.md says which and why.

Run: python benchmarks/tdp_fidelity.py [--only NAME ...] [--scale F] [--json FILE]
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import fidelity_table

from mmu_core import VMConfig
from mmu_core.guest.machine import MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.params import CONFIGURATIONS
from mmu_core.workloads.dirty_log_perf import DirtyLogPerfOptions, run_dirty_log_perf


@dataclass
class Experiment:
    name: str
    change: str
    letter: str  # the published setup
    figure: str  # which time
    published: tuple[float, float]  # seconds without, with the change
    scale: str  # what we ran instead, and why the ratio survives it


EXPERIMENTS = [
    Experiment("fast-pf", "fast page fault for the TDP MMU",
               "64 vCPUs x 1 GiB, A/D and PML off", "iteration 2 dirty memory time",
               (3.545, 0.315),
               "64 vCPUs x 4 MiB: the time is per fault, and contention needs the 64 vCPUs"),
    Experiment("eager-split-dirty", "eager page splitting",
               "96 vCPUs x 1 GiB on 1 GiB pages", "iteration 1 dirty memory time",
               (2.944, 0.146),
               "16 vCPUs x 32 MiB on 2 MiB pages (THP): per-4K-page work either way"),
    Experiment("eager-split-enable", "eager page splitting",
               "96 vCPUs x 1 GiB on 1 GiB pages", "enabling dirty logging time",
               (0.0017, 1.547),
               "the same run as eager-split-dirty"),
    Experiment("atomic-clear-d", "clearing D bits with an atomic AND",
               "160 vCPUs x 1 GiB", "clear dirty log time (all iterations)",
               (3.309, 1.968),
               "8 vCPUs x 64 MiB: the main task clears, per SPTE, with the vCPUs idle"),
    Experiment("split-on-fault", "splitting huge pages on fault (NX huge pages)",
               "96 vCPUs, 1 GiB pages, nx_huge_pages=1", "executing time",
               (2.900, 0.112),
               "16 vCPUs x 32 MiB on 2 MiB pages (THP): faults per huge page either way"),
    Experiment("recover-in-place", "recovering huge pages in place",
               "96 vCPUs x 1 GiB on 1 GiB pages", "disabling dirty logging time",
               (256.68, 3.17),
               "16 vCPUs x 32 MiB on 2 MiB pages (THP), vCPUs running while it disables"),
]


def _dirty_log(params_update: dict, **opts) -> dict:
    params = CONFIGURATIONS["tdp"].model_copy(update=params_update)
    t0 = time.perf_counter()
    r = run_dirty_log_perf(DirtyLogPerfOptions(**opts), params)
    return {"report": r, "wall": time.perf_counter() - t0}


def _execute(params_update: dict, vcpus: int, per_vcpu: int) -> tuple[float, float]:
    """The NX experiment: each vCPU writes every 4K page of its region (mapped huge and, with
    nx_huge_pages, not executable), then executes from every page; returns (virtual seconds
    of the executing phase, wall seconds)."""
    params = CONFIGURATIONS["tdp"].model_copy(update={"nx_huge_pages": True,
                                                      "nx_huge_pages_recovery_ratio": 0,
                                                      **params_update})
    t0 = time.perf_counter()
    m = build_machine(MachineSpec(vcpus=vcpus, data_size=vcpus * per_vcpu, backing="thp"),
                      VMConfig(vcpus=vcpus, params=params))
    try:
        def programs(op):
            out = []
            for i in range(vcpus):
                base, size = m.vcpu_region(i)
                prog = Program()
                for gva in range(base, base + size, 4096):
                    prog = prog.write(gva, 1) if op == "write" else prog.fetch(gva)
                out.append(prog.build())
            return out
        m.run_programs(programs("write"))
        start = m.vm.engine.now
        m.run_programs(programs("fetch"))
        return (m.vm.engine.now - start) / 1e9, time.perf_counter() - t0
    finally:
        m.vm.destroy()


def _s(ns: int | None) -> float:
    return (ns or 0) / 1e9


def measure(name: str, scale: float) -> tuple[float, float, float]:
    """(without, with) the change in virtual seconds, and the wall time spent."""
    mib = lambda n: max(2, int(n * scale)) << 20  # noqa: E731
    if name == "fast-pf":
        common = dict(vcpus=64, bytes_per_vcpu=max(1, int(4 * scale)) << 20, iterations=2)
        off = {"ept_ad": False, "pml": False}
        a = _dirty_log({**off, "tdp_mmu_revert": "fast-pf"}, **common)
        b = _dirty_log(off, **common)
        return (_s(a["report"].per_iteration[1].dirty_memory_ns),
                _s(b["report"].per_iteration[1].dirty_memory_ns), a["wall"] + b["wall"])
    if name.startswith("eager-split"):
        common = dict(vcpus=16, bytes_per_vcpu=mib(32), iterations=2, backing="thp",
                      manual_protect=False)
        a = _dirty_log({"eager_page_split": False}, **common)
        b = _dirty_log({"eager_page_split": True}, **common)
        if name == "eager-split-dirty":
            return (_s(a["report"].per_iteration[0].dirty_memory_ns),
                    _s(b["report"].per_iteration[0].dirty_memory_ns), a["wall"] + b["wall"])
        return (_s(a["report"].enable_dirty_logging_ns), _s(b["report"].enable_dirty_logging_ns),
                a["wall"] + b["wall"])
    if name == "atomic-clear-d":
        common = dict(vcpus=8, bytes_per_vcpu=mib(64), iterations=2)
        a = _dirty_log({"tdp_mmu_revert": "atomic-clear-d"}, **common)
        b = _dirty_log({}, **common)
        return (_s(a["report"].clear_dirty_log_total_ns), _s(b["report"].clear_dirty_log_total_ns),
                a["wall"] + b["wall"])
    if name == "split-on-fault":
        a = _execute({"tdp_mmu_revert": "split-on-fault"}, 16, mib(32))
        b = _execute({}, 16, mib(32))
        return a[0], b[0], a[1] + b[1]
    if name == "recover-in-place":
        common = dict(vcpus=16, bytes_per_vcpu=mib(32), iterations=2, backing="thp",
                      run_while_disabling=True)
        a = _dirty_log({"tdp_mmu_revert": "recover-in-place"}, **common)
        b = _dirty_log({}, **common)
        return (_s(a["report"].disable_dirty_logging_ns), _s(b["report"].disable_dirty_logging_ns),
                a["wall"] + b["wall"])
    raise SystemExit(f"unknown experiment {name!r}")


def main() -> None:
    fidelity_table.main(__doc__.splitlines()[0], EXPERIMENTS, lambda e, scale: measure(e.name, scale),
                        lambda e: {"change": e.change, "figure": e.figure,
                                   "letter": e.letter, "scale": e.scale})


if __name__ == "__main__":
    main()
