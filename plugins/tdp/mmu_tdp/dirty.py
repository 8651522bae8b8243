"""Dirty logging, aging and the fast page fault of the TDP MMU (a mixin of TdpMMU).

Dirty logging as KVM does it (x86.c kvm_mmu_slot_apply_flags, mmu.c
kvm_arch_mmu_enable_log_dirty_pt_masked): with PML the D bits of the slot's leaves are
cleared and the hardware logs the next write to each page; without PML (or without EPT A/D)
the leaves are write-protected, keeping MMU-writable, and the next write takes a fast page
fault that makes the SPTE writable again and marks the page dirty, without the MMU lock.

Enabling logging and aging run under the read lock; KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG
re-protect under the write lock, as KVM's do (kvm_get_dirty_log_protect takes mmu_lock for
write). Range work is done by ops.update_leafs_in_range in chunks.
"""

from __future__ import annotations

import numpy as np

from mmu_core import PageFault, fastpf, hookimpl, mutants
from mmu_core.arch.x86 import spte as S
from mmu_tdp import ops
from mmu_tdp.tdp_iter import TdpIter


class DirtyLogging:
    # --- range updates ------------------------------------------------------------------------
    def update_range(self, as_id: int, start: int, end: int, mode: int, min_level: int = 1,
                     lock: str = "read") -> tuple[int, int]:
        """Apply an ops mode to the leaves in [start, end) of every valid root of as_id,
        under the MMU lock in `lock` mode (the caller holds it). Returns (changed, young).

        Charges per chunk: a READ_ONCE per SPTE visited and, per SPTE changed, an atomic
        read-modify-write (LOCK AND / CMPXCHG: leaves are volatile, the hardware may set A/D
        in them, so even under the write lock KVM changes them atomically)."""
        vm = self.vm
        cost = vm.engine.cost
        changed = young = 0
        unused = np.zeros(6, np.int64)
        for root in self.roots_yield_safe(as_id):
            gfn = start
            while gfn < end:
                visited, n, y, gfn = ops.update_leafs_in_range(
                    vm.host.pt, vm.host.pt_slot, root.pfn, root.level, gfn, end, self.CHUNK,
                    mode, min_level, unused)
                changed += n
                young += y
                per_change = cost.cmpxchg
                if mode == ops.CLEAR_DIRTY and "atomic-clear-d" in self.reverts:
                    # Before the atomic AND: tdp_mmu_set_spte's xchg and the whole
                    # handle_changed_spte bookkeeping for every SPTE.
                    per_change = cost.xchg + cost.spte_build
                vm.engine.delay(visited * cost.atomic_read + n * per_change)
                if gfn < end and vm.mmu_lock.contended:
                    self.stats["resched"] += 1
                    vm.mmu_lock.cond_resched(lock)
        return changed, young

    def protect_mode(self) -> int:
        """How re-protection works in this VM: D-bit clearing under PML, else write-protection."""
        return ops.CLEAR_DIRTY if self.vm.params.pml_enabled else ops.WRPROT

    # --- dirty logging hooks ------------------------------------------------------------------
    @hookimpl
    def mmu_enable_dirty_log(self, vm, slot, protect):
        """kvm_mmu_slot_apply_flags, logging on: eager split, then clear D (and write-protect
        huge pages, so a write to one faults and is split) or write-protect everything. With
        KVM_DIRTY_LOG_INITIALLY_SET nothing happens now: pages are protected, and split, as
        userspace clears their bits."""
        if not protect:
            return False
        flush = False
        with vm.mmu_lock.read():
            if vm.params.eager_page_split:
                flush |= self.split_range(slot.as_id, slot.base_gfn, slot.end_gfn, shared=True)
            if vm.params.pml_enabled:
                n, _ = self.update_range(slot.as_id, slot.base_gfn, slot.end_gfn,
                                         ops.CLEAR_DIRTY)
                m, _ = self.update_range(slot.as_id, slot.base_gfn, slot.end_gfn, ops.WRPROT,
                                         min_level=2)
                flush |= bool(n or m)
            else:
                n, _ = self.update_range(slot.as_id, slot.base_gfn, slot.end_gfn, ops.WRPROT)
                flush |= bool(n)
        return flush

    @hookimpl
    def mmu_clear_dirty_log(self, vm, slot, gfns):
        """kvm_arch_mmu_enable_log_dirty_pt_masked under the write lock, for runs of
        consecutive gfns. With KVM_DIRTY_LOG_INITIALLY_SET the huge pages over the cleared
        range are split first (eager_page_split) or write-protected."""
        gfns = np.asarray(gfns, dtype=np.int64)
        if not len(gfns):
            return False
        breaks = np.flatnonzero(np.diff(gfns) != 1) + 1
        starts = np.concatenate(([gfns[0]], gfns[breaks]))
        ends = np.concatenate((gfns[breaks - 1] + 1, [gfns[-1] + 1])) if len(breaks) \
            else np.array([gfns[-1] + 1])
        mode = self.protect_mode()
        flush = False
        with vm.mmu_lock.write():
            if vm.config.dirty_log_initially_set:
                lo, hi = int(gfns[0]), int(gfns[-1]) + 1
                if vm.params.eager_page_split:
                    flush |= self.split_range(slot.as_id, lo, hi, shared=False)
                m, _ = self.update_range(slot.as_id, lo, hi, ops.WRPROT, min_level=2,
                                         lock="write")
                flush |= bool(m)
            for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
                n, _ = self.update_range(slot.as_id, lo, hi, mode, lock="write")
                flush |= bool(n)
        return flush and not mutants.on("clear-dirty-log-no-flush")

    # --- aging --------------------------------------------------------------------------------
    @hookimpl
    def mmu_age_gfn_range(self, vm, as_id, start, end):
        """kvm_tdp_mmu_age_gfn_range: clear the Accessed bit of each young leaf (with EPT
        A/D), or mark it for access tracking (RWX parked, so the next access faults and the
        fast page fault restores it). True if any was young. No flush, as clear_young."""
        with vm.mmu_lock.read():
            _, young = self.update_range(as_id, start, end, ops.AGE)
        return young > 0

    # --- fast page fault ----------------------------------------------------------------------
    @hookimpl
    def mmu_fast_page_fault(self, vcpu, fault: PageFault):
        """fast_page_fault for the TDP MMU (mmu_core.fastpf): fix, without the MMU lock and
        under RCU only, a write to a write-protected but MMU-writable SPTE (dirty logging),
        or an access to an access-tracked one. None when the fault is not one of those; the
        slow path runs."""
        vm = self.vm
        if "fast-pf" in self.reverts or not fastpf.page_fault_can_be_fast(vm, fault):
            return None
        root = self.all_roots.get(vcpu.mmu_root) if vcpu.mmu_root is not None else None
        if root is None or root.invalid:
            return None
        vm.engine.delay(vm.engine.cost.rcu_read_lock)
        with vm.rcu.read():
            return fastpf.fast_page_fault(vm, vcpu, fault,
                                          lambda gfn: self._fast_pf_last_spte(root, gfn),
                                          self.stats)

    def _fast_pf_last_spte(self, root, gfn: int):
        """kvm_tdp_mmu_fast_pf_get_last_sptep, as mmu_core.fastpf wants it."""
        it = self._last_spte(root, gfn)
        table, idx = it.sptep
        return table, idx, it.level, it.old_spte

    def _last_spte(self, root, gfn: int) -> TdpIter:
        """The last SPTE on gfn's path (present leaf or the first non-present entry)."""
        last = None
        for it in TdpIter(self.vm, root.pfn, root.level, 1, gfn, gfn + 1):
            last = it
            if not S.is_shadow_present_pte(it.old_spte) or S.is_last_spte(it.old_spte, it.level):
                break
        return last
