"""Pictures of reports: where vCPU time went, and the scaling picture of a sweep."""

import sys

import pytest

import cli
from mmu_core.errors import InvalidConfig
from mmu_core.params import configuration
from mmu_core.report import plot as P
from mmu_core.report.models import CompareReport
from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging

pytest.importorskip("matplotlib")


def _reports(vcpus):
    opts = DemandPagingOptions(vcpus=vcpus, bytes_per_vcpu=256 << 10, uffd=True)
    return [run_demand_paging(opts, configuration(c)) for c in ("tdp", "legacy")]


def test_one_vcpu_count_draws_where_time_went_as_png_and_svg(tmp_path):
    reports = _reports(2)
    png = P.plot(reports, tmp_path / "split.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = P.plot(reports, tmp_path / "split.svg")
    text = svg.read_text()
    assert "<svg" in text and "lock wait" in text and "legacy" in text


def test_saved_reports_of_several_vcpu_counts_draw_the_scaling_picture(tmp_path, capsys):
    files = []
    for v in (1, 4):
        path = tmp_path / f"r{v}.json"
        path.write_text(CompareReport(workload="demand-paging", runs=_reports(v),
                                      identical=True).model_dump_json())
        files.append(str(path))
    with pytest.raises(SystemExit) as exc:
        cli.main(["plot", str(tmp_path / "scaling.svg"), *files])
    assert exc.value.code == 0
    text = (tmp_path / "scaling.svg").read_text()
    assert "lock-wait share" in text and "per-vCPU demand-paging rate" in text


def test_bad_plots_are_one_line(tmp_path, capsys, monkeypatch):
    for argv, says in ((["plot", "x.pdf", "r.json"], "must end in .png or .svg"),
                       (["plot", "x.png", str(tmp_path)], "cannot read")):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(lines) == 1 and says in lines[0], lines
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were absent
    with pytest.raises(InvalidConfig, match=r"kvm-mmu-model\[plot\]"):
        P.plot(_reports(1), tmp_path / "x.png")
