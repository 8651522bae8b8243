"""The complete TDP MMU (issue #7): the one SPTE-change path and its gauges, fast page
faults, dirty logging by write-protection and by D bits, aging and access tracking, splitting
huge pages on fault and eagerly, recovering them in place, NX huge pages, and the reverts that
measure what each change bought."""

import pytest

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_core.errors import InvalidConfig
from mmu_core.guest.machine import DATA_SLOT, MMIO_GPA, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.params import Params
from mmu_core.testing.audit import audit as audit_vm
from mmu_core.testing.programs import data_gva

MIB2 = 2 << 20


def machine(backing="thp", size=2 * MIB2, vcpus=1, **params):
    spec = MachineSpec(vcpus=vcpus, data_size=size, backing=backing, mode=P.MODE_4LEVEL)
    return build_machine(spec, VMConfig(params=Params(**params)))


def tdp(m):
    return m.vm.backend_instances["tdp"]


def data_pages(m, base4k):
    """The gauges for 4K/2M/1G with the guest's page-table pages (4K, `base4k`) taken out."""
    g = tdp(m).pages
    return [g[1] - base4k, g[2], g[3]]


def run(m, prog):
    return m.run_programs([prog.build()])[0]


def touch(m, pages, write=True):
    prog = Program()
    for p in pages:
        prog = prog.write(data_gva(p), p + 1) if write else prog.read(data_gva(p))
    return run(m, prog)


def leaf(m, page):
    """(level, spte) of the leaf mapping data page `page` in vCPU 0's root."""
    from mmu_tdp.tdp_iter import TdpIter
    slot = m.vm.memslots[0].by_id(DATA_SLOT)
    gfn = slot.base_gfn + page
    t = tdp(m)
    root = t.all_roots[m.vm.vcpus[0].mmu_root]
    found = (0, 0)
    for it in TdpIter(m.vm, root.pfn, root.level, 1, gfn, gfn + 1, atomic=False):
        if S.is_shadow_present_pte(it.old_spte) and S.is_last_spte(it.old_spte, it.level):
            found = (it.level, it.old_spte)
    return found


def clean(m):
    violations = audit_vm(m.vm)
    assert not violations, violations


@pytest.fixture
def closing():
    made = []
    yield made.append
    for m in made:
        m.vm.destroy()


def test_gauges_count_what_is_mapped_now_through_faults_splits_and_zaps(closing):
    m = machine()
    closing(m)
    touch(m, [0, 600])
    base = tdp(m).pages[1]  # the guest's page tables, mapped 4K
    assert data_pages(m, base) == [0, 2, 0]
    clean(m)
    m.vm.set_dirty_logging(0, DATA_SLOT, True)  # eager split: both 2M pages become 512 x 4K
    assert data_pages(m, base) == [1024, 0, 0]
    clean(m)
    slot = m.vm.memslots[0].by_id(DATA_SLOT)
    m.vm.zap_gfn_range(0, slot.base_gfn, slot.base_gfn + 10)
    assert data_pages(m, base) == [1014, 0, 0]
    clean(m)
    m.vm.zap_all()
    assert tdp(m).pages[1:4] == [0, 0, 0]
    clean(m)


@pytest.mark.parametrize("pml", [False, True])
def test_dirty_log_holds_exactly_the_written_pages(closing, pml):
    m = machine(backing="anon", size=MIB2, pml=pml)
    closing(m)
    touch(m, range(8), write=False)
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    touch(m, [1, 3])
    touch(m, [4, 5], write=False)  # reads of mapped pages log nothing
    base = m.vm.memslots[0].by_id(DATA_SLOT).base_gfn
    assert (m.vm.get_dirty_log(0, DATA_SLOT) - base).tolist() == [1, 3]
    clean(m)
    touch(m, [3, 6])
    assert (m.vm.get_dirty_log(0, DATA_SLOT) - base).tolist() == [3, 6]
    fast = m.vm.vcpus[0].faults.get("fast_fixed", 0)
    # Write-protection logging: each first write is a fast page fault, no lock taken.
    # PML: no fault at all, the hardware logs the D-bit update.
    assert fast == (0 if pml else 4)


