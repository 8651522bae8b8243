"""MMIO SPTEs and memslot changes: generations, read-only slots, dirty logs, SMM slots."""

import numpy as np
import pytest
from parity_util import data_gva, run_everywhere, spec_for

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import DATA_SLOT, MMIO_GPA, build_machine
from mmu_core.guest.program import Program
from mmu_core.hw import cpu as C
from mmu_core.params import CONFIGURATIONS
from mmu_core.vm.vcpu import mmio_read_value


def test_second_mmio_access_takes_the_generation_checked_fast_path_under_tdp():
    m = build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=CONFIGURATIONS["tdp"]))
    try:
        res = m.run_programs([Program().read(MMIO_GPA).read(MMIO_GPA).build()])[0]
        backend = m.vm.backend_instances["tdp"]
        assert (backend.stats["mmio"], backend.stats["mmio_fast"]) == (1, 1)
        assert list(res[:, C.RES_VALUE]) == [mmio_read_value(MMIO_GPA)] * 2
        exits = m.vm.vcpus[0].exits
        assert (exits["ept_misconfig"], exits["mmio"]) == (1, 2)
        # 4 guest page-table pages and the MMIO gfn itself were EPT violations
        assert exits["ept_violation"] == 5
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_memslot_added_over_mmio_makes_the_stale_mmio_spte_go_away(name):
    m = build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=CONFIGURATIONS[name]))
    try:
        m.run_programs([Program().read(MMIO_GPA).build()])
        gen = m.vm.memslots_generation()
        m.vm.add_memslot(7, MMIO_GPA, 16 * 4096)
        assert m.vm.memslots_generation() == gen + 1
        res = m.run_programs([Program().write(MMIO_GPA, 77).read(MMIO_GPA).build()])[0]
        assert res[1, C.RES_VALUE] == 77
        assert len(m.vm.vcpus[0].mmio) == 1  # only the access before the slot existed
    finally:
        m.vm.destroy()


def test_readonly_slot_reads_memory_and_writes_exit_as_mmio_in_every_configuration():
    def program(machine):
        return [Program().read(data_gva(1)).write(data_gva(1), 5).read(data_gva(1)).build()]

    runs = run_everywhere(spec_for(P.MODE_4LEVEL, readonly=True), program)
    assert len({d for d, _ in runs.values()}) == 1
    res = runs["tdp"][1][0]
    assert list(res[:, C.RES_VALUE]) == [0, 0, 0]


def test_dirty_log_holds_exactly_the_written_pages_in_every_configuration():
    def program(machine):
        return [Program().read(data_gva(0)).write(data_gva(2), 1).write(data_gva(5), 2)
                .read(data_gva(5)).build()]

    logs = {}
    for name, params in CONFIGURATIONS.items():
        m = build_machine(spec_for(P.MODE_4LEVEL, log_dirty=True), VMConfig(params=params))
        try:
            m.run_programs(program(m))
            slot = m.vm.memslots[0].by_id(DATA_SLOT)
            logs[name] = m.vm.get_dirty_log(0, DATA_SLOT) - slot.base_gfn
            # after the collector cleared and re-protected, a new write is logged again
            m.run_programs([Program().write(data_gva(2), 3).build()])
            logs[name + "+"] = m.vm.get_dirty_log(0, DATA_SLOT) - slot.base_gfn
        finally:
            m.vm.destroy()
    for name in CONFIGURATIONS:
        assert list(logs[name]) == [2, 5]
        assert list(logs[name + "+"]) == [2]


def test_smm_address_space_has_its_own_memslots():
    m = build_machine(spec_for(P.MODE_NONE), VMConfig(params=CONFIGURATIONS["tdp"]))
    try:
        m.vm.add_memslot(9, 0x3000_0000, 4096, as_id=1)
        assert m.vm.gfn_to_memslot(1, 0x3000_0000 >> 12).id == 9
        assert m.vm.gfn_to_memslot(0, 0x3000_0000 >> 12) is None
        vcpu = m.vm.vcpus[0]
        vcpu.smm = True
        vcpu.mmu_root = None
        res = m.run_programs([Program().write(0x3000_0000, 4).read(0x3000_0000).build()])[0]
        assert res[1, C.RES_VALUE] == 4
        assert np.count_nonzero(res[:, C.RES_VECTOR]) == 0
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_moved_memslot_is_reached_at_its_new_address_and_the_old_one_is_mmio(name):
    m = build_machine(spec_for(P.MODE_NONE), VMConfig(params=CONFIGURATIONS[name]))
    try:
        m.run_programs([Program().write(data_gva(0), 9).build()])
        m.vm.move_memslot(0, DATA_SLOT, 0x8000_0000)
        res = m.run_programs([Program().read(0x8000_0000).read(data_gva(0)).build()])[0]
        assert res[0, C.RES_VALUE] == 9
        assert res[1, C.RES_VALUE] == mmio_read_value(data_gva(0))
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("zap_all", [True, False])
@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_deleting_a_memslot_zaps_everything_only_under_the_slot_zap_all_quirk(name, zap_all):
    """KVM_X86_QUIRK_SLOT_ZAP_ALL (on by default): kvm_arch_flush_shadow_memslot zaps every
    mapping with the fast zap; with the quirk disabled, only the deleted slot's. Either way
    the guest sees the same memory."""
    params = CONFIGURATIONS[name].model_copy(update={"slot_zap_all": zap_all})
    m = build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=params))
    try:
        m.run_programs([Program().write(data_gva(0), 9).build()])
        m.vm.add_memslot(7, MMIO_GPA, 16 * 4096)
        before = sum(m.vm.vcpus[0].faults.values())
        m.vm.delete_memslot(0, 7)
        res = m.run_programs([Program().read(data_gva(0)).build()])[0]
        assert res[0, C.RES_VALUE] == 9
        refaulted = sum(m.vm.vcpus[0].faults.values()) - before
        assert (refaulted > 0) is zap_all
    finally:
        m.vm.destroy()
