"""Sweeps: a grid in parallel, resumable, the same however it is split, and plottable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmu_core.errors import InvalidConfig
from mmu_core.params import configuration
from mmu_core.workloads import sweep as S
from mmu_core.workloads.demand_paging import DemandPagingOptions

OPTS = DemandPagingOptions(vcpus=2, bytes_per_vcpu=128 << 10)


def test_a_sweep_writes_every_point_and_resumes_without_rerunning(tmp_path, monkeypatch):
    out = tmp_path / "grid"
    reports = S.sweep(["tdp", "legacy"], [1, 2], OPTS, out)
    assert [(r.configuration, r.vcpus) for r in reports] == \
        [("tdp", 1), ("tdp", 2), ("legacy", 1), ("legacy", 2)]
    rows = (tmp_path / "grid.csv").read_text().splitlines()
    assert rows[0].split(",") == list(S.CSV_FIELDS) and len(rows) == 5
    before = rows
    # Interrupted after three points: only the missing one runs again.
    lines = (tmp_path / "grid.jsonl").read_text().splitlines()
    (tmp_path / "grid.jsonl").write_text("\n".join(lines[:3]) + "\n")
    ran = []
    real = S._run_point
    monkeypatch.setattr(S, "_run_point", lambda a: ran.append(a[0]) or real(a))
    S.sweep(["tdp", "legacy"], [1, 2], OPTS, out)
    assert len(ran) == 1
    assert (tmp_path / "grid.csv").read_text().splitlines() == before


def test_points_are_the_same_however_the_work_is_split(tmp_path):
    one = S.sweep(["tdp"], [1, 2], OPTS, tmp_path / "one", workers=1)
    two = S.sweep(["tdp"], [1, 2], OPTS, tmp_path / "two", workers=2)
    assert [r.digest for r in one] == [r.digest for r in two]
    assert [r.total_time_ns for r in one] == [r.total_time_ns for r in two]


def test_a_file_of_another_sweep_is_not_resumed(tmp_path):
    S.sweep(["tdp"], [1], OPTS, tmp_path / "g")
    other = OPTS.model_copy(update={"bytes_per_vcpu": 256 << 10})
    with pytest.raises(InvalidConfig, match="other options"):
        S.sweep(["tdp"], [1], other, tmp_path / "g")


def test_a_sweep_runs_the_parameters_it_is_given_and_resumes_only_the_same(tmp_path):
    # As compare: the configuration names ept and backend, the usual sources the rest. Before,
    # the sweep ran every point with default parameters whatever the sources said.
    no_ad = configuration("tdp").model_copy(update={"ept_ad": False})
    [r] = S.sweep([("tdp", no_ad)], [1], OPTS, tmp_path / "g")
    assert r.params["ept_ad"] in ("False", "false", "0") and r.configuration == "tdp"
    with pytest.raises(InvalidConfig, match="other parameters"):
        S.sweep(["tdp"], [1], OPTS, tmp_path / "g")


def test_mmu_sweep_takes_parameters_from_the_environment(tmp_path):
    env = {**os.environ, "MMU_EPT_AD": "0"}
    p = subprocess.run([sys.executable, "-m", "cli", "sweep", "demand-paging", "--vcpus", "1",
                        "-b", "128K", "--configs", "tdp", "-j", "1", "--out",
                        str(tmp_path / "g")], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr
    [r] = S.load_jsonl(tmp_path / "g.jsonl")
    assert r.params["ept_ad"] in ("False", "false", "0")


def test_a_sweep_plots_as_the_scaling_picture(tmp_path):
    pytest.importorskip("matplotlib")
    from mmu_core.report.plot import load_reports, plot

    S.sweep(["tdp"], [1, 2], OPTS, tmp_path / "g")
    path = plot(load_reports([tmp_path / "g.jsonl"]), tmp_path / "g.svg")
    assert "lock-wait share" in path.read_text()


def test_a_sweep_on_a_dask_cluster_gives_the_same_points(tmp_path):
    distributed = pytest.importorskip("distributed")
    local = S.sweep(["tdp"], [1, 2], OPTS, tmp_path / "local")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        remote = S.sweep(["tdp"], [1, 2], OPTS, tmp_path / "dask",
                         scheduler=cluster.scheduler_address)
    assert [r.digest for r in remote] == [r.digest for r in local]
    assert (tmp_path / "dask.csv").read_text() == (tmp_path / "local.csv").read_text()
