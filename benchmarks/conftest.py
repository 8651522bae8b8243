"""The benchmark suite's table: every figure the suite measures, beside QEMU's and the target.

Each benchmark records its figure with `record(...)` (and in pytest-benchmark's extra_info, so
the saved run keeps it); at the end of the session the table is printed, each figure beside
the same figure of the previous saved run of this machine (benchmarks/results/), and a figure
worse than that by more than REGRESSION is marked; `--bench-strict` makes such a run fail.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RESULTS = HERE / "results"
REGRESSION = 0.25  # a quarter worse than the previous saved run: flagged


@dataclass
class Figure:
    key: str
    path: str
    value: float
    unit: str
    better: str  # "lower" or "higher"
    target: float | None = None
    qemu: float | None = None
    note: str = ""
    previous: float | None = None

    def meets(self) -> bool | None:
        if self.target is None:
            return None
        return self.value <= self.target if self.better == "lower" else self.value >= self.target

    def regressed(self) -> bool:
        if not self.previous:
            return False
        change = (self.value - self.previous) / self.previous
        return change > REGRESSION if self.better == "lower" else change < -REGRESSION


@dataclass
class Table:
    figures: dict[str, Figure] = field(default_factory=dict)
    qemu: dict[str, float] = field(default_factory=dict)
    qemu_missing: str = ""


TABLE = Table()


def record(benchmark, key: str, path: str, value: float, unit: str, better: str = "lower",
           target: float | None = None, note: str = "") -> None:
    """Put one figure in the table and in the saved run (pytest-benchmark's extra_info)."""
    TABLE.figures[key] = Figure(key, path, value, unit, better, target, note=note)
    if benchmark is not None:
        benchmark.extra_info["figure"] = key
        benchmark.extra_info["value"] = value
        benchmark.extra_info["unit"] = unit


def pytest_addoption(parser):
    parser.addoption("--bench-strict", action="store_true",
                     help="fail when a figure regressed against the previous saved run")
    parser.addoption("--bench-quick", action="store_true",
                     help="fewer rounds and the smaller demand-paging point only")


def previous_run(storage: Path) -> dict[str, float]:
    """{figure: value} of the newest saved run in storage (pytest-benchmark's JSON files)."""
    runs = sorted(storage.glob("*/*.json")) if storage.exists() else []
    if not runs:
        return {}
    data = json.loads(runs[-1].read_text())
    return {b["extra_info"]["figure"]: b["extra_info"]["value"] for b in data["benchmarks"]
            if "figure" in b.get("extra_info", {})}


def machine() -> str:
    try:
        import cpuinfo

        brand = cpuinfo.get_cpu_info().get("brand_raw", "")
    except ImportError:  # py-cpuinfo comes with pytest-benchmark; the table does without
        brand = platform.processor()
    return f"{brand or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}{unit}"
    if v >= 10:
        return f"{v:.1f}{unit}"
    return f"{v:.2f}{unit}"


def render(table: Table, host: str) -> tuple[str, list[str]]:
    """The Markdown table, and the figures that regressed."""
    lines = [f"Machine: {host}. Times are the benchmarking thread's CPU time, best of the runs.",
             "", "| path | QEMU (Unicorn) | ours | unit | target | previous | |",
             "|---|---|---|---|---|---|---|"]
    regressed = []
    for f in table.figures.values():
        ok = f.meets()
        mark = {True: "meets", False: "misses", None: ""}[ok]
        if f.regressed():
            mark = (mark + ", " if mark else "") + "REGRESSED"
            regressed.append(f.key)
        target = "-" if f.target is None else ("<= " if f.better == "lower" else ">= ") + _fmt(f.target)
        qemu = table.qemu.get(f.key)
        path = f.path + (f" ({f.note})" if f.note else "")
        lines.append(f"| {path} | {_fmt(qemu) if qemu else '-'} | {_fmt(f.value)} | {f.unit} | "
                     f"{target} | {_fmt(f.previous)} | {mark} |")
    if table.qemu_missing:
        lines += ["", table.qemu_missing]
    return "\n".join(lines), regressed


def pytest_sessionstart(session):
    # Read before pytest-benchmark saves this run next to it.
    session.config._bench_previous = previous_run(RESULTS)


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not TABLE.figures:
        return
    prev = getattr(config, "_bench_previous", {})
    for f in TABLE.figures.values():
        f.previous = prev.get(f.key)
    text, regressed = render(TABLE, machine())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.md").write_text(text + "\n")
    config._bench_text = text
    if regressed and config.getoption("--bench-strict"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    text = getattr(config, "_bench_text", "")
    if text:
        terminalreporter.write_sep("=", "figures (also in benchmarks/results/latest.md)")
        terminalreporter.write_line(text)


@pytest.fixture
def quick(request) -> bool:
    return bool(request.config.getoption("--bench-quick"))
