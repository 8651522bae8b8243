"""PCIDs and global pages (SDM vol. 3A 4.10; issue #8 item 4): the hardware's TLB tagged with
the PCID, global translations, MOV CR3 with and without the no-flush bit, INVLPG, INVPCID
types 0-3 and the CR4/CR0 rules, checked against the SDM's invalidation rules (a stale
translation is seen only where the SDM allows it); the #GP cases of kvm-unit-tests' pcid.c;
under shadow paging KVM's fast CR3 switch (fast_pgd_switch) and kvm_invalidate_pcid /
kvm_mmu_invpcid_gva; and parity of PCID-using guest programs across tdp, legacy and shadow.

The stale-translation cases remap a page without invalidating it (the PTE store alone) and
then read it: "stale" is the old frame, "fresh" the new one. Under TDP the model's hardware
keeps what the SDM lets it keep, so the tests assert both; under shadow paging KVM flushes
more (its shadow entries carry no G bit and its flushes are VPID-wide), so only what the SDM
requires is asserted there.
"""

import numpy as np
import pytest

from mmu_core import VMConfig
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import DATA_GPA, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.hw import cpu as C
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.audit import audit
from mmu_core.testing.programs import pcid_kernel, run_everywhere, spec_for

FLAGS = P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER | P.PT_ACCESSED | P.PT_DIRTY
GLOBAL = FLAGS | P.PT_GLOBAL
CR4_ON = P.CR4_PCIDE | P.CR4_PGE
NONCANONICAL = 1 << 50


def _page(i):
    return DATA_GPA + 4096 * i


def _machine(config, pages=16):
    return build_machine(MachineSpec(vcpus=1, data_size=pages * 4096),
                         VMConfig(params=CONFIGURATIONS[config]))


def _tags(m, pages):
    vm = m.vm
    for p in pages:
        vm.host.tag[vm.gfn_to_pfn_nowait(0, _page(p) >> 12)] = np.uint64(0x1000 + p)


def _map(m, prog, page, target, flags=FLAGS):
    e_gpa = m.pts.entry_gpa(_page(page), 1, create=False)
    prog.store_pte(m.pts.pt_gva_of(e_gpa), m.pts.leaf_value(_page(target), flags))


def _run(m, prog):
    return m.run_programs([prog.build()])[0]


class Case:
    """One program with reads whose outcome the SDM fixes ("fresh": the frame the PTE maps
    now) or allows to be stale ("stale": the model's hardware keeps the old translation)."""

    def __init__(self, config):
        self.m = _machine(config)
        _tags(self.m, range(16))
        self.cr3 = self.m.paging.cr3
        self.prog = Program().mov_cr4(self.m.paging.cr4 | CR4_ON)
        self.expect: list[tuple[int, int, int, str]] = []  # (op, fresh tag, stale tag, what)

    def read(self, page, fresh, stale, what):
        self.expect.append((len(self.prog), 0x1000 + fresh, 0x1000 + stale, what))
        self.prog.read(_page(page))

    def check(self, exact):
        try:
            res = _run(self.m, self.prog)
            for i, fresh, stale, what in self.expect:
                got = int(res[i, 0])
                assert res[i, 1] == 0, f"op {i} faulted"
                if what == "fresh" or exact:
                    want = fresh if what == "fresh" else stale
                    assert got == want, f"op {i}: {got:#x}, want the {what} {want:#x}"
                else:
                    assert got in (fresh, stale)
            assert audit(self.m.vm) == []
        finally:
            self.m.vm.destroy()


HW = ("tdp", "legacy")  # the guest's TLB is the hardware's (no exits for CR3 loads)


