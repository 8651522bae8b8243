"""The TDP MMU backend: direct roles, faults under the MMU lock held for read.

Every operation is a short loop over tdp_iter (or a jitted loop with the same walk, see
ops.py). Page faults run concurrently under the read lock and change SPTEs only with cmpxchg;
a lost race frees what it allocated and returns RETRY, so the vCPU faults again and sees the
winner's work. Every SPTE change goes through `_set_spte_atomic` / `_set_spte` and then
`_handle_changed_spte` (KVM: tdp_mmu_set_spte_atomic, tdp_mmu_set_spte, handle_changed_spte),
which keeps the page-size gauges and tears down tables that get disconnected: they are frozen
(FROZEN_SPTE in every entry, so concurrent walkers back off and the hardware faults) and freed
by an RCU callback queued after the TLB flush, the seed's three steps.

Dirty logging, aging and fast page faults are in dirty.py, huge-page splitting, recovery and
the NX huge-page worker in huge.py; this module has roots, faults, zaps and the audit.
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
    InvalidConfig,
    MMUMemory,
    PageFault,
    Ret,
    Role,
    fastpf,
    hookimpl,
    mutants,
)
from mmu_core.arch.x86 import spte as S
from mmu_core.backend import MMUStats, make_direct_leaf
from mmu_tdp import ops
from mmu_tdp.compiled import TdpCompiled
from mmu_tdp.dirty import DirtyLogging
from mmu_tdp.huge import HugePages
from mmu_tdp.tdp_iter import TdpIter

VERSION = "0.2.0"
CHUNK = 64  # SPTEs a range operation visits between checks for lock contention

#: Changes to KVM's TDP MMU that `tdp_mmu_revert` can undo, to measure what each bought
#: (docs/tdp.md has the patch letters). The value is what the code does instead.
REVERTS = {
    "fast-pf": "no fast page fault: every write-protection fault takes the slow path",
    "atomic-clear-d": "clear D bits through the full SPTE-change path, not an atomic AND",
    "split-on-fault": "a fault that needs a smaller page zaps the huge SPTE, not splits it",
    "recover-in-place": "disabling dirty logging zaps collapsible SPTEs, not maps them huge",
}


@dataclass(eq=False)
class TdpRoot:
    """A root and its reference count (KVM: tdp_mmu_root_count). A valid root holds one
    reference of its own, each vCPU that loaded it one more, and each range operation walking
    it (for_each_tdp_mmu_root_yield_safe) one while it does. Invalidating a root (zap-all)
    drops the first; the root's page is freed when the last reference goes."""

    pfn: int
    as_id: int
    level: int
    refcount: int
    invalid: bool = False


