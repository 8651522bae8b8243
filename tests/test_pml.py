"""Page-modification logging (SDM vol. 3C 29.3.6) in the hardware model and its vCPU side:
the hardware logs each page whose EPT D bit it sets from 0 to 1 (data writes and the A/D
updates of guest tables in a 2-D walk), a full log exits, and KVM drains the log on every
exit and when userspace reads the dirty log. PML is on only while a memslot logs dirty pages,
with EPT A/D flags, under EPT.

Each test stands in for KVM's D-bit dirty logging itself (empty bitmap, EPT D bits cleared,
TLBs flushed), so that what it checks is the hardware's part whatever the backend does.
"""

from __future__ import annotations

import numpy as np
import pytest
from parity_util import data_gva
from test_ept_ad_hw import clear_ept_bits, ept_leaf, run

from mmu_core import VMConfig
from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import DATA_SLOT, PT_SLOT, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.hw import walker as W
from mmu_core.params import CONFIGURATIONS
from mmu_core.vm.vcpu import PML_ENTITY_NUM


def logged_machine(pages: int, touched: int, *, log_dirty: bool = True, pt_log: bool = False,
                   config: str = "tdp", **params):
    """A guest on `config` with `pages` data pages (their slot logging dirty pages when
    `log_dirty`, the page-table slot too when `pt_log`), the first `touched` of them written
    once, so mapped writable and dirty in EPT and in the guest's PTEs."""
    cfg = CONFIGURATIONS[config].model_copy(update=params)
    m = build_machine(MachineSpec(vcpus=1, data_size=pages * 4096, log_dirty=log_dirty),
                      VMConfig(params=cfg))
    if pt_log:
        m.vm.set_dirty_logging(0, PT_SLOT, True)
    prog = Program()
    for i in range(touched):
        prog.write(data_gva(i), i + 1)
    run(m, prog)
    return m


def clean(m, pages, extra_gpas=()) -> None:
    """KVM's D-bit dirty logging between two harvests: empty bitmaps, clear EPT D bits on
    the pages (data page numbers, and any other gpas), flushed TLBs."""
    vm, vcpu = m.vm, m.vm.vcpus[0]
    for slot in vm.memslots[0].slots:
        if slot.dirty_bitmap is not None:
            slot.dirty_bitmap[:] = 0
    for gpa in [data_gva(i) for i in pages] + list(extra_gpas):
        clear_ept_bits(vm, vcpu, gpa, E.EPT_DIRTY)
    vcpu.flush_tlb()


def logged(vcpu) -> list[int]:
    """The gpas in the vCPU's PML buffer, in logging order."""
    return [int(g) for g in vcpu.pml[1:int(vcpu.pml[0]) + 1]]


def bitmap(vm, slot_id: int = DATA_SLOT) -> list[int]:
    """The gfns set in a slot's dirty bitmap now (nothing drained first)."""
    slot = vm.memslots[0].by_id(slot_id)
    return (np.flatnonzero(slot.dirty_bitmap) + slot.base_gfn).tolist()


def gfns(*pages: int) -> list[int]:
    return [data_gva(i) >> 12 for i in pages]


def test_pml_logs_each_page_whose_ept_d_goes_from_0_to_1_once_and_in_order():
    m = logged_machine(8, 8)
    try:
        vm, vcpu = m.vm, m.vm.vcpus[0]
        clean(m, range(6))  # pages 6 and 7 stay dirty in EPT
        run(m, Program().write(data_gva(0), 1).write(data_gva(1), 1).write(data_gva(0), 2)
            .read(data_gva(2))  # a read sets no D bit
            .write(data_gva(6), 1)  # D was set already: nothing to log
            .write(data_gva(3), 1).write(data_gva(3), 2)
            .read(data_gva(4)).write(data_gva(4), 1))  # the read's TLB entry walks again
        assert logged(vcpu) == [data_gva(i) for i in (0, 1, 3, 4)]
        assert all(ept_leaf(vm, vcpu, data_gva(i)) & E.EPT_DIRTY for i in (0, 1, 3, 4, 6))
        assert not ept_leaf(vm, vcpu, data_gva(2)) & E.EPT_DIRTY
        assert bitmap(vm) == []  # no exit yet: the log is still in the buffer
        assert (m.vm.get_dirty_log(0, DATA_SLOT) == gfns(0, 1, 3, 4)).all()
        assert logged(vcpu) == []
    finally:
        m.vm.destroy()


def test_pml_logs_guest_table_pages_that_guest_a_d_updates_write():
    m = logged_machine(8, 8, pt_log=True)
    try:
        vm, vcpu, pts = m.vm, m.vm.vcpus[0], m.pts
        ptes = {i: pts.entry_gpa(data_gva(i), 1, create=False) for i in (5, 6)}
        table = ptes[5] & ~0xFFF
        assert ptes[6] & ~0xFFF == table  # one PT page maps both
        for e in ptes.values():
            pts.write_entry(e, pts.read_entry(e) & ~(P.PT_ACCESSED | P.PT_DIRTY))
        clean(m, [5, 6], [table])
        run(m, Program().read(data_gva(5))  # sets A in a PTE: a write to the PT page
            .read(data_gva(6))  # another A in the same page: its EPT D is set now
            .write(data_gva(5), 1))  # D in the PTE (no new log) and the data page
        assert logged(vcpu) == [table, data_gva(5)]
        assert pts.read_entry(ptes[6]) & P.PT_ACCESSED
        assert pts.read_entry(ptes[5]) & P.PT_DIRTY
        vm.sync_dirty_log()
        assert bitmap(vm, PT_SLOT) == [table >> 12]
        assert bitmap(vm) == gfns(5)
    finally:
        m.vm.destroy()


