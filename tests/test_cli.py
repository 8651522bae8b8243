"""The `mmu` command: output, JSON, schedules, one-line errors with exit code 2, and Ctrl-C
with exit code 130."""

import json
import re
import signal
import subprocess
import sys

import pytest

import cli
from mmu_core.sim import Engine


def mmu(*args, pythonpath=None):
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          env=env)


def test_backends_lists_both_in_tree_backends_with_their_capabilities():
    p = mmu("backends")
    assert p.returncode == 0
    rows = {line.split()[1]: line for line in p.stdout.splitlines()
            if line.startswith("│") and line.split()[1] in ("tdp", "shadow")}
    assert "faults: read lock" in rows["tdp"] and "faults: write lock" in rows["shadow"]
    assert "broken" not in p.stdout


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """A directory that, on PYTHONPATH, installs two more backends: a working TDP MMU
    named 'mine' and an entry point whose module does not exist."""
    site = tmp_path_factory.mktemp("site")
    (site / "mine_mmu.py").write_text(
        "from mmu_tdp import TdpMMU\n"
        "from mmu_core.backend import BackendInfo, Role, hookimpl\n\n\n"
        "class Mine(TdpMMU):\n"
        "    @staticmethod\n"
        "    @hookimpl\n"
        "    def mmu_backend_info():\n"
        "        return BackendInfo('mine', '9.9', (Role.DIRECT,), 'a third-party TDP MMU',\n"
        "                           TdpMMU.mmu_backend_info().capabilities)\n")
    dist = site / "mine_mmu-9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mine-mmu\nVersion: 9.9\n")
    (dist / "entry_points.txt").write_text(
        "[mmu_core.backends]\nmine = mine_mmu:Mine\nghost = no_such_module_for_mmu_tests:X\n")
    return site


def test_installed_third_party_backends_are_listed_and_a_broken_one_is_one_line(third_party):
    p = mmu("backends", pythonpath=third_party)
    assert p.returncode == 0, p.stderr
    names = {line.split()[1] for line in p.stdout.splitlines() if line.startswith("│")}
    assert {"tdp", "shadow", "mine"} <= names
    broken = [line for line in p.stdout.splitlines() if line.startswith("broken:")]
    assert len(broken) == 1 and "'ghost'" in broken[0] and "mine-mmu" in broken[0]
    assert p.stderr == ""


def test_compare_runs_an_installed_backend_beside_a_built_in_one(third_party):
    p = mmu("compare", "demand-paging", "-v", "2", "-b", "256K", "--configs", "tdp,mine",
            "--json", pythonpath=third_party)
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("mmu: warning: backend entry point "
                                                         "'ghost'")
    report = json.loads(p.stdout)
    assert [r["configuration"] for r in report["runs"]] == ["tdp", "mine"]
    assert report["identical"] is True


def test_params_says_where_values_come_from():
    p = mmu("params")
    assert p.returncode == 0
    assert "default" in p.stdout and "backend" in p.stdout


def test_run_json_is_one_report_with_a_schema_version():
    p = mmu("run", "demand-paging", "-v", "2", "-b", "256K", "--json", "--seed", "4")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["schema_version"] == 6 and report["verified"] is True
    assert 0 < report["wall"]["cpu_seconds"]
    assert report["test_time_ns"] == report["fixed"]["total_ns"] + report["total_time_ns"]
    assert report["host"]["host_cpus"] == 448 and report["uffd_shared"] is False
    assert report["configuration"] == "tdp"
    stats = report["backend_stats"]
    assert stats["faults"] == sum(report["faults"].values()) and stats["mapped_4k"] > 0
    assert report["mappings_by_level"]["4K"] == stats["mapped_4k"]
    assert report["schedule"] == {"policy": "fifo", "seed": 4, "jitter_ns": None,
                                  "pct_depth": None, "pct_steps": None,
                                  "steps": report["schedule"]["steps"]}
    assert set(report["wall"]) == {"seconds", "sim_faults_per_sec", "peak_rss_bytes", "cpu_seconds", "engine",
                                   "engine_note"}
    assert report["wall"]["engine"] == "compiled" and report["wall"]["engine_note"] is None


def test_run_takes_the_engine():
    p = mmu("run", "demand-paging", "-v", "2", "-b", "64K", "--no-uffd", "--engine",
            "compiled", "--json")
    assert p.returncode == 0, p.stderr
    wall = json.loads(p.stdout)["wall"]
    assert wall["engine"] == "compiled" and wall["engine_note"] is None
    p = mmu("run", "demand-paging", "-v", "2", "-b", "64K", "--policy", "pct", "--engine",
            "compiled")
    assert p.returncode == 2 and "compiled loop cannot run this" in p.stderr
    assert "Traceback" not in p.stderr
    p = mmu("run", "demand-paging", "--engine", "fast")
    assert p.returncode == 2 and "engine" in p.stderr and "Traceback" not in p.stderr


