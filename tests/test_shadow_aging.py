"""Aging through the shadow MMU's rmaps (plugins/shadow/mmu_shadow/aging.py): the host's
clear_young asks whether a page was accessed and makes it look unaccessed. Shadow paging and
the legacy MMU with EPT A/D clear the Accessed bit, which the hardware sets again on its next
walk; the legacy MMU without EPT A/D marks the SPTE for access tracking, and the next access
is a fast page fault that restores it."""

from shadow_util import clean, data_gfn, leaves, machine, shadow, touch

from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_core.guest.machine import DATA_SLOT


def young(m, page, n=1):
    """clear_young over data pages [page, page + n): how many were young."""
    slot = m.vm.memslots[0].by_id(DATA_SLOT)
    hva = slot.gfn_to_hva(data_gfn(m, page))
    return m.vm.clear_young(hva, hva + 4096 * n)


def flush_tlbs(m):
    """Every vCPU walks again: the hardware sets Accessed bits only when it walks."""
    m.vm.flush_remote_tlbs()


def test_legacy_with_ept_ad_clears_the_accessed_bit(request):
    m = machine(request, params={"ept_ad": True})
    touch(m, [0, 1, 2], write=False)
    assert [young(m, p) for p in range(4)] == [1, 1, 1, 0]
    assert not any(S.is_accessed_spte(s) for p in range(3) for s in leaves(m, p))
    assert all(S.is_shadow_present_pte(s) for p in range(3) for s in leaves(m, p))
    touch(m, [0], write=False)  # a TLB hit: the hardware does not walk, the page stays old
    assert young(m, 0) == 0
    flush_tlbs(m)
    touch(m, [0], write=False)
    assert young(m, 0) == 1 and young(m, 1) == 0
    assert shadow(m).stats["aged"] == 4
    clean(m)


def test_legacy_without_ept_ad_tracks_access_and_the_fast_page_fault_restores(request):
    m = machine(request, params={"ept_ad": False, "pml": False})
    touch(m, [3], write=True)
    (spte,) = leaves(m, 3)
    assert S.is_writable_pte(spte) and spte & S.SPTE_TDP_AD_MASK == S.SPTE_TDP_AD_DISABLED
    assert young(m, 3) == 1
    (spte,) = leaves(m, 3)
    assert S.is_access_track_spte(spte) and not spte & S.VMX_EPT_RWX_MASK
    assert young(m, 3) == 0  # already old
    sh = shadow(m)
    slow = sh.stats["faults"]
    flush_tlbs(m)
    assert touch(m, [3], write=False)[0, 0] == 4  # the read sees the data, after a fast page fault
    (spte,) = leaves(m, 3)
    assert not S.is_access_track_spte(spte) and not S.is_writable_pte(spte)
    assert S.is_mmu_writable_spte(spte, True)  # W is dropped, MMU-writable kept
    touch(m, [3], write=True)  # a second fast page fault gives W back
    assert S.is_writable_pte(leaves(m, 3)[0])
    assert sh.stats["faults"] == slow and sh.stats["fast_fixed"] == 2
    assert young(m, 3) == 1
    clean(m)


def test_legacy_ages_huge_leaves(request):
    m = machine(request, pages=512, backing="thp")
    touch(m, [7], write=False)
    assert young(m, 0, 512) == 1  # one 2M leaf, one slot range
    assert young(m, 0, 512) == 0
    clean(m)


def test_shadow_paging_clears_the_accessed_bit_of_its_shadow_leaves(request):
    m = machine(request, "shadow")
    touch(m, [0, 5], write=False)
    assert young(m, 0) == 1 and young(m, 5) == 1 and young(m, 6) == 0
    assert all(not s & P.PT_ACCESSED for p in (0, 5) for s in leaves(m, p))
    assert young(m, 0) == 0
    flush_tlbs(m)
    touch(m, [5], write=False)
    assert young(m, 5) == 1 and young(m, 0) == 0
    clean(m)
