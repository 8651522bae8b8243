"""Eager page splitting and dirty logging in the shadow MMU (plugins/shadow/mmu_shadow/split.py):
enabling dirty logging on the legacy MMU (ept on, tdp_mmu off) splits the slot's huge leaves
into 4K ones under the write lock (eager_page_split), each with its rmap entry, then clears
their D bits (PML) or write-protects them; without eager splitting the huge leaves are
write-protected and split on the first write. Under shadow paging (ept off) the guest's 4K
mappings leave nothing to split."""

import numpy as np
import pytest

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_core.guest.machine import DATA_SLOT, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.audit import audit
from mmu_core.testing.programs import data_gva

MIB2 = 2 << 20
PAGES = [0, 1, 300, 511, 512, 700, 1023]


def machine(config="legacy", **params):
    spec = MachineSpec(vcpus=1, data_size=2 * MIB2, backing="thp", mode=P.MODE_4LEVEL)
    return build_machine(spec, VMConfig(params=CONFIGURATIONS[config].model_copy(update=params)))


def shadow(m):
    return m.vm.backend_instances["shadow"]


def run(m, prog):
    return m.run_programs([prog.build()])[0]


def write_all(m, value=0):
    prog = Program()
    for p in range(1024):
        prog = prog.write(data_gva(p), p + 1 + value)
    return run(m, prog)


def read_pages(m, pages):
    prog = Program()
    for p in pages:
        prog = prog.read(data_gva(p))
    return run(m, prog)[:, 0].tolist()


def slot_leaves(m):
    """{level: [(sptep, gfn, spte)]} of the data slot, from the rmaps."""
    sh, vm = shadow(m), m.vm
    slot = vm.memslots[0].by_id(DATA_SLOT)
    out = {}
    for level in (1, 2, 3):
        rows = []
        for p in sh.rmaps.in_range(0, slot.base_gfn, slot.end_gfn, level):
            sp = sh.by_pfn[p >> 9]
            rows.append((p, sp.leaf_gfn(p & 511), int(vm.spte_table(p >> 9)[p & 511])))
        out[level] = rows
    return out


def clean(m):
    bad = audit(m.vm)
    assert not bad, bad


@pytest.mark.parametrize("pml", [True, False])
def test_eager_split_leaves_every_4k_mapping_correct_and_in_its_rmap(pml):
    m = machine(pml=pml)
    try:
        write_all(m)
        leaves = slot_leaves(m)
        assert len(leaves[2]) == 2 and not leaves[1], "THP memory is mapped 2M"
        clean(m)
        m.vm.set_dirty_logging(0, DATA_SLOT, True)
        leaves = slot_leaves(m)
        assert not leaves[2] and not leaves[3]
        slot = m.vm.memslots[0].by_id(DATA_SLOT)
        assert sorted(g for _, g, _ in leaves[1]) == list(range(slot.base_gfn, slot.end_gfn))
        for _, gfn, spte in leaves[1]:
            assert S.is_shadow_present_pte(spte) and S.is_last_spte(spte, 1)
            assert S.spte_to_pfn(spte) == m.vm.mm.lookup(slot.gfn_to_hva(gfn))
            if pml:
                assert S.is_writable_pte(spte) and not spte & S.VMX_EPT_DIRTY_BIT
            else:
                assert not S.is_writable_pte(spte) and S.is_mmu_writable_spte(spte, True)
        assert shadow(m).stats["eager_split"] == 2
        clean(m)
        faults, fast = shadow(m).stats["faults"], shadow(m).stats["fast_fixed"]
        assert read_pages(m, PAGES) == [p + 1 for p in PAGES]
        write_all(m, 5000)
        # PML logs the writes without a fault; write-protection takes one fast page fault
        # per page (MMU-writable kept), none of them under the MMU lock.
        assert shadow(m).stats["faults"] - faults == 0
        assert shadow(m).stats["fast_fixed"] - fast == (0 if pml else 1024)
        assert len(m.vm.get_dirty_log(0, DATA_SLOT)) == 1024
        clean(m)
        assert read_pages(m, PAGES) == [p + 5001 for p in PAGES]
    finally:
        m.vm.destroy()


def test_without_eager_split_huge_leaves_are_write_protected_and_split_on_write():
    m = machine(eager_page_split=False)
    try:
        write_all(m)
        m.vm.set_dirty_logging(0, DATA_SLOT, True)
        leaves = slot_leaves(m)
        assert len(leaves[2]) == 2 and not leaves[1]
        assert not any(S.is_writable_pte(spte) for _, _, spte in leaves[2])
        clean(m)
        run(m, Program().write(data_gva(3), 77))
        leaves = slot_leaves(m)
        assert len(leaves[2]) == 1 and len(leaves[1]) == 1
        slot = m.vm.memslots[0].by_id(DATA_SLOT)
        assert (m.vm.get_dirty_log(0, DATA_SLOT) - slot.base_gfn).tolist() == [3]
        clean(m)
    finally:
        m.vm.destroy()


