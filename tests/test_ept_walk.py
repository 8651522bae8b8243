"""The 2-D walk (XL_EPT): guest tables and the final address translated through EPT.

Expected values follow SDM vol. 3C 29.3 (EPT translation, misconfigurations, violations and the
exit qualification of table 28-7) with the model's chosen semantics: guest table reads are EPT
reads, guest A/D updates are EPT writes, and A/D bits (guest and EPT) change only when the whole
access succeeds. The guest sees its tables at hpa + TABLE_GPA_OFFSET, so a walker that forgot to
translate a table address would read the wrong page.
"""

from __future__ import annotations

import numpy as np
import pytest
from walker_util import MODE_NAME, UPPER, Ept, Guest

from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.host.memory import NO_SLOT, HostMemory
from mmu_core.hw import walker as W

R, WR, X = E.EPT_READ, E.EPT_WRITE, E.EPT_EXEC
RWX = E.EPT_RWX
READ, WRITE, FETCH = EC.ACC_READ, EC.ACC_WRITE, EC.ACC_FETCH
QUAL_ACCESS = {READ: E.EPT_QUAL_READ, WRITE: E.EPT_QUAL_WRITE, FETCH: E.EPT_QUAL_FETCH}
GLA_VALID, GLA_FINAL = E.EPT_QUAL_GLA_VALID, E.EPT_QUAL_GLA_FINAL

GVA = 0x4035_6789  # 4-level: PML4 0, PDPT 1, PD 1, PT 0x156, offset 0x789
TABLE_GPA_OFFSET = 0x10_0000_0000  # 1G-aligned: guest table gpa = its hpa + this
TABLE_GPA_OFFSET_32 = 0x8000_0000  # 32-bit and PAE paging: CR3 holds a 32-bit address
DATA_GPA = 0x2_3456_7000  # EPT PML4 0, PDPT 8 (the tables use PDPT 64), PD 0x1A2, PT 0x167
FINAL_GPA = DATA_GPA | 0x789
DATA_HPA = {1: 0x9_8765_4000, 2: 0x9_8760_0000, 3: 0x9_4000_0000}  # per EPT leaf level
# FINAL_GPA through a 4K leaf: 0x9_8765_4789; 2M leaf: base | (FINAL_GPA & 0x1F_FFFF) =
# 0x9_8760_0000 | 0x16_7789; 1G leaf: base | (FINAL_GPA & 0x3FFF_FFFF) = 0x9_4000_0000 | 0x3456_7789
FINAL_HPA = {1: 0x9_8765_4789, 2: 0x9_8776_7789, 3: 0x9_7456_7789}


class World:
    """A guest path for GVA -> FINAL_GPA and an EPT mapping its tables and its data page."""

    def __init__(self, mode=P.MODE_4LEVEL, *, table_leaf=1, data_leaf=1, table_perm=RWX,
                 data_perm=RWX, ept_levels=4, pte=DATA_GPA | UPPER, map_pdpt=True):
        self.mem = HostMemory()
        offset = TABLE_GPA_OFFSET_32 if mode in (P.MODE_32, P.MODE_PAE) else TABLE_GPA_OFFSET
        self.g = Guest(mode, gva=GVA, gpa_offset=offset, mem=self.mem)
        if self.g.levels:
            self.g.set(1, pte)
        self.ept = Ept(self.mem, ept_levels)
        assert all(pfn < 512 for pfn in self.g.tables.values())  # all within hpa [0, 2M)
        if table_leaf == 1:
            for lv, pfn in self.g.tables.items():
                if map_pdpt or not (mode == P.MODE_PAE and lv == 3):
                    self.ept.map(self.g.table_gpa(lv), pfn << 12, perm=table_perm)
        else:  # one large EPT leaf maps gpa TABLE_GPA_OFFSET.. onto hpa 0..
            self.ept.map(offset, 0, level=table_leaf, perm=table_perm)
        self.data_leaf = data_leaf
        self.ept.map(DATA_GPA, DATA_HPA[data_leaf], level=data_leaf, perm=data_perm)

    def walk(self, access=READ, flags=0, gva=GVA):
        out = self.g.walk(flags, access, gva=gva, ept=self.ept)
        return int(out[W.OUT_STATUS]), int(out[W.OUT_ADDR]), int(out[W.OUT_CODE])

    def snapshot(self) -> np.ndarray:
        return self.mem.pt.copy()

    def changes_since(self, before: np.ndarray) -> list[str]:
        """Every table entry that changed, as 'pfn[idx]: old -> new'."""
        slot_pfn = {int(s): pfn for pfn, s in enumerate(self.mem.pt_slot) if s != NO_SLOT}
        rows, cols = np.nonzero(self.mem.pt != before)
        return [f"pfn {slot_pfn[int(r)]}[{int(c)}]: {int(before[r, c]):#x} -> {int(self.mem.pt[r, c]):#x}"
                for r, c in zip(rows, cols, strict=True)]


