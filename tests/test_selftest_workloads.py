"""The KVM selftests beyond demand paging, as workloads (docs/workloads.md): dirty-log-perf,
access-tracking-perf, memslot-modification-stress and kvm-page-table, on every configuration,
with their output lines, their checks, bad input as one line and exit 2, and their plots."""

import json

import numpy as np
import pytest
from parity_util import distinct_digests

import cli
from mmu_core.errors import InvalidConfig
from mmu_core.params import CONFIGURATIONS
from mmu_core.report.models import CompareReport, DirtyLogPerfReport
from mmu_core.workloads import access_tracking as AT
from mmu_core.workloads.access_tracking import AccessTrackingOptions, run_access_tracking
from mmu_core.workloads.checks import CheckFailed
from mmu_core.workloads.dirty_log_perf import DirtyLogPerfOptions, run_dirty_log_perf
from mmu_core.workloads.memslot_stress import MemslotStressOptions, run_memslot_stress
from mmu_core.workloads.page_table import PageTableOptions, run_page_table


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err.strip().splitlines()


def on_each(run, opts):
    return {name: run(opts, params) for name, params in CONFIGURATIONS.items()}


def assert_parity(reports):
    assert all(r.verified and r.mismatches == 0 for r in reports.values()), \
        {n: r.mismatches for n, r in reports.items()}
    assert len(distinct_digests(reports.values())) == 1


# --- dirty-log-perf ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirty_log():
    opts = DirtyLogPerfOptions(vcpus=2, bytes_per_vcpu=1 << 20, iterations=3, write_percent=60)
    return on_each(run_dirty_log_perf, opts)


def test_dirty_log_perf_is_the_same_to_the_guest_on_every_configuration(dirty_log):
    assert_parity(dirty_log)


def test_dirty_log_perf_prints_the_selftests_lines_in_order(dirty_log):
    r = dirty_log["tdp"]
    labels = [line.split(":")[0].split(" took ")[0] for line in r.lines]
    assert labels == [
        "Test iterations", "Populate memory time", "Enabling dirty logging time",
        *[f"Iteration {i} {what} time" for i in (1, 2, 3)
          for what in ("dirty memory", "get dirty log", "clear dirty log")],
        "Disabling dirty logging time", "Get dirty log over 3 iterations",
        "Clear dirty log over 3 iterations"]
    timed = {t.label: t.ns for t in r.timings}
    assert timed["Iteration 2 get dirty log time"] == r.per_iteration[1].get_dirty_log_ns
    assert r.get_dirty_log_total_ns == sum(i.get_dirty_log_ns for i in r.per_iteration)
    assert f"Populate memory time: {r.populate_ns // 10**9}.{r.populate_ns % 10**9:09d}s" \
        in r.lines


def test_every_written_page_is_logged_and_no_other(dirty_log):
    for r in dirty_log.values():
        assert [i.iteration for i in r.per_iteration] == [1, 2, 3]
        first, *later = r.per_iteration
        assert first.pages_logged == 2 * 256  # KVM_DIRTY_LOG_INITIALLY_SET: everything
        for i in later:  # about 60% of the pages written, each of them logged, nothing else
            assert 0.5 * 512 < i.pages_written < 0.7 * 512
            assert i.pages_logged == i.pages_written
        assert r.logged_not_written == 0 and r.manual_protect


def test_without_manual_protect_there_is_no_clearing(capsys):
    code, out, _ = run_cli(capsys, "run", "dirty-log-perf", "-g", "-b", "256K", "-v", "2",
                           "--json")
    r = DirtyLogPerfReport.model_validate_json(out)
    assert code == 0 and not r.manual_protect and r.clear_dirty_log_total_ns is None
    assert not any("clear dirty log" in line.lower() for line in r.lines)
    assert [i.pages_logged for i in r.per_iteration] == [128, 128]


