"""The invariant audit: what KVM's MMU relies on, checked on a live VM between engine steps.

Anchored on KVM's former mmu_audit.c (audit_mappings, audit_sptes_have_rmaps,
audit_write_protection) and extended to what a simulator can see that a kernel cannot: every
frame's state, every vCPU's TLB and paging-structure caches, every invalidation in progress.
`audit(vm)` returns the violations (an empty list when all holds); `check(vm)` raises
`AuditError` naming the first. Both are cheap enough to run after every engine step of small
scenarios: the trees are walked by a jitted loop and the comparisons are numpy.

The core checks what holds for every backend, from the roots and tables the backend reports
through the `mmu_audit` hook (a `BackendAudit`); the backend adds invariants of its own design
(rmap complete, root reference counts, write tracking) to that record. Invariants:

spte-pfn          a present leaf of a direct (gpa-indexed) root maps exactly the pfn that the
                  memslot and the host mm give for each gfn it covers, unless an MMU-notifier
                  invalidation covering the gfn is in progress
spte-no-slot      a present leaf of a direct root maps a gfn outside every memslot
readonly-writable no SPTE, TLB entry or host mapping makes a READONLY slot writable
cow-writable      no SPTE or TLB entry is writable to a page the host maps read-only (KSM/COW)
mmu-writable      no direct leaf that a READONLY slot or a read-only host page backs is
                  MMU-writable: the fast page fault makes such a leaf writable without the lock
leaf-freed        a present leaf maps a frame that is not allocated
table-freed       a present non-leaf SPTE points at a frame that is not an allocated MMU table
tlb-freed         a vCPU that may enter the guest caches a translation to a freed frame
psc-freed         ... or a paging-structure-cache entry to a table page that is not allocated
tlb-tag           a TLB entry is tagged with a PCID other than 0 while CR4.PCIDE=0, or global
                  while CR4.PGE=0 (turning either off flushes every entry, SDM 4.10.4.1)
table-leak        an allocated MMU table page is neither reachable from a root nor held by the
                  backend (waiting for an RCU callback, or a cached shadow page)
dirty-log         a writable SPTE in a dirty-logged slot maps a gfn that is not marked dirty
                  in the bitmap or a vCPU's PML buffer (unless a dirty-log collection of that
                  gfn is in progress, or PML will log it: a clean 4K SPTE with A/D bits, or
                  its root is invalid and no vCPU can enter the guest through it)
smm-only          a vCPU outside SMM caches a translation to memory only SMM slots map
mmio-current      an MMIO SPTE of the current memslots generation names a gfn that has a slot
shadowed-writable a present leaf of a direct root is writable over a gfn that is write-tracked
                  or that a shadow page in sync shadows (BackendAudit.write_protected of either
                  backend: with tdp, L1's TDP MMU must keep the nested shadow MMU's EPT12
                  tables read-only unless their EPT02 pages are unsync), unless the MMU lock
                  is held for write (a page being shadowed or synced is write-protected
                  under it); invalid roots are left out, as kvm_tdp_mmu_write_protect_gfn
                  walks only the valid ones (an invalid root is zapped before it is freed)
backend:*         the backend's own invariants
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_core.errors import MMUError
from mmu_core.host.memory import NO_SLOT, Purpose
from mmu_core.host.mm import NO_PFN
from mmu_core.hw import tlb as T
from mmu_core.hw import walker as W
from mmu_core.types import BackendAudit, Role
from mmu_core.vm.vcpu import REQ_MMU_RELOAD, REQ_TLB_FLUSH

_PRESENT = np.uint64(S.SPTE_MMU_PRESENT_MASK)
_LARGE = np.uint64(S.PT_PAGE_SIZE_MASK)
_ADDR = np.uint64(S.SPTE_BASE_ADDR_MASK)
_FROZEN = np.uint64(S.FROZEN_SPTE)
_W = np.uint64(S.PT_WRITABLE_MASK)
_D = np.uint64(S.VMX_EPT_DIRTY_BIT)
_AD_MASK = np.uint64(S.SPTE_TDP_AD_MASK)
_AD_DISABLED = np.uint64(S.SPTE_TDP_AD_DISABLED)


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


class AuditError(MMUError):
    """An invariant does not hold; `violations` lists every one found."""

    def __init__(self, violations: list[Violation]) -> None:
        self.violations = violations
        more = f" (and {len(violations) - 1} more)" if len(violations) > 1 else ""
        super().__init__(f"{violations[0]}{more}")


@njit(cache=True)
def _doubled(rows):
    """rows with twice the capacity, same contents in front (a growable stack in numba)."""
    out = np.empty((rows.shape[0] * 2, rows.shape[1]), np.int64)
    out[: rows.shape[0]] = rows
    return out


@njit(cache=True)
def _walk_tree(pt, pt_slot, root, root_level):
    """Every table under root (pfn, level) and every non-zero entry of them: (table, idx,
    level, first page number covered, spte). Tables are entered through present non-leaf
    entries only; a missing table (no contents) is reported with level -1."""
    tables = np.empty((64, 2), np.int64)
    entries = np.empty((256, 5), np.int64)
    nt = 0
    ne = 0
    stack = np.empty((64, 3), np.int64)  # pfn, level, base page number
    stack[0, 0] = root
    stack[0, 1] = root_level
    stack[0, 2] = 0
    sp = 1
    while sp > 0:
        sp -= 1
        pfn = stack[sp, 0]
        level = stack[sp, 1]
        base = stack[sp, 2]
        if nt == tables.shape[0]:
            tables = _doubled(tables)
        tables[nt, 0] = pfn
        tables[nt, 1] = level
        nt += 1
        if pfn < 0 or pfn >= pt_slot.shape[0] or pt_slot[pfn] == NO_SLOT:
            tables[nt - 1, 1] = -1
            continue
        row = pt[pt_slot[pfn]]
        span = np.int64(1) << (9 * (level - 1))
        for idx in range(512):
            spte = row[idx]
            if spte == 0:
                continue
            if ne == entries.shape[0]:
                entries = _doubled(entries)
            entries[ne, 0] = pfn
            entries[ne, 1] = idx
            entries[ne, 2] = level
            entries[ne, 3] = base + idx * span
            entries[ne, 4] = np.int64(spte)
            ne += 1
            if level > 1 and (spte & _PRESENT) != 0 and (spte & _LARGE) == 0 and spte != _FROZEN:
                if sp == stack.shape[0]:
                    stack = _doubled(stack)
                stack[sp, 0] = np.int64((spte & _ADDR) >> np.uint64(12))
                stack[sp, 1] = level - 1
                stack[sp, 2] = base + idx * span
                sp += 1
    return tables[:nt], entries[:ne]


def _u64(x: int) -> int:
    return x & 0xFFFF_FFFF_FFFF_FFFF


class _Frames:
    """Which frames are allocated, and for what (HostMemory.frame_state: the purpose, or
    FRAME_FREE)."""

    def __init__(self, vm) -> None:
        self.purpose = vm.host.frame_state

    def live(self, pfn: int) -> bool:
        return 0 <= pfn < len(self.purpose) and self.purpose[pfn] >= 0

    def is_table(self, pfn: int) -> bool:
        return 0 <= pfn < len(self.purpose) and self.purpose[pfn] == Purpose.MMU_PT


def backend_audit(vm) -> BackendAudit:
    """The backend's report (hook mmu_audit); without the hook, the roots the vCPUs have
    loaded, with every table page counted as held (so leaks go unseen until teardown)."""
    info = vm.hook.mmu_audit(vm=vm)
    if info is not None:
        return info
    roots = {(v.as_id, vm.root_levels(v), v.mmu_root) for v in vm.vcpus
             if v.mmu_root is not None and not v.requests & REQ_MMU_RELOAD}
    tables = np.flatnonzero(vm.host.frame_state == Purpose.MMU_PT).tolist()
    return BackendAudit(roots=tuple(sorted(roots)), held_tables=frozenset(tables),
                        direct=vm.role is Role.DIRECT)


def audit(vm) -> list[Violation]:
    """Check every invariant; returns the violations found (empty when all hold)."""
    out: list[Violation] = []

    def bad(name: str, detail: str) -> None:
        out.append(Violation(name, detail))

    info = backend_audit(vm)
    # What the MMU lock protects may be half-done while someone holds it for write (KVM's
    # mmu_audit ran under the lock at points where it held): check it only when free.
    locked = vm.mmu_lock.write_held
    if not locked:
        for name, detail in info.violations:
            bad(f"backend:{name}", detail)
    frames = _Frames(vm)
    host = vm.host
    if host.pt[NO_SLOT].any():  # what every frame without a table reads through
        bad("pt-zero-row", f"row {NO_SLOT} of the table array, no table's, holds entries at "
            f"{np.flatnonzero(host.pt[NO_SLOT])[:8].tolist()}")
    gen = vm.memslots_generation() & S.MMIO_SPTE_GEN_MASK
    ept = info.direct
    reachable: set[int] = set()
    roots = [(as_id, level, root, info.direct, "") for as_id, level, root in info.roots]
    # Nested EPT: the EPT02 roots of the nested-role backend (docs/nested.md), their tables
    # reachable and their leaves on guest memory; their gfns are L2's, not checked as L1's.
    nested = vm.managers[Role.NESTED].hook.mmu_nested_audit(vm=vm) \
        if Role.NESTED in vm.managers else None
    nested_held: set[int] = set()
    if nested is not None:
        nested_held = set(nested.held_tables)
        if not locked:
            for name, detail in nested.violations:
                bad(f"backend:{name}", detail)
        roots += [(as_id, level, root, False, "EPT02 ") for as_id, level, root in nested.roots]
    # A root no vCPU can enter through (invalid, and every vCPU still on it must reload
    # first) keeps writable leaves in logged slots until it is zapped: no write reaches them.
    entered = {vcpu.mmu_root for vcpu in vm.vcpus if not vcpu.requests & REQ_MMU_RELOAD}
    dead = {r for r in info.invalid_roots if r not in entered}
    protected = set() if locked else set(info.write_protected) | vm.tracked_gfns()
    if nested is not None and not locked:
        protected |= nested.write_protected
    for as_id, level, root, direct, what in roots:
        tables, entries = _walk_tree(host.pt, host.pt_slot, root, level)
        for pfn, lvl in tables.tolist():
            if lvl < 0 or not frames.is_table(pfn):
                bad("table-freed", f"{what}root {root:#x} (as {as_id}) reaches table {pfn:#x}, "
                    "which is not an allocated MMU table page")
            reachable.add(pfn)
        if not len(entries):
            continue
        sptes = entries[:, 4].astype(np.uint64)
        present = ((sptes & _PRESENT) != 0) & (sptes != _FROZEN)
        leaf = present & ((entries[:, 2] == 1) | ((sptes & _LARGE) != 0))
        if direct:
            mmio = ~present & (sptes != _FROZEN)
            for k in np.flatnonzero(mmio).tolist():
                spte = int(sptes[k])
                if S.is_mmio_spte(np.uint64(spte), ept) and \
                        S.get_mmio_spte_generation(np.uint64(spte)) == gen:
                    gfn = int(entries[k, 3])
                    if vm.memslots[as_id].find(gfn) is not None:
                        bad("mmio-current", f"as {as_id} gfn {gfn:#x} has a slot but a current "
                            "MMIO SPTE")
        for k in np.flatnonzero(leaf).tolist():
            table, idx, lvl, first, spte = (int(v) for v in entries[k])
            spte = _u64(spte)
            pfn = S.spte_to_pfn(np.uint64(spte))
            npages = 1 << (9 * (lvl - 1))
            if not frames.live(pfn) or not frames.live(pfn + npages - 1) \
                    or frames.purpose[pfn] != Purpose.GUEST_DATA:
                bad("leaf-freed", f"{what}SPTE {table:#x}[{idx}] (level {lvl}) maps frame "
                    f"{pfn:#x}, which is not allocated guest memory")
                continue
            if direct:
                _check_direct_leaf(vm, as_id, first, npages, pfn, spte, bad, root in dead)
                if protected and spte & int(_W) and root not in info.invalid_roots:
                    _check_write_protected(as_id, first, npages, protected, table, idx, bad)
    # Page-table pages that nothing accounts for.
    owned = reachable | set(info.held_tables) | nested_held
    tables_alloc = np.flatnonzero(frames.purpose == Purpose.MMU_PT).tolist()
    leaked = [p for p in tables_alloc if p not in owned]
    if leaked and not locked:
        bad("table-leak", f"{len(leaked)} MMU table page(s) reachable from no root and not "
            f"held by the backend, e.g. {leaked[0]:#x}")
    _check_caches(vm, frames, info, bad)
    return out


def _check_direct_leaf(vm, as_id: int, gfn: int, npages: int, pfn: int, spte: int, bad,
                       dead_root: bool = False) -> None:
    slot = vm.memslots[as_id].find(gfn)
    if slot is None or gfn + npages > slot.end_gfn:
        if not vm.invalidating_gfn(as_id, gfn):
            bad("spte-no-slot", f"as {as_id} gfn {gfn:#x} is mapped but no memslot covers it")
        return
    lo = vm.mm.index(slot.gfn_to_hva(gfn))
    want = vm.mm.hva_pfn[lo : lo + npages]
    have = np.arange(pfn, pfn + npages, dtype=np.int64)
    wrong = np.flatnonzero(want != have)
    for off in wrong[:4].tolist():
        if not vm.invalidating_gfn(as_id, gfn + off):
            expect = int(want[off])
            bad("spte-pfn", f"as {as_id} gfn {gfn + off:#x} maps frame {pfn + off:#x}, the host "
                f"has {'nothing' if expect == NO_PFN else hex(expect)}")
            break
    if spte & S.EPT_SPTE_MMU_WRITABLE and (slot.readonly or (
            not vm.host_writable(slot.gfn_to_hva(gfn)) and not vm.invalidating_gfn(as_id, gfn))):
        bad("mmu-writable", f"as {as_id} gfn {gfn:#x} is MMU-writable, but its "
            f"{'slot is READONLY' if slot.readonly else 'host page is read-only'}: the fast "
            "page fault would make it writable")
    writable = bool(spte & int(_W))
    if writable and slot.readonly:
        bad("readonly-writable", f"as {as_id} gfn {gfn:#x} is in READONLY slot {slot.id} but its "
            "SPTE is writable")
    if writable and not vm.host_writable(slot.gfn_to_hva(gfn)):
        if not vm.invalidating_gfn(as_id, gfn):
            bad("cow-writable", f"as {as_id} gfn {gfn:#x} is writable but the host maps it "
                "read-only")
    if writable and slot.log_dirty and not dead_root:
        # Under PML a clean 4K leaf may be writable: the hardware logs the write that sets D.
        # A huge one may not (PML would log one 4K page of it), nor may a dirty one whose page
        # is neither in the bitmap nor still in a vCPU's PML buffer.
        if npages == 1 and vm.params.pml_enabled and not spte & int(_D) \
                and spte & int(_AD_MASK) != int(_AD_DISABLED):
            return
        off = gfn - slot.base_gfn
        marked = slot.dirty_bitmap[off : off + npages].astype(bool)
        if not marked.all():
            pending = {int(g) >> 12 for v in vm.vcpus for g in v.pml[1 : int(v.pml[0]) + 1]}
            marked |= np.isin(np.arange(gfn, gfn + npages), list(pending))
        if not marked.all() and not vm.collecting_dirty(as_id, gfn):
            bad("dirty-log", f"as {as_id} gfn {gfn:#x} is writable in logged slot {slot.id} but "
                "not marked dirty")


def _check_write_protected(as_id: int, gfn: int, npages: int, protected: set, table: int,
                           idx: int, bad) -> None:
    hit = [g for a, g in protected if a == as_id and gfn <= g < gfn + npages] \
        if npages > 1 else [gfn] if (as_id, gfn) in protected else []
    if hit:
        bad("shadowed-writable", f"as {as_id} gfn {hit[0]:#x}, write-tracked or shadowed by a "
            f"shadow page in sync, is writable through SPTE {table:#x}[{idx}]")


def _frame_owners(vm) -> dict[int, list[tuple[int, bool]]]:
    """pfn -> [(as_id, readonly)] for every populated page of every memslot."""
    owners: dict[int, list[tuple[int, bool]]] = {}
    for slots in vm.memslots:
        for slot in slots.slots:
            lo = vm.mm.index(slot.userspace_addr)
            pfns = vm.mm.hva_pfn[lo : lo + slot.npages]
            for pfn in pfns[pfns != NO_PFN].tolist():
                owners.setdefault(pfn, []).append((slot.as_id, slot.readonly))
    return owners


def _check_caches(vm, frames: _Frames, info: BackendAudit, bad) -> None:
    owners: dict = {}  # filled once, on the first TLB holding data entries
    for vcpu in vm.vcpus:
        if vcpu.requests & (REQ_TLB_FLUSH | REQ_MMU_RELOAD):
            continue  # flushed before this vCPU can enter the guest again
        # the running context's TLB, and the other VPID's (nested, docs/nested.md)
        for tlb in (vcpu.tlb, vcpu.tlb_other):
            if tlb is not None:
                _check_tlb(vm, vcpu, tlb, frames, info, owners, bad)


def _check_tlb(vm, vcpu, tlb, frames: _Frames, info: BackendAudit, owners: dict, bad) -> None:
    _data, tables = T.cached_frames(tlb)
    tlb = tlb[: int(tlb[0, T.TLB_GEOM])]
    valid = tlb[:, T.TLB_VPN] != 0
    data, attrs = tlb[valid, T.TLB_PFN], tlb[valid, T.TLB_ATTR]
    ctx = (tlb[valid, T.TLB_VPN] - 1) & T.CTX_MASK
    if not vcpu.cr4 & P.CR4_PCIDE and np.any((ctx != 0) & (ctx != T.CTX_GLOBAL)):
        bad("tlb-tag", f"vcpu{vcpu.id}'s TLB holds entries of PCIDs "
            f"{sorted(set(ctx[(ctx != 0) & (ctx != T.CTX_GLOBAL)].tolist()))} with CR4.PCIDE=0")
    if not vcpu.cr4 & P.CR4_PGE and np.any(ctx == T.CTX_GLOBAL):
        bad("tlb-tag", f"vcpu{vcpu.id}'s TLB holds global entries with CR4.PGE=0")
    for pfn in tables.tolist():
        if not frames.is_table(pfn):
            bad("psc-freed", f"vcpu{vcpu.id}'s paging-structure cache reaches table "
                f"{pfn:#x}, which is not an allocated MMU table page")
    if not len(data):
        return
    if not owners:
        owners.update(_frame_owners(vm))
    for pfn, attr in zip(data.tolist(), attrs.tolist(), strict=True):
        if not frames.live(pfn):
            bad("tlb-freed", f"vcpu{vcpu.id}'s TLB maps freed frame {pfn:#x}")
            continue
        who = owners.get(pfn, ())
        # TDP: the EPT's W decides (the guest's own W may be overridden by CR0.WP=0);
        # shadow paging: the shadow leaf's W, which already includes the guest's.
        writable = attr & (W.A_HOST_W if info.direct else W.A_WRITABLE)
        if writable and who and all(ro for _as, ro in who):
            bad("readonly-writable", f"vcpu{vcpu.id}'s TLB can write frame {pfn:#x} of a "
                "READONLY slot")
        if who and not vcpu.smm and all(a == 1 for a, _ro in who):
            bad("smm-only", f"vcpu{vcpu.id} is not in SMM but its TLB maps SMM-only frame "
                f"{pfn:#x}")


def check(vm) -> None:
    """Raise AuditError if any invariant does not hold."""
    violations = audit(vm)
    if violations:
        raise AuditError(violations)
