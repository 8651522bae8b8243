"""Build a guest page-table path in host memory for walker tests (gpa == hpa)."""

from __future__ import annotations

import numpy as np

from mmu_core.arch.x86 import paging as P
from mmu_core.host.memory import HostMemory, Purpose
from mmu_core.hw import walker as W

GVA = 0x4020_1000  # PML4 0, PDPT 1, PD 1, PT 1 (32-bit: PD 0x100, PT 0x201)
DATA_GPA = 0x1234_5000
LARGE_GPA = 0x8000_0000  # 4 MiB aligned
MAXPHY = 46
UPPER = P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER


class Path:
    """Tables from the root to the PT for GVA, with setters for the PDE and the PTE."""

    def __init__(self, mode: int) -> None:
        self.mode = mode
        self.mem = HostMemory()
        self.ebytes = int(P.MODE_ENTRY_BYTES[mode])
        levels = int(P.MODE_LEVELS[mode])
        self.regs = W.new_regs()
        self.regs[W.R_MODE] = mode
        self.regs[W.R_MAXPHY] = MAXPHY
        self.tables = {lv: self.mem.alloc(Purpose.MMU_PT) for lv in range(1, levels + 1)}
        for pfn in self.tables.values():
            self.mem.table(pfn)
        top = levels
        if mode == P.MODE_PAE:
            self.regs[W.R_CR3] = self.tables[3] << 12
            self.regs[W.R_PDPTR + ((GVA >> 30) & 3)] = (self.tables[2] << 12) | P.PT_PRESENT
            top = 2
        elif top:
            self.regs[W.R_CR3] = self.tables[top] << 12
        for lv in range(top, 2, -1):
            self.set(lv, (self.tables[lv - 1] << 12) | UPPER)
        self.out = W.new_out()

    def entry_hpa(self, level: int) -> int:
        bits = int(P.MODE_INDEX_BITS[self.mode])
        idx = (GVA >> (12 + bits * (level - 1))) & ((1 << bits) - 1)
        return (self.tables[level] << 12) + idx * self.ebytes

    def set(self, level: int, value: int) -> None:
        hpa = self.entry_hpa(level)
        table = self.mem.table(hpa >> 12)
        i = (hpa & 0xFFF) >> 3
        if self.ebytes == 4:
            sh = 32 * ((hpa >> 2) & 1)
            table[i] = np.uint64((int(table[i]) & ~(0xFFFFFFFF << sh)) | ((value & 0xFFFFFFFF) << sh))
        else:
            table[i] = np.uint64(value)

    def get(self, level: int) -> int:
        hpa = self.entry_hpa(level)
        word = int(self.mem.table(hpa >> 12)[(hpa & 0xFFF) >> 3])
        return (word >> (32 * ((hpa >> 2) & 1))) & 0xFFFFFFFF if self.ebytes == 4 else word

    def pde_to_pt(self, flags: int) -> int:
        return (self.tables[1] << 12) | flags

    def walk(self, flags: int, access: int, pkru: int = 0) -> np.ndarray:
        self.regs[W.R_FLAGS] = flags
        self.regs[W.R_PKRU] = pkru
        W.walk(self.mem.pt, self.mem.pt_slot, self.regs, GVA, access, True, W.XL_NONE, 0, 0,
               W.EMPTY_MS, W.EMPTY_HVA, self.out)
        return self.out
