"""The virtual-time engine and the synchronisation primitives MMU backends are written against."""

from mmu_core.sim.cost import DEFAULT_COSTS, CostModel
from mmu_core.sim.engine import (
    DEFAULT_HOST_CPUS,
    DEFAULT_JITTER_NS,
    DEFAULT_PCT_DEPTH,
    DEFAULT_PCT_STEPS,
    POLICIES,
    RUNQUEUE_PHASE,
    Deadlock,
    Engine,
    EngineStats,
    Task,
    TaskStats,
)
from mmu_core.sim.sync import (
    RCU,
    READ,
    WRITE,
    CacheLine,
    Channel,
    Completion,
    RWLock,
    RWSem,
    SpinLock,
)

__all__ = [
    "DEFAULT_COSTS",
    "DEFAULT_HOST_CPUS",
    "DEFAULT_JITTER_NS",
    "DEFAULT_PCT_DEPTH",
    "DEFAULT_PCT_STEPS",
    "POLICIES",
    "RUNQUEUE_PHASE",
    "RCU",
    "READ",
    "WRITE",
    "CacheLine",
    "Channel",
    "Completion",
    "CostModel",
    "Deadlock",
    "Engine",
    "EngineStats",
    "RWLock",
    "RWSem",
    "SpinLock",
    "Task",
    "TaskStats",
]
