"""Explorer figures: schedules per second, and the mutant table (schedules needed to catch
each seeded protocol bug under `random` and `pct`). Prints a Markdown table.

    python benchmarks/explore.py [--limit N] [--workers W]

For each mutant, seeds 0, 1, 2, ... are tried, each over every (scenario, configuration) pair,
and the figure is the number of schedules run until the first failure. "-" means not
caught within the limit.
"""

from __future__ import annotations

import argparse
import time

from mmu_core.mutants import REGISTRY
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.explore import SCENARIOS, run_schedule


def schedules_to_catch(mutant: str, policy: str, limit: int) -> tuple[int | None, str]:
    tried = 0
    for seed in range(limit):
        for scenario in SCENARIOS:
            for config in CONFIGURATIONS:
                tried += 1
                o = run_schedule(scenario, config, policy, seed, mutant_names=(mutant,))
                if not o.ok:
                    return tried, f"{scenario}/{config}: {o.invariant}"
    return None, ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=20, help="seeds per (scenario, config)")
    args = ap.parse_args()
    for scenario in SCENARIOS:  # warm up: numba's cache, pct calibration
        for config in CONFIGURATIONS:
            run_schedule(scenario, config, "random", 0)
    for policy in ("random", "pct"):
        t0 = time.perf_counter()
        n = 0
        for scenario in SCENARIOS:
            for config in CONFIGURATIONS:
                for seed in range(1, 6):
                    run_schedule(scenario, config, policy, seed)
                    n += 1
        rate = n / (time.perf_counter() - t0)
        print(f"every scenario x configuration, {policy}, audit after every step: "
              f"{rate:.1f} schedules/s on one core ({n} schedules)")
    print()
    print("| mutant | random: schedules | caught by | pct: schedules | caught by |")
    print("|---|---|---|---|---|")
    t1 = time.perf_counter()
    for name in REGISTRY:
        row = [name]
        for policy in ("random", "pct"):
            k, how = schedules_to_catch(name, policy, args.limit)
            row += [str(k) if k else "-", how or "not caught"]
        print("| " + " | ".join(row) + " |", flush=True)
    print()
    print(f"whole table: {time.perf_counter() - t1:.0f} s")


if __name__ == "__main__":
    main()
