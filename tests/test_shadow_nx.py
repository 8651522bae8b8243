"""NX huge pages (kvm.nx_huge_pages, the iTLB multihit mitigation) in the legacy MMU: huge
leaves are not executable, a fetch maps 4K, and later faults go below the table made for it
(disallowed_hugepage_adjust) instead of replacing it with a huge leaf again; the recovery
worker (mmu_core/nx_recovery.py) zaps such tables so the range maps huge again, and forgets
those in dirty-logged slots (under legacy and tdp alike)."""

import pytest

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_core.guest.machine import DATA_GPA, DATA_SLOT, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.audit import audit


def _machine(nx: bool, config: str = "legacy", **params):
    params = CONFIGURATIONS[config].model_copy(update={"nx_huge_pages": nx, **params})
    spec = MachineSpec(vcpus=1, data_size=4 << 20, backing="thp", mode=P.MODE_4LEVEL)
    return build_machine(spec, VMConfig(params=params))


def _leaf(m, page: int) -> tuple[int, int]:
    """(level, spte) of the EPT leaf mapping data page `page` in vCPU 0's root."""
    vm = m.vm
    gfn = vm.memslots[0].by_id(DATA_SLOT).base_gfn + page
    table, level = vm.vcpus[0].mmu_root, vm.root_levels(vm.vcpus[0])
    while level >= 1:
        spte = int(vm.spte_table(table)[(gfn >> (9 * (level - 1))) & 511])
        if not S.is_shadow_present_pte(spte):
            return 0, 0
        if S.is_last_spte(spte, level):
            return level, spte
        table, level = S.spte_to_pfn(spte), level - 1
    return 0, 0


@pytest.mark.parametrize("nx", [True, False])
def test_a_fetch_maps_4k_and_data_faults_go_below_its_table(nx):
    m = _machine(nx)
    try:
        page = lambda k: DATA_GPA + 4096 * k  # noqa: E731 (identity-mapped data)
        m.run_programs([Program().read(page(0)).build()])
        level, spte = _leaf(m, 0)
        assert level == 2 and bool(spte & S.VMX_EPT_EXECUTABLE_MASK) is not nx
        m.run_programs([Program().fetch(page(5)).build()])
        level, spte = _leaf(m, 5)
        assert level == (1 if nx else 2) and spte & S.VMX_EPT_EXECUTABLE_MASK
        faults = dict(m.vm.vcpus[0].faults)
        # data in the same 2 MiB (beyond the prefetch of the fetch's neighbours): mapped 4K under
        # the fetch's table, which stays, so the code does not fault again (no ping-pong)
        m.run_programs([Program().read(page(100)).fetch(page(5)).build()])
        assert _leaf(m, 100)[0] == (1 if nx else 2)
        assert _leaf(m, 5)[0] == (1 if nx else 2)
        after = m.vm.vcpus[0].faults
        assert sum(after.values()) - sum(faults.values()) == (1 if nx else 0)
        assert not audit(m.vm)
    finally:
        m.vm.destroy()


def _page(k: int) -> int:
    return DATA_GPA + 4096 * k  # identity-mapped data


def _mmu(m):
    """The L1 backend instance (the legacy MMU is the shadow plugin's)."""
    insts = m.vm.backend_instances
    return insts["tdp"] if "tdp" in insts else insts["shadow"]


def _split_pages(m) -> int:
    """Tables the backend keeps for NX recovery."""
    mmu = _mmu(m)
    return len(mmu.nx_pages) if hasattr(mmu, "nx_pages") else len(mmu.nx_tables)


def test_the_recovery_worker_lets_the_legacy_mmu_map_huge_again():
    m = _machine(True, nx_huge_pages_recovery_period_ms=1, nx_huge_pages_recovery_ratio=1)
    try:
        mmu = _mmu(m)
        m.run_programs([Program().fetch(_page(5)).build()])
        assert _leaf(m, 5)[0] == 1 and _split_pages(m) == 1 and mmu.stats["nx_split"] == 1
        assert not audit(m.vm)
        m.run_programs([Program().pause(3_000_000).build()])  # the worker runs every 1 ms
        assert mmu.stats["nx_recovered"] == 1 and _split_pages(m) == 0
        assert _leaf(m, 5) == (0, 0)  # zapped with its table
        m.run_programs([Program().read(_page(6)).build()])
        assert _leaf(m, 6)[0] == 2  # huge again for data accesses
        assert not audit(m.vm)
    finally:
        m.vm.destroy()


def test_the_worker_starts_once():
    m = _machine(True, nx_huge_pages_recovery_period_ms=1, nx_huge_pages_recovery_ratio=1)
    try:
        worker = _mmu(m).nx_worker
        worker.start()  # again: no second worker zapping at twice the rate
        names = [t.name for t in m.vm.engine.tasks]
        assert names.count("kvm-nx-lpage-recovery") == 1 and worker.task.name in names
    finally:
        m.vm.destroy()


def test_without_a_ratio_the_worker_does_not_run():
    m = _machine(True, nx_huge_pages_recovery_period_ms=1, nx_huge_pages_recovery_ratio=0)
    try:
        m.run_programs([Program().fetch(_page(5)).pause(3_000_000).build()])
        assert _split_pages(m) == 1 and _mmu(m).stats["nx_recovered"] == 0
        assert _leaf(m, 5)[0] == 1
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["legacy", "tdp"])
def test_recovery_forgets_split_pages_of_a_dirty_logged_slot(config):
    """kvm_recover_nx_huge_pages unaccounts them instead of zapping: they would only fault
    back 4K, and disabling dirty logging recovers the slot's huge pages anyway."""
    m = _machine(True, config, nx_huge_pages_recovery_period_ms=1,
                 nx_huge_pages_recovery_ratio=1)
    try:
        m.run_programs([Program().fetch(_page(5)).build()])
        assert _split_pages(m) == 1
        m.vm.set_dirty_logging(0, DATA_SLOT, True)
        m.run_programs([Program().pause(3_000_000).build()])
        assert _split_pages(m) == 0 and _mmu(m).stats["nx_recovered"] == 0
        assert _leaf(m, 5)[0] == 1  # still mapped: forgotten, not zapped
        assert not audit(m.vm)
    finally:
        m.vm.destroy()
