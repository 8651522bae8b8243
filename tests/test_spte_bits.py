"""KVM's SPTE layout (spte.h / spte.c, Linux 6.x).

Expected values are written out from the documented layout (bit numbers in spte.h, asm/vmx.h
and the SDM), never computed with the helpers under test.
"""

import itertools

import numpy as np
import pytest
from numba import njit

from mmu_core.arch.x86 import spte as S

BIT = [1 << i for i in range(64)]
ADDR_51_12 = 0x000F_FFFF_FFFF_F000
GFN_FIELD_45_12 = 0x0000_3FFF_FFFF_F000  # host MAXPHYADDR 46, no L1TF relocation


def disjoint(masks):
    for (na, a), (nb, b) in itertools.combinations(masks.items(), 2):
        assert a & b == 0, f"{na} overlaps {nb}: {a & b:#x}"


# --- constants as documented ----------------------------------------------------------------------
def test_ept_layout_as_kvm_uses_it():
    assert (S.VMX_EPT_READABLE_MASK, S.VMX_EPT_WRITABLE_MASK, S.VMX_EPT_EXECUTABLE_MASK) == (1, 2, 4)
    assert S.VMX_EPT_RWX_MASK == 0b111
    assert (S.VMX_EPT_MT_EPTE_SHIFT, S.VMX_EPT_MT_MASK, S.MTRR_TYPE_WRBACK) == (3, 0x38, 6)
    assert S.VMX_EPT_IPAT_BIT == 0x40
    assert S.PT_PAGE_SIZE_MASK == S.EPT_LARGE_MASK == 0x80
    assert (S.VMX_EPT_ACCESS_BIT, S.VMX_EPT_DIRTY_BIT) == (0x100, 0x200)
    assert S.VMX_EPT_USER_EXECUTABLE_MASK == 0x400
    assert S.VMX_EPT_SUPPRESS_VE_BIT == 0x8000_0000_0000_0000
    assert S.VMX_EPT_MISCONFIG_WX_VALUE == 0b110


def test_address_masks():
    assert S.SPTE_BASE_ADDR_MASK == ADDR_51_12
    assert S.pfn_mask(52) == ADDR_51_12
    assert S.pfn_mask(46) == 0x0000_3FFF_FFFF_F000
    assert S.pfn_mask(39) == 0x0000_007F_FFFF_F000
    assert S.pfn_mask(12) == 0


def test_software_bits_as_documented():
    assert S.SPTE_MMU_PRESENT_MASK == 0x800
    assert (S.EPT_SPTE_HOST_WRITABLE, S.EPT_SPTE_MMU_WRITABLE) == (BIT[57], BIT[58])
    assert (S.SHADOW_SPTE_HOST_WRITABLE, S.SHADOW_SPTE_MMU_WRITABLE) == (0x200, 0x400)
    assert S.SPTE_TDP_AD_SHIFT == 52
    assert S.SPTE_TDP_AD_MASK == BIT[52] | BIT[53]
    assert (S.SPTE_TDP_AD_ENABLED, S.SPTE_TDP_AD_DISABLED, S.SPTE_TDP_AD_WRPROT_ONLY) == \
        (0, BIT[52], BIT[53])
    assert S.SHADOW_ACC_TRACK_SAVED_BITS_SHIFT == 54
    assert S.SHADOW_ACC_TRACK_SAVED_BITS_MASK == 0b101
    assert S.SHADOW_ACC_TRACK_SAVED_MASK == BIT[54] | BIT[56]
    assert (S.ACC_EXEC_MASK, S.ACC_WRITE_MASK, S.ACC_USER_MASK, S.ACC_ALL) == (1, 2, 4, 7)


def test_special_values_are_the_modern_x86_64_ones():
    assert S.SHADOW_NONPRESENT_VALUE == 0x8000_0000_0000_0000
    assert S.FROZEN_SPTE == 0x8000_0000_0000_05A0


