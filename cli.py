"""The `mmu` command: run VMs on a chosen MMU backend and compare configurations.

Thin by design: it parses, calls mmu_core, and renders. Bad input prints one line naming the
problem and exits 2; a parity failure in `compare` exits 1; Ctrl-C prints one line and exits
130 (the engine stops at a switch point and the VM is torn down cleanly).
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

try:
    import typer
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table

    import mmu_core
    from mmu_core import InvalidConfig, MMUError, Params, load_params, plugins
    from mmu_core.params import CONFIGURATIONS, configuration
    from mmu_core.report.models import REPORTS, CompareReport, DemandPagingReport
    from mmu_core.sim.engine import (
        DEFAULT_HOST_CPUS,
        DEFAULT_JITTER_NS,
        DEFAULT_PCT_DEPTH,
        DEFAULT_PCT_STEPS,
    )
    from mmu_core.workloads.checks import CheckFailed
except KeyboardInterrupt:  # Ctrl-C while these load (numba's cache takes a second or two)
    sys.stderr.write("mmu: interrupted\n")
    sys.exit(130)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="A pluggable model of the Linux KVM x86 MMU.")
run_app = typer.Typer(no_args_is_help=True, help="Run a workload on one configuration.")
compare_app = typer.Typer(no_args_is_help=True,
                          help="Run a workload on several configurations; check parity.")
app.add_typer(run_app, name="run")
app.add_typer(compare_app, name="compare")
sweep_app = typer.Typer(no_args_is_help=True,
                        help="Run a workload over configurations x vCPU counts, in parallel.")
app.add_typer(sweep_app, name="sweep")
out = Console()
err = Console(stderr=True)

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'16M' -> 16 MiB, as the selftests' parse_size does (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise InvalidConfig("--bytes-per-vcpu", f"cannot parse size '{text}' (try 64M, 1G, 4096)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


# typer >= 0.26 carries its own copy of click; its usage-error base class is reached through
# the public BadParameter rather than a private module.
_USAGE_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


# --- info commands ------------------------------------------------------------------------------
def _capabilities(caps) -> str:
    """One cell: what a backend declares beyond the required hooks (types.Capabilities)."""
    parts = [f"faults: {caps.fault_lock} lock", f"dirty log: {caps.dirty_log}",
             f"roots <= {caps.max_root_level} levels"]
    for flag, label in (("huge_pages", "huge pages"), ("mmio_spte", "MMIO SPTEs"),
                        ("fast_page_fault", "fast path"), ("aging", "aging"),
                        ("audit", "audit")):
        if getattr(caps, flag):
            parts.append(label)
    return ", ".join(parts)


def _warn_broken() -> None:
    """One line per backend entry point that discovery skipped (the rest still work)."""
    for b in plugins.broken_backends():
        err.print(f"mmu: warning: {b.line()}", highlight=False, soft_wrap=True)


@app.command()
def backends() -> None:
    """Installed backends: versions, MMU roles, capabilities; and entry points that failed."""
    table = Table("name", "version", "roles", "capabilities", "source", "description")
    for name, b in sorted(mmu_core.discover().items()):
        table.add_row(name, b.info.version, ", ".join(r.value for r in b.info.roles),
                      _capabilities(b.info.capabilities), b.source, b.info.description)
    out.print(table)
    for b in plugins.broken_backends():
        out.print(f"broken: {b.line()}", highlight=False, soft_wrap=True)


ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file of parameters")]


@app.command()
def params(config: ConfigOpt = None) -> None:
    """Every module parameter, its value, and where the value came from."""
    _, sources = load_params(config)
    table = Table("parameter", "value", "source", "description")
    for s in sources:
        table.add_row(s.name, s.value, s.source, s.description)
    out.print(table)


# --- workloads -------------------------------------------------------------------------------------
VcpusOpt = Annotated[int, typer.Option("-v", "--vcpus", help="number of vCPUs")]
BytesOpt = Annotated[str, typer.Option("-b", "--bytes-per-vcpu", help="memory per vCPU (64M, 1G)")]
DelayOpt = Annotated[int, typer.Option("-d", "--uffd-delay-us", help="userfault handler delay, us")]
BackingOpt = Annotated[str, typer.Option("-s", "--backing", help="anon | thp | hugetlb")]
ModeOpt = Annotated[str, typer.Option("--mode", help="guest paging: 4level 5level pae 32bit none")]
UffdOpt = Annotated[bool, typer.Option("--uffd/--no-uffd", help="serve faults with userfaultfd")]
SharedOpt = Annotated[bool, typer.Option(
    "-a", "--uffd-shared", help="one userfaultfd for all vCPUs, read by a handler per vCPU")]
NestedOpt = Annotated[str, typer.Option(
    "-n", "--nested", help="run the guest code in L2: off | eager (EPT12 mapped up front, as "
    "the selftests' -n) | lazy (each page reflected to L1 on first touch)")]
EngineOpt = Annotated[str, typer.Option(
    "--engine", help="exact (greenlets) | compiled (docs/fastloop.md) | auto: compiled when it "
    "supports the configuration")]
HostCpusOpt = Annotated[int, typer.Option(
    "--host-cpus", help="host logical CPUs the threads share (0: unlimited)")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed: runs are reproducible from it")]
PolicyOpt = Annotated[str, typer.Option("--policy", help="schedule: fifo | random | pct")]
JitterOpt = Annotated[int, typer.Option("--jitter-ns", help="random: widest reordering, ns")]
PctDepthOpt = Annotated[int, typer.Option("--pct-depth", help="pct: bug depth (change points + 1)")]
PctStepsOpt = Annotated[int, typer.Option(
    "--pct-steps", help="pct: change points fall in steps [1, N]; the report gives a run's steps")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the full report as JSON")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="also draw the report: FILE.png "
                                              "or FILE.svg (needs matplotlib)")]
JobsOpt = Annotated[int, typer.Option(
    "--jobs", "-j", help="configurations run at once, each in its own process (default 0: "
    "one per CPU; 1: one after the other in this process)")]
CONFIG_NAMES = "tdp, legacy, shadow, or an installed backend's name (its direct roles on EPT)"


def _configurations(names: list[str], option: str,
                    base: Params | None = None) -> list[tuple[str, Params]]:
    """Resolve configuration names (comma-separated and/or repeated) before anything runs, so
    a typo in the last one does not cost the runs before it. A configuration names `ept` and
    `backend`; every other parameter comes from `base` (the usual sources), when given."""
    wanted = [n.strip() for item in names for n in item.split(",") if n.strip()]
    if not wanted:
        raise InvalidConfig(option, "no configuration given: use tdp, legacy, shadow or an "
                            f"installed backend ({plugins.installed_names()})")
    installed = mmu_core.discover()
    resolved: list[tuple[str, Params]] = []
    for name in wanted:
        if any(name == done for done, _ in resolved):
            raise InvalidConfig(option, f"configuration '{name}' is given twice")
        try:
            params = configuration(name)
        except InvalidConfig:
            params = None
        if params is None or params.backend not in installed:
            raise InvalidConfig(option, f"unknown configuration '{name}': use tdp, legacy, "
                                f"shadow or an installed backend ({plugins.installed_names()})")
        if base is not None:
            params = base.model_copy(update={"ept": params.ept, "backend": params.backend})
        resolved.append((name, params))
    return resolved


def _note_ignored(config: Path | None) -> None:
    """compare and sweep take `ept` and `backend` from each named configuration (a parameter
    source would make the columns alike) and every other parameter from the usual sources;
    say so when a source sets one of the two."""
    ignored = [v for v in ("MMU_EPT", "MMU_BACKEND", "MMU_TDP_MMU") if v in os.environ]
    path = config or os.environ.get("MMU_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            table = data.get("params", data)
            ignored += [f"{k} in {path}" for k in ("ept", "backend", "tdp_mmu") if k in table]
        except (OSError, ValueError):
            pass  # load_params has already accepted it
    if ignored:
        verb = "does" if len(ignored) == 1 else "do"
        err.print(f"mmu: note: the configurations named by --configs choose ept and backend; "
                  f"{', '.join(ignored)} {verb} not apply", highlight=False, soft_wrap=True)


def _options(vcpus, bytes_per_vcpu, delay, backing, mode, uffd, seed, schedule,
             uffd_shared=False, nested="off", engine="auto"):
    from mmu_core.workloads.demand_paging import DemandPagingOptions

    size = parse_size(bytes_per_vcpu)
    return mmu_core.validate(
        DemandPagingOptions, vcpus=vcpus, bytes_per_vcpu=size, uffd=uffd,
        uffd_delay_ns=delay * 1000, backing=backing, mode=mode, seed=seed,
        uffd_shared=uffd_shared, nested=nested, engine=engine, **schedule,
    )


def _schedule(policy, jitter_ns, pct_depth, pct_steps, host_cpus=DEFAULT_HOST_CPUS) -> dict:
    return {"policy": policy, "jitter_ns": jitter_ns, "pct_depth": pct_depth,
            "pct_steps": pct_steps, "host_cpus": host_cpus or None}


def _run_one(opts, params: Params, label: str, runner=None):
    """One run of a workload (demand paging unless `runner` says otherwise) with a
    progress bar on stderr when it is a terminal."""
    if runner is None:
        from mmu_core.workloads.demand_paging import run_demand_paging as runner

    with Progress(TextColumn(f"{label:>7}"), BarColumn(), TaskProgressColumn(),
                  TimeElapsedColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task(label, total=1)
        return runner(
            opts, params,
            progress=lambda done, total: bar.update(task, completed=done, total=total))


def _run_params(configuration_name: str | None, backend: str | None, ept: bool | None,
                config: Path | None) -> Params:
    """The parameters of `mmu run`: a named configuration, or the usual sources with
    --backend and --ept/--no-ept on top."""
    if configuration_name is None:
        return load_params(config, overrides={"backend": backend, "ept": ept})[0]
    if backend is not None or ept is not None or config is not None:
        raise InvalidConfig("--configuration", "names the whole configuration: drop "
                            "--backend, --ept/--no-ept and --config")
    [(_, params)] = _configurations([configuration_name], "--configuration")
    return params


def _compare_runs(opts, configs: list[str] | None, config: Path | None,
                  runner=None, jobs: int = 1) -> list:
    base, _ = load_params(config)
    chosen = _configurations(configs or [",".join(CONFIGURATIONS)], "--configs", base)
    _note_ignored(config)
    _warn_broken()
    if runner is None:
        from mmu_core.workloads.demand_paging import run_demand_paging as runner
    return _run_configs(chosen, jobs, runner, lambda params: (opts, params), opts,
                        lambda name, params: _run_one(opts, params, name, runner))


def _workers(jobs: int) -> int:
    if jobs < 0:
        raise InvalidConfig("--jobs", f"{jobs} is not a number of processes (0: one per CPU)")
    return jobs or (os.cpu_count() or 1)


def _run_configs(chosen: list[tuple[str, Params]], jobs: int, runner, args, opts,
                 in_process, progress: bool = True) -> list:
    """One run per configuration: in this process one after the other (`in_process(name,
    params)`) with -j 1, on a single configuration, or when a backend or observer exists
    only in this process; else `runner(*args(params))` in worker processes, up to `jobs` at
    once, with the memory of the runs at once checked first. The reports are the same
    either way (apart from the wall figures) and come back in the configurations' order."""
    from mmu_core.workloads import demand_paging, parallel

    workers = min(_workers(jobs), len(chosen))
    if workers <= 1 or any(plugins.local_to_this_process(p) for _, p in chosen):
        return [in_process(name, p) for name, p in chosen]
    parallel.check_parallel_memory([parallel.host_bytes(opts, p) for _, p in chosen], workers,
                                   demand_paging.host_bytes_available(), "configurations")
    # A runner that takes a progress callback always gets one, as _run_one gives it: the
    # demand-paging runner runs its vCPUs in more slices (more steps) when it has one.
    show = progress and err.is_terminal
    jobs_ = [parallel.Job(runner, args(p), label=name,
                          progress=("relay" if show else "silent") if progress else None)
             for name, p in chosen]
    with Progress(TextColumn("{task.description:>7}"), BarColumn(), TaskProgressColumn(),
                  TimeElapsedColumn(), console=err, transient=True, disable=not show) as bar:
        tasks = [bar.add_task(name, total=1) for name, _ in chosen]
        return parallel.run_parallel(
            jobs_, workers, lambda i, done, total: bar.update(tasks[i], completed=done,
                                                              total=total))


