"""Walker details beyond the access matrix, one behaviour per test, expected values from the SDM.

Large leaves and address composition, 32-bit PSE/PSE-36, reserved bits (one rule per test, SDM
4.3-4.5), MAXPHYADDR, the PAE PDPTE registers, paging off, protection keys (SDM 4.6.2), and
where A/D updates land. All 1-D walks (XL_NONE: table addresses are host-physical).
"""

from __future__ import annotations

import numpy as np
import pytest
from walker_util import MODE_NAME, UPPER, Guest

from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.hw import walker as W

PF_P, PF_W, PF_U, PF_RSVD, PF_ID, PF_PK = (EC.PFERR_PRESENT, EC.PFERR_WRITE, EC.PFERR_USER,
                                           EC.PFERR_RSVD, EC.PFERR_FETCH, EC.PFERR_PK)
RW = P.PT_PRESENT | P.PT_WRITABLE
URW = UPPER
PS = P.PT_PAGE_SIZE
PAT_LARGE = P.PT_PAT_LARGE  # bit 12 of a large leaf: PAT, not an address bit
READ, WRITE, FETCH = EC.ACC_READ, EC.ACC_WRITE, EC.ACC_FETCH
GVA2 = 0x4035_6789  # PD index 1 (PAE/4/5-level), offset in a 2M page 0x15_6789, in a 1G page
#                     0x0035_6789; 32-bit: PD index 0x100, offset in a 4M page 0x35_6789
DATA = 0x7000

LONG_MODES = [P.MODE_4LEVEL, P.MODE_5LEVEL]
PAE_AND_LONG = [P.MODE_PAE, P.MODE_4LEVEL, P.MODE_5LEVEL]


def ids(modes):
    return [MODE_NAME[m] for m in modes]


def walk(g: Guest, flags=0, access=READ, pkru=0):
    out = g.walk(flags, access, pkru)
    return int(out[W.OUT_STATUS]), int(out[W.OUT_CODE])


def ok_addr(g: Guest, flags=0, access=READ, pkru=0):
    """(status, level, gpa) of a walk."""
    out = g.walk(flags, access, pkru)
    return int(out[W.OUT_STATUS]), int(out[W.OUT_LEVEL]), int(out[W.OUT_ADDR])


def guest_4k(mode, *, gva=GVA2, maxphy=46, pte=DATA | URW, pde_flags=URW):
    g = Guest(mode, gva=gva, maxphy=maxphy)
    g.set(2, g.link(2, pde_flags))
    g.set(1, pte)
    return g


# --- large leaves and address composition -----------------------------------------------------
@pytest.mark.parametrize("mode", PAE_AND_LONG, ids=ids(PAE_AND_LONG))
def test_2m_leaf_maps_linear_bits_20_0_onto_bits_m1_21_of_the_pde(mode):
    g = Guest(mode, gva=GVA2)
    g.set(2, 0x3F_C000_0000 | PAT_LARGE | RW | PS)
    assert ok_addr(g) == (W.W_OK, 2, 0x3F_C015_6789)


@pytest.mark.parametrize("mode", LONG_MODES, ids=ids(LONG_MODES))
def test_1g_leaf_maps_linear_bits_29_0_onto_bits_m1_30_of_the_pdpte(mode):
    g = Guest(mode, gva=GVA2)
    g.set(3, 0x3F_8000_0000 | PAT_LARGE | RW | PS)
    assert ok_addr(g) == (W.W_OK, 3, 0x3F_8035_6789)


@pytest.mark.parametrize("mode", LONG_MODES, ids=ids(LONG_MODES))
def test_write_through_a_1g_leaf_sets_a_on_the_path_and_d_on_the_leaf_only(mode):
    g = Guest(mode, gva=GVA2)
    g.set(3, 0x3F_8000_0000 | RW | PS)
    g.set(2, 0x5555_5000 | RW)  # below the leaf: not used, must stay untouched
    before = g.all_entries()
    assert ok_addr(g, access=WRITE)[0] == W.W_OK
    after = g.all_entries()
    for lv in range(g.levels, 3, -1):
        assert after[lv] == before[lv] | P.PT_ACCESSED
    assert after[3] == before[3] | P.PT_ACCESSED | P.PT_DIRTY
    assert (after[2], after[1]) == (before[2], before[1])