def test_several_memslots_chunked_clears_and_running_while_disabling():
    opts = DirtyLogPerfOptions(vcpus=2, bytes_per_vcpu=512 << 10, slots=4, clear_chunk=64,
                               run_while_disabling=True, backing="anon")
    reports = {name: run_dirty_log_perf(opts, CONFIGURATIONS[name]) for name in ("tdp", "legacy")}
    assert_parity(reports)
    r = reports["tdp"]
    assert r.slots == 4 and r.clear_chunk_pages == 64 and r.run_vcpus_while_disabling
    assert all(i.pages_logged == i.pages_written == 256 for i in r.per_iteration[1:])


def test_eager_split_is_a_parameter_of_the_run():
    on = DirtyLogPerfOptions(bytes_per_vcpu=2 << 20, backing="thp", eager_split=True)
    off = on.model_copy(update={"eager_split": False})
    r_on = run_dirty_log_perf(on, CONFIGURATIONS["tdp"])
    r_off = run_dirty_log_perf(off, CONFIGURATIONS["tdp"])
    assert (r_on.params["eager_page_split"], r_off.params["eager_page_split"]) == ("true", "false")
    assert r_on.digest == r_off.digest


def test_a_page_missing_from_the_log_fails_loudly(monkeypatch, capsys):
    from mmu_core.vm.vm import VM

    real = VM.get_dirty_log
    monkeypatch.setattr(VM, "get_dirty_log", lambda vm, a, s: real(vm, a, s)[1:])
    with pytest.raises(CheckFailed, match="iteration 1: 1 of the 64 pages the guest wrote"):
        run_dirty_log_perf(DirtyLogPerfOptions(bytes_per_vcpu=256 << 10, manual_protect=False),
                           CONFIGURATIONS["tdp"])
    code, _, err = run_cli(capsys, "run", "dirty-log-perf", "-g", "-b", "256K")
    assert code == 1 and len(err) == 1 and err[0].startswith("mmu: check failed: dirty log:")


# --- access-tracking-perf ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def access():
    return on_each(run_access_tracking, AccessTrackingOptions(vcpus=2, bytes_per_vcpu=1 << 20))


def test_access_tracking_steps_and_lines(access):
    assert_parity(access)
    r = access["tdp"]
    assert [t.label for t in r.timings] == [label for _, label in AT.STEPS]
    assert r.lines[0].startswith("Populating memory             : ")
    assert len(r.markings) == 2 and all(m.pages == 512 and m.no_pfn == 0 for m in r.markings)
    assert r.markings[0].still_idle == 0  # nothing was idle before the first marking


def test_pages_the_tlb_still_maps_may_stay_idle_with_a_warning(access):
    for r in access.values():
        if not r.backend_ages:  # every page reported young: none can stay idle
            assert all(m.still_idle == 0 for m in r.markings)
        elif r.markings[1].still_idle:  # 256 pages per vCPU fit in its TLB: no A bit is set
            assert any(line.startswith("WARNING: vCPU0: Too many pages still idle")
                       for line in r.lines)


def test_accessed_pages_that_stay_idle_fail_loudly(monkeypatch):
    monkeypatch.setattr(AT.PageIdle, "_clear_refs", lambda self, hva, pfn, size: None)
    with pytest.raises(CheckFailed, match="Too many pages still idle"):
        run_access_tracking(AccessTrackingOptions(bytes_per_vcpu=8 << 20), CONFIGURATIONS["tdp"])


@pytest.mark.parametrize("config", ["tdp", "legacy", "shadow"])
def test_page_idle_tracks_only_the_head_of_a_huge_folio(config):
    r = run_access_tracking(AccessTrackingOptions(bytes_per_vcpu=4 << 20, backing="thp"),
                            CONFIGURATIONS[config])
    # Every backend ages SPTEs: the two 2M pages' heads stay idle after the second marking,
    # since the vCPU's TLB still maps them and the hardware sets no Accessed bit on a hit.
    assert r.backend_ages
    assert [(m.tail_pages, m.still_idle) for m in r.markings] == [(1022, 0), (1022, 2)]