def qual(access, perms, final):
    return QUAL_ACCESS[access] | (perms << 3) | GLA_VALID | (GLA_FINAL if final else 0)


# --- success ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("table_leaf", [1, 2, 3], ids=["tables-4k", "tables-2m", "tables-1g"])
@pytest.mark.parametrize("data_leaf", [1, 2, 3], ids=["data-4k", "data-2m", "data-1g"])
def test_2d_walk_translates_the_tables_and_the_final_address_through_ept(table_leaf, data_leaf):
    w = World(table_leaf=table_leaf, data_leaf=data_leaf)
    assert w.walk(WRITE, W.F_USER) == (W.W_OK, FINAL_GPA, 0)
    assert int(w.g.out[W.OUT_HPA]) == FINAL_HPA[data_leaf]
    assert int(w.g.out[W.OUT_LEVEL]) == 1
    after = w.g.all_entries()
    assert after[1] == DATA_GPA | UPPER | P.PT_ACCESSED | P.PT_DIRTY
    for lv in (4, 3, 2):
        assert after[lv] == w.g.link(lv) | P.PT_ACCESSED


def test_2d_walk_through_a_5_level_ept():
    w = World(ept_levels=5)
    assert w.walk(READ) == (W.W_OK, FINAL_GPA, 0)
    assert int(w.g.out[W.OUT_HPA]) == FINAL_HPA[1]


@pytest.mark.parametrize("mode", [P.MODE_32, P.MODE_PAE, P.MODE_5LEVEL],
                         ids=[MODE_NAME[m] for m in (P.MODE_32, P.MODE_PAE, P.MODE_5LEVEL)])
def test_2d_walk_in_other_guest_paging_modes(mode):
    pte = (DATA_GPA & 0xFFFF_FFFF | UPPER) if mode == P.MODE_32 else DATA_GPA | UPPER
    w = World(mode, pte=pte)
    if mode == P.MODE_32:
        w.ept.map(DATA_GPA & 0xFFFF_FFFF, 0x5_0000_0000)
        assert w.walk(READ) == (W.W_OK, 0x3456_7789, 0)
        assert int(w.g.out[W.OUT_HPA]) == 0x5_0000_0789
    else:
        assert w.walk(READ) == (W.W_OK, FINAL_GPA, 0)
        assert int(w.g.out[W.OUT_HPA]) == FINAL_HPA[1]


def test_pae_pdptes_are_not_read_through_ept_during_a_walk():
    w = World(P.MODE_PAE, map_pdpt=False)  # the PDPT page has no EPT mapping
    assert w.walk(READ) == (W.W_OK, FINAL_GPA, 0)


def test_paging_off_translates_the_truncated_linear_address_through_ept():
    w = World(P.MODE_NONE)
    w.ept.map(0x3456_7000, 0x7_7777_7000)
    assert w.walk(WRITE, gva=0x1_3456_7789) == (W.W_OK, 0x3456_7789, 0)
    assert int(w.g.out[W.OUT_HPA]) == 0x7_7777_7789


def test_paging_off_ept_violation_reports_a_final_access():
    w = World(P.MODE_NONE)
    assert w.walk(FETCH, gva=0x3456_7789) == (W.W_EPT_VIOLATION, 0x3456_7789, qual(FETCH, 0, True))


