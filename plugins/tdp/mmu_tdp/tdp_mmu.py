"""The TDP MMU backend: direct roles, faults under the MMU lock held for read.

Every operation is a short loop over tdp_iter. Page faults run concurrently under the read
lock and change SPTEs only with cmpxchg; a lost race frees what it allocated and returns
RETRY, so the vCPU faults again and sees the winner's work. Page-table pages that get
disconnected are frozen (FROZEN_SPTE in every entry, so concurrent walkers back off and the
hardware faults), and freed by an RCU callback queued after the TLB flush, the seed's three
steps. Zaps for notifiers, memslot changes and teardown take the lock for write.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmu_core import (
    REQ_MMU_RELOAD,
    BackendAudit,
    BackendInfo,
    Capabilities,
    FaultKind,
    MMUMemory,
    PageFault,
    Ret,
    Role,
    hookimpl,
    mutants,
)
from mmu_core.arch.x86 import spte as S
from mmu_core.backend import MMUStats
from mmu_tdp.ops import collect_tables, zap_leafs_in_range
from mmu_tdp.tdp_iter import TdpIter

VERSION = "0.1.0"
ZAP_CHUNK = 64  # SPTEs a range zap visits between checks for lock contention


@dataclass(eq=False)
class TdpRoot:
    """A root and its reference count (KVM: tdp_mmu_root_count). A valid root holds one
    reference of its own, each vCPU that loaded it one more. Invalidating a root (zap-all)
    drops the former; the root's page is freed when the last vCPU drops the latter."""

    pfn: int
    as_id: int
    level: int
    refcount: int
    invalid: bool = False