def test_4k_pte_bit_7_is_pat_not_a_page_size_bit():
    g = guest_4k(P.MODE_4LEVEL, pte=DATA | URW | (1 << 7))
    assert ok_addr(g) == (W.W_OK, 1, DATA | 0x789)


def test_32bit_4m_page_composes_pse36_address_bits_39_32_from_pde_bits_20_13():
    g = Guest(P.MODE_32, gva=GVA2, maxphy=40)
    g.set(2, 0xFFC0_0000 | (0xAB << 13) | RW | PS)
    assert ok_addr(g, W.F_PSE) == (W.W_OK, 2, 0xAB_FFF5_6789)


def test_32bit_4m_page_with_maxphyaddr_36_uses_pde_bits_16_13():
    g = Guest(P.MODE_32, gva=GVA2, maxphy=36)
    g.set(2, 0x0040_0000 | (0xF << 13) | RW | PS)
    assert ok_addr(g, W.F_PSE) == (W.W_OK, 2, 0xF_0075_6789)


def test_32bit_ps_is_ignored_without_cr4_pse():
    g = guest_4k(P.MODE_32, pde_flags=URW | PS)
    assert ok_addr(g, 0) == (W.W_OK, 1, DATA | 0x789)


def test_pae_2m_pages_do_not_need_cr4_pse():
    g = Guest(P.MODE_PAE, gva=GVA2)
    g.set(2, 0x4000_0000 | RW | PS)
    assert ok_addr(g, 0) == (W.W_OK, 2, 0x4015_6789)


def test_32bit_4k_walk_composes_the_address_from_pte_bits_31_12():
    g = guest_4k(P.MODE_32, pte=0xFFFF_F000 | URW)
    assert ok_addr(g, W.F_PSE) == (W.W_OK, 1, 0xFFFF_F789)


# --- reserved bits: one rule per test -------------------------------------------------------------
# (flags, access, error code bits besides P|RSVD): the W/U/I-D bits follow the access (SDM 4.7)
ACCESS_KINDS = [
    pytest.param(0, READ, 0, id="supervisor-read"),
    pytest.param(W.F_USER, WRITE, PF_W | PF_U, id="user-write"),
    pytest.param(W.F_SMEP, FETCH, PF_ID, id="supervisor-fetch-smep"),
]
ACCESS_KINDS_NXE = [  # NXE=1: fetches report I/D in PAE/4-level/5-level paging
    pytest.param(W.F_NXE, READ, 0, id="supervisor-read"),
    pytest.param(W.F_NXE | W.F_USER, WRITE, PF_W | PF_U, id="user-write"),
    pytest.param(W.F_NXE | W.F_USER, FETCH, PF_U | PF_ID, id="user-fetch-nxe"),
]


@pytest.mark.parametrize("flags, access, extra", ACCESS_KINDS_NXE)
@pytest.mark.parametrize("mode, level", [(P.MODE_4LEVEL, lv) for lv in (4, 3, 2, 1)]
                         + [(P.MODE_5LEVEL, lv) for lv in (5, 4, 3, 2, 1)])
@pytest.mark.parametrize("bit", ["M", 51])
def test_address_bits_51_to_maxphyaddr_are_reserved_at_every_level(mode, level, bit, flags, access, extra):
    g = guest_4k(mode, maxphy=40)
    g.set(level, g.get(level) | (1 << (40 if bit == "M" else bit)))
    assert walk(g, flags, access) == (W.W_PF, PF_P | PF_RSVD | extra)


