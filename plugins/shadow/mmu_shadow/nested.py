"""Nested EPT (#8 item 7): EPT02, the tables the hardware walks while a vCPU runs L2, made of
the shadow MMU's own shadow pages.

An L1 hypervisor maps its L2 guest's physical addresses with EPT tables in L1 memory (EPT12,
rooted at the EPTP L1 gave in its VMCS12). L0 cannot let the hardware walk them (they hold L1
guest-physical addresses), so it builds EPT02: the shadow of EPT12 composed with L1's own
gpa -> hpa mapping, as KVM's shadow MMU does in guest mode with the EPT flavour of
paging_tmpl.h (kvm_init_shadow_ept_mmu, FNAME(page_fault) with PTTYPE_EPT).

As in KVM, every EPT02 table is a ShadowPage (pages.py) in the same hash as L1's shadow
pages, keyed by the gfn of the EPT12 table it shadows and a role with `guest_mode` set
(kvm_calc_shadow_ept_root_page_role: 4-level, 8-byte entries, A/D disabled since the model's
EPT12 has none, the EPT permissions above the table as `access`: R, W, X are ACC_USER,
ACC_WRITE, ACC_EXEC, as FNAME(gpte_access) for EPT). Below a huge EPT12 leaf the pages are
direct, keyed by the L1 gfn they map (kvm_mmu_get_child_sp with direct=true). So EPT02 pages
get what L1's shadow pages get: parent links, a root reference per vCPU (the vCPU's guest_mmu
root: VcpuRoots.nested), prepare/commit zaps with one flush per batch, rmap entries by L1 gfn
(so host invalidations, zaps and memslot changes reach EPT02 leaves through the rmaps, as
KVM's rmaps hold EPT02 SPTEs beside L1's), nr_mmu_pages accounting and reclaim of the oldest
pages, mmu_memory's structs, and the shadow audit.

* An EPT violation on EPT02 walks EPT12 (FNAME(walk_addr_generic) with PTTYPE_EPT). When
  EPT12 does not map the access the fault is reflected to L1 (nested_ept_inject_page_fault);
  else L0 resolves the L1 gfn with gfn_to_pfn and links the chain of shadow pages down to the
  leaf (FNAME(fetch)). The leaf is as large as the EPT12 leaf, the host mapping and the
  memslot allow (kvm_mmu_hugepage_adjust: min(EPT12 level, max_mapping_level)); its
  permissions are EPT12's ANDed with the host's (writable only if the host page and the
  memslot are, the gfn is no shadowed table, and, in a memslot logging dirty pages, only on
  a write, which marks it dirty: make_spte).
* EPT12 tables shadowed above the last level are write-tracked (account_shadowed): L1's
  stores to them exit to L0, are emulated, and zap the EPT02 entries built from the written
  entry (kvm_mmu_track_write). A last-level EPT12 table is only write-protected: L1's first
  store to it faults and L0 unsyncs its EPT02 pages (mmu_try_to_unsync_pages); L1's later
  stores do not exit, and EPT02 may lag EPT12 there until it is synced: when a vCPU loads a
  guest-mode root (kvm_mmu_load -> kvm_mmu_sync_roots), on INVEPT (here at the INVEPT itself,
  before the root is freed: KVM syncs at the reload that follows), and on the way of a fault
  (FNAME(fetch)). A nested fault whose walked EPT12 entries changed before it took the lock
  retries (FNAME(gpte_changed)).
* INVEPT (handle_invept) syncs the EPT02 roots of that EPTP (all of them for all-context)
  and frees the executing vCPU's guest-mode root if it is one (kvm_mmu_free_roots); the pages
  stay in the hash and the next entry finds them again.
"""

from __future__ import annotations

import numpy as np