@pytest.mark.parametrize("config", (*HW, "shadow"))
def test_a_pcid_keeps_its_entries_across_a_no_flush_switch_and_loses_them_on_a_flush(config):
    c = Case(config)
    c.prog.mov_cr3(c.cr3 | 1).read(_page(0))           # PCID 1 caches page 0 -> frame 0
    _map(c.m, c.prog, 0, 4)                             # remapped, not invalidated
    c.prog.mov_cr3(c.cr3 | 2)                           # PCID 2 never cached page 0
    c.read(0, 4, 4, "fresh")
    c.prog.mov_cr3(c.cr3 | 1, noflush=True)             # PCID 1's entry survives the switch
    c.read(0, 4, 0, "stale")
    c.prog.mov_cr3(c.cr3 | 1)                           # a MOV CR3 that flushes PCID 1
    c.read(0, 4, 0, "fresh")
    c.check(exact=config in HW)


@pytest.mark.parametrize("config", (*HW, "shadow"))
def test_invlpg_drops_the_current_pcids_entry_and_the_global_one_only(config):
    c = Case(config)
    c.prog.mov_cr3(c.cr3 | 1).read(_page(0)).read(_page(1))
    _map(c.m, c.prog, 0, 4)
    _map(c.m, c.prog, 1, 5)
    c.prog.mov_cr3(c.cr3 | 2, noflush=True).invlpg(_page(0))   # INVLPG in PCID 2
    c.prog.mov_cr3(c.cr3 | 1, noflush=True)
    c.read(0, 4, 0, "stale")                            # PCID 1's entry may survive it
    c.prog.invlpg(_page(0))
    c.read(0, 4, 0, "fresh")
    c.read(1, 5, 1, "stale")                            # another page's entry survives
    c.check(exact=config in HW)


@pytest.mark.parametrize("config", (*HW, "shadow"))
def test_global_translations_survive_cr3_loads_and_pcid_switches_until_invlpg(config):
    c = Case(config)
    _map(c.m, c.prog, 0, 0, GLOBAL)
    c.prog.invlpg(_page(0)).read(_page(0))              # a global entry for page 0
    _map(c.m, c.prog, 0, 4, GLOBAL)
    c.prog.mov_cr3(c.cr3 | 2)                           # flushes PCID 2's non-global entries
    c.read(0, 4, 0, "stale")
    c.prog.mov_cr3(c.cr3 | 3)
    c.read(0, 4, 0, "stale")
    c.prog.invlpg(_page(0))                             # INVLPG drops the global entry
    c.read(0, 4, 0, "fresh")
    c.check(exact=config in HW)


@pytest.mark.parametrize("config", (*HW, "shadow"))
@pytest.mark.parametrize("kind,global_survives,other_pcid_survives", [
    (0, True, True), (1, True, True), (2, False, False), (3, True, False)])
def test_invpcid_types(config, kind, global_survives, other_pcid_survives):
    """Type 0 (address, PCID 1) and 1 (PCID 1) keep global entries and PCID 2's; type 2
    drops everything; type 3 every non-global entry."""
    c = Case(config)
    _map(c.m, c.prog, 2, 2, GLOBAL)
    c.prog.mov_cr3(c.cr3 | 2).invlpg(_page(2)).read(_page(0)).read(_page(2))
    c.prog.mov_cr3(c.cr3 | 1).read(_page(0))
    for page, target, flags in ((0, 4, FLAGS), (2, 6, GLOBAL)):
        _map(c.m, c.prog, page, target, flags)
    c.prog.invpcid(kind, 1 if kind < 2 else 0, _page(0))
    c.read(0, 4, 0, "fresh")                            # every type drops (PCID 1, page 0)
    c.read(2, 6, 2, "stale" if global_survives else "fresh")
    c.prog.mov_cr3(c.cr3 | 2, noflush=True)
    c.read(0, 4, 0, "stale" if other_pcid_survives else "fresh")
    c.check(exact=config in HW)