@pytest.mark.parametrize("flags, access, extra", ACCESS_KINDS)
@pytest.mark.parametrize("mode, level", [(P.MODE_PAE, 2), (P.MODE_PAE, 1)]
                         + [(P.MODE_4LEVEL, lv) for lv in (4, 3, 2, 1)] + [(P.MODE_5LEVEL, 5)])
def test_xd_is_reserved_while_efer_nxe_is_0(mode, level, flags, access, extra):
    g = guest_4k(mode)
    g.set(level, g.get(level) | P.PT_NX)
    assert walk(g, flags, access) == (W.W_PF, PF_P | PF_RSVD | extra)
    assert walk(g, flags | W.F_NXE, READ)[0] == W.W_OK  # with NXE=1 it is XD, a permission


@pytest.mark.parametrize("flags, access, extra", ACCESS_KINDS_NXE)
@pytest.mark.parametrize("mode, level", [(P.MODE_4LEVEL, 4), (P.MODE_5LEVEL, 5), (P.MODE_5LEVEL, 4)])
def test_ps_is_reserved_in_pml4es_and_pml5es(mode, level, flags, access, extra):
    g = guest_4k(mode)
    g.set(level, g.get(level) | PS)
    assert walk(g, flags, access) == (W.W_PF, PF_P | PF_RSVD | extra)


@pytest.mark.parametrize("flags, access, extra", ACCESS_KINDS_NXE)
@pytest.mark.parametrize("mode", PAE_AND_LONG, ids=ids(PAE_AND_LONG))
@pytest.mark.parametrize("bit", [13, 16, 20])
def test_bits_20_13_of_a_2m_leaf_are_reserved(mode, bit, flags, access, extra):
    g = Guest(mode, gva=GVA2)
    g.set(2, 0x4000_0000 | URW | PS | (1 << bit))
    assert walk(g, flags, access) == (W.W_PF, PF_P | PF_RSVD | extra)


@pytest.mark.parametrize("flags, access, extra", ACCESS_KINDS_NXE)
@pytest.mark.parametrize("mode", LONG_MODES, ids=ids(LONG_MODES))
@pytest.mark.parametrize("bit", [13, 20, 21, 29])
def test_bits_29_13_of_a_1g_leaf_are_reserved(mode, bit, flags, access, extra):
    g = Guest(mode, gva=GVA2)
    g.set(3, 0x3F_8000_0000 | URW | PS | (1 << bit))
    assert walk(g, flags, access) == (W.W_PF, PF_P | PF_RSVD | extra)


@pytest.mark.parametrize("flags, access, extra", ACCESS_KINDS)
def test_32bit_4m_pde_bit_21_is_reserved(flags, access, extra):
    g = Guest(P.MODE_32, gva=GVA2, maxphy=40)
    g.set(2, 0x0040_0000 | (1 << 21) | URW | PS)
    assert walk(g, flags | W.F_PSE, access) == (W.W_PF, PF_P | PF_RSVD | extra)


@pytest.mark.parametrize("maxphy, reserved_bits", [
    (32, range(13, 21)),  # no PA bits above 31: all of 20:13 reserved
    (36, range(17, 21)),  # PA bits 35:32 in PDE bits 16:13
    (39, range(20, 21)),
    (40, range(0)),  # PSE-36 reaches PA bit 39 at most
    (46, range(0)),
])
def test_32bit_4m_pde_pse36_bits_at_or_above_maxphyaddr_are_reserved(maxphy, reserved_bits):
    g = Guest(P.MODE_32, gva=GVA2, maxphy=maxphy)
    for bit in range(13, 21):
        g.set(2, 0x0040_0000 | (1 << bit) | URW | PS)
        if bit in reserved_bits:
            assert walk(g, W.F_PSE | W.F_USER, WRITE) == (W.W_PF, PF_P | PF_RSVD | PF_W | PF_U), bit
        else:
            assert ok_addr(g, W.F_PSE) == (W.W_OK, 2, (1 << (bit - 13 + 32)) | 0x0075_6789), bit


