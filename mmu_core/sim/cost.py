"""The cost model: virtual nanoseconds charged for each operation the engine sees.

Defaults are round figures for a 2-socket Skylake-class server running KVM on VMX, chosen so
that relative costs are right (an exit costs about a thousand guest accesses; a contended
cache-line transfer costs more than an uncontended atomic). Every field is configurable; a
run's report carries the model it used.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CostModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    guest_access: int = Field(1, ge=0, description="a guest access that hits the TLB (L1 hit ~1 ns)")
    walk_level: int = Field(5, ge=0, description="one paging-structure read in a walk (cache hit)")
    vm_exit: int = Field(500, ge=0, description="VM exit to KVM (VMX round trip ~1 us: half)")
    vm_entry: int = Field(500, ge=0, description="VM entry back into the guest")
    spin_acquire: int = Field(20, ge=0, description="uncontended spinlock acquire (locked op)")
    spin_release: int = Field(5, ge=0, description="spinlock release (plain store)")
    rwlock_read_acquire: int = Field(20, ge=0, description="qrwlock read acquire (atomic add)")
    rwlock_write_acquire: int = Field(20, ge=0, description="qrwlock write acquire (cmpxchg)")
    rwlock_release: int = Field(10, ge=0, description="rwlock release (atomic)")
    lock_handoff: int = Field(
        100, ge=0,
        description="lock cache line last owned by another CPU: cross-socket transfer ~100 ns",
    )
    atomic_read: int = Field(2, ge=0, description="READ_ONCE of an SPTE")
    cmpxchg: int = Field(20, ge=0, description="locked cmpxchg64 on an SPTE")
    xchg: int = Field(20, ge=0, description="locked xchg64 on an SPTE")
    rcu_read_lock: int = Field(1, ge=0, description="rcu_read_lock: preempt count, ~free")
    rcu_read_unlock: int = Field(1, ge=0, description="rcu_read_unlock")
    call_rcu: int = Field(50, ge=0, description="queueing an RCU callback")
    rcu_grace_period: int = Field(
        1_000_000, ge=0, description="minimum time from call_rcu to its callback (~1 ms, HZ=1000)"
    )
    remote_tlb_flush_base: int = Field(2_000, ge=0, description="kvm_flush_remote_tlbs: IPI send")
    remote_tlb_flush_per_vcpu: int = Field(200, ge=0, description="per vCPU kicked and flushed")
    gup_present: int = Field(200, ge=0, description="get_user_pages on a present page")
    host_page_alloc: int = Field(1_000, ge=0, description="host page fault: allocate + zero 4 KiB")
    uffd_notify: int = Field(3_000, ge=0, description="userfault message to the handler, wakeup")
    uffd_copy: int = Field(4_000, ge=0, description="UFFDIO_COPY of 4 KiB and waking the waiter")
    copy_4k: int = Field(400, ge=0, description="copying 4 KiB more in one UFFDIO_COPY (~10 GB/s)")
    pt_page_alloc: int = Field(
        100, ge=0, description="a zeroed page-table page from the per-vCPU cache (topped up "
        "before the lock is taken, as kvm_mmu_topup_memory_caches does)")
    spte_build: int = Field(50, ge=0, description="computing one SPTE (make_spte)")
    spte_write: int = Field(5, ge=0, description="a plain SPTE store under the write lock")
    sp_hash_lookup: int = Field(
        60, ge=0, description="kvm_mmu_find_shadow_page: one hash-bucket walk (a cache miss)")
    rmap_add: int = Field(
        100, ge=0, description="rmap_add: pte_list_add, often allocating a pte_list_desc")
    emulate: int = Field(2_000, ge=0, description="instruction emulation of one access")
    quantum: int = Field(10_000, ge=1, description="guest time between forced switch points")


DEFAULT_COSTS = CostModel()
