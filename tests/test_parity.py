"""Backend parity: the guest cannot tell tdp, legacy and shadow paging apart.

Random guest programs (hypothesis) run under each configuration with the same seed; the
digest of everything the guest observes must match. Programs follow the architecture's
rules for a well-behaved OS: after editing an entry the guest invalidates what it changed
(INVLPG for a leaf, MOV CR3 for a non-leaf), since what a stale TLB entry yields is
implementation-specific and may legitimately differ between configurations.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity_util import DATA_PAGES, MMIO_GVA, data_gva, run_everywhere, spec_for

from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import MMIO_GPA
from mmu_core.guest.program import Program
from mmu_core.hw import cpu as C

FLAG_BITS = (P.PT_PRESENT, P.PT_WRITABLE, P.PT_USER, P.PT_ACCESSED, P.PT_DIRTY)

op_strategy = st.one_of(
    st.tuples(st.just("read"), st.integers(0, DATA_PAGES + 1)),
    st.tuples(st.just("write"), st.integers(0, DATA_PAGES + 1), st.integers(1, 2**40)),
    st.tuples(st.just("fetch"), st.integers(0, DATA_PAGES + 1)),
    st.tuples(st.just("pte"), st.integers(0, DATA_PAGES - 1), st.integers(0, 31),
              st.booleans(), st.integers(0, DATA_PAGES - 1)),
    st.tuples(st.just("pde"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("cpl"), st.sampled_from([0, 3])),
    st.tuples(st.just("ac"), st.booleans()),
    st.tuples(st.just("wp"), st.booleans()),
    st.tuples(st.just("cr4"), st.booleans(), st.booleans()),
    st.tuples(st.just("cr3")),
)


def _gva(i: int) -> int:
    if i == DATA_PAGES:
        return MMIO_GVA
    if i == DATA_PAGES + 1:
        return data_gva(DATA_PAGES + 600)  # unmapped: not present at the leaf or above
    return data_gva(i)


def build(ops, mode):
    def program(machine):
        pts = machine.pts
        setup = machine.paging
        ebytes = int(P.MODE_ENTRY_BYTES[mode])
        prog = Program()
        cr0, cr4 = setup.cr0, setup.cr4
        for op in ops:
            kind = op[0]
            if kind == "read":
                prog.read(_gva(op[1]) + 8)
            elif kind == "write":
                prog.write(_gva(op[1]), op[2])
            elif kind == "fetch":
                prog.fetch(_gva(op[1]))
            elif kind == "pte" and mode != P.MODE_NONE:
                _, page, flags, nx, target = op
                value = sum(b for k, b in enumerate(FLAG_BITS) if flags >> k & 1)
                if nx and pts.nx:
                    value |= P.PT_NX
                e_gpa = pts.entry_gpa(data_gva(page), 1, create=False)
                prog.store_pte(pts.pt_gva_of(e_gpa), pts.leaf_value(data_gva(target), value), ebytes)
                prog.invlpg(data_gva(page))
            elif kind == "pde" and mode != P.MODE_NONE:
                _, flags, nx = op
                value = P.PT_PRESENT | (P.PT_WRITABLE if flags & 1 else 0) | (P.PT_USER if flags & 2 else 0)
                value |= P.PT_ACCESSED if flags & 4 else 0
                if nx and pts.nx:
                    value |= P.PT_NX
                e_gpa = pts.entry_gpa(data_gva(0), 2, create=False)
                child = pts.read_entry(e_gpa) & ~0xFFF & ((1 << 52) - 1)
                prog.store_pte(pts.pt_gva_of(e_gpa), child | value, ebytes)
                prog.mov_cr3(setup.cr3)
            elif kind == "cpl":
                prog.set_cpl(op[1])
            elif kind == "ac":
                prog.set_ac(op[1])
            elif kind == "wp":
                cr0 = (cr0 | P.CR0_WP) if op[1] else (cr0 & ~P.CR0_WP)
                prog.mov_cr0(cr0)
            elif kind == "cr4":
                cr4 = cr4 & ~(P.CR4_SMEP | P.CR4_SMAP)
                cr4 |= (P.CR4_SMEP if op[1] else 0) | (P.CR4_SMAP if op[2] else 0)
                prog.mov_cr4(cr4)
            elif kind == "cr3":
                prog.mov_cr3(setup.cr3)
        # End by reading every data page, so the final state is observed too.
        for i in range(DATA_PAGES):
            prog.read(data_gva(i))
        return [prog.build()]

    return program


def assert_parity(runs):
    digests = {name: d for name, (d, _) in runs.items()}
    if len(set(digests.values())) != 1:
        base = runs["tdp"][1][0]
        for name, (_, res) in runs.items():
            diff = np.flatnonzero((res[0] != base).any(axis=1))
            if len(diff):
                raise AssertionError(f"{name} differs from tdp first at op {diff[0]}: "
                                     f"{res[0][diff[0]]} vs {base[diff[0]]}; digests {digests}")
        raise AssertionError(f"digests differ (memory or MMIO): {digests}")


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
