"""The parity helpers now live in mmu_core.testing.programs; tests import them from here too."""

from mmu_core.arch.x86 import paging as P
from mmu_core.testing.programs import DATA_PAGES, MMIO_GVA, data_gva, run_everywhere, spec_for

__all__ = ["DATA_PAGES", "MMIO_GVA", "P", "data_gva", "distinct_digests", "run_everywhere",
           "spec_for"]


def distinct_digests(reports) -> set[str]:
    """The guest digests of workload reports, one per configuration, after checking that
    each ran an MMU of its own (paging mode and the backend serving it): reports of one MMU
    would agree whatever it does."""
    mmus = [(r.params["ept"], r.backend) for r in reports]
    assert len(reports) >= 2 and len(set(mmus)) == len(mmus), mmus
    return {r.digest for r in reports}