def _compare_out(workload: str, reports: list, plot: Path | None, json: bool, render) -> None:
    """Print a comparison (table or JSON), draw it if asked; exit 1 unless the guest-visible
    outcomes are identical and every run verified."""
    identical = len({r.digest for r in reports}) == 1 and all(r.verified for r in reports)
    cmp = CompareReport(workload=workload, runs=reports, identical=identical)
    _draw(reports, plot)
    if json:
        out.print_json(cmp.model_dump_json())
    else:
        render(reports)
        if identical:
            out.print(f"guest-visible outcomes: [bold green]identical[/] (digest "
                      f"{reports[0].digest[:16]})")
        else:
            out.print("guest-visible outcomes: [bold red]DIFFERENT[/] "
                      + ", ".join(f"{r.configuration}={r.digest[:16]}" for r in reports))
    if not identical:
        raise typer.Exit(1)


@run_app.command("demand-paging")
def run_demand_paging(
    vcpus: VcpusOpt = 1,
    bytes_per_vcpu: BytesOpt = "64M",
    uffd_delay_us: DelayOpt = 0,
    backing: BackingOpt = "anon",
    mode: ModeOpt = "4level",
    uffd: UffdOpt = True,
    uffd_shared: SharedOpt = False,
    nested: NestedOpt = "off",
    seed: SeedOpt = 0,
    policy: PolicyOpt = "fifo",
    jitter_ns: JitterOpt = DEFAULT_JITTER_NS,
    pct_depth: PctDepthOpt = DEFAULT_PCT_DEPTH,
    pct_steps: PctStepsOpt = DEFAULT_PCT_STEPS,
    host_cpus: HostCpusOpt = DEFAULT_HOST_CPUS,
    engine: EngineOpt = "auto",
    backend: Annotated[str | None, typer.Option("--backend", help="backend for TDP roles")] = None,
    ept: Annotated[bool | None, typer.Option("--ept/--no-ept", help="two-dimensional paging")] = None,
    config: ConfigOpt = None,
    configuration_name: Annotated[str | None, typer.Option(
        "--configuration", help=f"instead of --backend/--ept/--config: {CONFIG_NAMES}")] = None,
    json: JsonOpt = False,
    plot: PlotOpt = None,
) -> None:
    """demand_paging_test: vCPUs touch disjoint regions served by userfault handlers."""
    _check_plot(plot)
    opts = _options(vcpus, bytes_per_vcpu, uffd_delay_us, backing, mode, uffd, seed,
                    _schedule(policy, jitter_ns, pct_depth, pct_steps, host_cpus), uffd_shared,
                    nested, engine)
    params = _run_params(configuration_name, backend, ept, config)
    _warn_broken()
    report = _run_one(opts, params, "run")
    _draw([report], plot)
    if json:
        out.print_json(report.model_dump_json())
        return
    _render([report])


