"""Backend parity: the guest cannot tell tdp, legacy and shadow paging apart.

Random guest programs (hypothesis) run under each configuration with the same seed; the
digest of everything the guest observes must match (mmu_core.testing.programs).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import MMIO_GPA
from mmu_core.guest.program import Program
from mmu_core.hw import cpu as C
from mmu_core.testing.programs import (
    DATA_PAGES,
    MMIO_GVA,
    assert_parity,
    build,
    data_gva,
    run_everywhere,
    spec_for,
)
from mmu_core.testing.strategies import op_strategy


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_strategy, min_size=1, max_size=40))
def test_random_programs_are_indistinguishable_in_4level_mode(ops):
    assert_parity(run_everywhere(spec_for(P.MODE_4LEVEL), build(ops, P.MODE_4LEVEL)))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from([P.MODE_5LEVEL, P.MODE_PAE, P.MODE_32, P.MODE_NONE]),
       ops=st.lists(op_strategy, min_size=1, max_size=30))
def test_random_programs_are_indistinguishable_in_other_modes(mode, ops):
    assert_parity(run_everywhere(spec_for(mode), build(ops, mode)))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_strategy, min_size=1, max_size=30), thp=st.booleans())
def test_random_programs_with_dirty_logging_give_identical_dirty_logs(ops, thp):
    spec = spec_for(P.MODE_4LEVEL, log_dirty=True)
    if thp:
        spec = spec_for(P.MODE_4LEVEL, log_dirty=True, backing="thp")
        spec.data_size = 2 << 20
    assert_parity(run_everywhere(spec, build(ops, P.MODE_4LEVEL)))


def test_mmio_and_injected_faults_are_reported_identically():
    def program(machine):
        return [Program().read(MMIO_GVA).write(MMIO_GVA + 8, 5).set_cpl(3)
                .read(data_gva(DATA_PAGES + 600)).build()]

    runs = run_everywhere(spec_for(P.MODE_4LEVEL), program)
    assert_parity(runs)
    res = runs["shadow"][1][0]
    assert res[3, C.RES_VECTOR] == 14
    assert res[3, C.RES_CODE] == 0b100  # user read, not present
    assert res[0, C.RES_VALUE] != 0  # the MMIO device answered


def test_guest_pte_edit_without_invlpg_then_with_it():
    """A PTE made not-present takes effect after INVLPG in every configuration."""
    def program(machine):
        pts = machine.pts
        e_gpa = pts.entry_gpa(data_gva(1), 1, create=False)
        return [Program().write(data_gva(1), 7).read(data_gva(1))
                .store_pte(pts.pt_gva_of(e_gpa), 0).invlpg(data_gva(1)).read(data_gva(1))
                .build()]

    runs = run_everywhere(spec_for(P.MODE_4LEVEL), program)
    assert_parity(runs)
    res = runs["legacy"][1][0]
    assert res[1, C.RES_VALUE] == 7
    assert res[4, C.RES_VECTOR] == 14 and res[4, C.RES_CODE] == 0
    assert MMIO_GPA == MMIO_GVA