def test_a_guest_page_fault_wins_over_an_ept_violation_on_the_final_address():
    w = World(pte=DATA_GPA | P.PT_PRESENT | P.PT_WRITABLE, data_perm=0)  # supervisor page
    assert w.walk(READ, W.F_USER)[0] == W.W_PF
    assert int(w.g.out[W.OUT_CODE]) == EC.PFERR_PRESENT | EC.PFERR_USER


# --- EPT violations -------------------------------------------------------------------------------
@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_ept_violation_on_a_guest_table_read_has_bit_8_clear(level):
    w = World()
    w.ept.set(w.g.table_gpa(level), 1, 0)  # that table's page: not present in EPT
    before = w.snapshot()
    assert w.walk(WRITE, W.F_USER) == (W.W_EPT_VIOLATION, w.g.entry_gpa(level), qual(READ, 0, False))
    assert w.changes_since(before) == []


def test_ept_violation_on_a_guest_table_read_through_a_not_present_upper_ept_entry():
    w = World()
    w.ept.set(TABLE_GPA_OFFSET, 3, 0)  # the EPT PDPTE covering every guest table
    assert w.walk(READ) == (W.W_EPT_VIOLATION, w.g.entry_gpa(4), qual(READ, 0, False))


def test_ept_violation_on_an_execute_only_guest_table_reports_its_permissions():
    w = World(table_perm=X)
    assert w.walk(FETCH) == (W.W_EPT_VIOLATION, w.g.entry_gpa(4), qual(READ, X, False))


@pytest.mark.parametrize("access, leaf_perm, upper_perm, perms", [
    (READ, 0, RWX, 0),
    (WRITE, 0, RWX, 0),
    (FETCH, 0, RWX, 0),
    (WRITE, R, RWX, R),
    (WRITE, R | X, RWX, R | X),
    (FETCH, R | WR, RWX, R | WR),
    (READ, X, RWX, X),  # execute-only
    (WRITE, RWX, R | X, R | X),  # permissions are the AND over every EPT level
    (FETCH, RWX, R | WR, R | WR),
    (READ, RWX, X, X),
], ids=lambda v: str(v))
def test_ept_violation_on_the_final_address_reports_access_and_permissions(access, leaf_perm, upper_perm,
                                                                           perms):
    w = World(data_perm=leaf_perm)
    pde = w.ept.get(DATA_GPA, 2)  # the EPT PDE is only used by the data page
    w.ept.set(DATA_GPA, 2, (pde & ~RWX) | upper_perm)
    before = w.snapshot()
    assert w.walk(access, W.F_NXE) == (W.W_EPT_VIOLATION, FINAL_GPA, qual(access, perms, True))
    assert w.changes_since(before) == []


def test_ept_violation_on_the_final_address_through_a_not_present_upper_ept_entry():
    w = World()
    w.ept.set(DATA_GPA, 3, 0)
    assert w.walk(WRITE) == (W.W_EPT_VIOLATION, FINAL_GPA, qual(WRITE, 0, True))


@pytest.mark.parametrize("access, perm", [(READ, R), (WRITE, R | WR), (FETCH, X), (READ, X | R)])
def test_final_address_access_allowed_by_its_ept_permission(access, perm):
    w = World(data_perm=perm)
    assert w.walk(access, W.F_NXE) == (W.W_OK, FINAL_GPA, 0)


def test_an_ept_table_beyond_host_memory_reads_as_not_present():
    w = World()
    far = 1 << 45  # a page-table address far beyond the host's frames
    assert far >> 12 >= len(w.mem.pt_slot)
    w.ept.set(DATA_GPA, 2, far | RWX)  # the EPT PDE of the data page names it
    assert w.walk(READ) == (W.W_EPT_VIOLATION, FINAL_GPA, qual(READ, 0, True))