@compare_app.command("demand-paging")
def compare_demand_paging(
    vcpus: VcpusOpt = 1,
    bytes_per_vcpu: BytesOpt = "64M",
    uffd_delay_us: DelayOpt = 0,
    backing: BackingOpt = "anon",
    mode: ModeOpt = "4level",
    uffd: UffdOpt = True,
    uffd_shared: SharedOpt = False,
    nested: NestedOpt = "off",
    seed: SeedOpt = 0,
    policy: PolicyOpt = "fifo",
    jitter_ns: JitterOpt = DEFAULT_JITTER_NS,
    pct_depth: PctDepthOpt = DEFAULT_PCT_DEPTH,
    pct_steps: PctStepsOpt = DEFAULT_PCT_STEPS,
    host_cpus: HostCpusOpt = DEFAULT_HOST_CPUS,
    engine: EngineOpt = "auto",
    configs: Annotated[list[str] | None, typer.Option(
        "--configs", help=f"comma-separated or repeated: {CONFIG_NAMES} "
        "(default: tdp,legacy,shadow)")] = None,
    config: ConfigOpt = None,
    json: JsonOpt = False,
    plot: PlotOpt = None,
    jobs: JobsOpt = 0,
) -> None:
    """The same workload, seed and schedule on each configuration, side by side; the
    guest-visible outcomes must be identical (exit 1 if not)."""
    _check_plot(plot)
    _workers(jobs)
    opts = _options(vcpus, bytes_per_vcpu, uffd_delay_us, backing, mode, uffd, seed,
                    _schedule(policy, jitter_ns, pct_depth, pct_steps, host_cpus), uffd_shared,
                    nested, engine)
    reports = _compare_runs(opts, configs, config, jobs=jobs)
    _compare_out("demand-paging", reports, plot, json, _render)


@sweep_app.command("demand-paging")
def sweep_demand_paging(
    vcpu_counts: Annotated[str, typer.Option("--vcpus", help="comma-separated vCPU counts, "
                                             "e.g. 1,8,64,416")] = "1,8,64",
    bytes_per_vcpu: BytesOpt = "4M",
    uffd_delay_us: DelayOpt = 0,
    backing: BackingOpt = "anon",
    mode: ModeOpt = "4level",
    uffd: UffdOpt = True,
    uffd_shared: SharedOpt = False,
    nested: NestedOpt = "off",
    seed: SeedOpt = 0,
    policy: PolicyOpt = "fifo",
    jitter_ns: JitterOpt = DEFAULT_JITTER_NS,
    pct_depth: PctDepthOpt = DEFAULT_PCT_DEPTH,
    pct_steps: PctStepsOpt = DEFAULT_PCT_STEPS,
    host_cpus: HostCpusOpt = DEFAULT_HOST_CPUS,
    configs: Annotated[list[str] | None, typer.Option(
        "--configs", help=f"comma-separated or repeated: {CONFIG_NAMES} "
        "(default: tdp,legacy,shadow)")] = None,
    out_path: Annotated[Path, typer.Option("--out", help="writes OUT.jsonl (resumable) and "
                                           "OUT.csv")] = Path("sweep"),
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="local worker processes")] = 0,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="a Dask distributed scheduler address (optional extra)")] = None,
    config: ConfigOpt = None,
    plot: PlotOpt = None,
) -> None:
    """The grid of configurations x vCPU counts; an interrupted sweep resumes from OUT.jsonl.
    As compare: each configuration names ept and backend, the usual sources the rest."""
    from mmu_core.workloads.sweep import sweep

    _check_plot(plot)
    try:
        counts = [int(v) for v in vcpu_counts.split(",") if v.strip()]
    except ValueError:
        raise InvalidConfig("--vcpus", f"{vcpu_counts!r} is not a list of numbers") from None
    opts = _options(max(counts or [1]), bytes_per_vcpu, uffd_delay_us, backing, mode, uffd,
                    seed, _schedule(policy, jitter_ns, pct_depth, pct_steps, host_cpus),
                    uffd_shared, nested)
    base, _ = load_params(config)
    chosen = _configurations(configs or [",".join(CONFIGURATIONS)], "--configs", base)
    _note_ignored(config)
    _warn_broken()
    with Progress(TextColumn("sweep"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("sweep", total=len(chosen) * len(counts))
        reports = sweep(chosen, counts, opts, out_path, workers=jobs or (os.cpu_count() or 1),
                        scheduler=scheduler,
                        progress=lambda done, total: bar.update(task, completed=done))
    _draw(reports, plot)
    out.print(f"{len(reports)} points: {out_path.with_suffix('.jsonl')} and "
              f"{out_path.with_suffix('.csv')}", highlight=False, markup=False)


def _trace_table(reports) -> None:
    table = Table("", *[r.configuration for r in reports])
    for label, fn in (
        ("backend", lambda r: r.backend), ("accesses per vCPU", lambda r: f"{r.accesses:,}"),
        ("pages touched", lambda r: str(r.pages)),
        ("faults", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r.faults.items())) or "-"),
        ("exits", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r.exits.items())) or "-"),
        ("total guest time", lambda r: _ms(r.total_time_ns)),
        ("vCPU lock wait", lambda r: _ms(r.time.lock_wait_ns)),
        ("guest digest", lambda r: r.digest[:16]), ("wall time", lambda r: f"{r.wall_seconds:.2f} s"),
    ):
        table.add_row(label, *[fn(r) for r in reports])
    out.print(table)