def test_mmio_layout_as_documented():
    assert (S.MMIO_SPTE_GEN_LOW_START, S.MMIO_SPTE_GEN_LOW_END) == (3, 10)
    assert (S.MMIO_SPTE_GEN_HIGH_START, S.MMIO_SPTE_GEN_HIGH_END) == (52, 62)
    assert S.MMIO_SPTE_GEN_LOW_MASK == 0x7F8
    assert S.MMIO_SPTE_GEN_HIGH_MASK == 0x7FF0_0000_0000_0000
    assert S.MMIO_SPTE_GEN_MASK == 0x7FFFF  # 19 bits
    assert S.EPT_MMIO_VALUE == 0b110
    assert S.EPT_MMIO_MASK == 0x8000_0000_0000_0007
    assert S.EPT_MMIO_ACCESS_MASK == 0
    assert S.SHADOW_MMIO_VALUE == S.SHADOW_MMIO_MASK == BIT[51] | 1
    assert S.SHADOW_MMIO_ACCESS_MASK == 0b110
    assert S.SPTE_MMIO_ALLOWED_MASK == BIT[63] | ADDR_51_12 | 0b111
    assert S.MMIO_GFN_MASK == (1 << 34) - 1


def test_levels():
    assert (S.PG_LEVEL_4K, S.PG_LEVEL_2M, S.PG_LEVEL_1G) == (1, 2, 3)
    assert (S.PT64_ROOT_4LEVEL, S.PT64_ROOT_5LEVEL, S.SPTE_ENT_PER_PAGE) == (4, 5, 512)
    assert [S.pages_per_level(lv) for lv in (1, 2, 3, 4, 5)] == \
        [1, 512, 262144, 134217728, 68719476736]
    gfn = 0b1_101010101_110011001_111000111  # indices 0x1, 0x155, 0x199, 0x1C7 from the top
    assert [S.spte_index(gfn, lv) for lv in (4, 3, 2, 1)] == [1, 0x155, 0x199, 0x1C7]
    assert S.gfn_round_for_level(0x12345, 1) == 0x12345
    assert S.gfn_round_for_level(0x12345, 2) == 0x12200
    assert S.gfn_round_for_level(0x12345, 3) == 0x00000
    assert S.gfn_round_for_level(0x4_0012_3456, 3) == 0x4_0010_0000


# --- masks that must not collide ------------------------------------------------------------------
def test_ept_present_spte_software_bits_are_disjoint_from_each_other_and_the_hardware_bits():
    disjoint({
        "MMU-present": S.SPTE_MMU_PRESENT_MASK,
        "host-writable": S.EPT_SPTE_HOST_WRITABLE,
        "MMU-writable": S.EPT_SPTE_MMU_WRITABLE,
        "A/D type": S.SPTE_TDP_AD_MASK,
        "acc-track saved": S.SHADOW_ACC_TRACK_SAVED_MASK,
        # hardware fields of an EPT leaf (SDM table 29-6)
        "RWX": 0b111, "memtype": 0x38, "ipat": 0x40, "large": 0x80, "A": 0x100, "D": 0x200,
        "user-exec": 0x400, "address": ADDR_51_12, "suppress-#VE": BIT[63],
    })


def test_x86_spte_software_bits_are_disjoint_from_the_hardware_bits():
    disjoint({
        "MMU-present": S.SPTE_MMU_PRESENT_MASK,
        "host-writable": S.SHADOW_SPTE_HOST_WRITABLE,
        "MMU-writable": S.SHADOW_SPTE_MMU_WRITABLE,
        # P R/W U/S PWT PCD A D PS G, address, protection key, XD (SDM table 4-19)
        "low": 0x1FF, "address": ADDR_51_12, "pkey": 0xF << 59, "XD": BIT[63],
    })


@pytest.mark.parametrize("ept", [True, False])
def test_mmio_spte_fields_are_disjoint(ept):
    disjoint({
        "MMU-present": S.SPTE_MMU_PRESENT_MASK,
        "gen low": 0x7F8,
        "gen high": 0x7FF0_0000_0000_0000,
        "gfn": GFN_FIELD_45_12,
        "mmio mask": S.EPT_MMIO_MASK if ept else S.SHADOW_MMIO_MASK,
        "access": S.EPT_MMIO_ACCESS_MASK if ept else S.SHADOW_MMIO_ACCESS_MASK,
    })
    mask = S.EPT_MMIO_MASK if ept else S.SHADOW_MMIO_MASK
    assert mask & ~S.SPTE_MMIO_ALLOWED_MASK == 0


