"""Unsync shadow pages and their synchronization (KVM: mmu.c, paging_tmpl.h).

A level-1 guest page table that is shadowed only at level 1 is write-protected through the
rmap, not write-tracked. When the guest writes it, the fault makes the SPTE writable and
marks every shadow page of that gfn unsync instead of emulating the write
(mmu_try_to_unsync_pages, kvm_unsync_page), and marks the way up to every root
(kvm_mmu_mark_parents_unsync: unsync_child_bitmap and unsync_children). From then on the guest
edits its PTEs without exits and the shadow page may be stale, which x86 allows until the
guest invalidates: INVLPG resyncs the entry for that address in every root the vCPU holds
(__kvm_mmu_invalidate_addr), and a CR3 load (KVM_REQ_MMU_SYNC, kvm_mmu_sync_roots) or a
root load (kvm_mmu_load) syncs every unsync page under the root (mmu_sync_children: the gfns
are write-protected again and flushed first, then each page's entries are compared with the
guest's and the changed ones dropped; the page is in sync again).

FNAME(sync_spte) keeps an entry whose access is unchanged, rebuilds one whose permissions
changed and drops the rest, as KVM's does.
"""

from __future__ import annotations

from mmu_core import mutants
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_shadow import role as R
from mmu_shadow.pages import ShadowPage


