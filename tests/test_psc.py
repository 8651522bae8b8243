"""Paging-structure caches (SDM vol. 3A 4.10.3; vol. 3C 29.4): the hardware caches non-leaf
entries of the structure it walks from the MMU's root (EPT under TDP, shadow tables under shadow
paging) and only a flush empties them.

Two kinds of checks: a walk that starts from cached entries gives exactly what a full walk gives
over unchanged memory (result, A/D bits, exit qualification) while reading fewer entries; and a
vCPU keeps walking through a table the MMU disconnected until the flush that precedes freeing,
which is what makes that flush necessary.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity_util import data_gva, run_everywhere, spec_for
from walker_util import UPPER, Ept, Guest

from mmu_core import VMConfig
from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import DATA_GPA, DATA_SLOT, build_machine
from mmu_core.guest.program import Program
from mmu_core.host.memory import HostMemory
from mmu_core.hw import cpu as C
from mmu_core.hw import tlb as T
from mmu_core.hw import walker as W
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.parity import guest_digest
from mmu_core.testing.programs import build
from mmu_core.testing.strategies import op_strategy

GVA = 0x4035_6789  # guest path: PML4 0, PDPT 1, PD 1, PT 0x156
TABLE_GPA_OFFSET = 0x10_0000_0000  # guest tables at gpa = hpa + this (one EPT PDE region)
DATA_GPA_2D = 0x2_3456_7000
DATA_HPA = {1: 0x9_8765_4000, 2: 0x9_8760_0000, 3: 0x9_4000_0000}
COMPARED = (W.OUT_STATUS, W.OUT_ADDR, W.OUT_CODE, W.OUT_LEVEL, W.OUT_ATTR, W.OUT_HPA)


# --- the walker with and without caches ---------------------------------------------------------
class World2D:
    """A guest path for GVA, its tables and data mapped through EPT (upper EPT entries without
    A, as a fresh hand-built EPT: they become cacheable once a successful walk sets A)."""

    def __init__(self, mode=P.MODE_4LEVEL, ept_levels=4, data_leaf=1, data_perm=E.EPT_RWX):
        self.mem = HostMemory()
        self.g = Guest(mode, gva=GVA, gpa_offset=TABLE_GPA_OFFSET, mem=self.mem)
        self.g.set(1, DATA_GPA_2D | UPPER)
        self.ept = Ept(self.mem, ept_levels)
        for lv, pfn in self.g.tables.items():
            self.ept.map(self.g.table_gpa(lv), pfn << 12)
        self.ept.map(DATA_GPA_2D, DATA_HPA[data_leaf], level=data_leaf, perm=data_perm)

    def args(self):
        return (W.XL_EPT, self.ept.root, self.ept.levels)


class World1D:
    """Shadow-like tables walked 1-D (XL_NONE) in 4-level or 5-level paging."""

    def __init__(self, mode=P.MODE_4LEVEL):
        self.mem = HostMemory()
        self.g = Guest(mode, gva=GVA, mem=self.mem)
        self.g.set(1, DATA_GPA_2D | UPPER)

    def args(self):
        return (W.XL_NONE, 0, 0)


def walk_both(world, psc, acc=EC.ACC_READ, flags=0, gva=GVA):
    """One walk with the caches in `psc` over the real memory and one full walk over a copy of
    the same memory; returns both outputs and asserts the memory ends up identical."""
    mem = world.mem
    regs = world.g.regs
    regs[W.R_FLAGS] = flags
    ref_pt = mem.pt.copy()
    xl, root, levels = world.args()
    cached, full = W.new_out(), W.new_out()
    W.walk_cached(mem.pt, mem.pt_slot, regs, gva, acc, True, xl, root, levels, True, W.EMPTY_MS,
                  W.EMPTY_HVA, psc, W.NO_PML, cached)
    W.walk(ref_pt, mem.pt_slot, regs, gva, acc, True, xl, root, levels, W.EMPTY_MS,
           W.EMPTY_HVA, full)
    assert np.array_equal(mem.pt, ref_pt), "a cached walk changed memory differently"
    return cached, full


def assert_same_result(cached, full, two_d):
    assert [int(cached[i]) for i in COMPARED] == [int(full[i]) for i in COMPARED]
    if two_d:  # the guest dimension is never cached: same entries read, same A/D set
        n = int(full[W.OUT_N])
        assert int(cached[W.OUT_N]) == n
        assert int(cached[W.OUT_ADW]) == int(full[W.OUT_ADW])
        assert list(cached[W.OUT_TGPA:W.OUT_TGPA + n]) == list(full[W.OUT_TGPA:W.OUT_TGPA + n])
        assert list(cached[W.OUT_TPTE:W.OUT_TPTE + n]) == list(full[W.OUT_TPTE:W.OUT_TPTE + n])
    # every read the cache saved is one the full walk made
    assert int(full[W.OUT_READS]) - int(cached[W.OUT_READS]) == int(cached[W.OUT_SKIPPED])
    assert int(full[W.OUT_SKIPPED]) == 0


def test_a_2d_walk_hits_the_ept_pde_cache_for_every_translation():
    w = World2D()
    psc = T.new_tlb(16)
    cached, full = walk_both(w, psc)
    assert_same_result(cached, full, True)
    # Cold: 4 guest entries, and 5 EPT translations (4 tables, the data page) of 4 reads each.
    assert int(cached[W.OUT_READS]) == 4 + 5 * 4
    assert int(cached[W.OUT_SKIPPED]) == 0
    cached, full = walk_both(w, psc)
    assert_same_result(cached, full, True)
    assert int(cached[W.OUT_STATUS]) == W.W_OK
    # Warm: each EPT translation starts below a cached PDE and reads only its EPT PTE.
    assert int(cached[W.OUT_READS]) == 4 + 5 * 1
    assert int(cached[W.OUT_SKIPPED]) == 5 * 3
    _, tables = T.cached_frames(psc)
    data_pt, _ = w.ept._locate(DATA_GPA_2D, 1, False)
    assert data_pt in tables.tolist()


def test_a_1d_walk_over_shadow_tables_hits_the_pde_cache():
    for mode, levels in ((P.MODE_4LEVEL, 4), (P.MODE_5LEVEL, 5)):
        w = World1D(mode)
        psc = T.new_tlb(16)
        cached, full = walk_both(w, psc, EC.ACC_WRITE)
        assert_same_result(cached, full, False)
        assert int(cached[W.OUT_READS]) == levels
        cached, full = walk_both(w, psc, EC.ACC_WRITE)
        assert_same_result(cached, full, False)
        assert int(cached[W.OUT_READS]) == 1 and int(cached[W.OUT_SKIPPED]) == levels - 1
        assert int(cached[W.OUT_N]) == 1  # only the PTE was read
        assert int(cached[W.OUT_TGPA]) == w.g.entry_gpa(1)


def test_entries_are_cached_only_once_the_accessed_flags_above_them_are_set():
    """SDM 4.10.3.1: no PDE-cache entry unless A is 1 in the PML4E, PDPTE and PDE. A walk that
    faults sets no A bit, so it caches only what already had A on the whole path."""
    w = World1D()
    w.g.set(1, 0)  # the PTE is not present: every walk faults, no A is set
    psc = T.new_tlb(16)
    walk_both(w, psc)
    assert T.psc_count(psc) == 0
    w.g.set(2, w.g.link(2) | P.PT_ACCESSED)  # the PDE alone: a full walk would set A above it
    walk_both(w, psc)
    assert T.psc_count(psc) == 0
    w.g.set(4, w.g.link(4) | P.PT_ACCESSED)
    walk_both(w, psc)
    assert T.cached_frames(psc)[1].tolist() == [w.g.tables[3]]  # the PML4E only
    w.g.set(3, w.g.link(3) | P.PT_ACCESSED)
    walk_both(w, psc)
    assert T.cached_frames(psc)[1].tolist() == sorted(w.g.tables[lv] for lv in (1, 2, 3))


def test_the_cache_keeps_the_permissions_of_the_levels_above():
    """Upper levels that restrict access: a walk from the cache faults exactly as a full one."""
    w = World1D()
    w.g.set(3, w.g.link(3) & ~P.PT_USER)  # the PDPTE: supervisor-only
    w.g.set(4, w.g.link(4) & ~P.PT_WRITABLE)  # the PML4E: read-only
    psc = T.new_tlb(16)
    walk_both(w, psc)
    for acc, flags in ((EC.ACC_READ, W.F_USER), (EC.ACC_WRITE, W.F_WP), (EC.ACC_READ, 0)):
        cached, full = walk_both(w, psc, acc, flags)
        assert_same_result(cached, full, False)
        assert int(cached[W.OUT_SKIPPED]) == 3
    assert int(cached[W.OUT_STATUS]) == W.W_OK
    cached, _ = walk_both(w, psc, EC.ACC_WRITE, W.F_WP)
    assert int(cached[W.OUT_STATUS]) == W.W_PF
    assert int(cached[W.OUT_CODE]) == EC.PFERR_PRESENT | EC.PFERR_WRITE


EPT_UPPER = st.sampled_from([E.EPT_READ, E.EPT_READ | E.EPT_EXEC, E.EPT_READ | E.EPT_WRITE,
                             E.EPT_RWX])
GUEST_UPPER = st.integers(0, 15)  # W, U, A, XD


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(two_d=st.booleans(), five=st.booleans(), data_leaf=st.integers(1, 3),
       ept_upper=st.lists(st.tuples(EPT_UPPER, st.booleans()), min_size=4, max_size=4),
       guest_upper=st.lists(GUEST_UPPER, min_size=4, max_size=4),
       leaf=st.integers(0, 63), data_perm=st.integers(0, 7),
       walks=st.lists(st.tuples(st.sampled_from([EC.ACC_READ, EC.ACC_WRITE, EC.ACC_FETCH]),
                                st.integers(0, 255)), min_size=2, max_size=5))
def test_walks_from_the_caches_equal_full_walks(two_d, five, data_leaf, ept_upper, guest_upper,
                                                leaf, data_perm, walks):
    """Random permissions and A bits on every upper level of both dimensions, random leaves
    (including faulting ones) and accesses: status, address, error code or exit qualification,
    attributes and every A/D bit match a full walk, and the reads saved are the levels skipped."""
    mode = P.MODE_5LEVEL if five else P.MODE_4LEVEL
    if two_d:
        w = World2D(mode, 5 if five else 4, data_leaf, data_perm)
        for lv, (rwx, accessed) in zip(range(w.ept.levels, 1, -1), ept_upper, strict=False):
            if lv <= data_leaf:
                break
            e = w.ept.get(DATA_GPA_2D, lv)
            w.ept.set(DATA_GPA_2D, lv, (e & ~(E.EPT_RWX | E.EPT_ACCESSED)) | rwx
                      | (E.EPT_ACCESSED if accessed else 0))
    else:
        w = World1D(mode)
    for lv, bits in zip(range(w.g.levels, 1, -1), guest_upper, strict=False):
        value = w.g.link(lv) & ~(P.PT_WRITABLE | P.PT_USER)
        value |= (P.PT_WRITABLE if bits & 1 else 0) | (P.PT_USER if bits & 2 else 0)
        value |= (P.PT_ACCESSED if bits & 4 else 0) | (P.PT_NX if bits & 8 else 0)
        w.g.set(lv, value)
    pte = DATA_GPA_2D | P.PT_PRESENT
    for k, bit in enumerate((P.PT_WRITABLE, P.PT_USER, P.PT_ACCESSED, P.PT_DIRTY, P.PT_NX)):
        pte |= bit if leaf >> k & 1 else 0
    if leaf >> 5 & 1:
        pte &= ~P.PT_PRESENT
    w.g.set(1, pte)
    psc = T.new_tlb(16)
    for acc, flag_bits in walks:
        flags = W.F_NXE
        for k, bit in enumerate((W.F_WP, W.F_SMEP, W.F_SMAP, W.F_AC, W.F_USER)):
            flags |= bit if flag_bits >> k & 1 else 0
        cached, full = walk_both(w, psc, acc, flags)
        assert_same_result(cached, full, two_d)


def test_walk_without_caches_is_unchanged_by_an_empty_or_disabled_cache():
    w = World2D()
    off = T.new_tlb(16, psc_sets=0)
    for _ in range(2):
        cached, full = walk_both(w, off)
        assert_same_result(cached, full, True)
        assert int(cached[W.OUT_SKIPPED]) == 0
    assert T.psc_count(off) == 0


def test_new_tlb_geometry_and_flushes():
    with pytest.raises(ValueError):
        T.new_tlb(12)
    with pytest.raises(ValueError):
        T.new_tlb(16, psc_sets=3)
    tlb = T.new_tlb(16, psc_sets=8)
    assert tlb.shape == (16 + T.PSC_LEVELS * 8, T.TLB_COLS)
    assert T.tlb_entries(tlb) == 16
    T.psc_fill(tlb, T.PSC_EPT, 7, 2, 0x1234_5000, 4, 99, E.EPT_RWX)
    T.psc_fill(tlb, T.PSC_EPT, 7, 3, 0x1234_5000, 4, 98, E.EPT_READ)
    assert T.psc_lookup(tlb, T.PSC_EPT, 7, 0x1234_5FFF, 4) == (2, 99, E.EPT_RWX)
    assert T.psc_lookup(tlb, T.PSC_EPT, 8, 0x1234_5000, 4) == (0, 0, 0)  # another root
    assert T.psc_lookup(tlb, T.PSC_LINEAR, 7, 0x1234_5000, 4) == (0, 0, 0)  # another kind
    assert T.psc_lookup(tlb, T.PSC_EPT, 7, 0x1240_0000, 4) == (3, 98, E.EPT_READ)  # other PDE
    tlb[3, T.TLB_VPN] = 3 + 1
    tlb[3, T.TLB_PFN] = 55
    assert [a.tolist() for a in T.cached_frames(tlb)] == [[55], [98, 99]]
    T.tlb_flush_va(tlb, 0x9000)  # another page: keeps its TLB entry, drops every PSC entry
    assert [a.tolist() for a in T.cached_frames(tlb)] == [[55], []]
    T.psc_fill(tlb, T.PSC_EPT, 7, 2, 0x1234_5000, 4, 99, E.EPT_RWX)
    T.tlb_flush_all(tlb)
    assert [a.tolist() for a in T.cached_frames(tlb)] == [[], []]
    assert T.tlb_entries(tlb) == 16  # the geometry survives flushes


# --- a vCPU and a disconnected table -------------------------------------------------------------
def machine_for(name):
    return build_machine(spec_for(P.MODE_4LEVEL), VMConfig(params=CONFIGURATIONS[name]))


def run(machine, prog):
    return machine.run_programs([prog.build()])[0]


def hw_exits(vcpu):
    return sum(vcpu.exits.get(k, 0) for k in ("ept_violation", "ept_misconfig", "shadow_pf"))


def hw_entry(vm, vcpu, addr, level):
    """(table pfn, index) of the entry at `level` on addr's path in the structure the hardware
    walks from the vCPU's root (EPT, or the shadow tables; here gva == gpa for data)."""
    table = vcpu.mmu_root
    for lv in range(vm.root_levels(vcpu), level, -1):
        e = int(vm.spte_table(table)[(addr >> (12 + 9 * (lv - 1))) & 511])
        table = (e & ((1 << 52) - 1)) >> 12
    return table, (addr >> (12 + 9 * (level - 1))) & 511