TraceArg = Annotated[Path, typer.Argument(help="valgrind lackey trace (--trace-mem=yes), .gz ok")]
TraceVcpus = Annotated[int, typer.Option("-v", "--vcpus", help="vCPUs, each replaying the trace")]
LimitOpt = Annotated[int, typer.Option("--limit", help="replay at most N accesses (0: all)")]


@run_app.command("trace")
def run_trace_cmd(
    trace: TraceArg, vcpus: TraceVcpus = 1, limit: LimitOpt = 0, seed: SeedOpt = 0,
    configuration_name: Annotated[str, typer.Option("--configuration",
                                                    help=f"{CONFIG_NAMES}")] = "tdp",
    json: JsonOpt = False,
) -> None:
    """Replay a real program's memory accesses (a valgrind lackey trace) as a guest."""
    from mmu_core.workloads.trace import TraceOptions, run_trace

    opts = mmu_core.validate(TraceOptions, vcpus=vcpus, limit=limit, seed=seed)
    [(_, params)] = _configurations([configuration_name], "--configuration")
    report = run_trace(trace, opts, params)
    if json:
        out.print_json(report.model_dump_json())
        return
    _trace_table([report])


@compare_app.command("trace")
def compare_trace_cmd(
    trace: TraceArg, vcpus: TraceVcpus = 1, limit: LimitOpt = 0, seed: SeedOpt = 0,
    configs: Annotated[list[str] | None, typer.Option(
        "--configs", help=f"comma-separated or repeated: {CONFIG_NAMES}")] = None,
    jobs: JobsOpt = 0,
) -> None:
    """The trace on each configuration; the guest-visible outcomes must be identical."""
    from mmu_core.workloads.trace import TraceOptions, run_trace

    _workers(jobs)
    opts = mmu_core.validate(TraceOptions, vcpus=vcpus, limit=limit, seed=seed)
    chosen = _configurations(configs or [",".join(CONFIGURATIONS)], "--configs")
    reports = _run_configs(chosen, jobs, run_trace, lambda params: (trace, opts, params), opts,
                           lambda _name, params: run_trace(trace, opts, params),
                           progress=False)
    _trace_table(reports)
    if len({r.digest for r in reports}) != 1:
        out.print("guest-visible outcomes: DIFFERENT", highlight=False, markup=False)
        raise typer.Exit(1)
    out.print(f"guest-visible outcomes: identical (digest {reports[0].digest[:16]})",
              highlight=False, markup=False)


# --- the KVM selftests beyond demand paging (docs/workloads.md) --------------------------------
@dataclass(frozen=True)
class _Selftest:
    """A selftest workload's `mmu run NAME` and `mmu compare NAME`: its own options (CLI
    parameters named as its options model's fields, or converted by `convert`), the CLI flag
    of each field for error messages, and its rows in the table."""

    name: str
    doc: str
    module: str  # mmu_core.workloads.<module>, holding the options model and the runner
    options: str
    runner: str
    params: tuple[inspect.Parameter, ...]
    flags: dict[str, str]
    convert: Callable[[dict], dict]
    rows: tuple[tuple[str, Callable], ...] = ()

    def load(self):
        mod = importlib.import_module(f"mmu_core.workloads.{self.module}")
        return getattr(mod, self.options), getattr(mod, self.runner)

    def make_options(self, kw: dict):
        model, _ = self.load()
        values = {**self.convert(kw), "seed": kw["seed"],
                  **_schedule(kw["policy"], kw["jitter_ns"], kw["pct_depth"], kw["pct_steps"])}
        try:
            return mmu_core.validate(model, **values)
        except InvalidConfig as exc:
            raise InvalidConfig(self.flags.get(exc.field, exc.field), exc.reason) from None


