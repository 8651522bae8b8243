"""access_tracking_perf_test, modelled: how fast vCPUs access memory that the host's page
aging has marked idle, against memory it has not.

The selftest drives KVM's access tracking through /sys/kernel/mm/page_idle/bitmap: reading a
page's bit and marking it idle both run page_idle_clear_pte_refs, which calls the MMU
notifier's clear_young, which ages the page's SPTEs (clears their Accessed bits or, without
A/D bits, makes them access-tracked so the next access faults). Here each vCPU thread does the
same through the host mm's aging (`HostMM.age`, which calls the VM's `clear_young`) one page
at a time, and keeps the page-idle flags as the kernel keeps PG_idle: one per folio, and only
a folio's head page is tracked (page_idle skips tail pages). The iterations and their lines are
the selftest's; the still-idle counts it checks are reported, and checked as on bare metal
(fewer than a tenth of a vCPU's pages may still be idle once it accessed them all), except
that pages its TLB may still map (clear_young does not flush) only earn the selftest's
warning: more still-idle pages than the TLB holds fail the run.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from mmu_core.host.mm import NO_PFN
from mmu_core.params import Params
from mmu_core.report.models import AccessTrackingReport, IdleMarking
from mmu_core.sim import CostModel
from mmu_core.workloads.checks import CheckFailed
from mmu_core.workloads.memstress import (
    DATA_GFN,
    PerVcpuOptions,
    Progress,
    Selftest,
)

_LEVEL_PAGES = {1: 1, 2: 512, 3: 512 * 512}
#: (what the vCPUs do, its line) in the selftest's order; "mark" marks memory idle
STEPS = (("write", "Populating memory"), ("write", "Writing to populated memory"),
         ("read", "Reading from populated memory"), ("mark", "Mark memory idle"),
         ("write", "Writing to idle memory"), ("mark", "Mark memory idle"),
         ("read", "Reading from idle memory"))


class AccessTrackingOptions(PerVcpuOptions):
    """-v, -b and -s, as the selftest has them (its -o, overlapping regions, is not modelled).
    The default size keeps what a vCPU's TLB holds under a tenth of its pages."""

    bytes_per_vcpu: int = Field(64 << 20, gt=0, description="-b: memory each vCPU accesses")


class PageIdle:
    """/sys/kernel/mm/page_idle/bitmap over the host mm: PG_idle per folio head pfn."""

    def __init__(self, vm) -> None:
        self.mm = vm.mm
        self.idle: set[int] = set()

    def _folio(self, hva: int) -> tuple[int, int] | None:
        """(head pfn, folio bytes) of the page at hva, or None for a tail page."""
        size = _LEVEL_PAGES.get(self.mm.mapping_level(hva), 1) << 12
        if hva & (size - 1):
            return None
        return self.mm.lookup(hva), size

    def _clear_refs(self, hva: int, pfn: int, size: int) -> None:
        """page_idle_clear_pte_refs: clear_young over the folio; a young one is not idle."""
        if self.mm.age(hva, size):
            self.idle.discard(pfn)

    def mark_vcpu_memory_idle(self, hvas: list[int]) -> IdleMarking:
        """The selftest's mark_vcpu_memory_idle over one vCPU's pages: count the pages still
        idle (read their bit), mark the others idle (write their bit)."""
        still_idle = no_pfn = tails = 0
        for hva in hvas:
            if self.mm.lookup(hva) == NO_PFN:  # pagemap: not present
                no_pfn += 1
                continue
            folio = self._folio(hva)
            if folio is None:  # page_idle_get_folio skips tail pages: read 0, write nothing
                tails += 1
                continue
            pfn, size = folio
            self._clear_refs(hva, pfn, size)  # is_page_idle: a read of the bitmap
            if pfn in self.idle:
                still_idle += 1
                continue
            self._clear_refs(hva, pfn, size)  # mark_page_idle: a write of the bitmap
            self.idle.add(pfn)
        return IdleMarking(pages=len(hvas), still_idle=still_idle, no_pfn=no_pfn,
                           tail_pages=tails)


def run_access_tracking(opts: AccessTrackingOptions, params: Params,
                        cost: CostModel | None = None,
                        progress: Progress | None = None) -> AccessTrackingReport:
    pages = opts.bytes_per_vcpu >> 12
    with Selftest(opts, params, cost, progress, rounds=len(STEPS)) as st:
        vm = st.vm
        page_idle = PageIdle(vm)
        markings: list[IdleMarking] = []
        tlb_entries = vm.config.tlb_entries
        regions = [st.per_vcpu_pages(i, pages) for i in range(opts.vcpus)]

        def hvas(i: int) -> list[int]:
            slot = vm.memslots[0].find(DATA_GFN)
            return [slot.gfn_to_hva(DATA_GFN + p) for p in regions[i].tolist()]

        def mark_memory_idle() -> int:
            found: list[IdleMarking | None] = [None] * opts.vcpus

            def work(i: int):
                def run(_vcpu) -> None:
                    found[i] = page_idle.mark_vcpu_memory_idle(hvas(i))
                return run

            ns = st.crew.round([work(i) for i in range(opts.vcpus)])
            st.advance()
            for i, m in enumerate(found):
                if m.no_pfn > pages // 100:
                    raise CheckFailed(f"vCPU {i}: No PFN for {m.no_pfn} out of {pages} pages.")
                if m.still_idle and m.still_idle >= pages // 10:
                    if m.still_idle > tlb_entries:
                        raise CheckFailed(f"vCPU{i}: Too many pages still idle "
                                          f"({m.still_idle} out of {pages}), more than its TLB "
                                          f"holds ({tlb_entries})")
                    st.say(f"WARNING: vCPU{i}: Too many pages still idle ({m.still_idle} out of "
                           f"{pages}), this will affect performance results.")
            markings.append(IdleMarking(**{f: sum(getattr(m, f) for m in found)
                                           for f in IdleMarking.model_fields}))
            return ns

        def main() -> None:
            for tag, (what, label) in enumerate(STEPS, 1):
                if what == "mark":
                    ns = mark_memory_idle()
                else:
                    ns = st.round([st.memory.round(r, np.full(len(r), what == "write"), tag)
                                   for r in regions])
                st.timed(label, ns, f"{label:<30}: {{}}")

        st.run(main)
        ages = bool(vm.hook.mmu_age_gfn_range.get_hookimpls())
        return AccessTrackingReport(**st.common(opts.bytes_per_vcpu), backend_ages=ages,
                                    markings=markings)