def test_a_read_fault_in_a_logged_slot_maps_writable_only_under_pml(closing):
    for pml in (False, True):
        m = machine(backing="anon", size=MIB2, pml=pml)
        closing(m)
        m.vm.set_dirty_logging(0, DATA_SLOT, True)
        touch(m, [2], write=False)
        _, spte = leaf(m, 2)
        assert S.is_writable_pte(spte) == pml
        assert S.is_mmu_writable_spte(spte, True)
        assert not spte & S.VMX_EPT_DIRTY_BIT  # clean: the guest has not written it
        assert len(m.vm.get_dirty_log(0, DATA_SLOT)) == 0


def test_revert_fast_pf_sends_write_protection_faults_to_the_slow_path(closing):
    m = machine(backing="anon", size=MIB2, pml=False, tdp_mmu_revert="fast-pf")
    closing(m)
    touch(m, range(4))
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    slow = tdp(m).stats["faults"]
    touch(m, range(4))
    assert tdp(m).stats["faults"] == slow + 4 and tdp(m).stats["fast_fixed"] == 0
    assert len(m.vm.get_dirty_log(0, DATA_SLOT)) == 4


def test_split_on_fault_keeps_the_rest_of_the_huge_page_mapped(closing):
    m = machine(eager_page_split=False, pml=False)
    closing(m)
    touch(m, [0])
    base = tdp(m).pages[1]
    assert data_pages(m, base)[:2] == [0, 1]
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    touch(m, [7])
    assert data_pages(m, base)[:2] == [512, 0] and tdp(m).stats["split_on_fault"] == 1
    faults = tdp(m).stats["faults"]
    touch(m, [8])  # already mapped by the split, write-protected: a fast page fault
    assert tdp(m).stats["faults"] == faults and tdp(m).stats["fast_fixed"] == 1
    clean(m)


def test_revert_split_on_fault_zaps_the_huge_page(closing):
    m = machine(eager_page_split=False, pml=False, tdp_mmu_revert="split-on-fault")
    closing(m)
    touch(m, [0])
    base = tdp(m).pages[1]
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    touch(m, [7])
    assert data_pages(m, base)[:2] == [1, 0]
    clean(m)


def test_disabling_logging_recovers_huge_pages_in_place(closing):
    m = machine()
    closing(m)
    touch(m, [0, 600])
    base = tdp(m).pages[1]
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    touch(m, [1, 2])
    assert data_pages(m, base)[:2] == [1024, 0]
    faults = tdp(m).stats["faults"]
    m.vm.set_dirty_logging(0, DATA_SLOT, False)
    assert data_pages(m, base)[:2] == [0, 2] and tdp(m).stats["recovered"] == 2
    res = touch(m, [0, 1, 2, 600], write=False)
    assert res[:, 0].tolist() == [1, 2, 3, 601]  # same memory, no fault needed
    assert tdp(m).stats["faults"] == faults
    clean(m)


def test_revert_recover_in_place_zaps_collapsible_tables(closing):
    m = machine(tdp_mmu_revert="recover-in-place")
    closing(m)
    touch(m, [0, 600])
    base = tdp(m).pages[1]
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    m.vm.set_dirty_logging(0, DATA_SLOT, False)
    assert data_pages(m, base)[:2] == [0, 0]
    touch(m, [0, 600], write=False)
    assert data_pages(m, base)[:2] == [0, 2]
    clean(m)


@pytest.mark.parametrize("ept_ad", [True, False])
def test_aging_reports_young_once_and_access_tracking_restores_on_access(closing, ept_ad):
    m = machine(backing="anon", size=MIB2, ept_ad=ept_ad)
    closing(m)
    touch(m, range(4))
    slot = m.vm.memslots[0].by_id(DATA_SLOT)
    hva = slot.userspace_addr
    assert m.vm.mm.age(hva, 4 * 4096) == 1  # young (one notifier, one range)
    assert m.vm.mm.age(hva, 4 * 4096) == 0  # aged: nothing accessed since
    _, spte = leaf(m, 0)
    if not ept_ad:
        assert S.is_access_track_spte(spte)
    m.vm.flush_remote_tlbs()
    res = touch(m, [0], write=False)
    assert res[0, 0] == 1
    if not ept_ad:
        # The access faulted on the parked RWX and the fast path restored them.
        assert tdp(m).stats["fast_fixed"] >= 1
    assert m.vm.mm.age(hva, 4 * 4096) == 1
    clean(m)


