"""The error a workload raises when one of its own checks fails (kept apart from the
workloads so that the CLI can catch it without importing them)."""

from __future__ import annotations

from mmu_core.errors import MMUError


class CheckFailed(MMUError):
    """A selftest's assertion failed: the model did what KVM must not (a page the guest wrote
    missing from the dirty log, a read that returned the wrong data, memory still idle after
    it was accessed). The CLI prints it in one line and exits 1."""
