"""The legacy MMU's lockless fast page fault (direct roles: ept on, tdp_mmu off).

KVM's direct_page_fault tries fast_page_fault before it takes the MMU lock, whatever the MMU
(mmu.c): the shared part is mmu_core.fastpf. What is the shadow MMU's own is how a walker
without the lock is kept from a freed table. The TDP MMU frees tables after an RCU grace
period; the shadow MMU frees them in kvm_mmu_commit_zap_page right after
kvm_flush_remote_tlbs, and it is that flush which waits: walk_shadow_page_lockless_begin
disables interrupts and sets vcpu->mode to READING_SHADOW_PAGE_TABLES (smp_store_mb), and
kvm_flush_remote_tlbs's request carries KVM_REQUEST_WAIT, which waits for every vCPU not
OUTSIDE_GUEST_MODE when the request was sent (kvm_request_needs_ipi) to acknowledge the IPI,
which it does once walk_shadow_page_lockless_end has enabled interrupts again.
``LocklessWalks`` is that protocol: entries numbered as they begin, and a committer waits for
the walkers that began before its flush. The walk (fast_pf_get_last_sptep,
for_each_shadow_entry_lockless) reads each entry once, a switch point.

Shadow paging (indirect roles) has no fast path in KVM (FNAME(page_fault) never calls it:
the gfn of an indirect page is not stable), so the hook answers None there.
"""

from __future__ import annotations

from mmu_core import PageFault, fastpf, hookimpl, mutants
from mmu_core.arch.x86 import spte as S


class LocklessWalks:
    """vCPUs between walk_shadow_page_lockless_begin and _end, and the committers of zapped
    pages waiting for them (the wait kvm_flush_remote_tlbs does)."""

    def __init__(self, vm) -> None:
        self.vm = vm
        self.seq = 0  # entry numbers given out so far
        self.inside: dict[int, int] = {}  # vCPU id -> its entry number
        self._waiters: list = []  # tasks parked in wait()
        self.waits = 0  # commits that had to wait for a walker

    def begin(self, vcpu) -> None:
        """walk_shadow_page_lockless_begin: local_irq_disable and smp_store_mb of vcpu->mode
        (an XCHG on x86); the walk starts after it."""
        vm = self.vm
        vm.engine.delay(vm.engine.cost.xchg)
        self.seq += 1
        self.inside[vcpu.id] = self.seq

    def end(self, vcpu) -> None:
        """walk_shadow_page_lockless_end: smp_store_release of vcpu->mode, interrupts on (the
        pending flush IPI is acknowledged)."""
        self.inside.pop(vcpu.id, None)
        waiters, self._waiters = self._waiters, []
        for task in waiters:
            self.vm.engine.wake(task)
        if self.vm.engine.current is not None:
            self.vm.engine.delay(self.vm.engine.cost.spin_release)

    def wait(self, upto: int) -> None:
        """Block until no walker numbered `upto` or lower is inside: the pages unlinked
        before entry `upto + 1` was given out may then be freed. Outside a task nothing
        walks (setup, teardown)."""
        engine = self.vm.engine
        task = engine.current
        if task is None or mutants.on("lockless-walk-no-wait"):
            return
        waited = False
        while any(n <= upto for n in self.inside.values()):
            waited = True
            self._waiters.append(task)
            engine.block("lockless_walk")
        self.waits += waited


class FastPageFault:
    """mmu_fast_page_fault for the legacy MMU (a mixin of ShadowMMU)."""

    @hookimpl
    def mmu_fast_page_fault(self, vcpu, fault: PageFault):
        """fast_page_fault from direct_page_fault: fix a write to a write-protected but
        MMU-writable SPTE (dirty logging without PML) or an access to an access-tracked one
        with a cmpxchg, without the MMU lock; None sends the fault to the slow path."""
        vm = self.vm
        if not self.direct or not fastpf.page_fault_can_be_fast(vm, fault):
            return None
        st = self.vroots.get(vcpu.id)
        root = st.root if st is not None else None
        if root is None or root.pfn != vcpu.mmu_root:
            return None
        self.lockless.begin(vcpu)
        try:
            return fastpf.fast_page_fault(vm, vcpu, fault,
                                          lambda gfn: self._fast_pf_last_spte(root, gfn),
                                          self.stats)
        finally:
            self.lockless.end(vcpu)

    def _fast_pf_last_spte(self, root, gfn: int) -> fastpf.LastSpte:
        """fast_pf_get_last_sptep: walk from the root with one read per entry
        (for_each_shadow_entry_lockless) to the first entry that is not present or is a
        leaf. The root is the vCPU's own reference, so it is not freed under us; what is
        below it may be unlinked meanwhile, and is not freed until we end the walk."""
        vm = self.vm
        table, level = root.pfn, root.role.level
        while True:
            idx = (gfn >> (9 * (level - 1))) & 511
            spte = vm.spte_read(table, idx)
            if level == 1 or not S.is_shadow_present_pte(spte) or S.is_last_spte(spte, level):
                return table, idx, level, spte
            table, level = S.spte_to_pfn(spte), level - 1
