"""dirty_log_perf_test, modelled: vCPUs dirty their memory in iterations while the main task
collects the dirty log, as live migration does.

The flow is the selftest's: every vCPU populates its region (iteration 0), dirty logging is
enabled on the test memslots, then each iteration the vCPUs access every page of their region
again (writing a page with probability -f percent, reading it otherwise) and the main task
gets the log (KVM_GET_DIRTY_LOG) and, with manual protection, clears it (KVM_CLEAR_DIRTY_LOG,
in -c chunks); at the end logging is disabled. Every step is timed in virtual time and printed
with the selftest's own lines.

Unlike the selftest, the log is checked: every page the guest wrote in an iteration must be
in that iteration's log (CheckFailed otherwise), and pages logged that the guest did not write
are counted (beyond the bits KVM_DIRTY_LOG_INITIALLY_SET sets on purpose).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from mmu_core.errors import InvalidConfig
from mmu_core.hw import cpu as C
from mmu_core.params import Params
from mmu_core.report.models import DirtyLogIteration, DirtyLogPerfReport
from mmu_core.sim import CostModel
from mmu_core.workloads.checks import CheckFailed
from mmu_core.workloads.demand_paging import BACKING_PAGE
from mmu_core.workloads.memstress import (
    PerVcpuOptions,
    Progress,
    Round,
    Selftest,
    seconds,
    with_param,
)


class DirtyLogPerfOptions(PerVcpuOptions):
    iterations: int = Field(2, ge=2, description="-i: iterations (the selftest needs two)")
    write_percent: int = Field(100, ge=0, le=100,
                               description="-f: percentage of page accesses that write")
    eager_split: bool | None = Field(None, description="-e: eager_page_split for this run "
                                     "(None: from the parameters)")
    manual_protect: bool = Field(True, description="KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with "
                                 "KVM_DIRTY_LOG_INITIALLY_SET; -g turns it off")
    clear_chunk: int = Field(0, ge=0, description="-c: pages per KVM_CLEAR_DIRTY_LOG (a "
                             "multiple of 64); 0: the whole slot at once")
    slots: int = Field(1, ge=1, le=512, description="-x: memslots the test memory is split into")
    run_while_disabling: bool = Field(False, description="vCPUs keep running while dirty "
                                      "logging is disabled (the selftest's -e)")

    def model_post_init(self, _ctx) -> None:
        super().model_post_init(_ctx)
        if self.eager_split and BACKING_PAGE[self.backing] == 4096:
            raise InvalidConfig("eager_split", f"eager page splitting needs huge pages: "
                                f"-s {self.backing} has none to split (use -s thp or hugetlb)")
        if self.clear_chunk % 64:
            raise InvalidConfig("clear_chunk", f"{self.clear_chunk} pages is not a multiple of "
                                "64 (KVM_CLEAR_DIRTY_LOG clears whole 64-page bitmap words)")
        if self.clear_chunk and not self.manual_protect:
            raise InvalidConfig("clear_chunk", "clearing the log needs manual protection: "
                                "drop -g")
        size, page = self.test_bytes(), BACKING_PAGE[self.backing]
        if size % (self.slots * page):
            raise InvalidConfig("slots", f"{size >> 10} KiB of test memory does not split into "
                                f"{self.slots} memslots of whole {self.backing} pages")


def run_dirty_log_perf(opts: DirtyLogPerfOptions, params: Params,
                       cost: CostModel | None = None,
                       progress: Progress | None = None) -> DirtyLogPerfReport:
    params = with_param(params, "eager_page_split", opts.eager_split)
    manual = opts.manual_protect
    pages = opts.bytes_per_vcpu >> 12
    with Selftest(opts, params, cost, progress, rounds=opts.iterations + 1,
                  dirty_log_manual_protect=manual, dirty_log_initially_set=manual) as st:
        vm = st.vm
        iters: list[DirtyLogIteration] = []
        fig: dict[str, int] = {}

        def accesses(iteration: int) -> list[Round]:
            rounds = []
            for i in range(opts.vcpus):
                rng = np.random.default_rng([opts.seed, i, iteration])
                writes = rng.random(pages) * 100 < opts.write_percent
                rounds.append(st.memory.round(st.per_vcpu_pages(i, pages), writes, iteration + 1))
            return rounds

        def toggle(slots: list[int], enable: bool) -> None:
            for slot in slots:
                vm.set_dirty_logging(0, slot, enable)

        def main() -> None:
            slots = st.split_data_slot(opts.slots)
            st.say(f"Test iterations: {opts.iterations}")
            fig["populate"] = st.timed("Populate memory time", st.round(accesses(0)))
            with st.clock() as t:
                toggle(slots, True)
            fig["enable"] = st.timed("Enabling dirty logging time", t[0])
            last: list[Round] = []
            for it in range(1, opts.iterations + 1):
                last = accesses(it)
                dirty = st.timed(f"Iteration {it} dirty memory time", st.round(last))
                with st.clock() as t:
                    logs = [vm.get_dirty_log(0, slot) for slot in slots]
                get = st.timed(f"Iteration {it} get dirty log time", t[0])
                clear = None
                if manual:
                    with st.clock() as t:
                        for slot, log in zip(slots, logs, strict=True):
                            _clear(vm, slot, log, opts.clear_chunk)
                    clear = st.timed(f"Iteration {it} clear dirty log time", t[0])
                iters.append(_check_log(it, last, np.concatenate(logs), dirty, get, clear,
                                        initially_set=manual and it == 1))
            fig["disable"] = _disable(st, slots, last if opts.run_while_disabling else None,
                                      toggle)
            _summary(st, iters, manual)

        st.run(main)
        get_total = sum(r.get_dirty_log_ns for r in iters)
        clear_total = sum(r.clear_dirty_log_ns or 0 for r in iters) if manual else None
        return DirtyLogPerfReport(
            **st.common(opts.bytes_per_vcpu), iterations=opts.iterations,
            write_percent=opts.write_percent, eager_page_split=params.eager_page_split,
            manual_protect=manual, clear_chunk_pages=opts.clear_chunk, slots=opts.slots,
            run_vcpus_while_disabling=opts.run_while_disabling,
            populate_ns=fig["populate"], enable_dirty_logging_ns=fig["enable"],
            disable_dirty_logging_ns=fig["disable"], per_iteration=iters,
            dirty_memory_total_ns=sum(r.dirty_memory_ns for r in iters),
            get_dirty_log_total_ns=get_total, clear_dirty_log_total_ns=clear_total,
            logged_not_written=sum(r.logged_not_written for r in iters))


def _clear(vm, slot_id: int, log: np.ndarray, chunk: int) -> None:
    """KVM_CLEAR_DIRTY_LOG of the pages `log` holds, `chunk` pages per call (0: one call)."""
    slot = vm.memslots[0].by_id(slot_id)
    bitmap = np.zeros(slot.npages, dtype=np.uint8)
    bitmap[log - slot.base_gfn] = 1
    step = chunk or slot.npages
    for first in range(0, slot.npages, step):
        n = min(step, slot.npages - first)
        vm.clear_dirty_log(0, slot_id, first, n, bitmap=bitmap[first:first + n])


def _check_log(it: int, rounds: list[Round], logged: np.ndarray, dirty: int, get: int,
               clear: int | None, initially_set: bool) -> DirtyLogIteration:
    """Every page written in the iteration is in its log; count the pages logged beyond
    them (all of memory is expected in the first log with KVM_DIRTY_LOG_INITIALLY_SET)."""
    gvas = [r.prog[r.prog[:, 0] == C.OP_WRITE, 1] for r in rounds]
    written = np.unique(np.concatenate(gvas) >> 12)  # test memory is identity-mapped
    missing = np.setdiff1d(written, logged, assume_unique=True)
    if len(missing):
        raise CheckFailed(f"dirty log: iteration {it}: {len(missing)} of the {len(written)} "
                          f"pages the guest wrote are not in the log (first gfn "
                          f"{int(missing[0]):#x})")
    extra = 0 if initially_set else len(np.setdiff1d(logged, written))
    return DirtyLogIteration(iteration=it, dirty_memory_ns=dirty, get_dirty_log_ns=get,
                             clear_dirty_log_ns=clear, pages_written=len(written),
                             pages_logged=len(logged), logged_not_written=extra)


def _disable(st: Selftest, slots: list[int], rerun: list[Round] | None, toggle) -> int:
    """Disable dirty logging, timed; with `rerun` the vCPUs keep running their last
    iteration meanwhile (it writes what memory already holds, so the guest sees no difference
    however many times it runs), verified but not in the digest."""
    if rerun is None:
        with st.clock() as t:
            toggle(slots, False)
        return st.timed("Disabling dirty logging time", t[0])
    loop = st.loop(rerun)
    with st.clock() as t:
        toggle(slots, False)
    loop.join()
    return st.timed("Disabling dirty logging time", t[0])


def _summary(st: Selftest, iters: list[DirtyLogIteration], manual: bool) -> None:
    n = len(iters)
    get = sum(r.get_dirty_log_ns for r in iters)
    st.say(f"Get dirty log over {n} iterations took {seconds(get)}. "
           f"(Avg {seconds(get // n)}/iteration)")
    if manual:
        clear = sum(r.clear_dirty_log_ns for r in iters)
        st.say(f"Clear dirty log over {n} iterations took {seconds(clear)}. "
               f"(Avg {seconds(clear // n)}/iteration)")