def unlink_pde(machine, vcpu, addr):
    """What a backend does first when it removes a table: clear the parent entry (here with no
    flush after it). Then evict the vCPU's TLB entries, which hardware may do at any time, so the
    next access must walk. Returns the disconnected table."""
    vm = machine.vm
    table, idx = hw_entry(vm, vcpu, addr, 2)
    old = int(vm.spte_table(table)[idx])
    child = (old & ((1 << 52) - 1)) >> 12
    vm.spte_table(table)[idx] = np.uint64(0)
    vcpu.tlb[:T.tlb_entries(vcpu.tlb), T.TLB_VPN] = 0
    return child


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_a_vcpu_walks_through_a_disconnected_table_until_the_tlb_flush(name):
    m = machine_for(name)
    try:
        vcpu = m.vm.vcpus[0]
        run(m, Program().write(data_gva(0), 11).write(data_gva(1), 22))
        child = unlink_pde(m, vcpu, data_gva(1))
        assert child in T.cached_frames(vcpu.tlb)[1].tolist()
        exits = hw_exits(vcpu)
        res = run(m, Program().read(data_gva(1)).read(data_gva(0)))
        # Through the cached PDE: the old table still maps both pages, no exit.
        assert res[:, C.RES_VALUE].tolist() == [22, 11]
        assert hw_exits(vcpu) == exits
        T.tlb_flush_all(vcpu.tlb)  # what servicing the remote flush request does
        assert T.cached_frames(vcpu.tlb)[1].size == 0
        res = run(m, Program().read(data_gva(1)))
        # Now the walk reads the cleared PDE: an exit, and the MMU maps the page again.
        assert hw_exits(vcpu) == exits + 1
        assert res[0, C.RES_VALUE] == 22
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_a_remote_flush_request_drops_the_cached_path(name):
    m = machine_for(name)
    try:
        vcpu = m.vm.vcpus[0]
        run(m, Program().write(data_gva(1), 22))
        unlink_pde(m, vcpu, data_gva(1))
        vcpu.make_request(1)  # REQ_TLB_FLUSH, as vm.flush_remote_tlbs() raises it
        exits = hw_exits(vcpu)
        res = run(m, Program().read(data_gva(1)))
        assert hw_exits(vcpu) == exits + 1
        assert res[0, C.RES_VALUE] == 22
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_invlpg_drops_the_paging_structure_caches(name):
    m = machine_for(name)
    try:
        vcpu = m.vm.vcpus[0]
        run(m, Program().write(data_gva(1), 22).read(data_gva(2)))
        assert T.psc_count(vcpu.tlb) > 0
        data_pfn = m.vm.mm.hva_pfn[m.vm.mm.index(
            m.vm.memslots[0].find(DATA_GPA >> 12).userspace_addr) + 2]
        run(m, Program().invlpg(data_gva(1)))
        data, tables = T.cached_frames(vcpu.tlb)
        assert tables.size == 0
        assert int(data_pfn) in data.tolist()  # the TLB entry of another page stays
        unlink_pde(m, vcpu, data_gva(1))
        exits = hw_exits(vcpu)
        # INVLPG of an unrelated page is enough to make the next walk read the cleared PDE.
        res = run(m, Program().invlpg(data_gva(7)).read(data_gva(1)))
        assert hw_exits(vcpu) == exits + 1
        assert res[1, C.RES_VALUE] == 22
    finally:
        m.vm.destroy()


