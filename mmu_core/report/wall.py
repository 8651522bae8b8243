"""The simulation's own cost: what a report's `wall` group holds, measured one way for every
workload."""

from __future__ import annotations

import resource
import time

from mmu_core.report.models import WallClock


class Stopwatch:
    """Started when a run starts; `figures()` when its report is made."""

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.cpu0 = time.process_time()

    def figures(self, nfaults: int, **engine) -> WallClock:
        """`engine`: WallClock's engine and engine_note, for runs that choose one."""
        wall = time.perf_counter() - self.wall0
        return WallClock(seconds=wall, sim_faults_per_sec=nfaults / wall if wall else 0.0,
                         peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                         cpu_seconds=time.process_time() - self.cpu0, **engine)
