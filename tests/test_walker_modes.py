"""Walker details beyond the access matrix: large pages, reserved bits, PAE, paging off, EPT."""

from __future__ import annotations

import numpy as np
import pytest
from walker_util import GVA, MAXPHY, Path

from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.host.memory import HostMemory, Purpose
from mmu_core.hw import walker as W

RW = P.PT_PRESENT | P.PT_WRITABLE
PF_RSVD = EC.PFERR_PRESENT | EC.PFERR_RSVD


def test_2m_leaf_composes_the_address_from_bits_20_0_of_the_linear_address():
    path = Path(P.MODE_4LEVEL)
    path.set(2, 0x4000_0000 | RW | P.PT_PAGE_SIZE)
    out = path.walk(0, EC.ACC_READ)
    assert (out[W.OUT_STATUS], out[W.OUT_LEVEL]) == (W.W_OK, 2)
    assert out[W.OUT_ADDR] == 0x4000_0000 | (GVA & 0x1F_FFFF)


def test_1g_leaf_composes_the_address_from_bits_29_0():
    path = Path(P.MODE_4LEVEL)
    path.set(3, 0x80_0000_0000 | RW | P.PT_PAGE_SIZE)
    out = path.walk(0, EC.ACC_WRITE)
    assert (out[W.OUT_STATUS], out[W.OUT_LEVEL]) == (W.W_OK, 3)
    assert out[W.OUT_ADDR] == 0x80_0000_0000 | (GVA & 0x3FFF_FFFF)
    assert path.get(3) & P.PT_DIRTY


@pytest.mark.parametrize("level, bit", [(2, 13), (2, 20), (3, 13), (3, 29)])
def test_reserved_low_address_bits_of_large_leaves(level, bit):
    path = Path(P.MODE_4LEVEL)
    path.set(level, 0x80_0000_0000 | RW | P.PT_PAGE_SIZE | (1 << bit))
    out = path.walk(W.F_USER, EC.ACC_WRITE)
    assert out[W.OUT_STATUS] == W.W_PF
    assert out[W.OUT_CODE] == PF_RSVD | EC.PFERR_WRITE | EC.PFERR_USER


@pytest.mark.parametrize("mode", [P.MODE_4LEVEL, P.MODE_5LEVEL])
def test_ps_is_reserved_in_the_top_levels(mode):
    path = Path(mode)
    top = int(P.MODE_LEVELS[mode])
    for level in range(4, top + 1):
        path.set(level, (path.tables[level - 1] << 12) | RW | P.PT_USER | P.PT_PAGE_SIZE)
        out = path.walk(0, EC.ACC_READ)
        assert (out[W.OUT_STATUS], out[W.OUT_CODE]) == (W.W_PF, PF_RSVD)
        path.set(level, (path.tables[level - 1] << 12) | RW | P.PT_USER)


@pytest.mark.parametrize("maxphy", [36, 40, 46, 52])
def test_address_bits_at_or_above_maxphyaddr_are_reserved(maxphy):
    path = Path(P.MODE_4LEVEL)
    path.regs[W.R_MAXPHY] = maxphy
    path.set(2, path.pde_to_pt(RW | P.PT_USER))
    path.set(1, 0x5000 | RW)
    assert path.walk(0, EC.ACC_READ)[W.OUT_STATUS] == W.W_OK
    if maxphy < 52:
        path.set(1, 0x5000 | RW | (1 << maxphy))
        out = path.walk(0, EC.ACC_READ)
        assert (out[W.OUT_STATUS], out[W.OUT_CODE]) == (W.W_PF, PF_RSVD)
        path.set(1, 0x5000 | RW | (1 << (maxphy - 1)))
        assert path.walk(0, EC.ACC_READ)[W.OUT_STATUS] == W.W_OK


def test_32bit_4m_page_with_pse36_high_address_bits():
    path = Path(P.MODE_32)
    # PA bits 39:32 live in PDE bits 20:13
    path.set(2, 0x0040_0000 | (0x3 << 13) | RW | P.PT_PAGE_SIZE)
    out = path.walk(W.F_PSE, EC.ACC_READ)
    assert out[W.OUT_STATUS] == W.W_OK
    assert out[W.OUT_ADDR] == (0x3 << 32) | 0x0040_0000 | (GVA & 0x3F_FFFF)