def _opt(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


_SCHEDULE_PARAMS = (
    _opt("seed", SeedOpt, 0), _opt("policy", PolicyOpt, "fifo"),
    _opt("jitter_ns", JitterOpt, DEFAULT_JITTER_NS), _opt("pct_depth", PctDepthOpt, DEFAULT_PCT_DEPTH),
    _opt("pct_steps", PctStepsOpt, DEFAULT_PCT_STEPS))
_RUN_PARAMS = (
    *_SCHEDULE_PARAMS,
    _opt("backend", Annotated[str | None, typer.Option("--backend", help="backend for TDP roles")],
         None),
    _opt("ept", Annotated[bool | None, typer.Option("--ept/--no-ept",
                                                    help="two-dimensional paging")], None),
    _opt("config", ConfigOpt, None),
    _opt("configuration_name", Annotated[str | None, typer.Option(
        "--configuration", help=f"instead of --backend/--ept/--config: {CONFIG_NAMES}")], None),
    _opt("json", JsonOpt, False), _opt("plot", PlotOpt, None))
_COMPARE_PARAMS = (
    *_SCHEDULE_PARAMS,
    _opt("configs", Annotated[list[str] | None, typer.Option(
        "--configs", help=f"comma-separated or repeated: {CONFIG_NAMES} "
        "(default: tdp,legacy,shadow)")], None),
    _opt("config", ConfigOpt, None), _opt("json", JsonOpt, False), _opt("plot", PlotOpt, None),
    _opt("jobs", JobsOpt, 0))


def _add_selftest(t: _Selftest) -> None:
    def run_cmd(**kw) -> None:
        _check_plot(kw["plot"])
        opts = t.make_options(kw)
        params = _run_params(kw["configuration_name"], kw["backend"], kw["ept"], kw["config"])
        _warn_broken()
        report = _run_one(opts, params, "run", t.load()[1])
        _draw([report], kw["plot"])
        if kw["json"]:
            out.print_json(report.model_dump_json())
            return
        for line in report.lines:
            out.print(line, highlight=False, markup=False)
        _render_selftest([report], t)

    def compare_cmd(**kw) -> None:
        _check_plot(kw["plot"])
        _workers(kw["jobs"])
        opts = t.make_options(kw)
        reports = _compare_runs(opts, kw["configs"], kw["config"], t.load()[1], kw["jobs"])
        _compare_out(t.name, reports, kw["plot"], kw["json"],
                     lambda rs: _render_selftest(rs, t))

    for fn, shared, what in ((run_cmd, _RUN_PARAMS, ""),
                             (compare_cmd, _COMPARE_PARAMS, " On each configuration; the "
                              "guest-visible outcomes must be identical (exit 1 if not).")):
        fn.__signature__ = inspect.Signature([*t.params, *shared])
        fn.__doc__ = t.doc + what
    run_app.command(t.name)(run_cmd)
    compare_app.command(t.name)(compare_cmd)


def _size_of(flag: str, text: str) -> int:
    try:
        return parse_size(text)
    except InvalidConfig as exc:
        raise InvalidConfig(flag, exc.reason) from None


_ON_OFF = {"on": True, "y": True, "1": True, "true": True,
           "off": False, "n": False, "0": False, "false": False}


def _on_off(flag: str, text: str | None) -> bool | None:
    if text is None:
        return None
    if text.strip().lower() not in _ON_OFF:
        raise InvalidConfig(flag, f"{text!r} is not on or off")
    return _ON_OFF[text.strip().lower()]


def _per_vcpu(kw: dict) -> dict:
    return {"vcpus": kw["vcpus"], "bytes_per_vcpu": _size_of("-b", kw["bytes_per_vcpu"]),
            "backing": kw["backing"]}


def _per_vcpu_params(size: str) -> tuple[inspect.Parameter, ...]:
    return (_opt("vcpus", VcpusOpt, 1),
            _opt("bytes_per_vcpu", Annotated[str, typer.Option(
                "-b", "--bytes-per-vcpu", help="memory each vCPU accesses")],
                 size),
            _opt("backing", BackingOpt, "anon"))


_FLAGS = {"vcpus": "-v", "bytes_per_vcpu": "-b", "backing": "-s", "seed": "--seed",
          "policy": "--policy", "jitter_ns": "--jitter-ns", "pct_depth": "--pct-depth",
          "pct_steps": "--pct-steps"}


def _backend_faults(r) -> str:
    return f"{r.backend_stats.faults} ({r.backend_stats.retries})" if r.backend_stats \
        else "n/a (no mmu_stats)"


def _shadow_mmu_stats(r) -> str:
    """The shadow MMU's counters (None, "-", under a backend without them)."""
    b = r.backend_stats
    if not b:
        return "n/a (no mmu_stats)"
    return "/".join("-" if v is None else str(v) for v in (
        b.reclaimed_pages, b.unsync_pages, b.syncs, b.emulated_pte_writes))


#: Rows from the backend's mmu_stats, in the demand-paging and dirty-log-perf tables.
_BACKEND_ROWS = (("backend faults (retries)", _backend_faults),
                 ("reclaimed / unsync / syncs / PTE writes", _shadow_mmu_stats))


SELFTESTS = (
    _Selftest(
        "dirty-log-perf",
        "dirty_log_perf_test: vCPUs dirty their memory in iterations while the log is "
        "collected and cleared.",
        "dirty_log_perf", "DirtyLogPerfOptions", "run_dirty_log_perf",
        (*_per_vcpu_params("16M"),
         _opt("iterations", Annotated[int, typer.Option("-i", "--iterations",
                                                        help="iterations (at least 2)")], 2),
         _opt("write_percent", Annotated[int, typer.Option(
             "-f", "-w", "--write-percent", help="percentage of accesses that write (0-100)")],
              100),
         _opt("eager_split", Annotated[str | None, typer.Option(
             "-e", "--eager-split", help="on|off: kvm.eager_page_split for this run "
             "(default: from the parameters)")], None),
         _opt("no_manual_protect", Annotated[bool, typer.Option(
             "-g", "--no-manual-protect", help="KVM_GET_DIRTY_LOG clears the log: no "
             "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, no KVM_DIRTY_LOG_INITIALLY_SET")], False),
         _opt("clear_chunk", Annotated[int, typer.Option(
             "-c", "--clear-chunk", help="pages per KVM_CLEAR_DIRTY_LOG, a multiple of 64 "
             "(default 0: the whole slot)")], 0),
         _opt("slots", Annotated[int, typer.Option("-x", "--slots",
                                                   help="memslots to split memory into")], 1),
         _opt("run_while_disabling", Annotated[bool, typer.Option(
             "--run-while-disabling", help="vCPUs keep running while dirty logging is "
             "disabled (upstream's -e)")], False)),
        {**_FLAGS, "iterations": "-i", "write_percent": "-f", "eager_split": "-e",
         "clear_chunk": "-c", "slots": "-x"},
        lambda kw: {**_per_vcpu(kw), "iterations": kw["iterations"],
                    "write_percent": kw["write_percent"],
                    "eager_split": _on_off("-e", kw["eager_split"]),
                    "manual_protect": not kw["no_manual_protect"],
                    "clear_chunk": kw["clear_chunk"], "slots": kw["slots"],
                    "run_while_disabling": kw["run_while_disabling"]},
        (("eager_page_split", lambda r: "on" if r.eager_page_split else "off"),
         ("manual protect", lambda r: "on (initially set)" if r.manual_protect else "off"),
         ("pages written / logged", lambda r: ", ".join(f"{i.pages_written}/{i.pages_logged}"
                                                        for i in r.per_iteration)),
         ("logged, not written", lambda r: str(r.logged_not_written)),
         *_BACKEND_ROWS)),
    _Selftest(
        "access-tracking-perf",
        "access_tracking_perf_test: vCPUs access memory the host's page aging marked idle, "
        "and memory it did not.",
        "access_tracking", "AccessTrackingOptions", "run_access_tracking",
        _per_vcpu_params("64M"), _FLAGS, _per_vcpu,
        (("backend ages SPTEs", lambda r: "yes" if r.backend_ages else "no (all young)"),
         ("still idle per marking", lambda r: ", ".join(str(m.still_idle) for m in r.markings)),
         ("tail pages skipped", lambda r: str(r.markings[0].tail_pages) if r.markings else "-"))),
    _Selftest(
        "memslot-modification-stress",
        "memslot_modification_stress_test: vCPUs access their memory while a memslot is "
        "added and deleted again and again.",
        "memslot_stress", "MemslotStressOptions", "run_memslot_stress",
        (*_per_vcpu_params("16M"),
         _opt("iterations", Annotated[int, typer.Option(
             "-i", "--iterations", help="times to add and delete the memslot")], 10),
         _opt("delay_us", Annotated[int, typer.Option(
             "-d", "--delay-us", help="delay before each addition, microseconds")], 0)),
        {**_FLAGS, "iterations": "-i", "delay_us": "-d"},
        lambda kw: {**_per_vcpu(kw), "iterations": kw["iterations"],
                    "delay_us": kw["delay_us"]},
        (("add memslot (all)", lambda r: _ms(r.add_memslot_ns)),
         ("delete memslot (all)", lambda r: _ms(r.delete_memslot_ns)),
         ("vCPU passes", lambda r: ", ".join(map(str, r.passes))))),
    _Selftest(
        "kvm-page-table",
        "kvm_page_table_test: create, update (dirty logging: split) and adjust (merged back) "
        "KVM's mappings of one region all vCPUs access.",
        "page_table", "PageTableOptions", "run_page_table",
        (_opt("vcpus", VcpusOpt, 1),
         _opt("test_mem_size", Annotated[str, typer.Option(
             "-b", "--mem-size", help="size of the test region")], "64M"),
         _opt("backing", BackingOpt, "thp")),
        {**_FLAGS, "test_mem_size": "-b"},
        lambda kw: {"vcpus": kw["vcpus"], "test_mem_size": _size_of("-b", kw["test_mem_size"]),
                    "backing": kw["backing"]},
        (("enable dirty logging", lambda r: _ms(r.enable_dirty_logging_ns)),
         ("disable dirty logging", lambda r: _ms(r.disable_dirty_logging_ns)),
         *((f"mapped 4K/2M/1G after {stage[4:-9]}",
            lambda r, i=i: "/".join(map(str, r.stages[i].pages_by_level.values()))
            if r.stages[i].pages_by_level else "n/a (no gauges)")
           for i, stage in enumerate(("KVM_CREATE_MAPPINGS", "KVM_UPDATE_MAPPINGS",
                                      "KVM_ADJUST_MAPPINGS"))))),
)
for _t in SELFTESTS:
    _add_selftest(_t)


def _render_selftest(reports: list, t: _Selftest) -> None:
    r0 = reports[0]
    memory = (f"{r0.vcpus} vCPUs sharing {_size(r0.bytes_per_vcpu)}"
              if r0.workload == "kvm-page-table" else
              f"{r0.vcpus} vCPUs x {_size(r0.bytes_per_vcpu)}")
    out.print(f"{t.name}: {memory}, {r0.backing}, seed {r0.seed}, schedule "
              f"{_policy(r0.schedule)} (times are virtual)", highlight=False)
    table = Table("", *[r.configuration for r in reports])

    def row(label, fn):
        table.add_row(label, *[fn(r) for r in reports])

    row("backend (ept)", lambda r: f"{r.backend} ({r.params['ept']})")
    for i, timing in enumerate(r0.timings):
        row(timing.label, lambda r, i=i: _ms(r.timings[i].ns) if i < len(r.timings) else "-")
    for label, fn in t.rows:
        row(label, fn)
    row("verified", lambda r: "yes" if r.verified else f"NO ({r.mismatches} mismatches)")
    row("faults", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r.faults.items())) or "-")
    row("exits", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r.exits.items())) or "-")
    row("mappings 4K/2M/1G", lambda r: "/".join(str(v) for v in r.mappings_by_level.values())
        + ("" if r.backend_stats else " (backend has no mmu_stats)"))
    for field, label in (("lock_wait_ns", "vCPU lock wait"), ("lock_held_ns", "vCPU lock held"),
                         ("walk_ns", "vCPU walk"), ("exit_ns", "vCPU exit")):
        row(label, lambda r, f=field: _ms(getattr(r.time, f)))
    row("remote TLB flushes", lambda r: str(r.tlb_flushes))
    row("guest digest", lambda r: r.digest[:16])
    row("schedule steps", lambda r: f"{r.schedule.steps:,}")
    row("engine", lambda r: r.wall.engine + (f" ({r.wall.engine_note})" if r.wall.engine_note
                                             else ""))
    row("wall time", lambda r: f"{r.wall.seconds:.2f} s")
    out.print(table)