def test_32bit_ptes_have_no_reserved_bits():
    # every low bit set (PAT, G, ignored bits 11:9): still maps its page
    g = guest_4k(P.MODE_32, pte=DATA | 0xFFF)
    assert ok_addr(g, 0) == (W.W_OK, 1, DATA | 0x789)


@pytest.mark.parametrize("flags, access, extra", ACCESS_KINDS)
@pytest.mark.parametrize("level", [2, 1])
def test_pae_pde_and_pte_address_bits_51_to_maxphyaddr_are_reserved(level, flags, access, extra):
    g = guest_4k(P.MODE_PAE, maxphy=40)
    for bit in (40, 51):
        g.set(level, g.get(level) | (1 << bit))
        assert walk(g, flags, access) == (W.W_PF, PF_P | PF_RSVD | extra), bit


@pytest.mark.parametrize("level, bit", [(2, 52), (2, 58), (2, 62), (1, 52), (1, 62)])
def test_pae_bits_62_52_are_reserved(level, bit):
    # SDM tables 4-9..4-11: PAE PDEs and PTEs reserve 62:MAXPHYADDR (4-level ignores 62:52)
    g = guest_4k(P.MODE_PAE)
    g.set(level, g.get(level) | (1 << bit))
    assert walk(g, W.F_USER, WRITE) == (W.W_PF, PF_P | PF_RSVD | PF_W | PF_U)


def test_pae_2m_leaf_bits_62_52_are_reserved():
    g = Guest(P.MODE_PAE, gva=GVA2)
    g.set(2, 0x3F_C000_0000 | URW | PS | (1 << 55))
    assert walk(g, W.F_USER) == (W.W_PF, PF_P | PF_RSVD | PF_U)


# --- PAE PDPTE registers: loaded (or refused) by MOV CR3, never checked again -----------------
PDPTE = 0x0012_3000 | P.PT_PRESENT


@pytest.mark.parametrize("bit", [1, 2, 5, 6, 7, 8, 40, 51, 52, 62, 63])
def test_a_present_pdpte_with_a_reserved_bit_cannot_be_loaded(bit):
    # SDM 4.4.1, table 4-8: bits 2:1, 8:5 and 63:MAXPHYADDR; MOV CR3 raises #GP(0)
    assert W.pdpte_reserved(PDPTE | (1 << bit), maxphy=40)


@pytest.mark.parametrize("bits", [0, P.PT_PWT | P.PT_PCD, 0x7 << 9, 1 << 39],
                         ids=["plain", "pwt-pcd", "ignored-11-9", "address-bit-39"])
def test_a_pdpte_without_reserved_bits_loads(bits):
    assert not W.pdpte_reserved(PDPTE | bits, maxphy=40)


def test_a_not_present_pdpte_loads_whatever_its_other_bits():
    assert not W.pdpte_reserved(((1 << 64) - 1) & ~P.PT_PRESENT, maxphy=40)


@pytest.mark.parametrize("flags, access, extra", ACCESS_KINDS)
def test_a_not_present_pdpte_faults_when_used(flags, access, extra):
    g = guest_4k(P.MODE_PAE)
    g.set(3, g.get(3) & ~P.PT_PRESENT)
    assert walk(g, flags, access) == (W.W_PF, extra)


def test_pae_pdpte_ignored_bits_11_9_do_not_fault():
    g = guest_4k(P.MODE_PAE)
    g.set(3, g.get(3) | (0x7 << 9))
    assert ok_addr(g) == (W.W_OK, 1, DATA | 0x789)


@pytest.mark.parametrize("mode", PAE_AND_LONG, ids=ids(PAE_AND_LONG))
def test_reserved_bits_of_a_not_present_entry_are_ignored(mode):
    g = guest_4k(mode, maxphy=40)
    g.set(1, (DATA | URW | (1 << 40) | P.PT_NX) & ~P.PT_PRESENT)
    assert walk(g, W.F_USER, WRITE) == (W.W_PF, PF_W | PF_U)


