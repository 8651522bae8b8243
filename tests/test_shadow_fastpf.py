"""The legacy MMU's lockless fast page fault (plugins/shadow/mmu_shadow/fastpf.py, shared part
mmu_core/fastpf.py): under ept with tdp_mmu=N and no PML, dirty logging write-protects the
slot's leaves keeping MMU-writable, and each first write is fixed with a cmpxchg and logged
without the MMU lock; the committer of zapped shadow pages waits for lockless walks begun
before its flush (the mutant lockless-walk-no-wait, tests/test_explore.py). Shadow paging has
no fast path (FNAME(page_fault) never tries it)."""

from shadow_util import clean, leaves, shadow, touch
from shadow_util import machine as _machine

from mmu_core.arch.x86 import spte as S
from mmu_core.guest.machine import DATA_SLOT


def machine(request, config="legacy", params=None, **kw):
    """Without PML: dirty logging write-protects, and logged writes are fast page faults."""
    return _machine(request, config, params={"pml": False, **(params or {})}, **kw)


def leaf(m, page):
    (spte,) = leaves(m, page)
    return spte


def test_logged_writes_are_fast_page_faults_and_the_log_is_exact(request):
    m = machine(request)
    touch(m, range(8))
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    assert not any(S.is_writable_pte(leaf(m, p)) for p in range(8))
    assert all(S.is_mmu_writable_spte(leaf(m, p), True) for p in range(8))
    clean(m)
    sh = shadow(m)
    slow = sh.stats["faults"]
    touch(m, [1, 3])
    touch(m, [4, 5], write=False)  # reads of mapped pages fault nowhere and log nothing
    assert sh.stats["faults"] == slow and sh.stats["fast_fixed"] == 2
    assert m.vm.vcpus[0].faults.get("fast_fixed") == 2
    base = m.vm.memslots[0].by_id(DATA_SLOT).base_gfn
    assert (m.vm.get_dirty_log(0, DATA_SLOT) - base).tolist() == [1, 3]
    clean(m)
    touch(m, [3, 6])  # re-protected by the harvest: fast again, logged again
    assert sh.stats["faults"] == slow and sh.stats["fast_fixed"] == 4
    assert (m.vm.get_dirty_log(0, DATA_SLOT) - base).tolist() == [3, 6]
    clean(m)


def test_a_read_fault_in_a_logged_slot_maps_read_only_but_mmu_writable(request):
    m = machine(request)
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    touch(m, [2], write=False)
    spte = leaf(m, 2)
    assert not S.is_writable_pte(spte) and S.is_mmu_writable_spte(spte, True)
    assert len(m.vm.get_dirty_log(0, DATA_SLOT)) == 0
    touch(m, [2])
    assert S.is_writable_pte(leaf(m, 2)) and shadow(m).stats["fast_fixed"] == 1
    assert len(m.vm.get_dirty_log(0, DATA_SLOT)) == 1
    clean(m)


def test_a_readonly_slot_is_never_mmu_writable_and_its_writes_stay_slow(request):
    m = machine(request, readonly=True)
    touch(m, [0], write=False)
    assert not S.is_mmu_writable_spte(leaf(m, 0), True)
    slow = shadow(m).stats["faults"]
    touch(m, [0])  # a present write fault: the fast path refuses it, the slow path emulates
    assert shadow(m).stats["fast_fixed"] == 0 and shadow(m).stats["faults"] == slow + 1
    assert not S.is_writable_pte(leaf(m, 0))
    clean(m)


def test_shadow_paging_takes_no_fast_path(request):
    m = machine(request, "shadow")
    touch(m, range(4))
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    touch(m, range(4))
    sh = shadow(m)
    assert sh.stats["fast_fixed"] == 0 and sh.stats["fast_spurious"] == 0
    assert len(m.vm.get_dirty_log(0, DATA_SLOT)) == 4
    clean(m)


def test_a_huge_leaf_of_a_logged_slot_is_left_to_the_slow_path(request):
    m = machine(request, pages=512, backing="thp", params={"eager_page_split": False})
    touch(m, [0])
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    slow = shadow(m).stats["faults"]
    touch(m, [7])
    # The fix would log one page of 512: the slow path maps 4K and logs exactly page 7.
    assert shadow(m).stats["fast_fixed"] == 0 and shadow(m).stats["faults"] == slow + 1
    base = m.vm.memslots[0].by_id(DATA_SLOT).base_gfn
    assert (m.vm.get_dirty_log(0, DATA_SLOT) - base).tolist() == [7]
    clean(m)
