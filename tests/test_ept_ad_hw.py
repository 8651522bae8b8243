"""EPT accessed/dirty flags in the hardware model: EPTP bit 6 (kvm_intel.ept_ad) turns them
on and off, and a TLB entry under TDP lets a write through only when the EPT leaf's D bit was
set too (SDM vol. 3C 29.3.5 and 29.4), so KVM's clearing of D bits plus a flush makes the next
write set D again."""

from __future__ import annotations

import numpy as np
import pytest
from parity_util import data_gva, spec_for
from test_ept_walk import DATA_GPA, GVA, RWX, R, World, X

from mmu_core import VMConfig
from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import build_machine
from mmu_core.guest.program import Program
from mmu_core.host.memory import NO_SLOT
from mmu_core.hw import cpu as C
from mmu_core.hw import tlb as T
from mmu_core.hw import walker as W
from mmu_core.params import CONFIGURATIONS

READ, WRITE = EC.ACC_READ, EC.ACC_WRITE
EPT_AD = E.EPT_ACCESSED | E.EPT_DIRTY
_ADDR = 0x000F_FFFF_FFFF_F000


# --- helpers (test_pml.py uses them too) ----------------------------------------------------------
def ept_path(vm, vcpu, gpa: int) -> list[tuple[np.ndarray, int]]:
    """(table, index) of every EPT entry used to translate gpa, top level first, from the
    vCPU's current root."""
    out = []
    pfn = vcpu.mmu_root
    for level in range(vm.root_levels(vcpu), 0, -1):
        table = vm.host.table(pfn)
        i = (gpa >> (12 + 9 * (level - 1))) & 511
        e = int(table[i])
        assert e & E.EPT_RWX, f"{gpa:#x} has no EPT entry at level {level}"
        out.append((table, i))
        if level == 1 or e & E.EPT_LARGE:
            return out
        pfn = (e & _ADDR) >> 12
    raise AssertionError("unreachable")


def ept_leaf(vm, vcpu, gpa: int) -> int:
    table, i = ept_path(vm, vcpu, gpa)[-1]
    return int(table[i])


def clear_ept_bits(vm, vcpu, gpa: int, bits: int, *, whole_path: bool = False) -> None:
    """Clear `bits` in the EPT leaf of gpa (or every entry on its path), as KVM's D-bit
    clearing does; the caller flushes TLBs or not."""
    path = ept_path(vm, vcpu, gpa)
    for table, i in path if whole_path else path[-1:]:
        table[i] = np.uint64(int(table[i]) & ~bits)


def machine(**params):
    """A 4-level guest on the TDP MMU with `params` changed, its data pages mapped writable
    (dirty in EPT and in the guest's PTEs) by a first write to each."""
    cfg = CONFIGURATIONS["tdp"].model_copy(update=params)
    m = build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=cfg))
    prog = Program()
    for i in range(4):
        prog.write(data_gva(i), i + 1)
    m.run_programs([prog.build()])
    return m


def run(m, prog: Program) -> None:
    m.run_programs([prog.build()])


# --- the walker ---------------------------------------------------------------------------------
def hw_walk(w: World, acc: int, *, ept_ad: bool, psc: np.ndarray | None = None) -> np.ndarray:
    out = W.new_out()
    psc = np.zeros((0, T.TLB_COLS), np.int64) if psc is None else psc
    W.walk_cached(w.mem.pt, w.mem.pt_slot, w.g.regs, GVA, acc, True, W.XL_EPT, w.ept.root,
                  w.ept.levels, ept_ad, W.EMPTY_MS, W.EMPTY_HVA, psc, W.NO_PML, out)
    return out