@pytest.mark.parametrize("mode", LONG_MODES, ids=ids(LONG_MODES))
def test_a_reserved_bit_fault_is_reported_even_when_an_upper_level_forbids_the_access(mode):
    g = guest_4k(mode, maxphy=40, pde_flags=P.PT_PRESENT)  # supervisor, read-only PDE
    g.set(1, DATA | URW | (1 << 45))
    assert walk(g, W.F_USER, WRITE) == (W.W_PF, PF_P | PF_RSVD | PF_W | PF_U)


def test_4level_bits_62_52_are_ignored_without_pke():
    g = guest_4k(P.MODE_4LEVEL, pte=DATA | URW | (0x7FF << 52))
    for lv in (4, 3, 2):
        g.set(lv, g.get(lv) | (0x7FF << 52))
    assert ok_addr(g, W.F_USER | W.F_NXE, WRITE) == (W.W_OK, 1, DATA | 0x789)


# --- MAXPHYADDR ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", PAE_AND_LONG, ids=ids(PAE_AND_LONG))
@pytest.mark.parametrize("maxphy", [36, 39, 46, 52])
def test_maxphyaddr_bounds_the_address_field(mode, maxphy):
    top = 1 << (maxphy - 1)
    g = guest_4k(mode, maxphy=maxphy, pte=top | DATA | URW)
    assert ok_addr(g) == (W.W_OK, 1, top | DATA | 0x789)
    g.set(2, top | 0x4000_0000 | URW | PS)  # a 2M leaf with the top address bit
    assert ok_addr(g) == (W.W_OK, 2, top | 0x4015_6789)
    if maxphy < 52:
        g.set(2, (1 << maxphy) | 0x4000_0000 | URW | PS)
        assert walk(g) == (W.W_PF, PF_P | PF_RSVD)


# --- PAE PDPTE registers ---------------------------------------------------------------------------
@pytest.mark.parametrize("flags, access, code", [
    (0, READ, 0), (W.F_USER, WRITE, PF_W | PF_U), (W.F_NXE, FETCH, PF_ID), (0, FETCH, 0)])
def test_pae_not_present_pdpte_faults_with_p_clear(flags, access, code):
    g = guest_4k(P.MODE_PAE)
    g.set(3, g.get(3) & ~P.PT_PRESENT | (1 << 1))  # reserved bits do not matter when P=0
    assert walk(g, flags, access) == (W.W_PF, code)


def test_pae_pdptes_come_from_the_registers_not_from_the_pdpt_in_memory():
    g = guest_4k(P.MODE_PAE)
    hpa = g.entry_hpa(3)
    g.mem.write_u64(hpa, 0)  # the PDPT page changed after the (modelled) MOV to CR3
    assert ok_addr(g) == (W.W_OK, 1, DATA | 0x789)
    g.mem.write_u64(hpa, g.get(3))
    g.regs[W.R_PDPTR + g.index(3)] = 0
    assert walk(g) == (W.W_PF, 0)


def test_pae_pdpte_neither_restricts_access_nor_gets_an_a_bit():
    g = guest_4k(P.MODE_PAE)
    pdpte = g.get(3)
    assert pdpte & (P.PT_WRITABLE | P.PT_USER) == 0
    assert ok_addr(g, W.F_USER | W.F_WP, WRITE) == (W.W_OK, 1, DATA | 0x789)
    assert g.get(3) == pdpte
    assert g.mem.read_u64(g.entry_hpa(3)) == pdpte
    assert g.get(2) & P.PT_ACCESSED and g.get(1) & P.PT_DIRTY


# --- paging off ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, access", [
    (0, READ), (W.F_USER | W.F_WP, WRITE), (W.F_USER | W.F_NXE | W.F_SMEP, FETCH),
    (W.F_SMAP | W.F_SMEP | W.F_WP | W.F_PKE, WRITE)])