# --- memslot-modification-stress -----------------------------------------------------------------
def test_memslot_stress_keeps_the_vcpus_running_while_slots_come_and_go():
    opts = MemslotStressOptions(vcpus=2, bytes_per_vcpu=512 << 10, iterations=20, delay_us=20)
    reports = on_each(run_memslot_stress, opts)
    assert_parity(reports)
    for r in reports.values():
        assert r.iterations == 20 and r.modifications_ns >= 20 * 20_000
        assert all(p >= 1 for p in r.passes) and len(r.passes) == 2
        assert r.lines[:2] == ["Finished creating vCPUs", "Started all vCPUs"]
        assert "All vCPU threads joined" in r.lines


# --- kvm-page-table --------------------------------------------------------------------------------
@pytest.mark.parametrize(("backing", "vcpus"), [("thp", 3), ("anon", 2)])
def test_page_table_stages_on_every_configuration(backing, vcpus):
    opts = PageTableOptions(vcpus=vcpus, test_mem_size=4 << 20, backing=backing)
    reports = on_each(run_page_table, opts)
    assert_parity(reports)
    r = reports["tdp"]
    assert [s.stage for s in r.stages] == ["KVM_CREATE_MAPPINGS", "KVM_UPDATE_MAPPINGS",
                                           "KVM_ADJUST_MAPPINGS"]
    assert f"Number of testing vCPUs: {vcpus}" in r.lines
    assert "KVM_ADJUST_MAPPINGS: total execution time: " in r.lines[-1]
    if backing == "thp":  # the create stage maps 2 MiB pages where the host has them
        assert reports["legacy"].stages[0].mappings_by_level["2M"] == 2
        # split under dirty logging, merged back once it is off (tdp keeps page-size gauges)
        assert [s.pages_by_level["2M"] for s in r.stages] == [2, 0, 2]


def test_page_table_aligns_the_region_up_as_the_selftest_does():
    r = run_page_table(PageTableOptions(test_mem_size=3 << 20, backing="thp"),
                       CONFIGURATIONS["tdp"])
    assert r.test_mem_size == 4 << 20 and "Testing memory size(aligned): 0x400000" in r.lines


@pytest.mark.parametrize("policy", ["random", "pct"])
def test_other_schedules_do_not_change_what_the_guest_sees(policy):
    """Racing vCPUs (one region shared by three) and a main task racing them (memslots
    coming and going, vCPUs that loop until it is done) under reordering schedules."""
    assert_parity(on_each(run_page_table, PageTableOptions(
        vcpus=3, test_mem_size=4 << 20, policy=policy, seed=5)))
    assert_parity(on_each(run_memslot_stress, MemslotStressOptions(
        vcpus=2, bytes_per_vcpu=256 << 10, iterations=10, delay_us=5, policy=policy, seed=5)))


# --- the command line --------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "says"), [
    (["run", "dirty-log-perf", "-f", "101"], "-f: Input should be less than or equal to 100"),
    (["run", "dirty-log-perf", "-w", "-1"], "-f: Input should be greater than or equal to 0"),
    (["run", "dirty-log-perf", "-i", "0"], "-i: Input should be greater than or equal to 2"),
    (["run", "dirty-log-perf", "-i", "1"], "-i: Input should be greater than or equal to 2"),
    (["run", "dirty-log-perf", "-e", "on"], "-e: eager page splitting needs huge pages"),
    (["compare", "dirty-log-perf", "-e", "on", "-s", "anon"], "-s anon has none to split"),
    (["run", "dirty-log-perf", "-e", "sometimes", "-s", "thp"], "-e: 'sometimes' is not on or off"),
    (["run", "dirty-log-perf", "-c", "100"], "-c: 100 pages is not a multiple of 64"),
    (["run", "dirty-log-perf", "-c", "64", "-g"], "-c: clearing the log needs manual protection"),
    (["run", "dirty-log-perf", "-x", "3", "-b", "1M"], "-x: 1024 KiB of test memory does not split"),
    (["run", "dirty-log-perf", "-x", "0"], "-x: Input should be greater than or equal to 1"),
    (["run", "dirty-log-perf", "-v", "0"], "-v: Input should be greater than or equal to 1"),
    (["run", "dirty-log-perf", "-b", "lots"], "-b: cannot parse size 'lots'"),
    (["run", "dirty-log-perf", "-s", "thp", "-b", "1M"], "-b: 1048576 is not a multiple of the thp"),
    (["run", "dirty-log-perf", "-s", "shm"], "-s: String should match pattern"),
    (["run", "dirty-log-perf", "-b", "100T"], "-b: 102400 GiB of guest memory and its page "
     "tables do not fit"),
    (["run", "access-tracking-perf", "-b", "0"], "-b: Input should be greater than 0"),
    (["run", "memslot-modification-stress", "-i", "0"], "-i: Input should be greater than or "
     "equal to 1"),
    (["run", "memslot-modification-stress", "-d", "-5"], "-d: Input should be greater than or "
     "equal to 0"),
    (["run", "kvm-page-table", "-b", "2T"], "-b: this run needs about 512.4 GiB"),
    (["run", "kvm-page-table", "--configuration", "tdp", "--no-ept"],
     "--configuration: names the whole configuration"),
    (["compare", "kvm-page-table", "--configs", "tdp,nope"], "--configs: unknown configuration"),
    (["run", "kvm-page-table", "--plot", "x.pdf"], "--plot: x.pdf must end in .png or .svg"),
    (["schema", "run", "nope"], "schema: unknown workload 'nope'"),
])
def test_bad_input_is_one_line_naming_the_option_and_exit_2(capsys, argv, says):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("mmu: error: ") and says in err[0], err


