"""The figures of docs/nested.md: demand_paging_test in L1 and in L2 (eager and lazy EPT12),
under tdp and legacy, in virtual time, with the EPT02 shadow pages the nested backend built.

Each row is one `run_demand_paging` (8 vCPUs, userfaultfd, 4-level guest paging, seed 0,
the default CostModel). Besides the report's figures it reads, just before the VM is torn
down, the nested instance's counters: EPT02 shadow pages (guest_mode pages in the shadow
MMU's hash) and EPT02 leaves built per size.

Run: python benchmarks/nested_figures.py [-b 4M 16M] [--backing anon thp] [--no-uffd]
         [--configs tdp legacy] [--runs off eager lazy]
"""

from __future__ import annotations

import argparse

import mmu_core.workloads.demand_paging as dp
from mmu_core import Role
from mmu_core.params import CONFIGURATIONS
from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging

_ORIG = dp.run_in_l2


def _snapshotting_run_in_l2(snap: dict):
    """dp.run_in_l2, also arranging for the nested counters to be read at teardown."""
    orig = _ORIG

    def run_in_l2(machine, prefault=True):
        l2 = orig(machine, prefault=prefault)
        vm = machine.vm
        inst = vm.managers[Role.NESTED].get_plugin("shadow")
        destroy = vm.destroy

        def destroy_and_count():
            snap.update(inst.nested_counters())
            destroy()
        vm.destroy = destroy_and_count
        return l2
    return run_in_l2


def row(size: str, nested: str, config: str, backing: str, uffd: bool = True) -> dict:
    snap: dict = {}
    dp.run_in_l2 = _snapshotting_run_in_l2(snap)
    try:
        mib = int(size.rstrip("M"))
        opts = DemandPagingOptions(vcpus=8, bytes_per_vcpu=mib << 20, nested=nested,
                                   backing=backing, uffd=uffd)
        r = run_demand_paging(opts, CONFIGURATIONS[config])
    finally:
        dp.run_in_l2 = _ORIG
    faults = sum(r.faults.values())
    l2_faults = r.exits.get("l2_ept_violation", 0)
    return dict(size=size, run="L1" if nested == "off" else f"L2 {nested}", config=config,
                backing=backing, rate=r.pages_per_sec, faults=faults,
                per_fault=r.exits.get("reflected_to_l1", 0) / l2_faults if l2_faults else 0.0,
                ept12_writes=r.exits.get("ept12_write", 0),
                ept02_pages=snap.get("ept02_pages", 0),
                huge=f"{snap.get('ept02_mapped_4k', 0)}/{snap.get('ept02_mapped_2m', 0)}"
                     f"/{snap.get('ept02_mapped_1g', 0)}" if snap else "-",
                lock=r.lock_wait_share, digest=r.digest, verified=r.verified)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-b", nargs="*", default=["4M", "16M"], help="MiB per vCPU, as 4M")
    ap.add_argument("--backing", nargs="*", default=["anon"])
    ap.add_argument("--configs", nargs="*", default=["tdp", "legacy"])
    ap.add_argument("--runs", nargs="*", default=["off", "eager", "lazy"])
    ap.add_argument("--no-uffd", action="store_true", help="fault pages in without "
                    "userfaultfd (THP then maps 2M pages)")
    args = ap.parse_args()
    print("| -b | backing | run | configuration | pages/s (virtual) | faults | exits to L1 per "
          "fault | EPT12-write exits | EPT02 shadow pages | EPT02 leaves 4K/2M/1G | "
          "MMU-lock wait share | digest |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.b:
        for backing in args.backing:
            for nested in args.runs:
                for config in args.configs:
                    x = row(size, nested, config, backing, not args.no_uffd)
                    assert x["verified"], x
                    print(f"| {size} | {backing} | {x['run']} | {config} | {x['rate']:,.0f} | "
                          f"{x['faults']:,} | {x['per_fault']:.3f} | {x['ept12_writes']:,} | "
                          f"{x['ept02_pages'] if x['run'] != 'L1' else '-'} | {x['huge']} | "
                          f"{x['lock']:.3f} | {x['digest'][:16]} |", flush=True)


if __name__ == "__main__":
    main()
