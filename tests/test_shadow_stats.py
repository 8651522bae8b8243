"""The shadow MMU's own events in the backend statistics (reclaimed pages, unsync pages,
syncs, emulated guest PTE writes: types.MMUStats, report BackendStats) and
VM.set_nr_mmu_pages (KVM_SET_NR_MMU_PAGES)."""

import pytest

from mmu_core import InvalidConfig, Role, VMConfig
from mmu_core.guest.machine import DATA_GPA, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.params import CONFIGURATIONS
from mmu_core.report.models import BackendStats
from mmu_core.workloads.demand_paging import backend_stats


def _machine(config, pages):
    return build_machine(MachineSpec(vcpus=1, data_size=pages * 4096),
                         VMConfig(params=CONFIGURATIONS[config]))


def test_set_nr_mmu_pages_validates_and_reaches_the_backend():
    m = _machine("shadow", 16)
    try:
        sh = m.vm.backend_instances["shadow"]
        for bad in (63, 0, -1, True, 1.5, "100"):
            with pytest.raises(InvalidConfig):
                m.vm.set_nr_mmu_pages(bad)
        assert sh.n_max != 100
        assert m.vm.set_nr_mmu_pages(100) == 100
        assert sh.n_max == 100 and sh.n_requested == 100
    finally:
        m.vm.destroy()


def test_set_nr_mmu_pages_beside_the_tdp_mmu_limits_the_nested_shadow_mmu():
    """The TDP MMU has no limit; KVM_SET_NR_MMU_PAGES then governs the shadow MMU that
    builds EPT02 (n_max_mmu_pages counts shadow pages only). A backend with neither (the
    simple example) answers None."""
    m = _machine("tdp", 16)
    try:
        with pytest.raises(InvalidConfig):
            m.vm.set_nr_mmu_pages(10)
        assert m.vm.set_nr_mmu_pages(100) == 100
        assert m.vm.managers[Role.NESTED].get_plugin("shadow").n_max == 100
    finally:
        m.vm.destroy()


def test_reclaim_and_unsync_reach_the_backend_stats():
    regions = 80  # one level-1 table per 2 MiB region: more than a 64-page limit
    m = _machine("shadow", 512 * regions)
    try:
        m.vm.set_nr_mmu_pages(64)
        prog = Program()
        for r in range(regions):
            prog.write(DATA_GPA + 4096 * 512 * r, r + 1)
        m.run_programs([prog.build()])
        sh = m.vm.backend_instances["shadow"]
        c = sh.counters()
        st = backend_stats(m.vm)
        assert st.reclaimed_pages == c["recycled"] > 0
        assert st.unsync_pages == c["unsync"] and st.syncs == c["sync_pages"]
        assert st.emulated_pte_writes == c["track_writes"]
    finally:
        m.vm.destroy()


def test_tdp_has_none_and_old_reports_load():
    m = _machine("tdp", 16)
    try:
        m.run_programs([Program().write(DATA_GPA, 1).build()])
        st = backend_stats(m.vm)
        assert (st.reclaimed_pages, st.unsync_pages, st.syncs, st.emulated_pte_writes) == (
            None, None, None, None)
    finally:
        m.vm.destroy()
    old = {"faults": 1, "retries": 0, "mapped_4k": 1, "mapped_2m": 0, "mapped_1g": 0,
           "mmio_sptes": 0}
    assert BackendStats.model_validate(old).reclaimed_pages is None
