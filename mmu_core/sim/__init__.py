"""The virtual-time engine and the synchronisation primitives MMU backends are written against."""

from mmu_core.sim.cost import DEFAULT_COSTS, CostModel
from mmu_core.sim.engine import (
    DEFAULT_JITTER_NS,
    DEFAULT_PCT_DEPTH,
    DEFAULT_PCT_STEPS,
    POLICIES,
    Deadlock,
    Engine,
    EngineStats,
    Task,
    TaskStats,
)
from mmu_core.sim.sync import RCU, READ, WRITE, Channel, Completion, RWLock, SpinLock

__all__ = [
    "DEFAULT_COSTS",
    "DEFAULT_JITTER_NS",
    "DEFAULT_PCT_DEPTH",
    "DEFAULT_PCT_STEPS",
    "POLICIES",
    "RCU",
    "READ",
    "WRITE",
    "Channel",
    "Completion",
    "CostModel",
    "Deadlock",
    "Engine",
    "EngineStats",
    "RWLock",
    "SpinLock",
    "Task",
    "TaskStats",
]
