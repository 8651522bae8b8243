"""The host model's two published shapes, printed beside the published figures (docs/engine.md).

1. `uffd`: demand_paging_test with one userfaultfd shared by all vCPUs and one reader per
   vCPU (-a), and with one uffd per vCPU, from 1 to 256 vCPUs: the overall paging rate beside
   Anish Moorthy's 2023 measurements ("KVM: Improve scalability of KVM + userfaultfd live
   migration via annotated memory faults", cover letter: 150 K pages/s at 1 vCPU, 210 at 4,
   36 at 256; -a, one reader per vCPU, a 256-core host).
2. `seed`: the seed's demand-paging experiment (tdp and legacy, one uffd per vCPU) at N vCPUs:
   lock wait as a share of vCPU time and of on-CPU time, the tdp/legacy time ratio, and
   where tdp's time goes, beside the RFC's 98% and -89%.

    python benchmarks/host_model.py uffd [--bytes 1M] [--vcpus 1,2,4,...]
    python benchmarks/host_model.py seed [--vcpus 416] [--bytes 4M]

Figures are virtual time from the default cost model; nothing here is fitted.
"""

from __future__ import annotations

import argparse
import time

from mmu_core.params import CONFIGURATIONS
from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging

#: vCPUs -> overall paging rate, K pages/s, without the series (the letter's first column)
LETTER_2023 = {1: 150, 2: 191, 4: 210, 8: 155, 16: 130, 32: 108, 64: 86, 128: 62, 256: 36}


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def uffd(vcpus: list[int], size: int) -> None:
    print(f"{'vCPUs':>5} {'letter K/s':>10} {'shared K/s':>10} {'per-vCPU uffd K/s':>17} "
          f"{'woken for nothing':>17} {'wall s':>6}")
    for v in vcpus:
        t0 = time.perf_counter()
        rates = []
        empty = 0
        for shared in (True, False):
            r = run_demand_paging(DemandPagingOptions(vcpus=v, bytes_per_vcpu=size, seed=1,
                                                      uffd_shared=shared), CONFIGURATIONS["tdp"])
            assert r.verified
            rates.append(r.pages_per_sec / 1e3)
            if shared:
                empty = r.host.uffd_empty_reads
        letter = LETTER_2023.get(v)
        print(f"{v:>5} {letter if letter else '-':>10} {rates[0]:>10.1f} {rates[1]:>17.1f} "
              f"{empty:>17,} {time.perf_counter() - t0:>6.1f}", flush=True)


def seed(vcpus: int, size: int) -> None:
    reports = {}
    for name in ("tdp", "legacy"):
        t0 = time.perf_counter()
        r = run_demand_paging(DemandPagingOptions(vcpus=vcpus, bytes_per_vcpu=size, seed=1),
                              CONFIGURATIONS[name])
        assert r.verified
        reports[name] = r
        h, t = r.host, r.time
        print(f"{name:>6}: {r.total_time_ns / 1e6:,.2f} ms virtual, lock wait "
              f"{100 * r.lock_wait_share:.1f}% of vCPU time, {100 * h.lock_wait_share_on_cpu:.1f}% "
              f"of vCPU on-CPU time, {100 * h.profile_lock_share:.1f}% of all on-CPU time; "
              f"gup+userfault {100 * t.gup_ns / t.total_ns:.1f}% of vCPU time; mmap lock line "
              f"{h.mmap_lock_transfers:,} transfers ({h.mmap_lock_line_wait_ns / 1e6:,.1f} ms "
              f"queued), MMU lock line {h.mmu_lock_transfers:,} ({h.mmu_lock_line_wait_ns / 1e6:,.1f}"
              f" ms); {time.perf_counter() - t0:.0f} s wall", flush=True)
    tdp, legacy = reports["tdp"].total_time_ns, reports["legacy"].total_time_ns
    print(f"tdp vs legacy: {100 * (tdp - legacy) / legacy:+.1f}% total time "
          f"(the RFC: -89%; legacy lock wait 98% of a 1-second profile)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["uffd", "seed"])
    ap.add_argument("--vcpus", default=None, help="uffd: a comma-separated list; seed: one count")
    ap.add_argument("--bytes", default=None, help="memory per vCPU (1M, 4M, ...)")
    args = ap.parse_args()
    if args.what == "uffd":
        counts = [int(v) for v in (args.vcpus or ",".join(map(str, LETTER_2023))).split(",")]
        uffd(counts, _size(args.bytes or "1M"))
    else:
        seed(int(args.vcpus or 416), _size(args.bytes or "4M"))


if __name__ == "__main__":
    main()
