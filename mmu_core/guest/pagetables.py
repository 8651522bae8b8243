"""The guest OS's page tables: built in guest memory, in any paging mode, and edited later.

Like the selftests' virt_pg_map, the initial tables are written from the host side through
the memslot's host mapping (the guest's "firmware"); the guest then edits them itself with
ordinary stores (program ops), which is what shadow paging must trap. Table pages come from a
bump allocator over a dedicated page-table memslot, which the guest also maps at PT_GVA so
its own stores can reach them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmu_core.arch.x86 import paging as P
from mmu_core.errors import GuestError

#: where the guest maps its page-table memslot, per mode (below 4 GiB for 32-bit modes)
PT_GVA_32 = 0xC000_0000
PT_GVA_64 = 0x80_0000_0000
INTERMEDIATE = P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER


@dataclass(frozen=True)
class PagingSetup:
    cr0: int
    cr4: int
    efer: int
    cr3: int


class GuestPageTables:
    """Page tables of one address space of the guest, in paging mode `mode`."""

    def __init__(self, vm, mode: int, pt_base_gpa: int, pt_size: int, as_id: int = 0,
                 nx: bool = True, extra_cr4: int = 0) -> None:
        if mode == P.MODE_32 and pt_base_gpa + pt_size > 1 << 32:
            raise GuestError("32-bit paging needs page tables below 4 GiB")
        self.vm = vm
        self.mode = mode
        self.as_id = as_id
        self.base_gfn = pt_base_gpa >> 12
        self.end_gfn = (pt_base_gpa + pt_size) >> 12
        self.next_gfn = self.base_gfn
        self.nx = nx and P.MODE_HAS_NX[mode]
        self.extra_cr4 = extra_cr4
        self.pt_gva = PT_GVA_32 if mode in (P.MODE_32, P.MODE_PAE) else PT_GVA_64
        self.root_gpa = self._alloc() if mode != P.MODE_NONE else 0
        if mode != P.MODE_NONE:
            self.map_range(self.pt_gva + pt_base_gpa, pt_base_gpa, pt_size >> 12,
                           P.PT_PRESENT | P.PT_WRITABLE)

    # --- memory ---------------------------------------------------------------------------
    def _alloc(self) -> int:
        if self.next_gfn >= self.end_gfn:
            raise GuestError("the guest's page-table memslot is full")
        gfn = self.next_gfn
        self.next_gfn += 1
        self._table_of_gpa(gfn << 12)
        return gfn << 12

    def _table_of_gpa(self, gpa: int) -> np.ndarray:
        pfn = self.vm.gfn_to_pfn_nowait(self.as_id, gpa >> 12)
        if pfn is None:
            raise GuestError(f"gpa {gpa:#x} has no memslot")
        return self.vm.host.table(pfn)

    def read_entry(self, entry_gpa: int) -> int:
        word = int(self._table_of_gpa(entry_gpa)[(entry_gpa & 0xFFF) >> 3])
        if P.MODE_ENTRY_BYTES[self.mode] == 4:
            return (word >> (32 * ((entry_gpa >> 2) & 1))) & 0xFFFFFFFF
        return word

    def write_entry(self, entry_gpa: int, value: int) -> None:
        table = self._table_of_gpa(entry_gpa)
        i = (entry_gpa & 0xFFF) >> 3
        if P.MODE_ENTRY_BYTES[self.mode] == 4:
            sh = 32 * ((entry_gpa >> 2) & 1)
            word = int(table[i]) & ~(0xFFFFFFFF << sh) & ((1 << 64) - 1)
            table[i] = np.uint64(word | ((value & 0xFFFFFFFF) << sh))
        else:
            table[i] = np.uint64(value & ((1 << 64) - 1))

    def pt_gva_of(self, gpa: int) -> int:
        """The linear address at which the guest itself reaches guest-physical `gpa` of its
        page-table memslot (for its own PTE stores)."""
        return self.pt_gva + gpa

    # --- structure ----------------------------------------------------------------------------
    def _levels(self) -> int:
        return int(P.MODE_LEVELS[self.mode])

    def _index(self, gva: int, level: int) -> int:
        if self.mode == P.MODE_PAE and level == 3:
            return (gva >> 30) & 3
        bits = int(P.MODE_INDEX_BITS[self.mode])
        return (gva >> (12 + bits * (level - 1))) & ((1 << bits) - 1)

    def entry_gpa(self, gva: int, level: int, create: bool = True) -> int:
        """gpa of the entry at `level` on gva's path, creating tables above it as needed."""
        ebytes = int(P.MODE_ENTRY_BYTES[self.mode])
        table = self.root_gpa
        for lv in range(self._levels(), level, -1):
            e_gpa = table + self._index(gva, lv) * ebytes
            entry = self.read_entry(e_gpa)
            if not entry & P.PT_PRESENT:
                if not create:
                    raise GuestError(f"no table at level {lv - 1} for {gva:#x}")
                child = self._alloc()
                flags = P.PT_PRESENT if self.mode == P.MODE_PAE and lv == 3 else INTERMEDIATE
                self.write_entry(e_gpa, child | flags)
                entry = child | flags
            elif entry & P.PT_PAGE_SIZE and lv > 1 and not (self.mode == P.MODE_PAE and lv == 3):
                raise GuestError(f"{gva:#x} is inside a large page at level {lv}")
            table = entry & (0xFFFFF000 if ebytes == 4 else 0x000F_FFFF_FFFF_F000)
        return table + self._index(gva, level) * ebytes

    def leaf_value(self, gpa: int, flags: int, level: int = 1) -> int:
        if level > 1:
            flags |= P.PT_PAGE_SIZE
            if self.mode == P.MODE_32:
                return (gpa & 0xFFC00000) | (((gpa >> 32) & 0xFF) << 13) | flags
        return (gpa & 0x000F_FFFF_FFFF_F000) | flags

    def map(self, gva: int, gpa: int, flags: int, level: int = 1) -> int:
        """Map one page (4K, or a large page at `level`); returns the entry's gpa."""
        if self.mode == P.MODE_NONE:
            raise GuestError("paging is off: nothing to map")
        if flags & P.PT_NX and not self.nx:
            raise GuestError("XD is reserved in this mode")
        e_gpa = self.entry_gpa(gva, level)
        self.write_entry(e_gpa, self.leaf_value(gpa, flags, level))
        return e_gpa

    def map_range(self, gva: int, gpa: int, npages: int, flags: int) -> None:
        """Map npages 4K pages; fills whole last-level tables at a time (numpy slices)."""
        if self.mode == P.MODE_NONE:
            return
        ebytes = int(P.MODE_ENTRY_BYTES[self.mode])
        per_table = 4096 // ebytes
        done = 0
        while done < npages:
            va = gva + (done << 12)
            first = self.entry_gpa(va, 1)
            idx = self._index(va, 1)
            n = min(per_table - idx, npages - done)
            values = (np.arange(n, dtype=np.uint64) << np.uint64(12)) + np.uint64(gpa + (done << 12))
            values |= np.uint64(flags)
            table = self._table_of_gpa(first)
            if ebytes == 8:
                start = (first & 0xFFF) >> 3
                table[start : start + n] = values
            else:
                for k in range(n):
                    self.write_entry(first + 4 * k, int(values[k]))
            done += n

    def setup(self, *, wp: bool = True, smep: bool = False, smap: bool = False,
              pke: bool = False, pse: bool = True) -> PagingSetup:
        """Control registers for this mode (what the guest's boot code would load)."""
        mode = self.mode
        cr0 = P.CR0_PE | (P.CR0_WP if wp else 0)
        cr4 = self.extra_cr4
        efer = 0
        if mode != P.MODE_NONE:
            cr0 |= P.CR0_PG
        if mode == P.MODE_32 and pse:
            cr4 |= P.CR4_PSE
        if mode >= P.MODE_PAE:
            cr4 |= P.CR4_PAE
            efer |= P.EFER_NXE if self.nx else 0
        if mode >= P.MODE_4LEVEL:
            efer |= P.EFER_LME | P.EFER_LMA
        if mode == P.MODE_5LEVEL:
            cr4 |= P.CR4_LA57
        cr4 |= (P.CR4_SMEP if smep else 0) | (P.CR4_SMAP if smap else 0)
        cr4 |= P.CR4_PKE if pke else 0
        return PagingSetup(cr0, cr4, efer, self.root_gpa)

    def new_address_space(self) -> int:
        """A second top-level table sharing every lower table with the first, as the
        processes of one kernel share its tables (4- and 5-level paging); its present entries
        have A set, as the first's get at their first walk. Returns its gpa (the CR3)."""
        if self.mode not in (P.MODE_4LEVEL, P.MODE_5LEVEL):
            raise GuestError("a second address space needs 4- or 5-level paging")
        root = self._alloc()
        src = self._table_of_gpa(self.root_gpa)
        present = (src & np.uint64(P.PT_PRESENT)) != 0
        self._table_of_gpa(root)[:] = np.where(present, src | np.uint64(P.PT_ACCESSED), src)
        return root

    def table_gfns(self) -> range:
        """Every gfn handed out as a table so far."""
        return range(self.base_gfn, self.next_gfn)