def test_paging_off_maps_the_linear_address_to_itself_truncated_to_32_bits(flags, access):
    g = Guest(P.MODE_NONE)
    snapshot = g.mem.pt.copy()
    out = g.walk(flags, access, pkru=0xFFFF_FFFF, gva=0x1_8765_4321)
    assert (int(out[W.OUT_STATUS]), int(out[W.OUT_ADDR]), int(out[W.OUT_HPA])) == (
        W.W_OK, 0x8765_4321, 0x8765_4321)
    assert (g.mem.pt == snapshot).all()


# --- protection keys -------------------------------------------------------------------------------
def pk_guest(mode=P.MODE_4LEVEL, key=1, pte_flags=URW, pde_flags=URW):
    return guest_4k(mode, pte=DATA | pte_flags | (key << P.PT_PKEY_SHIFT), pde_flags=pde_flags)


def ad(key):
    return 1 << (2 * key)


def wd(key):
    return 1 << (2 * key + 1)


@pytest.mark.parametrize("mode", LONG_MODES, ids=ids(LONG_MODES))
@pytest.mark.parametrize("flags, access, code", [
    (W.F_USER, READ, PF_P | PF_U | PF_PK),
    (W.F_USER, WRITE, PF_P | PF_W | PF_U | PF_PK),
    (0, READ, PF_P | PF_PK),  # supervisor access to a user-mode address
    (W.F_WP, WRITE, PF_P | PF_W | PF_PK),
    (0, WRITE, PF_P | PF_W | PF_PK),
])
def test_pkru_ad_blocks_data_accesses_to_user_pages(mode, flags, access, code):
    g = pk_guest(mode, key=1)
    assert walk(g, flags | W.F_PKE, access, pkru=ad(1)) == (W.W_PF, code)


@pytest.mark.parametrize("wp", [0, W.F_WP])
def test_pkru_wd_blocks_user_writes_whatever_cr0_wp(wp):
    g = pk_guest(key=2)
    assert walk(g, W.F_PKE | W.F_USER | wp, WRITE, pkru=wd(2)) == (W.W_PF, PF_P | PF_W | PF_U | PF_PK)
    assert walk(g, W.F_PKE | W.F_USER | wp, READ, pkru=wd(2))[0] == W.W_OK


def test_pkru_wd_blocks_supervisor_writes_only_with_cr0_wp():
    g = pk_guest(key=3)
    assert walk(g, W.F_PKE, WRITE, pkru=wd(3))[0] == W.W_OK
    assert walk(g, W.F_PKE | W.F_WP, WRITE, pkru=wd(3)) == (W.W_PF, PF_P | PF_W | PF_PK)


@pytest.mark.parametrize("flags", [W.F_USER, 0])
def test_protection_keys_do_not_apply_to_instruction_fetches(flags):
    g = pk_guest(key=1)
    assert walk(g, flags | W.F_PKE | W.F_NXE | W.F_WP, FETCH, pkru=ad(1) | wd(1))[0] == W.W_OK


@pytest.mark.parametrize("pte_flags, pde_flags", [(RW, URW), (URW, RW)], ids=["pte-U0", "pde-U0"])
def test_protection_keys_do_not_apply_to_supervisor_pages(pte_flags, pde_flags):
    g = pk_guest(key=1, pte_flags=pte_flags, pde_flags=pde_flags)
    assert walk(g, W.F_PKE | W.F_WP, WRITE, pkru=ad(1) | wd(1))[0] == W.W_OK
    assert walk(g, W.F_PKE, READ, pkru=ad(1))[0] == W.W_OK


def test_protection_keys_are_ignored_with_cr4_pke_clear():
    g = pk_guest(key=1)
    assert walk(g, W.F_USER | W.F_WP, WRITE, pkru=0xFFFF_FFFF)[0] == W.W_OK


def test_the_key_indexes_its_own_pkru_bits():
    g = pk_guest(key=5)
    others = 0xFFFF_FFFF & ~(ad(5) | wd(5))
    assert walk(g, W.F_PKE | W.F_USER, WRITE, pkru=others)[0] == W.W_OK
    assert walk(g, W.F_PKE | W.F_USER, READ, pkru=ad(5)) == (W.W_PF, PF_P | PF_U | PF_PK)
    g = pk_guest(key=15)
    assert walk(g, W.F_PKE | W.F_USER, WRITE, pkru=wd(15)) == (W.W_PF, PF_P | PF_W | PF_U | PF_PK)
    assert walk(g, W.F_PKE | W.F_USER, WRITE, pkru=0x3FFF_FFFF)[0] == W.W_OK


