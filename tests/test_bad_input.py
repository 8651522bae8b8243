"""Every bad input is one line on stderr and exit 2, never a traceback (issue: the front door)."""

import pytest

import cli
from mmu_core.workloads import demand_paging


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    captured = capsys.readouterr()
    return exc.value.code, captured.err.strip().splitlines()


@pytest.fixture
def files(tmp_path):
    (tmp_path / "scalar.toml").write_text("params = 3\n")
    (tmp_path / "latin1.toml").write_bytes(b"[params]\nbackend = '\xff'\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "both.toml").write_text('[params]\nbackend = "tdp"\ntdp_mmu = false\n')
    return tmp_path


@pytest.mark.parametrize(("argv", "says"), [
    (["run", "demand-paging", "-b", "100T", "--no-uffd"], "MAXPHYADDR"),
    (["params", "--config", "{d}/scalar.toml"], "[params] must be a table"),
    (["params", "--config", "{d}/latin1.toml"], "not UTF-8"),
    (["params", "--config", "{d}/adir"], "is a directory"),
    (["params", "--config", "{d}/both.toml"], "backend='tdp' but tdp_mmu=False"),
    (["params", "--config", "{d}/missing.toml"], "does not exist"),
    (["explore", "--scenario", "zap-all", "--trace"], "--trace: prints one schedule, not 300"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, files, argv, says):
    code, lines = run_cli(capsys, *[a.format(d=files) for a in argv])
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("mmu: error: ") and says in lines[0], lines


def test_conflicting_environment_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("MMU_BACKEND", "shadow")
    monkeypatch.setenv("MMU_TDP_MMU", "1")
    code, lines = run_cli(capsys, "params")
    assert code == 2 and len(lines) == 1 and "means 'tdp'" in lines[0]


def test_a_run_larger_than_the_machine_says_how_much_it_needs(capsys, monkeypatch):
    monkeypatch.setattr(demand_paging, "host_bytes_available", lambda: 1 << 30)
    code, lines = run_cli(capsys, "run", "demand-paging", "-b", "4G", "--no-uffd",
                          "--engine", "exact")
    assert code == 2 and len(lines) == 1
    assert "needs about 1.4 GiB" in lines[0] and "1.0 GiB is available" in lines[0]


def test_the_compiled_loop_needs_less_memory_but_is_checked_too(capsys, monkeypatch):
    # Streamed programs and results (docs/fastloop.md): a 4 GiB run fits in 1 GiB on the
    # compiled loop; 1 TiB (above 256 GiB the page-table slot moves above the data) does not.
    monkeypatch.setattr(demand_paging, "host_bytes_available", lambda: 1 << 30)
    need = demand_paging.host_bytes_needed(4 << 30, streamed=True)
    assert need < 1 << 30 < demand_paging.host_bytes_needed(4 << 30)
    code, lines = run_cli(capsys, "run", "demand-paging", "-b", "1T", "--no-uffd")
    assert code == 2 and len(lines) == 1
    assert "needs about" in lines[0] and "1.0 GiB is available" in lines[0]
    # under auto, a run the compiled loop cannot take (pct) is planned for the exact engine,
    # and refused before anything is built
    code, lines = run_cli(capsys, "run", "demand-paging", "-b", "4G", "--no-uffd", "--policy",
                          "pct")
    assert code == 2 and len(lines) == 1
    assert "needs about 1.4 GiB" in lines[0] and "1.0 GiB is available" in lines[0]


def test_compare_says_which_parameter_sources_it_ignores(capsys, monkeypatch):
    monkeypatch.setenv("MMU_EPT", "0")
    code, lines = run_cli(capsys, "compare", "demand-paging", "-v", "1", "-b", "64K",
                          "--configs", "tdp")
    assert code == 0
    assert lines[0] == "mmu: note: the configurations named by --configs choose ept and " \
        "backend; MMU_EPT does not apply"


def test_compare_takes_the_other_parameters_from_the_usual_sources(capsys, monkeypatch):
    import json

    monkeypatch.setenv("MMU_EPT_AD", "0")
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "demand-paging", "-v", "1", "-b", "64K", "--configs", "tdp,legacy",
                  "--json"])
    assert exc.value.code == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["params"]["ept_ad"] for r in runs] == ["false", "false"]
    assert [r["params"]["backend"] for r in runs] == ["tdp", "shadow"]


def test_a_bad_tuning_parameter_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("MMU_NX_HUGE_PAGES_RECOVERY_RATIO", "lots")
    code, lines = run_cli(capsys, "params")
    assert code == 2 and lines == ["mmu: error: nx_huge_pages_recovery_ratio: 'lots' is not "
                                   "an integer"]


def test_schema_describes_what_json_output_prints(capsys):
    import json

    from mmu_core.report.models import SCHEMA_VERSION

    with pytest.raises(SystemExit) as exc:
        cli.main(["schema", "run"])
    assert exc.value.code == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "DemandPagingReport"
    assert schema["properties"]["schema_version"]["default"] == SCHEMA_VERSION
    code, lines = run_cli(capsys, "schema", "nope")
    assert code == 2 and lines == ["mmu: error: schema: unknown report 'nope' (run or compare)"]


def test_a_sweep_whose_parallel_points_do_not_fit_says_so(capsys, monkeypatch, tmp_path):
    from mmu_core.workloads import sweep

    # About 790 and 900 MiB for the two points on the compiled loop: each fits in 1 GiB,
    # both at once do not.
    monkeypatch.setattr(demand_paging, "host_bytes_available", lambda: 1 << 30)
    monkeypatch.setattr(sweep, "host_bytes_available", lambda: 1 << 30)
    code, lines = run_cli(capsys, "sweep", "demand-paging", "--vcpus", "1,2", "-b", "8G",
                          "--configs", "tdp", "--jobs", "2", "--out",
                          str(tmp_path / "s"))
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("mmu: error: jobs: 2 points at once need about 1.")
    assert "use fewer --jobs" in lines[0]
