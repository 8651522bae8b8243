"""Explorer figures: schedules per second, and the mutant table (schedules needed to catch
each seeded protocol bug under `random` and `pct`). Prints a Markdown table.

    python benchmarks/explore.py [--limit N]           # every scenario x configuration
    python benchmarks/explore.py --cases [--limit N]   # each mutant's own case

Without --cases, for each mutant seeds 0, 1, 2, ... are tried, each over every (scenario,
configuration) pair, and the figure is the number of schedules run until the first failure.
With --cases, only the scenario and configuration of the mutant's case
(mmu_core/testing/mutant_cases.py) are tried, under both policies: much cheaper, and what
says how close each case's bound in tests/test_explore.py is. "-" means not caught within
the limit.
"""

from __future__ import annotations

import argparse
import time

from mmu_core.mutants import REGISTRY
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.explore import SCENARIOS, run_schedule
from mmu_core.testing.mutant_cases import MUTANT_CASES


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


def case_schedules(mutant: str, scenario: str, config: str, policy: str,
                   limit: int) -> tuple[int | None, str]:
    for seed in range(limit):
        o = run_schedule(scenario, config, policy, seed, mutant_names=(mutant,))
        if not o.ok:
            return seed + 1, o.invariant
    return None, ""


def cases(limit: int) -> None:
    print(f"| mutant | case | its bound | random: schedules (invariant) | pct: schedules "
          f"(invariant) |  (limit {limit})")
    print("|---|---|---|---|---|")
    t0 = time.perf_counter()
    for case in MUTANT_CASES:
        mutant, scenario, config, policy = case[:4]
        bound = case[4] if len(case) > 4 else 40
        row = [mutant, f"{scenario}/{config} {policy}", str(bound)]
        for pol in ("random", "pct"):
            k, how = case_schedules(mutant, scenario, config, pol, limit)
            row.append(f"{k} ({how})" if k else "-")
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nwhole table: {time.perf_counter() - t0:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=20, help="seeds per (scenario, config)")
    ap.add_argument("--cases", action="store_true", help="each mutant's own case only")
    args = ap.parse_args()
    if args.cases:
        cases(args.limit)
        return
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
