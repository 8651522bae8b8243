"""Host events reach the MMU through notifiers; teardown returns every page-table page."""

import pytest
from parity_util import data_gva, spec_for

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import DATA_SLOT, build_machine
from mmu_core.guest.program import Program
from mmu_core.hw import cpu as C
from mmu_core.params import CONFIGURATIONS


def machine_for(name):
    return build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=CONFIGURATIONS[name]))


def hva_of(machine, page):
    slot = machine.vm.memslots[0].by_id(DATA_SLOT)
    return slot.userspace_addr + page * 4096


def run(machine, prog):
    return machine.run_programs([prog.build()])[0]


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_unmapped_page_faults_again_and_reads_a_fresh_zero_page(name):
    m = machine_for(name)
    try:
        run(m, Program().write(data_gva(2), 41).read(data_gva(2)))
        exits_before = sum(v.exits.get("ept_violation", 0) + v.exits.get("shadow_pf", 0)
                           for v in m.vm.vcpus)
        m.vm.mm.madvise_dontneed(hva_of(m, 2), 4096)
        res = run(m, Program().read(data_gva(2)))
        exits_after = sum(v.exits.get("ept_violation", 0) + v.exits.get("shadow_pf", 0)
                          for v in m.vm.vcpus)
        assert res[0, C.RES_VALUE] == 0
        assert exits_after == exits_before + 1
        assert m.vm.mm.stats.notifier_calls["madvise_dontneed"] == 1
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_migrated_page_keeps_its_contents_at_a_new_frame(name):
    m = machine_for(name)
    try:
        run(m, Program().write(data_gva(3), 99))
        old = m.vm.mm.lookup(hva_of(m, 3))
        new = m.vm.mm.migrate(hva_of(m, 3))
        res = run(m, Program().read(data_gva(3)))
        assert new != old
        assert res[0, C.RES_VALUE] == 99
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_ksm_merge_makes_the_duplicate_read_the_kept_page(name):
    m = machine_for(name)
    try:
        run(m, Program().write(data_gva(4), 5).write(data_gva(5), 6).read(data_gva(5)))
        m.vm.mm.ksm_merge(hva_of(m, 4), hva_of(m, 5))
        res = run(m, Program().read(data_gva(5)))
        assert res[0, C.RES_VALUE] == 5
    finally:
        m.vm.destroy()


def test_aging_without_an_age_hook_reports_every_page_young():
    m = machine_for("tdp")
    try:
        run(m, Program().read(data_gva(0)))
        assert m.vm.mm.age(hva_of(m, 0), 4 * 4096) == 4
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_teardown_returns_every_page_table_page(name):
    m = machine_for(name)
    run(m, Program().read(data_gva(0)).write(data_gva(9), 1).read(0xF000_0000))
    assert m.vm.pt_pages_in_use() > 0
    m.vm.destroy()
    assert m.vm.pt_pages_in_use() == 0


def test_zap_all_forces_reload_and_refault_with_same_data():
    m = machine_for("tdp")
    try:
        run(m, Program().write(data_gva(1), 8))
        m.vm.zap_all()
        res = run(m, Program().read(data_gva(1)))
        assert res[0, C.RES_VALUE] == 8
    finally:
        m.vm.destroy()
