"""The shadow MMU backend: shadow paging, and KVM's legacy MMU for direct (TDP) roles.

State follows KVM's mmu.c: shadow pages (struct kvm_mmu_page) in a hash keyed by (gfn,
role); an rmap from gfn to the leaf SPTEs that map it; guest page-table pages write-tracked
so that a guest write to one exits, is emulated by the core and reported here
(mmu_track_write), where the SPTEs that shadowed the overwritten entry are zapped. Every
fault and every structural change runs under the MMU lock held for write: the monolithic
lock whose contention the seed measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmu_core import (
    REQ_MMU_RELOAD,
    BackendAudit,
    BackendInfo,
    Capabilities,
    MMUMemory,
    PageFault,
    Ret,
    hookimpl,
    mutants,
)
from mmu_core import Role as MMURole
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_core.backend import MMUStats
from mmu_core.hw import walker as W
from mmu_shadow import role as R

VERSION = "0.1.0"
# sizeof(struct kvm_mmu_page) on x86-64 (6.x, pahole: ~184 bytes) and, for indirect pages,
# the shadowed_translation array (512 x u64) KVM allocates beside it.
KVM_MMU_PAGE_BYTES = 184
SHADOWED_TRANSLATION_BYTES = 512 * 8


@dataclass(eq=False)
class ShadowPage:
    key: R.Key
    pfn: int
    parent_ptes: set[tuple[int, int]] = field(default_factory=set)

    @property
    def role(self) -> R.Role:
        return self.key.role


class ShadowMMU:
    def __init__(self, vm) -> None:
        self.vm = vm
        self.pages: dict[R.Key, ShadowPage] = {}  # the hash (KVM: mmu_page_hash)
        self.by_pfn: dict[int, ShadowPage] = {}
        self.by_gfn: dict[tuple[int, int], set[ShadowPage]] = {}  # indirect pages per gfn
        self.rmap: dict[tuple[int, int], set[tuple[int, int]]] = {}  # (as_id, gfn) -> sptes
        self.leaf_key: dict[tuple[int, int], tuple[int, int]] = {}  # spte -> its rmap key
        self.direct = False
        self.stats = {"faults": 0, "injected": 0, "emulated": 0, "mmio": 0, "spurious": 0,
                      "retries": 0, "pages_created": 0, "track_writes": 0,
                      "mapped": [0, 0, 0, 0]}

    @staticmethod
    @hookimpl
    def mmu_backend_info():
        return BackendInfo(
            name="shadow",
            version=VERSION,
            roles=(MMURole.DIRECT, MMURole.SHADOW, MMURole.NESTED),
            description="KVM's shadow MMU: shadow paging and the legacy MMU (rmap, write lock)",
            capabilities=Capabilities(fault_lock="write", huge_pages=True, mmio_spte=True,
                                      dirty_log="zap", audit=True, max_root_level=5),
        )

    # --- lifecycle ------------------------------------------------------------------------
    @hookimpl
    def mmu_init_vm(self, vm):
        self.vm = vm
        self.direct = vm.role is MMURole.DIRECT

    @hookimpl
    def mmu_destroy_vm(self, vm):
        self._free_all()
        vm.rcu.barrier()

    def _free_all(self) -> None:
        for sp in list(self.pages.values()):
            self._free_sp(sp)
        self.rmap.clear()
        self.leaf_key.clear()

    def _free_sp(self, sp: ShadowPage) -> None:
        vm = self.vm
        self.pages.pop(sp.key, None)
        self.by_pfn.pop(sp.pfn, None)
        if not sp.role.direct and not sp.role.special:
            group = self.by_gfn.get((sp.role.as_id, sp.key.gfn))
            if group is not None:
                group.discard(sp)
                if not group:
                    del self.by_gfn[(sp.role.as_id, sp.key.gfn)]
            vm.untrack_gfn(sp.role.as_id, sp.key.gfn)
        vm.free_pt_page(sp.pfn)

    def _context(self, vcpu) -> R.Context:
        if self.direct:
            return R.Context(P.MODE_NONE, 0, True, True, False, False, vcpu.as_id)
        return R.Context(
            mode=vcpu.mode, cr3=vcpu.cr3 & ~0xFFF if vcpu.mode != P.MODE_PAE else vcpu.cr3 & ~0x1F,
            cr0_wp=bool(vcpu.cr0 & P.CR0_WP), efer_nx=bool(vcpu.efer & P.EFER_NXE),
            smep=bool(vcpu.cr4 & P.CR4_SMEP), smap=bool(vcpu.cr4 & P.CR4_SMAP), as_id=vcpu.as_id,
        )

    def _get_sp(self, key: R.Key) -> ShadowPage:
        """kvm_mmu_get_shadow_page: find in the hash or create (and write-protect the gfn)."""
        self.vm.engine.delay(self.vm.engine.cost.sp_hash_lookup)
        sp = self.pages.get(key)
        if sp is not None:
            return sp
        vm = self.vm
        sp = ShadowPage(key, vm.alloc_pt_page())
        self.pages[key] = sp
        self.by_pfn[sp.pfn] = sp
        self.stats["pages_created"] += 1
        role = key.role
        if not role.direct and not role.special:
            as_id = role.as_id
            self.by_gfn.setdefault((as_id, key.gfn), set()).add(sp)
            first = not vm.is_tracked(as_id, key.gfn)
            vm.track_gfn(as_id, key.gfn)
            if first and not mutants.on("no-write-protect-shadowed") \
                    and self._write_protect_gfn(as_id, key.gfn):
                vm.flush_remote_tlbs()
        return sp

    @hookimpl
    def mmu_load(self, vcpu):
        vm = self.vm
        with vm.mmu_lock.write():
            key = R.root_key(self._context(vcpu), vm.root_levels(vcpu))
            new = key not in self.pages
            sp = self._get_sp(key)
        if new:
            vm.observe.mmu_on_root_alloc(vm=vm, as_id=vcpu.as_id, role=vm.role, root=sp.pfn)
        vcpu.mmu_root = sp.pfn

    @hookimpl
    def mmu_unload(self, vcpu):
        vcpu.mmu_root = None

    @hookimpl
    def mmu_new_cr3(self, vcpu, cr3):
        if vcpu.mode == P.MODE_PAE:
            # The PDPTE registers were reloaded: the special root's links may be stale.
            vm = self.vm
            with vm.mmu_lock.write():
                key = R.root_key(self._context(vcpu), vm.root_levels(vcpu))
                sp = self.pages.get(key)
                if sp is not None and self._zap_children(sp):
                    vm.flush_remote_tlbs()

    @hookimpl
    def mmu_reset_context(self, vcpu):
        return None  # roles carry the paging state; the core reloads the root

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
                return self._emulate(fault)  # cannot express SMAP + WP=0 in one SPTE
            writable, user = True, False
            if ctx.smep:
                nx = True
        dirty = bool(leaf_pte & P.PT_DIRTY) or fault.write or vcpu.mode == P.MODE_NONE
        with vm.mmu_lock.write():
            if vm.mmu_invalidate_retry_gfn(mmu_seq, vcpu.as_id, gfn) \
                    or self._gptes_changed(vcpu, tables, ptes):
                return Ret.RETRY
            keys = R.chain_keys(ctx, vm.root_levels(vcpu), fault.gva, tables, ptes,
                                int(out[W.OUT_LEVEL]), gpa)
            table = self._fetch_chain(vcpu, keys, fault.gva)
            # Again after linking: creating a shadow page write-protects its guest table with
            # a flush (a switch point), and a vCPU could write the table until that flush.
            if table is None or self._gptes_changed(vcpu, tables, ptes):
                return Ret.RETRY
            tracked = vm.is_tracked(vcpu.as_id, gfn)
            # A read-only slot is never writable, even once the guest's D bit is set (a
            # write to it was emulated as MMIO, and the walk set D on the way).
            map_writable = writable and dirty and not tracked and res.writable \
                and (not slot.readonly or mutants.on("shadow-readonly-writable"))
            if slot.log_dirty and not fault.write:
                map_writable = False
            idx = (fault.gva >> 12) & 511
            vm.engine.delay(vm.engine.cost.spte_build)
            new = S.make_shadow_leaf_spte(pfn, map_writable, user, nx)
            old = int(vm.spte_table(table)[idx])
            if map_writable and slot.log_dirty and not mutants.on("skip-mark-dirty"):
                vm.mark_page_dirty(vcpu.as_id, gfn)  # before the guest can write (make_spte)
            if old != new:
                self._drop_leaf(table, idx, old)
                vm.spte_write(table, idx, new)
                self._add_rmap((vcpu.as_id, gfn), table, idx)
                if S.is_shadow_present_pte(old):
                    vm.flush_remote_tlbs()
                self.stats["mapped"][1] += 1
        if fault.write and tracked:
            return self._emulate(fault)
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

    def _emulate(self, fault: PageFault) -> Ret:
        self.stats["emulated"] += 1
        return Ret.EMULATE

    def _install_mmio(self, vcpu, fault, gpa, tables, ptes, leaf_level, gen: int) -> Ret:
        vm = self.vm
        fault.mmio = True
        with vm.mmu_lock.write():
            if self._gptes_changed(vcpu, tables, ptes):
                return Ret.RETRY
            keys = R.chain_keys(self._context(vcpu), vm.root_levels(vcpu), fault.gva, tables,
                                ptes, leaf_level, gpa)
            table = self._fetch_chain(vcpu, keys, fault.gva)
            if table is not None:
                idx = (fault.gva >> 12) & 511
                old = int(vm.spte_table(table)[idx])
                self._drop_leaf(table, idx, old)
                vm.spte_write(table, idx, S.make_mmio_spte(gpa >> 12, 0x7,
                                                           gen, False))
                self.stats["mmio"] += 1
                if S.is_shadow_present_pte(old):
                    vm.flush_remote_tlbs()
        return Ret.EMULATE

    def _fetch_chain(self, vcpu, keys: list[R.Key], addr: int, goal_level: int = 1) -> int | None:
        """FNAME(fetch) / direct_map: link shadow pages from the root down; return the table
        (pfn) at goal_level in which the leaf goes."""
        vm = self.vm
        root = self.by_pfn.get(vcpu.mmu_root)
        if root is None or root.key != keys[0]:
            return None  # the root went away or no longer matches: reload and retry
        table = root.pfn
        for depth in range(1, len(keys)):
            level = keys[depth - 1].role.level
            if level == goal_level:
                break
            idx = (addr >> (12 + 9 * (level - 1))) & 511
            spte = int(vm.spte_table(table)[idx])
            child_key = keys[depth]
            if S.is_shadow_present_pte(spte) and not S.is_last_spte(spte, level):
                child = self.by_pfn.get(S.spte_to_pfn(spte))
                if child is not None and child.key == child_key:
                    table = child.pfn
                    continue
            if S.is_shadow_present_pte(spte):
                # The hardware may hold the old link in its paging-structure caches.
                self._zap_spte(table, idx, level)
                vm.flush_remote_tlbs()
            elif spte:
                vm.spte_write(table, idx, 0)  # an old MMIO SPTE
            child = self._get_sp(child_key)
            vm.spte_write(table, idx, S.make_nonleaf_spte(child.pfn) if self.direct
                          else S.make_shadow_nonleaf_spte(child.pfn))
            child.parent_ptes.add((table, idx))
            table = child.pfn
        return table

    # --- the legacy MMU for direct roles ------------------------------------------------------
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
        root_level = vm.root_levels(vcpu)
        ctx = self._context(vcpu)
        keys = [R.Key(gfn & ~((1 << (9 * lv)) - 1), R.make_role(ctx, lv, direct=True))
                for lv in range(root_level, 0, -1)]
        with vm.mmu_lock.write():
            if vm.mmu_invalidate_retry_gfn(mmu_seq, vcpu.as_id, gfn):
                return Ret.RETRY
            table = self._fetch_chain(vcpu, keys, fault.gpa, goal_level=level)
            if table is None:
                return Ret.RETRY
            idx = (gfn >> (9 * (level - 1))) & 511
            old = int(vm.spte_table(table)[idx])
            if res is None:
                new = S.make_mmio_spte(gfn, 0x7, gen, True)
                fault.mmio = True
            else:
                slot = res.slot
                base = res.pfn - (gfn - (gfn & ~((1 << (9 * (level - 1))) - 1)))
                writable = res.writable and not slot.readonly and (not slot.log_dirty or fault.write)
                vm.engine.delay(vm.engine.cost.spte_build)
                new = S.make_leaf_spte(base, level, writable, True)
            if old == new:
                self.stats["spurious"] += 1
                return Ret.EMULATE if res is None else Ret.SPURIOUS
            if S.is_shadow_present_pte(old):
                self._zap_spte(table, idx, level)
                if not S.is_last_spte(old, level):  # a table becomes a huge leaf: the hardware
                    vm.flush_remote_tlbs()  # may cache the old link (KVM: mmu_set_spte)
            if res is not None and writable and slot.log_dirty \
                    and not mutants.on("skip-mark-dirty"):
                vm.mark_page_dirty(vcpu.as_id, gfn)  # before the guest can write (make_spte)
            vm.spte_write(table, idx, new)
            if res is None:
                self.stats["mmio"] += 1
                return Ret.EMULATE
            base_gfn = gfn & ~((1 << (9 * (level - 1))) - 1)
            self._add_rmap((vcpu.as_id, base_gfn), table, idx)
            self.stats["mapped"][level] += 1
            fault.level = level
        return Ret.FIXED

    # --- SPTE removal ---------------------------------------------------------------------------
    def _drop_leaf(self, table: int, idx: int, old: int) -> None:
        """Forget the rmap entry of a leaf SPTE that is about to be overwritten."""
        if mutants.on("forget-rmap-removal"):
            return
        key = self.leaf_key.pop((table, idx), None)
        if key is None:
            return
        sptes = self.rmap[key]
        sptes.discard((table, idx))
        if not sptes:
            del self.rmap[key]

    def _add_rmap(self, key: tuple[int, int], table: int, idx: int) -> None:
        self.vm.engine.delay(self.vm.engine.cost.rmap_add)
        self.rmap.setdefault(key, set()).add((table, idx))
        self.leaf_key[(table, idx)] = key

    def _zap_spte(self, table: int, idx: int, level: int) -> None:
        """mmu_page_zap_pte: clear one SPTE; unlink a child page, drop a leaf's rmap."""
        vm = self.vm
        old = int(vm.spte_table(table)[idx])
        if S.is_shadow_present_pte(old) and not S.is_last_spte(old, level):
            child = self.by_pfn.get(S.spte_to_pfn(old))
            if child is not None:
                child.parent_ptes.discard((table, idx))
        else:
            self._drop_leaf(table, idx, old)
        vm.spte_write(table, idx, 0)

    def _zap_children(self, sp: ShadowPage) -> bool:
        row = self.vm.spte_table(sp.pfn)
        flush = False
        for idx in np.flatnonzero(row).tolist():
            flush |= S.is_shadow_present_pte(int(row[idx]))
            self._zap_spte(sp.pfn, idx, sp.role.level)
        return flush

    def _write_protect_gfn(self, as_id: int, gfn: int) -> bool:
        """Clear W on every SPTE mapping gfn (KVM: kvm_mmu_slot_gfn_write_protect)."""
        vm = self.vm
        flush = False
        for table, idx in self.rmap.get((as_id, gfn), ()):
            spte = int(vm.spte_table(table)[idx])
            if S.is_writable_pte(spte):
                vm.spte_write(table, idx, S.clear_writable(spte))
                flush = True
        return flush

    @hookimpl
    def mmu_track_write(self, vcpu, gpa, nbytes, new):
        """kvm_mmu_pte_write: zap the SPTEs that shadowed the overwritten guest entry."""
        vm = self.vm
        self.stats["track_writes"] += 1
        flush = False
        with vm.mmu_lock.write():
            for sp in list(self.by_gfn.get((vcpu.as_id, gpa >> 12), ())):
                for idx in R.affected_indices(sp.role, gpa & 0xFFF, nbytes):
                    spte = int(vm.spte_table(sp.pfn)[idx])
                    if spte:
                        flush |= S.is_shadow_present_pte(spte)
                        self._zap_spte(sp.pfn, idx, sp.role.level)
            if flush:
                vm.flush_remote_tlbs()

    @hookimpl
    def mmu_invlpg(self, vcpu, gva):
        # Shadow pages are kept in sync through write protection (no unsync pages yet), so
        # nothing is stale here; the core already dropped the TLB entry.
        return None

    # --- zap, notifiers, memslots ---------------------------------------------------------------
    @hookimpl
    def mmu_zap_gfn_range(self, vm, as_id, start, end):
        flush = False
        with vm.mmu_lock.write():
            keys = [k for k in self.rmap if k[0] == as_id and start <= k[1] < end] \
                if end - start > len(self.rmap) else \
                [(as_id, g) for g in range(start, end) if (as_id, g) in self.rmap]
            # huge leaves of the legacy direct MMU are keyed by their base gfn
            if self.direct:
                for level_pages in (512, 512 * 512):
                    base = start & ~(level_pages - 1)
                    for g in range(base, start, level_pages):
                        if (as_id, g) in self.rmap:
                            keys.append((as_id, g))
            for key in keys:
                for table, idx in list(self.rmap.get(key, ())):
                    sp = self.by_pfn.get(table)
                    level = sp.role.level if sp is not None else 1
                    flush = True
                    self._zap_spte(table, idx, level)
        return flush

    @hookimpl
    def mmu_zap_all(self, vm):
        # Every vCPU reloads before it next enters; a fault in flight finds its root gone
        # from by_pfn (or replaced by another key) and retries.
        with vm.mmu_lock.write():
            for vcpu in vm.vcpus:
                vcpu.make_request(REQ_MMU_RELOAD)
            vm.flush_remote_tlbs()
            self._free_all()
        return False

    # --- audit ----------------------------------------------------------------------------------
    @hookimpl
    def mmu_audit(self, vm):
        """mmu_audit.c's checks: every leaf has its rmap entry and every rmap entry a leaf;
        a leaf maps the host's pfn for its gfn; write-tracked, READONLY and host-read-only
        gfns are never writable; writable leaves in logged slots are dirty; and a leaf of an
        indirect page agrees with the guest entry it shadows (no unsync pages exist here)."""
        bad: list[tuple[str, str]] = []
        seen: set[tuple[int, int]] = set()
        for sp in self.pages.values():
            row = vm.spte_table(sp.pfn)
            level = sp.role.level
            for idx in np.flatnonzero(row).tolist():
                spte = int(row[idx])
                if not S.is_shadow_present_pte(spte) or not S.is_last_spte(spte, level):
                    continue
                key = self.leaf_key.get((sp.pfn, idx))
                if key is None:
                    bad.append(("rmap-missing", f"leaf {sp.pfn:#x}[{idx}] has no rmap entry"))
                    continue
                seen.add((sp.pfn, idx))
                if not self.direct:  # the core checks gfn-indexed (direct) roots itself
                    self._audit_leaf(sp, idx, spte, key, bad)
        for (table, idx), key in self.leaf_key.items():
            if (table, idx) not in seen and table in self.by_pfn:
                bad.append(("rmap-stale", f"rmap of gfn {key[1]:#x} names {table:#x}[{idx}], "
                            "which is not a present leaf"))
            elif table not in self.by_pfn:
                bad.append(("rmap-stale", f"rmap of gfn {key[1]:#x} names freed page {table:#x}"))
            if (table, idx) not in self.rmap.get(key, ()):
                bad.append(("rmap-missing", f"{table:#x}[{idx}] is not in the rmap of {key}"))
        for (as_id, gfn), sps in self.by_gfn.items():
            if sps and not vm.is_tracked(as_id, gfn):
                bad.append(("untracked", f"gfn {gfn:#x} is shadowed but not write-tracked"))
        # Roots are top-level pages (4- or 5-level tables). A lower page without parents was
        # unlinked (e.g. a huge leaf replaced it) and stays cached with its rmap'd leaves
        # until it is reused or zapped, as in KVM; it is held, not a root.
        loaded = {v.mmu_root for v in vm.vcpus}
        roots = tuple((sp.role.as_id, sp.role.level, sp.pfn) for sp in self.pages.values()
                      if sp.role.level >= 4 and (sp.pfn in loaded or not sp.parent_ptes))
        return BackendAudit(roots=roots, held_tables=frozenset(self.by_pfn),
                            violations=tuple(bad), direct=self.direct)

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
            if not vm.host_writable(hva) and not invalidating:
                bad.append(("cow-writable", f"gfn {gfn:#x} is read-only in the host but "
                            f"writable through {sp.pfn:#x}[{idx}]"))
            if slot.log_dirty and not slot.dirty_bitmap[gfn - slot.base_gfn] \
                    and not vm.collecting_dirty(as_id, gfn):
                bad.append(("dirty-log", f"gfn {gfn:#x} is writable in logged slot {slot.id} "
                            "but not dirty"))
        role = sp.role
        if role.direct or role.special or role.guest_level != 1:
            return
        if vm.track_write_in_flight(as_id, sp.key.gfn):
            return  # the guest entry was just written; mmu_track_write is on its way
        ebytes = int(P.MODE_ENTRY_BYTES[role.guest_mode])
        egpa = (sp.key.gfn << 12) + ((role.quadrant << 9) + idx) * ebytes
        word = vm.read_guest_u64(as_id, egpa & ~7)
        if ebytes == 4:
            word = (word >> (32 * ((egpa >> 2) & 1))) & 0xFFFFFFFF
            target = word >> 12
        else:
            target = (word >> 12) & ((1 << 40) - 1)
        if not word & P.PT_PRESENT or target != gfn:
            bad.append(("guest-disagrees", f"leaf {sp.pfn:#x}[{idx}] maps gfn {gfn:#x}, the "
                        f"guest entry at {egpa:#x} is {word:#x}"))
        elif S.is_writable_pte(spte) and not (word & P.PT_DIRTY and (
                word & P.PT_WRITABLE or not role.cr0_wp)):  # CR0.WP=0: supervisor writes
            bad.append(("guest-disagrees", f"leaf {sp.pfn:#x}[{idx}] is writable, the guest "
                        f"entry at {egpa:#x} ({word:#x}) is not writable and dirty"))

    # --- statistics and memory -------------------------------------------------------------------
    @hookimpl
    def mmu_stats(self, vm):
        st = self.stats
        return MMUStats(faults=st["faults"], retries=st["retries"], mapped_4k=st["mapped"][1],
                        mapped_2m=st["mapped"][2], mapped_1g=st["mapped"][3],
                        mmio_sptes=st["mmio"])

    @hookimpl
    def mmu_memory(self, vm):
        pages = len(self.pages)
        indirect = sum(1 for k in self.pages if not k.role.direct)
        rmap_bytes = 0
        for slots in vm.memslots:
            for slot in slots.slots:
                # kvm_alloc_memslot_metadata: one 8-byte rmap head per gfn per level
                for level in (1, 2, 3):
                    rmap_bytes += 8 * (((slot.npages - 1) >> (9 * (level - 1))) + 1)
        return MMUMemory(
            page_table_pages=vm.pt_pages_in_use(),
            page_table_bytes=vm.pt_pages_in_use() * 4096,
            mmu_page_structs=pages,
            mmu_page_struct_bytes=pages * KVM_MMU_PAGE_BYTES + indirect * SHADOWED_TRANSLATION_BYTES,
            rmap_bytes=rmap_bytes,
            peak_page_table_pages=int(vm.host.frames_peak[1]),
        )
