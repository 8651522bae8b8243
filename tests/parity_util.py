"""The parity helpers now live in mmu_core.testing.programs; tests import them from here too."""

from mmu_core.arch.x86 import paging as P
from mmu_core.testing.programs import DATA_PAGES, MMIO_GVA, data_gva, run_everywhere, spec_for

__all__ = ["DATA_PAGES", "MMIO_GVA", "P", "data_gva", "run_everywhere", "spec_for"]