from mmu_core import BackendAudit, PageFault, Ret, hookimpl, mutants
from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_shadow import ept12_walk as J
from mmu_shadow import fastzap
from mmu_shadow import role as R
from mmu_shadow.direct_prefetch import PTE_PREFETCH_NUM
from mmu_shadow.pages import KVM_MMU_NUM_PREV_ROOTS

EPT12_LEVELS = 4
_ADDR_MASK = 0x000F_FFFF_FFFF_F000
_U64 = (1 << 64) - 1
_AD_BITS = S.SPTE_TDP_AD_MASK | S.VMX_EPT_ACCESS_BIT | S.VMX_EPT_DIRTY_BIT


def ept_role(level: int, access: int, direct: bool = False) -> R.Role:
    """The role of an EPT02 page (kvm_calc_shadow_ept_root_page_role and its children)."""
    return R.Role(level=level, direct=direct, quadrant=0, access=access,
                  paging_mode=P.MODE_4LEVEL, guest_level=0 if direct else level, special=False,
                  cr0_wp=False, efer_nx=False, smep_andnot_wp=False, smap_andnot_wp=False,
                  as_id=0, ad_disabled=True, guest_mode=True)


def root_key(eptp: int) -> R.Key:
    return R.Key((eptp & _ADDR_MASK) >> 12, ept_role(EPT12_LEVELS, R.ACC_ALL))


def walk_ept12(vm, eptp: int, l2gpa: int):
    """FNAME(walk_addr_generic), EPT flavour, jitted (ept12_walk.walk): (l1 gpa or None, EPT12
    permissions ANDed over the walk, [(table gfn, index, entry), ...] of the entries read, top
    first). None when an entry on the way is not present (no R/W/X) or is a misconfiguration
    (W without R). The leaf's level is EPT12_LEVELS + 1 - len(path). An EPT12 table whose
    host page is missing is brought in (kvm_read_guest) and the walk starts again."""
    out = J.new_out()
    while True:
        J.walk(vm.host.pt, vm.host.pt_slot, vm.memslots[0].array, vm.mm.hva_pfn, eptp, l2gpa,
               out)
        status = int(out[J.OUT_STATUS])
        if status != J.E12_NEED_GFN:
            break
        vm.gfn_to_pfn_nowait(0, int(out[J.OUT_ADDR]) >> 12, write=False)
    path = [(int(out[J.OUT_GFN + i]), int(out[J.OUT_IDX + i]),
             int(out[J.OUT_ENTRY + i]) & _U64) for i in range(int(out[J.OUT_N]))]
    if status != J.E12_OK:
        return None, 0, path
    return int(out[J.OUT_ADDR]), int(out[J.OUT_PERM]), path


def chain_keys(path, l1gfn: int, goal: int) -> list[R.Key]:
    """Keys of the EPT02 pages from the root down to level `goal` for a walk's path: one per
    EPT12 table read (access: the permissions above it), then, below a huge EPT12 leaf,
    direct pages keyed by the L1 gfn they cover (FNAME(fetch))."""
    keys = []
    acc = R.ACC_ALL
    for i, (gfn, _idx, entry) in enumerate(path):
        keys.append(R.Key(gfn, ept_role(EPT12_LEVELS - i, acc)))
        acc &= entry & E.EPT_RWX
    for level in range(EPT12_LEVELS - len(path), goal - 1, -1):
        keys.append(R.Key(l1gfn & ~((1 << (9 * level)) - 1), ept_role(level, acc, direct=True)))
    return keys


