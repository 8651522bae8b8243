"""Faults per wall second and host bytes per guest page, exact engine against the compiled loop
(docs/fastloop.md), on demand paging under tdp and legacy, without userfaultfd or (--uffd)
with one uffd and handler per vCPU, or (--uffd-shared) one uffd shared by a reader per vCPU.

Each run is a fresh process (so peak RSS is its own); bytes per guest page is the slope of
peak RSS between each run and the smallest run of the same engine. The compiled loop's first
run in a process includes compiling the loop (about 5 s): each measured run follows a small
warm-up run in its process.

    python benchmarks/fastloop.py                      # -v 8 -b 64M and -v 416 -b 4M
    python benchmarks/fastloop.py --runs 8x64M 416x16M --engines compiled --configs legacy
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def _one(vcpus: int, size: str, engine: str, config: str, queue, uffd: bool = False,
         host_cpus: int | None = 448, uffd_shared: bool = False) -> None:
    import resource

    from cli import parse_size
    from mmu_core.params import configuration
    from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging

    # a small run first, so that compiling (the compiled loop's, about 5 s, or anything
    # numba's cache lacks) is not in the figures
    run_demand_paging(DemandPagingOptions(vcpus=2, bytes_per_vcpu=1 << 20, uffd=uffd,
                                          engine=engine, host_cpus=host_cpus),
                      configuration(config))
    opts = DemandPagingOptions(vcpus=vcpus, bytes_per_vcpu=parse_size(size), uffd=uffd,
                               engine=engine, host_cpus=host_cpus, uffd_shared=uffd_shared)
    t0 = time.perf_counter()
    r = run_demand_paging(opts, configuration(config))
    wall = time.perf_counter() - t0
    queue.put({"faults": sum(r.faults.values()), "wall": wall, "engine": r.wall.engine,
               "pages": r.pages, "total_ns": r.total_time_ns, "digest": r.digest,
               "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def run(vcpus: int, size: str, engine: str, config: str = "tdp", uffd: bool = False,
        host_cpus: int | None = 448, uffd_shared: bool = False) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_one, args=(vcpus, size, engine, config, queue, uffd, host_cpus,
                                       uffd_shared))
    p.start()
    out = queue.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", default=["8x64M", "416x4M"],
                    help="VCPUSxSIZE, e.g. 8x64M")
    ap.add_argument("--engines", nargs="*", default=["exact", "compiled"])
    ap.add_argument("--configs", nargs="*", default=["tdp", "legacy"],
                    help="configurations with compiled kernels")
    ap.add_argument("--baseline", default="8x4M", help="the small run bytes/page is taken from")
    ap.add_argument("--uffd", action="store_true", help="serve the faults with userfaultfd "
                    "(one uffd and handler per vCPU)")
    ap.add_argument("--uffd-shared", action="store_true", help="one uffd for all vCPUs and a "
                    "reader per vCPU (the selftest's -a)")
    ap.add_argument("--host-cpus", type=int, default=448, help="0: unlimited")
    args = ap.parse_args()
    extra = {"uffd": args.uffd or args.uffd_shared, "host_cpus": args.host_cpus or None,
             "uffd_shared": args.uffd_shared}
    print(f"{'run':>10} {'config':>7} {'engine':>9} {'faults':>11} {'wall s':>8} "
          f"{'faults/s':>11} {'peak RSS':>9} {'B/page':>7} {'virtual ms':>11}  digest",
          flush=True)
    for config in args.configs:
        for engine in args.engines:
            v, s = args.baseline.split("x")
            base = run(int(v), s, engine, config, **extra)
            for spec in args.runs:
                v, s = spec.split("x")
                r = run(int(v), s, engine, config, **extra)
                per_page = ((r["rss"] - base["rss"]) / (r["pages"] - base["pages"])
                            if r["pages"] > base["pages"] else float("nan"))
                print(f"{spec:>10} {config:>7} {r['engine']:>9} {r['faults']:>11,} "
                      f"{r['wall']:>8.1f} {r['faults'] / r['wall']:>11,.0f} "
                      f"{r['rss'] / 2**30:>8.2f}G {per_page:>7.0f} "
                      f"{r['total_ns'] / 1e6:>11.3f}  {r['digest'][:12]}", flush=True)


if __name__ == "__main__":
    main()