class TdpMMU(DirtyLogging, HugePages):
    """One instance per VM (the core creates it with the VM)."""

    CHUNK = CHUNK

    def __init__(self, vm) -> None:
        self.vm = vm
        self.roots: dict[tuple[int, int], TdpRoot] = {}  # valid roots by (as_id, root_level)
        self.all_roots: dict[int, TdpRoot] = {}  # pfn -> root, valid or invalid, until freed
        self.walking: dict[int, int] = {}  # root pfn -> references held by range operations
        self.zapping: set[int] = set()  # invalid roots still holding their own reference
        self.rcu_pending: set[int] = set()  # table pages queued for freeing after a grace period
        self.in_flight: set[int] = set()  # table pages a task allocated and has not linked
        self.removing: set[int] = set()  # disconnected tables being frozen (handle_removed)
        # The page-size gauges: present leaves mapped now, per level (KVM's pages_4k/2m/1g).
        self.pages = [0] * 6
        self.reverts: frozenset[str] = frozenset()
        self.stats = {"faults": 0, "retries": 0, "cmpxchg_lost": 0, "mmio": 0, "mmio_fast": 0,
                      "spurious": 0, "resched": 0, "tables_linked": 0, "tables_freed": 0,
                      "mapped": [0, 0, 0, 0], "fast_fixed": 0, "fast_spurious": 0,
                      "split_on_fault": 0, "eager_split": 0, "recovered": 0,
                      "nx_split": 0, "nx_recovered": 0, "write_protected": 0,
                      "gfn_write_protected": 0}
        HugePages.__init__(self)

    # --- identity -------------------------------------------------------------------------
    @staticmethod
    @hookimpl
    def mmu_backend_info():
        return BackendInfo(
            name="tdp",
            version=VERSION,
            roles=(Role.DIRECT,),
            description="KVM's TDP MMU: tdp_iter, faults under the read lock, fast page "
                        "faults, dirty logging by D bits (PML) or write-protection, eager "
                        "and in-place splitting, NX huge-page recovery",
            capabilities=Capabilities(fault_lock="read", huge_pages=True, mmio_spte=True,
                                      dirty_log="d-bit", aging=True, fast_page_fault=True,
                                      audit=True, max_root_level=5),
        )

    # --- lifecycle --------------------------------------------------------------------------
    @hookimpl
    def mmu_init_vm(self, vm):
        self.vm = vm
        wanted = {r.strip() for r in vm.params.tdp_mmu_revert.split(",") if r.strip()}
        unknown = sorted(wanted - set(REVERTS))
        if unknown:
            raise InvalidConfig("tdp_mmu_revert", f"unknown change {unknown[0]!r} (known: "
                                f"{', '.join(REVERTS)})")
        self.reverts = frozenset(wanted)
        self.start_nx_recovery()

    @hookimpl
    def mmu_destroy_vm(self, vm):
        self.stop_nx_recovery()
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
        """kvm_tdp_mmu_put_root: the last reference frees the root page, and whatever is
        still under it, after a grace period, since lockless walkers may still be inside."""
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

    def roots_yield_safe(self, as_id: int | None, valid_only: bool = True):
        """for_each_tdp_mmu_root_yield_safe: each root of as_id (None: all), holding a
        reference while the caller works on it, so a root invalidated and dropped meanwhile
        (the caller may yield the lock) stays allocated until the caller is done."""
        for root in list(self.all_roots.values()):
            if (as_id is not None and root.as_id != as_id) or (valid_only and root.invalid):
                continue
            if root.pfn not in self.all_roots:
                continue  # freed while an earlier root was worked on
            root.refcount += 1
            self.walking[root.pfn] = self.walking.get(root.pfn, 0) + 1
            try:
                yield root
            finally:
                self.walking[root.pfn] -= 1
                if not self.walking[root.pfn]:
                    del self.walking[root.pfn]
                self._put_root(root)

    # --- the one SPTE-change path ---------------------------------------------------------
    def _set_spte_atomic(self, it: TdpIter, new: int, gfn: int) -> bool:
        """tdp_mmu_set_spte_atomic: cmpxchg it.sptep from it.old_spte to `new` under the read
        lock. On failure it.old_spte is what the SPTE holds now (try_cmpxchg64 returns it),
        so the caller can retry the same SPTE; on success the change is handled."""
        vm = self.vm
        table, idx = it.sptep
        old = it.old_spte
        if not vm.spte_cmpxchg(table, idx, old, new):
            self.stats["cmpxchg_lost"] += 1
            it.old_spte = int(vm.spte_table(table)[idx])
            return False
        it.old_spte = new
        self._handle_changed_spte(gfn, old, new, it.level)
        return True

    def _set_spte(self, table: int, idx: int, old: int, new: int, gfn: int, level: int) -> int:
        """tdp_mmu_set_spte under the write lock: a leaf the hardware may still update (A/D)
        is exchanged atomically, anything else stored plainly; returns what was there."""
        vm = self.vm
        if S.is_shadow_present_pte(old) and S.is_last_spte(old, level):
            old = vm.spte_xchg(table, idx, new)
        else:
            vm.spte_write(table, idx, new)
        self._handle_changed_spte(gfn, old, new, level)
        return old

    def _handle_changed_spte(self, gfn: int, old: int, new: int, level: int) -> None:
        """handle_changed_spte: keep the page-size gauges, and free the table a present
        non-leaf SPTE pointed to once it no longer does.

        No switch point before the gauges move, so the audit never sees them stale. Unlike
        KVM before 6.13, nothing is propagated to the host page here: KVM now marks a folio
        dirty when it maps it writable and leaves Accessed to the MMU notifiers' aging
        (kvm_age_gfn), which mmu_age_gfn_range implements."""
        was_present = S.is_shadow_present_pte(old)
        is_present = S.is_shadow_present_pte(new)
        was_leaf = was_present and S.is_last_spte(old, level)
        is_leaf = is_present and S.is_last_spte(new, level)
        if was_leaf != is_leaf:
            self.pages[level] += 1 if is_leaf else -1
        if was_present and not was_leaf and (not is_present or is_leaf
                                             or S.spte_to_pfn(old) != S.spte_to_pfn(new)):
            self._handle_removed(S.spte_to_pfn(old), level - 1)

    def _handle_removed(self, table: int, level: int) -> None:
        """handle_removed_pt: a table at `level` was disconnected. Freeze its entries and
        those below (ops.freeze_subtree, no switch point), subtract the leaves from the gauges
        and free the tables after a grace period.

        Another task may be in the middle of changing an entry of the table (it froze the
        entry, flushes, and will store its final value): wait until that value is there and
        take it over, or what it links would hang under a dead table and leak."""
        vm = self.vm
        self.removing.add(table)  # unreachable now, not yet queued: ours until then
        unmapped = np.zeros(6, np.int64)
        tables, waits = ops.freeze_subtree(vm.host.pt, vm.host.pt_slot, table, level, unmapped)
        for lvl in range(1, 6):
            self.pages[lvl] -= int(unmapped[lvl])
        owned = set(tables.tolist())
        self.removing.update(owned)
        self.untrack_nx_tables(() if mutants.on("nx-tracking-kept") else owned)
        for t, idx, lvl in waits.tolist():
            while True:
                child = vm.spte_xchg(t, idx, S.FROZEN_SPTE)
                if not S.is_frozen_spte(child) or mutants.on("skip-frozen-wait"):
                    break
                vm.engine.yield_now()  # cpu_relax(): let the owner of the frozen entry finish
            if S.is_shadow_present_pte(child):
                if S.is_last_spte(child, lvl):
                    self.pages[lvl] -= 1
                else:
                    self._handle_removed(S.spte_to_pfn(child), lvl - 1)
        self.removing.difference_update(owned)
        self._free_later(tables.tolist())
        # Charged once the pages are queued: a switch point before would show them owned by
        # nobody.
        vm.engine.delay(len(tables) * S.SPTE_ENT_PER_PAGE * vm.engine.cost.xchg)

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
        req_level = 1 if res is None else vm.max_mapping_level(res.slot, gfn, res.level)
        # iTLB multihit (kvm.nx_huge_pages): an instruction fetch is mapped 4K only
        # (disallowed_hugepage_adjust), and the tables linked for it are tracked for recovery.
        nx_disallowed = res is not None and fault.fetch and vm.params.nx_huge_pages \
            and req_level > 1
        goal_level = 1 if nx_disallowed else req_level
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
                nx_track = nx_disallowed and it.level <= req_level
                if present and "split-on-fault" not in self.reverts:
                    # A huge leaf in the way of a smaller mapping: split it in place
                    # (tdp_mmu_split_huge_page), so the rest of it stays mapped.
                    if not self.split_huge_spte(it, nx_track=nx_track):
                        return self._retry()
                    self.stats["split_on_fault"] += 1
                    continue
                # Before splitting on fault, KVM froze the huge leaf and zapped it.
                if present and not self._zap_spte_atomic(it):
                    return self._retry()
                if not self._link_table(it, nx_track):
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

    def _link_table(self, it: TdpIter, nx_track: bool = False,
                    children: np.ndarray | None = None) -> bool:
        """tdp_mmu_link_sp: allocate a table (filled with `children`, else empty) and cmpxchg
        it into it.sptep. With `nx_track` the table exists only because the NX huge-page
        mitigation forbade a huge mapping: the recovery worker may zap it later."""
        vm = self.vm
        child = vm.alloc_pt_page()
        self.in_flight.add(child)  # a task's own page until linked (KVM: the vCPU's cache)
        new = S.make_nonleaf_spte(child)
        table, idx = it.sptep
        old = it.old_spte
        try:
            if children is not None:
                vm.spte_table(child)[:] = children
            if mutants.on("plain-write-not-cmpxchg") or (children is not None
                                                         and mutants.on("split-plain-store")):
                vm.engine.atomic("cmpxchg")
                vm.spte_table(table)[idx] = np.uint64(new)
            elif not vm.spte_cmpxchg(table, idx, old, new):
                vm.spte_table(child)[:] = 0
                vm.free_pt_page(child)  # lost the race: the winner's table stays
                self.stats["cmpxchg_lost"] += 1
                it.old_spte = int(vm.spte_table(table)[idx])  # try_cmpxchg64's new old value
                return False
        except BaseException:
            vm.spte_table(child)[:] = 0
            vm.free_pt_page(child)  # killed at the switch point (Ctrl-C, teardown): not linked
            raise
        finally:
            self.in_flight.discard(child)
        it.old_spte = new
        if children is not None:
            # The children were in place before the link: count them as they become visible.
            self.pages[it.level - 1] += S.SPTE_ENT_PER_PAGE
        self._handle_changed_spte(it.gfn, old, new, it.level)
        if nx_track:
            self.track_nx_table(child, it)
        self.stats["tables_linked"] += 1
        return True

    def _zap_spte_atomic(self, it: TdpIter) -> bool:
        """Freeze, flush, then clear one SPTE (KVM: tdp_mmu_zap_spte_atomic). The change is
        handled at the freeze, as KVM's tdp_mmu_set_spte_atomic(REMOVED_SPTE) does, so the
        gauges never count a leaf the tables no longer hold; frozen to 0 needs nothing more."""
        vm = self.vm
        table, idx = it.sptep
        old = it.old_spte
        if not vm.spte_cmpxchg(table, idx, old, S.FROZEN_SPTE):
            return False
        try:
            self._handle_changed_spte(it.gfn, old, S.FROZEN_SPTE, it.level)
            vm.flush_remote_tlbs()
            vm.spte_write(table, idx, 0)
        except BaseException:
            vm.spte_table(table)[idx] = 0  # killed at a switch point (Ctrl-C, teardown): no
            raise  # entry may stay frozen, or the teardown would wait for it forever
        it.old_spte = 0
        return True

    def leaf_spte(self, pfn: int, level: int, writable: bool, dirty: bool,
                  mmu_writable: bool, executable: bool) -> int:
        """make_spte for the TDP MMU (mmu_core.direct_spte, shared with the legacy MMU)."""
        return make_direct_leaf(self.vm, pfn, level, writable, dirty, mmu_writable,
                                executable)

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
        may_write = res.writable and not slot.readonly
        # make_spte: mmu_try_to_unsync_pages. A gfn the shadow MMU beside us shadows (an
        # EPT12 table of L1's, docs/nested.md) is write-tracked (kept read-only, neither
        # writable nor MMU-writable, and a write to it emulated: RET_PF_WRITE_PROTECTED) or
        # only write-protected (its shadow pages go unsync and the leaf is writable).
        wrprot = may_write and not vm.mmu_try_to_unsync_pages(vcpu.as_id, gfn)
        may_write = may_write and not wrprot
        # In a logged slot a read fault maps writable only if a later write will still be
        # logged: under PML the SPTE is clean and the hardware logs the D-bit update; with
        # write-protection logging it stays read-only, MMU-writable, and the first write
        # takes a fast page fault that logs it. Either way the log holds written pages only.
        logging = slot.log_dirty and not mutants.on("writable-read-fault-logging")
        pml = vm.params.pml_enabled
        writable = may_write and (not logging or fault.write or pml)
        executable = not (level > 1 and vm.params.nx_huge_pages)
        vm.engine.delay(vm.engine.cost.spte_build)
        new = self.leaf_spte(base_pfn, level, writable, dirty=fault.write or not logging,
                             mmu_writable=may_write, executable=executable)
        old = it.old_spte
        if S.is_shadow_present_pte(old) and S.spte_to_pfn(old) == base_pfn \
                and S.is_last_spte(old, level) and self.access_allowed(fault, old):
            self.stats["spurious"] += 1
            return Ret.SPURIOUS
        if wrprot and fault.write and new == old:
            return self._write_protected(fault)  # nothing to store: emulate the write
        if writable and logging and fault.write and not mutants.on("skip-mark-dirty"):
            # Before the SPTE is installed, as make_spte does: once it is, the guest can write.
            vm.mark_page_dirty(vcpu.as_id, gfn)
        if not self._set_spte_atomic(it, new, gfn):
            return self._retry()
        if S.is_shadow_present_pte(old) and not S.is_last_spte(old, level):
            # A table replaced by a leaf: _handle_changed_spte froze it and queued it for RCU
            # at once; the flush still precedes the free, since our RCU read section lasts
            # until after it.
            vm.flush_remote_tlbs()
        self.stats["mapped"][level] += 1
        fault.level = level
        if wrprot and fault.write:
            return self._write_protected(fault)
        return Ret.FIXED

    def _write_protected(self, fault: PageFault) -> Ret:
        """RET_PF_WRITE_PROTECTED: a write to a write-tracked gfn, mapped read-only; the
        core emulates it and reports it through mmu_track_write (to the shadow MMU that
        tracks the gfn)."""
        self.stats["write_protected"] += 1
        return Ret.EMULATE

    @hookimpl
    def mmu_write_protect_gfn(self, vm, as_id, gfn):
        """kvm_tdp_mmu_write_protect_gfn (min_level 4K): in every valid root of as_id, clear
        W and MMU-writable in the leaf that maps gfn, whatever its level, so that neither
        the guest nor the fast page fault can write it. The shadow MMU beside us calls this
        (through vm.write_protect_gfn) when it shadows an EPT12 table or syncs one; the
        write lock is held. True if a writable leaf lost W."""
        flush = False
        if mutants.on("tdp-wrprot-gfn-skipped"):
            return flush
        for root in [r for r in self.roots.values() if r.as_id == as_id]:
            # plain reads under the write lock (charged like the rmap walk beside it: only
            # the stores), each change an xchg, which returns what the hardware left there
            for it in TdpIter(vm, root.pfn, root.level, 1, gfn, gfn + 1, atomic=False):
                old = it.old_spte
                if not S.is_shadow_present_pte(old) or not S.is_last_spte(old, it.level):
                    continue
                new = int(S.clear_writable(old))
                if new == old:
                    break
                table, idx = it.sptep
                old = self._set_spte(table, idx, old, new, it.gfn, it.level)
                flush |= S.is_writable_pte(old)
                self.stats["gfn_write_protected"] += 1
        return flush

    access_allowed = staticmethod(fastpf.is_access_allowed)

    # --- zap ----------------------------------------------------------------------------------
    @hookimpl
    def mmu_zap_gfn_range(self, vm, as_id, start, end):
        """Zap leaves in [start, end) of every root of as_id, valid or not, under the write
        lock, in jitted chunks: each chunk charges its SPTE reads and stores, and between
        chunks the lock is yielded if anyone waits (tdp_mmu_iter_cond_resched), after
        flushing what was zapped so far, as KVM does before it drops the lock."""
        cost = vm.engine.cost
        flush = False
        unmapped = np.zeros(6, np.int64)
        with vm.mmu_lock.write():
            for root in self.roots_yield_safe(as_id, valid_only=False):
                gfn = start
                while gfn < end:
                    unmapped[:] = 0
                    visited, zapped, gfn = ops.zap_leafs_in_range(
                        vm.host.pt, vm.host.pt_slot, root.pfn, root.level, gfn, end, CHUNK,
                        unmapped)
                    for lvl in range(1, 6):
                        self.pages[lvl] -= int(unmapped[lvl])
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
        """The fast zap (kvm_mmu_zap_all_fast): under the write lock, mark every root invalid
        so that no vCPU loads it again and ask every vCPU to reload; then, under the read lock
        (kvm_tdp_mmu_zap_invalidated_roots), empty the invalid roots, their tables freed after
        a flush and a grace period, and drop each root's own reference. A root still loaded
        by a vCPU is freed by that vCPU's unload. KVM zapped invalid roots from a worker in
        5.18-6.2 and went back to zapping them here, so that no SPTE survives the call."""
        with vm.mmu_lock.write():
            invalid = list(self.roots.values())
            self.roots.clear()
            for root in invalid:
                root.invalid = True
                self.zapping.add(root.pfn)
            for vcpu in vm.vcpus:
                vcpu.make_request(REQ_MMU_RELOAD)
        with vm.mmu_lock.read(), vm.rcu.read():
            for root in invalid:
                self._zap_root_shared(root)
            vm.flush_remote_tlbs()
            for root in invalid:
                self.zapping.discard(root.pfn)
                self._put_root(root)
        return False

    def _zap_root_shared(self, root: TdpRoot) -> None:
        """tdp_mmu_zap_root under the read lock: clear each top-level entry with cmpxchg
        (retrying one another task changed); the subtrees go through handle_removed_pt."""
        vm = self.vm
        row = vm.spte_table(root.pfn)
        step = S.pages_per_level(root.level)
        for idx in np.flatnonzero(row).tolist():
            it = TdpIter(vm, root.pfn, root.level, root.level, idx * step, idx * step + 1)
            while it.old_spte:
                if S.is_frozen_spte(it.old_spte):
                    vm.engine.yield_now()  # its owner will store the final value
                    it.old_spte = vm.spte_read(root.pfn, idx)
                elif self._set_spte_atomic(it, 0, it.gfn):
                    break

    def _free_tree(self, root: int, level: int) -> None:
        """Free a whole (already unreachable) tree, root included, after a grace period."""
        self._handle_removed(root, level)

    # --- audit ------------------------------------------------------------------------------
    @hookimpl
    def mmu_audit(self, vm):
        bad: list[tuple[str, str]] = []
        users: dict[int, int] = {}
        for vcpu in vm.vcpus:
            if vcpu.mmu_root is not None:
                users[vcpu.mmu_root] = users.get(vcpu.mmu_root, 0) + 1
        for pfn, root in self.all_roots.items():
            own = 0 if root.invalid and pfn not in self.zapping else 1
            want = users.get(pfn, 0) + self.walking.get(pfn, 0) + own
            if root.refcount != want:
                bad.append(("root-refcount", f"root {pfn:#x} has refcount {root.refcount}, "
                            f"expected {want} ({users.get(pfn, 0)} vCPUs, "
                            f"{self.walking.get(pfn, 0)} walkers, "
                            f"{'invalid' if root.invalid else 'valid'})"))
            if root.invalid and self.roots.get((root.as_id, root.level)) is root:
                bad.append(("root-invalid", f"invalid root {pfn:#x} can still be loaded"))
        for key, root in self.roots.items():
            if self.all_roots.get(root.pfn) is not root:
                bad.append(("root-lost", f"valid root {root.pfn:#x} for {key} is not tracked"))
        for pfn in users:
            if pfn not in self.all_roots:
                bad.append(("root-freed", f"a vCPU uses root {pfn:#x}, which was freed"))
        census = np.zeros(6, np.int64)
        for root in self.all_roots.values():
            ops.leaf_census(vm.host.pt, vm.host.pt_slot, root.pfn, root.level, census)
        if list(census[1:4]) != self.pages[1:4]:
            bad.append(("page-gauges", f"gauges say 4K/2M/1G = {self.pages[1:4]}, the tables "
                        f"map {census[1:4].tolist()}"))
        bad.extend(self.audit_nx())
        return BackendAudit(
            roots=tuple((r.as_id, r.level, r.pfn) for r in self.all_roots.values()),
            held_tables=frozenset(self.rcu_pending | self.in_flight | self.removing),
            invalid_roots=frozenset(r.pfn for r in self.all_roots.values() if r.invalid),
            violations=tuple(bad),
            direct=True,
        )

    # --- the compiled demand-paging loop (docs/fastloop.md) ------------------------------
    @hookimpl
    def mmu_compiled_kernels(self, vm):
        return TdpCompiled(self)

    # --- statistics and memory -------------------------------------------------------------
    @hookimpl
    def mmu_stats(self, vm):
        st = self.stats
        return MMUStats(faults=st["faults"], retries=st["retries"], mapped_4k=st["mapped"][1],
                        mapped_2m=st["mapped"][2], mapped_1g=st["mapped"][3],
                        mmio_sptes=st["mmio"], pages_4k=self.pages[1], pages_2m=self.pages[2],
                        pages_1g=self.pages[3])

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