def _check_plot(path: Path | None) -> None:
    """Refuse a bad --plot before the run, not after it."""
    if path is not None:
        from mmu_core.report.plot import FORMATS, _pyplot

        if path.suffix.lower() not in FORMATS:
            raise InvalidConfig("--plot", f"{path} must end in .png or .svg")
        _pyplot()


def _draw(reports, path: Path | None) -> None:
    if path is not None:
        from mmu_core.report.plot import plot as draw

        err.print(f"mmu: wrote {draw(reports, path)}", highlight=False, markup=False)


@app.command("plot")
def plot_reports(
    out_file: Annotated[Path, typer.Argument(help="FILE.png or FILE.svg")],
    reports: Annotated[list[Path], typer.Argument(help="JSON of mmu run/compare --json")],
) -> None:
    """Draw saved reports: one vCPU count gives where vCPU time went per configuration;
    several give the seed's scaling picture (per-vCPU rate and lock-wait share vs vCPUs)."""
    from mmu_core.report.plot import load_reports
    from mmu_core.report.plot import plot as draw

    _check_plot(out_file)
    out.print(f"wrote {draw(load_reports(reports), out_file)}", highlight=False, markup=False)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and not n % (1 << shift):
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _policy(s) -> str:
    if s.policy == "random":
        return f"random (jitter {s.jitter_ns} ns)"
    if s.policy == "pct":
        return f"pct (depth {s.pct_depth}, {s.pct_steps:,} steps)"
    return s.policy


