"""Pictures of demand-paging reports (matplotlib, the optional `plot` extra).

Two pictures, chosen by what the reports hold:

* one vCPU count: where vCPU time went, one stacked bar per configuration (guest, walks,
  exits, lock wait, lock held, get_user_pages/userfault, TLB flushes, other), as a share of
  the summed vCPU time: the seed's argument that the legacy MMU's time goes to the lock;
* several vCPU counts (a sweep): the seed's scaling picture, the mean per-vCPU demand-paging
  rate and the lock-wait share against the number of vCPUs, one line per configuration.

PNG or SVG, chosen by the file's suffix.
"""

from __future__ import annotations

from pathlib import Path

from mmu_core.errors import InvalidConfig
from mmu_core.report.models import CompareReport, DemandPagingReport

FORMATS = (".png", ".svg")
#: TimeSplit fields in stacking order, with their legend labels
CATEGORIES = (
    ("guest_ns", "guest"), ("walk_ns", "walks"), ("exit_ns", "exits"),
    ("lock_wait_ns", "lock wait"), ("lock_held_ns", "lock held"),
    ("gup_ns", "gup / userfault"), ("tlb_flush_ns", "TLB flush"), ("other_ns", "other"),
)


def load_reports(paths: list[str | Path]) -> list[DemandPagingReport]:
    """Reports from `mmu run ... --json` or `mmu compare ... --json` files."""
    reports: list[DemandPagingReport] = []
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
        for model in (CompareReport, DemandPagingReport):
            try:
                report = model.model_validate_json(text)
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


def plot(reports: list[DemandPagingReport], path: str | Path) -> Path:
    """Draw the picture that fits `reports` into `path` (.png or .svg); returns the path."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InvalidConfig("plot", f"{path} must end in .png or .svg")
    plt = _pyplot()
    counts = sorted({r.vcpus for r in reports})
    fig = _time_split(plt, reports) if len(counts) == 1 else _scaling(plt, reports)
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
