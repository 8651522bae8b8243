"""Shadow pages and their lifecycle (KVM: struct kvm_mmu_page, mmu.c).

A shadow page is found in the hash by (gfn, role) (kvm_mmu_find_shadow_page), remembers the
parent SPTEs that point at it (parent_ptes), whether it is unsync and which of its children
are (unsync_child_bitmap, unsync_children), how many vCPUs hold it as a root (root_count) and,
for a page that shadows guest PTEs, the guest entry each of its leaves was built from
(shadowed_translation). Zapping goes in two steps as in KVM: kvm_mmu_prepare_zap_page unlinks
a page from its parents and children and moves it to an invalid list (a root still held is
only marked invalid), kvm_mmu_commit_zap_page flushes remote TLBs once for the whole batch and
then frees every page on the list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmu_core import REQ_MMU_RELOAD, mutants
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_shadow import role as R

# mmu.h / mmu.c constants for the page limit
KVM_PERMILLE_MMU_PAGES = 20
KVM_MIN_ALLOC_MMU_PAGES = 64
KVM_MIN_FREE_MMU_PAGES = 5
KVM_REFILL_PAGES = 25
KVM_MMU_NUM_PREV_ROOTS = 3


@dataclass(eq=False)
class ShadowPage:
    gfn: int
    role: R.Role
    pfn: int
    parent_ptes: set[int] = field(default_factory=set)  # SPTE pointers: table * 512 + index
    root_count: int = 0
    unsync: bool = False
    unsync_children: int = 0
    unsync_child_bitmap: int = 0  # bit i: entry i leads to an unsync page
    write_flooding_count: int = 0
    mmu_valid_gen: int = 0  # the VM's generation when it was made (fastzap.py)
    # nx_huge_page_disallowed: made to map an instruction fetch 4K under kvm.nx_huge_pages;
    # a later fault that could map the range huge goes below it instead (_nx_adjust)
    nx_disallowed: bool = False
    # For pages that shadow guest PTEs: the guest entry each leaf was built from (KVM keeps
    # gfn and access per entry in shadowed_translation; the whole entry says both).
    gptes: np.ndarray | None = None

    @property
    def key(self) -> R.Key:
        return R.Key(self.gfn, self.role)

    @property
    def has_gptes(self) -> bool:
        """sp_has_gptes: the page shadows a guest table (not direct, not a special root)."""
        return not self.role.direct and not self.role.special

    def leaf_gfn(self, idx: int) -> int:
        """kvm_mmu_page_get_gfn: the gfn a leaf at idx maps."""
        if self.gptes is not None:
            gpte = int(self.gptes[idx])
            if int(P.MODE_ENTRY_BYTES[self.role.paging_mode]) == 4:
                return gpte >> 12
            return (gpte >> 12) & ((1 << 40) - 1)
        return self.gfn + (idx << (9 * (self.role.level - 1)))

    def gpte_gpa(self, idx: int) -> int:
        """FNAME(get_level1_sp_gpa) + index: where the guest entry shadowed at idx lives."""
        ebytes = int(P.MODE_ENTRY_BYTES[self.role.paging_mode])
        return (self.gfn << 12) + ((self.role.quadrant << 9) + idx) * ebytes


@dataclass
class VcpuRoots:
    """A vCPU's root (mmu->root) and its previous-roots cache (mmu->prev_roots). For a PAE or
    32-bit guest the hardware (4-level here) walks the vCPU's own pml4_root, whose entry 0
    points at its pae_root, whose four entries point at four page-directory roots, one per
    PDPTE (PAE) or per quarter of the guest's page directory (32-bit): KVM's
    mmu_alloc_special_roots / mmu_alloc_shadow_roots. Those two pages are no shadow pages
    (not in the hash, not counted in n_used_mmu_pages)."""

    root: ShadowPage | None = None
    # The guest CR3 (with its PCID) each root was loaded for: KVM's kvm_mmu_root_info.pgd,
    # which fast_pgd_switch matches and kvm_invalidate_pcid reads the PCID of.
    pgd: int = 0
    prev: list[tuple[ShadowPage, int]] = field(default_factory=list)  # (root, pgd)
    pml4_root: int | None = None
    pae_root: int | None = None
    pae: list[ShadowPage | None] = field(default_factory=lambda: [None] * 4)
    # The EPT02 root while the vCPU runs an L2 guest (KVM: vcpu->arch.guest_mmu's root;
    # mmu_shadow/nested.py).
    nested: ShadowPage | None = None
    # guest_mmu's prev_roots: EPT02 roots of other EPTPs this vCPU ran L2 guests with, most
    # recent first (nested.py, fast_pgd_switch on nested VM entry)
    nested_prev: list[ShadowPage] = field(default_factory=list)

    def held(self) -> list[ShadowPage]:
        """Every page this vCPU holds a root reference on."""
        out = [self.root] if self.root is not None else []
        out += [self.nested] if self.nested is not None else []
        out += self.nested_prev
        return out + [sp for sp, _pgd in self.prev] + [sp for sp in self.pae if sp is not None]


def sptep(table: int, idx: int) -> int:
    return table * 512 + idx


class PagesMixin:
    """The hash, accounting, zapping, roots and the page limit. Mixed into ShadowMMU."""

    # --- the hash ---------------------------------------------------------------------------
    def _alloc_sp(self, key: R.Key) -> ShadowPage:
        """kvm_mmu_alloc_shadow_page + account: a new page, in the hash, on the active list."""
        vm = self.vm
        sp = ShadowPage(key.gfn, key.role, vm.alloc_pt_page(), mmu_valid_gen=self.mmu_valid_gen)
        if sp.has_gptes and (key.role.level == 1 or key.role.guest_mode):
            # (an EPT02 page may hold huge leaves built from EPT12 entries: mmu_shadow/nested.py)
            sp.gptes = np.zeros(512, dtype=np.uint64)
        self.pages[key] = sp
        self.by_pfn[sp.pfn] = sp
        self.active[sp.pfn] = sp
        self.n_used += 1
        self.stats["pages_created"] += 1
        if sp.has_gptes:
            self.by_gfn.setdefault((key.role.as_id, key.gfn), set()).add(sp)
            self._account_shadowed(sp)
        return sp

    def _account_shadowed(self, sp: ShadowPage) -> None:
        """account_shadowed: a guest table above level 1 is write-tracked (every guest write
        to it exits and is emulated); a level-1 table is only write-protected, so that a
        guest write to it may unsync it instead (mmu_try_to_unsync_pages). Either way no
        huge page may map it (kvm_mmu_gfn_disallow_lpage), and every SPTE that maps it
        loses W, in this backend's rmaps and in any other backend of the VM: beside the TDP
        MMU, L1's own mapping of an EPT12 table (kvm_mmu_slot_gfn_write_protect ->
        kvm_tdp_mmu_write_protect_gfn)."""
        vm = self.vm
        as_id = sp.role.as_id
        if sp.role.level > 1:
            vm.track_gfn(as_id, sp.gfn)
        else:
            vm.disallow_lpage(as_id, sp.gfn)
        if mutants.on("no-write-protect-shadowed"):
            return
        if vm.write_protect_gfn(as_id, sp.gfn):
            vm.flush_remote_tlbs()  # kvm_flush_remote_tlbs_gfn

    def _unaccount_shadowed(self, sp: ShadowPage) -> None:
        if sp.role.level > 1:
            self.vm.untrack_gfn(sp.role.as_id, sp.gfn)
        else:
            self.vm.allow_lpage(sp.role.as_id, sp.gfn)
        group = self.by_gfn.get((sp.role.as_id, sp.gfn))
        if group is not None:
            group.discard(sp)
            if not group:
                del self.by_gfn[(sp.role.as_id, sp.gfn)]

    def _get_sp(self, vcpu, key: R.Key, invalid: list[ShadowPage]) -> ShadowPage:
        """kvm_mmu_get_shadow_page / kvm_mmu_find_shadow_page: the page for key, created if
        absent. A new upper-level page for a gfn zaps the gfn's unsync pages (the table is no
        longer a leaf table only); an unsync page found is synced first (kvm_sync_page, which
        leaves it unsync: only mmu_sync_children write-protects)."""
        vm = self.vm
        vm.engine.delay(vm.engine.cost.sp_hash_lookup)
        role = key.role
        if not role.direct and not role.special:
            for other in list(self.by_gfn.get((role.as_id, key.gfn), ())):
                if other.role != role and role.level > 1 and other.unsync:
                    self._prepare_zap(other, invalid)
        sp = self.pages.get(key)
        if sp is not None and sp.unsync:
            r = self._sync_page(vcpu, sp, invalid)
            if r < 0:
                sp = None  # zapped: build it again
            elif r > 0:
                vm.flush_remote_tlbs()
        if sp is None:
            sp = self._alloc_sp(key)
        return sp

    # --- links ---------------------------------------------------------------------------------
    def _link(self, table: int, idx: int, child: ShadowPage) -> None:
        """link_shadow_page: point entry idx of table at child; an unsync child (or one with
        unsync children) marks the new parent."""
        vm = self.vm
        ept = self.direct or child.role.guest_mode  # EPT02 tables are EPT tables
        vm.spte_write(table, idx, S.make_nonleaf_spte(child.pfn) if ept
                      else S.make_shadow_nonleaf_spte(child.pfn))
        child.parent_ptes.add(sptep(table, idx))
        if child.unsync or child.unsync_children:
            self._mark_unsync(self.by_pfn[table], idx)

    def _zap_spte(self, sp: ShadowPage, idx: int) -> bool:
        """mmu_page_zap_pte: clear one SPTE; a leaf leaves the rmap, a link leaves the
        child's parent_ptes (the child stays in the hash). True if it was present."""
        vm = self.vm
        old = int(vm.spte_table(sp.pfn)[idx])
        if not old:
            return False
        present = S.is_shadow_present_pte(old)
        if present:
            if S.is_last_spte(old, sp.role.level):
                self._drop_leaf(sp, idx)
            else:
                child = self.by_pfn.get(S.spte_to_pfn(old))
                if child is not None:
                    child.parent_ptes.discard(sptep(sp.pfn, idx))
        vm.spte_write(sp.pfn, idx, 0)
        return present

    def _drop_leaf(self, sp: ShadowPage, idx: int) -> None:
        """rmap_remove for the present leaf at idx (about to be overwritten or cleared)."""
        if mutants.on("forget-rmap-removal"):
            return
        gfn = sp.leaf_gfn(idx)
        level = sp.role.level
        if level > 1:
            gfn &= ~((1 << (9 * (level - 1))) - 1)
        self.rmaps.remove(sp.role.as_id, gfn, level, sptep(sp.pfn, idx))

    def _add_rmap(self, sp: ShadowPage, idx: int, gfn: int) -> None:
        self.vm.engine.delay(self.vm.engine.cost.rmap_add)
        self.rmaps.add(sp.role.as_id, gfn, sp.role.level, sptep(sp.pfn, idx))

    def _zap_children(self, sp: ShadowPage) -> bool:
        """kvm_mmu_page_unlink_children."""
        row = self.vm.spte_table(sp.pfn)
        flush = False
        for idx in np.flatnonzero(row).tolist():
            flush |= self._zap_spte(sp, idx)
        return flush

    def _unlink_parents(self, sp: ShadowPage) -> None:
        """kvm_mmu_unlink_parents: clear every SPTE that points at sp."""
        vm = self.vm
        for p in list(sp.parent_ptes):
            vm.spte_write(p >> 9, p & 511, 0)
        sp.parent_ptes.clear()

    # --- zapping -------------------------------------------------------------------------------
    def _prepare_zap(self, sp: ShadowPage, invalid: list[ShadowPage]) -> int:
        """__kvm_mmu_prepare_zap_page: unlink sp (and zap its unsync descendants) and put it
        on `invalid`, or, if vCPUs still hold it as a root, mark it invalid (out of the hash
        and the active list) and make them reload. Returns how many pages were zapped."""
        if sp.pfn not in self.by_pfn:
            return 0
        self.stats["shadow_zapped"] += 1
        zapped = self._zap_unsync_children(sp, invalid)
        self._zap_children(sp)
        self._unlink_parents(sp)
        first = not sp.role.invalid
        if first and sp.has_gptes:
            self._unaccount_shadowed(sp)
        if sp.unsync:
            self._unlink_unsync(sp)
        if sp.nx_disallowed and not mutants.on("nx-tracking-kept"):
            self._unaccount_nx(sp)
        if first and self.pages.get(sp.key) is sp:  # an obsolete page's key may be reused
            del self.pages[sp.key]
        self.active.pop(sp.pfn, None)
        if sp.root_count == 0:
            zapped += 1
            if sp not in invalid:
                invalid.append(sp)
                self.n_used -= 1
        else:
            for vcpu in self.vm.vcpus:  # KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
                st = self.vroots.get(vcpu.id)
                if st is not None and sp in st.held():
                    vcpu.make_request(REQ_MMU_RELOAD)
        if first:
            sp.role = sp.role._replace(invalid=True)
        return zapped

    def _unaccount_nx(self, sp: ShadowPage) -> None:
        """unaccount_nx_huge_page: sp no longer keeps its range 4K, nor waits for recovery."""
        sp.nx_disallowed = False
        self.nx_pages.pop(sp.pfn, None)

    def _commit_zap(self, invalid: list[ShadowPage], flush: bool = True) -> None:
        """kvm_mmu_commit_zap_page: one remote flush for the batch (a vCPU may still walk or
        cache the unlinked pages), then free them."""
        if not invalid:
            return
        vm = self.vm
        walkers = self.lockless.seq  # the flush waits for lockless walks begun before it
        if flush:
            vm.flush_remote_tlbs()
        self.lockless.wait(walkers)
        self.stats["zap_batches"] += 1
        for sp in invalid:
            self.by_pfn.pop(sp.pfn, None)
            vm.free_pt_page(sp.pfn)
        invalid.clear()

    def _flush_or_zap(self, invalid: list[ShadowPage], flush: bool) -> None:
        """kvm_mmu_remote_flush_or_zap: commit the zaps (which flush), or flush alone."""
        if invalid:
            self._commit_zap(invalid)
        elif flush:
            self.vm.flush_remote_tlbs()

    # --- roots -------------------------------------------------------------------------------
    def _put_root(self, sp: ShadowPage, invalid: list[ShadowPage]) -> None:
        """mmu_free_root_page: drop a reference; an invalid root goes with its last one."""
        sp.root_count -= 1
        if sp.root_count == 0 and sp.role.invalid:
            self._prepare_zap(sp, invalid)
            self.vm.observe.mmu_on_root_free(vm=self.vm, as_id=sp.role.as_id, role=self.vm.role,
                                             root=sp.pfn)

    # --- the page limit -------------------------------------------------------------------------
    def default_mmu_pages(self) -> int:
        """kvm_mmu_calculate_default_mmu_pages: 2% of guest memory in pages, at least 64."""
        nr_pages = sum(slot.npages for slots in self.vm.memslots for slot in slots.slots)
        return max(nr_pages * KVM_PERMILLE_MMU_PAGES // 1000, KVM_MIN_ALLOC_MMU_PAGES)

    def _change_mmu_pages(self, goal: int) -> None:
        """kvm_mmu_change_mmu_pages: zap the oldest pages down to goal (never below what is
        left in use) and make it the limit."""
        with self.vm.mmu_lock.write():
            if self.n_used > goal:
                self._zap_oldest(self.n_used - goal)
                goal = self.n_used
            self.n_max = goal

    def _zap_oldest(self, nr_to_zap: int) -> int:
        """kvm_mmu_zap_oldest_mmu_pages: from the oldest, zap pages that are no vCPU's root
        until nr_to_zap are gone; one commit (one flush) for all. Lock held for write."""
        invalid: list[ShadowPage] = []
        total = 0
        for sp in list(self.active.values()):
            if sp.pfn not in self.active or sp.root_count:
                continue
            total += self._prepare_zap(sp, invalid)
            if total >= nr_to_zap:
                break
        self._commit_zap(invalid, flush=not mutants.on("reclaim-no-flush"))
        self.stats["recycled"] += total
        return total

    def _make_pages_available(self) -> None:
        """make_mmu_pages_available, before a fault or a root allocation takes pages: keep
        KVM_MIN_FREE_MMU_PAGES free by zapping the oldest. KVM fails the fault with -ENOSPC
        if nothing could be freed; the model lets it go on over the limit and counts it."""
        avail = max(self.n_max - self.n_used, 0)
        if avail >= KVM_MIN_FREE_MMU_PAGES:
            return
        self._zap_oldest(KVM_REFILL_PAGES - avail)
        if self.n_max <= self.n_used:
            self.stats["enospc"] += 1