# --- special values never look present ------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 0x8000_0000_0000_0000, 0x8000_0000_0000_05A0])
def test_empty_and_frozen_sptes_are_neither_present_nor_mmio(value):
    assert not S.is_shadow_present_pte(value)
    assert not S.is_mmio_spte(value, True)
    assert not S.is_mmio_spte(value, False)
    assert value & 0b111 == 0  # no R/W/X: not present to EPT; no P: not present to x86/NPT
    assert value & ADDR_51_12 == 0  # no PFN bits: no L1TF gadget
    assert value & 0x800 == 0


def test_only_the_frozen_value_is_frozen():
    assert S.is_frozen_spte(0x8000_0000_0000_05A0)
    for other in (0, 0x5A0, 0x8000_0000_0000_0000, 0x8000_0000_0000_0DA0):
        assert not S.is_frozen_spte(other)


# --- MMIO SPTEs -----------------------------------------------------------------------------------
GFNS = [0, 1, 0x12345, 0xFEE00, (1 << 34) - 1]
GENS = [0, 1, 0xFF, 0x100, 0x2A5A5, 0x7FFFF]


@pytest.mark.parametrize("ept", [True, False])
@pytest.mark.parametrize("gfn", GFNS)
@pytest.mark.parametrize("gen", GENS)
def test_mmio_spte_round_trips_gfn_generation_and_access(ept, gfn, gen):
    for access in (0, 1, 2, 4, 7):
        spte = S.make_mmio_spte(gfn, access, gen, ept)
        assert S.is_mmio_spte(spte, ept)
        assert not S.is_shadow_present_pte(spte)
        assert not S.is_frozen_spte(spte)
        assert S.get_mmio_spte_gfn(spte) == gfn
        assert S.get_mmio_spte_generation(spte) == gen
        assert S.get_mmio_spte_access(spte, ept) == (0 if ept else access & 0b110)


def test_mmio_spte_bits_exactly():
    gen = 0b101_0101_0101_1010_0101  # high part 0b101_0101_0101, low part 0b1010_0101
    low, high = 0b1010_0101 << 3, 0b101_0101_0101 << 52
    gfn = 0x3_2109_8765
    assert S.make_mmio_spte(gfn, 7, gen, True) == high | (gfn << 12) | low | 0b110
    assert S.make_mmio_spte(gfn, 7, gen, False) == high | BIT[51] | (gfn << 12) | low | 0b111
    assert S.make_mmio_spte(gfn, 1, gen, False) == high | BIT[51] | (gfn << 12) | low | 0b001


def test_ept_mmio_spte_is_a_write_exec_misconfiguration_without_suppress_ve():
    spte = S.make_mmio_spte(5, 7, 0x7FFFF, True)
    assert spte & 0b111 == 0b110
    assert spte & BIT[63] == 0


def test_mmio_generation_and_gfn_are_truncated_to_their_fields():
    spte = S.make_mmio_spte((1 << 40) | 0x77, 0, (1 << 19) | 0x55, True)
    assert S.get_mmio_spte_generation(spte) == 0x55
    assert S.get_mmio_spte_gfn(spte) == 0x77
    assert S.is_mmio_spte(spte, True)


def test_present_sptes_are_not_mmio():
    for spte in (S.make_leaf_spte(0x1234, 1, True, True), S.make_nonleaf_spte(7)):
        assert not S.is_mmio_spte(spte, True)
    assert not S.is_mmio_spte(S.make_shadow_leaf_spte(0x1234, True, True, True), False)


# --- present SPTEs --------------------------------------------------------------------------------
def test_ept_leaf_bits_exactly():
    # MMU-present, SVE, R, WB, A, host-writable + W, D, MMU-writable + X + large page
    base = 0x800 | BIT[63] | 0b001 | (6 << 3) | 0x100 | BIT[57] | (0x1234 << 12)
    assert S.make_leaf_spte(0x1234, 1, False, False) == base
    assert S.make_leaf_spte(0x1234, 2, True, True) == base | 0b110 | 0x200 | BIT[58] | 0x80
    assert S.make_nonleaf_spte(9) == 0x800 | BIT[63] | 0b111 | 0x100 | (9 << 12)


def test_x86_leaf_bits_exactly():
    base = 0x800 | 0b001 | 0x20 | 0x200 | (0x1234 << 12)
    assert S.make_shadow_leaf_spte(0x1234, False, False, False) == base
    assert S.make_shadow_leaf_spte(0x1234, True, True, True) == \
        base | 0b110 | 0x40 | 0x400 | BIT[63]
    assert S.make_shadow_nonleaf_spte(9) == 0x800 | 0b111 | 0x20 | (9 << 12)


