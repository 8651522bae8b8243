"""The `mmu` command: output, JSON, schedules, one-line errors with exit code 2, and Ctrl-C
with exit code 130."""

import json
import signal
import subprocess
import sys

import pytest

import cli
from mmu_core.sim import Engine


def mmu(*args):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})


def test_backends_lists_both_in_tree_backends():
    p = mmu("backends")
    assert p.returncode == 0
    assert "tdp" in p.stdout and "shadow" in p.stdout


def test_params_says_where_values_come_from():
    p = mmu("params")
    assert p.returncode == 0
    assert "default" in p.stdout and "backend" in p.stdout


def test_run_json_is_one_report_with_a_schema_version():
    p = mmu("run", "demand-paging", "-v", "2", "-b", "256K", "--json", "--seed", "4")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["schema_version"] == 3 and report["verified"] is True
    assert report["configuration"] == "tdp"
    assert report["schedule"] == {"policy": "fifo", "seed": 4, "jitter_ns": None,
                                  "pct_depth": None, "pct_steps": None,
                                  "steps": report["schedule"]["steps"]}
    assert set(report["wall"]) == {"seconds", "sim_faults_per_sec", "peak_rss_bytes"}


def test_compare_prints_three_columns_and_identical_digests():
    p = mmu("compare", "demand-paging", "-v", "2", "-b", "256K")
    assert p.returncode == 0, p.stderr
    assert "identical" in p.stdout
    for name in ("tdp", "legacy", "shadow"):
        assert name in p.stdout


@pytest.mark.parametrize("args, needle", [
    (["run", "nosuch"], "nosuch"),
    (["run", "demand-paging", "--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["run", "demand-paging", "-v", "0"], "vcpus"),
    (["run", "demand-paging", "-b", "3K"], "multiple"),
    (["run", "demand-paging", "-b", "lots"], "cannot parse size"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle):
    p = mmu(*args)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert needle in lines[0]
    assert "Traceback" not in p.stderr


def mmu_here(capsys, *args):
    """`mmu` in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.mark.parametrize("args, needle", [
    (["run", "demand-paging", "--policy", "lottery"], "unknown policy 'lottery'"),
    (["run", "demand-paging", "--policy", "pct", "--pct-depth", "0"], "pct_depth"),
    (["compare", "demand-paging", "--pct-depth", "4", "--pct-steps", "2"], "pct_steps"),
    (["run", "demand-paging", "--jitter-ns", "-5"], "jitter_ns"),
])
def test_bad_schedule_options_are_one_line_and_exit_2(capsys, args, needle):
    code, out, err = mmu_here(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert (code, len(lines), out) == (2, 1, ""), err
    assert needle in lines[0] and "Traceback" not in err


def test_same_policy_and_seed_give_identical_json_apart_from_wall_clock(capsys):
    def run(seed, *extra):
        code, out, err = mmu_here(capsys, "run", "demand-paging", "-v", "4", "-b", "1M",
                                  "--policy", "random", "--seed", str(seed), "--json", *extra)
        assert code == 0, err
        report = json.loads(out)
        del report["wall"]  # the only machine-dependent figures
        return report

    for extra in ([], ["--no-uffd"]):
        first, again, other = run(1, *extra), run(1, *extra), run(2, *extra)
        assert first == again
        assert first["schedule"]["policy"] == "random" and first["schedule"]["jitter_ns"] == 100
        # Another seed interleaves differently: per-vCPU times and lock wait move ...
        assert [v["time"] for v in first["per_vcpu"]] != [v["time"] for v in other["per_vcpu"]]
        assert first["time"]["lock_wait_ns"] != other["time"]["lock_wait_ns"]
        # ... and the guest cannot tell.
        assert first["digest"] == other["digest"]


def test_compare_under_pct_reports_the_schedule_and_identical_digests(capsys):
    code, out, err = mmu_here(capsys, "compare", "demand-paging", "-v", "3", "-b", "256K",
                              "--policy", "pct", "--seed", "5", "--pct-steps", "3000")
    assert code == 0, err
    text = " ".join(out.split())  # the console wraps at its width
    assert "3 vCPUs x 256 KiB" in text and "schedule pct (depth 3, 3,000 steps)" in text
    assert "guest-visible outcomes: identical" in text


@pytest.fixture
def default_sigint():
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("how, where", [("raise", []), ("signal", []), ("raise", ["--no-ept"]),
                                         ("signal", ["--backend", "shadow"])])
def test_ctrl_c_during_a_run_exits_130_with_one_line(capsys, monkeypatch, default_sigint, how,
                                                     where):
    real_delay = Engine.delay
    calls = [0]

    def delay(self, ns, phase=None):
        if self.current is not None:
            calls[0] += 1
            if calls[0] == 400:  # well inside the run: faults, RCU sections, the MMU lock
                if how == "raise":
                    raise KeyboardInterrupt
                signal.raise_signal(signal.SIGINT)  # Ctrl-C, delivered right here
        real_delay(self, ns, phase)

    monkeypatch.setattr(Engine, "delay", delay)
    code, out, err = mmu_here(capsys, "run", "demand-paging", "-v", "4", "-b", "256K", *where)
    assert calls[0] >= 400
    assert code == 130
    assert [line for line in err.splitlines() if line.strip()] == ["mmu: interrupted"]
    assert out == ""