class NestedMixin:
    """The guest-mode MMU of ShadowMMU: EPT02 roots, faults, EPT12 writes, INVEPT, audit."""

    @staticmethod
    def new_nested_stats() -> dict[str, int]:
        return {"nested_faults": 0, "nested_fixed": 0, "nested_reflected": 0,
                "nested_retries": 0, "nested_spurious": 0, "nested_emulated": 0,
                "ept12_writes": 0, "ept12_unsync": 0, "ept02_zapped": 0, "invept": 0,
                "ept02_root_allocs": 0, "reflect_synced": 0, "ept02_prev_root_hits": 0,
                "ept02_prefetched": 0,
                "nested_mapped": [0, 0, 0, 0]}

    def nested_counters(self) -> dict[str, int]:
        out = {k: v for k, v in self.nstats.items() if k != "nested_mapped"}
        for level, name in ((1, "4k"), (2, "2m"), (3, "1g")):
            out[f"ept02_mapped_{name}"] = self.nstats["nested_mapped"][level]
        out["ept02_pages"] = sum(1 for sp in self.by_pfn.values() if sp.role.guest_mode)
        return out

    def _serves_l1(self) -> bool:
        """Whether this instance is also L1's backend (legacy): then L1's hooks (zaps,
        memslots, teardown, audit) reach EPT02 pages directly."""
        vm = self.vm
        return vm.managers[vm.role].is_registered(self)

    # --- roots ----------------------------------------------------------------------------------
    @hookimpl
    def mmu_nested_load(self, vcpu, eptp):
        """The vCPU's EPT02 root for eptp, with a reference. Another EPTP than the current
        root's (L1 runs several L2 guests) is the nested VM entry's kvm_mmu_new_pgd: the
        current root goes to the previous-roots cache (guest_mmu's prev_roots, three, most
        recent first) and a cached root for eptp is taken back without a hash lookup or a
        sync (fast_pgd_switch: KVM_REQ_LOAD_MMU_PGD only; unsync pages below it stay so until
        L1's INVEPT, as the SDM lets cached mappings of an EP4TA survive EPTP switches);
        else kvm_mmu_load (mmu_alloc_shadow_roots): found in the hash by the EPT12 root's gfn
        or built, then synced (kvm_mmu_sync_roots)."""
        vm = self.vm
        st = self._vstate(vcpu)
        key = root_key(eptp)
        sp = st.nested
        if sp is not None and not sp.role.invalid and sp.key == key:
            return sp.pfn
        with vm.mmu_lock.write():
            invalid = []
            # kvm_mmu_free_obsolete_roots: cached roots zapped meanwhile go
            for old in [r for r in st.nested_prev if fastzap.is_obsolete_sp(self, r)]:
                st.nested_prev.remove(old)
                self._put_root(old, invalid)
            if st.nested is not None:
                old, st.nested = st.nested, None
                if old.role.invalid or fastzap.is_obsolete_sp(self, old):
                    self._put_root(old, invalid)
                else:
                    st.nested_prev.insert(0, old)
            hit = next((r for r in st.nested_prev if r.key == key), None)
            if hit is not None:
                st.nested_prev.remove(hit)
            while len(st.nested_prev) > KVM_MMU_NUM_PREV_ROOTS:
                self._put_root(st.nested_prev.pop(), invalid)  # the least recent
            if hit is not None:
                st.nested = hit
                self.nstats["ept02_prev_root_hits"] += 1
                self._commit_zap(invalid)
                return hit.pfn
            if not self.rmaps.allocated:  # mmu_first_shadow_root_alloc (beside the TDP MMU)
                self._first_shadow_root()
                if not self.n_requested:
                    self.n_max = self.default_mmu_pages()
            self._make_pages_available()
            self.nstats["ept02_root_allocs"] += key not in self.pages
            sp = self._get_sp(vcpu, key, invalid)
            sp.root_count += 1
            st.nested = sp
            self._commit_zap(invalid)
            self._sync_ept02(vcpu, sp)  # kvm_mmu_load: kvm_mmu_sync_roots
        return sp.pfn

    def _sync_ept02(self, vcpu, root) -> None:
        """mmu_sync_children below an EPT02 root (lock held for write): the unsync EPT12
        tables are write-protected again and their EPT02 entries brought in line."""
        if not root.unsync_children or root.role.invalid \
                or mutants.on("nested-unsync-never-synced"):
            return
        invalid = []
        self.stats["sync_roots"] += 1
        flush = self._sync_children(vcpu, root, invalid)
        self._flush_or_zap(invalid, flush)

    def _sync_ept_spte(self, sp, idx: int) -> int:
        """FNAME(sync_spte) with PTTYPE_EPT for an unsync EPT02 page (level 1: only last-level
        EPT12 tables go unsync). An entry whose EPT12 entry is unchanged stays; one whose
        EPT12 entry no longer maps anything, is a misconfiguration or execute-only (which the
        model reflects rather than shadows) or maps another L1 gfn is dropped
        (prefetch_invalid_gpte, the gfn check), and the next L2 access refaults; one whose
        target is unchanged is rebuilt with the new permissions (make_spte as for a
        prefetch: writable only if EPT12, the host page and the slot allow it, never in a
        logged slot, and only over a gfn no shadow page in sync shadows). Returns 1 if a
        present SPTE lost a permission or went (a flush is due)."""
        self.stats["sync_spte"] += 1
        gpte = self._read_gpte(sp, idx)
        stored = int(sp.gptes[idx])
        if gpte == stored:
            return 0
        vm = self.vm
        old = int(vm.spte_table(sp.pfn)[idx])
        perm = gpte & E.EPT_RWX
        gfn = sp.leaf_gfn(idx)
        if not perm & E.EPT_READ or not S.is_shadow_present_pte(old) \
                or ((gpte & _ADDR_MASK) >> 12) != gfn:
            self.stats["sync_dropped"] += 1
            return int(self._zap_spte(sp, idx))
        sp.gptes[idx] = gpte
        acc = sp.role.access & perm
        if acc == sp.role.access & stored & E.EPT_RWX:
            return 0  # a bit beyond R/W/X changed (the memory type): the SPTE stands
        slot = vm.memslots[0].find(gfn)
        writable = bool(acc & E.EPT_WRITE) and slot is not None and not slot.readonly \
            and not slot.log_dirty and vm.host_writable(slot.gfn_to_hva(gfn)) \
            and self._try_unsync(0, gfn, True, True)
        new = int(S.make_leaf_spte(S.spte_to_pfn(old), 1, writable, bool(acc & E.EPT_EXEC)))
        new = (new & ~_AD_BITS) | S.SPTE_TDP_AD_DISABLED
        self.stats["sync_rebuilt"] += 1
        if new == old:
            return 0
        vm.spte_write(sp.pfn, idx, new)
        return int(bool(old & ~new & E.EPT_RWX))

    @hookimpl
    def mmu_nested_invept(self, vcpu, eptp):
        """handle_invept: free this vCPU's guest-mode roots of the EPTP (single context) or
        all of them (all context), the current one and the cached previous ones
        (kvm_mmu_free_roots with KVM_MMU_ROOT_CURRENT / KVM_MMU_ROOT_PREVIOUS(i)), after
        syncing every EPT02 root of the EPTP in the hash; the vCPU reloads with a flushed
        TLB if its current root went."""
        self.nstats["invept"] += 1
        st = self.vroots.get(vcpu.id)
        with self.vm.mmu_lock.write():
            # The EPT02 pages are shared by every vCPU with that EPTP: syncing the roots in
            # the hash now (KVM syncs at this vCPU's reload) leaves no vCPU a stale entry.
            for root in [r for r in self.by_pfn.values() if r.role.guest_mode
                         and r.role.level == EPT12_LEVELS and not r.role.direct
                         and (eptp is None or r.key == root_key(eptp))]:
                self._sync_ept02(vcpu, root)
            if st is None:
                return True
            invalid = []
            for sp in [r for r in st.nested_prev if eptp is None or r.key == root_key(eptp)]:
                st.nested_prev.remove(sp)
                self._put_root(sp, invalid)
            sp = st.nested
            current = sp is not None and (eptp is None or sp.key == root_key(eptp))
            if current:
                self._put_root(sp, invalid)
                st.nested = None
            self._commit_zap(invalid)
        if current:
            vcpu.request_nested_reload()
        return True

    # --- faults ---------------------------------------------------------------------------------
    @hookimpl
    def mmu_nested_page_fault(self, vcpu, fault: PageFault, eptp):
        """FNAME(page_fault) with PTTYPE_EPT: an EPT violation on EPT02 at L2 gpa fault.gpa;
        Ret.INJECT reflects it to L1."""
        vm = self.vm
        ns = self.nstats
        ns["nested_faults"] += 1
        l1gpa, perm, path = walk_ept12(vm, eptp, fault.gpa)
        need = E.EPT_WRITE if fault.write else E.EPT_EXEC if fault.fetch else E.EPT_READ
        if l1gpa is None or not perm & need or not perm & E.EPT_READ:
            # Execute-only EPT12 entries are not shadowed (make_leaf_spte sets R): reflected.
            ns["nested_reflected"] += 1
            if l1gpa is not None:
                self._invalidate_reflected(vcpu, eptp, fault.gpa)
            return Ret.INJECT
        l1gfn = l1gpa >> 12
        l2gfn = fault.gpa >> 12
        mmu_seq = vm.mmu_invalidate_seq
        res = vm.gfn_to_pfn(vcpu.as_id, l1gfn, fault.write and bool(perm & E.EPT_WRITE))
        if res is None or (fault.write and res.slot.readonly):
            fault.mmio = True  # L1 MMIO seen by L2 (the model's L1 maps L2 1:1): emulated
            return Ret.EMULATE
        slot = res.slot
        ept12_level = EPT12_LEVELS + 1 - len(path)
        # kvm_mmu_hugepage_adjust: no larger than EPT12's leaf, the host's mapping and what
        # the slot (alignment, dirty logging, write-tracked gfns) allows
        level = min(ept12_level, vm.max_mapping_level(slot, l1gfn, res.level))
        with vm.mmu_lock.write():
            st = self.vroots.get(vcpu.id)
            root = st.nested if st is not None else None
            if vm.mmu_invalidate_retry_gfn(mmu_seq, vcpu.as_id, l1gfn) \
                    or self._ept12_changed(path) or root is None or root.role.invalid \
                    or root.key != root_key(eptp) or root.pfn != vcpu.nested_root:
                ns["nested_retries"] += 1
                return Ret.RETRY
            invalid = []
            self._make_pages_available()
            keys = chain_keys(path, l1gfn, level)
            table = self._fetch_from(vcpu, root, keys, 1, fault.gpa, invalid, level)
            self._commit_zap(invalid)
            if table is None or self._ept12_changed(path):
                ns["nested_retries"] += 1
                return Ret.RETRY
            sp = self.by_pfn[table]
            idx = (l2gfn >> (9 * (level - 1))) & 511
            npages = 1 << (9 * (level - 1))
            base_gfn = l1gfn & ~(npages - 1)
            want_writable = bool(perm & E.EPT_WRITE) and res.writable and not slot.readonly \
                and (not slot.log_dirty or fault.write)
            # make_spte: mmu_try_to_unsync_pages with can_unsync false (EPT12 pages are not
            # unsynced here): a shadowed gfn is mapped read-only, a write to it emulated.
            wrprot = want_writable and not self._try_unsync(0, l1gfn, False, False)
            writable = want_writable and not wrprot
            new = int(S.make_leaf_spte(res.pfn - (l1gfn - base_gfn), level, writable,
                                       bool(perm & E.EPT_EXEC)))
            # role.ad_disabled: no A/D in EPT02 (vmcs02 runs without EPT A/D here), so dirty
            # logging write-protects these leaves rather than clearing D (make_spte)
            new = (new & ~_AD_BITS) | S.SPTE_TDP_AD_DISABLED
            old = int(vm.spte_table(table)[idx])
            gpte = path[-1][2] if sp.gptes is not None else 0
            if old == new and (sp.gptes is None or int(sp.gptes[idx]) == gpte):
                ns["nested_spurious"] += 1
                return Ret.SPURIOUS
            if writable and slot.log_dirty:
                vm.mark_page_dirty(vcpu.as_id, l1gfn)  # before L2 can write (make_spte)
            vm.engine.delay(vm.engine.cost.spte_build)
            self._set_leaf(sp, idx, old, new, base_gfn, gpte, level)
            ns["nested_mapped"][level] += 1
            fault.level = level
            self._ept02_prefetch(sp, idx)
        if fault.write and wrprot:
            ns["nested_emulated"] += 1
            return Ret.EMULATE  # RET_PF_WRITE_PROTECTED
        ns["nested_fixed"] += 1
        return Ret.FIXED

    def _ept02_prefetch(self, sp, fault_idx: int) -> None:
        """FNAME(pte_prefetch) after a 4K EPT02 leaf: the other entries of its aligned group
        of PTE_PREFETCH_NUM that are not present are mapped while they can be, in order: in a
        page shadowing an EPT12 table, each whose EPT12 entry is valid and readable
        (FNAME(prefetch_gpte), prefetch_invalid_gpte), with EPT12's permissions; in a direct
        page below a huge EPT12 leaf, the L1 gfns it covers (__direct_pte_prefetch), with the
        leaf's (role.access). Only to pages the host already maps writable
        (kvm_prefetch_pages: get_user_pages_fast_only, FOLL_WRITE), never in a READONLY slot
        nor, for a writable access, a logged one (gfn_to_memslot_dirty_bitmap), not while an
        MMU-notifier invalidation is in progress. Each is what make_spte builds for a
        prefetch: writable only if no shadow page in sync shadows the gfn (a prefetch never
        unsyncs), and, the page being A/D-disabled as all EPT02 pages are here (EPT12 without
        A/D), marked for access tracking (mark_spte_for_access_track: R/W/X cleared), so
        L2's first access to it still takes an EPT violation, which FNAME(page_fault) fixes
        (the guest-mode MMU has no fast page fault). Lock held for write."""
        vm = self.vm
        if sp.role.level > 1 or vm.mmu_invalidate_in_progress:
            return
        row = vm.spte_table(sp.pfn)
        base = fault_idx & ~(PTE_PREFETCH_NUM - 1)
        for idx in range(base, base + PTE_PREFETCH_NUM):
            if idx == fault_idx or S.is_shadow_present_pte(int(row[idx])):
                continue
            gpte = 0
            if sp.gptes is not None:
                gpte = self._read_gpte(sp, idx)
                if not gpte & E.EPT_READ:
                    break  # not present, a misconfiguration or execute-only
                gfn = (gpte & _ADDR_MASK) >> 12
                acc = sp.role.access & gpte & E.EPT_RWX
            else:
                gfn = sp.gfn + idx
                acc = sp.role.access
            slot = vm.memslots[0].find(gfn)
            if slot is None or slot.readonly or (slot.log_dirty and acc & E.EPT_WRITE):
                break
            hva = slot.gfn_to_hva(gfn)
            pfn = vm.mm.lookup(hva)
            if pfn < 0 or not vm.host_writable(hva):
                break
            writable = bool(acc & E.EPT_WRITE) and self._try_unsync(0, gfn, True, True)
            vm.engine.delay(vm.engine.cost.spte_build)
            new = int(S.make_leaf_spte(pfn, 1, writable, bool(acc & E.EPT_EXEC)))
            new = int(S.mark_spte_for_access_track((new & ~_AD_BITS) | S.SPTE_TDP_AD_DISABLED))
            vm.spte_write(sp.pfn, idx, new)
            if sp.gptes is not None:
                sp.gptes[idx] = gpte
            self._add_rmap(sp, idx, gfn)
            self.nstats["ept02_prefetched"] += 1

    def _invalidate_reflected(self, vcpu, eptp: int, l2gpa: int) -> None:
        """kvm_inject_emulated_page_fault + nested_ept_invalidate_addr: a fault reflected to
        L1 because EPT12 maps the page without the permission (a present entry; not for a
        not-present or misconfigured one) syncs the EPT02 entries of the faulting address in
        the vCPU's guest-mode roots for that EPTP (__kvm_mmu_invalidate_addr: in an unsync
        page the entry is synced, FNAME(sync_spte)), as the EPT violation invalidates the
        cached mappings of that address (SDM vol. 3C 29.4.3.1): after L1's handler L2 sees
        EPT12 as it is there, not a stale leaf of an unsync table."""
        st = self.vroots.get(vcpu.id)
        roots = [sp for sp in self._nested_roots(st) if sp.key == root_key(eptp)]
        if not roots:
            return
        with self.vm.mmu_lock.write():
            invalid = []
            flush = False
            for root in roots:
                if not root.role.invalid:
                    self.nstats["reflect_synced"] += 1
                    flush |= self._invalidate_addr(vcpu, root, l2gpa, invalid)
            self._flush_or_zap(invalid, flush)

    def _nested_roots(self, st) -> list:
        """The vCPU's guest-mode roots: the current one and the cached previous ones."""
        if st is None:
            return []
        return ([st.nested] if st.nested is not None else []) + st.nested_prev

    def _ept12_changed(self, path) -> bool:
        """FNAME(gpte_changed): an EPT12 entry the walk read holds something else now (L1's
        store landed; its emulation waits for the lock and would miss this fault's leaf, or
        the table was not write-tracked, its EPT02 page reclaimed, and the store did not
        exit at all)."""
        if mutants.on("nested-skip-ept12-recheck"):
            return False
        return any(self.vm.read_guest_u64(0, (gfn << 12) + 8 * i) != entry
                   for gfn, i, entry in path)

    # --- L1's stores to EPT12 -------------------------------------------------------------------
    @hookimpl
    def mmu_nested_ept12_write(self, vcpu, gpa, new):
        """L1 stored `new` at gpa (already in memory). True when the page is write-tracked
        (the store exited to L0 and was emulated): the EPT02 entries built from the written
        entry are zapped (kvm_mmu_track_write, the same path as a shadowed guest table's). A
        last-level EPT12 table is write-protected instead: the first store faults and its
        EPT02 pages go unsync (charged as an exit and an entry), later ones do not exit."""
        vm = self.vm
        gfn = gpa >> 12
        shadows = [sp for sp in self.by_gfn.get((0, gfn), ()) if sp.role.guest_mode]
        if not shadows:
            return False
        if not vm.is_tracked(0, gfn):
            if not all(sp.unsync for sp in shadows):
                with vm.mmu_lock.write():
                    self._try_unsync(0, gfn, True, False)  # mmu_try_to_unsync_pages
                self.nstats["ept12_unsync"] += 1
                cost = vm.engine.cost
                vm.engine.delay(cost.vm_exit + cost.vm_entry, "exit")
            return False
        self.nstats["ept12_writes"] += 1
        if not mutants.on("nested-ept12-write-ignored"):
            idx = (gpa & 0xFFF) >> 3
            self.nstats["ept02_zapped"] += sum(
                S.is_shadow_present_pte(int(self.vm.spte_table(sp.pfn)[idx])) for sp in shadows)
            self.mmu_track_write(vcpu, gpa, 8, new)
        return True

    # --- host events ----------------------------------------------------------------------------
    @hookimpl
    def mmu_nested_zap_gfn_range(self, vm, as_id, start, end):
        """L1 gfns lose their pages or mappings: the EPT02 leaves go through the rmaps. When
        this instance serves L1 too (legacy), L1's own mmu_zap_gfn_range / mmu_zap_all reach
        the EPT02 leaves in the same rmaps and pages; beside the TDP MMU it zaps them here."""
        if self._serves_l1() or not self.rmaps.allocated or mutants.on("nested-zap-skipped"):
            return True  # (no EPT02 root yet: kvm_memslots_have_rmaps, nothing to walk)
        if end is None:
            self.mmu_zap_all(vm)
        elif self.mmu_zap_gfn_range(vm, as_id, start, end):
            vm.flush_remote_tlbs()
        return True

    # --- audit ----------------------------------------------------------------------------------
    @hookimpl
    def mmu_nested_audit(self, vm):
        """The EPT02 roots and pages, and the nested invariants: every EPT02 leaf reachable
        from a root is one EPT12 maps now, no more permissive, at an L1 gfn the leaf's rmap
        entry names. Beside the TDP MMU the whole shadow audit runs here too (rmaps, write
        tracking, the host's frames, roots and page counts); with legacy it runs as L1's."""
        pages = [sp for sp in self.by_pfn.values() if sp.role.guest_mode]
        if not pages:
            return None
        bad: list[tuple[str, str]] = []
        if not self._serves_l1():
            bad.extend(self.mmu_audit(vm).violations)
        lagging = any(vm.track_write_in_flight(0, sp.gfn) for sp in pages if sp.has_gptes)
        roots = [sp for sp in pages if sp.role.level == EPT12_LEVELS and not sp.role.direct
                 and (sp.root_count or not (sp.parent_ptes or sp.role.invalid))]
        if not lagging:
            for sp in roots:
                self._audit_ept02_tree(sp, sp.gfn << 12, sp, 0, bad)
        return BackendAudit(roots=tuple((0, EPT12_LEVELS, sp.pfn) for sp in roots),
                            held_tables=frozenset(sp.pfn for sp in pages),
                            violations=tuple(bad), direct=False,
                            write_protected=self.write_protected_gfns())

    def _audit_ept02_tree(self, root, eptp: int, sp, base: int, bad) -> None:
        row = self.vm.spte_table(sp.pfn)
        level = sp.role.level
        for idx in np.flatnonzero(row).tolist():
            spte = int(row[idx])
            if not S.is_shadow_present_pte(spte):
                continue
            l2gfn = base + (idx << (9 * (level - 1)))
            if not S.is_last_spte(spte, level):
                child = self.by_pfn.get(S.spte_to_pfn(spte))
                if child is not None:
                    self._audit_ept02_tree(root, eptp, child, l2gfn, bad)
                continue
            if sp.unsync:
                continue  # may lag EPT12 until L1 invalidates
            where = f"EPT02 {root.pfn:#x} (EPTP {eptp:#x}): L2 gfn {l2gfn:#x}"
            l1gpa, perm, path = walk_ept12(self.vm, eptp, l2gfn << 12)
            if l1gpa is None:
                bad.append(("nested-ept12-unmapped", f"{where} is mapped, EPT12 does not map it"))
                continue
            if EPT12_LEVELS + 1 - len(path) < level:
                bad.append(("nested-ept12-level", f"{where}: a level-{level} leaf under a "
                            "smaller EPT12 leaf"))
            if spte & E.EPT_WRITE and not perm & E.EPT_WRITE:
                bad.append(("nested-ept12-readonly", f"{where} writable, EPT12 read-only"))
            if spte & E.EPT_EXEC and not perm & E.EPT_EXEC:
                bad.append(("nested-ept12-noexec", f"{where} executable, EPT12 is not"))
            want = (l1gpa >> 12) & ~((1 << (9 * (level - 1))) - 1)
            got = sp.leaf_gfn(idx) & ~((1 << (9 * (level - 1))) - 1)
            if got != want:
                bad.append(("nested-ept12-gfn", f"{where} maps L1 gfn {got:#x}, EPT12 maps it "
                            f"to {want:#x}"))