def test_run_prints_the_lines_and_compare_json_is_one_report_per_configuration(capsys):
    code, out, _ = run_cli(capsys, "run", "memslot-modification-stress", "-b", "256K")
    assert code == 0 and out.startswith("Finished creating vCPUs\nStarted all vCPUs\n")
    code, out, _ = run_cli(capsys, "compare", "kvm-page-table", "-b", "2M", "-v", "2", "--json")
    cmp = CompareReport.model_validate_json(out)
    assert code == 0 and cmp.identical and cmp.workload == "kvm-page-table"
    assert [r.configuration for r in cmp.runs] == ["tdp", "legacy", "shadow"]
    assert {type(r).__name__ for r in cmp.runs} == {"PageTableReport"}


def test_schema_of_a_selftest_report(capsys):
    code, out, _ = run_cli(capsys, "schema", "run", "dirty-log-perf")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "DirtyLogPerfReport"
    assert "per_iteration" in schema["properties"]


# --- plots ---------------------------------------------------------------------------------------------
def test_dirty_log_iteration_times_as_png_and_svg(tmp_path, capsys, dirty_log):
    pytest.importorskip("matplotlib")
    from mmu_core.report import plot as P

    reports = list(dirty_log.values())
    png = P.plot(reports, tmp_path / "dl.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = tmp_path / "dl.json"
    saved.write_text(CompareReport(workload="dirty-log-perf", runs=reports,
                                   identical=True).model_dump_json())
    code, out, _ = run_cli(capsys, "plot", str(tmp_path / "dl.svg"), str(saved))
    text = (tmp_path / "dl.svg").read_text()
    assert code == 0 and "<svg" in text
    for word in ("dirty memory", "get dirty log", "clear dirty log", "iteration", "legacy"):
        assert word in text


def test_other_selftests_plot_their_timed_steps_and_workloads_do_not_mix(tmp_path, access,
                                                                       dirty_log):
    pytest.importorskip("matplotlib")
    from mmu_core.report import plot as P

    svg = P.plot(list(access.values()), tmp_path / "at.svg").read_text()
    assert "Writing to idle memory" in svg and "shadow" in svg
    with pytest.raises(InvalidConfig, match="different workloads"):
        P.plot([access["tdp"], dirty_log["tdp"]], tmp_path / "mixed.png")


def test_timings_add_up_to_what_the_vcpus_spent(dirty_log):
    for r in dirty_log.values():
        t = r.time
        parts = (t.guest_ns + t.walk_ns + t.exit_ns + t.lock_wait_ns + t.lock_held_ns
                 + t.gup_ns + t.tlb_flush_ns + t.other_ns)
        assert parts == t.total_ns > 0
        assert np.all(np.array([i.dirty_memory_ns for i in r.per_iteration]) >= 0)
