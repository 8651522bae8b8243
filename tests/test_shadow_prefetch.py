"""The legacy MMU's prefetch of a fault's neighbours (plugins/shadow/mmu_shadow/
direct_prefetch.py, KVM's __direct_pte_prefetch): after a 4K fault, the empty entries of its
group of eight are mapped to pages the host already has, with the Accessed bit clear; not in
a logged slot, not without EPT A/D, not for pages the host does not map."""

from shadow_util import clean, leaves, machine, shadow, touch

from mmu_core.arch.x86 import spte as S
from mmu_core.guest.machine import DATA_SLOT


def faulted_then_zapped(request, **params):
    """Pages 0-7 written (so the host has them, writable), then every SPTE zapped."""
    m = machine(request, params=params)
    touch(m, range(8))
    m.vm.zap_all()
    return m


def test_a_fault_maps_the_seven_neighbours_the_host_already_has(request):
    m = faulted_then_zapped(request)
    sh = shadow(m)
    prefetched = sh.stats["direct_prefetched"]
    assert touch(m, [2], write=False)[0, 0] == 3
    assert sh.stats["direct_prefetched"] >= prefetched + 7  # and the guest's page tables'
    for p in (0, 1, 3, 4, 5, 6, 7):
        (spte,) = leaves(m, p)
        assert S.is_writable_pte(spte) and not S.is_accessed_spte(spte)  # not counted as used
    clean(m)
    faults = sh.stats["faults"]
    assert touch(m, range(8), write=False)[:, 0].tolist() == [p + 1 for p in range(8)]
    assert sh.stats["faults"] == faults  # all eight mapped: no fault
    clean(m)


def test_pages_the_host_does_not_have_end_the_prefetch(request):
    m = machine(request)
    touch(m, [0, 1, 5])
    m.vm.zap_all()
    touch(m, [0], write=False)
    # 1 is mapped, 2 the host never populated: the run 1..7 stops there.
    assert len(leaves(m, 1)) == 1 and leaves(m, 2) == [] and leaves(m, 5) == []
    clean(m)


def test_no_prefetch_in_a_logged_slot_or_without_ept_ad(request):
    m = faulted_then_zapped(request)
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    touch(m, [2], write=False)
    assert [len(leaves(m, p)) for p in range(8)] == [0, 0, 1, 0, 0, 0, 0, 0]
    clean(m)
    m = faulted_then_zapped(request, ept_ad=False, pml=False)
    touch(m, [2], write=False)
    assert [len(leaves(m, p)) for p in range(8)] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert shadow(m).stats["direct_prefetched"] == 0
    clean(m)
