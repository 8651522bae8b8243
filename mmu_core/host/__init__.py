"""The host side: physical frames, the host process address space, userfaultfd."""

from mmu_core.host.memory import FRAME_FREE, HostMemory, Purpose
from mmu_core.host.mm import (
    NO_PFN,
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    Backing,
    HostMM,
    Region,
    SwapEntry,
    UnsupportedHostEvent,
)

__all__ = [
    "FRAME_FREE",
    "NO_PFN",
    "PAGE_1G",
    "PAGE_2M",
    "PAGE_4K",
    "Backing",
    "HostMM",
    "HostMemory",
    "Purpose",
    "Region",
    "SwapEntry",
    "UnsupportedHostEvent",
]
