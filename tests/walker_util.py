"""Build guest page tables, and EPT tables, in HostMemory for the walker tests.

`Guest` holds one path of tables from the root to the PT for one linear address, in any paging
mode. Its tables sit at host-physical pfns from the allocator and are seen by the guest at
`hpa + gpa_offset` (0: gpa == hpa, as the walker's XL_NONE expects; non-zero for 2-D walks, so
that a walker which skipped the EPT translation of a table address would read the wrong page).
`Ept` builds an EPT hierarchy with 4K, 2M or 1G leaves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from access_oracle import Cpu

from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.host.memory import HostMemory, Purpose
from mmu_core.hw import walker as W

# 4/5-level and PAE: PML5 0, PML4 0, PDPT 1, PD 1, PT 1, offset 0x234.
# 32-bit: PD index 0x100 (low half of its word), PT index 0x201 (high half of its word).
GVA = 0x4020_1234
DATA_GPA = 0x1234_5000
MAXPHY = 46
UPPER = P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER
MODE_NAME = {P.MODE_32: "32bit", P.MODE_PAE: "pae", P.MODE_4LEVEL: "4level", P.MODE_5LEVEL: "5level"}
PAGING_MODES = [P.MODE_32, P.MODE_PAE, P.MODE_4LEVEL, P.MODE_5LEVEL]
ACC = {"read": EC.ACC_READ, "write": EC.ACC_WRITE, "fetch": EC.ACC_FETCH}
PDPTE_PRESENT = P.PT_PRESENT  # PAE PDPTEs: P is the only flag they may carry


def regs_flags(cpu: Cpu) -> int:
    """The walker's R_FLAGS for an oracle Cpu."""
    f = 0
    for on, bit in ((cpu.wp, W.F_WP), (cpu.nxe, W.F_NXE), (cpu.smep, W.F_SMEP), (cpu.smap, W.F_SMAP),
                    (cpu.pke, W.F_PKE), (cpu.pse, W.F_PSE), (cpu.ac, W.F_AC), (cpu.cpl == 3, W.F_USER)):
        if on:
            f |= bit
    return f


class Guest:
    """Guest tables for one linear address; entries are addressed by level (1 = PT)."""

    def __init__(self, mode: int, *, gva: int = GVA, maxphy: int = MAXPHY, gpa_offset: int = 0,
                 mem: HostMemory | None = None) -> None:
        self.mode = mode
        self.gva = gva
        self.gpa_offset = gpa_offset
        self.mem = mem if mem is not None else HostMemory()
        self.levels = int(P.MODE_LEVELS[mode])
        self.ebytes = int(P.MODE_ENTRY_BYTES[mode])
        self.ibits = int(P.MODE_INDEX_BITS[mode])
        self.regs = W.new_regs()
        self.regs[W.R_MODE] = mode
        self.regs[W.R_MAXPHY] = maxphy
        self.out = W.new_out()
        self.tables = {lv: self.mem.alloc(Purpose.MMU_PT) for lv in range(self.levels, 0, -1)}
        for pfn in self.tables.values():
            self.mem.table(pfn)
        if self.levels:
            self.regs[W.R_CR3] = self.table_gpa(self.levels)
        for lv in range(self.levels, 1, -1):
            self.set(lv, self.link(lv))
        #: levels whose entries the walker reads from memory (not the PAE PDPTE registers)
        self.mem_levels = [lv for lv in range(self.levels, 0, -1)
                           if not (mode == P.MODE_PAE and lv == 3)]
        slots = [int(self.mem.pt_slot[self.entry_hpa(lv) >> 12]) for lv in self.mem_levels]
        self._rows = np.array(slots, dtype=np.int64)
        self._cols = np.array([(self.entry_hpa(lv) & 0xFFF) >> 3 for lv in self.mem_levels], dtype=np.int64)
        self._shifts = [32 * ((self.entry_hpa(lv) >> 2) & 1) if self.ebytes == 4 else 0
                        for lv in self.mem_levels]

    # --- addresses ----------------------------------------------------------------------------
    def index(self, level: int, gva: int | None = None) -> int:
        gva = self.gva if gva is None else gva
        if self.mode == P.MODE_PAE and level == 3:
            return (gva >> 30) & 3
        return (gva >> (12 + self.ibits * (level - 1))) & ((1 << self.ibits) - 1)

    def table_gpa(self, level: int) -> int:
        return (self.tables[level] << 12) + self.gpa_offset

    def entry_gpa(self, level: int) -> int:
        return self.table_gpa(level) + self.index(level) * self.ebytes

    def entry_hpa(self, level: int) -> int:
        return (self.tables[level] << 12) + self.index(level) * self.ebytes

    def link(self, level: int, flags: int = UPPER) -> int:
        """An entry at `level` that references the table of level - 1."""
        if self.mode == P.MODE_PAE and level == 3:
            flags = PDPTE_PRESENT
        return self.table_gpa(level - 1) | flags

    # --- entries ------------------------------------------------------------------------------
    def set(self, level: int, value: int) -> None:
        if self.mode == P.MODE_PAE and level == 3:
            self.regs[W.R_PDPTR + self.index(3)] = value - (1 << 64) if value >> 63 else value
        hpa = self.entry_hpa(level)
        table = self.mem.table(hpa >> 12)
        i = (hpa & 0xFFF) >> 3
        if self.ebytes == 4:
            sh = 32 * ((hpa >> 2) & 1)
            table[i] = np.uint64((int(table[i]) & ~(0xFFFFFFFF << sh)) | ((value & 0xFFFFFFFF) << sh))
        else:
            table[i] = np.uint64(value)

    def get(self, level: int) -> int:
        if self.mode == P.MODE_PAE and level == 3:
            return int(self.regs[W.R_PDPTR + self.index(3)]) & ((1 << 64) - 1)
        hpa = self.entry_hpa(level)
        word = int(self.mem.table(hpa >> 12)[(hpa & 0xFFF) >> 3])
        return (word >> (32 * ((hpa >> 2) & 1))) & 0xFFFFFFFF if self.ebytes == 4 else word

    def store(self, values: Sequence[int]) -> None:
        """Write the entries of `mem_levels` (top first) in one go."""
        if self.ebytes == 8:
            self.mem.pt[self._rows, self._cols] = np.array(values, dtype=np.uint64)
            return
        words = self.mem.pt[self._rows, self._cols].tolist()
        new = [(w & ~(0xFFFFFFFF << sh)) | (v << sh)
               for w, v, sh in zip(words, values, self._shifts, strict=True)]
        self.mem.pt[self._rows, self._cols] = np.array(new, dtype=np.uint64)

    def load(self) -> list[int]:
        words = self.mem.pt[self._rows, self._cols].tolist()
        if self.ebytes == 8:
            return words
        return [(w >> sh) & 0xFFFFFFFF for w, sh in zip(words, self._shifts, strict=True)]

    def all_entries(self) -> dict[int, int]:
        return {lv: self.get(lv) for lv in range(self.levels, 0, -1)}

    # --- walking ------------------------------------------------------------------------------
    def walk(self, flags: int = 0, access: int = EC.ACC_READ, pkru: int = 0, *, gva: int | None = None,
             ept: Ept | None = None, set_ad: bool = True) -> np.ndarray:
        self.regs[W.R_FLAGS] = flags
        self.regs[W.R_PKRU] = pkru
        gva = self.gva if gva is None else gva
        xl, root, levels = (W.XL_EPT, ept.root, ept.levels) if ept is not None else (W.XL_NONE, 0, 0)
        W.walk(self.mem.pt, self.mem.pt_slot, self.regs, gva, access, set_ad, xl, root, levels,
               W.EMPTY_MS, W.EMPTY_HVA, self.out)
        return self.out

    def result(self) -> tuple[int, int]:
        return int(self.out[W.OUT_STATUS]), int(self.out[W.OUT_CODE])


