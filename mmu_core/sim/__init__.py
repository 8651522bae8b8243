"""The virtual-time engine and the synchronisation primitives backends are written against."""

from mmu_core.sim.cost import DEFAULT_COSTS, CostModel
from mmu_core.sim.engine import Deadlock, Engine, EngineStats, Task, TaskStats
from mmu_core.sim.sync import RCU, Channel, Completion, RWLock, SpinLock

__all__ = [
    "DEFAULT_COSTS",
    "RCU",
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