def test_32bit_4m_page_bit_21_and_bits_beyond_maxphyaddr_are_reserved():
    path = Path(P.MODE_32)
    path.set(2, 0x0040_0000 | (1 << 21) | RW | P.PT_PAGE_SIZE)
    assert path.walk(W.F_PSE, EC.ACC_READ)[W.OUT_CODE] == PF_RSVD
    path.regs[W.R_MAXPHY] = 36  # PA bits 39:36 (PDE bits 20:17) reserved
    path.set(2, 0x0040_0000 | (1 << 17) | RW | P.PT_PAGE_SIZE)
    assert path.walk(W.F_PSE, EC.ACC_READ)[W.OUT_CODE] == PF_RSVD
    path.set(2, 0x0040_0000 | (1 << 16) | RW | P.PT_PAGE_SIZE)
    assert path.walk(W.F_PSE, EC.ACC_READ)[W.OUT_STATUS] == W.W_OK


def test_32bit_ps_is_ignored_without_cr4_pse():
    path = Path(P.MODE_32)
    path.set(2, path.pde_to_pt(RW | P.PT_PAGE_SIZE))
    path.set(1, 0x7000 | RW)
    out = path.walk(0, EC.ACC_READ)
    assert (out[W.OUT_STATUS], out[W.OUT_LEVEL], out[W.OUT_ADDR]) == (W.W_OK, 1, 0x7000 | (GVA & 0xFFF))


def test_pae_pdpte_not_present_and_reserved():
    path = Path(P.MODE_PAE)
    idx = W.R_PDPTR + ((GVA >> 30) & 3)
    good = int(path.regs[idx])
    path.regs[idx] = 0
    assert tuple(path.walk(0, EC.ACC_READ)[[W.OUT_STATUS, W.OUT_CODE]]) == (W.W_PF, 0)
    for bit in (1, 2, 5, 8, MAXPHY):
        path.regs[idx] = good | (1 << bit)
        assert tuple(path.walk(0, EC.ACC_READ)[[W.OUT_STATUS, W.OUT_CODE]]) == (W.W_PF, PF_RSVD)


def test_paging_off_is_identity_truncated_to_32_bits():
    path = Path(P.MODE_NONE)
    path.walk(W.F_USER, EC.ACC_FETCH)
    out = path.out
    W.walk(path.mem.pt, path.mem.pt_slot, path.regs, (1 << 40) | GVA, EC.ACC_FETCH, True,
           W.XL_NONE, 0, 0, W.EMPTY_MS, W.EMPTY_HVA, out)
    assert out[W.OUT_STATUS] == W.W_OK
    assert out[W.OUT_ADDR] == GVA


def test_protection_keys_do_not_apply_to_supervisor_pages_or_fetches():
    path = Path(P.MODE_4LEVEL)
    path.set(2, path.pde_to_pt(RW | P.PT_USER))
    path.set(1, 0x5000 | RW | (1 << P.PT_PKEY_SHIFT))  # supervisor page, key 1
    flags = W.F_PKE | W.F_WP
    assert path.walk(flags, EC.ACC_WRITE, pkru=0b1100)[W.OUT_STATUS] == W.W_OK
    path.set(1, 0x5000 | RW | P.PT_USER | (1 << P.PT_PKEY_SHIFT))
    assert path.walk(flags, EC.ACC_FETCH, pkru=0b1100)[W.OUT_STATUS] == W.W_OK
    out = path.walk(flags, EC.ACC_READ, pkru=0b0100)
    assert (out[W.OUT_STATUS], out[W.OUT_CODE]) == (W.W_PF, EC.PFERR_PRESENT | EC.PFERR_PK)


# --- EPT: the 2-D walk ------------------------------------------------------------------------
class Ept:
    """An identity EPT over the first 4 GiB with 4K leaves built on demand."""

    def __init__(self, mem: HostMemory) -> None:
        self.mem = mem
        self.root = mem.alloc(Purpose.MMU_PT)
        mem.table(self.root)

    def _table(self, pfn: int, idx: int) -> int:
        t = self.mem.table(pfn)
        if not int(t[idx]) & E.EPT_RWX:
            child = self.mem.alloc(Purpose.MMU_PT)
            self.mem.table(child)
            t[idx] = np.uint64((child << 12) | E.EPT_RWX)
        return (int(t[idx]) & 0x000F_FFFF_FFFF_F000) >> 12

    def map(self, gpa: int, hpa: int, perm: int = E.EPT_RWX, memtype: int = E.EPT_MT_WB) -> None:
        t = self.root
        for level in (4, 3, 2):
            t = self._table(t, (gpa >> (12 + 9 * (level - 1))) & 511)
        self.mem.table(t)[(gpa >> 12) & 511] = np.uint64(hpa | perm | (memtype << 3))

    def leaf(self, gpa: int) -> int:
        t = self.root
        for level in (4, 3, 2):
            t = (int(self.mem.table(t)[(gpa >> (12 + 9 * (level - 1))) & 511]) >> 12) & ((1 << 40) - 1)
        return int(self.mem.table(t)[(gpa >> 12) & 511])