class SyncMixin:
    # --- unsync ----------------------------------------------------------------------------
    def _try_unsync(self, as_id: int, gfn: int, can_unsync: bool, prefetch: bool) -> bool:
        """mmu_try_to_unsync_pages: may gfn be mapped writable? Not if it is write-tracked
        (shadowed above level 1); if it is shadowed at level 1, only by unsyncing those pages
        (never for a prefetch, nor where the caller forbids it)."""
        if self.vm.is_tracked(as_id, gfn):
            return False
        for sp in list(self.by_gfn.get((as_id, gfn), ())):
            if not can_unsync:
                return False
            if sp.unsync:
                continue
            if prefetch:
                return False
            self._unsync_page(sp)
        return True

    def _unsync_page(self, sp: ShadowPage) -> None:
        """kvm_unsync_page."""
        sp.unsync = True
        self.stats["unsync"] += 1
        if not mutants.on("unsync-no-mark-parents"):
            self._mark_parents_unsync(sp)

    def _mark_parents_unsync(self, sp: ShadowPage) -> None:
        """kvm_mmu_mark_parents_unsync: set the bit of every parent entry; a parent whose
        first unsync child this is marks its own parents."""
        for p in list(sp.parent_ptes):
            parent = self.by_pfn.get(p >> 9)
            if parent is not None:
                self._mark_unsync(parent, p & 511)

    def _mark_unsync(self, parent: ShadowPage, idx: int) -> None:
        """mark_unsync."""
        bit = 1 << idx
        if parent.unsync_child_bitmap & bit:
            return
        parent.unsync_child_bitmap |= bit
        parent.unsync_children += 1
        if parent.unsync_children == 1:
            self._mark_parents_unsync(parent)

    def _clear_child_bit(self, sp: ShadowPage, idx: int) -> None:
        """clear_unsync_child_bit."""
        bit = 1 << idx
        if sp.unsync_child_bitmap & bit:
            sp.unsync_child_bitmap &= ~bit
            sp.unsync_children -= 1

    def _clear_parents(self, sp: ShadowPage) -> None:
        """mmu_pages_clear_parents: sp is in sync and has no unsync children: clear its bit
        in every parent, and up the way while parents become clean."""
        for p in list(sp.parent_ptes):
            parent = self.by_pfn.get(p >> 9)
            if parent is None:
                continue
            self._clear_child_bit(parent, p & 511)
            if not parent.unsync_children and not parent.unsync:
                self._clear_parents(parent)

    def _unlink_unsync(self, sp: ShadowPage) -> None:
        """kvm_unlink_unsync_page."""
        sp.unsync = False

    def _unsync_walk(self, sp: ShadowPage, out: dict[int, ShadowPage]) -> None:
        """mmu_unsync_walk: collect the unsync pages below sp, dropping stale bits."""
        row = self.vm.spte_table(sp.pfn)
        bits = sp.unsync_child_bitmap
        while bits:
            low = bits & -bits
            bits ^= low
            idx = low.bit_length() - 1
            spte = int(row[idx])
            child = None
            if S.is_shadow_present_pte(spte) and not S.is_last_spte(spte, sp.role.level):
                child = self.by_pfn.get(S.spte_to_pfn(spte))
            if child is None:
                self._clear_child_bit(sp, idx)
            elif child.unsync_children:
                self._unsync_walk(child, out)
                if not child.unsync_children:
                    self._clear_child_bit(sp, idx)
            elif child.unsync:
                out[child.pfn] = child
            else:
                self._clear_child_bit(sp, idx)

    def _zap_unsync_children(self, parent: ShadowPage, invalid: list[ShadowPage]) -> int:
        """mmu_zap_unsync_children: a page being zapped takes its unsync descendants along
        (nothing would sync them any more)."""
        if parent.role.level == 1 or not parent.unsync_children:
            return 0
        found: dict[int, ShadowPage] = {}
        self._unsync_walk(parent, found)
        zapped = 0
        for sp in found.values():
            zapped += self._prepare_zap(sp, invalid)
        return zapped

    # --- sync --------------------------------------------------------------------------------
    def _sync_children(self, vcpu, parent: ShadowPage, invalid: list[ShadowPage]) -> bool:
        """mmu_sync_children: write-protect the gfns of every unsync page below parent (one
        flush, so the guest cannot write them any more), then sync each. Returns whether a
        flush is still due."""
        found: dict[int, ShadowPage] = {}
        self._unsync_walk(parent, found)
        if not found:
            return False
        protected = False
        for sp in found.values():
            if not mutants.on("sync-no-write-protect"):
                protected |= self.vm.write_protect_gfn(sp.role.as_id, sp.gfn)
        if protected:
            self._flush_or_zap(invalid, True)
        flush = False
        for sp in found.values():
            if sp.role.invalid:
                continue  # zapped meanwhile (by a sibling's sync)
            self._unlink_unsync(sp)
            self.stats["sync_pages"] += 1
            r = self._sync_page(vcpu, sp, invalid)
            flush |= r > 0
            if r >= 0:
                self._clear_parents(sp)
        return flush

    def _sync_role_ok(self, vcpu, sp: ShadowPage) -> bool:
        """__kvm_sync_page's check: guest entries are interpreted with the vCPU's current
        paging state, so a page built under another one cannot be synced (it is zapped). An
        EPT02 page's entries are EPT12's, read the same in any vCPU state (nested.py)."""
        if sp.role.guest_mode:
            return True
        ctx = self._context(vcpu)
        want = R.make_role(ctx, sp.role.level, direct=False)
        role = sp.role
        return (role.paging_mode, role.cr0_wp, role.efer_nx, role.smep_andnot_wp,
                role.smap_andnot_wp, role.as_id, role.guest_mode, role.ad_disabled) == (
            want.paging_mode, want.cr0_wp, want.efer_nx, want.smep_andnot_wp,
            want.smap_andnot_wp, want.as_id, want.guest_mode, want.ad_disabled)

    def _sync_page(self, vcpu, sp: ShadowPage, invalid: list[ShadowPage]) -> int:
        """kvm_sync_page: -1 if sp was zapped instead, else 1 if an SPTE changed (a flush is
        due) and 0 if none did."""
        if not self._sync_role_ok(vcpu, sp):
            self._prepare_zap(sp, invalid)
            return -1
        row = self.vm.spte_table(sp.pfn)
        flush = 0
        for idx in row.nonzero()[0].tolist():
            flush |= self._sync_spte(sp, idx)
        return flush

    def _gpte_access(self, sp: ShadowPage, gpte: int) -> int:
        """FNAME(gpte_access) under the page's role access, less W for a clean entry
        (FNAME(protect_clean_gpte))."""
        acc = sp.role.access & R.pte_access(gpte, sp.role.paging_mode, sp.role.efer_nx)
        if not gpte & P.PT_DIRTY:
            acc &= ~R.ACC_WRITE
        return acc

    def _sync_spte(self, sp: ShadowPage, idx: int) -> int:
        """FNAME(sync_spte): drop the entry if the guest PTE is no longer present, accessed
        and valid (FNAME(prefetch_invalid_gpte)) or maps another gfn; keep it if the access
        it grants is unchanged; else rebuild it with the new access (make_spte as for a
        prefetch: writable only where the gfn needs no protection, never in a logged slot).
        Returns 1 if a present SPTE changed (a flush is due)."""
        if sp.role.guest_mode:
            return self._sync_ept_spte(sp, idx)  # EPT12 entries (nested.py)
        vm = self.vm
        self.stats["sync_spte"] += 1
        gpte = self._read_gpte(sp, idx)
        stored = int(sp.gptes[idx])
        if stored == gpte and gpte & P.PT_PRESENT and gpte & P.PT_ACCESSED:
            return 0
        old = int(vm.spte_table(sp.pfn)[idx])
        same_gfn = sp.leaf_gfn(idx) == self._gpte_gfn(sp, gpte)
        if not (gpte & P.PT_PRESENT and gpte & P.PT_ACCESSED) or not same_gfn \
                or self._gpte_reserved(sp, gpte) or not S.is_shadow_present_pte(old) \
                or not sp.role.cr0_wp:
            # (an MMIO SPTE, or one the CR0.WP=0 path built, is simply dropped: the next
            # access faults and builds it as that path does)
            self.stats["sync_dropped"] += 1
            return int(self._zap_spte(sp, idx)) if old else 0
        acc = self._gpte_access(sp, gpte)
        sp.gptes[idx] = gpte
        if acc == self._gpte_access(sp, stored):
            return 0
        as_id = sp.role.as_id
        gfn = sp.leaf_gfn(idx)
        slot = vm.memslots[as_id].find(gfn)
        writable = False
        if acc & R.ACC_WRITE and slot is not None and not slot.readonly and not slot.log_dirty:
            writable = vm.host_writable(slot.gfn_to_hva(gfn)) \
                and self._try_unsync(as_id, gfn, True, True)
        new = S.make_shadow_leaf_spte(S.spte_to_pfn(old), writable, bool(acc & R.ACC_USER),
                                      not acc & R.ACC_EXEC)
        self.stats["sync_rebuilt"] += 1
        if new == old:
            return 0
        vm.spte_write(sp.pfn, idx, new)
        return 1

    @staticmethod
    def _gpte_gfn(sp: ShadowPage, gpte: int) -> int:
        if int(P.MODE_ENTRY_BYTES[sp.role.paging_mode]) == 4:
            return gpte >> 12
        return (gpte >> 12) & ((1 << 40) - 1)

    def _read_gpte(self, sp: ShadowPage, idx: int) -> int:
        gpa = sp.gpte_gpa(idx)
        word = self.vm.read_guest_u64(sp.role.as_id, gpa & ~7)
        if int(P.MODE_ENTRY_BYTES[sp.role.paging_mode]) == 4:
            word = (word >> (32 * ((gpa >> 2) & 1))) & 0xFFFFFFFF
        return word

    # --- the hooks that sync -------------------------------------------------------------------
    def _sync_roots(self, vcpu) -> None:
        """kvm_mmu_sync_roots for the vCPU's current root (lock held for write)."""
        st = self.vroots.get(vcpu.id)
        if st is None:
            return
        invalid: list[ShadowPage] = []
        flush = False
        for root in self._current_roots(st):  # the root, or each of the four PAE roots
            if not root.role.invalid and root.unsync_children:
                self.stats["sync_roots"] += 1
                flush |= self._sync_children(vcpu, root, invalid)
        self._flush_or_zap(invalid, flush)

    def _invalidate_addr(self, vcpu, root: ShadowPage, gva: int, invalid: list[ShadowPage]) -> bool:
        """__kvm_mmu_invalidate_addr: walk the shadow entries of gva from root; in an unsync
        page, sync that entry; stop where no unsync page lies further down."""
        vm = self.vm
        sp = root
        while True:
            level = sp.role.level
            idx = (gva >> (12 + 9 * (level - 1))) & 511
            if sp.unsync and not mutants.on("invlpg-no-sync"):
                self.stats["invlpg_sync"] += 1
                if self._sync_spte(sp, idx):
                    return True
            if not sp.unsync_children or level == 1:
                return False
            spte = int(vm.spte_table(sp.pfn)[idx])
            if not S.is_shadow_present_pte(spte) or S.is_last_spte(spte, level):
                return False
            child = self.by_pfn.get(S.spte_to_pfn(spte))
            if child is None:
                return False
            sp = child