@pytest.mark.parametrize("config", (*HW, "shadow"))
def test_invpcid_address_of_another_pcid_reaches_that_pcid(config):
    c = Case(config)
    c.prog.mov_cr3(c.cr3 | 1).read(_page(0))
    c.prog.mov_cr3(c.cr3 | 2, noflush=True).read(_page(0))
    _map(c.m, c.prog, 0, 4)
    c.prog.invlpg(_page(0)).invpcid(0, 1, _page(0))     # as Linux flushes another ASID's
    c.read(0, 4, 0, "fresh")
    c.prog.mov_cr3(c.cr3 | 1, noflush=True)
    c.read(0, 4, 0, "fresh")
    c.check(exact=config in HW)


@pytest.mark.parametrize("config", (*HW, "shadow"))
@pytest.mark.parametrize("how", ["pge", "pcide-off"])
def test_cr4_pge_toggle_and_pcide_off_flush_everything(config, how):
    c = Case(config)
    cr4 = c.m.paging.cr4 | CR4_ON
    _map(c.m, c.prog, 2, 2, GLOBAL)
    c.prog.mov_cr3(c.cr3 | 1).invlpg(_page(2)).read(_page(0)).read(_page(2))
    _map(c.m, c.prog, 0, 4)
    _map(c.m, c.prog, 2, 6, GLOBAL)
    if how == "pge":
        c.prog.mov_cr4(cr4 & ~P.CR4_PGE).mov_cr4(cr4)
    else:
        c.prog.mov_cr3(c.cr3 | 1, noflush=True).mov_cr3(c.cr3, noflush=True)
        c.prog.mov_cr4(cr4 & ~P.CR4_PCIDE)
    c.read(0, 4, 0, "fresh")
    c.read(2, 6, 2, "fresh")
    c.check(exact=config in HW)


@pytest.mark.parametrize("config", (*HW, "shadow"))
def test_without_pge_the_g_bit_is_ignored(config):
    c = Case(config)
    c.prog.mov_cr4(c.m.paging.cr4 | P.CR4_PCIDE)
    _map(c.m, c.prog, 0, 0, GLOBAL)
    c.prog.invlpg(_page(0)).read(_page(0))
    _map(c.m, c.prog, 0, 4, GLOBAL)
    c.prog.mov_cr3(c.cr3)
    c.read(0, 4, 0, "fresh")
    c.check(exact=config in HW)


# --- the #GP rules (kvm-unit-tests x86/pcid.c) -----------------------------------------------
@pytest.mark.parametrize("config", ("tdp", "shadow"))
def test_gp_rules_of_pcid_c(config):
    m = _machine(config)
    try:
        cr0, cr4, cr3 = m.paging.cr0, m.paging.cr4, m.paging.cr3
        ops = [
            ("bit 63 without PCIDs", True, lambda p: p.mov_cr3(cr3, noflush=True)),
            ("PCIDE with CR3[11:0] != 0", True,
             lambda p: p.mov_cr3(cr3 | 0x5).mov_cr4(cr4 | P.CR4_PCIDE)),
            ("back to PCID 0", False, lambda p: p.mov_cr3(cr3)),
            ("PCIDE", False, lambda p: p.mov_cr4(cr4 | P.CR4_PCIDE)),
            ("clear PG with PCIDE", True, lambda p: p.mov_cr0(cr0 & ~P.CR0_PG)),
            ("INVPCID type 4", True, lambda p: p.invpcid(4)),
            ("INVPCID PCID > 0xfff", True, lambda p: p.invpcid(1, 0x1000)),
            ("INVPCID type 0 non-canonical", True, lambda p: p.invpcid(0, 1, NONCANONICAL)),
            ("INVPCID types 0-3", False,
             lambda p: p.invpcid(0, 7, _page(0)).invpcid(1, 7).invpcid(2).invpcid(3)),
            ("INVPCID at CPL 3", True, lambda p: p.set_cpl(3).invpcid(2).set_cpl(0)),
            ("PCIDE off", False, lambda p: p.mov_cr4(cr4)),
            ("INVPCID type 1, PCID 1 without PCIDs", True, lambda p: p.invpcid(1, 1)),
            ("INVPCID type 0, PCID 1 without PCIDs", True, lambda p: p.invpcid(0, 1, _page(0))),
            ("INVPCID type 1, PCID 0 without PCIDs", False, lambda p: p.invpcid(1, 0)),
            ("set PCIDE outside long mode", True,
             lambda p: p.mov_cr0(cr0 & ~P.CR0_PG).mov_cr4(cr4 | P.CR4_PCIDE)),
        ]
        prog = Program()
        spans = []
        for what, gp, emit in ops:
            lo = len(prog)
            emit(prog)
            spans.append((what, gp, lo, len(prog)))
        res = _run(m, prog)
        for what, gp, lo, hi in spans:
            vectors = res[lo:hi, 1].tolist()
            if gp:
                assert EC.GP_VECTOR in vectors, what
            else:
                assert EC.GP_VECTOR not in vectors, what
        assert m.vm.vcpus[0].cr4 & P.CR4_PCIDE == 0
    finally:
        m.vm.destroy()