@pytest.mark.parametrize("mode", LONG_MODES, ids=ids(LONG_MODES))
@pytest.mark.parametrize("level", [2, 3])
def test_the_key_of_a_large_leaf_comes_from_that_leaf(mode, level):
    g = Guest(mode, gva=GVA2)
    g.set(level, 0x3F_8000_0000 | URW | PS | (4 << P.PT_PKEY_SHIFT))
    assert walk(g, W.F_PKE | W.F_USER, READ, pkru=ad(4)) == (W.W_PF, PF_P | PF_U | PF_PK)
    assert walk(g, W.F_PKE | W.F_USER, READ, pkru=ad(0))[0] == W.W_OK


def test_a_key_violation_and_a_permission_violation_report_both():
    g = pk_guest(key=1, pte_flags=P.PT_PRESENT | P.PT_USER)  # read-only user page
    assert walk(g, W.F_PKE | W.F_USER, WRITE, pkru=wd(1)) == (W.W_PF, PF_P | PF_W | PF_U | PF_PK)
    assert walk(g, W.F_PKE | W.F_USER, WRITE, pkru=0) == (W.W_PF, PF_P | PF_W | PF_U)


def test_pae_has_no_protection_keys():
    g = guest_4k(P.MODE_PAE)
    assert walk(g, W.F_PKE | W.F_USER | W.F_WP, WRITE, pkru=0xFFFF_FFFF)[0] == W.W_OK


# --- where A/D updates land -----------------------------------------------------------------------
def test_32bit_a_d_updates_touch_only_their_half_of_a_packed_word():
    g = guest_4k(P.MODE_32, pte=DATA | URW)
    # the PTE (index 0x356, even: low half) and the PDE (index 0x100, even: low half); put
    # neighbours in the high halves with A/D clear
    pt, pd = g.tables[1], g.tables[2]
    neighbour_pte = 0xABCD_E000 | URW
    neighbour_pde = 0x1234_5000 | URW
    g.mem.table(pt)[0x356 >> 1] |= np.uint64(neighbour_pte << 32)
    g.mem.table(pd)[0x100 >> 1] |= np.uint64(neighbour_pde << 32)
    assert ok_addr(g, W.F_USER, WRITE) == (W.W_OK, 1, DATA | 0x789)
    assert g.get(1) == DATA | URW | P.PT_ACCESSED | P.PT_DIRTY
    assert g.get(2) == g.link(2) | P.PT_ACCESSED
    assert int(g.mem.table(pt)[0x356 >> 1]) >> 32 == neighbour_pte
    assert int(g.mem.table(pd)[0x100 >> 1]) >> 32 == neighbour_pde


def test_32bit_a_d_updates_of_an_odd_entry_land_in_the_high_half():
    g = Guest(P.MODE_32, gva=0x4020_1234)  # PT index 0x201: high half
    g.set(1, DATA | URW)
    word = 0x201 >> 1
    low = 0xABCD_E000 | URW
    g.mem.table(g.tables[1])[word] |= np.uint64(low)
    assert ok_addr(g, W.F_USER, WRITE)[0] == W.W_OK
    assert int(g.mem.table(g.tables[1])[word]) == ((DATA | URW | P.PT_ACCESSED | P.PT_DIRTY) << 32) | low


@pytest.mark.parametrize("mode", PAE_AND_LONG, ids=ids(PAE_AND_LONG))
def test_a_read_sets_a_on_every_level_and_no_d(mode):
    g = guest_4k(mode)
    before = g.all_entries()
    assert ok_addr(g)[0] == W.W_OK
    after = g.all_entries()
    for lv in g.mem_levels:
        assert after[lv] == before[lv] | P.PT_ACCESSED, lv