# --- with and without caches, a guest sees the same thing ----------------------------------------
@contextlib.contextmanager
def psc_sets(n):
    saved = T.DEFAULT_PSC_SETS
    T.DEFAULT_PSC_SETS = n
    try:
        yield
    finally:
        T.DEFAULT_PSC_SETS = saved


def run_with_stats(spec, program):
    """{config: (digest, results, walks, walk reads, reads skipped)} for every configuration."""
    out = {}
    for name, params in CONFIGURATIONS.items():
        machine = build_machine(spec, VMConfig(params=params))
        try:
            results = machine.run_programs(program(machine))
            st_ = machine.vm.vcpus[0].hw_stats
            out[name] = (guest_digest(machine.vm, results), results[0].tolist(),
                         int(st_[C.ST_WALKS]), int(st_[C.ST_WALK_READS]),
                         int(st_[C.ST_PSC_SKIPPED]))
        finally:
            machine.vm.destroy()
    return out


def compare_on_off(spec, program):
    on = run_with_stats(spec, program)
    with psc_sets(0):
        off = run_with_stats(spec, program)
    for name in CONFIGURATIONS:
        d_on, r_on, walks_on, reads_on, skipped_on = on[name]
        d_off, r_off, walks_off, reads_off, skipped_off = off[name]
        assert d_on == d_off and r_on == r_off, f"{name}: the caches changed what the guest saw"
        assert walks_on == walks_off
        assert skipped_off == 0
        assert reads_off - reads_on == skipped_on, name
    return on, off


