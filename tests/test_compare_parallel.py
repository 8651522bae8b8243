"""`mmu compare --jobs N`: the configurations run in worker processes at once and the reports
are those of a serial run (apart from the wall figures); bad input, a failing run and Ctrl-C
end the command as a serial run would, with no process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cli
from mmu_core.workloads import demand_paging, parallel

TRACE = Path(__file__).resolve().parent.parent / "traces"


def mmu_here(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def without_wall(report: dict) -> dict:
    runs = [{k: v for k, v in r.items() if k not in ("wall", "wall_seconds")}
            for r in report.get("runs", [report])]
    return {**report, "runs": runs}


@pytest.fixture
def spied(monkeypatch):
    """Counts the parallel runs, so that a test knows the workers did run."""
    calls = []
    real = parallel.run_parallel

    def spy(jobs, workers, progress=None):
        calls.append((len(jobs), workers))
        return real(jobs, workers, progress)

    monkeypatch.setattr(parallel, "run_parallel", spy)
    return calls


@pytest.mark.parametrize("args", [
    ["demand-paging", "-v", "2", "-b", "256K", "--configs", "tdp,legacy"],
    ["kvm-page-table", "-v", "2", "-b", "2M", "--configs", "tdp,shadow"],
])
def test_two_jobs_give_the_serial_reports(capsys, spied, args):
    code1, out1, _ = mmu_here(capsys, "compare", *args, "--json", "-j", "1")
    assert code1 == 0 and spied == []
    code2, out2, err2 = mmu_here(capsys, "compare", *args, "--json", "-j", "2")
    assert code2 == 0, err2
    assert spied == [(2, 2)]
    serial, parallel_ = json.loads(out1), json.loads(out2)
    assert without_wall(serial) == without_wall(parallel_)  # same digests, times, steps
    assert [r["configuration"] for r in parallel_["runs"]] == args[-1].split(",")


def test_the_trace_comparison_in_parallel(capsys, spied):
    trace = sorted(TRACE.glob("*.gz"))[0]
    code1, out1, _ = mmu_here(capsys, "compare", "trace", str(trace), "--limit", "2000",
                              "--configs", "tdp,legacy", "-j", "1")
    code2, out2, _ = mmu_here(capsys, "compare", "trace", str(trace), "--limit", "2000",
                              "--configs", "tdp,legacy", "-j", "2")
    assert code1 == code2 == 0 and spied == [(2, 2)]
    strip = [line.split("│")[:3] for line in out1.splitlines() if "wall time" not in line]
    assert strip == [line.split("│")[:3] for line in out2.splitlines()
                     if "wall time" not in line]
    assert "identical" in out2


def test_bad_jobs_and_too_much_memory_are_one_line_each(capsys, monkeypatch):
    code, out, err = mmu_here(capsys, "compare", "demand-paging", "-j", "-1")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "mmu: error: --jobs: -1 is not a number of processes (0: one per CPU)"]
    # About 790 MiB per configuration on the compiled loop: one fits in 1 GiB, two at once
    # do not.
    monkeypatch.setattr(demand_paging, "host_bytes_available", lambda: 1 << 30)
    code, out, err = mmu_here(capsys, "compare", "demand-paging", "-b", "8G", "--configs",
                              "tdp,legacy", "-j", "2")
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("mmu: error: jobs: 2 configurations at once need about 1.")
    assert "use fewer --jobs" in line
    # Shadow paging has no compiled kernels: it is planned at the exact engine's 1 KiB per
    # page (656 MiB at 1 GiB), tdp at the compiled loop's (449 MiB): together too much.
    code, out, err = mmu_here(capsys, "compare", "demand-paging", "-b", "1G", "--configs",
                              "tdp,shadow", "-j", "2")
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("mmu: error: jobs: 2 configurations at once need about 1.1 GiB")


def test_an_error_inside_a_worker_is_the_serial_runs_one_line(capsys, tmp_path, spied):
    bad = tmp_path / "bad.trace"
    bad.write_text("this is not lackey output\n")
    for jobs in ("1", "2"):
        code, out, err = mmu_here(capsys, "compare", "trace", str(bad), "--configs",
                                  "tdp,legacy", "-j", jobs)
        assert code == 2 and out == ""
        assert err.strip().splitlines() == [
            f"mmu: error: trace: {bad}:1: not a lackey line: 'this is not lackey output'"]
    assert spied == [(2, 2)]


def _session(sid: int) -> list[int]:
    """The live processes of session `sid` (zombies included)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid:  # state ppid pgrp session ...
            pids.append(int(entry))
    return pids


@pytest.mark.parametrize("after", [0.0, 6.0])
def test_ctrl_c_stops_every_worker(after):
    """Ctrl-C (SIGINT to the whole foreground group) while the workers start up, and while
    they run: exit 130, one line, and no process of the command left."""
    proc = subprocess.Popen(
        # the exact engine: 10-20 s per run, so the 6 s Ctrl-C lands inside it (the compiled
        # loop may finish first on an idle machine)
        [sys.executable, "-m", "cli", "compare", "demand-paging", "-v", "8", "-b", "64M",
         "--configs", "tdp,legacy", "-j", "2", "--engine", "exact"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_session(proc.pid)) < 3 and time.monotonic() < deadline:  # mmu + 2 workers
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert len(_session(proc.pid)) >= 3
    time.sleep(after)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == ["mmu: interrupted"]
    assert out == ""
    deadline = time.monotonic() + 10
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _session(proc.pid) == []


def test_in_process_runs_collect_the_previous_runs_garbage_first(capsys, monkeypatch):
    # A finished run's VM is garbage in reference cycles that hold its arrays until a full
    # collection: at 416 x 256 MiB, tdp then legacy peaked at 3.09 GB without one and at
    # 1.88 GB (the larger run alone) with one before each run (heap.collect_earlier_runs).
    import gc

    calls = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or real(*a))
    code, out, err = mmu_here(capsys, "compare", "demand-paging", "-v", "1", "-b", "64K",
                              "--configs", "tdp,legacy", "-j", "1")
    assert code == 0, err
    assert len(calls) >= 2
