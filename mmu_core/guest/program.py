"""vCPU programs: sequences of guest operations, as numpy rows the jitted CPU loop executes."""

from __future__ import annotations

import numpy as np

from mmu_core.arch.x86 import paging as P
from mmu_core.hw import cpu as C


class Program:
    """Builder of one vCPU's operation list."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, gva: int) -> Program:
        self.rows.append((C.OP_READ, gva, 0))
        return self

    def write(self, gva: int, value: int) -> Program:
        self.rows.append((C.OP_WRITE, gva, value))
        return self

    def fetch(self, gva: int) -> Program:
        self.rows.append((C.OP_FETCH, gva, 0))
        return self

    def store_pte(self, entry_gva: int, value: int, entry_bytes: int = 8) -> Program:
        """The guest writes a paging-structure entry through its own mapping of it."""
        self.rows.append((C.OP_WPTE if entry_bytes == 8 else C.OP_WPTE32, entry_gva, value))
        return self

    def load_pte(self, entry_gva: int) -> Program:
        self.rows.append((C.OP_RPTE, entry_gva, 0))
        return self

    def invlpg(self, gva: int) -> Program:
        self.rows.append((C.OP_INVLPG, gva, 0))
        return self

    def mov_cr3(self, cr3: int, noflush: bool = False) -> Program:
        """MOV to CR3; with CR4.PCIDE=1, cr3[11:0] is the PCID and `noflush` sets bit 63
        (the new PCID's TLB entries are kept)."""
        self.rows.append((C.OP_MOV_CR3, 0, cr3 | (P.CR3_PCID_NOFLUSH if noflush else 0)))
        return self

    def invpcid(self, kind: int, pcid: int = 0, gva: int = 0) -> Program:
        """INVPCID of type `kind` (0 individual address `gva`, 1 single context, 2 all
        contexts with globals, 3 all contexts but globals) with descriptor PCID `pcid`."""
        self.rows.append((C.OP_INVPCID, gva, (kind << C.INVPCID_TYPE_SHIFT) | pcid))
        return self

    def mov_cr0(self, cr0: int) -> Program:
        self.rows.append((C.OP_MOV_CR0, 0, cr0))
        return self

    def mov_cr4(self, cr4: int) -> Program:
        self.rows.append((C.OP_MOV_CR4, 0, cr4))
        return self

    def set_cpl(self, cpl: int) -> Program:
        self.rows.append((C.OP_SET_CPL, 0, cpl))
        return self

    def set_ac(self, ac: bool) -> Program:
        self.rows.append((C.OP_SET_AC, 0, int(ac)))
        return self

    def wrpkru(self, pkru: int) -> Program:
        self.rows.append((C.OP_WRPKRU, 0, pkru))
        return self

    def pause(self, ns: int) -> Program:
        """Compute for ns of virtual time without touching memory (spreads a vCPU's
        accesses over time, as real guest code between them does)."""
        self.rows.append((C.OP_PAUSE, 0, ns))
        return self

    def smi(self) -> Program:
        """A system-management interrupt (delivered at this point of the program): the vCPU
        saves its state in SMRAM and runs in SMM, paging off, in address space 1; one that
        arrives in SMM is latched until RSM."""
        self.rows.append((C.OP_SMI, 0, 0))
        return self

    def rsm(self) -> Program:
        """RSM: leave SMM, restoring the state saved in SMRAM (#UD outside SMM)."""
        self.rows.append((C.OP_RSM, 0, 0))
        return self

    def build(self) -> np.ndarray:
        return C.new_program(self.rows)


def new_results(prog: np.ndarray) -> np.ndarray:
    return np.zeros((len(prog), C.RES_COLS), dtype=np.int64)