def _ms(ns: int) -> str:
    return f"{ns / 1e6:,.3f} ms"


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _render(reports: list[DemandPagingReport]) -> None:
    r0 = reports[0]
    uffd = ("shared, a handler per vCPU" if r0.uffd_shared else "on") if r0.uffd else "off"
    cpus = r0.host.host_cpus if r0.host else None
    where = "" if r0.nested == "off" else f" in L2 ({r0.nested} EPT12)"
    out.print(f"demand-paging{where}: {r0.vcpus} vCPUs x {_size(r0.bytes_per_vcpu)}, {r0.backing}, "
              f"guest {r0.paging_mode}, uffd={uffd}, seed {r0.seed}, "
              f"schedule {_policy(r0.schedule)}, host CPUs {cpus or 'unlimited'}")
    table = Table("", *[r.configuration for r in reports])

    def row(label, fn):
        table.add_row(label, *[fn(r) for r in reports])

    row("backend (ept)", lambda r: f"{r.backend} ({r.params['ept']})")
    row("verified pages", lambda r: f"{r.pages - r.mismatches}/{r.pages}")
    row("total guest time", lambda r: _ms(r.total_time_ns))
    if len(reports) > 1:  # the seed's headline: the change in total time against the first
        def change(r) -> str:
            if not r0.total_time_ns:
                return "-"
            return f"{100 * (r.total_time_ns - r0.total_time_ns) / r0.total_time_ns:+.1f}%"
        row(f"total time vs {r0.configuration}", change)
    if all(r.fixed for r in reports):
        row("fixed phases", lambda r: _ms(r.fixed.total_ns))
        row("whole test", lambda r: _ms(r.test_time_ns))
        if len(reports) > 1:
            def whole(r) -> str:
                if not r0.test_time_ns:
                    return "-"
                return f"{100 * (r.test_time_ns - r0.test_time_ns) / r0.test_time_ns:+.1f}%"
            row(f"whole test vs {r0.configuration}", whole)
    row("demand paging rate", lambda r: f"{r.pages_per_sec:,.0f} pages/s")
    row("per-vCPU rate (mean)",
        lambda r: f"{sum(v.pages_per_sec for v in r.per_vcpu) / len(r.per_vcpu):,.0f} pages/s")
    row("faults", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r.faults.items())) or "-")
    row("exits", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r.exits.items())) or "-")
    row("mappings 4K/2M/1G", lambda r: "/".join(str(v) for v in r.mappings_by_level.values())
        + ("" if r.backend_stats else " (backend has no mmu_stats)"))
    for label, fn in _BACKEND_ROWS:
        row(label, fn)
    row("lock wait share", lambda r: _pct(r.lock_wait_share))
    if all(r.host for r in reports):
        row("lock wait / vCPU on-CPU time", lambda r: _pct(r.host.lock_wait_share_on_cpu))
        row("lock wait / all on-CPU (profile)", lambda r: _pct(r.host.profile_lock_share))
        row("run-queue wait (all tasks)", lambda r: _ms(r.host.runqueue_ns))
        row("mmap lock line: transfers, queued",
            lambda r: f"{r.host.mmap_lock_transfers:,}, {_ms(r.host.mmap_lock_line_wait_ns)}")
        row("MMU lock line: transfers, queued",
            lambda r: f"{r.host.mmu_lock_transfers:,}, {_ms(r.host.mmu_lock_line_wait_ns)}")
        if any(r.uffd_shared for r in reports):
            row("uffd handlers woken for nothing", lambda r: f"{r.host.uffd_empty_reads:,}")
    for field, label in (("lock_wait_ns", "vCPU lock wait"), ("lock_held_ns", "vCPU lock held"),
                         ("gup_ns", "vCPU gup+userfault"), ("walk_ns", "vCPU walk"),
                         ("exit_ns", "vCPU exit"), ("guest_ns", "vCPU guest")):
        row(label, lambda r, f=field: _ms(getattr(r.time, f)))
    row("cmpxchg failures", lambda r: str(r.cmpxchg_failures))
    row("remote TLB flushes", lambda r: str(r.tlb_flushes))
    row("MMU page-table pages",
        lambda r: f"{r.memory.page_table_pages} (peak {r.memory.peak_page_table_pages})")
    row("kvm_mmu_page structs",
        lambda r: f"{r.memory.mmu_page_structs} ({_kib(r.memory.mmu_page_struct_bytes)})")
    row("rmap", lambda r: _kib(r.memory.rmap_bytes))
    row("MMU memory / guest", lambda r: f"{_pct(r.memory.page_table_share)} tables + "
        f"{_pct(r.memory.metadata_share)} metadata")
    row("guest digest", lambda r: r.digest[:16])
    row("schedule steps", lambda r: f"{r.schedule.steps:,}")
    row("engine", lambda r: r.wall.engine + (f" ({r.wall.engine_note})" if r.wall.engine_note
                                             else ""))
    row("wall time", lambda r: f"{r.wall.seconds:.2f} s")
    row("simulated faults / wall s", lambda r: f"{r.wall.sim_faults_per_sec:,.0f}")
    row("per fault: CPU; process peak RSS / page", _per_fault)
    out.print(table)


def _per_fault(r) -> str:
    """The simulation's cost per simulated fault (CPU time: a shared machine's load moves the
    wall time) and its peak memory per guest page (issue #9's figures)."""
    faults = sum(r.faults.values())
    cpu = f"{r.wall.cpu_seconds * 1e9 / faults:,.0f} ns" if r.wall.cpu_seconds and faults else "-"
    return f"{cpu}, {r.wall.peak_rss_bytes / r.pages:,.0f} B" if r.pages else cpu


