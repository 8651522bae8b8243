"""The shadow MMU backend: shadow paging, and KVM's legacy MMU for direct (TDP) roles.

State follows KVM's mmu.c (docs/shadow.md): shadow pages (struct kvm_mmu_page, pages.py) in
a hash keyed by (gfn, role) with parent links, unsync state, root reference counts and a
two-step zap (prepare, then one flush per batch and free); rmaps per memslot and level
(rmap.py); guest page tables above level 1 write-tracked (a guest write exits, the core
emulates it and reports it through mmu_track_write, where the SPTEs that shadowed the entry
are zapped, or the whole page if the writes look like it is no longer a page table), level-1
tables write-protected and unsynced on a guest write (sync.py), synced on INVLPG, CR3 loads
and root loads; a previous-roots cache per vCPU; a page limit (nr_mmu_pages) with reclaim of
the oldest pages. Every fault and every structural change runs under the MMU lock held for
write: the monolithic lock whose contention the seed measured.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from mmu_core import (
    BackendAudit,
    BackendInfo,
    Capabilities,
    InvalidConfig,
    MMUMemory,
    PageFault,
    Ret,
    hookimpl,
    mutants,
)
from mmu_core import Role as MMURole
from mmu_core import nx_recovery as NX
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_core.backend import MMUStats, make_direct_leaf
from mmu_core.hw import walker as W
from mmu_shadow import fastzap, recover
from mmu_shadow import role as R
from mmu_shadow import split as dirty_split
from mmu_shadow.aging import Aging
from mmu_shadow.compiled import LegacyCompiled
from mmu_shadow.direct_prefetch import direct_pte_prefetch
from mmu_shadow.fastpf import FastPageFault, LocklessWalks
from mmu_shadow.nested import NestedMixin
from mmu_shadow.pages import (
    KVM_MIN_ALLOC_MMU_PAGES,
    KVM_MMU_NUM_PREV_ROOTS,
    PagesMixin,
    ShadowPage,
    VcpuRoots,
    sptep,
)
from mmu_shadow.rmap import Rmaps
from mmu_shadow.sync import SyncMixin

VERSION = "0.2.0"
# sizeof(struct kvm_mmu_page) on x86-64 (6.x, pahole: ~184 bytes) and, for indirect pages,
# the shadowed_translation array (512 x u64) KVM allocates beside it.
KVM_MMU_PAGE_BYTES = 184
SHADOWED_TRANSLATION_BYTES = 512 * 8
PTE_PREFETCH_NUM = 8  # mmu.c: entries around a fault prefetched together


def _replacing_needs_flush(old: int, new: int) -> bool:
    """Whether replacing a present shadow leaf `old` by `new` must flush remote TLBs, as
    mmu_set_spte decides: a different frame (drop_spte, then a flush), or a writable leaf made
    read-only (mmu_spte_update). Adding write permission to the same frame needs none: a
    stale read-only TLB entry only makes the write fault again, and that fault drops the
    entry (SDM 4.10.4.1) and finds the leaf already writable, as after dirty logging's
    write-protection."""
    w = S.PT_WRITABLE_MASK
    return bool((old ^ new) & S.SPTE_BASE_ADDR_MASK) or bool(old & w and not new & w)


class ShadowMMU(PagesMixin, SyncMixin, FastPageFault, Aging, NestedMixin):
    def __init__(self, vm) -> None:
        self.vm = vm
        self.pages: dict[R.Key, ShadowPage] = {}  # the hash (KVM: mmu_page_hash), valid pages
        self.by_pfn: dict[int, ShadowPage] = {}  # every page not yet freed
        self.by_gfn: dict[tuple[int, int], set[ShadowPage]] = {}  # pages with gptes, per gfn
        self.active: OrderedDict[int, ShadowPage] = OrderedDict()  # active_mmu_pages, oldest first
        self.vroots: dict[int, VcpuRoots] = {}
        self.rmaps = Rmaps()
        self.lockless = LocklessWalks(vm)  # the legacy MMU's fast page fault (fastpf.py)
        self.direct = False
        self.n_used = 0  # n_used_mmu_pages
        self.mmu_valid_gen = 0  # kvm->arch.mmu_valid_gen (fastzap.py)
        self.n_max = KVM_MIN_ALLOC_MMU_PAGES  # n_max_mmu_pages
        self.n_requested = 0  # n_requested_mmu_pages (KVM_SET_NR_MMU_PAGES)
        self.stats = {"faults": 0, "injected": 0, "emulated": 0, "mmio": 0, "spurious": 0,
                      "retries": 0, "pages_created": 0, "track_writes": 0,
                      "mapped": [0, 0, 0, 0], "shadow_zapped": 0, "zap_batches": 0,
                      "unsync": 0, "sync_pages": 0, "sync_spte": 0, "sync_dropped": 0, "sync_rebuilt": 0,
                      "sync_roots": 0, "invlpg_sync": 0, "recycled": 0, "shrink_zapped": 0,
                      "enospc": 0, "flooded": 0, "misaligned": 0, "prefetched": 0,
                      "prev_root_hits": 0, "root_allocs": 0,
                      "fast_fixed": 0, "fast_spurious": 0, "cmpxchg_lost": 0, "aged": 0,
                      "collapsible_zapped": 0, "direct_prefetched": 0,
                      "fast_zaps": 0, "fast_zap_yields": 0, "nx_split": 0, "nx_recovered": 0}
        # possible_nx_huge_pages: direct pages made for a 4K instruction fetch where the range
        # could be mapped huge, oldest first, for the recovery worker (recover_nx_huge_pages)
        self.nx_pages: OrderedDict[int, ShadowPage] = OrderedDict()
        self.nx_worker: NX.RecoveryWorker | None = None
        self.nstats = self.new_nested_stats()  # EPT02 (nested.py)

    @staticmethod
    @hookimpl
    def mmu_backend_info():
        return BackendInfo(
            name="shadow",
            version=VERSION,
            roles=(MMURole.DIRECT, MMURole.SHADOW, MMURole.NESTED),
            description="KVM's shadow MMU: shadow paging and the legacy MMU (rmap, write lock)",
            capabilities=Capabilities(fault_lock="write", huge_pages=True, mmio_spte=True,
                                      dirty_log="write-protect", audit=True,
                                      fast_page_fault=True, aging=True, max_root_level=5),
        )

    def counters(self) -> dict[str, int]:
        """Everything the backend counted (beyond MMUStats), with the page gauges."""
        out = {k: v for k, v in self.stats.items() if k != "mapped"}
        out.update(n_used_mmu_pages=self.n_used, n_max_mmu_pages=self.n_max,
                   lockless_waits=self.lockless.waits,
                   unsync_pages=sum(1 for sp in self.by_pfn.values() if sp.unsync))
        return out

    # --- lifecycle ------------------------------------------------------------------------
    @hookimpl
    def mmu_init_vm(self, vm):
        """Called only when this backend serves the VM's L1 role: KVM then has rmaps from the
        start (kvm_memslots_have_rmaps: no TDP MMU). An instance that serves only nested
        roles beside the TDP MMU allocates them with its first shadow root."""
        self.vm = vm
        self.direct = vm.role is MMURole.DIRECT
        self.rmaps.allocate_all(vm.memslots)
        self.n_max = self.default_mmu_pages()
        if self.direct:  # the mitigation splits only the legacy MMU's direct pages
            self.nx_worker = NX.RecoveryWorker(vm, self.recover_nx_huge_pages)
            self.nx_worker.start()

    @hookimpl
    def mmu_destroy_vm(self, vm):
        if self.nx_worker is not None:
            self.nx_worker.stop()
        self._free_all()
        vm.rcu.barrier()

    def _free_all(self) -> None:
        vm = self.vm
        for sp in list(self.by_pfn.values()):
            vm.free_pt_page(sp.pfn)
        for st in self.vroots.values():
            for p in (st.pml4_root, st.pae_root):
                if p is not None:
                    vm.free_pt_page(p)
        self.pages.clear()
        self.by_pfn.clear()
        self.by_gfn.clear()
        self.active.clear()
        self.nx_pages.clear()
        self.vroots.clear()
        self.n_used = 0
        for as_id, slots in enumerate(vm.memslots):
            for slot in slots.slots:
                self.rmaps.free_slot(as_id, slot.id)
                self.rmaps.alloc_slot(as_id, slot)

    @hookimpl
    def mmu_memslot_changed(self, vm, as_id, old, new, change):
        """kvm_arch_prepare/commit_memory_region: rmaps follow the slot; creating or deleting
        a slot recomputes the page limit unless userspace set one."""
        if old is not None and change in ("delete", "move"):
            self.rmaps.free_slot(as_id, old.id)
        if new is not None and change in ("create", "move"):
            self.rmaps.alloc_slot(as_id, new)
        # (an instance beside the TDP MMU with no shadow root yet has nothing to limit: its
        # first EPT02 root sets the limit, nested.py)
        if change in ("create", "delete") and not self.n_requested and self.rmaps.allocated:
            self._change_mmu_pages(self.default_mmu_pages())

    def _first_shadow_root(self) -> None:
        """mmu_first_shadow_root_alloc: rmaps for every slot, the first time a shadow root
        appears (only matters for an instance that did not serve L1 from the start)."""
        self.rmaps.allocate_all(self.vm.memslots)

    def _context(self, vcpu) -> R.Context:
        ad_disabled = self.direct and not self.vm.params.ept_ad
        if self.direct:
            return R.Context(P.MODE_NONE, 0, True, True, False, False, vcpu.as_id, ad_disabled)
        return R.Context(
            mode=vcpu.mode, cr3=vcpu.cr3 & ~0xFFF if vcpu.mode != P.MODE_PAE else vcpu.cr3 & ~0x1F,
            cr0_wp=bool(vcpu.cr0 & P.CR0_WP), efer_nx=bool(vcpu.efer & P.EFER_NXE),
            smep=bool(vcpu.cr4 & P.CR4_SMEP), smap=bool(vcpu.cr4 & P.CR4_SMAP), as_id=vcpu.as_id,
        )

    # --- roots ------------------------------------------------------------------------------
    def _vstate(self, vcpu) -> VcpuRoots:
        st = self.vroots.get(vcpu.id)
        if st is None:
            st = self.vroots[vcpu.id] = VcpuRoots()
        return st

    def _pae_mode(self, vcpu) -> bool:
        """A PAE or 32-bit guest: the roots are the vCPU's pml4_root/pae_root structure."""
        return not self.direct and vcpu.mode in (P.MODE_PAE, P.MODE_32)

    def _drop_roots(self, st: VcpuRoots, invalid: list[ShadowPage], prev: bool) -> None:
        """kvm_mmu_free_roots: drop the current root (the four PAE roots, their entries
        cleared), and the previous roots too if `prev`."""
        if st.root is not None:
            self._put_root(st.root, invalid)
            st.root = None
        for i, sp in enumerate(st.pae):
            if sp is not None:
                self._put_root(sp, invalid)
                st.pae[i] = None
                self.vm.spte_write(st.pae_root, i, 0)  # INVALID_PAE_ROOT
        if prev:
            for sp, _pgd in st.prev:
                self._put_root(sp, invalid)
            st.prev = []
            if st.nested is not None:  # kvm_mmu_unload frees guest_mmu's roots too
                self._put_root(st.nested, invalid)
                st.nested = None
            for sp in st.nested_prev:
                self._put_root(sp, invalid)
            st.nested_prev = []

    def _load_pae_roots(self, vcpu, st: VcpuRoots, invalid: list[ShadowPage]) -> bool:
        """mmu_alloc_special_roots + mmu_alloc_shadow_roots for a PAE or 32-bit guest: the
        per-vCPU pml4_root -> pae_root pages (allocated once), and one page-directory root per
        present PDPTE register (PAE) or per quarter of the guest's page directory (32-bit),
        each with its own reference. Returns whether a root page was allocated."""
        vm = self.vm
        if st.pml4_root is None:
            st.pml4_root = vm.alloc_pt_page()
            st.pae_root = vm.alloc_pt_page()
            vm.spte_write(st.pml4_root, 0, S.make_shadow_nonleaf_spte(st.pae_root))
        ctx = self._context(vcpu)
        new = False
        for i in range(4):
            if vcpu.mode == P.MODE_PAE:
                pdpte = int(vcpu.pdptrs[i])
                gfn = (pdpte >> 12) & ((1 << 40) - 1)
                if not pdpte & P.PT_PRESENT or vm.memslots[vcpu.as_id].find(gfn) is None:
                    continue  # kvm_vcpu_is_visible_gfn: an invisible PD is not shadowed
                quadrant = 0
            else:
                gfn, quadrant = ctx.cr3 >> 12, i
            key = R.Key(gfn, R.make_role(ctx, 2, direct=False, quadrant=quadrant,
                                         guest_level=2))
            new |= key not in self.pages
            sp = self._get_sp(vcpu, key, invalid)
            sp.root_count += 1
            st.pae[i] = sp
            vm.spte_write(st.pae_root, i, S.make_shadow_nonleaf_spte(sp.pfn))
        return new

    @hookimpl
    def mmu_load(self, vcpu):
        """kvm_mmu_load: a root from the hash or new, with a reference, then synced
        (kvm_mmu_sync_roots); the core flushes the TLB after it. A root from the
        previous-roots cache is taken at the CR3 load itself (mmu_new_cr3)."""
        vm = self.vm
        new = False
        with vm.mmu_lock.write():
            invalid: list[ShadowPage] = []
            st = self._vstate(vcpu)
            # Roots still held here were dropped by the core without telling (setup code).
            self._drop_roots(st, invalid, prev=False)
            if self._pae_mode(vcpu):
                self._make_pages_available()
                if not self.rmaps.allocated:
                    self._first_shadow_root()
                new = self._load_pae_roots(vcpu, st, invalid)
                self._commit_zap(invalid)
                self._sync_roots(vcpu)
                root_pfn = st.pml4_root
            else:
                key = R.root_key(self._context(vcpu), vm.root_levels(vcpu))
                self._make_pages_available()
                if not self.rmaps.allocated:
                    self._first_shadow_root()
                new = key not in self.pages
                sp = self._get_sp(vcpu, key, invalid)
                sp.root_count += 1
                st.root = sp
                self._commit_zap(invalid)
                self._sync_roots(vcpu)
                root_pfn = st.root.pfn
            st.pgd = vcpu.cr3
            self.stats["root_allocs"] += new
            self._commit_zap(invalid)
        if new:
            vm.observe.mmu_on_root_alloc(vm=vm, as_id=vcpu.as_id, role=vm.role, root=root_pfn)
        vcpu.mmu_root = root_pfn

    @hookimpl
    def mmu_unload(self, vcpu):
        """kvm_mmu_unload: drop the current root and every previous root."""
        vm = self.vm
        st = self.vroots.get(vcpu.id)
        if st is not None and st.held():
            with vm.mmu_lock.write():
                invalid: list[ShadowPage] = []
                self._drop_roots(st, invalid, prev=True)
                self._commit_zap(invalid)
        vcpu.mmu_root = None

    @hookimpl
    def mmu_new_cr3(self, vcpu, cr3):
        """kvm_mmu_new_pgd -> fast_pgd_switch (cached_root_find_and_keep_current): the old
        root goes to the front of prev_roots (three at most, the oldest freed) and a cached
        root loaded for this very CR3, PCID included (is_root_usable: same pgd, same role,
        still valid), becomes the current one and is used at once: KVM only requests
        KVM_REQ_LOAD_MMU_PGD, and whether it is synced and the TLB flushed is the core's
        choice (kvm_set_cr3: not with the no-flush bit). A PAE or 32-bit guest's roots are
        dropped instead (fast_pgd_switch refuses the pae_root): mmu_load builds them from
        the PDPTE registers just loaded."""
        vm = self.vm
        with vm.mmu_lock.write():
            invalid: list[ShadowPage] = []
            st = self._vstate(vcpu)
            old, st.root = st.root, None
            if old is not None:
                if old.role.invalid or old.role.special:
                    self._put_root(old, invalid)
                else:
                    st.prev.insert(0, (old, st.pgd))
            self._drop_roots(st, invalid, prev=False)
            if not self._pae_mode(vcpu):
                key = R.root_key(self._context(vcpu), vm.root_levels(vcpu))
                for i, (sp, pgd) in enumerate(st.prev):
                    if pgd == cr3 and sp.key == key and not sp.role.invalid \
                            and not fastzap.is_obsolete_sp(self, sp):
                        del st.prev[i]
                        st.root, st.pgd = sp, cr3
                        self.stats["prev_root_hits"] += 1
                        break
            while len(st.prev) > KVM_MMU_NUM_PREV_ROOTS:
                self._put_root(st.prev.pop()[0], invalid)
            self._commit_zap(invalid)
        if st.root is not None:
            vcpu.mmu_root = st.root.pfn

    @hookimpl
    def mmu_invalidate_pcid(self, vcpu, pcid):
        """kvm_invalidate_pcid: free the previous roots whose CR3 has `pcid`."""
        st = self.vroots.get(vcpu.id)
        if self.direct or st is None:
            return
        drop = [(sp, pgd) for sp, pgd in st.prev if pgd & P.CR3_PCID_MASK == pcid]
        if drop:
            self._free_prev_roots(st, drop)

    @hookimpl
    def mmu_sync_prev_roots(self, vcpu):
        """kvm_mmu_sync_prev_roots: "sync prev_roots by simply freeing them", those with an
        unsync page below them (is_unsync_root)."""
        st = self.vroots.get(vcpu.id)
        if self.direct or st is None:
            return
        drop = [(sp, pgd) for sp, pgd in st.prev if sp.unsync or sp.unsync_children]
        if drop:
            self._free_prev_roots(st, drop)

    def _free_prev_roots(self, st: VcpuRoots, drop: list[tuple[ShadowPage, int]]) -> None:
        """kvm_mmu_free_roots for some of the previous roots."""
        with self.vm.mmu_lock.write():
            invalid: list[ShadowPage] = []
            for entry in drop:
                st.prev.remove(entry)
                self._put_root(entry[0], invalid)
            self._commit_zap(invalid)

    @hookimpl
    def mmu_invpcid_gva(self, vcpu, gva, pcid):
        """kvm_mmu_invpcid_gva: resync gva in the current root if `pcid` is the current PCID
        and in the previous roots whose CR3 has it."""
        if self.direct:
            return
        st = self.vroots.get(vcpu.id)
        if st is None:
            return
        roots = [sp for sp, pgd in st.prev if pgd & P.CR3_PCID_MASK == pcid]
        if pcid == vcpu.pcid:
            roots = self._roots_for_addr(st, gva) + roots
        self._invalidate_roots_addr(vcpu, roots, gva)

    def _current_roots(self, st: VcpuRoots) -> list[ShadowPage]:
        if st.root is not None:
            return [st.root]
        return [sp for sp in st.pae if sp is not None]

    @hookimpl
    def mmu_sync_roots(self, vcpu):
        """KVM_REQ_MMU_SYNC (kvm_mmu_sync_roots): every unsync page under the current root
        (or the four PAE roots) is brought in sync before the guest runs again."""
        if self.direct or mutants.on("sync-roots-skipped"):
            return
        st = self.vroots.get(vcpu.id)
        if st is None or not any(sp.unsync_children for sp in self._current_roots(st)):
            return  # is_unsync_root, checked without the lock
        with self.vm.mmu_lock.write():
            self._sync_roots(vcpu)

    @hookimpl
    def mmu_invlpg(self, vcpu, gva):
        """kvm_mmu_invlpg: resync the entry for gva in the current and previous roots (of
        the four PAE roots, the one gva lies under)."""
        if self.direct:
            return
        st = self.vroots.get(vcpu.id)
        if st is None:
            return
        self._invalidate_roots_addr(
            vcpu, self._roots_for_addr(st, gva) + [sp for sp, _pgd in st.prev], gva)

    @staticmethod
    def _roots_for_addr(st: VcpuRoots, gva: int) -> list[ShadowPage]:
        """The current root gva lies under: the root, or the one of the four PAE roots."""
        if st.root is None and st.pml4_root is not None and gva < (1 << 32):
            return [st.pae[(gva >> 30) & 3]]
        return [st.root]

    def _invalidate_roots_addr(self, vcpu, roots: list, gva: int) -> None:
        """kvm_mmu_invalidate_addr over `roots` (None entries skipped)."""
        roots = [sp for sp in roots
                 if sp is not None and not sp.role.invalid and (sp.unsync_children or sp.unsync)]
        if not roots:
            return
        with self.vm.mmu_lock.write():
            invalid: list[ShadowPage] = []
            flush = False
            for root in roots:
                if not root.role.invalid:
                    flush |= self._invalidate_addr(vcpu, root, gva, invalid)
            self._flush_or_zap(invalid, flush)

    @hookimpl
    def mmu_reset_context(self, vcpu):
        return None  # roles carry the paging state; the core unloads the root and reloads

    # --- the page limit ---------------------------------------------------------------------
    @hookimpl
    def mmu_set_nr_mmu_pages(self, vm, nr):
        """KVM_SET_NR_MMU_PAGES (kvm_vm_ioctl_set_nr_mmu_pages)."""
        if nr < KVM_MIN_ALLOC_MMU_PAGES:
            raise InvalidConfig("nr_mmu_pages", f"{nr} is below KVM's minimum of "
                                f"{KVM_MIN_ALLOC_MMU_PAGES}")
        self._change_mmu_pages(nr)
        self.n_requested = nr
        return self.n_max

    @hookimpl
    def mmu_shrink_scan(self, vm, nr_to_scan):
        """mmu_shrink_scan (the MMU shrinker, as before KVM 6.x restricted it to caches):
        zap up to nr_to_scan of the oldest pages; returns how many went."""
        with vm.mmu_lock.write():
            n = self._zap_oldest(nr_to_scan)
        self.stats["shrink_zapped"] += n
        return n

    # --- faults ---------------------------------------------------------------------------
    @hookimpl
    def mmu_page_fault(self, vcpu, fault: PageFault):
        self.stats["faults"] += 1
        ret = self._direct_fault(vcpu, fault) if self.direct else self._shadow_fault(vcpu, fault)
        if ret == Ret.RETRY:
            self.stats["retries"] += 1  # counted once here: several paths return RETRY
        return ret

    def _guest_walk(self, vcpu, fault: PageFault, acc: int):
        """FNAME(walk_addr): the guest's tables through memslots, setting A/D on success."""
        vm = self.vm
        out = W.new_out()
        slots = vm.memslots[vcpu.as_id]
        while True:
            W.walk(vm.host.pt, vm.host.pt_slot, vcpu.regs, fault.gva, acc, True, W.XL_SLOTS,
                   0, 0, slots.array, vm.mm.hva_pfn, out)
            if int(out[W.OUT_STATUS]) != W.W_NEED_GFN:
                break
            vm.gfn_to_pfn(vcpu.as_id, int(out[W.OUT_ADDR]) >> 12, False)
        for i in range(int(out[W.OUT_N])):
            if int(out[W.OUT_ADW]) >> i & 1:
                vm.mark_page_dirty(vcpu.as_id, int(out[W.OUT_TGPA + i]) >> 12)
        return out

    def _shadow_fault(self, vcpu, fault: PageFault):
        """FNAME(page_fault)."""
        vm = self.vm
        gen = vm.memslots_generation()  # MMIO SPTEs carry the memslots we resolve against
        acc = EC.ACC_WRITE if fault.write else (EC.ACC_FETCH if fault.fetch else EC.ACC_READ)
        out = self._guest_walk(vcpu, fault, acc)
        st = int(out[W.OUT_STATUS])
        if st == W.W_PF:
            fault.inject_error_code = int(out[W.OUT_CODE])
            self.stats["injected"] += 1
            return Ret.INJECT
        gpa = int(out[W.OUT_ADDR])
        fault.gpa = gpa
        n = int(out[W.OUT_N])
        tables = [int(out[W.OUT_TGPA + i]) for i in range(n)]
        ptes = [int(out[W.OUT_TPTE + i]) for i in range(n)]
        fault.walked_gfns = tuple(t >> 12 for t in tables)
        if st == W.W_NO_SLOT:
            if not int(out[W.OUT_CODE]) & (1 << 8):
                fault.inject_error_code = 0
                return Ret.EMULATE  # a guest table outside memory: let the emulator fail it
            return self._install_mmio(vcpu, fault, gpa, tables, ptes, int(out[W.OUT_LEVEL]), gen)
        attr = int(out[W.OUT_ATTR])
        leaf_pte = ptes[-1] if ptes else 0
        gfn = gpa >> 12
        mmu_seq = vm.mmu_invalidate_seq
        res = vm.gfn_to_pfn(vcpu.as_id, gfn, fault.write)
        if res is None:
            return self._install_mmio(vcpu, fault, gpa, tables, ptes, int(out[W.OUT_LEVEL]), gen)
        pfn, slot = res.pfn, res.slot
        if fault.write and slot.readonly:
            fault.mmio = True
            return Ret.EMULATE
        ctx = self._context(vcpu)
        user = bool(attr & W.A_USER)
        writable = bool(attr & W.A_WRITABLE)
        nx = bool(attr & W.A_NX)
        if fault.write and not writable and not fault.user and not ctx.cr0_wp:
            # CR0.WP=0 lets the supervisor write a read-only page: map it writable but
            # supervisor-only (and not executable under SMEP), as FNAME(page_fault) does.
            if user and ctx.smap:
                # Cannot express SMAP + WP=0 in one SPTE: the core emulates the write, and a
                # level-1 guest table it lands in must not stay in sync without knowing.
                with vm.mmu_lock.write():
                    self._try_unsync(vcpu.as_id, gfn, True, False)
                return self._emulate(fault)
            writable, user = True, False
            if ctx.smep:
                nx = True
        dirty = bool(leaf_pte & P.PT_DIRTY) or fault.write or vcpu.mode == P.MODE_NONE
        with vm.mmu_lock.write():
            if vm.mmu_invalidate_retry_gfn(mmu_seq, vcpu.as_id, gfn) \
                    or self._gptes_changed(vcpu, tables, ptes):
                return Ret.RETRY
            invalid: list[ShadowPage] = []
            self._make_pages_available()
            keys = R.chain_keys(ctx, vm.root_levels(vcpu), fault.gva, tables, ptes,
                                int(out[W.OUT_LEVEL]), gpa)
            table = self._fetch_chain(vcpu, keys, fault.gva, invalid)
            self._commit_zap(invalid)
            # Again after linking: creating a shadow page write-protects its guest table with
            # a flush (a switch point), and a vCPU could write the table until that flush.
            if table is None or self._gptes_changed(vcpu, tables, ptes):
                return Ret.RETRY
            sp = self.by_pfn[table]
            # A read-only slot is never writable, even once the guest's D bit is set (a
            # write to it was emulated as MMIO, and the walk set D on the way).
            want_writable = writable and dirty and res.writable \
                and (not slot.readonly or mutants.on("shadow-readonly-writable"))
            if slot.log_dirty and not fault.write:
                want_writable = False
            # make_spte: a shadowed gfn is writable only once its pages are unsync.
            wrprot = want_writable and not self._try_unsync(vcpu.as_id, gfn, True, False)
            map_writable = want_writable and not wrprot
            idx = (fault.gva >> 12) & 511
            vm.engine.delay(vm.engine.cost.spte_build)
            new = S.make_shadow_leaf_spte(pfn, map_writable, user, nx)
            old = int(vm.spte_table(table)[idx])
            if map_writable and slot.log_dirty and not mutants.on("skip-mark-dirty"):
                vm.mark_page_dirty(vcpu.as_id, gfn)  # before the guest can write (make_spte)
            gpte = self._read_gpte(sp, idx) if sp.gptes is not None else 0
            if old != new or (sp.gptes is not None and int(sp.gptes[idx]) != gpte):
                self._set_leaf(sp, idx, old, new, gfn, gpte, 1)
                self.stats["mapped"][1] += 1
            if sp.gptes is not None:
                self._pte_prefetch(vcpu, sp, idx)
        if fault.write and wrprot:
            return self._emulate(fault)  # RET_PF_WRITE_PROTECTED
        return Ret.FIXED

    def _gptes_changed(self, vcpu, tables: list[int], ptes: list[int]) -> bool:
        """FNAME(gpte_changed), for every level: the guest walk ran without the lock, so a
        vCPU may have rewritten an entry since (its write was emulated and zapped what was
        shadowed then); installing SPTEs from the old entries would resurrect a translation
        the guest already invalidated. A/D bits are ignored: the walk itself set them."""
        if mutants.on("skip-gpte-recheck"):
            return False
        vm = self.vm
        mode = vcpu.mode
        ad = P.PT_ACCESSED | P.PT_DIRTY
        four = int(P.MODE_ENTRY_BYTES[mode]) == 4
        for i, (gpa, pte) in enumerate(zip(tables, ptes, strict=True)):
            if i == 0 and mode == P.MODE_PAE:
                continue  # PDPTEs come from the registers loaded at MOV CR3, not memory
            word = vm.read_guest_u64(vcpu.as_id, gpa & ~7)
            if four:
                word = (word >> (32 * ((gpa >> 2) & 1))) & 0xFFFFFFFF
            if (word ^ pte) & ~ad & 0xFFFF_FFFF_FFFF_FFFF:  # ptes are int64 here
                return True
        return False

    def _pte_prefetch(self, vcpu, sp: ShadowPage, fault_idx: int) -> None:
        """FNAME(pte_prefetch): map the neighbours of a fault (its aligned group of
        PTE_PREFETCH_NUM entries) that the guest already maps, present and accessed, to pages
        the host already has; read-only unless the guest PTE is dirty and the gfn needs no
        protection. Never while an invalidation is in progress (it could map a page the host
        is taking away)."""
        vm = self.vm
        if vm.mmu_invalidate_in_progress:
            return
        row = vm.spte_table(sp.pfn)
        base = fault_idx & ~(PTE_PREFETCH_NUM - 1)
        as_id = sp.role.as_id
        for idx in range(base, base + PTE_PREFETCH_NUM):
            if idx == fault_idx or int(row[idx]):
                continue
            gpte = self._read_gpte(sp, idx)
            if not (gpte & P.PT_PRESENT and gpte & P.PT_ACCESSED) or self._gpte_reserved(sp, gpte):
                break  # FNAME(prefetch_invalid_gpte): stop at the first invalid one
            acc = sp.role.access & R.pte_access(gpte, sp.role.paging_mode, sp.role.efer_nx)
            if not gpte & P.PT_DIRTY:
                acc &= ~R.ACC_WRITE  # FNAME(protect_clean_gpte)
            sp.gptes[idx] = gpte
            gfn = sp.leaf_gfn(idx)
            slot = vm.memslots[as_id].find(gfn)
            if slot is None or (slot.log_dirty and acc & R.ACC_WRITE):
                break  # gfn_to_memslot_dirty_bitmap refuses it
            hva = slot.gfn_to_hva(gfn)
            pfn = vm.mm.lookup(hva)
            if pfn < 0:
                break  # gfn_to_pfn_memslot_atomic: not mapped, and no sleeping here
            writable = bool(acc & R.ACC_WRITE) and vm.host_writable(hva) and not slot.readonly \
                and self._try_unsync(as_id, gfn, True, True)
            vm.engine.delay(vm.engine.cost.spte_build)
            vm.spte_write(sp.pfn, idx, S.make_shadow_leaf_spte(
                pfn, writable, bool(acc & R.ACC_USER), not acc & R.ACC_EXEC))
            self._add_rmap(sp, idx, gfn)
            self.stats["prefetched"] += 1

    def _gpte_reserved(self, sp: ShadowPage, gpte: int) -> bool:
        """Reserved bits of a level-1 guest PTE (is_rsvd_bits_set): address bits above
        MAXPHYADDR, and XD without EFER.NXE."""
        if int(P.MODE_ENTRY_BYTES[sp.role.paging_mode]) == 4:
            return False
        maxphy = self.vm.config.maxphyaddr
        if gpte & ((1 << 52) - 1) >> maxphy << maxphy:
            return True
        return bool(gpte & P.PT_NX) and not sp.role.efer_nx

    def _emulate(self, fault: PageFault) -> Ret:
        self.stats["emulated"] += 1
        return Ret.EMULATE

    def _install_mmio(self, vcpu, fault, gpa, tables, ptes, leaf_level, gen: int) -> Ret:
        vm = self.vm
        fault.mmio = True
        with vm.mmu_lock.write():
            if self._gptes_changed(vcpu, tables, ptes):
                return Ret.RETRY
            invalid: list[ShadowPage] = []
            self._make_pages_available()
            keys = R.chain_keys(self._context(vcpu), vm.root_levels(vcpu), fault.gva, tables,
                                ptes, leaf_level, gpa)
            table = self._fetch_chain(vcpu, keys, fault.gva, invalid)
            self._commit_zap(invalid)
            if table is not None and not self._gptes_changed(vcpu, tables, ptes):
                sp = self.by_pfn[table]
                idx = (fault.gva >> 12) & 511
                old = int(vm.spte_table(table)[idx])
                if old:
                    self._zap_spte(sp, idx)
                vm.spte_write(table, idx, S.make_mmio_spte(gpa >> 12, 0x7, gen, False))
                if sp.gptes is not None:
                    sp.gptes[idx] = self._read_gpte(sp, idx)
                self.stats["mmio"] += 1
                if S.is_shadow_present_pte(old):
                    vm.flush_remote_tlbs()
        return Ret.EMULATE

    def _fetch_chain(self, vcpu, keys: list[R.Key], addr: int, invalid: list[ShadowPage],
                     goal_level: int = 1) -> int | None:
        """FNAME(fetch) / direct_map: link shadow pages from the root down; return the table
        (pfn) at goal_level in which the leaf goes. A page found in the hash with unsync
        children is synced before it is linked: the guest need not flush for an entry it
        made present, so the new path must show the current one (FNAME(fetch))."""
        st = self.vroots.get(vcpu.id)
        if st is None:
            return None
        start = 1
        if st.root is None and st.pml4_root is not None and st.pml4_root == vcpu.mmu_root \
                and len(keys) >= 2 and keys[-2].role.level == 2:
            root = st.pae[(addr >> 30) & 3]  # the walk starts at a PAE root (level 2)
            start = len(keys) - 1
            want = keys[-2]
        else:
            root = st.root
            want = keys[0]
            if root is not None and root.pfn != vcpu.mmu_root:
                root = None
        if root is None or fastzap.is_obsolete_sp(self, root) or root.key != want:
            return None  # the root went away, is obsolete (is_page_fault_stale) or no longer
            # matches: reload and retry
        return self._fetch_from(vcpu, root, keys, start, addr, invalid, goal_level)

    def _fetch_from(self, vcpu, root: ShadowPage, keys: list[R.Key], start: int, addr: int,
                    invalid: list[ShadowPage], goal_level: int) -> int | None:
        """_fetch_chain below the root: keys[start - 1] is root's, the rest are linked."""
        vm = self.vm
        table = root.pfn
        root.write_flooding_count = 0
        for depth in range(start, len(keys)):
            level = keys[depth - 1].role.level
            if level == goal_level:
                break
            idx = (addr >> (12 + 9 * (level - 1))) & 511
            spte = int(vm.spte_table(table)[idx])
            child_key = keys[depth]
            if S.is_shadow_present_pte(spte) and not S.is_last_spte(spte, level):
                child = self.by_pfn.get(S.spte_to_pfn(spte))
                if child is not None and child.key == child_key:
                    child.write_flooding_count = 0  # clear_sp_write_flooding_count
                    table = child.pfn
                    continue
            parent = self.by_pfn[table]
            if S.is_shadow_present_pte(spte):
                # The hardware may hold the old link in its paging-structure caches.
                self._zap_spte(parent, idx)
                vm.flush_remote_tlbs()
            elif spte:
                vm.spte_write(table, idx, 0)  # an old MMIO SPTE
            child = self._get_sp(vcpu, child_key, invalid)
            if parent.role.invalid or child.role.invalid:
                return None  # zapped by what _get_sp did: start again
            if child.unsync_children:
                flush = self._sync_children(vcpu, child, invalid)
                self._flush_or_zap(invalid, flush)
                if parent.role.invalid or child.role.invalid:
                    return None
            self._link(table, idx, child)
            table = child.pfn
        return table

    def _set_leaf(self, sp: ShadowPage, idx: int, old: int, new: int, gfn: int, gpte: int,
                  level: int) -> None:
        """mmu_set_spte for a guest-backed page (shadow paging, EPT02): replace what sp[idx]
        held by the leaf `new` for `gfn`, remember the guest entry it came from, add its
        rmap, and flush when the hardware may still cache the old entry (a table replaced,
        or a frame changed or write permission taken away)."""
        if old:
            self._zap_spte(sp, idx)
        self.vm.spte_write(sp.pfn, idx, new)
        if sp.gptes is not None:
            sp.gptes[idx] = gpte
        self._add_rmap(sp, idx, gfn)
        if S.is_shadow_present_pte(old) and (not S.is_last_spte(old, level)
                                             or _replacing_needs_flush(old, new)):
            self.vm.flush_remote_tlbs()

    # --- the legacy MMU for direct roles ------------------------------------------------------
    def _nx_adjust(self, vcpu, gfn: int, level: int) -> int:
        """disallowed_hugepage_adjust: where a fault could map gfn huge but the entry at that
        level already points at a table made for a 4K instruction fetch (nx_disallowed), map
        below it instead, so that code and data sharing a huge page do not keep replacing
        each other's mappings. Under the MMU lock; no switch point."""
        vm = self.vm
        if level == 1 or not vm.params.nx_huge_pages or vcpu.mmu_root is None:
            return level
        table, lv = vcpu.mmu_root, vm.root_levels(vcpu)
        while lv > 1 and lv >= level:
            spte = int(vm.spte_table(table)[(gfn >> (9 * (lv - 1))) & 511])
            if not S.is_shadow_present_pte(spte) or S.is_last_spte(spte, lv):
                break
            child = self.by_pfn.get(S.spte_to_pfn(spte))
            if lv == level and child is not None and child.nx_disallowed:
                level -= 1
            table, lv = S.spte_to_pfn(spte), lv - 1
        return level

    def recover_nx_huge_pages(self) -> int:
        """kvm_recover_nx_huge_pages, shadow MMU pages: under the write lock, the oldest
        ceil(n / ratio) pages made for a 4K fetch; one in a dirty-logged slot is forgotten
        (unaccount_nx_huge_page), the others are zapped in one batch with one flush, so the
        next access may map the range huge. Returns how many pages were zapped."""
        vm = self.vm
        to_zap = NX.pages_to_zap(len(self.nx_pages), vm.params.nx_huge_pages_recovery_ratio)
        invalid: list[ShadowPage] = []
        zapped = 0
        with vm.mmu_lock.write():
            for sp in list(self.nx_pages.values())[:to_zap]:
                if self.nx_pages.get(sp.pfn) is not sp:
                    continue  # zapped since we looked
                if NX.slot_is_dirty_tracked(vm, sp.role.as_id, sp.gfn):
                    self._unaccount_nx(sp)
                    continue
                zapped += self._prepare_zap(sp, invalid)
            self._commit_zap(invalid)
        self.stats["nx_recovered"] += zapped
        return zapped

    def _direct_fault(self, vcpu, fault: PageFault):
        vm = self.vm
        gfn = fault.gpa >> 12
        mmu_seq = vm.mmu_invalidate_seq
        gen = vm.memslots_generation()  # for an MMIO SPTE: the memslots resolved against
        res = vm.gfn_to_pfn(vcpu.as_id, gfn, fault.write)
        if res is not None and fault.write and res.slot.readonly:
            fault.mmio = True
            return Ret.EMULATE
        level = 1 if res is None else vm.max_mapping_level(res.slot, gfn, res.level)
        # iTLB multihit (kvm.nx_huge_pages): huge leaves are mapped non-executable and an
        # instruction fetch is mapped 4K (disallowed_hugepage_adjust), as in the TDP MMU; the
        # table made for it is remembered for the recovery worker (recover_nx_huge_pages).
        nx_fetch = res is not None and fault.fetch and vm.params.nx_huge_pages and level > 1
        if nx_fetch:
            level = 1
        root_level = vm.root_levels(vcpu)
        ctx = self._context(vcpu)
        keys = [R.Key(gfn & ~((1 << (9 * lv)) - 1), R.make_role(ctx, lv, direct=True))
                for lv in range(root_level, 0, -1)]
        with vm.mmu_lock.write():
            if vm.mmu_invalidate_retry_gfn(mmu_seq, vcpu.as_id, gfn):
                return Ret.RETRY
            invalid: list[ShadowPage] = []
            self._make_pages_available()
            level = self._nx_adjust(vcpu, gfn, level)
            table = self._fetch_chain(vcpu, keys, fault.gpa, invalid, goal_level=level)
            self._commit_zap(invalid)
            if table is None:
                return Ret.RETRY
            sp = self.by_pfn[table]
            if nx_fetch and not sp.nx_disallowed:
                sp.nx_disallowed = True  # account_nx_huge_page
                self.nx_pages[sp.pfn] = sp
                self.stats["nx_split"] += 1
            idx = (gfn >> (9 * (level - 1))) & 511
            old = int(vm.spte_table(table)[idx])
            if res is None:
                new = S.make_mmio_spte(gfn, 0x7, gen, True)
                fault.mmio = True
            else:
                slot = res.slot
                base = res.pfn - (gfn - (gfn & ~((1 << (9 * (level - 1))) - 1)))
                may_write = res.writable and not slot.readonly
                # make_spte: a write-tracked gfn (an EPT12 table L0 shadows for L2) is neither
                # writable nor MMU-writable (the fast page fault must not make it writable),
                # and a write to it is emulated (RET_PF_WRITE_PROTECTED)
                wrprot = may_write and not self._try_unsync(vcpu.as_id, gfn, True, False)
                may_write = may_write and not wrprot
                writable = may_write and (not slot.log_dirty or fault.write)
                vm.engine.delay(vm.engine.cost.spte_build)
                # MMU-writable whenever the slot and host allow writes, so that the first
                # write to a page of a logged slot is a fast page fault, which logs it
                # (fastpf.py); A/D-disabled without EPT A/D, for access tracking (aging.py).
                new = make_direct_leaf(vm, base, level, writable, True, may_write,
                                       not (level > 1 and vm.params.nx_huge_pages))
                if fault.write and wrprot and old == new:
                    return self._emulate(fault)
            if old == new:
                self.stats["spurious"] += 1
                return Ret.EMULATE if res is None else Ret.SPURIOUS
            if old:
                self._zap_spte(sp, idx)
                if S.is_shadow_present_pte(old) and not S.is_last_spte(old, level):
                    vm.flush_remote_tlbs()  # a table becomes a huge leaf: the hardware may
                    # cache the old link (KVM: mmu_set_spte)
            if res is not None and writable and slot.log_dirty \
                    and not mutants.on("skip-mark-dirty"):
                vm.mark_page_dirty(vcpu.as_id, gfn)  # before the guest can write (make_spte)
            vm.spte_write(table, idx, new)
            if res is None:
                self.stats["mmio"] += 1
                return Ret.EMULATE
            base_gfn = gfn & ~((1 << (9 * (level - 1))) - 1)
            self._add_rmap(sp, idx, base_gfn)
            self.stats["mapped"][level] += 1
            fault.level = level
            direct_pte_prefetch(self, sp, idx)  # direct_map: the neighbours (direct_prefetch.py)
        if fault.write and wrprot:
            return self._emulate(fault)
        return Ret.FIXED

    # --- write protection and guest writes ------------------------------------------------------
    @hookimpl
    def mmu_write_protect_gfn(self, vm, as_id, gfn):
        """The rmap part of kvm_mmu_slot_gfn_write_protect (rmap_write_protect with
        pt_protect, every level from 4K): clear W and MMU-writable on every SPTE mapping gfn,
        a huge one covering it included. A read-only but MMU-writable leaf (a logged slot's,
        under the legacy MMU) would otherwise be made writable by the lockless fast page
        fault, past the write tracking. Called through vm.write_protect_gfn, which reaches
        the TDP MMU's SPTEs too. True when a writable leaf lost W (a TLB may hold it)."""
        flush = False
        if not self.rmaps.allocated:
            return flush  # kvm_memslots_have_rmaps
        for level in (1, 2, 3):
            for p in self.rmaps.get(as_id, gfn, level):
                spte = int(vm.spte_table(p >> 9)[p & 511])
                protected = int(S.clear_writable(spte))
                if protected != spte:
                    vm.spte_write(p >> 9, p & 511, protected)
                    flush |= S.is_writable_pte(spte)
        return flush

    @hookimpl
    def mmu_try_to_unsync_pages(self, vm, as_id, gfn, can_unsync, prefetch):
        """mmu_try_to_unsync_pages for another backend's make_spte (the TDP MMU's, beside
        this instance serving nested roles): no switch point, so the unsync is atomic under
        the caller's read lock as KVM's is under mmu_unsync_pages_lock (sync.py)."""
        return self._try_unsync(as_id, gfn, can_unsync, prefetch)

    @staticmethod
    def _write_misaligned(sp: ShadowPage, gpa: int, nbytes: int) -> bool:
        """detect_write_misaligned: a write that is not one whole guest entry (a single byte
        at an entry's start is let through: clear_bit-style status updates)."""
        offset = gpa & 0xFFF
        size = int(P.MODE_ENTRY_BYTES[sp.role.paging_mode])
        if not offset & (size - 1) and nbytes == 1:
            return False
        return bool((offset ^ (offset + nbytes - 1)) & ~(size - 1)) or nbytes < 4

    @staticmethod
    def _write_flooding(sp: ShadowPage) -> bool:
        """detect_write_flooding: the third emulated write to a table above level 1 with no
        fault through it in between says it is no longer a page table."""
        if sp.role.level == 1:
            return False
        sp.write_flooding_count += 1
        return sp.write_flooding_count >= 3

    @hookimpl
    def mmu_track_write(self, vcpu, gpa, nbytes, new):
        """kvm_mmu_track_write: zap the SPTEs that shadowed the overwritten guest entry, or
        the whole shadow page if the write is misaligned or flooding; one flush for all."""
        vm = self.vm
        self.stats["track_writes"] += 1
        flush = False
        with vm.mmu_lock.write():
            invalid: list[ShadowPage] = []
            for sp in list(self.by_gfn.get((vcpu.as_id, gpa >> 12), ())):
                if sp.role.invalid:
                    continue
                misaligned = self._write_misaligned(sp, gpa, nbytes)
                if misaligned or self._write_flooding(sp):
                    self.stats["misaligned" if misaligned else "flooded"] += 1
                    self._prepare_zap(sp, invalid)
                    continue
                for idx in R.affected_indices(sp.role, gpa & 0xFFF, nbytes):
                    flush |= self._zap_spte(sp, idx)
            self._flush_or_zap(invalid, flush)

    # --- dirty logging (split.py: eager page splitting, then D bits or write-protection) ------
    @hookimpl
    def mmu_enable_dirty_log(self, vm, slot, protect):
        # Without rmaps (a nested instance beside the TDP MMU before its first shadow root)
        # there is nothing to protect, and KVM takes no lock for it (kvm_memslots_have_rmaps
        # gates every rmap walk): the write lock would serialize this with L1's faults.
        if not self.rmaps.allocated:
            return False
        return dirty_split.enable_dirty_log(self, slot, protect)

    @hookimpl
    def mmu_clear_dirty_log(self, vm, slot, gfns):
        if not self.rmaps.allocated:
            return False
        return dirty_split.clear_dirty_log(self, slot, gfns)

    @hookimpl
    def mmu_disable_dirty_log(self, vm, slot):
        if not self.rmaps.allocated:
            return False
        return recover.recover_huge_pages(self, slot)  # recover.py

    # --- zap, notifiers, memslots ---------------------------------------------------------------
    @hookimpl
    def mmu_zap_gfn_range(self, vm, as_id, start, end):
        """kvm_zap_gfn_range's rmap part: every leaf mapping a gfn of the range, per level
        (none, and no lock, before rmaps exist: kvm_memslots_have_rmaps)."""
        flush = False
        if not self.rmaps.allocated:
            return flush
        with vm.mmu_lock.write():
            for level in (1, 2, 3):
                for p in self.rmaps.in_range(as_id, start, end, level):
                    sp = self.by_pfn.get(p >> 9)
                    if sp is not None:
                        flush |= self._zap_spte(sp, p & 511)
        return flush

    @hookimpl
    def mmu_zap_all(self, vm):
        """kvm_mmu_zap_all_fast (fastzap.py): every page obsolete at once, every vCPU told to
        reload, the obsolete pages zapped in batches with the lock yielded, one commit."""
        fastzap.zap_all_fast(self)
        return False

    # --- audit ----------------------------------------------------------------------------------
    @hookimpl
    def mmu_audit(self, vm):
        """mmu_audit.c's checks and the unsync invariants: every leaf has its rmap entry and
        every rmap entry a leaf; a leaf maps the host's pfn for its gfn; write-tracked,
        READONLY and host-read-only gfns are never writable, nor a gfn one of whose shadow
        pages is in sync; writable leaves in logged slots are dirty; a leaf of an in-sync
        page agrees with the guest entry it shadows; every unsync page is a level-1 page
        marked on every path up to its roots (so a sync from any root reaches it); root
        reference counts match the vCPUs' roots; the page count matches."""
        bad: list[tuple[str, str]] = []
        seen: set[int] = set()
        rmapped = {p: (as_id, gfn, level) for as_id, gfn, level, p in self.rmaps.all_entries()}
        for sp in self.by_pfn.values():
            row = vm.spte_table(sp.pfn)
            level = sp.role.level
            for idx in np.flatnonzero(row).tolist():
                spte = int(row[idx])
                if not S.is_shadow_present_pte(spte) or not S.is_last_spte(spte, level):
                    continue
                p = sptep(sp.pfn, idx)
                if p not in rmapped:
                    bad.append(("rmap-missing", f"leaf {sp.pfn:#x}[{idx}] has no rmap entry"))
                    continue
                seen.add(p)
                if not self.direct or sp.role.guest_mode:  # the core checks gfn-indexed
                    self._audit_leaf(sp, idx, spte, rmapped[p][:2], bad)  # (direct) roots
        for p, (_as_id, gfn, _level) in rmapped.items():
            if p not in seen:
                where = "freed page" if (p >> 9) not in self.by_pfn else "not a present leaf"
                bad.append(("rmap-stale", f"rmap of gfn {gfn:#x} names {p >> 9:#x}[{p & 511}], "
                            f"{where}"))
        for (as_id, gfn), sps in self.by_gfn.items():
            if any(sp.role.level > 1 for sp in sps) and not vm.is_tracked(as_id, gfn):
                bad.append(("untracked", f"gfn {gfn:#x} is shadowed above level 1 but not "
                            "write-tracked"))
        for sp in self.pages.values():
            if fastzap.is_obsolete_sp(self, sp):  # lookups must not find it (for_each_valid_sp)
                bad.append(("obsolete-in-hash", f"page {sp.pfn:#x} of generation "
                            f"{sp.mmu_valid_gen} (now {self.mmu_valid_gen}) is in the hash"))
        self._audit_unsync(bad)
        self._audit_roots(bad)
        self._audit_nx(bad)
        # Roots are top-level pages (4- or 5-level tables). A lower page without parents was
        # unlinked (e.g. a huge leaf replaced it) and stays cached with its rmap'd leaves
        # until it is reused or zapped, as in KVM; it is held, not a root.
        # EPT02 roots are L2's (mmu_nested_audit reports them).
        roots = tuple((sp.role.as_id, sp.role.level, sp.pfn) for sp in self.by_pfn.values()
                      if sp.role.level >= 4 and (sp.root_count or not sp.parent_ptes)
                      and not sp.role.guest_mode)
        special = [p for st in self.vroots.values() for p in (st.pml4_root, st.pae_root)
                   if p is not None]
        roots += tuple((vcpu.as_id, 4, self.vroots[vcpu.id].pml4_root) for vcpu in vm.vcpus
                       if vcpu.id in self.vroots and self.vroots[vcpu.id].pml4_root is not None)
        return BackendAudit(roots=roots, held_tables=frozenset(self.by_pfn) | frozenset(special),
                            violations=tuple(bad), direct=self.direct,
                            write_protected=self.write_protected_gfns())

    def write_protected_gfns(self) -> frozenset[tuple[int, int]]:
        """The gfns a shadow page in sync shadows: no SPTE of any backend may map them
        writable (the audit checks the direct roots, the TDP MMU's with tdp)."""
        return frozenset(key for key, sps in self.by_gfn.items()
                         if any(not sp.unsync for sp in sps))

    def _audit_unsync(self, bad) -> None:
        for sp in self.by_pfn.values():
            if sp.unsync and (sp.role.level != 1 or not sp.has_gptes):
                bad.append(("unsync-level", f"unsync page {sp.pfn:#x} is not a level-1 guest "
                            "table"))
            if sp.unsync and self.vm.is_tracked(sp.role.as_id, sp.gfn):
                bad.append(("unsync-tracked", f"unsync page {sp.pfn:#x} shadows write-tracked "
                            f"gfn {sp.gfn:#x}"))
            if (sp.unsync or sp.unsync_children) and not sp.role.invalid:
                for p in sp.parent_ptes:
                    parent = self.by_pfn.get(p >> 9)
                    if parent is None or not parent.unsync_child_bitmap >> (p & 511) & 1:
                        bad.append(("unsync-unmarked", f"{'unsync page' if sp.unsync else 'page'}"
                                    f" {sp.pfn:#x} is not marked in its parent entry "
                                    f"{p >> 9:#x}[{p & 511}]: a sync from above misses it"))
            if sp.unsync_children != bin(sp.unsync_child_bitmap).count("1"):
                bad.append(("unsync-count", f"page {sp.pfn:#x} counts {sp.unsync_children} "
                            "unsync children, its bitmap says otherwise"))

    def _audit_nx(self, bad) -> None:
        """The recovery list holds exactly the live pages marked nx_disallowed (a zapped page
        is unaccounted: the worker must never zap a freed or reused page)."""
        marked = {sp.pfn for sp in self.by_pfn.values()
                  if sp.nx_disallowed and not sp.role.invalid}
        for pfn, sp in self.nx_pages.items():
            if self.by_pfn.get(pfn) is not sp or not sp.nx_disallowed or sp.role.invalid:
                bad.append(("nx-tracking", f"page {pfn:#x} waits for NX recovery but is "
                            "zapped or no longer marked"))
        for pfn in marked - set(self.nx_pages):
            bad.append(("nx-tracking", f"NX-split page {pfn:#x} is not tracked for recovery"))

    def _audit_roots(self, bad) -> None:
        held: dict[int, int] = {}
        for st in self.vroots.values():
            for sp in st.held():
                held[sp.pfn] = held.get(sp.pfn, 0) + 1
                if sp.pfn not in self.by_pfn:
                    bad.append(("root-freed", f"a vCPU holds freed root {sp.pfn:#x}"))
        for sp in self.by_pfn.values():
            if sp.root_count != held.get(sp.pfn, 0):
                bad.append(("root-refcount", f"page {sp.pfn:#x} has root_count "
                            f"{sp.root_count}, {held.get(sp.pfn, 0)} references are held"))
            if sp.role.invalid and not sp.root_count:
                bad.append(("invalid-kept", f"invalid page {sp.pfn:#x} is held by no vCPU "
                            "but not freed"))
        if self.n_used != len(self.by_pfn):
            bad.append(("mmu-pages", f"n_used_mmu_pages is {self.n_used}, {len(self.by_pfn)} "
                        "pages exist"))

    def _audit_leaf(self, sp: ShadowPage, idx: int, spte: int, key, bad) -> None:
        vm = self.vm
        as_id, gfn = key
        slot = vm.memslots[as_id].find(gfn)
        invalidating = vm.invalidating_gfn(as_id, gfn)
        if slot is None:
            if not invalidating:
                bad.append(("spte-no-slot", f"leaf {sp.pfn:#x}[{idx}] maps gfn {gfn:#x} outside "
                            "every slot"))
            return
        hva = slot.gfn_to_hva(gfn)
        if vm.mm.lookup(hva) != S.spte_to_pfn(spte) and not invalidating:
            bad.append(("spte-pfn", f"leaf {sp.pfn:#x}[{idx}] maps gfn {gfn:#x} to frame "
                        f"{S.spte_to_pfn(spte):#x}, the host has {vm.mm.lookup(hva):#x}"))
        if S.is_writable_pte(spte):
            if slot.readonly:
                bad.append(("readonly-writable", f"gfn {gfn:#x} of READONLY slot {slot.id} is "
                            f"writable through {sp.pfn:#x}[{idx}]"))
            if vm.is_tracked(as_id, gfn):
                bad.append(("tracked-writable", f"write-tracked gfn {gfn:#x} is writable "
                            f"through {sp.pfn:#x}[{idx}]"))
            synced = [s for s in self.by_gfn.get((as_id, gfn), ()) if not s.unsync]
            if synced:
                bad.append(("shadowed-writable", f"gfn {gfn:#x}, a guest table shadowed in sync "
                            f"by {synced[0].pfn:#x}, is writable through {sp.pfn:#x}[{idx}]"))
            if not vm.host_writable(hva) and not invalidating:
                bad.append(("cow-writable", f"gfn {gfn:#x} is read-only in the host but "
                            f"writable through {sp.pfn:#x}[{idx}]"))
            if slot.log_dirty and not slot.dirty_bitmap[gfn - slot.base_gfn] \
                    and not vm.collecting_dirty(as_id, gfn) \
                    and not dirty_split.pml_may_log(self, sp, spte, as_id, gfn):
                bad.append(("dirty-log", f"gfn {gfn:#x} is writable in logged slot {slot.id} "
                            "but not dirty"))
        role = sp.role
        if role.direct or role.special or role.guest_level != 1 or sp.unsync or role.guest_mode:
            return  # an unsync page may lag the guest until it invalidates; EPT02: nested.py
        if vm.track_write_in_flight(as_id, sp.gfn):
            return  # the guest entry was just written; mmu_track_write is on its way
        egpa = sp.gpte_gpa(idx)
        word = self._read_gpte(sp, idx)
        target = word >> 12 if int(P.MODE_ENTRY_BYTES[role.paging_mode]) == 4 \
            else (word >> 12) & ((1 << 40) - 1)
        if not word & P.PT_PRESENT or target != gfn:
            bad.append(("guest-disagrees", f"leaf {sp.pfn:#x}[{idx}] maps gfn {gfn:#x}, the "
                        f"guest entry at {egpa:#x} is {word:#x}"))
        elif S.is_writable_pte(spte) and not (word & P.PT_DIRTY and (
                word & P.PT_WRITABLE or not role.cr0_wp)):  # CR0.WP=0: supervisor writes
            bad.append(("guest-disagrees", f"leaf {sp.pfn:#x}[{idx}] is writable, the guest "
                        f"entry at {egpa:#x} ({word:#x}) is not writable and dirty"))

    # --- the compiled demand-paging loop (docs/fastloop.md) ---------------------------------
    @hookimpl
    def mmu_compiled_kernels(self, vm):
        """The legacy MMU's kernel (compiled.py); shadow paging has none."""
        return LegacyCompiled(self) if self.direct else None

    # --- statistics and memory -------------------------------------------------------------------
    @hookimpl
    def mmu_stats(self, vm):
        st = self.stats
        return MMUStats(faults=st["faults"], retries=st["retries"], mapped_4k=st["mapped"][1],
                        mapped_2m=st["mapped"][2], mapped_1g=st["mapped"][3],
                        mmio_sptes=st["mmio"], reclaimed_pages=st["recycled"],
                        unsync_pages=st["unsync"], syncs=st["sync_pages"],
                        emulated_pte_writes=st["track_writes"])

    @hookimpl
    def mmu_memory(self, vm):
        pages = len(self.by_pfn)
        indirect = sum(1 for sp in self.by_pfn.values() if not sp.role.direct)
        return MMUMemory(
            page_table_pages=vm.pt_pages_in_use(),
            page_table_bytes=vm.pt_pages_in_use() * 4096,
            mmu_page_structs=pages,
            mmu_page_struct_bytes=pages * KVM_MMU_PAGE_BYTES + indirect * SHADOWED_TRANSLATION_BYTES,
            rmap_bytes=self.rmaps.nbytes(),
            peak_page_table_pages=int(vm.host.frames_peak[1]),
        )