def test_set_ad_false_leaves_the_tables_untouched():
    g = guest_4k(P.MODE_4LEVEL)
    before = g.all_entries()
    assert g.walk(W.F_USER, WRITE, set_ad=False)[W.OUT_STATUS] == W.W_OK
    assert g.all_entries() == before


# --- MOV CR3 / CR0 / CR4 refuse a PDPTE with a reserved bit: #GP(0), nothing loaded -----------
def test_loading_a_reserved_pdpte_raises_gp_and_keeps_the_old_registers():
    """SDM 4.4.1: MOV to CR3 in PAE mode, or a MOV to CR0/CR4 that reloads the PDPTEs, raises
    #GP(0) when a present PDPTE has a reserved bit set, and loads none of the four; accesses
    go on through the registers loaded before, never to a page fault. Same on every
    configuration (the vCPU's CR-write path does it, not a backend)."""
    from mmu_core.guest.program import Program
    from mmu_core.testing.programs import data_gva, run_everywhere, spec_for

    def program(machine):
        pts, setup = machine.pts, machine.paging
        pdpte_gva = pts.pt_gva_of(pts.entry_gpa(data_gva(1), 3, create=False))
        good = pts.read_entry(pts.entry_gpa(data_gva(1), 3, create=False))
        bad = good | (1 << 5)  # bits 8:5 are reserved in a PDPTE
        return [Program().write(data_gva(1), 7)
                .store_pte(pdpte_gva, bad)
                .mov_cr3(setup.cr3)  # 2: #GP(0)
                .read(data_gva(1))  # 3: through the PDPTEs loaded before
                .mov_cr0(setup.cr0 ^ P.CR0_WP)  # 4: reloads the PDPTEs: #GP(0)
                .mov_cr4(setup.cr4 | P.CR4_SMEP)  # 5: the same
                .store_pte(pdpte_gva, good)
                .mov_cr3(setup.cr3)  # 7: loads
                .read(data_gva(1))
                .build()]

    runs = run_everywhere(spec_for(P.MODE_PAE), program)
    assert len({digest for digest, _ in runs.values()}) == 1, runs.keys()
    res = runs["tdp"][1][0]
    gp = (0, EC.GP_VECTOR, 0)
    assert [tuple(int(v) for v in res[i]) for i in (2, 4, 5)] == [gp, gp, gp]
    assert not res[[0, 1, 3, 6, 7, 8], 1].any()  # no other op faulted
    assert int(res[3, 0]) == int(res[8, 0]) == 7


# --- table addresses beyond host memory ----------------------------------------------------------
FAR_TABLE = {P.MODE_32: 0xF000_0000, P.MODE_PAE: 1 << 45, P.MODE_4LEVEL: 1 << 45,
             P.MODE_5LEVEL: 1 << 45}  # below MAXPHYADDR (46), far beyond the host's frames


@pytest.mark.parametrize("mode", list(FAR_TABLE), ids=ids(list(FAR_TABLE)))
def test_a_table_beyond_host_memory_reads_as_not_present(mode):
    g = guest_4k(mode)
    assert FAR_TABLE[mode] >> 12 >= len(g.mem.pt_slot)
    g.set(2, FAR_TABLE[mode] | URW)  # a PDE naming a page table nobody has
    assert walk(g, W.F_USER, WRITE) == (W.W_PF, PF_W | PF_U)


@pytest.mark.parametrize("mode", list(FAR_TABLE), ids=ids(list(FAR_TABLE)))
def test_a_root_beyond_host_memory_reads_as_not_present(mode):
    g = guest_4k(mode)
    if mode == P.MODE_PAE:
        g.set(3, FAR_TABLE[mode] | P.PT_PRESENT)  # the PDPTE register names the far PD
    else:
        g.regs[W.R_CR3] = FAR_TABLE[mode]
    assert walk(g) == (W.W_PF, 0)