class Ept:
    """EPT tables rooted at `root`; upper entries are created RWX unless told otherwise."""

    def __init__(self, mem: HostMemory, levels: int = 4) -> None:
        self.mem = mem
        self.levels = levels
        self.root = mem.alloc(Purpose.MMU_PT)
        mem.table(self.root)

    @staticmethod
    def index(gpa: int, level: int) -> int:
        return (gpa >> (12 + 9 * (level - 1))) & 511

    def _locate(self, gpa: int, level: int, create: bool, upper: int = E.EPT_RWX) -> tuple[int, int]:
        """(table pfn, index) of the entry at `level` on gpa's path."""
        pfn = self.root
        for lv in range(self.levels, level, -1):
            t = self.mem.table(pfn)
            i = self.index(gpa, lv)
            if int(t[i]) & E.EPT_RWX == 0:
                assert create, f"no EPT table at level {lv - 1} for {gpa:#x}"
                child = self.mem.alloc(Purpose.MMU_PT)
                self.mem.table(child)
                t[i] = np.uint64((child << 12) | upper)
            pfn = (int(t[i]) & 0x000F_FFFF_FFFF_F000) >> 12
        return pfn, self.index(gpa, level)

    def map(self, gpa: int, hpa: int, *, level: int = 1, perm: int = E.EPT_RWX,
            memtype: int = E.EPT_MT_WB, upper: int = E.EPT_RWX, extra: int = 0) -> None:
        """Map the 4K/2M/1G page of gpa (level 1/2/3) to the page of hpa."""
        size = 1 << (12 + 9 * (level - 1))
        pfn, i = self._locate(gpa, level, True, upper)
        value = (hpa & ~(size - 1)) | perm | (memtype << E.EPT_MT_SHIFT) | extra
        if level > 1:
            value |= E.EPT_LARGE
        self.mem.table(pfn)[i] = np.uint64(value)

    def get(self, gpa: int, level: int) -> int:
        pfn, i = self._locate(gpa, level, False)
        return int(self.mem.table(pfn)[i])

    def set(self, gpa: int, level: int, value: int) -> None:
        pfn, i = self._locate(gpa, level, False)
        self.mem.table(pfn)[i] = np.uint64(value)

    def path(self, gpa: int) -> list[int]:
        """The EPT entries used to translate gpa, top level first, down to the leaf."""
        out = []
        for lv in range(self.levels, 0, -1):
            e = self.get(gpa, lv)
            out.append(e)
            if lv == 1 or e & E.EPT_LARGE:
                break
        return out

    def snapshot(self) -> np.ndarray:
        return self.mem.pt.copy()
