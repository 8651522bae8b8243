"""The `mmu` command: output, JSON, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest


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
    assert report["schema_version"] == 1 and report["verified"] is True
    assert report["configuration"] == "tdp"


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
