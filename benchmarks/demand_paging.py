"""Speed and memory of the simulation itself: demand paging, each configuration.

Prints, for each (vCPUs x bytes) point and configuration, the simulated faults per wall-clock
second and the peak resident memory of the process that ran it (each run in its own process,
so peaks do not mix). Run: python benchmarks/demand_paging.py [--points 8x64M,64x4M]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CONFIGS = {"tdp": ["--backend", "tdp"], "legacy": ["--backend", "shadow"], "shadow": ["--no-ept"]}


def run(vcpus: str, size: str, extra: list[str], seed: int) -> dict:
    cmd = [sys.executable, "-m", "cli", "run", "demand-paging", "-v", vcpus, "-b", size,
           "--seed", str(seed), "--json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default="8x64M,64x4M")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"{'point':>8} {'config':>7} {'faults':>8} {'wall s':>7} {'faults/s':>9} "
          f"{'peak RSS':>9} {'lock wait':>9} {'virt pages/s':>13}")
    for point in args.points.split(","):
        vcpus, size = point.split("x")
        for name, extra in CONFIGS.items():
            r = run(vcpus, size, extra, args.seed)
            faults = sum(r["faults"].values())
            wall = r["wall"]
            print(f"{point:>8} {name:>7} {faults:>8} {wall['seconds']:>7.2f} "
                  f"{wall['sim_faults_per_sec']:>9,.0f} {wall['peak_rss_bytes'] / 2**20:>7.0f}Mi "
                  f"{100 * r['lock_wait_share']:>8.1f}% {r['pages_per_sec']:>13,.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
