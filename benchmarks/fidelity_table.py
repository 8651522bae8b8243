"""The table both fidelity benchmarks print: each experiment's published pair of times beside
the measured pair, their ratios, and the wall time; optionally the rows as JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence


def main(description: str, experiments: Sequence, measure: Callable,
         fields: Callable[[object], dict]) -> None:
    """`measure(experiment, scale)` -> (without, with, wall seconds); `fields(experiment)`:
    what the JSON row carries about the experiment besides the figures."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--only", nargs="*", default=[e.name for e in experiments])
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the memory sizes")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    width = max(len(e.name) for e in experiments) + 2
    rows = []
    print(f"{'experiment':<{width}} {'published':>22} {'ratio':>7} {'measured':>24} "
          f"{'ratio':>7} {'wall s':>7}")
    for e in experiments:
        if e.name not in args.only:
            continue
        without, with_, wall = measure(e, args.scale)
        p0, p1 = e.published
        pr = p0 / p1
        mr = without / with_ if with_ else float("inf")
        print(f"{e.name:<{width}} {p0:>9.4f}s -> {p1:>7.4f}s {pr:>7.2f} "
              f"{without:>10.6f}s -> {with_:>9.6f}s {mr:>7.2f} {wall:>7.1f}", flush=True)
        rows.append({"experiment": e.name, **fields(e), "published": [p0, p1],
                     "published_ratio": pr, "measured": [without, with_],
                     "measured_ratio": mr, "wall_seconds": wall})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
