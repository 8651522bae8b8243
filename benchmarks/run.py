"""The benchmark suite in one command:

    python benchmarks/run.py [--quick] [--strict] [--no-save] [pytest arguments...]

Runs benchmarks/test_suite.py under pytest-benchmark (the `bench` extra) on the benchmarking
thread's CPU time, prints every figure beside QEMU's (through Unicorn, when installed) and its
target, and saves the run under benchmarks/results/<machine>/NNNN_<commit>_<date>.json (with
`_uncommitted-changes` when the tree is dirty), pytest-benchmark's per-commit storage. The
table also goes to benchmarks/results/latest.md, each figure beside the previous saved run's,
with those that got more than 25% worse marked REGRESSED (`--strict`: and the run fails).
History: `pytest-benchmark --storage file://benchmarks/results compare` lists saved runs.
--quick: three rounds instead of nine, the smaller demand-paging point only, no save.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    strict = "--strict" in argv
    save = "--no-save" not in argv and not quick
    rest = [a for a in argv if a not in ("--quick", "--strict", "--no-save")]
    cmd = [sys.executable, "-m", "pytest", str(HERE / "test_suite.py"), "-p", "no:cacheprovider",
           "--benchmark-timer=time.thread_time", f"--benchmark-storage=file://{HERE / 'results'}",
           "--benchmark-columns=min,median,rounds", "--benchmark-sort=fullname"]
    if save:
        cmd.append("--benchmark-autosave")
    if quick:
        cmd.append("--bench-quick")
    if strict:
        cmd.append("--bench-strict")
    return subprocess.call(cmd + rest, cwd=HERE.parent)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
