"""Nested EPT (#8 item 7): EPT02, the tables the hardware walks while a vCPU runs L2.

An L1 hypervisor maps its L2 guest's physical addresses with EPT tables in L1 memory (EPT12,
rooted at the EPTP L1 gave in its VMCS12). L0 cannot let the hardware walk them (they hold L1
guest-physical addresses), so it builds EPT02: the shadow of EPT12 composed with L1's own
gpa -> hpa mapping, as KVM's shadow MMU does in guest_mode with the EPT flavour of
paging_tmpl.h (kvm_init_shadow_ept_mmu, PTTYPE_EPT).

What this models, and where in KVM it comes from:

* One EPT02 root per EPTP, shared by the vCPUs running an L2 with that EPTP (KVM finds the
  root in the shadow-page hash by the EPTP's gfn and the guest_mode role).
* An EPT violation on EPT02 walks EPT12 (FNAME(walk_addr_generic) with PTTYPE_EPT). When
  EPT12 does not map the access the fault is reflected to L1 (kvm_inject_emulated_page_fault
  -> nested_ept_inject_page_fault, an EPT-violation VM exit L1 handles); else L0 resolves the
  L1 gfn with gfn_to_pfn and installs a 4K EPT02 leaf (FNAME(fetch)) whose permissions are
  EPT12's ANDed with the host's (writable only if the host page and the memslot are, and, in
  a memslot logging dirty pages, only on a write, which marks it dirty: make_spte).
* Every EPT12 page a walk went through is write-tracked (account_shadowed): L1's stores to it
  exit to L0, are emulated, and zap the EPT02 leaves built through the written entry
  (kvm_mmu_pte_write). A nested fault whose walked EPT12 entries changed before it took the
  lock retries (FNAME(gpte_changed)).
* INVEPT (handle_invept): single-context drops the EPT02 root of that EPTP, all-context every
  EPT02 root (kvm_mmu_free_roots of the guest-mode roots); the vCPUs reload.
* An MMU-notifier invalidation or a zap of L1 gfns zaps the EPT02 leaves mapping them through
  an rmap by L1 gfn (KVM's rmaps hold EPT02 SPTEs beside L1's); a memslot change drops every
  EPT02 root before the next L2 entry (KVM zaps the slot's gfns; L2 cannot tell).
  docs/nested.md lists what else is simplified: no huge EPT02 leaves, no unsync EPT12 pages,
  no prefetch; EPT02 pages are not in the shadow-page hash nor under the page limit.
"""

from __future__ import annotations

from mmu_core import BackendAudit, PageFault, Ret, mutants
from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import spte as S

EPT12_LEVELS = 4
_ADDR_MASK = 0x000F_FFFF_FFFF_F000


