"""The guest: its page tables in guest memory, and the programs its vCPUs run."""

from mmu_core.guest.pagetables import GuestPageTables, PagingSetup
from mmu_core.guest.program import Program, new_results

__all__ = ["GuestPageTables", "PagingSetup", "Program", "new_results"]