def test_the_513th_logged_page_exits_pml_full_and_every_page_reaches_the_bitmap():
    n = PML_ENTITY_NUM + 1
    m = logged_machine(n + 7, n)
    try:
        vm, vcpu = m.vm, m.vm.vcpus[0]
        cost = vm.engine.cost
        clean(m, range(n))
        prog = Program()
        for i in range(n):
            prog.write(data_gva(i), 7)
        run(m, prog)
        assert vcpu.exits.get("pml_full") == 1
        # The exit came before the 513th page's D bit was set, drained the 512 logged ones,
        # and the write then logged its page in the emptied buffer.
        assert bitmap(vm) == gfns(*range(PML_ENTITY_NUM))
        assert logged(vcpu) == [data_gva(PML_ENTITY_NUM)]
        # One exit and entry, and the flush of 512 entries; nothing else exited.
        exit_ns = vcpu.task.statistics().phases.get("exit", 0)
        assert exit_ns == cost.vm_exit + cost.vm_entry + PML_ENTITY_NUM * cost.pml_flush_per_entry
        assert (vm.get_dirty_log(0, DATA_SLOT) == gfns(*range(n))).all()
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("exit_kind", ["cr", "ept_violation"])
def test_every_vm_exit_drains_the_pml_buffer(exit_kind):
    m = logged_machine(8, 4)
    try:
        vm, vcpu = m.vm, m.vm.vcpus[0]
        clean(m, [0])
        prog = Program().write(data_gva(0), 1)
        if exit_kind == "cr":
            prog.mov_cr0(vcpu.cr0)  # intercepted under EPT too
        else:
            prog.read(data_gva(7))  # never mapped: an EPT violation
        exits = dict(vcpu.exits)
        run(m, prog)
        assert vcpu.exits[exit_kind] == exits.get(exit_kind, 0) + 1
        assert logged(vcpu) == []
        assert bitmap(vm) == gfns(0)
    finally:
        m.vm.destroy()


def test_reading_the_dirty_log_while_a_vcpu_runs_kicks_it_and_gets_its_buffered_pages():
    m = logged_machine(8, 4)
    try:
        vm, vcpu = m.vm, m.vm.vcpus[0]
        clean(m, range(4))
        harvest = {}

        def collector():
            vm.engine.delay(50_000)
            harvest["gfns"] = vm.get_dirty_log(0, DATA_SLOT).tolist()
            harvest["vcpu running"] = not vcpu.task.finished

        vm.engine.spawn("collector", collector)
        run(m, Program().write(data_gva(0), 1).write(data_gva(1), 1).pause(200_000))
        assert harvest["gfns"] == gfns(0, 1)  # no exit happened: the kick drained the buffer
        assert harvest["vcpu running"]
    finally:
        m.vm.destroy()


def test_pml_follows_whether_any_memslot_logs_dirty_pages():
    m = logged_machine(8, 8, log_dirty=False)
    try:
        vm, vcpu = m.vm, m.vm.vcpus[0]
        clean(m, range(8))
        run(m, Program().write(data_gva(0), 1))
        assert logged(vcpu) == [] and ept_leaf(vm, vcpu, data_gva(0)) & E.EPT_DIRTY
        # Another slot starts logging: PML goes on in every vCPU (kvm_mmu_update_cpu_dirty_
        # logging); the data slot does not log, so draining the log drops its pages.
        vm.add_memslot(9, 0x8000_0000, 4 << 12, log_dirty=True)
        run(m, Program().write(data_gva(1), 1))
        assert logged(vcpu) == [data_gva(1)]
        vm.sync_dirty_log()
        assert logged(vcpu) == []
        vm.set_dirty_logging(0, 9, False)
        run(m, Program().write(data_gva(2), 1))
        assert logged(vcpu) == []
        assert ept_leaf(vm, vcpu, data_gva(2)) & E.EPT_DIRTY
    finally:
        m.vm.destroy()


@pytest.mark.parametrize(("params", "sets_d"), [
    ({"pml": False}, True),
    ({"ept_ad": False}, False),  # no D bits, so nothing to log (and KVM turns PML off)
], ids=["pml-off", "ept-ad-off"])
def test_no_logging_when_pml_or_ept_ad_is_off(params, sets_d):
    m = logged_machine(8, 4, **params)
    try:
        vm, vcpu = m.vm, m.vm.vcpus[0]
        assert vcpu._pml_log() is W.NO_PML
        clean(m, range(4))
        run(m, Program().write(data_gva(0), 1).read(data_gva(1)).write(data_gva(1), 1))
        assert logged(vcpu) == []
        assert bitmap(vm) == []  # the hardware logged nothing (KVM write-protects instead)
        assert bool(ept_leaf(vm, vcpu, data_gva(1)) & E.EPT_DIRTY) == sets_d
    finally:
        m.vm.destroy()


def test_no_pml_under_shadow_paging():
    m = logged_machine(8, 4, config="shadow")
    try:
        vm, vcpu = m.vm, m.vm.vcpus[0]
        assert vcpu._pml_log() is W.NO_PML
        vm.get_dirty_log(0, DATA_SLOT)
        run(m, Program().write(data_gva(0), 1).write(data_gva(5), 1))
        assert logged(vcpu) == [] and "pml_full" not in vcpu.exits
        assert (vm.get_dirty_log(0, DATA_SLOT) == gfns(0, 5)).all()  # the shadow MMU's log
    finally:
        m.vm.destroy()
