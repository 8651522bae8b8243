"""Huge pages in the TDP MMU (a mixin of TdpMMU): splitting in place, eager splitting,
recovering huge mappings when dirty logging stops, and the NX huge-page recovery worker.

- Split in place (tdp_mmu_split_huge_page): a huge leaf becomes a table of 512 SPTEs that map
  the same memory with the same bits (ops.split_children), linked with one cmpxchg, so nothing
  is unmapped. Faults do it when they need a smaller page; eager splitting
  (kvm_tdp_mmu_try_split_huge_pages) does it for a whole slot when dirty logging starts.
- Recovery (kvm_tdp_mmu_recover_huge_pages): a table whose range may be mapped huge again is
  replaced by a huge leaf built from one of its leaves (make_huge_spte); the table is torn down.
- NX huge pages (kvm.nx_huge_pages, the iTLB-multihit mitigation): huge leaves are mapped
  non-executable; an instruction fetch maps 4K, and each table linked only for that is
  remembered; a background worker zaps 1/ratio of them every period so that the memory can
  be mapped huge again (kvm_nx_huge_page_recovery_worker, under the read lock since 6.15).
"""

from __future__ import annotations

from collections import OrderedDict

from mmu_core import hookimpl, mutants
from mmu_core import nx_recovery as NX
from mmu_core.arch.x86 import spte as S
from mmu_tdp import ops
from mmu_tdp.tdp_iter import TdpIter


