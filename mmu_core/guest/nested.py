"""The L1 guest hypervisor: EPT12 tables in L1 memory and the L2 guests it runs.

Like KVM's selftests with -n (memstress_setup_nested, memstress_setup_ept), L1 gives each L2
guest EPT tables that map L2 guest-physical addresses 1:1 onto its own, and L2 runs L1's code
with L1's page tables (CR3), so an L2 program sees what the same program sees in L1. L1 maps
eagerly (`prefault`, what memstress does for the test memory) or lazily: then every EPT
violation L0 reflects to L1 is handled by L1 mapping the 4K page (what an L1 KVM's TDP fault
does for its L2), with stores to EPT12 that exit to L0 when L0 write-tracks the page
(`Vcpu.l1_store`).

EPT12 table pages come from the guest's page-table memslot (the same bump allocator as the
guest's own tables). Entries follow the SDM's EPT layout (mmu_core/arch/x86/ept.py): a
non-leaf entry is the child table's gpa with R/W/X, a 4K leaf the L1 gpa with R/W/X and
write-back memory type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmu_core.arch.x86 import ept as E
from mmu_core.errors import GuestError
from mmu_core.guest.pagetables import GuestPageTables

EPT_LEVELS = 4
LEAF_FLAGS = E.EPT_RWX | (E.EPT_MT_WB << E.EPT_MT_SHIFT)
NONLEAF_FLAGS = E.EPT_RWX
_ADDR = 0x000F_FFFF_FFFF_F000


@dataclass
class L2Guest:
    """One L2 guest: its VMCS12's EPTP (the gpa of its EPT12 root) and L1's handler."""

    hv: L1Hypervisor
    eptp: int
    vpid: int = 0  # vmcs12's VPID for L2 (0: none, every L1 <-> L2 switch flushes)
    reflected: int = 0  # EPT violations L1 handled
    mapped: set[int] = field(default_factory=set)  # L2 gfns L1 mapped

    def handle_ept_violation(self, vcpu, fault) -> None:
        """L1's EPT-violation handler: map the faulting 4K page 1:1, RWX (also when EPT12
        maps it without the permission the access needed). Assumes EPT12 has no large leaf
        there (L1 maps lazily in 4K pages)."""
        self.reflected += 1
        need = E.EPT_WRITE if fault.write else E.EPT_EXEC if fault.fetch else E.EPT_READ
        entry = self.hv.lookup(self, fault.gpa)
        if entry is not None and entry & need:
            return  # another vCPU's exit mapped it meanwhile
        self.hv.map(self, fault.gpa, fault.gpa, vcpu=vcpu)


class L1Hypervisor:
    """The guest hypervisor of a Machine: builds and edits EPT12 for its L2 guests."""

    def __init__(self, pts: GuestPageTables) -> None:
        self.pts = pts
        self.vm = pts.vm
        self.tables: set[int] = set()  # gfns of every EPT12 table page: L1's own memory

    def _alloc_table(self) -> int:
        gpa = self.pts._alloc()
        self.tables.add(gpa >> 12)
        return gpa

    def new_l2(self, prefault: list[tuple[int, int]] | None = None, level: int = 1) -> L2Guest:
        """A new L2 guest with an empty EPT12, or with `prefault`'s (gpa, bytes) ranges mapped
        1:1 before it runs (host-side writes: no EPT02 exists yet to keep in sync), with 4K
        leaves or, at `level` 3, 1G ones covering the ranges (nested_identity_map_1g)."""
        l2 = L2Guest(self, self._alloc_table())
        shift = 12 + 9 * (level - 1)
        for gpa, size in prefault or ():
            for page in range(gpa >> shift, (gpa + size + (1 << shift) - 1) >> shift):
                self.map(l2, page << shift, page << shift, vcpu=None, level=level)
        return l2

    def _read(self, gpa: int) -> int:
        return self.vm.read_guest_u64(0, gpa)

    def _store(self, vcpu, gpa: int, value: int) -> None:
        if vcpu is None:
            self.pts._table_of_gpa(gpa)[(gpa & 0xFFF) >> 3] = value
        else:
            vcpu.l1_store(gpa, value)

    def _entry_gpa(self, l2: L2Guest, l2gpa: int, vcpu, create: bool,
                   leaf_level: int = 1) -> int | None:
        table = l2.eptp
        for level in range(EPT_LEVELS, leaf_level, -1):
            e_gpa = table + 8 * ((l2gpa >> (12 + 9 * (level - 1))) & 511)
            entry = self._read(e_gpa)
            if not entry & E.EPT_RWX:
                if not create:
                    return None
                child = self._alloc_table()
                self._store(vcpu, e_gpa, child | NONLEAF_FLAGS)
                entry = child | NONLEAF_FLAGS
            elif entry & E.EPT_LARGE:
                raise GuestError(f"L2 gpa {l2gpa:#x} lies in a large EPT12 leaf")
            table = entry & _ADDR
        return table + 8 * ((l2gpa >> (12 + 9 * (leaf_level - 1))) & 511)

    def map(self, l2: L2Guest, l2gpa: int, l1gpa: int, perm: int = E.EPT_RWX, vcpu=None,
            level: int = 1) -> int:
        """Map one 4K page (or a 2M/1G one at `level` 2/3); returns the leaf's gpa. With a
        vCPU, L1 runs it (its stores may exit to L0); without, it is set-up code writing L1
        memory directly."""
        e_gpa = self._entry_gpa(l2, l2gpa, vcpu, True, level)
        flags = (LEAF_FLAGS & ~E.EPT_RWX) | perm | (E.EPT_LARGE if level > 1 else 0)
        self._store(vcpu, e_gpa, (l1gpa & _ADDR) | flags)
        if level == 1:
            l2.mapped.add(l2gpa >> 12)
        return e_gpa

    def unmap(self, l2: L2Guest, l2gpa: int, vcpu) -> None:
        """Clear one 4K leaf (L1 must INVEPT afterwards, as the SDM requires)."""
        e_gpa = self._entry_gpa(l2, l2gpa, vcpu, False)
        if e_gpa is not None:
            self._store(vcpu, e_gpa, 0)
        l2.mapped.discard(l2gpa >> 12)

    def lookup(self, l2: L2Guest, l2gpa: int) -> int | None:
        """The leaf entry for l2gpa, or None if EPT12 does not map it."""
        e_gpa = self._entry_gpa(l2, l2gpa, None, False)
        if e_gpa is None:
            return None
        entry = self._read(e_gpa)
        return entry if entry & E.EPT_RWX else None


def run_in_l2(machine, prefault: bool = True) -> L2Guest:
    """Every vCPU of `machine` runs its programs in one L2 guest of L1 (the selftests' -n:
    memstress_setup_nested), whose EPT12 maps L2 1:1 onto L1: eagerly as memstress_setup_ept
    does (1G leaves over the first 4 GiB and the data), or lazily, 4K pages as L2 touches
    them (every first touch reflected to L1)."""
    from mmu_core.guest.machine import DATA_GPA  # machine imports nothing from here

    pts = machine.pts
    ranges = [(0, 1 << 32), (DATA_GPA, machine.spec.data_size)] if prefault else None
    if prefault and pts.base_gfn << 12 >= 1 << 32:
        # the guest's page tables sit above the data (over 256 GiB: machine.pt_slot_gpa)
        ranges.append((pts.base_gfn << 12, (pts.end_gfn - pts.base_gfn) << 12))
    l2 = L1Hypervisor(pts).new_l2(prefault=ranges, level=3)
    for vcpu in machine.vm.vcpus:
        vcpu.enter_l2(l2)
    return l2
