"""memslot_modification_stress_test, modelled: vCPUs keep accessing their memory while the
main task adds and deletes a memslot, again and again.

As in the selftest, each vCPU runs the memstress guest loop (every page of its region written,
pass after pass) until the main task is done; the main task waits -d microseconds, adds a
one-page memslot (id 7) just below the test memory, deletes it, -i times. Every change goes
through KVM's memslot update protocol (the generation bumps, faults that resolved against the
old memslots retry), which is what the test stresses. The selftest prints no times; the model
adds the time of the modifications and the passes each vCPU completed meanwhile. Each pass
writes the same values, so what the guest sees does not depend on how many passes ran; the
digest takes one pass and the memory at the end, and every page is checked at the end.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from mmu_core.guest.machine import DATA_GPA
from mmu_core.params import Params
from mmu_core.report.models import MemslotStressReport
from mmu_core.sim import CostModel
from mmu_core.workloads.memstress import PerVcpuOptions, Progress, Selftest, seconds

DUMMY_MEMSLOT_INDEX = 7


class MemslotStressOptions(PerVcpuOptions):
    iterations: int = Field(10, ge=1, le=1_000_000,
                            description="-i: times a memslot is added and deleted")
    delay_us: int = Field(0, ge=0, description="-d: delay before each add, microseconds")


def run_memslot_stress(opts: MemslotStressOptions, params: Params,
                       cost: CostModel | None = None,
                       progress: Progress | None = None) -> MemslotStressReport:
    pages = opts.bytes_per_vcpu >> 12
    with Selftest(opts, params, cost, progress, rounds=opts.iterations) as st:
        vm = st.vm
        rounds = [st.memory.round(st.per_vcpu_pages(i, pages), np.ones(pages, bool), 1)
                  for i in range(opts.vcpus)]
        fig = {"add": 0, "delete": 0}
        passes: list[int] = []

        def add_remove_memslot() -> None:
            gpa = DATA_GPA - 4096  # just below the test memory, as the selftest puts it
            for _ in range(opts.iterations):
                vm.engine.delay(opts.delay_us * 1000, "usleep")
                with st.clock() as t:
                    vm.add_memslot(DUMMY_MEMSLOT_INDEX, gpa, 4096)
                fig["add"] += t[0]
                with st.clock() as t:
                    vm.delete_memslot(0, DUMMY_MEMSLOT_INDEX)
                fig["delete"] += t[0]
                st.advance()

        def main() -> None:
            st.say("Finished creating vCPUs")
            loop = st.loop(rounds)
            st.say("Started all vCPUs")
            with st.clock() as t:
                add_remove_memslot()
            st.timed("Memslot modifications", t[0],
                     f"Added and deleted a memslot {opts.iterations} times in {{}} (add "
                     f"{seconds(fig['add'])}, delete {seconds(fig['delete'])} in all)")
            loop.join()
            st.say("All vCPU threads joined")
            st.say(f"vCPU passes over their memory: {', '.join(map(str, loop.passes))}")
            passes.extend(loop.passes)

        st.run(main)
        for i, r in enumerate(rounds):  # every pass is alike: one stands for all
            st.digest_rows[i].append(r.results)
        return MemslotStressReport(
            **st.common(opts.bytes_per_vcpu), iterations=opts.iterations,
            delay_ns=opts.delay_us * 1000, modifications_ns=st.timings[0].ns,
            add_memslot_ns=fig["add"], delete_memslot_ns=fig["delete"], passes=passes)