def test_guest_view_and_dirty_log_are_the_same_with_and_without_eager_split():
    seen = []
    for eager in (False, True):
        m = machine(eager_page_split=eager)
        try:
            write_all(m)
            m.vm.set_dirty_logging(0, DATA_SLOT, True)
            prog = Program()
            for p in PAGES:
                prog = prog.write(data_gva(p), 9000 + p)
            run(m, prog)
            log = m.vm.get_dirty_log(0, DATA_SLOT).tolist()
            seen.append((read_pages(m, range(1024)), log))
            clean(m)
        finally:
            m.vm.destroy()
    assert seen[0] == seen[1]
    assert len(seen[0][1]) == len(PAGES)


def test_shadow_paging_with_guest_4k_mappings_has_nothing_to_split():
    m = machine("shadow")
    try:
        write_all(m)
        m.vm.set_dirty_logging(0, DATA_SLOT, True)
        leaves = slot_leaves(m)
        assert not leaves[2] and shadow(m).stats.get("eager_split", 0) == 0
        assert not any(S.is_writable_pte(spte) for _, _, spte in leaves[1])
        clean(m)
        write_all(m, 1)
        assert len(m.vm.get_dirty_log(0, DATA_SLOT)) == 1024
        clean(m)
    finally:
        m.vm.destroy()


def test_split_children_keep_the_bits_and_step_the_frames():
    from mmu_shadow.split import split_children
    huge = int(S.make_leaf_spte(0x40000, 3, True, True))
    kids = split_children(huge, 3)
    assert all(S.is_large_pte(k) for k in kids[:3])
    assert [int(S.spte_to_pfn(k)) for k in kids[:3]] == [0x40000, 0x40200, 0x40400]
    kids = split_children(int(S.make_leaf_spte(0x200, 2, True, True)), 2)
    assert not S.is_large_pte(kids[5]) and int(S.spte_to_pfn(kids[5])) == 0x205
    assert np.uint64(kids[5]) & ~np.uint64(S.SPTE_BASE_ADDR_MASK) == \
        S.make_leaf_spte(0x205, 1, True, True) & ~np.uint64(S.SPTE_BASE_ADDR_MASK)


def test_a_write_to_a_write_protected_shadow_leaf_does_not_flush_remote_tlbs():
    # mmu_set_spte flushes when the frame changes or a writable leaf becomes read-only; making
    # the same frame writable needs no flush (the stale read-only entry only faults again).
    # Shadow paging's dirty logging write-protects every leaf: one flush per logged write
    # before, none now.
    from mmu_core.params import CONFIGURATIONS
    from mmu_core.workloads.dirty_log_perf import DirtyLogPerfOptions, run_dirty_log_perf

    r = run_dirty_log_perf(DirtyLogPerfOptions(vcpus=4, bytes_per_vcpu=64 << 12, iterations=2),
                           CONFIGURATIONS["shadow"])
    written = sum(it.pages_written for it in r.per_iteration)
    assert written >= 256 and r.tlb_flushes < 16


def test_disabling_logging_zaps_collapsible_leaves_and_faults_map_huge_again():
    """kvm_mmu_recover_huge_pages for the rmaps (recover.py): the split 4K leaves of a THP the
    host still maps 2M are zapped when logging stops, and the next access maps 2M; those of
    a THP the host split stay."""
    m = machine()
    try:
        write_all(m)
        m.vm.set_dirty_logging(0, DATA_SLOT, True)
        slot = m.vm.memslots[0].by_id(DATA_SLOT)
        m.vm.mm.split_huge_page(slot.gfn_to_hva(slot.base_gfn + 512))  # the second THP
        write_all(m, 100)
        clean(m)
        flushes = m.vm.tlb_flushes
        m.vm.set_dirty_logging(0, DATA_SLOT, False)
        leaves = slot_leaves(m)
        assert not leaves[2] and sorted(g - slot.base_gfn for _, g, _ in leaves[1]) == \
            list(range(512, 1024))
        assert shadow(m).stats["collapsible_zapped"] == 512
        assert m.vm.tlb_flushes == flushes + 1  # once, under the lock
        clean(m)
        assert read_pages(m, PAGES) == [p + 101 for p in PAGES]
        leaves = slot_leaves(m)
        assert len(leaves[2]) == 1 and len(leaves[1]) == 512
        clean(m)
    finally:
        m.vm.destroy()


def test_shadow_paging_keeps_the_guests_4k_mappings_when_logging_stops():
    m = machine("shadow")
    try:
        write_all(m)
        m.vm.set_dirty_logging(0, DATA_SLOT, True)
        write_all(m, 7)
        m.vm.set_dirty_logging(0, DATA_SLOT, False)
        assert shadow(m).stats["collapsible_zapped"] == 0  # indirect pages: the guest's 4K
        assert read_pages(m, PAGES) == [p + 8 for p in PAGES]
        clean(m)
    finally:
        m.vm.destroy()