@pytest.mark.parametrize("acc", [READ, WRITE], ids=["read", "write"])
def test_without_ept_ad_the_walk_sets_guest_a_d_and_leaves_every_ept_entry_alone(acc):
    w = World()
    before = w.snapshot()
    out = hw_walk(w, acc, ept_ad=False)
    assert out[W.OUT_STATUS] == W.W_OK
    guest_pfns = set(w.g.tables.values())
    changed = {int(p) for p in np.flatnonzero(w.mem.pt_slot != NO_SLOT)
               if not np.array_equal(w.mem.pt[w.mem.pt_slot[p]], before[w.mem.pt_slot[p]])}
    assert changed == guest_pfns  # every guest table got its A bit, no EPT table changed
    entries = w.g.all_entries()
    assert all(entries[lv] & P.PT_ACCESSED for lv in entries)
    assert bool(entries[1] & P.PT_DIRTY) == (acc == WRITE)
    for gpa in [DATA_GPA] + [w.g.table_gpa(lv) for lv in (4, 3, 2, 1)]:
        assert not any(e & EPT_AD for e in w.ept.path(gpa)), hex(gpa)
    # The same walk with EPT A/D on does set them (the contrast the test relies on).
    w2 = World()
    hw_walk(w2, acc, ept_ad=True)
    assert all(e & E.EPT_ACCESSED for e in w2.ept.path(DATA_GPA))
    assert bool(w2.ept.path(DATA_GPA)[-1] & E.EPT_DIRTY) == (acc == WRITE)


def test_without_ept_ad_a_guest_a_d_update_still_needs_ept_write_permission():
    w = World()
    w.ept.map(w.g.table_gpa(1), w.g.tables[1] << 12, perm=R | X)
    out = hw_walk(w, READ, ept_ad=False)
    assert (out[W.OUT_STATUS], out[W.OUT_ADDR]) == (W.W_EPT_VIOLATION, w.g.entry_gpa(1))
    assert out[W.OUT_CODE] & E.EPT_QUAL_WRITE
    assert not any(e & EPT_AD for e in w.ept.path(DATA_GPA))
    assert not any(w.ept.path(w.g.table_gpa(lv))[-1] & EPT_AD for lv in (4, 3, 2, 1))


def test_without_ept_ad_ept_entries_are_cached_whatever_their_a_bit():
    w = World()
    full = int(hw_walk(w, READ, ept_ad=False)[W.OUT_READS])  # no caches
    psc = T.new_tlb(16)
    first = hw_walk(w, READ, ept_ad=False, psc=psc)
    second = hw_walk(w, READ, ept_ad=False, psc=psc)
    for out in (first, second):
        assert out[W.OUT_STATUS] == W.W_OK
        assert out[W.OUT_READS] + out[W.OUT_SKIPPED] == full
    # The guest's A bits were set by the first walk, so the second reads the same guest
    # entries and only the EPT dimension is cached: every EPT translation skips its top.
    assert second[W.OUT_SKIPPED] >= 5 * 2
    assert not any(e & E.EPT_ACCESSED for e in w.ept.path(DATA_GPA))


@pytest.mark.parametrize("ept_ad", [True, False], ids=["ept-ad", "no-ept-ad"])
def test_a_read_reports_dirty_only_when_the_ept_leaf_is_dirty_too(ept_ad):
    w = World(pte=DATA_GPA | P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER | P.PT_ACCESSED
              | P.PT_DIRTY)
    out = hw_walk(w, READ, ept_ad=ept_ad)
    assert bool(out[W.OUT_ATTR] & W.A_DIRTY) == (not ept_ad)  # guest D set, EPT D clear
    out = hw_walk(w, WRITE, ept_ad=ept_ad)
    assert out[W.OUT_ATTR] & W.A_DIRTY
    assert bool(w.ept.path(DATA_GPA)[-1] & E.EPT_DIRTY) == ept_ad
    out = hw_walk(w, READ, ept_ad=ept_ad)
    assert out[W.OUT_ATTR] & W.A_DIRTY


def test_paging_off_under_tdp_reports_dirty_from_the_ept_leaf():
    w = World(P.MODE_NONE)
    w.ept.map(GVA & ~0xFFF, 0x9_8765_4000, perm=RWX)
    assert not hw_walk(w, READ, ept_ad=True)[W.OUT_ATTR] & W.A_DIRTY
    assert hw_walk(w, WRITE, ept_ad=True)[W.OUT_ATTR] & W.A_DIRTY
    assert hw_walk(w, READ, ept_ad=True)[W.OUT_ATTR] & W.A_DIRTY