def test_demand_paging_reads_fewer_entries_with_the_caches_and_sees_the_same():
    def program(machine):
        prog = Program()
        for i in range(16):
            prog.write(data_gva(i), i + 1)
        prog.mov_cr3(machine.paging.cr3)
        for i in range(16):
            prog.read(data_gva(i))
        return [prog.build()]

    on, off = compare_on_off(spec_for(P.MODE_4LEVEL), program)
    # Each first touch faults, and a fault drops the entries on its address's path (SDM
    # 4.10.4.1, 29.4.3.1): under shadow paging the caches save less while demand paging.
    for name in CONFIGURATIONS:
        assert on[name][3] < off[name][3] * 0.6, (name, on[name][3], off[name][3])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_strategy, min_size=1, max_size=30))
def test_random_programs_see_the_same_with_and_without_caches(ops):
    """The parity programs (page-table edits with INVLPG / MOV CR3, CPL, WP, SMEP/SMAP): the
    backends flush whenever they change a non-leaf entry, so the caches change only the cost."""
    compare_on_off(spec_for(P.MODE_4LEVEL), build(ops, P.MODE_4LEVEL))


def test_parity_still_holds_with_the_caches():
    def program(machine):
        pts = machine.pts
        e_gpa = pts.entry_gpa(data_gva(0), 2, create=False)
        child = pts.read_entry(e_gpa) & ~0xFFF & ((1 << 52) - 1)
        return [Program().write(data_gva(1), 5).read(data_gva(2))
                .store_pte(pts.pt_gva_of(e_gpa), child | P.PT_PRESENT | P.PT_USER)
                .mov_cr3(machine.paging.cr3).set_cpl(3).write(data_gva(1), 6)
                .read(data_gva(1)).build()]

    runs = run_everywhere(spec_for(P.MODE_4LEVEL), program)
    assert len({d for d, _ in runs.values()}) == 1
    res = runs["tdp"][1][0]
    assert res[5, C.RES_VECTOR] == EC.PF_VECTOR  # the PDE made the region read-only for users
    assert res[6, C.RES_VALUE] == 5


def test_a_huge_page_that_replaces_a_table_is_followed_by_a_flush():
    """Dirty logging maps a THP-backed region with 4 KiB pages; once logging stops, a fault maps
    the whole 2 MiB page over the table. Without a flush the vCPU's cached PDE still leads to the
    old table, whose entry for a page never touched is empty: the fault repeats forever (the
    legacy MMU did this before it flushed there, as KVM's mmu_set_spte does)."""
    spec = spec_for(P.MODE_4LEVEL, log_dirty=True, backing="thp")
    spec.data_size = 2 << 20
    for name, params in CONFIGURATIONS.items():
        m = build_machine(spec, VMConfig(params=params))
        try:
            run(m, Program().write(data_gva(0), 5).read(data_gva(1)))
            m.vm.set_dirty_logging(0, DATA_SLOT, False)
            res = run(m, Program().read(data_gva(0)).write(data_gva(2), 7).read(data_gva(2)))
            assert res[:, C.RES_VALUE].tolist() == [5, 0, 7], name
        finally:
            m.vm.destroy()
