"""kvm_page_table_test, modelled: KVM creating, updating and adjusting its mappings of one
region that every vCPU accesses, with huge pages split and merged back.

The stages are the selftest's. KVM_CREATE_MAPPINGS: the vCPUs touch the first 8 bytes of
every large page of the region concurrently, even vCPUs writing and odd ones reading, so KVM
maps it with huge pages (or 4 KiB pages on anonymous memory). Then dirty logging is enabled,
which write-protects or splits the huge mappings. KVM_UPDATE_MAPPINGS: on anonymous memory
every vCPU writes every page (read-only SPTEs become writable); on huge pages each vCPU writes
the first page of each large page, breaking it up, and reads the second half of it, which now
maps at 4 KiB. Then dirty logging is disabled. KVM_ADJUST_MAPPINGS: every vCPU reads every
page, so KVM maps the region with huge pages again. Each stage is timed; what is mapped at
each level after it (the backend's page-size gauges) shows the splits and merges.

Data integrity, which the selftest leaves to the guest not crashing, is checked: every read
returns what was last written to its page (a read racing a write of the same page in the
create stage may return either value), and every page holds the right value at the end.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field

from mmu_core.guest.machine import DATA_GPA, DATA_SLOT
from mmu_core.params import Params
from mmu_core.report.models import PageTableReport, StageFigures
from mmu_core.sim import CostModel
from mmu_core.workloads.demand_paging import BACKING_PAGE, GUEST_MAXPHYADDR, backend_stats
from mmu_core.workloads.memstress import (
    BACKING_NAMES,
    Progress,
    Round,
    Selftest,
    SelftestOptions,
    mapped_now,
    mappings_by_level,
)

CREATE, UPDATE, ADJUST = "KVM_CREATE_MAPPINGS", "KVM_UPDATE_MAPPINGS", "KVM_ADJUST_MAPPINGS"


class PageTableOptions(SelftestOptions):
    """-b is the size of the one region all vCPUs access, aligned up to the backing's page
    size as the selftest aligns it."""

    SIZE_FIELD: ClassVar[str] = "test_mem_size"
    test_mem_size: int = Field(64 << 20, gt=0, description="-b: size of the test region")
    backing: str = Field("thp", pattern="^(anon|thp|hugetlb)$",
                         description="-s: backing source (anon | thp | hugetlb)")

    @property
    def large_page_size(self) -> int:
        return BACKING_PAGE[self.backing]

    def test_bytes(self) -> int:
        align = self.large_page_size
        return (self.test_mem_size + align - 1) // align * align


def _stage_rounds(st: Selftest, stage: str, opts: PageTableOptions) -> list[Round]:
    """Each vCPU's accesses in a stage, in the guest code's order. Every vCPU that writes a
    page writes the same value, so the memory ends up the same whoever writes last."""
    npages = opts.test_bytes() >> 12
    per_large = opts.large_page_size >> 12
    firsts = np.arange(0, npages, per_large, dtype=np.int64)
    everything = np.arange(npages, dtype=np.int64)
    if stage == CREATE:  # the first page of each large page: even vCPUs write, odd ones read
        idx = firsts
    elif stage == UPDATE and per_large > 1:  # write the first page, read the second half
        half = np.arange(per_large // 2, per_large, dtype=np.int64)
        idx = (firsts[:, None] + np.concatenate([[0], half])[None, :]).ravel()
    else:
        idx = everything
    writes = np.zeros(len(idx), bool)
    if stage == UPDATE:
        writes[:] = per_large == 1  # anonymous memory: every page written
        writes[::len(idx) // len(firsts)] = True
    mem, tag = st.memory, {CREATE: 1, UPDATE: 2, ADJUST: 3}[stage]
    before, after = mem.value.copy(), mem.value.copy()
    rounds = []
    for i in range(opts.vcpus):
        mine = writes | (stage == CREATE and i % 2 == 0)
        mem.value[:] = before
        r = mem.round(idx, mine, tag)
        if stage == CREATE and opts.vcpus > 1:  # racing an even vCPU's write of the page
            r.alt = mem.values(idx, tag)
        after[idx[mine]] = mem.value[idx[mine]]
        rounds.append(r)
    mem.value[:] = after
    return rounds


def run_page_table(opts: PageTableOptions, params: Params, cost: CostModel | None = None,
                   progress: Progress | None = None) -> PageTableReport:
    with Selftest(opts, params, cost, progress, rounds=4) as st:
        vm = st.vm
        stages: list[StageFigures] = []
        fig: dict[str, int] = {}
        slot = vm.memslots[0].by_id(DATA_SLOT)
        st.say(f"Testing guest mode: PA-bits:{GUEST_MAXPHYADDR}, VA-bits:48,  4K pages")
        st.say(f"Testing memory backing src type: {BACKING_NAMES[opts.backing]}")
        st.say(f"Testing memory backing src granularity: {opts.large_page_size:#x}")
        st.say(f"Testing memory size(aligned): {opts.test_bytes():#x}")
        st.say(f"Guest physical test memory offset: {DATA_GPA:#x}")
        st.say(f"Host  virtual  test memory offset: {slot.userspace_addr:#x}")
        st.say(f"Number of testing vCPUs: {opts.vcpus}")

        def stage(name: str) -> None:
            ns = st.round(_stage_rounds(st, name, opts))
            st.timed(name, ns, name + ": total execution time: {}")
            stages.append(StageFigures(stage=name, ns=ns,
                                       mappings_by_level=mappings_by_level(backend_stats(vm)),
                                       pages_by_level=mapped_now(vm)))

        def set_flags(log: bool) -> int:
            with st.clock() as t:
                vm.set_dirty_logging(0, DATA_SLOT, log)
            return t[0]

        def main() -> None:
            st.round([Round(np.zeros((0, 3), np.int64), np.zeros(0, np.int64))
                      for _ in range(opts.vcpus)])  # KVM_BEFORE_MAPPINGS: start the vCPUs
            st.say("Started all vCPUs successfully")
            stage(CREATE)
            fig["enable"] = set_flags(True)
            stage(UPDATE)
            fig["disable"] = set_flags(False)
            stage(ADJUST)

        st.run(main)
        return PageTableReport(
            **st.common(opts.test_bytes()), test_mem_size=opts.test_bytes(),
            large_page_size=opts.large_page_size, stages=stages,
            enable_dirty_logging_ns=fig["enable"], disable_dirty_logging_ns=fig["disable"])
