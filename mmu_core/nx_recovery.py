"""The NX huge page recovery worker, the part every backend shares.

With ``kvm.nx_huge_pages`` (the iTLB-multihit mitigation) an instruction fetch from memory
that could be mapped huge is mapped 4K, and the table made for it is remembered
(``possible_nx_huge_pages``). Left alone, such ranges stay 4K for the life of the VM, so a
background worker per VM (``kvm_nx_huge_page_recovery_worker``, mmu.c) wakes every period
and zaps the oldest ``ceil(n / ratio)`` of them; the next data access maps the range huge
again. The period is ``nx_huge_pages_recovery_period_ms``, or, when that is 0, one hour
divided by the ratio (``calc_nx_huge_pages_recovery_period``).

Which pages are remembered and how one is zapped is the backend's business: the TDP MMU zaps
the SPTE that links the table by cmpxchg under the read lock, the shadow MMU prepares and
commits the zap of the shadow page under the write lock. This module owns what they share:
the period, how many to zap, the rule that a page in a dirty-logged slot is forgotten
instead of zapped (it would only be faulted back 4K; disabling dirty logging recovers the
slot's huge pages anyway: KVM since 6.2, "Do not recover dirty-tracked NX Huge Pages"), and
the worker task itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def recovery_period_ns(params) -> int | None:
    """calc_nx_huge_pages_recovery_period: None when the worker does not run (the mitigation
    off, or a ratio of 0)."""
    if not params.nx_huge_pages or not params.nx_huge_pages_recovery_ratio:
        return None
    period_ms = params.nx_huge_pages_recovery_period_ms or \
        3_600_000 // min(params.nx_huge_pages_recovery_ratio, 3600)
    return period_ms * 1_000_000


def pages_to_zap(tracked: int, ratio: int) -> int:
    """kvm_recover_nx_huge_pages: DIV_ROUND_UP(nx_lpage_splits, ratio)."""
    return math.ceil(tracked / ratio) if ratio else 0


def slot_is_dirty_tracked(vm, as_id: int, gfn: int) -> bool:
    """The memslot behind gfn logs dirty pages: recovery forgets the page instead of zapping
    it (kvm_slot_dirty_track_enabled)."""
    slot = vm.gfn_to_memslot(as_id, gfn)
    return slot is not None and slot.log_dirty


class RecoveryWorker:
    """kvm-nx-lpage-recovery: one engine task per VM that sleeps a period, then calls the
    backend's `recover` (which takes the locks it needs and returns how many pages it zapped).
    A daemon: it neither keeps the engine running nor outlives `stop`."""

    def __init__(self, vm, recover: Callable[[], int]) -> None:
        self.vm = vm
        self.recover = recover
        self.period_ns = recovery_period_ns(vm.params)
        self.task = None
        self._stop = False

    def start(self) -> None:
        """Spawn the worker, once: a second start (a backend re-initialised on the same VM)
        must not make a second worker zap at twice the rate."""
        if self.period_ns is None or self.task is not None:
            return
        self.task = self.vm.engine.spawn("kvm-nx-lpage-recovery", self._loop, daemon=True)

    def stop(self) -> None:
        self._stop = True

    def _loop(self) -> None:
        vm = self.vm
        while not self._stop:
            vm.engine.yield_now()  # it sleeps, it is not runnable: pct would let it starve all
            vm.engine.delay(self.period_ns)
            if self._stop or not vm.vcpus:
                return
            self.recover()