# --- shadow paging: KVM's fast CR3 switch ------------------------------------------------------
def _shadow(m):
    return m.vm.backend_instances["shadow"]


def _two_spaces():
    """A shadow-paging machine with tagged data pages, two address spaces (two processes of
    one kernel, sharing every lower table) and a program that turns PCIDs and PGE on."""
    m = _machine("shadow")
    _tags(m, range(16))
    cr3_b = m.pts.new_address_space()
    return m, m.paging.cr3, cr3_b, Program().mov_cr4(m.paging.cr4 | CR4_ON)


def _switches(noflush):
    m, cr3_a, cr3_b, prog = _two_spaces()
    try:
        for k in range(8):
            prog.mov_cr3((cr3_a | 1) if k % 2 else (cr3_b | 2), noflush=noflush and k >= 2)
            prog.read(_page(k)).read(_page(15))
        res = _run(m, prog)
        assert all(int(res[2 + 3 * k, 0]) == 0x1000 + k for k in range(8))
        vcpu = m.vm.vcpus[0]
        c = _shadow(m).counters()
        assert audit(m.vm) == []
        return c, int(vcpu.hw_stats[C.ST_WALKS])
    finally:
        m.vm.destroy()


def test_shadow_no_flush_switch_reuses_the_cached_root_without_flushing():
    with_flush, walks_flush = _switches(False)
    no_flush, walks_noflush = _switches(True)
    # both reuse the cached roots from the third switch on
    assert with_flush["prev_root_hits"] == no_flush["prev_root_hits"] == 6
    assert no_flush["root_allocs"] == with_flush["root_allocs"]
    # page 15, read after every switch, stays in each PCID's TLB entries without flushes:
    # from the fourth switch on (the flushing second one flushed every PCID: under shadow
    # paging KVM_REQ_TLB_FLUSH_CURRENT is a VPID-wide flush), five walks fewer
    assert walks_noflush == walks_flush - 5


def test_shadow_no_flush_switch_keeps_an_unsync_entry_that_a_flushing_switch_syncs():
    """The shared last-level table goes unsync; the no-flush switch back to the cached root
    neither syncs it nor flushes (the guest may see the old frame), the flushing one does."""
    for noflush, want in ((True, {0x1000, 0x1004}), (False, {0x1004})):
        m, cr3_a, cr3_b, prog = _two_spaces()
        try:
            prog.mov_cr3(cr3_a | 1).read(_page(0)).mov_cr3(cr3_b | 2).read(_page(1))
            _map(m, prog, 0, 4)
            _map(m, prog, 3, 3)                     # the second store no longer exits
            prog.mov_cr3(cr3_a | 1, noflush=noflush).read(_page(0))
            res = _run(m, prog)
            sh = _shadow(m)
            assert int(res[-1, 0]) in want
            c = sh.counters()
            assert c["unsync"] >= 1 and c["prev_root_hits"] == 1
            st = sh.vroots[0]
            assert st.pgd == cr3_a | 1 and st.prev[0][1] == cr3_b | 2  # then PCID 0's
            assert audit(m.vm) == []
        finally:
            m.vm.destroy()