class NestedEpt:
    """EPT02 roots and the bookkeeping that keeps them the shadow of EPT12."""

    def __init__(self, vm) -> None:
        self.vm = vm
        self.roots: dict[int, int] = {}  # EPTP (EPT12 root gpa) -> EPT02 root pfn
        self.tables: dict[int, list[int]] = {}  # EPTP -> every EPT02 table pfn, root first
        self.children: dict[tuple[int, int, int], int] = {}  # (root, level, l2 gfn base) -> pfn
        # (EPT12 table gfn, entry index) -> EPT02 leaves built through that entry: (EPTP, l2 gfn)
        self.built: dict[tuple[int, int], set[tuple[int, int]]] = {}
        self.leaves: dict[tuple[int, int], tuple[int, int]] = {}  # (EPTP, l2 gfn) -> (pfn, idx)
        self.rmap: dict[int, set[tuple[int, int]]] = {}  # L1 gfn -> EPT02 leaves (EPTP, l2 gfn)
        self.tracked: set[int] = set()  # EPT12 table gfns write-tracked
        self.synced = vm.generation
        self.users: set = set()  # vCPUs that loaded an EPT02 root
        self.stats = {"nested_faults": 0, "nested_fixed": 0, "nested_reflected": 0,
                      "nested_retries": 0, "nested_spurious": 0, "ept12_writes": 0,
                      "ept02_zapped": 0, "invept": 0, "ept02_drops": 0, "ept02_tables": 0}

    # --- EPT12, in L1 memory ------------------------------------------------------------------
    def walk_ept12(self, eptp: int, l2gpa: int):
        """FNAME(walk_addr_generic), EPT flavour: (l1 gpa or None, EPT12 permissions ANDed over
        the walk, [(table gfn, index, entry), ...] of the entries read). None when an entry on
        the way is not present (no R/W/X) or is a misconfiguration (W without R)."""
        vm = self.vm
        table = eptp & _ADDR_MASK
        perm = E.EPT_RWX
        path = []
        for level in range(EPT12_LEVELS, 0, -1):
            idx = (l2gpa >> (12 + 9 * (level - 1))) & 511
            entry = vm.read_guest_u64(0, table + 8 * idx)
            path.append((table >> 12, idx, entry))
            rwx = entry & E.EPT_RWX
            if not rwx or (rwx & E.EPT_WRITE and not rwx & E.EPT_READ):
                return None, 0, path
            perm &= rwx
            if level == 1 or (level <= 3 and entry & E.EPT_LARGE):
                size = 1 << (12 + 9 * (level - 1))
                return (entry & _ADDR_MASK & ~(size - 1)) | (l2gpa & (size - 1)), perm, path
            table = entry & _ADDR_MASK
        raise AssertionError("unreachable")

    # --- roots --------------------------------------------------------------------------------
    def sync_host(self) -> None:
        """Drop every EPT02 root if the memslots changed since they were built (KVM zaps the
        affected gfns through the rmaps; the model drops everything, which L2 cannot tell)."""
        vm = self.vm
        now = vm.generation
        if now != self.synced:
            self.synced = now
            if self.roots:
                self.drop(None)

    def load(self, vcpu, eptp: int) -> int:
        """The EPT02 root for eptp (mmu_alloc_shadow_roots for the guest-mode role)."""
        self.sync_host()
        self.users.add(vcpu)
        root = self.roots.get(eptp)
        if root is None:
            vm = self.vm
            with vm.mmu_lock.write():
                root = self.roots.get(eptp)
                if root is None:
                    root = vm.alloc_pt_page()
                    self.roots[eptp] = root
                    self.tables[eptp] = [root]
                    self.stats["ept02_tables"] += 1
        return root

    def drop(self, eptp: int | None) -> None:
        """Free the EPT02 root of eptp, or every one (None): unlinked, every vCPU flushed and
        asked to reload, then the tables freed."""
        vm = self.vm
        victims = list(self.roots) if eptp is None else [eptp] if eptp in self.roots else []
        if not victims:
            return
        with vm.mmu_lock.write():
            pfns = []
            for p in victims:
                if p not in self.roots:
                    continue
                root = self.roots.pop(p)
                pfns.extend(self.tables.pop(p))
                self.children = {k: v for k, v in self.children.items() if k[0] != root}
                self.leaves = {k: v for k, v in self.leaves.items() if k[0] != p}
            for index in (self.rmap, self.built):  # keep the leaves of the roots left
                for key in list(index):
                    index[key] = {e for e in index[key] if e[0] in self.roots}
                    if not index[key]:
                        del index[key]
            if not self.roots:
                for gfn in self.tracked:
                    vm.untrack_gfn(0, gfn)
                self.tracked.clear()
            for vcpu in self.users:
                vcpu.request_nested_reload()
            vm.flush_remote_tlbs()
            for pfn in pfns:
                vm.free_pt_page(pfn)
            self.stats["ept02_drops"] += 1

    def free_all(self) -> None:
        """VM teardown: no task, no lock."""
        for pfns in self.tables.values():
            for pfn in pfns:
                self.vm.free_pt_page(pfn)
        for gfn in self.tracked:
            self.vm.untrack_gfn(0, gfn)
        self.roots.clear()
        self.tables.clear()
        self.children.clear()
        self.built.clear()
        self.leaves.clear()
        self.rmap.clear()
        self.tracked.clear()

    # --- faults -------------------------------------------------------------------------------
    def page_fault(self, vcpu, fault: PageFault, eptp: int) -> int:
        """An EPT violation on EPT02 at L2 gpa fault.gpa: Ret.INJECT reflects it to L1."""
        vm = self.vm
        self.stats["nested_faults"] += 1
        l1gpa, perm, path = self.walk_ept12(eptp, fault.gpa)
        need = E.EPT_WRITE if fault.write else E.EPT_EXEC if fault.fetch else E.EPT_READ
        if l1gpa is None or not perm & need or not perm & E.EPT_READ:
            # Execute-only EPT12 entries are not shadowed (make_leaf_spte sets R): reflected.
            self.stats["nested_reflected"] += 1
            return Ret.INJECT
        l1gfn = l1gpa >> 12
        l2gfn = fault.gpa >> 12
        mmu_seq = vm.mmu_invalidate_seq
        res = vm.gfn_to_pfn(vcpu.as_id, l1gfn, fault.write and bool(perm & E.EPT_WRITE))
        if res is None or (fault.write and res.slot.readonly):
            fault.mmio = True  # L1 MMIO seen by L2 (the model's L1 maps L2 1:1): emulated
            return Ret.EMULATE
        with vm.mmu_lock.write():
            if vm.mmu_invalidate_retry_gfn(mmu_seq, vcpu.as_id, l1gfn) \
                    or self._ept12_changed(path) or eptp not in self.roots \
                    or vm.generation != self.synced:
                self.stats["nested_retries"] += 1
                return Ret.RETRY
            root = self.roots[eptp]
            table = root
            for level in range(EPT12_LEVELS, 1, -1):
                idx = (l2gfn >> (9 * (level - 1))) & 511
                key = (root, level - 1, l2gfn >> (9 * (level - 1)))
                child = self.children.get(key)
                if child is None:
                    child = vm.alloc_pt_page()
                    self.children[key] = child
                    self.tables[eptp].append(child)
                    self.stats["ept02_tables"] += 1
                    vm.spte_write(table, idx, int(S.make_nonleaf_spte(child)))
                table = child
            idx = l2gfn & 511
            slot = res.slot
            writable = bool(perm & E.EPT_WRITE) and res.writable and not slot.readonly \
                and (not slot.log_dirty or fault.write)
            new = int(S.make_leaf_spte(res.pfn, 1, writable, bool(perm & E.EPT_EXEC)))
            old = int(vm.spte_table(table)[idx])
            if old == new:
                self.stats["nested_spurious"] += 1
                return Ret.SPURIOUS
            if writable:
                vm.mark_page_dirty(vcpu.as_id, l1gfn)  # before L2 can write (make_spte)
            vm.engine.delay(vm.engine.cost.spte_build)
            vm.spte_write(table, idx, new)
            if old:
                vm.flush_remote_tlbs()  # a present leaf changed (W added): mmu_set_spte
            self.leaves[(eptp, l2gfn)] = (table, idx)
            self.rmap.setdefault(l1gfn, set()).add((eptp, l2gfn))
            for gfn, i, _entry in path:
                self.built.setdefault((gfn, i), set()).add((eptp, l2gfn))
                if gfn not in self.tracked:
                    self.tracked.add(gfn)  # account_shadowed: L1's stores to it now exit
                    vm.track_gfn(0, gfn)
            self.stats["nested_fixed"] += 1
        return Ret.FIXED

    def _ept12_changed(self, path) -> bool:
        """FNAME(gpte_changed): an EPT12 entry the walk read holds something else now (L1's
        store landed; its ept12_write waits for the lock and would miss this fault's leaf)."""
        return any(self.vm.read_guest_u64(0, (gfn << 12) + 8 * i) != entry
                   for gfn, i, entry in path)

    # --- L1's stores to EPT12 -----------------------------------------------------------------
    def ept12_write(self, vcpu, gpa: int, new: int) -> bool:
        """L1 stored `new` at gpa (already in memory). True when the page is write-tracked
        (the store exited to L0 and was emulated); the EPT02 leaves built through the entry
        are zapped (kvm_mmu_pte_write: the shadowed entry no longer holds)."""
        gfn = gpa >> 12
        if gfn not in self.tracked:
            return False
        vm = self.vm
        self.stats["ept12_writes"] += 1
        with vm.mmu_lock.write():
            victims = self.built.pop((gfn, (gpa & 0xFFF) >> 3), set())
            if mutants.on("nested-ept12-write-ignored"):
                victims = set()
            zapped = False
            for key in victims:
                zapped |= self._zap_leaf(key)
            if zapped:
                vm.flush_remote_tlbs()
        return True

    def _zap_leaf(self, key: tuple[int, int]) -> bool:
        """Clear one EPT02 leaf (lock held for write); True if it was present."""
        where = self.leaves.pop(key, None)
        if where is None or not int(self.vm.spte_table(where[0])[where[1]]):
            return False
        self.vm.spte_write(where[0], where[1], 0)
        self.stats["ept02_zapped"] += 1
        return True

    def zap_gfn_range(self, as_id: int, start: int, end: int) -> None:
        """The host takes L1 gfns [start, end) away (an MMU-notifier invalidation or a zap of
        L1's mappings): the EPT02 leaves mapping them go too, through the L1-gfn rmap (KVM's
        rmaps hold EPT02 SPTEs beside L1's), flushed before the caller frees anything."""
        if as_id != 0 or not self.rmap or mutants.on("nested-zap-skipped"):
            return
        vm = self.vm
        with vm.mmu_lock.write():
            if end - start > len(self.rmap):
                gfns = [g for g in self.rmap if start <= g < end]
            else:
                gfns = [g for g in range(start, end) if g in self.rmap]
            zapped = False
            for gfn in gfns:
                for key in self.rmap.pop(gfn):
                    zapped |= self._zap_leaf(key)
            if zapped:
                vm.flush_remote_tlbs()

    def invept(self, eptp: int | None) -> None:
        """handle_invept: single-context (eptp) or all-context (None)."""
        self.stats["invept"] += 1
        self.drop(eptp)

    # --- audit ----------------------------------------------------------------------------------
    def audit(self) -> BackendAudit:
        """The EPT02 roots and tables, and the nested invariants: every EPT02 leaf is one EPT12
        maps now, no more permissive, on the frame the host has for that L1 gfn (read from
        the host's page table, without faulting)."""
        vm = self.vm
        bad = []
        stale = vm.generation != self.synced  # dropped before the next L2 entry
        # An L1 store to EPT12 that has landed but not yet reached ept12_write: the EPT02
        # leaves it affects are zapped when it does.
        lagging = any(vm.track_write_in_flight(0, g) for g in self.tracked)
        for (eptp, l2gfn), (table, idx) in ([] if stale or lagging else self.leaves.items()):
            spte = int(vm.spte_table(table)[idx])
            if not spte:
                continue
            l1gpa, perm, _ = self.walk_ept12(eptp, l2gfn << 12)
            if l1gpa is None:
                bad.append(("nested-ept12-unmapped",
                            f"EPT02 {eptp:#x}: l2 gfn {l2gfn:#x} mapped, EPT12 does not map it"))
                continue
            if spte & E.EPT_WRITE and not perm & E.EPT_WRITE:
                bad.append(("nested-ept12-readonly",
                            f"EPT02 {eptp:#x}: l2 gfn {l2gfn:#x} writable, EPT12 read-only"))
            l1gfn = l1gpa >> 12
            slot = vm.memslots[0].find(l1gfn)
            if slot is not None and not vm.invalidating_gfn(0, l1gfn):
                host = vm.mm.lookup(slot.gfn_to_hva(l1gfn))  # no fault: the host's view
                if host != S.spte_to_pfn(spte):
                    bad.append(("nested-spte-pfn",
                                f"EPT02 {eptp:#x}: l2 gfn {l2gfn:#x} -> frame "
                                f"{S.spte_to_pfn(spte):#x}, EPT12 maps it to L1 gfn {l1gfn:#x} "
                                f"at frame {host:#x}"))
        roots = () if stale else tuple((0, EPT12_LEVELS, r) for r in self.roots.values())
        held = frozenset(p for pfns in self.tables.values() for p in pfns)
        return BackendAudit(roots=roots, held_tables=held, violations=tuple(bad), direct=False)
