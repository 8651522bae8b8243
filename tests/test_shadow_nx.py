"""NX huge pages (kvm.nx_huge_pages, the iTLB multihit mitigation) in the legacy MMU: huge
leaves are not executable, a fetch maps 4K, and later faults go below the table made for it
(disallowed_hugepage_adjust) instead of replacing it with a huge leaf again."""

import pytest

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_core.guest.machine import DATA_GPA, DATA_SLOT, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.audit import audit


def _machine(nx: bool):
    params = CONFIGURATIONS["legacy"].model_copy(update={"nx_huge_pages": nx})
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