# --- A/D updates of guest entries are EPT writes ------------------------------------------------------
@pytest.mark.parametrize("protected", [4, 1], ids=["pml4-page", "pt-page"])
def test_a_bit_update_of_a_write_protected_guest_table_is_an_ept_write_violation(protected):
    w = World()
    gpa = w.g.table_gpa(protected)
    w.ept.set(gpa, 1, (w.ept.get(gpa, 1) & ~RWX) | R | X)
    assert w.walk(READ) == (W.W_EPT_VIOLATION, w.g.entry_gpa(protected), qual(WRITE, R | X, False))


def test_a_guest_table_ept_violation_on_an_a_bit_update_sets_no_a_d_bits_when_the_first_table_is_protected():
    w = World(table_perm=R | X)  # every table read-only: the very first update (PML4E) fails
    assert w.walk(READ)[0] == W.W_EPT_VIOLATION
    guest_changes = [lv for lv, v in w.g.all_entries().items() if v & P.PT_ACCESSED]
    assert guest_changes == []


def test_no_guest_a_bits_are_set_when_a_lower_tables_a_bit_update_faults():
    w = World()
    gpa = w.g.table_gpa(1)
    w.ept.set(gpa, 1, (w.ept.get(gpa, 1) & ~RWX) | R | X)  # only the PT page is read-only
    assert w.walk(READ) == (W.W_EPT_VIOLATION, w.g.entry_gpa(1), qual(WRITE, R | X, False))
    assert {lv: bool(v & P.PT_ACCESSED) for lv, v in w.g.all_entries().items()} == {
        4: False, 3: False, 2: False, 1: False}


@pytest.mark.parametrize("access", [READ, WRITE], ids=["read", "write"])
def test_no_ept_a_d_bits_are_set_when_a_guest_a_bit_update_faults(access):
    w = World(table_perm=R | X)
    before = w.snapshot()
    assert w.walk(access)[0] == W.W_EPT_VIOLATION
    assert w.changes_since(before) == []


def test_read_only_ept_mappings_of_guest_tables_suffice_when_no_a_d_update_is_needed():
    a = P.PT_ACCESSED
    w = World(table_perm=R | X, pte=DATA_GPA | UPPER | a | P.PT_DIRTY)
    for lv in (4, 3, 2):
        w.g.set(lv, w.g.link(lv) | a)
    assert w.walk(WRITE) == (W.W_OK, FINAL_GPA, 0)


def test_d_bit_update_of_a_write_protected_pt_is_an_ept_write_violation():
    a = P.PT_ACCESSED
    w = World(table_perm=R | X, pte=DATA_GPA | UPPER | a)  # A set, D clear
    for lv in (4, 3, 2):
        w.g.set(lv, w.g.link(lv) | a)
    assert w.walk(READ) == (W.W_OK, FINAL_GPA, 0)
    assert w.walk(WRITE) == (W.W_EPT_VIOLATION, w.g.entry_gpa(1), qual(WRITE, R | X, False))
    assert not w.g.get(1) & P.PT_DIRTY


# --- misconfigurations --------------------------------------------------------------------------------
@pytest.mark.parametrize("data_leaf", [1, 2, 3], ids=["4k", "2m", "1g"])
@pytest.mark.parametrize("perm, memtype", [
    (WR, E.EPT_MT_WB), (WR | X, E.EPT_MT_WB), (RWX, 2), (RWX, 3), (RWX, 7)],
    ids=["rwx-010", "rwx-110", "memtype-2", "memtype-3", "memtype-7"])
def test_ept_misconfiguration_on_the_final_address(data_leaf, perm, memtype):
    w = World(data_leaf=data_leaf)
    w.ept.map(DATA_GPA, DATA_HPA[data_leaf], level=data_leaf, perm=perm, memtype=memtype)
    before = w.snapshot()
    assert w.walk(READ)[:2] == (W.W_EPT_MISCONFIG, FINAL_GPA)
    assert w.changes_since(before) == []


@pytest.mark.parametrize("memtype", [0, 1, 4, 5, 6])
def test_valid_ept_memory_types_are_not_misconfigurations(memtype):
    w = World()
    w.ept.map(DATA_GPA, DATA_HPA[1], memtype=memtype)
    assert w.walk(READ) == (W.W_OK, FINAL_GPA, 0)