def test_predicates_on_a_handmade_ept_leaf():
    spte = 0x800 | BIT[63] | 0b011 | 0x80 | 0x100 | (0x4_0000 << 12)
    assert S.is_shadow_present_pte(spte)
    assert S.is_large_pte(spte)
    assert S.is_last_spte(spte, 2) and S.is_last_spte(spte & ~0x80, 1)
    assert not S.is_last_spte(spte & ~0x80, 2)
    assert S.spte_to_pfn(spte) == 0x4_0000
    assert S.is_writable_pte(spte) and not S.is_writable_pte(spte & ~0b010)
    assert S.is_accessed_spte(spte) and not S.is_accessed_spte(spte & ~0x100)
    assert not S.is_dirty_spte(spte) and S.is_dirty_spte(spte | 0x200)
    assert S.spte_ad_enabled(spte) and not S.spte_ad_need_write_protect(spte)
    assert not S.spte_ad_enabled(spte | BIT[52]) and S.spte_ad_need_write_protect(spte | BIT[52])
    assert S.spte_ad_enabled(spte | BIT[53]) and S.spte_ad_need_write_protect(spte | BIT[53])
    assert S.is_mmu_writable_spte(BIT[58], True) and not S.is_mmu_writable_spte(0x400, True)
    assert S.is_mmu_writable_spte(0x400, False) and not S.is_mmu_writable_spte(BIT[58], False)


def test_clear_writable_drops_w_and_mmu_writable_only():
    spte = 0x800 | BIT[63] | 0b111 | 0x300 | BIT[57] | BIT[58] | (5 << 12)
    assert S.clear_writable(spte) == spte & ~(0b010 | BIT[58])


# --- access tracking ------------------------------------------------------------------------------
AD_DISABLED_LEAF = 0x800 | BIT[52] | BIT[63] | (6 << 3) | BIT[57] | BIT[58] | (0x1234 << 12)


@pytest.mark.parametrize("rx", [0b001, 0b100, 0b101])
def test_access_tracking_parks_read_exec_and_round_trips(rx):
    spte = AD_DISABLED_LEAF | rx
    tracked = S.mark_spte_for_access_track(spte)
    assert tracked == AD_DISABLED_LEAF | (rx << 54)
    assert S.is_access_track_spte(tracked) and not S.is_access_track_spte(spte)
    assert S.is_shadow_present_pte(tracked)
    assert S.mark_spte_for_access_track(tracked) == tracked  # already tracked
    assert S.restore_acc_track_spte(tracked) == spte


def test_access_tracking_drops_write_and_accessed():
    spte = AD_DISABLED_LEAF | 0b111 | 0x100
    tracked = S.mark_spte_for_access_track(spte)
    assert tracked == AD_DISABLED_LEAF | (0b101 << 54)
    assert S.restore_acc_track_spte(tracked) == AD_DISABLED_LEAF | 0b101


def test_access_tracking_with_ad_bits_clears_only_accessed():
    leaf = 0x800 | BIT[63] | 0b111 | (6 << 3) | 0x100 | 0x200 | BIT[57] | BIT[58] | (7 << 12)
    assert S.mark_spte_for_access_track(leaf) == leaf & ~0x100
    assert not S.is_access_track_spte(S.mark_spte_for_access_track(leaf))


# --- calling convention ---------------------------------------------------------------------------
def test_python_callers_get_non_negative_ints_with_bit_63():
    leaf = S.make_leaf_spte(1, 1, True, True)
    assert isinstance(leaf, int) and leaf >= 1 << 63
    marked = S.mark_spte_for_access_track(leaf)
    assert isinstance(marked, int) and marked == leaf & ~0x100
    assert S.spte_to_pfn(np.uint64(leaf)) == 1


def test_helpers_are_callable_from_jitted_code_with_int64_or_uint64():
    @njit
    def probe(signed, unsigned):
        return (S.is_frozen_spte(signed), S.is_frozen_spte(unsigned),
                S.is_shadow_present_pte(signed), S.spte_to_pfn(unsigned),
                S.is_mmio_spte(signed, True))

    frozen_as_int64 = np.int64(-(1 << 63) + 0x5A0)
    assert probe(frozen_as_int64, np.uint64(0x8000_0000_0000_05A0)) == (True, True, False, 0, False)
