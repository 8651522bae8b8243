"""Pictures of run reports (matplotlib, the optional `plot` extra).

The picture is chosen by what the reports hold. Demand paging:

* one vCPU count: where vCPU time went, one stacked bar per configuration (guest, walks,
  exits, lock wait, lock held, get_user_pages/userfault, TLB flushes, other), as a share of
  the summed vCPU time: the seed's argument that the legacy MMU's time goes to the lock;
* several vCPU counts (a sweep): the seed's scaling picture, the mean per-vCPU demand-paging
  rate and the lock-wait share against the number of vCPUs, one line per configuration.

dirty-log-perf: the iteration times (dirty memory, get dirty log, clear dirty log), one panel
each, a bar group per iteration with one bar per configuration. The other selftests: each
timed step, a bar group per step with one bar per configuration.

PNG or SVG, chosen by the file's suffix.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import TypeAdapter

from mmu_core.errors import InvalidConfig
from mmu_core.report.models import (
    CompareReport,
    DemandPagingReport,
    DirtyLogPerfReport,
    RunReport,
    SelftestReport,
)

FORMATS = (".png", ".svg")
#: TimeSplit fields in stacking order, with their legend labels
CATEGORIES = (
    ("guest_ns", "guest"), ("walk_ns", "walks"), ("exit_ns", "exits"),
    ("lock_wait_ns", "lock wait"), ("lock_held_ns", "lock held"),
    ("gup_ns", "gup / userfault"), ("tlb_flush_ns", "TLB flush"), ("other_ns", "other"),
)


_RUN = TypeAdapter(RunReport)


def load_reports(paths: list[str | Path]) -> list:
    """Reports from `mmu run ... --json` or `mmu compare ... --json` files, any workload."""
    reports: list = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidConfig("report", f"cannot read {path}: {exc}") from None
        if Path(path).suffix == ".jsonl":  # a sweep: one report per line
            try:
                reports.extend(DemandPagingReport.model_validate_json(line)
                               for line in text.splitlines() if line.strip())
            except ValueError:
                raise InvalidConfig("report", f"{path} is not a sweep's JSON lines") from None
            continue
        for model in (CompareReport, _RUN):
            try:
                report = model.validate_json(text) if model is _RUN \
                    else model.model_validate_json(text)
            except ValueError:
                continue
            reports.extend(report.runs if isinstance(report, CompareReport) else [report])
            break
        else:
            raise InvalidConfig("report", f"{path} is not the JSON of mmu run or mmu compare "
                                "(see mmu schema)")
    if not reports:
        raise InvalidConfig("report", "no reports to plot")
    return reports


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InvalidConfig("plot", "plots need matplotlib: pip install 'kvm-mmu-model[plot]'") \
            from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot(reports: list, path: str | Path) -> Path:
    """Draw the picture that fits `reports` into `path` (.png or .svg); returns the path."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InvalidConfig("plot", f"{path} must end in .png or .svg")
    workloads = {r.workload for r in reports}
    if len(workloads) > 1:
        names = ", ".join(sorted(workloads))
        raise InvalidConfig("plot", f"reports of different workloads ({names}) do not share "
                            "a picture: plot them apart")
    plt = _pyplot()
    if isinstance(reports[0], DirtyLogPerfReport):
        fig = _dirty_log(plt, reports)
    elif isinstance(reports[0], SelftestReport):
        fig = _timings(plt, reports)
    elif len({r.vcpus for r in reports}) == 1:
        fig = _time_split(plt, reports)
    else:
        fig = _scaling(plt, reports)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except OSError as exc:
        raise InvalidConfig("plot", f"cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(fig)
    return path


def _time_split(plt, reports: list[DemandPagingReport]):
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(reports), 4.2))
    names = [r.configuration for r in reports]
    bottom = [0.0] * len(reports)
    for field, label in CATEGORIES:
        share = [getattr(r.time, field) / r.time.total_ns if r.time.total_ns else 0.0
                 for r in reports]
        ax.bar(names, [100 * s for s in share], bottom=bottom, label=label, width=0.6)
        bottom = [b + 100 * s for b, s in zip(bottom, share, strict=True)]
    r0 = reports[0]
    ax.set_ylabel("share of summed vCPU time (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"demand paging: {r0.vcpus} vCPUs x {r0.bytes_per_vcpu >> 20} MiB, "
                 f"{r0.backing}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def _scaling(plt, reports: list[DemandPagingReport]):
    fig, (rate, wait) = plt.subplots(1, 2, figsize=(10, 4))
    for config in dict.fromkeys(r.configuration for r in reports):
        runs = sorted((r for r in reports if r.configuration == config), key=lambda r: r.vcpus)
        xs = [r.vcpus for r in runs]
        per_vcpu = [sum(v.pages_per_sec for v in r.per_vcpu) / len(r.per_vcpu) for r in runs]
        rate.plot(xs, per_vcpu, marker="o", label=config)
        wait.plot(xs, [100 * r.lock_wait_share for r in runs], marker="o", label=config)
    counts = sorted({r.vcpus for r in reports})
    for ax in (rate, wait):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
        ax.set_xlabel("vCPUs")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    rate.set_ylabel("per-vCPU demand-paging rate (pages/s, virtual time)")
    wait.set_ylabel("lock-wait share of vCPU time (%)")
    fig.suptitle(f"demand paging, {reports[0].bytes_per_vcpu >> 20} MiB per vCPU", fontsize=10)
    return fig


def _bar_groups(ax, groups: list[str], reports: list, value) -> None:
    """One group of bars per entry of `groups`, one bar per report (configuration);
    value(report, index) is the bar's height in ms, or None for no bar."""
    width = 0.8 / len(reports)
    for k, r in enumerate(reports):
        xs, ys = [], []
        for i in range(len(groups)):
            v = value(r, i)
            if v is not None:
                xs.append(i - 0.4 + width * (k + 0.5))
                ys.append(v)
        ax.bar(xs, ys, width=width, label=r.configuration)
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(True, axis="y", alpha=0.3)


def _dirty_log(plt, reports: list[DirtyLogPerfReport]):
    panels = [("dirty_memory_ns", "dirty memory"), ("get_dirty_log_ns", "get dirty log")]
    if any(r.manual_protect for r in reports):
        panels.append(("clear_dirty_log_ns", "clear dirty log"))
    iterations = max(r.iterations for r in reports)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (field, title) in zip(axes[0], panels, strict=True):
        def ms(r, i, field=field):
            if i >= len(r.per_iteration) or getattr(r.per_iteration[i], field) is None:
                return None
            return getattr(r.per_iteration[i], field) / 1e6
        _bar_groups(ax, [str(i + 1) for i in range(iterations)], reports, ms)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("virtual time (ms)")
    axes[0][0].legend(fontsize=8)
    r0 = reports[0]
    fig.suptitle(f"dirty-log-perf: {r0.vcpus} vCPUs x {r0.bytes_per_vcpu >> 20} MiB, "
                 f"{r0.backing}, {r0.write_percent}% writes, eager split "
                 f"{'on' if r0.eager_page_split else 'off'}, manual protect "
                 f"{'on' if r0.manual_protect else 'off'}", fontsize=10)
    fig.tight_layout()
    return fig


def _timings(plt, reports: list[SelftestReport]):
    labels = [t.label for t in reports[0].timings]
    fig, ax = plt.subplots(figsize=(2 + 1.1 * len(labels), 4.4))

    def ms(r, i):
        return r.timings[i].ns / 1e6 if i < len(r.timings) else None
    _bar_groups(ax, labels, reports, ms)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("virtual time (ms)")
    ax.legend(fontsize=8)
    r0 = reports[0]
    ax.set_title(f"{r0.workload}: {r0.vcpus} vCPUs, {r0.bytes_per_vcpu >> 20} MiB, "
                 f"{r0.backing}", fontsize=10)
    return fig