@app.command()
def explore(
    scenario: Annotated[list[str] | None, typer.Option(
        "--scenario", help="scenario (repeat; default: all)")] = None,
    config: Annotated[list[str] | None, typer.Option(
        "--config", help="tdp | legacy | shadow (repeat; default: all three)")] = None,
    policy: Annotated[str, typer.Option("--policy", help="random | pct | fifo")] = "pct",
    seed: Annotated[int, typer.Option("--seed", help="first schedule's seed")] = 0,
    schedules: Annotated[int, typer.Option("--schedules", "-n",
                                           help="schedules per scenario and configuration")] = 100,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="local worker processes")] = 0,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="a Dask distributed scheduler address (optional extra)")] = None,
    mutant: Annotated[list[str] | None, typer.Option(
        "--mutant", help="switch a seeded protocol bug on (repeat)")] = None,
    host_cpus: HostCpusOpt = DEFAULT_HOST_CPUS,
    trace: Annotated[bool, typer.Option("--trace", help="with one schedule: print the "
                                        "interleaving's last 60 events")] = False,
) -> None:
    """Run schedules of concurrent scenarios with the audit after every step and the
    reference model; exit 1 on the first failure, with the command that replays it."""
    import os

    from mmu_core.testing.explore import SCENARIOS, plan, run_schedule
    from mmu_core.testing.explore import explore as run_all

    if schedules < 1:
        raise InvalidConfig("--schedules", "must be at least 1")
    if policy not in ("fifo", "random", "pct"):
        raise InvalidConfig("--policy", f"unknown policy '{policy}' (fifo, random, pct)")
    jobs_plan = plan(scenario or list(SCENARIOS), config or list(CONFIGURATIONS), policy, seed,
                     schedules, tuple(mutant or ()), host_cpus or None)
    if trace and len(jobs_plan) != 1:
        raise InvalidConfig("--trace", f"prints one schedule, not {len(jobs_plan)}: name one "
                            "--scenario and one --config, with --schedules 1")
    if trace:
        events: list = []
        j = jobs_plan[0]
        outcome = run_schedule(j.scenario, j.config, j.policy, j.seed, mutant_names=j.mutants,
                               trace=events, host_cpus=j.host_cpus)
        for when, task, what, detail in events[-60:]:
            out.print(f"{when:>12} {task:<10} {what:<16} {detail if detail is not None else ''}",
                      highlight=False)
        outcomes = [outcome]
    else:
        workers = jobs or (os.cpu_count() or 1)
        with Progress(TextColumn("explore"), BarColumn(), TaskProgressColumn(),
                      TimeElapsedColumn(), console=err, transient=True,
                      disable=not err.is_terminal) as bar:
            task = bar.add_task("explore", total=len(jobs_plan))
            outcomes = run_all(jobs_plan, workers=workers, scheduler=scheduler,
                               progress=lambda done, total: bar.update(task, completed=done))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        o = failed[0]
        out.print(f"FAIL {o.scenario}/{o.config} {o.policy} seed {o.seed}: {o.invariant}: "
                  f"{o.detail}\n  replay: {o.replay_command()}", highlight=False, markup=False,
                  soft_wrap=True)
        raise typer.Exit(1)
    out.print(f"{len(outcomes)} schedules passed ({len(set(o.scenario for o in outcomes))} "
              f"scenarios x {len(set(o.config for o in outcomes))} configurations, {policy})")


@app.command()
def schema(
    which: Annotated[str, typer.Argument(help="run | compare")] = "run",
    workload: Annotated[str, typer.Argument(help="the workload whose run report to describe: "
                                            f"{', '.join(REPORTS)}")] = "demand-paging",
) -> None:
    """The JSON Schema of what `mmu run WORKLOAD ... --json` (run) or `mmu compare ... --json`
    (compare, any workload) prints; its schema_version changes whenever a report's shape
    does."""
    if which not in ("run", "compare"):
        raise InvalidConfig("schema", f"unknown report {which!r} (run or compare)")
    if workload not in REPORTS:
        raise InvalidConfig("schema", f"unknown workload {workload!r} ({', '.join(REPORTS)})")
    model = CompareReport if which == "compare" else REPORTS[workload]
    out.print_json(data=model.model_json_schema())


@app.command("new-backend")
def new_backend(
    name: Annotated[str, typer.Argument(help="backend name (a Python identifier)")],
    directory: Annotated[Path | None, typer.Option("--dir", help="where to write it "
                                                   "(default: ./NAME)")] = None,
) -> None:
    """Write a backend distribution from the template: entry point, a backend that already
    passes the conformance suite, and a pytest setup that runs it."""
    from mmu_core.template import new_backend as write

    dest = write(name, directory or Path(name))
    out.print(f"wrote {dest}: pip install -e {dest} && (cd {dest} && pytest)", highlight=False)


@app.command()
def conformance(
    backend: Annotated[list[str], typer.Argument(help="installed backend(s) or tdp/legacy/shadow")],
    schedules: Annotated[int, typer.Option("--schedules", help="explorer schedules per "
                                           "scenario and policy")] = 10,
    examples: Annotated[int, typer.Option("--examples", help="hypothesis examples per parity "
                                          "test")] = 25,
    reference: Annotated[str, typer.Option("--reference", help="reference configuration")] = "tdp",
) -> None:
    """Run the conformance suite (the pytest plugin) on backends; exit 0 if they conform."""
    import os

    import pytest

    from mmu_core.testing.explore import check_names
    from mmu_core.testing.pytest_plugin import SUITE

    check_names([], [*backend, reference])
    # Only the suite: no ini file of the current directory (its testpaths, its addopts).
    args = ["-c", os.devnull, "--rootdir", str(SUITE.parent), str(SUITE), "-q",
            "-p", "no:cacheprovider", "--mmu-reference", reference,
            "--mmu-schedules", str(schedules), "--mmu-examples", str(examples)]
    for name in backend:
        args += ["--mmu-backend", name]
    raise typer.Exit(int(pytest.main(args)))


def main(argv: list[str] | None = None) -> None:
    """Entry point: typer, with every usage or input error reduced to one line and exit 2,
    and Ctrl-C to one line and exit 130."""
    try:
        with warnings.catch_warnings():
            # the commands print broken entry points themselves, in one line each
            warnings.simplefilter("ignore", plugins.PluginWarning)
            code = app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except _USAGE_ERRORS as exc:
        err.print(f"mmu: error: {exc.format_message()}", highlight=False, markup=False,
                  soft_wrap=True)
        sys.exit(2)
    except CheckFailed as exc:  # a selftest's assertion: the model misbehaved, not the input
        err.print(f"mmu: check failed: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except MMUError as exc:
        err.print(f"mmu: error: {exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    if code == 130:
        # typer turns a KeyboardInterrupt inside a command into exit code 130; no command
        # returns 130 itself. The run was already torn down on the way out (VM.destroy).
        err.print("mmu: interrupted", highlight=False)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