@pytest.mark.parametrize("level", [4, 3, 2])
@pytest.mark.parametrize("perm", [WR, WR | X], ids=["rwx-010", "rwx-110"])
def test_write_only_upper_ept_entry_is_a_misconfiguration(level, perm):
    w = World()
    e = w.ept.get(DATA_GPA, level)
    w.ept.set(DATA_GPA, level, (e & ~RWX) | perm)
    # the EPT PML4E also maps the guest tables, so the first table read meets it
    expected_gpa = w.g.entry_gpa(4) if level == 4 else FINAL_GPA
    assert w.walk(READ)[:2] == (W.W_EPT_MISCONFIG, expected_gpa)


def test_bit_7_in_an_ept_pml4e_is_a_misconfiguration():
    w = World()
    w.ept.set(DATA_GPA, 4, w.ept.get(DATA_GPA, 4) | E.EPT_LARGE)
    assert w.walk(READ)[:2] == (W.W_EPT_MISCONFIG, w.g.entry_gpa(4))  # the tables share that PML4E


@pytest.mark.parametrize("level", [4, 1])
def test_ept_misconfiguration_on_a_guest_table_access(level):
    w = World()
    gpa = w.g.table_gpa(level)
    w.ept.map(gpa, w.g.tables[level] << 12, memtype=7)
    before = w.snapshot()
    assert w.walk(READ)[:2] == (W.W_EPT_MISCONFIG, w.g.entry_gpa(level))
    assert w.changes_since(before) == []


# --- EPT A/D bits -------------------------------------------------------------------------------------
@pytest.mark.parametrize("data_leaf", [1, 2, 3], ids=["4k", "2m", "1g"])
@pytest.mark.parametrize("access", [READ, WRITE, FETCH], ids=["read", "write", "fetch"])
def test_ept_a_bits_on_the_data_path_and_d_on_its_leaf_for_a_write(data_leaf, access):
    w = World(data_leaf=data_leaf)
    assert w.walk(access)[0] == W.W_OK
    path = w.ept.path(DATA_GPA)
    assert len(path) == 5 - data_leaf
    assert [bool(e & E.EPT_ACCESSED) for e in path] == [True] * len(path)
    dirty = [bool(e & E.EPT_DIRTY) for e in path]
    assert dirty == [False] * (len(path) - 1) + [access == WRITE]


@pytest.mark.parametrize("table_leaf", [1, 2], ids=["tables-4k", "tables-2m"])
def test_guest_a_bit_updates_set_ept_a_and_d_on_the_tables_ept_leaves(table_leaf):
    w = World(table_leaf=table_leaf)
    assert w.walk(READ)[0] == W.W_OK
    for lv in (4, 3, 2, 1):
        path = w.ept.path(w.g.table_gpa(lv))
        assert all(e & E.EPT_ACCESSED for e in path), lv
        assert path[-1] & E.EPT_DIRTY, lv


def test_ept_bits_are_untouched_when_set_ad_is_false():
    w = World()
    before = w.snapshot()
    w.g.walk(0, WRITE, ept=w.ept, set_ad=False)
    assert int(w.g.out[W.OUT_STATUS]) == W.W_OK
    assert w.changes_since(before) == []


def test_ept_a_bits_are_set_for_guest_table_reads_that_need_no_guest_a_d_update():
    """SDM 29.3.5 (28.2.4 in older editions): every EPT entry used to translate a guest-physical
    address gets its A bit, the translations of guest table addresses included. (With EPT A/D
    the SDM also treats those reads as writes and sets the table page's D; the model keeps them
    reads, a documented choice in hw/walker.py, so that dirty logs stay comparable.)"""
    a = P.PT_ACCESSED
    w = World(pte=DATA_GPA | UPPER | a)
    for lv in (4, 3, 2):
        w.g.set(lv, w.g.link(lv) | a)
    assert w.walk(READ)[0] == W.W_OK
    for lv in (4, 3, 2, 1):
        path = w.ept.path(w.g.table_gpa(lv))
        assert all(e & E.EPT_ACCESSED for e in path), lv
        assert not path[-1] & E.EPT_DIRTY, lv  # the model's choice: a read of a table