def test_run_takes_the_host_cpus_and_a_shared_uffd():
    p = mmu("run", "demand-paging", "-v", "4", "-b", "64K", "-a", "--host-cpus", "2", "--json")
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["uffd_shared"] is True and report["verified"] is True
    assert report["host"]["host_cpus"] == 2 and report["host"]["runqueue_ns"] > 0
    p = mmu("run", "demand-paging", "-v", "1", "-b", "64K", "--host-cpus", "0", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["host"]["host_cpus"] is None  # 0: unlimited
    p = mmu("run", "demand-paging", "--host-cpus", "-3")
    assert p.returncode == 2 and "host_cpus" in p.stderr and "Traceback" not in p.stderr


def test_compare_prints_three_columns_and_identical_digests():
    p = mmu("compare", "demand-paging", "-v", "2", "-b", "256K")
    assert p.returncode == 0, p.stderr
    assert "identical" in p.stdout
    for name in ("tdp", "legacy", "shadow"):
        assert name in p.stdout
    # the first column against itself, then the others' change in total time
    row = next(line for line in p.stdout.splitlines() if "total time vs tdp" in line)
    assert "+0.0%" in row and row.count("%") == 3


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


@pytest.mark.parametrize("args, needle", [
    (["compare", "demand-paging", "--configs", "tdp,nosuch"], "unknown configuration 'nosuch'"),
    (["compare", "demand-paging", "--configs", "tdp", "--configs", "tdp"], "given twice"),
    (["compare", "demand-paging", "--configs", ","], "no configuration given"),
    (["run", "demand-paging", "--configuration", "no such"], "unknown configuration 'no such'"),
    (["run", "demand-paging", "--configuration", "tdp", "--no-ept"], "--configuration"),
])
def test_bad_configurations_are_one_line_and_exit_2(capsys, args, needle):
    code, out, err = mmu_here(capsys, *args)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert (code, len(lines), out) == (2, 1, ""), err
    assert needle in lines[0] and "Traceback" not in err


@pytest.fixture
def mine():
    """'mine': the TDP MMU under another name, registered in this process; 'nostats': the
    same without the mmu_stats hook."""
    from mmu_core import BackendInfo, Role, hookimpl, register_backend
    from mmu_core.plugins import unregister_backend
    from mmu_tdp import TdpMMU

    def named(name):
        class Renamed(TdpMMU):
            @staticmethod
            @hookimpl
            def mmu_backend_info():
                return BackendInfo(name, "0", (Role.DIRECT,), "test",
                                   TdpMMU.mmu_backend_info().capabilities)
        return Renamed

    nostats = named("nostats")
    nostats.mmu_stats = None  # not a hookimpl: pluggy does not register it
    register_backend(named("mine"))
    register_backend(nostats)
    yield
    unregister_backend("mine")
    unregister_backend("nostats")


def test_compare_takes_any_configuration_including_a_registered_backend(capsys, mine):
    code, out, err = mmu_here(capsys, "compare", "demand-paging", "-v", "2", "-b", "256K",
                              "--configs", "tdp,legacy", "--configs", "shadow,mine", "--json")
    assert code == 0, err
    report = json.loads(out)
    runs = {r["configuration"]: r for r in report["runs"]}
    assert list(runs) == ["tdp", "legacy", "shadow", "mine"] and report["identical"]
    assert runs["mine"]["backend"] == "mine"
    assert {k: runs["mine"]["params"][k] for k in ("ept", "backend")} == {"ept": "true",
                                                                        "backend": "mine"}
    assert runs["mine"]["backend_stats"] == runs["tdp"]["backend_stats"]  # the same MMU


def test_a_backend_without_mmu_stats_shows_zero_mappings_and_says_why(capsys, mine):
    code, out, err = mmu_here(capsys, "run", "demand-paging", "-b", "256K",
                              "--configuration", "nostats")
    assert code == 0, err
    text = " ".join(out.split())
    assert "0/0/0 (backend has no mmu_stats)" in text and "n/a (no mmu_stats)" in text
    code, out, err = mmu_here(capsys, "run", "demand-paging", "-b", "256K",
                              "--configuration", "mine")
    mapped = re.search(r"mappings 4K/2M/1G │ (\d+)/0/0 │", " ".join(out.split()))
    assert code == 0 and "no mmu_stats" not in out
    assert int(mapped.group(1)) >= 64  # every data page, and the guest's page tables


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