class HugePages:
    def __init__(self) -> None:
        # Tables linked because NX forbade a huge leaf: table pfn -> (table and index of the
        # SPTE that points at it, its level, the root's as_id, its gfn), oldest first (KVM:
        # possible_nx_huge_pages). The worker's shared part is mmu_core/nx_recovery.py.
        self.nx_tables: OrderedDict[int, tuple[int, int, int, int, int]] = OrderedDict()
        self._nx_worker: NX.RecoveryWorker | None = None

    # --- splitting ----------------------------------------------------------------------------
    def split_huge_spte(self, it: TdpIter, nx_track: bool = False) -> bool:
        """Replace the huge leaf at it.sptep by a table mapping the same memory. False if the
        SPTE changed meanwhile (it.old_spte then holds its new value). The link is a cmpxchg
        whichever the lock mode: KVM's tdp_mmu_link_sp uses tdp_mmu_iter_set_spte under the
        write lock, which cannot fail; the model charges the atomic either way."""
        vm = self.vm
        huge = it.old_spte
        exec_4k = it.level == 2 and vm.params.nx_huge_pages
        children = ops.split_children(huge, it.level, exec_4k)
        # make_small_spte for each entry, then one link (KVM charges the same way).
        vm.engine.delay(vm.engine.cost.pt_page_alloc
                        + S.SPTE_ENT_PER_PAGE * vm.engine.cost.spte_write)
        if not self._link_table(it, nx_track=nx_track, children=children):
            return False
        return True

    def split_range(self, as_id: int, start: int, end: int, shared: bool) -> bool:
        """kvm_tdp_mmu_try_split_huge_pages to 4K over [start, end) of every valid root:
        visit entries at 2M and above only (min level 2), splitting each huge leaf; the
        iterator then steps into the new table and splits its huge children in turn. Returns
        whether a flush is needed (KVM flushes after splitting: the huge TLB entries go)."""
        vm = self.vm
        split = False
        for root in self.roots_yield_safe(as_id):
            visited = 0
            walk = TdpIter(vm, root.pfn, root.level, 2, start, end, atomic=shared)
            for it in walk:
                visited += 1
                spte = it.old_spte
                if not S.is_shadow_present_pte(spte) or not S.is_last_spte(spte, it.level):
                    continue
                while S.is_shadow_present_pte(it.old_spte) \
                        and S.is_last_spte(it.old_spte, it.level):
                    if self.split_huge_spte(it):
                        self.stats["eager_split"] += 1
                        split = True
                        break
                if visited >= self.CHUNK and vm.mmu_lock.contended:
                    visited = 0
                    self.stats["resched"] += 1
                    vm.mmu_lock.cond_resched("read" if shared else "write")
                    it.yielded = True
        return split

    # --- recovering huge mappings -------------------------------------------------------------
    @hookimpl
    def mmu_disable_dirty_log(self, vm, slot):
        """kvm_mmu_recover_huge_pages under the read lock: each table in the slot whose range
        the host and the slot allow to map huge is replaced by a huge leaf. (Before 6.12 KVM
        zapped such tables instead, 'zap collapsible SPTEs', and the guest faulted the huge
        pages back; tdp_mmu_revert=recover-in-place does that.)"""
        if slot.readonly:
            return False
        zap = "recover-in-place" in self.reverts
        flush = False
        # Under RCU, flushing before leaving it: the tables replaced by huge leaves are freed
        # by RCU callbacks, and a vCPU may still cache them until the flush.
        with vm.mmu_lock.read(), vm.rcu.read():
            for root in self.roots_yield_safe(slot.as_id):
                visited = 0
                walk = TdpIter(vm, root.pfn, root.level, 2, slot.base_gfn, slot.end_gfn)
                for it in walk:
                    visited += 1
                    if self._recover_one(it, slot, zap):
                        flush = True
                    if visited >= self.CHUNK and vm.mmu_lock.contended:
                        if flush:  # tdp_mmu_iter_cond_resched flushes before it yields
                            vm.flush_remote_tlbs()
                            flush = False
                        visited = 0
                        self.stats["resched"] += 1
                        vm.mmu_lock.cond_resched("read")
                        it.yielded = True
            if flush:
                vm.flush_remote_tlbs()
        return False

    def _recover_one(self, it: TdpIter, slot, zap: bool) -> bool:
        vm = self.vm
        spte = it.old_spte
        if it.level > 3 or not S.is_shadow_present_pte(spte) or S.is_last_spte(spte, it.level):
            return False
        if it.gfn < slot.base_gfn or it.gfn + S.pages_per_level(it.level) > slot.end_gfn:
            return False
        hva = slot.userspace_addr + ((it.gfn - slot.base_gfn) << 12)
        host_level = 3 if mutants.on("recover-ignores-host-level") else vm.mm.mapping_level(hva)
        if vm.max_mapping_level(slot, it.gfn, host_level) < it.level:
            return False
        if zap:
            # zap_collapsible_spte_range: tdp_mmu_zap_spte_atomic per table, which freezes
            # the SPTE, flushes remote TLBs and clears it: one flush per zapped table.
            if self._zap_spte_atomic(it):
                self.stats["recovered"] += 1
                return True
            return False
        # A lost cmpxchg retries the same SPTE while it is still a table (KVM: goto retry).
        while S.is_shadow_present_pte(it.old_spte) and not S.is_last_spte(it.old_spte, it.level):
            leaf = self._any_leaf(S.spte_to_pfn(it.old_spte), it.level - 1)
            if leaf is None:
                return False
            leaf_spte, leaf_level, leaf_gfn_off = leaf
            # make_huge_spte: the leaf's bits, the large bit, the frame rounded to the huge page.
            pfn = S.spte_to_pfn(leaf_spte) - leaf_gfn_off
            pfn -= pfn % S.pages_per_level(it.level)
            huge = (leaf_spte & ~S.SPTE_BASE_ADDR_MASK) | S.PT_PAGE_SIZE_MASK | (pfn << 12)
            if vm.params.nx_huge_pages:
                huge &= ~S.VMX_EPT_EXECUTABLE_MASK
            vm.engine.delay(vm.engine.cost.spte_build)
            if self._set_spte_atomic(it, huge, it.gfn):
                self.stats["recovered"] += 1
                return True
        return False

    def _any_leaf(self, table: int, level: int) -> tuple[int, int, int] | None:
        """tdp_mmu_get_spte_for_huge_page: a present leaf under `table` (at `level`), with its
        level and its frame offset within the table's range; None if there is none. Reads
        through the switch-point primitive: the table is live."""
        vm = self.vm
        offset = 0
        while True:
            row = vm.spte_table(table)
            for idx in range(S.SPTE_ENT_PER_PAGE):
                e = int(row[idx])
                if S.is_shadow_present_pte(e):
                    break
            else:
                return None
            e = vm.spte_read(table, idx)
            if not S.is_shadow_present_pte(e):
                return None
            offset += idx * S.pages_per_level(level)
            if S.is_last_spte(e, level):
                # The leaf maps its gfn's frame; the huge frame starts `offset` pages before.
                return e, level, offset
            table = S.spte_to_pfn(e)
            level -= 1

    # --- NX huge pages ------------------------------------------------------------------------
    def track_nx_table(self, table: int, it: TdpIter) -> None:
        """account_nx_huge_page: the table linked at it.sptep exists only because of NX."""
        as_id = self.all_roots[it.root].as_id
        self.nx_tables[table] = (it.sptep[0], it.sptep[1], it.level, as_id, it.gfn)
        self.stats["nx_split"] += 1

    def start_nx_recovery(self) -> None:
        self._nx_worker = NX.RecoveryWorker(self.vm, self.recover_nx_huge_pages)
        self._nx_worker.start()

    def stop_nx_recovery(self) -> None:
        if self._nx_worker is not None:
            self._nx_worker.stop()

    def recover_nx_huge_pages(self) -> int:
        """kvm_recover_nx_huge_pages, TDP MMU pages: the oldest ceil(n / ratio) NX-split
        tables, under the read lock; one in a dirty-logged slot is forgotten, the others are
        zapped by cmpxchg of the SPTE that points at them, then one flush. Returns how many
        were zapped."""
        vm = self.vm
        to_zap = NX.pages_to_zap(len(self.nx_tables), vm.params.nx_huge_pages_recovery_ratio)
        zapped = 0
        with vm.mmu_lock.read(), vm.rcu.read():
            for table in list(self.nx_tables)[:to_zap]:
                where = self.nx_tables.get(table)
                if where is None:
                    continue  # torn down while we waited for the lock or flushed
                parent, idx, level, as_id, gfn = where
                if NX.slot_is_dirty_tracked(vm, as_id, gfn):
                    del self.nx_tables[table]  # unaccount_nx_huge_page
                    continue
                old = vm.spte_read(parent, idx)
                if S.is_frozen_spte(old) or S.spte_to_pfn(old) != table:
                    continue  # another task is replacing it; it untracks the table
                if vm.spte_cmpxchg(parent, idx, old, 0):
                    self._handle_changed_spte(0, old, 0, level)
                    zapped += 1
            if zapped:
                vm.flush_remote_tlbs()
        self.stats["nx_recovered"] += zapped
        return zapped

    def untrack_nx_tables(self, tables) -> None:
        """unaccount_nx_huge_page for tables being torn down."""
        if self.nx_tables:
            for t in tables:
                self.nx_tables.pop(t, None)

    def audit_nx(self) -> list[tuple[str, str]]:
        """Every tracked NX table is still linked where it was linked."""
        vm = self.vm
        bad = []
        for table, (parent, idx, *_where) in self.nx_tables.items():
            e = int(vm.spte_table(parent)[idx]) if vm.host.has_table(parent) else 0
            if not S.is_shadow_present_pte(e) or S.spte_to_pfn(e) != table:
                bad.append(("nx-tracking", f"NX-split table {table:#x} is no longer linked "
                            f"at {parent:#x}[{idx}] but still tracked for recovery"))
        return bad