def test_shadow_invpcid_single_context_frees_that_pcids_previous_roots():
    m, cr3_a, cr3_b, prog = _two_spaces()
    try:
        prog.mov_cr3(cr3_a | 1).read(_page(0)).mov_cr3(cr3_b | 2).read(_page(0))
        prog.invpcid(1, 1)                          # PCID 1 is cached, not current
        prog.mov_cr3(cr3_a | 1, noflush=True).read(_page(0))
        _run(m, prog)
        sh = _shadow(m)
        assert sh.counters()["prev_root_hits"] == 0  # freed: the switch loaded a root again
        assert [pgd for _sp, pgd in sh.vroots[0].prev] == [cr3_b | 2, cr3_a]  # PCID 0's from before PCIDE
        assert m.vm.vcpus[0].exits.get("invpcid") == 1
    finally:
        m.vm.destroy()


def test_invpcid_exits_only_under_shadow_paging():
    for config, exits in (("tdp", 0), ("legacy", 0), ("shadow", 4)):
        m = _machine(config)
        try:
            prog = Program().mov_cr4(m.paging.cr4 | CR4_ON).invpcid(0, 0, _page(0))
            prog.invpcid(1, 0).invpcid(2).invpcid(3)
            _run(m, prog)
            assert m.vm.vcpus[0].exits.get("invpcid", 0) == exits, config
        finally:
            m.vm.destroy()


# --- parity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_pcid_programs_give_identical_digests_on_tdp_legacy_and_shadow(seed):
    runs = run_everywhere(spec_for(P.MODE_4LEVEL), pcid_kernel(seed), seed=seed)
    digests = {name: d for name, (d, _r) in runs.items()}
    assert len(set(digests.values())) == 1, digests
    assert all(r[0][:, 1].max() == 0 for _d, r in runs.values())  # no fault anywhere


def test_guest_digest_sees_a_pcid_difference():
    """The parity check can fail: the same kernel that skips one invalidation reads a stale
    frame on tdp and not on shadow, and the digests differ."""
    def build(machine):
        cr3 = machine.paging.cr3
        prog = Program().mov_cr4(machine.paging.cr4 | CR4_ON)
        prog.write(_page(0), 1).write(_page(9), 2)
        prog.mov_cr3(cr3 | 1).read(_page(0)).mov_cr3(cr3 | 2, noflush=True)
        pts = machine.pts
        e_gpa = pts.entry_gpa(_page(0), 1, create=False)
        prog.store_pte(pts.pt_gva_of(e_gpa), pts.leaf_value(_page(9), FLAGS))
        prog.invlpg(_page(0)).mov_cr3(cr3 | 1, noflush=True).read(_page(0))  # PCID 1 skipped
        return [prog.build()]
    runs = run_everywhere(spec_for(P.MODE_4LEVEL), build, configs=("tdp", "shadow"))
    assert runs["tdp"][0] != runs["shadow"][0]


def test_audit_catches_tags_that_cr4_no_longer_allows():
    m = _machine("tdp")
    try:
        prog = Program().mov_cr4(m.paging.cr4 | CR4_ON).mov_cr3(m.paging.cr3 | 5)
        _map(m, prog, 1, 1, GLOBAL)
        prog.invlpg(_page(1)).read(_page(0)).read(_page(1))
        _run(m, prog)
        vcpu = m.vm.vcpus[0]
        assert audit(m.vm) == []
        vcpu.cr4 &= ~CR4_ON  # as if turning them off had not flushed
        found = {v.invariant for v in audit(m.vm)}
        assert found == {"tlb-tag"}
        assert len([v for v in audit(m.vm) if v.invariant == "tlb-tag"]) == 2
    finally:
        m.vm.destroy()