class TdpMMU:
    """One instance per VM (the core creates it with the VM)."""

    def __init__(self, vm) -> None:
        self.vm = vm
        self.roots: dict[tuple[int, int], TdpRoot] = {}  # valid roots by (as_id, root_level)
        self.all_roots: dict[int, TdpRoot] = {}  # pfn -> root, valid or invalid, until freed
        self.rcu_pending: set[int] = set()  # table pages queued for freeing after a grace period
        self.in_flight: set[int] = set()  # table pages a fault allocated and has not linked
        self.removing: set[int] = set()  # disconnected tables being frozen (handle_removed)
        self.stats = {"faults": 0, "retries": 0, "cmpxchg_lost": 0, "mmio": 0, "mmio_fast": 0,
                      "spurious": 0, "resched": 0,
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
            capabilities=Capabilities(fault_lock="read", huge_pages=True, mmio_spte=True,
                                      dirty_log="zap", audit=True, max_root_level=5),
        )

    # --- lifecycle --------------------------------------------------------------------------
    @hookimpl
    def mmu_init_vm(self, vm):
        self.vm = vm

    @hookimpl
    def mmu_destroy_vm(self, vm):
        for root in list(self.all_roots.values()):
            vm.observe.mmu_on_root_free(vm=vm, as_id=root.as_id, role=Role.DIRECT, root=root.pfn)
            self._free_tree(root.pfn, root.level)
        self.roots.clear()
        self.all_roots.clear()
        vm.rcu.barrier()

    @hookimpl
    def mmu_load(self, vcpu):
        vm = self.vm
        key = (vcpu.as_id, vm.root_levels(vcpu))
        with vm.mmu_lock.read():
            root = self.roots.get(key)
            if root is not None:
                if not mutants.on("drop-root-refcount"):
                    root.refcount += 1  # kvm_tdp_mmu_get_root (an atomic increment)
                vcpu.mmu_root = root.pfn
        if root is None:
            with vm.mmu_lock.write():
                root = self.roots.get(key)
                if root is None:
                    root = TdpRoot(vm.alloc_pt_page(), key[0], key[1], refcount=1)
                    self.roots[key] = root
                    self.all_roots[root.pfn] = root
                    vm.observe.mmu_on_root_alloc(vm=vm, as_id=key[0], role=Role.DIRECT,
                                                 root=root.pfn)
                root.refcount += 1
                vcpu.mmu_root = root.pfn

    @hookimpl
    def mmu_unload(self, vcpu):
        root = self.all_roots.get(vcpu.mmu_root) if vcpu.mmu_root is not None else None
        vcpu.mmu_root = None
        if root is not None:
            self._put_root(root)

    def _put_root(self, root: TdpRoot) -> None:
        """kvm_tdp_mmu_put_root: the last reference frees the (already emptied) root page
        after a grace period, since lockless walkers may still be inside it."""
        root.refcount -= 1
        if root.refcount:
            return
        assert root.invalid, "a valid root lost its own reference"
        del self.all_roots[root.pfn]
        self.vm.observe.mmu_on_root_free(vm=self.vm, as_id=root.as_id, role=Role.DIRECT,
                                         root=root.pfn)
        self._free_tree(root.pfn, root.level)

    def _root_of(self, vcpu) -> TdpRoot | None:
        """The vCPU's root if it is still valid; otherwise ask for a reload (KVM:
        is_page_fault_stale / KVM_REQ_MMU_FREE_OBSOLETE_ROOTS) and return None."""
        root = self.all_roots.get(vcpu.mmu_root) if vcpu.mmu_root is not None else None
        if root is None or root.invalid:
            vcpu.make_request(REQ_MMU_RELOAD)
            return None
        return root

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
        # An MMIO SPTE carries the generation of the memslots this fault resolved against
        # (KVM: kvm_vcpu_memslots()->generation), not of the ones current when it is
        # installed: a slot created in between must find it stale.
        gen = vm.memslots_generation()
        res = vm.gfn_to_pfn(as_id, gfn, fault.write)
        if res is not None and fault.write and res.slot.readonly:
            fault.mmio = True  # a write to a read-only slot exits to userspace as MMIO
            return Ret.EMULATE
        if res is None:
            goal_level = 1
        else:
            goal_level = vm.max_mapping_level(res.slot, gfn, res.level)
        with vm.mmu_lock.read(), vm.rcu.read():
            # Both checks under the lock: a zap-all or a notifier that ran while we were in
            # gfn_to_pfn (which may sleep) makes what we resolved stale.
            root = self._root_of(vcpu)
            if root is None or vm.mmu_invalidate_retry_gfn(mmu_seq, as_id, gfn):
                self.stats["retries"] += 1
                return Ret.RETRY
            for it in TdpIter(vm, root.pfn, root.level, goal_level, gfn, gfn + 1):
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
            ret = self._map_target(vcpu, fault, it, res, gfn, goal_level, gen)
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
        self.in_flight.add(child)  # a fault's own page until linked (KVM: the vCPU's cache)
        new = S.make_nonleaf_spte(child)
        table, idx = it.sptep
        try:
            if mutants.on("plain-write-not-cmpxchg"):
                vm.engine.atomic("cmpxchg")
                vm.spte_table(table)[idx] = np.uint64(new)
            elif not vm.spte_cmpxchg(table, idx, it.old_spte, new):
                vm.free_pt_page(child)  # lost the race: the winner's table stays
                self.stats["cmpxchg_lost"] += 1
                return False
        except BaseException:
            vm.free_pt_page(child)  # killed at the switch point (Ctrl-C, teardown): not linked
            raise
        finally:
            self.in_flight.discard(child)
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

    def _map_target(self, vcpu, fault: PageFault, it: TdpIter, res, gfn: int, level: int,
                    gen: int) -> Ret:
        vm = self.vm
        table, idx = it.sptep
        if res is None:
            if mutants.on("mmio-generation-at-install"):
                gen = vm.memslots_generation()
            new = S.make_mmio_spte(gfn, 0x7, gen, True)
            fault.mmio = True
            if it.old_spte != new and not vm.spte_cmpxchg(table, idx, it.old_spte, new):
                return self._retry()
            self.stats["mmio"] += 1
            return Ret.EMULATE
        slot = res.slot
        base_pfn = res.pfn - (gfn - S.gfn_round_for_level(gfn, level))
        writable = res.writable and not slot.readonly and (
            not slot.log_dirty or fault.write or mutants.on("writable-read-fault-logging"))
        vm.engine.delay(vm.engine.cost.spte_build)
        new = S.make_leaf_spte(base_pfn, level, writable, True)
        if S.is_shadow_present_pte(it.old_spte) and S.spte_to_pfn(it.old_spte) == base_pfn \
                and S.is_last_spte(it.old_spte, level) \
                and (S.is_writable_pte(it.old_spte) or not fault.write):
            self.stats["spurious"] += 1
            return Ret.SPURIOUS
        if writable and slot.log_dirty and fault.write and not mutants.on("skip-mark-dirty"):
            # Before the SPTE is installed, as make_spte does: once it is, the guest can write.
            vm.mark_page_dirty(vcpu.as_id, gfn)
        if not vm.spte_cmpxchg(table, idx, it.old_spte, new):
            self.stats["cmpxchg_lost"] += 1
            return self._retry()
        if S.is_shadow_present_pte(it.old_spte) and not S.is_last_spte(it.old_spte, level):
            # handle_changed_spte order: the table is frozen and queued for RCU at once (no
            # switch point leaves it owned by nobody); the flush still precedes the free,
            # since our RCU read section lasts until after it.
            self._handle_removed(it.old_spte, level)
            vm.flush_remote_tlbs()
        self.stats["mapped"][level] += 1
        fault.level = level
        return Ret.FIXED

    def _handle_removed(self, old_spte: int, level: int) -> None:
        """A non-leaf SPTE was disconnected: freeze its table and free it after a grace period
        (KVM: handle_removed_pt + call_rcu(tdp_mmu_free_sp_rcu_callback)).

        Another task may be in the middle of changing an entry of the table (it froze the
        entry, flushes, and will store its final value): wait until that value is there and
        take it over, or what it links would hang under a dead table and leak."""
        if not S.is_shadow_present_pte(old_spte) or S.is_last_spte(old_spte, level):
            return
        table = S.spte_to_pfn(old_spte)
        vm = self.vm
        self.removing.add(table)  # unreachable now, not yet queued: ours until then
        for idx in range(S.SPTE_ENT_PER_PAGE):
            while True:
                child = vm.spte_xchg(table, idx, S.FROZEN_SPTE)
                if not S.is_frozen_spte(child) or mutants.on("skip-frozen-wait"):
                    break
                vm.engine.yield_now()  # cpu_relax(): let the owner of the frozen entry finish
            self._handle_removed(child, level - 1)
        self.removing.discard(table)
        self._free_later([table])

    def _free_later(self, pfns: list[int]) -> None:
        """Queue page-table pages for freeing after an RCU grace period; the caller has
        already flushed TLBs (or will before the grace period can end)."""
        if mutants.on("free-without-rcu"):
            self._free_many(pfns)
            return
        self.rcu_pending.update(pfns)
        self.vm.rcu.call_rcu(self._free_many, pfns)

    def _free_many(self, pfns: list[int]) -> None:
        for pfn in pfns:
            self.rcu_pending.discard(pfn)
            self.vm.free_pt_page(pfn)
            self.stats["tables_freed"] += 1

    # --- zap ----------------------------------------------------------------------------------
    @hookimpl
    def mmu_zap_gfn_range(self, vm, as_id, start, end):
        """Zap leaves in [start, end) of every root of as_id, valid or not, under the write
        lock, in jitted chunks: each chunk charges its SPTE reads and stores, and between
        chunks the lock is yielded if anyone waits (tdp_mmu_iter_cond_resched), after
        flushing what was zapped so far, as KVM does before it drops the lock."""
        cost = vm.engine.cost
        flush = False
        with vm.mmu_lock.write():
            for root in list(self.all_roots.values()):
                if root.as_id != as_id:
                    continue
                gfn = start
                while gfn < end:
                    if root.pfn not in self.all_roots:
                        break  # freed while we yielded
                    visited, zapped, gfn = zap_leafs_in_range(
                        vm.host.pt, vm.host.pt_slot, root.pfn, root.level, gfn, end,
                        ZAP_CHUNK)
                    vm.engine.delay(visited * cost.atomic_read + zapped * cost.spte_write)
                    flush |= zapped > 0
                    if gfn < end and vm.mmu_lock.contended:
                        if flush:
                            vm.flush_remote_tlbs()
                            flush = False
                        self.stats["resched"] += 1
                        vm.mmu_lock.cond_resched("write")
        return flush

    @hookimpl
    def mmu_zap_all(self, vm):
        """The fast zap (kvm_mmu_zap_all_fast + kvm_tdp_mmu_invalidate_all_roots): mark every
        root invalid so that no vCPU loads it again, ask every vCPU to reload, empty the
        invalid roots (their tables freed after a flush and a grace period), and drop each
        root's own reference; a root still loaded by a vCPU is freed by that vCPU's unload."""
        with vm.mmu_lock.write():
            invalid = list(self.roots.values())
            self.roots.clear()
            for root in invalid:
                root.invalid = True
            for vcpu in vm.vcpus:
                vcpu.make_request(REQ_MMU_RELOAD)
            children: list[int] = []
            for root in invalid:
                children.extend(self._unlink_children(root))
            vm.flush_remote_tlbs()
            if children:
                self._free_later(children)
            for root in invalid:
                self._put_root(root)
        return False

    def _unlink_children(self, root: TdpRoot) -> list[int]:
        """Clear a root's entries under the write lock; returns the tables now unreachable,
        frozen so that a walker still inside them (under RCU) backs off."""
        vm = self.vm
        host = vm.host
        pfns = collect_tables(host.pt, host.pt_slot, root.pfn, root.level)[1:].tolist()
        row = vm.spte_table(root.pfn)
        present = int(np.count_nonzero(row))
        vm.engine.delay((len(pfns) + 1) * S.SPTE_ENT_PER_PAGE * vm.engine.cost.atomic_read
                        + present * vm.engine.cost.spte_write)
        row[:] = 0
        for pfn in pfns:
            host.pt[host.pt_slot[pfn]] = np.uint64(S.FROZEN_SPTE)
        return pfns

    def _free_tree(self, root: int, level: int) -> None:
        """Free a whole (already unreachable) tree, root included, after a grace period."""
        vm = self.vm
        pfns = collect_tables(vm.host.pt, vm.host.pt_slot, root, level)
        for pfn in pfns.tolist():
            vm.host.pt[vm.host.pt_slot[pfn]] = np.uint64(S.FROZEN_SPTE)
        self._free_later(pfns.tolist())
        # Charged once the pages are queued: a switch point before would show them owned by
        # nobody.
        vm.engine.delay(len(pfns) * S.SPTE_ENT_PER_PAGE * vm.engine.cost.atomic_read)

    # --- audit ------------------------------------------------------------------------------
    @hookimpl
    def mmu_audit(self, vm):
        bad: list[tuple[str, str]] = []
        users: dict[int, int] = {}
        for vcpu in vm.vcpus:
            if vcpu.mmu_root is not None:
                users[vcpu.mmu_root] = users.get(vcpu.mmu_root, 0) + 1
        for pfn, root in self.all_roots.items():
            want = users.get(pfn, 0) + (0 if root.invalid else 1)
            if root.refcount != want:
                bad.append(("root-refcount", f"root {pfn:#x} has refcount {root.refcount}, "
                            f"expected {want} ({users.get(pfn, 0)} vCPUs, "
                            f"{'invalid' if root.invalid else 'valid'})"))
            if root.invalid and self.roots.get((root.as_id, root.level)) is root:
                bad.append(("root-invalid", f"invalid root {pfn:#x} can still be loaded"))
        for key, root in self.roots.items():
            if self.all_roots.get(root.pfn) is not root:
                bad.append(("root-lost", f"valid root {root.pfn:#x} for {key} is not tracked"))
        for pfn in users:
            if pfn not in self.all_roots:
                bad.append(("root-freed", f"a vCPU uses root {pfn:#x}, which was freed"))
        return BackendAudit(
            roots=tuple((r.as_id, r.level, r.pfn) for r in self.all_roots.values()),
            held_tables=frozenset(self.rcu_pending | self.in_flight | self.removing),
            violations=tuple(bad),
            direct=True,
        )

    # --- statistics and memory -------------------------------------------------------------
    @hookimpl
    def mmu_stats(self, vm):
        st = self.stats
        return MMUStats(faults=st["faults"], retries=st["retries"], mapped_4k=st["mapped"][1],
                        mapped_2m=st["mapped"][2], mapped_1g=st["mapped"][3],
                        mmio_sptes=st["mmio"])

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
