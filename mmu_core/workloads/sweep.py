"""Sweeps: one workload over a grid of configurations x vCPU counts, in parallel.

Each point is one demand-paging run in its own worker process (or on a Dask cluster). Finished
points are appended to OUT.jsonl as they complete (one report per line), so an interrupted
sweep resumes where it stopped: points already in the file are not run again. When the grid
is complete, OUT.csv holds one row per point in grid order, with the figures the seed's
scaling picture needs. A point's report does not depend on where or in which order it ran.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmu_core.errors import InvalidConfig
from mmu_core.params import Params, configuration, report_params
from mmu_core.report.models import SCHEMA_VERSION, DemandPagingReport
from mmu_core.workloads.demand_paging import (
    DemandPagingOptions,
    host_bytes_available,
    run_demand_paging,
)
from mmu_core.workloads.parallel import check_parallel_memory, host_bytes

CSV_SCHEMA = 1
CSV_FIELDS = ("csv_schema", "report_schema", "configuration", "vcpus", "bytes_per_vcpu",
              "policy", "seed", "pages_per_sec", "per_vcpu_pages_per_sec", "lock_wait_share",
              "total_time_ns", "faults", "digest")


@dataclass(frozen=True)
class Point:
    configuration: str
    vcpus: int

    def key(self) -> tuple[str, int]:
        return (self.configuration, self.vcpus)


def _run_point(args: tuple[dict, dict]) -> str:
    params, opts = args
    return run_demand_paging(DemandPagingOptions(**opts),
                             Params.model_validate(params)).model_dump_json()


def _done(path: Path, opts: DemandPagingOptions,
          params: dict[str, dict[str, str]]) -> dict[tuple[str, int], DemandPagingReport]:
    """Reports already in OUT.jsonl for this sweep's options and each configuration's
    parameters (`params`: configuration -> its report_params) (resume)."""
    done: dict[tuple[str, int], DemandPagingReport] = {}
    if not path.exists():
        return done
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = DemandPagingReport.model_validate_json(line)
        except ValueError:
            raise InvalidConfig("out", f"{path}:{n} is not a report line; move the file away "
                                "or choose another --out") from None
        same = (r.bytes_per_vcpu, r.uffd, r.backing, r.paging_mode, r.seed,
                r.schedule.policy) == (opts.bytes_per_vcpu, opts.uffd, opts.backing, opts.mode,
                                        opts.seed, opts.policy)
        if not same:
            raise InvalidConfig("out", f"{path} holds a sweep with other options (line {n}); "
                                "choose another --out")
        if r.configuration in params and r.params != params[r.configuration]:
            raise InvalidConfig("out", f"{path} holds a sweep with other parameters for "
                                f"'{r.configuration}' (line {n}); choose another --out")
        done[(r.configuration, r.vcpus)] = r
    return done


def sweep(configs: list[str | tuple[str, Params]], vcpu_counts: list[int],
          opts: DemandPagingOptions, out: Path, workers: int = 1, scheduler: str | None = None,
          progress: Callable[[int, int], None] | None = None) -> list[DemandPagingReport]:
    """Run every (configuration, vCPUs) point not yet in OUT.jsonl; write OUT.csv; return
    the reports in grid order (configurations, then vCPU counts). A configuration is a name
    (its default parameters) or (name, Params)."""
    if not configs or not vcpu_counts:
        raise InvalidConfig("sweep", "needs at least one configuration and one vCPU count")
    chosen = [(c, configuration(c)) if isinstance(c, str) else c for c in configs]
    by_name = {name: params for name, params in chosen}
    points = [Point(name, v) for name, _ in chosen for v in vcpu_counts]
    per_point = {v: opts.model_copy(update={"vcpus": v}).model_dump() for v in vcpu_counts}
    for v in vcpu_counts:
        DemandPagingOptions(**per_point[v])  # every point's options are valid before any runs
    jsonl, table = out.with_suffix(".jsonl"), out.with_suffix(".csv")
    done = _done(jsonl, opts, {n: report_params(p) for n, p in by_name.items()})
    todo = [p for p in points if p.key() not in done]
    total = len(points)
    if progress:
        progress(total - len(todo), total)

    def record(text: str) -> None:
        report = DemandPagingReport.model_validate_json(text)
        done[(report.configuration, report.vcpus)] = report
        with jsonl.open("a", encoding="utf-8") as f:
            f.write(text + "\n")  # appended at once: a point is in the file whole or not at all
        if progress:
            progress(total - sum(p.key() not in done for p in points), total)

    args = [(by_name[p.configuration].model_dump(), per_point[p.vcpus]) for p in todo]
    if not scheduler:  # on a Dask cluster the workers' machines decide
        check_parallel_memory([host_bytes(DemandPagingOptions(**per_point[p.vcpus]),
                                          by_name[p.configuration]) for p in todo], workers,
                              host_bytes_available())
    if scheduler:
        try:
            from dask.distributed import Client, as_completed
        except ImportError:
            raise InvalidConfig("scheduler", "a Dask scheduler needs the 'dask' extra") from None
        with Client(scheduler) as client:
            for fut in as_completed(client.map(_run_point, args, pure=False)):
                record(fut.result())
    elif workers <= 1 or len(args) <= 1:
        for a in args:
            record(_run_point(a))
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for fut in cf.as_completed([pool.submit(_run_point, a) for a in args]):
                record(fut.result())
    reports = [done[p.key()] for p in points]
    _write_csv(table, reports)
    return reports


def _write_csv(path: Path, reports: list[DemandPagingReport]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in reports:
            per_vcpu = sum(v.pages_per_sec for v in r.per_vcpu) / len(r.per_vcpu)
            w.writerow([CSV_SCHEMA, SCHEMA_VERSION, r.configuration, r.vcpus, r.bytes_per_vcpu,
                        r.schedule.policy, r.seed, f"{r.pages_per_sec:.1f}", f"{per_vcpu:.1f}",
                        f"{r.lock_wait_share:.6f}", r.total_time_ns, sum(r.faults.values()),
                        r.digest])


def load_jsonl(path: Path) -> list[DemandPagingReport]:
    return [DemandPagingReport.model_validate_json(line)
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["CSV_FIELDS", "CSV_SCHEMA", "Point", "load_jsonl", "sweep"]
