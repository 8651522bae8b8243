"""The host side: physical frames, the host process address space, userfaultfd."""

from mmu_core.host.memory import HostMemory, Purpose
from mmu_core.host.mm import NO_PFN, PAGE_1G, PAGE_2M, PAGE_4K, Backing, HostMM, Region

__all__ = [
    "NO_PFN",
    "PAGE_1G",
    "PAGE_2M",
    "PAGE_4K",
    "Backing",
    "HostMM",
    "HostMemory",
    "Purpose",
    "Region",
]
