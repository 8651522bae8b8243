"""KVM's SPTE layout: special values never look present, encodings round-trip."""

import pytest

from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import spte as S


def test_software_bits_do_not_collide():
    masks = [S.SPTE_MMU_PRESENT_MASK, S.EPT_SPTE_HOST_WRITABLE, S.EPT_SPTE_MMU_WRITABLE,
             S.SHADOW_ACC_TRACK_SAVED_MASK << S.SHADOW_ACC_TRACK_SAVED_BITS_SHIFT,
             E.EPT_RWX, E.EPT_LARGE, E.EPT_ACCESSED, E.EPT_DIRTY]
    for i, a in enumerate(masks):
        for b in masks[i + 1:]:
            assert a & b == 0


def test_frozen_spte_is_neither_present_nor_mmio_nor_hardware_visible():
    assert not S.is_shadow_present_pte(S.FROZEN_SPTE)
    assert not S.is_mmio_spte(S.FROZEN_SPTE, ept=True)
    assert S.FROZEN_SPTE & E.EPT_RWX == 0  # the hardware sees "not present"


@pytest.mark.parametrize("ept", [True, False])
@pytest.mark.parametrize("gfn, gen", [(0, 0), (0x12345, 7), ((1 << 34) - 1, S.MMIO_SPTE_GEN_MASK)])
def test_mmio_spte_round_trips_gfn_and_generation(ept, gfn, gen):
    spte = S.make_mmio_spte(gfn, 0x7, gen, ept)
    assert S.is_mmio_spte(spte, ept)
    assert not S.is_shadow_present_pte(spte)
    assert (S.get_mmio_spte_gfn(spte), S.get_mmio_spte_generation(spte)) == (gfn, gen)


def test_mmio_generation_has_19_bits():
    assert S.MMIO_SPTE_GEN_MASK == (1 << 19) - 1


def test_ept_mmio_spte_is_write_exec_without_read_a_misconfiguration():
    assert S.make_mmio_spte(5, 7, 1, True) & E.EPT_RWX == E.EPT_WRITE | E.EPT_EXEC


def test_access_tracking_round_trip_restores_read_and_exec():
    leaf = S.make_leaf_spte(0x1234, 1, writable=False, executable=True)
    tracked = S.mark_spte_for_access_track(leaf)
    assert S.is_access_track_spte(tracked)
    assert tracked & E.EPT_RWX == 0
    assert S.restore_acc_track_spte(tracked) == leaf & ~E.EPT_ACCESSED


def test_leaf_and_nonleaf_sptes_are_present_and_large_only_above_4k():
    assert S.is_last_spte(S.make_leaf_spte(1, 1, True, True), 1)
    assert S.is_large_pte(S.make_leaf_spte(512, 2, True, True))
    nonleaf = S.make_nonleaf_spte(9)
    assert S.is_shadow_present_pte(nonleaf) and not S.is_last_spte(nonleaf, 2)
    assert S.spte_to_pfn(nonleaf) == 9
