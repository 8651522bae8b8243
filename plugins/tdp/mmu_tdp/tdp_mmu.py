"""The TDP MMU backend: direct roles, faults under the MMU lock held for read.

Every operation is a short loop over tdp_iter. Page faults run concurrently under the read
lock and change SPTEs only with cmpxchg; a lost race frees what it allocated and returns
RETRY, so the vCPU faults again and sees the winner's work. Page-table pages that get
disconnected are frozen (FROZEN_SPTE in every entry, so concurrent walkers back off and the
hardware faults), and freed by an RCU callback queued after the TLB flush, the seed's three
steps. Zaps for notifiers, memslot changes and teardown take the lock for write.
"""

from __future__ import annotations

import numpy as np

from mmu_core import BackendInfo, FaultKind, MMUMemory, PageFault, Ret, Role, hookimpl
from mmu_core.arch.x86 import spte as S
from mmu_tdp.ops import collect_tables, zap_leafs_in_range
from mmu_tdp.tdp_iter import TdpIter

VERSION = "0.1.0"


class TdpMMU:
    """One instance per VM (the core creates it with the VM)."""

    def __init__(self, vm) -> None:
        self.vm = vm
        self.roots: dict[tuple[int, int], int] = {}  # (as_id, root_level) -> root pfn
        self.root_refs: dict[int, int] = {}
        self.stats = {"faults": 0, "retries": 0, "cmpxchg_lost": 0, "mmio": 0, "mmio_fast": 0,
                      "spurious": 0,
                      "tables_linked": 0, "tables_freed": 0, "mapped": [0, 0, 0, 0]}

    # --- identity -------------------------------------------------------------------------
    @staticmethod
    @hookimpl
    def mmu_backend_info():
        return BackendInfo(
            name="tdp",
            version=VERSION,
            roles=(Role.DIRECT,),
            description="KVM's TDP MMU (the 2019 direct MMU): tdp_iter, faults under the read lock",
        )

    # --- lifecycle --------------------------------------------------------------------------
    @hookimpl
    def mmu_init_vm(self, vm):
        self.vm = vm

    @hookimpl
    def mmu_destroy_vm(self, vm):
        for (as_id, level), root in self.roots.items():
            vm.observe.mmu_on_root_free(vm=vm, as_id=as_id, role=Role.DIRECT, root=root)
            self._free_tree(root, level)
        self.roots.clear()
        self.root_refs.clear()
        vm.rcu.barrier()

    @hookimpl
    def mmu_load(self, vcpu):
        vm = self.vm
        key = (vcpu.as_id, vm.root_levels(vcpu))
        with vm.mmu_lock.read():
            root = self.roots.get(key)
        if root is None:
            with vm.mmu_lock.write():
                root = self.roots.get(key)
                if root is None:
                    root = vm.alloc_pt_page()
                    self.roots[key] = root
                    self.root_refs[root] = 0
                    vm.observe.mmu_on_root_alloc(vm=vm, as_id=key[0], role=Role.DIRECT, root=root)
        self.root_refs[root] += 1
        vcpu.mmu_root = root

    @hookimpl
    def mmu_unload(self, vcpu):
        if vcpu.mmu_root is not None and vcpu.mmu_root in self.root_refs:
            self.root_refs[vcpu.mmu_root] -= 1
        vcpu.mmu_root = None

    # --- faults -------------------------------------------------------------------------------
    @hookimpl
    def mmu_page_fault(self, vcpu, fault: PageFault):
        vm = self.vm
        self.stats["faults"] += 1
        gfn = fault.gpa >> 12
        as_id = vcpu.as_id
        if fault.kind is FaultKind.EPT_MISCONFIG and self._mmio_spte_is_current(vcpu, gfn):
            # KVM's handle_mmio_page_fault: a lockless walk finds an MMIO SPTE of the current
            # memslots generation, so the gfn is still MMIO: emulate without the slow path.
            fault.mmio = True
            self.stats["mmio_fast"] += 1
            return Ret.EMULATE
        # Resolve gfn -> pfn before taking the lock (KVM: kvm_faultin_pfn), remembering the
        # invalidation sequence so a notifier that ran meanwhile makes us retry.
        mmu_seq = vm.mmu_invalidate_seq
        res = vm.gfn_to_pfn(as_id, gfn, fault.write)
        if res is not None and fault.write and res.slot.readonly:
            fault.mmio = True  # a write to a read-only slot exits to userspace as MMIO
            return Ret.EMULATE
        if res is None:
            goal_level = 1
        else:
            goal_level = vm.max_mapping_level(res.slot, gfn, res.level)
        root = vcpu.mmu_root
        root_level = vm.root_levels(vcpu)
        with vm.mmu_lock.read(), vm.rcu.read():
            if vm.mmu_invalidate_retry_gfn(mmu_seq, as_id, gfn):
                self.stats["retries"] += 1
                return Ret.RETRY
            for it in TdpIter(vm, root, root_level, goal_level, gfn, gfn + 1):
                if S.is_frozen_spte(it.old_spte):
                    return self._retry()
                if it.level == goal_level:
                    break
                present = S.is_shadow_present_pte(it.old_spte)
                if present and not S.is_last_spte(it.old_spte, it.level):
                    continue
                # A huge leaf in the way of a smaller mapping: freeze it first, then link.
                if present and not self._zap_spte_atomic(it):
                    return self._retry()
                if not self._link_table(it):
                    return self._retry()
            else:
                return self._retry()
            ret = self._map_target(vcpu, fault, it, res, gfn, goal_level)
        return ret

    def _mmio_spte_is_current(self, vcpu, gfn: int) -> bool:
        vm = self.vm
        spte = 0
        with vm.rcu.read():
            for it in TdpIter(vm, vcpu.mmu_root, vm.root_levels(vcpu), 1, gfn, gfn + 1):
                spte = it.old_spte
        if not S.is_mmio_spte(spte, True):
            return False
        return S.get_mmio_spte_generation(spte) == vm.memslots_generation() & S.MMIO_SPTE_GEN_MASK

    def _retry(self) -> Ret:
        self.stats["retries"] += 1
        return Ret.RETRY

    def _link_table(self, it: TdpIter) -> bool:
        vm = self.vm
        child = vm.alloc_pt_page()
        new = S.make_nonleaf_spte(child)
        table, idx = it.sptep
        if not vm.spte_cmpxchg(table, idx, it.old_spte, new):
            vm.free_pt_page(child)  # lost the race: the winner's table stays
            self.stats["cmpxchg_lost"] += 1
            return False
        it.old_spte = new
        self.stats["tables_linked"] += 1
        return True

    def _zap_spte_atomic(self, it: TdpIter) -> bool:
        """Freeze, flush, then clear one SPTE (KVM: tdp_mmu_zap_spte_atomic)."""
        vm = self.vm
        table, idx = it.sptep
        if not vm.spte_cmpxchg(table, idx, it.old_spte, S.FROZEN_SPTE):
            return False
        vm.flush_remote_tlbs()
        vm.spte_write(table, idx, 0)
        self._handle_removed(it.old_spte, it.level)
        it.old_spte = 0
        return True

    def _map_target(self, vcpu, fault: PageFault, it: TdpIter, res, gfn: int, level: int) -> Ret:
        vm = self.vm
        table, idx = it.sptep
        if res is None:
            new = S.make_mmio_spte(gfn, 0x7, vm.memslots_generation(), True)
            fault.mmio = True
            if it.old_spte != new and not vm.spte_cmpxchg(table, idx, it.old_spte, new):
                return self._retry()
            self.stats["mmio"] += 1
            return Ret.EMULATE
        slot = res.slot
        base_pfn = res.pfn - (gfn - S.gfn_round_for_level(gfn, level))
        writable = res.writable and not slot.readonly and (not slot.log_dirty or fault.write)
        vm.engine.delay(vm.engine.cost.spte_build)
        new = S.make_leaf_spte(base_pfn, level, writable, True)
        if S.is_shadow_present_pte(it.old_spte) and S.spte_to_pfn(it.old_spte) == base_pfn \
                and S.is_last_spte(it.old_spte, level) \
                and (S.is_writable_pte(it.old_spte) or not fault.write):
            self.stats["spurious"] += 1
            return Ret.SPURIOUS
        if not vm.spte_cmpxchg(table, idx, it.old_spte, new):
            self.stats["cmpxchg_lost"] += 1
            return self._retry()
        if S.is_shadow_present_pte(it.old_spte) and not S.is_last_spte(it.old_spte, level):
            vm.flush_remote_tlbs()
            self._handle_removed(it.old_spte, level)
        if writable and slot.log_dirty:
            vm.mark_page_dirty(vcpu.as_id, gfn)
        self.stats["mapped"][level] += 1
        fault.level = level
        return Ret.FIXED

    def _handle_removed(self, old_spte: int, level: int) -> None:
        """A non-leaf SPTE was disconnected: freeze its table and free it after a grace period
        (KVM: handle_removed_pt + call_rcu(tdp_mmu_free_sp_rcu_callback))."""
        if not S.is_shadow_present_pte(old_spte) or S.is_last_spte(old_spte, level):
            return
        table = S.spte_to_pfn(old_spte)
        vm = self.vm
        for idx in range(S.SPTE_ENT_PER_PAGE):
            child = vm.spte_xchg(table, idx, S.FROZEN_SPTE)
            self._handle_removed(child, level - 1)
        vm.rcu.call_rcu(self._free_table, table)

    def _free_table(self, pfn: int) -> None:
        self.vm.free_pt_page(pfn)
        self.stats["tables_freed"] += 1

    # --- zap ----------------------------------------------------------------------------------
    @hookimpl
    def mmu_zap_gfn_range(self, vm, as_id, start, end):
        flush = False
        with vm.mmu_lock.write():
            for (root_as, level), root in self.roots.items():
                if root_as == as_id:
                    flush |= zap_leafs_in_range(vm.host.pt, vm.host.pt_slot, root, level,
                                                start, end) > 0
        return flush

    @hookimpl
    def mmu_zap_all(self, vm):
        with vm.mmu_lock.write():
            roots = list(self.roots.items())
            self.roots.clear()
            for vcpu in vm.vcpus:
                vcpu.mmu_root = None
            vm.flush_remote_tlbs()
            for (as_id, level), root in roots:
                self.root_refs.pop(root, None)
                vm.observe.mmu_on_root_free(vm=vm, as_id=as_id, role=Role.DIRECT, root=root)
                self._free_tree(root, level)
        return False

    def _free_tree(self, root: int, level: int) -> None:
        """Free a whole (already unreachable) tree: a jitted collection, then RCU frees."""
        vm = self.vm
        pfns = collect_tables(vm.host.pt, vm.host.pt_slot, root, level)
        for pfn in pfns.tolist():
            vm.host.pt[vm.host.pt_slot[pfn]] = np.uint64(S.FROZEN_SPTE)
        vm.rcu.call_rcu(self._free_many, pfns.tolist())

    def _free_many(self, pfns: list[int]) -> None:
        for pfn in pfns:
            self._free_table(pfn)

    # --- memory -----------------------------------------------------------------------------
    @hookimpl
    def mmu_memory(self, vm):
        pages = vm.pt_pages_in_use()
        return MMUMemory(
            page_table_pages=pages,
            page_table_bytes=pages * 4096,
            mmu_page_structs=0,
            mmu_page_struct_bytes=0,
            rmap_bytes=0,
            peak_page_table_pages=int(vm.host.frames_peak[1]),
        )