def two_d(data_perm=E.EPT_RWX, table_perm=E.EPT_RWX, unmapped=None):
    path = Path(P.MODE_4LEVEL)
    path.set(2, path.pde_to_pt(RW | P.PT_USER))
    path.set(1, 0x9000 | RW | P.PT_USER)
    ept = Ept(path.mem)
    for lv, pfn in path.tables.items():
        if unmapped != lv:
            ept.map(pfn << 12, pfn << 12, table_perm)
    ept.map(0x9000, 0x20_0000, data_perm)
    return path, ept


def walk2d(path, ept, acc):
    W.walk(path.mem.pt, path.mem.pt_slot, path.regs, GVA, acc, True, W.XL_EPT, ept.root, 4,
           W.EMPTY_MS, W.EMPTY_HVA, path.out)
    return path.out


def test_2d_walk_translates_tables_and_final_address_and_sets_ept_ad():
    path, ept = two_d()
    out = walk2d(path, ept, EC.ACC_WRITE)
    assert out[W.OUT_STATUS] == W.W_OK
    assert out[W.OUT_HPA] == 0x20_0000 | (GVA & 0xFFF)
    assert ept.leaf(0x9000) & (E.EPT_ACCESSED | E.EPT_DIRTY) == E.EPT_ACCESSED | E.EPT_DIRTY


def test_ept_violation_on_a_guest_table_access():
    path, ept = two_d(unmapped=2)
    out = walk2d(path, ept, EC.ACC_READ)
    assert out[W.OUT_STATUS] == W.W_EPT_VIOLATION
    assert out[W.OUT_ADDR] == path.entry_hpa(2)
    assert out[W.OUT_CODE] == E.EPT_QUAL_READ | E.EPT_QUAL_GLA_VALID  # bit 8 clear, perms 0


def test_ept_violation_on_the_final_address_reports_access_and_permissions():
    path, ept = two_d(data_perm=E.EPT_READ | E.EPT_EXEC)
    out = walk2d(path, ept, EC.ACC_WRITE)
    assert out[W.OUT_STATUS] == W.W_EPT_VIOLATION
    assert out[W.OUT_ADDR] == 0x9000 | (GVA & 0xFFF)
    assert out[W.OUT_CODE] == (E.EPT_QUAL_WRITE | E.EPT_QUAL_READABLE | E.EPT_QUAL_EXECUTABLE
                               | E.EPT_QUAL_GLA_VALID | E.EPT_QUAL_GLA_FINAL)


def test_write_protected_guest_table_blocks_the_a_bit_update_and_sets_nothing():
    path, ept = two_d(table_perm=E.EPT_READ | E.EPT_EXEC)
    out = walk2d(path, ept, EC.ACC_READ)
    assert out[W.OUT_STATUS] == W.W_EPT_VIOLATION
    assert out[W.OUT_CODE] & (E.EPT_QUAL_WRITE | E.EPT_QUAL_GLA_FINAL) == E.EPT_QUAL_WRITE
    assert not any(path.get(lv) & P.PT_ACCESSED for lv in path.tables)


@pytest.mark.parametrize("perm, memtype", [(E.EPT_WRITE, 6), (E.EPT_WRITE | E.EPT_EXEC, 6),
                                           (E.EPT_RWX, 2), (E.EPT_RWX, 3), (E.EPT_RWX, 7)])
def test_ept_misconfigurations(perm, memtype):
    path, ept = two_d()
    ept.map(0x9000, 0x20_0000, perm, memtype)
    out = walk2d(path, ept, EC.ACC_READ)
    assert (out[W.OUT_STATUS], out[W.OUT_ADDR]) == (W.W_EPT_MISCONFIG, 0x9000 | (GVA & 0xFFF))
