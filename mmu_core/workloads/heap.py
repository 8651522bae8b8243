"""The collector during a run: setup is done, the engine is about to run the workload.

Everything allocated by then (the interpreter's modules, the machine, the VM and its backend,
the guest programs) lives as long as the run: the collector's full collections would walk all
of it again and again for nothing. `frozen_setup()` moves it to the permanent generation
(`gc.freeze()`) for the run and back afterwards (`gc.unfreeze()`), so that the VM's reference
cycles are collectable again once it is gone (a process that runs many workloads, the test
suite, would otherwise keep every one of them).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

_depth = 0


@contextmanager
def frozen_setup() -> Iterator[None]:
    """Freeze what exists now for the duration of the block (nested blocks: the outermost
    one unfreezes)."""
    global _depth
    gc.freeze()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth:
            gc.unfreeze()


def collect_earlier_runs() -> None:
    """A full collection before a run builds its machine: a finished run's VM is garbage in
    reference cycles (engine, tasks, backend) that keep its arrays until the collector's next
    full pass, and the next run in the same process (mmu compare -j 1, a sweep's worker, a
    script) must not be built on top of them. At 416 x 256 MiB, tdp then legacy peaked at
    3.09 GB without it and 1.88 GB (the larger run alone) with it; at the seed's scale the
    first run leaves 20 GB."""
    gc.collect()


__all__ = ["collect_earlier_runs", "frozen_setup"]
