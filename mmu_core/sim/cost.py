"""The cost model: how many virtual nanoseconds each operation the engine sees is charged.

Defaults are round figures for a 2-socket Skylake-class server (about 3 GHz) running KVM on
VMX. What the experiments depend on is their ratios (an exit is worth about a thousand TLB
hits; a cache line fetched from the other socket costs more than an uncontended atomic), so
each figure is rounded and its description says where it comes from. A run can be given any
other model; the report carries the one it used.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


def _ns(default: int, what: str, source: str, ge: int = 0) -> int:
    # One place that formats the descriptions, so `mmu params` and the docs read alike.
    return Field(default, ge=ge, description=f"{what} (source: {source})")


class CostModel(BaseModel):
    """Virtual nanoseconds per operation; every field is a non-negative integer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- the guest and the hardware ---------------------------------------------------------
    guest_access: int = _ns(1, "one guest memory access that hits the TLB",
                            "L1D hit, 4-5 cycles at 3 GHz")
    walk_level: int = _ns(5, "one paging-structure read during a page walk",
                          "L1/L2 hit of a paging-structure entry, ~4-14 cycles")
    vm_exit: int = _ns(500, "a VM exit into KVM", "VMX exit+entry round trip ~1 us, half each")
    vm_entry: int = _ns(500, "a VM entry back into the guest",
                        "VMX exit+entry round trip ~1 us, half each")
    emulate: int = _ns(2_000, "emulating one instruction's access in KVM",
                       "x86_emulate_instruction: decode + access ~ a few us")
    nested_vmexit: int = _ns(1_500, "L0 reflecting an L2 exit to L1 (nested_vmx_vmexit): "
                             "vmcs02 synced into vmcs12, L1's host state loaded into vmcs01, "
                             "vmcs01 made current, the MMU switched back to L1's",
                             "estimate from the work in vmx/nested.c: ~65 VMCS fields copied by "
                             "VMREAD/VMWRITE at ~30 cycles, a VMPTRLD, kvm_mmu_reset_context: "
                             "~4.5k cycles at 3 GHz")
    nested_vmentry: int = _ns(2_000, "L0 emulating L1's VMRESUME into L2 (nested_vmx_run): "
                              "vmcs12 checked, vmcs02 prepared from it, made current, the "
                              "guest-mode MMU loaded", "estimate from the work in vmx/nested.c: "
                              "nested_vmx_check_* and prepare_vmcs02 (~80 fields) plus a VMPTRLD "
                              "and the EPT MMU context: ~6k cycles at 3 GHz")
    l1_ept_fault: int = _ns(1_000, "L1's own handler for an EPT violation of its L2 (L1 KVM's "
                            "kvm_mmu_page_fault mapping a page L1 has), besides its exits",
                            "as the model charges L0's fault path for a present page: GUP-fast "
                            "(gup_present), the MMU lock, the SPTE, exit handling, ~1 us")
    quantum: int = _ns(10_000, "longest stretch of guest code a vCPU runs between switch points",
                       "modelling choice: 10 us keeps interleaving fine and switches rare", ge=1)

    # --- the host scheduler ---------------------------------------------------------------------
    sched_slice: int = _ns(3_000_000, "how long a preemptible task runs before a task waiting "
                           "for its CPU gets it", "kernel/sched/fair.c: sysctl_sched_base_slice "
                           "0.75 ms scaled by 1 + ilog2(min(ncpus, 8)) = 3 ms on a large host")
    context_switch: int = _ns(2_000, "switching a CPU from one thread to another (schedule(), "
                              "switch_mm, cold caches)", "lmbench lat_ctx: ~1.5-3 us between two "
                              "processes on recent Xeons; Li, Ding, Shen, ExpCS 2007")

    # --- locks --------------------------------------------------------------------------------
    spin_acquire: int = _ns(20, "uncontended spinlock acquire",
                            "LOCK CMPXCHG ~18-20 cycles on Skylake (Agner Fog's tables), rounded up")
    spin_release: int = _ns(5, "spinlock release", "a plain store (smp_store_release)")
    rwlock_read_acquire: int = _ns(20, "uncontended qrwlock read acquire",
                                   "LOCK XADD on the lock word, as spin_acquire")
    rwlock_write_acquire: int = _ns(20, "uncontended qrwlock write acquire",
                                    "LOCK CMPXCHG on the lock word, as spin_acquire")
    rwlock_release: int = _ns(10, "qrwlock release", "LOCK XADD (read) or a store (write), averaged")
    lock_handoff: int = _ns(100, "one transfer of a contended cache line (a lock word, the "
                            "mmap lock, a uffd wait queue) to the CPU that touches it next; "
                            "transfers of one line queue", "cross-socket cache-line transfer "
                            "~100-130 ns on a 2-socket Skylake (Intel MLC)")

    # --- atomics on SPTEs ----------------------------------------------------------------------
    atomic_read: int = _ns(2, "READ_ONCE of an SPTE", "L1D hit")
    cmpxchg: int = _ns(20, "LOCK CMPXCHG64 on an SPTE", "Agner Fog's tables: ~18-20 cycles")
    xchg: int = _ns(20, "XCHG64 on an SPTE", "Agner Fog's tables: ~18-20 cycles")

    # --- RCU ---------------------------------------------------------------------------------------
    rcu_read_lock: int = _ns(1, "rcu_read_lock", "a preempt-count increment, ~free")
    rcu_read_unlock: int = _ns(1, "rcu_read_unlock", "a preempt-count decrement, ~free")
    call_rcu: int = _ns(50, "queueing an RCU callback", "call_rcu: per-CPU list append, irqs off")
    rcu_grace_period: int = _ns(1_000_000, "minimum virtual time from call_rcu to its callback",
                                "about one tick at HZ=1000; real grace periods take a few ms")
    srcu_expedited_grace_period: int = _ns(
        14_000, "synchronize_srcu_expedited(&kvm->srcu) in a memslot update, no reader inside",
        "KVM_SET_USER_MEMORY_REGION toggling LOG_DIRTY_PAGES on an empty slot: 13-18 us per "
        "call on the development machine (docs/engine.md), benchmarks/kvm/memslot_update.c")

    # --- a test's fixed phases (outside the engine; docs/engine.md, "The test's fixed phases") --
    vm_create: int = _ns(290_000, "KVM_CREATE_VM (and closing it)",
                         "benchmarks/kvm/fixed_phases.c, least of 6 runs on the development "
                         "machine (docs/engine.md)")
    vcpu_create: int = _ns(41_000, "KVM_CREATE_VCPU and the kvm_run mmap, per vCPU",
                           "benchmarks/kvm/fixed_phases.c, 64 vCPUs, least of 6 runs")
    thread_start_join: int = _ns(80_000, "pthread_create and pthread_join of one thread",
                                 "benchmarks/kvm/fixed_phases.c, least of 6 runs on a loaded "
                                 "2-CPU machine (an idle host takes a few tens of us)")

    # --- TLB shootdown -------------------------------------------------------------------------
    remote_tlb_flush_base: int = _ns(2_000, "kvm_flush_remote_tlbs: sending the request IPIs",
                                     "IPI send and ack ~1-2 us")
    remote_tlb_flush_per_vcpu: int = _ns(200, "each vCPU kicked and flushed",
                                         "INVEPT/INVVPID plus a kick, ~200 ns per target")

    # --- the host's memory ------------------------------------------------------------------
    gup_present: int = _ns(200, "get_user_pages on a present page",
                           "GUP-fast: a host page walk and a refcount atomic")
    host_page_alloc: int = _ns(1_000, "populating a missing anonymous page, including zeroing",
                               "anon fault: page allocation + 4 KiB clear_page ~1 us")
    uffd_notify: int = _ns(3_000, "delivering a userfault message to the handler",
                           "demand_paging_test: wakeup of the reader thread ~ a few us")
    uffd_copy: int = _ns(4_000, "UFFDIO_COPY of 4 KiB and waking the faulting thread",
                         "demand_paging_test UFFDIO_COPY ~ a few us")
    copy_4k: int = _ns(400, "each further 4 KiB copied by one UFFDIO_COPY of a huge page",
                       "memcpy at ~10 GB/s")
    swap_out: int = _ns(5_000, "reclaiming one 4 KiB anonymous page to swap (host event)",
                        "shrink_folio_list: unmap, swap-cache insert, submit the write; the I/O "
                        "completes asynchronously, a few us of CPU per page")
    swap_in: int = _ns(20_000, "a major fault reading one 4 KiB page back from swap",
                       "NVMe 4 KiB random read ~10-20 us plus the do_swap_page path")
    thp_split: int = _ns(10_000, "split_huge_page of one 2 MiB THP, contents in place",
                         "512 PTEs written and 512 struct pages' refcounts/flags split, ~20 ns "
                         "each")
    ksm_merge: int = _ns(2_000, "ksmd merging one page: checksum, compare, write-protect, "
                         "replace_page", "two 4 KiB passes at ~10 GB/s (~0.8 us) plus page-table "
                         "and rmap updates")

    # --- MMU work ----------------------------------------------------------------------------------
    pt_page_alloc: int = _ns(100, "a zeroed page-table page from the per-vCPU cache",
                             "kvm_mmu_memory_cache_alloc; the cache is topped up before the lock")
    spte_build: int = _ns(50, "computing one SPTE", "make_spte: a few dozen ALU ops and branches")
    spte_write: int = _ns(5, "a plain SPTE store under the write lock", "one store, L1 hit")
    sp_hash_lookup: int = _ns(60, "kvm_mmu_find_shadow_page: one hash-bucket walk",
                              "about one cache miss")
    rmap_add: int = _ns(100, "rmap_add: pte_list_add", "often allocates a pte_list_desc")

    # --- page-modification logging ------------------------------------------------------------
    pml_flush_per_entry: int = _ns(30, "vmx_flush_pml_buffer: each logged GPA marked dirty",
                                   "a load and kvm_vcpu_mark_page_dirty: the vCPU's last-used "
                                   "memslot and an atomic set_bit_le in its bitmap, ~tens of ns")
    vcpu_kick: int = _ns(100, "kvm_vcpu_kick of a running vCPU so that it exits and drains "
                         "its PML buffer (kvm_arch_sync_dirty_log kicks every vCPU)",
                         "smp_send_reschedule: one x2APIC ICR write (WRMSR, a few hundred "
                         "cycles); the sender does not wait for the exit")


DEFAULT_COSTS = CostModel()
