"""The fixed phases of a selftest run: what the whole test costs besides the part the engine
simulates (creating the VM, its vCPUs and memslots, starting and joining threads).

They run one after the other in the test's main thread, before the vCPUs start and after they
finish, so their virtual time is a sum over the model's own state, with the cost model's
constants (docs/engine.md, "The test's fixed phases"):

- KVM_CREATE_VM once (`vm_create`), KVM_CREATE_VCPU per vCPU (`vcpu_create`);
- each memslot's creation: the SRCU grace period of the update
  (`srcu_expedited_grace_period`) and the backend's metadata allocated with it, as
  `mmu_memory` reports it after the run (`rmap_bytes`: the shadow MMU's rmaps, allocated
  and zeroed when the slot is created; the TDP MMU allocates none), one `host_page_alloc`
  per 4 KiB of it;
- every thread of the test (vCPU threads and userfault handler threads) started and joined
  (`thread_start_join`).

Deleting the memslots and destroying the VM at exit are left out: the selftest's timer has
stopped by then, and so does the seed's figure.
"""

from __future__ import annotations

from mmu_core.report.models import FixedPhases
from mmu_core.sim.cost import CostModel


def fixed_phases(cost: CostModel, vcpus: int, memslots: int, rmap_bytes: int,
                 threads: int) -> FixedPhases:
    """The fixed phases of a test with `vcpus` vCPUs, `memslots` slots, `threads` threads
    besides the main one, and `rmap_bytes` of metadata allocated with the slots."""
    memslot_ns = memslots * cost.srcu_expedited_grace_period \
        + -(-rmap_bytes // 4096) * cost.host_page_alloc
    vcpu_ns = vcpus * cost.vcpu_create
    thread_ns = threads * cost.thread_start_join
    return FixedPhases(vm_create_ns=cost.vm_create, vcpu_create_ns=vcpu_ns,
                       memslot_create_ns=memslot_ns, threads_ns=thread_ns,
                       total_ns=cost.vm_create + vcpu_ns + memslot_ns + thread_ns)