# --- a vCPU: TLB and EPT D ------------------------------------------------------------------------
def test_a_write_through_a_tlb_entry_filled_by_a_read_walks_again_and_sets_ept_d():
    m = machine()
    try:
        vm, vcpu = m.vm, m.vm.vcpus[0]
        gpa = data_gva(1)  # identity-mapped data
        assert ept_leaf(vm, vcpu, gpa) & E.EPT_DIRTY
        clear_ept_bits(vm, vcpu, gpa, E.EPT_DIRTY)
        vcpu.flush_tlb()
        walks = int(vcpu.hw_stats[C.ST_WALKS])
        run(m, Program().read(data_gva(1)))
        assert not ept_leaf(vm, vcpu, gpa) & E.EPT_DIRTY  # a read does not set D
        run(m, Program().write(data_gva(1), 9))
        assert ept_leaf(vm, vcpu, gpa) & E.EPT_DIRTY  # the write did
        assert vcpu.hw_stats[C.ST_WALKS] - walks == 2  # the read's entry could not serve it
        run(m, Program().write(data_gva(1), 10).read(data_gva(1)))
        assert vcpu.hw_stats[C.ST_WALKS] - walks == 2  # now it can: both hit the TLB
    finally:
        m.vm.destroy()


def test_without_ept_ad_a_write_hits_the_entry_a_read_filled():
    m = machine(ept_ad=False, pml=False)
    try:
        vcpu = m.vm.vcpus[0]
        vcpu.flush_tlb()
        walks = int(vcpu.hw_stats[C.ST_WALKS])
        run(m, Program().read(data_gva(1)).write(data_gva(1), 9))
        assert vcpu.hw_stats[C.ST_WALKS] - walks == 1  # the guest's D was set already
    finally:
        m.vm.destroy()


def test_after_kvm_clears_ept_d_and_flushes_the_next_write_sets_it_again():
    m = machine()
    try:
        vm, vcpu = m.vm, m.vm.vcpus[0]
        gpa = data_gva(2)
        run(m, Program().write(data_gva(2), 5))  # in the TLB now, with D set
        for _ in range(2):
            clear_ept_bits(vm, vcpu, gpa, E.EPT_DIRTY)
            vcpu.flush_tlb()  # what kvm_flush_remote_tlbs after clearing D bits does
            run(m, Program().write(data_gva(2), 6))
            assert ept_leaf(vm, vcpu, gpa) & E.EPT_DIRTY
        # Without the flush the TLB entry still says dirty and the write does not walk:
        # which is why KVM must flush after clearing D bits.
        clear_ept_bits(vm, vcpu, gpa, E.EPT_DIRTY)
        run(m, Program().write(data_gva(2), 7))
        assert not ept_leaf(vm, vcpu, gpa) & E.EPT_DIRTY
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("ept_ad", [True, False], ids=["ept-ad", "no-ept-ad"])
def test_a_vcpu_sets_ept_a_d_exactly_when_ept_ad_is_on(ept_ad):
    m = machine(ept_ad=ept_ad)
    try:
        vm, vcpu, pts = m.vm, m.vm.vcpus[0], m.pts
        gva = data_gva(3)
        tables = [pts.entry_gpa(gva, lv, create=False) for lv in (4, 3, 2, 1)]
        for gpa in [gva] + tables:
            clear_ept_bits(vm, vcpu, gpa, EPT_AD, whole_path=True)
        for e_gpa in tables:
            pts.write_entry(e_gpa, pts.read_entry(e_gpa) & ~(P.PT_ACCESSED | P.PT_DIRTY))
        vcpu.flush_tlb()
        before = {gpa: [int(t[i]) for t, i in ept_path(vm, vcpu, gpa)] for gpa in [gva] + tables}
        run(m, Program().read(gva).write(gva, 3))
        assert all(pts.read_entry(e) & P.PT_ACCESSED for e in tables)  # the guest's A bits
        assert pts.read_entry(tables[-1]) & P.PT_DIRTY  # and its D bit
        after = {gpa: [int(t[i]) for t, i in ept_path(vm, vcpu, gpa)] for gpa in before}
        if not ept_ad:
            assert after == before
        else:
            for gpa in before:
                assert all(e & E.EPT_ACCESSED for e in after[gpa]), hex(gpa)
                assert after[gpa][-1] & E.EPT_DIRTY, hex(gpa)  # data written, tables A/D'd
    finally:
        m.vm.destroy()