def test_nx_huge_pages_map_fetches_4k_and_the_worker_recovers_them(closing):
    m = machine(nx_huge_pages=True, nx_huge_pages_recovery_period_ms=1,
                nx_huge_pages_recovery_ratio=1)
    closing(m)
    touch(m, [0], write=False)
    level, spte = leaf(m, 0)
    assert level == 2 and not spte & S.VMX_EPT_EXECUTABLE_MASK
    run(m, Program().fetch(data_gva(5)))
    level, spte = leaf(m, 5)
    assert level == 1 and spte & S.VMX_EPT_EXECUTABLE_MASK
    assert len(tdp(m).nx_tables) == 1 and tdp(m).stats["nx_split"] == 1
    clean(m)
    run(m, Program().pause(3_000_000))  # the worker runs every 1 ms
    assert tdp(m).stats["nx_recovered"] == 1 and not tdp(m).nx_tables
    touch(m, [6], write=False)
    assert leaf(m, 6)[0] == 2  # huge again for data accesses
    clean(m)


def test_zap_all_empties_invalid_roots_under_the_read_lock(closing):
    m = machine(backing="anon", size=MIB2, vcpus=2)
    closing(m)
    m.run_programs([Program().write(data_gva(0), 1).build(),
                    Program().write(data_gva(1), 2).build()])
    m.vm.zap_all()
    assert tdp(m).pages[1:4] == [0, 0, 0] and not tdp(m).zapping
    res = m.run_programs([Program().read(data_gva(0)).build(),
                          Program().read(data_gva(1)).build()])
    assert [r[0, 0] for r in res] == [1, 2]
    clean(m)
    # the zapped tables wait for an RCU grace period (longer than this run): every page,
    # the old root's and the new one's, is freed through the RCU callback at teardown
    held, mmu = m.vm.pt_pages_in_use(), tdp(m)
    m.vm.destroy()
    assert held >= 2 * 3 + 2 and mmu.stats["tables_freed"] == held


def test_an_unknown_revert_is_one_error():
    with pytest.raises(InvalidConfig, match="unknown change 'nope'"):
        machine(tdp_mmu_revert="nope")


def test_mmio_generation_wrap_zaps_every_mmio_spte(closing):
    from mmu_core.host import Backing

    m = machine(backing="anon", size=MIB2)
    closing(m)
    vm = m.vm
    gva = hole = MMIO_GPA  # identity-mapped by the guest, no memslot: MMIO
    g0 = vm.generation
    run(m, Program().read(gva))
    assert tdp(m).stats["mmio"] == 1
    # 2^19 - 2 memslot updates later (skipped here), the next update wraps the generation.
    vm.generation = S.MMIO_SPTE_GEN_MASK
    zaps = vm.tlb_flushes
    vm.add_memslot(9, hole, 16 * 4096, Backing.ANON)  # generation 2^19: masked to 0, zap all
    assert vm.tlb_flushes > zaps and tdp(m).pages[1:4] == [0, 0, 0]
    vm.generation = S.MMIO_SPTE_GEN_MASK + 1 + g0  # the old SPTE's generation again, masked
    res = run(m, Program().read(gva))
    assert res[0, 0] == 0 and len(vm.vcpus[0].mmio) == 1  # memory now, not MMIO


def test_a_vcpu_that_cached_a_table_sees_the_huge_leaf_that_replaced_it(closing):
    """Recovery replaces a table by a huge leaf and flushes only at the end; a vCPU that
    faults meanwhile through its paging-structure cache must not spin: the EPT violation
    drops the cached entries on the faulting address's path (SDM vol. 3C 29.4.3.1)."""
    from mmu_tdp.tdp_iter import TdpIter

    m = machine()
    closing(m)
    touch(m, [0, 1])
    m.vm.set_dirty_logging(0, DATA_SLOT, True)
    touch(m, [1])  # the walk caches the level-2 entry pointing at the split table
    t = tdp(m)
    slot = m.vm.memslots[0].by_id(DATA_SLOT)
    root = t.all_roots[m.vm.vcpus[0].mmu_root]
    vm = m.vm
    # Recover by hand, without the flush that set_dirty_logging(False) would do at the end.
    slot.flags &= ~0x1  # KVM_MEM_LOG_DIRTY_PAGES
    with vm.mmu_lock.read():
        for it in TdpIter(vm, root.pfn, root.level, 2, slot.base_gfn, slot.base_gfn + 1):
            if it.level == 2:
                assert t._recover_one(it, slot, zap=False)
                break
    res = touch(m, [2], write=False)  # stale cache: violation, spurious, then the huge leaf
    assert res[0, 0] == 0 and leaf(m, 2)[0] == 2
