"""The complete shadow MMU (#8 items 1-6): page lifecycle and root reference counts, rmaps per
memslot and level (allocated lazily beside the TDP MMU), unsync pages and their sync at
INVLPG and CR3 loads, write-flood and misaligned-write detection, prefetch, the previous-roots
cache, the page limit and reclaim."""

import numpy as np
import pytest

from mmu_core import InvalidConfig, VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import DATA_GPA, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.hw import cpu as C
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.audit import audit

FLAGS = P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER | P.PT_ACCESSED


def _machine(config="shadow", pages=16, vcpus=1, **kw):
    return build_machine(MachineSpec(vcpus=vcpus, data_size=pages * 4096, **kw),
                         VMConfig(params=CONFIGURATIONS[config]))


def _shadow(m):
    return m.vm.backend_instances["shadow"]


def _page(i):
    return DATA_GPA + 4096 * i


def _remap(m, prog, page, target, entry_bytes=8):
    e_gpa = m.pts.entry_gpa(_page(page), 1, create=False)
    prog.store_pte(m.pts.pt_gva_of(e_gpa), m.pts.leaf_value(_page(target), FLAGS), entry_bytes)


def _tags(m, pages):
    """Give data pages distinct contents; returns {page: tag}."""
    vm = m.vm
    out = {}
    for p in pages:
        tag = 0x1000 + p
        vm.host.tag[vm.gfn_to_pfn_nowait(0, _page(p) >> 12)] = np.uint64(tag)
        out[p] = tag
    return out


def test_rmaps_are_per_slot_and_level_arrays_and_lazy_beside_tdp():
    for config in ("shadow", "legacy"):
        m = _machine(config)
        try:
            sh = _shadow(m)
            assert sh.rmaps.allocated
            heads = [rm.heads for rm in sh.rmaps.slots.values()]
            assert heads and all(len(h) == 3 and all(isinstance(a, np.ndarray) for a in h)
                                 for h in heads)
            m.run_programs([Program().write(_page(0), 1).read(_page(1)).build()])
            assert sh.rmaps.get(0, _page(0) >> 12, 1), "the leaf is in its gfn's rmap"
            assert m.vm.memory().rmap_bytes >= 8 * sum(rm.npages for rm in sh.rmaps.slots.values())
        finally:
            m.vm.destroy()
    m = _machine("tdp")
    try:
        sh = _shadow(m)  # serves only nested roles here: no rmaps until a shadow root exists
        assert not sh.rmaps.allocated and not sh.rmaps.slots
        sh._first_shadow_root()
        assert sh.rmaps.allocated and len(sh.rmaps.slots) == sum(
            len(s.slots) for s in m.vm.memslots)
    finally:
        m.vm.destroy()


def test_a_store_to_a_leaf_table_unsyncs_it_and_invlpg_resyncs():
    m = _machine()
    try:
        tags = _tags(m, [4, 5, 6])
        prog = Program().read(_page(0))
        _remap(m, prog, 0, 4)          # faults once: the table's shadow page goes unsync
        prog.invlpg(_page(0)).read(_page(0))
        _remap(m, prog, 0, 5)          # no exit now: the guest writes its table directly
        prog.read(_page(0))            # stale allowed (the SPTE still maps page 4)
        prog.invlpg(_page(0)).read(_page(0))
        _remap(m, prog, 0, 6)
        prog.mov_cr3(m.paging.cr3).read(_page(0))
        res = m.run_programs([prog.build()])[0]
        vals = res[:, 0].tolist()
        assert vals[3] == tags[4]
        assert vals[5] in (tags[4], tags[5])  # x86: either, until the guest invalidates
        assert vals[7] == tags[5]
        assert vals[10] == tags[6]
        c = _shadow(m).counters()
        assert c["unsync"] >= 1 and c["invlpg_sync"] >= 1 and c["sync_pages"] >= 1
        assert c["track_writes"] == 0  # no store to the leaf table was emulated
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


def test_cr3_reload_reuses_the_previous_root_and_syncs_it():
    m = _machine()
    try:
        prog = Program().read(_page(0)).mov_cr3(m.paging.cr3).read(_page(0))
        m.run_programs([prog.build()])
        sh = _shadow(m)
        assert sh.counters()["prev_root_hits"] == 1
        st = sh.vroots[0]
        assert st.root is not None and st.root.root_count == 1 and not st.prev
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


def test_unsync_pages_reached_from_a_new_root_are_synced_before_use():
    # vCPU 1 loads the root vCPU 0 made (found in the hash): kvm_mmu_load syncs it, so after
    # its own CR3 load vCPU 1 sees vCPU 0's new mapping.
    m = _machine(vcpus=2)
    try:
        tags = _tags(m, [4, 5])
        a = Program().read(_page(0))
        _remap(m, a, 0, 4)
        a.read(_page(1))
        results = m.run_programs([a.build(), Program().build()])
        b = Program().mov_cr3(m.paging.cr3).read(_page(0))
        res = m.run_programs([Program().build(), b.build()])[1]
        assert res[1, 0] == tags[4]
        assert results is not None and audit(m.vm) == []
    finally:
        m.vm.destroy()


def test_write_flooding_zaps_a_table_that_is_no_longer_one():
    m = _machine()
    try:
        pde_gpa = m.pts.entry_gpa(_page(0), 2, create=False)
        value = m.pts.read_entry(pde_gpa)
        prog = Program().read(_page(0))
        for _ in range(3):  # three emulated stores into the PD, no fault through it between
            prog.store_pte(m.pts.pt_gva_of(pde_gpa) + 8 * 7, value)
        m.run_programs([prog.build()])
        c = _shadow(m).counters()
        assert c["flooded"] == 1 and c["track_writes"] == 3
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


def test_a_misaligned_write_zaps_the_shadow_page():
    m = _machine(mode=P.MODE_32)
    try:
        pde_gpa = m.pts.entry_gpa(_page(0), 2, create=False)
        value = m.pts.read_entry(pde_gpa)
        # an 8-byte store into a table of 4-byte entries spans two of them
        prog = Program().read(_page(0)).store_pte(m.pts.pt_gva_of(pde_gpa) + 4 * 9, value, 8)
        m.run_programs([prog.build()])
        assert _shadow(m).counters()["misaligned"] >= 1  # one per shadow page of the PD
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


def test_prefetch_maps_accessed_neighbours_read_only_unless_dirty():
    m = _machine()
    try:
        for i in range(8):  # A set on the neighbours (D on page 2 only), as a guest that used them
            e_gpa = m.pts.entry_gpa(_page(i), 1, create=False)
            extra = P.PT_ACCESSED | (P.PT_DIRTY if i == 2 else 0)
            m.pts.write_entry(e_gpa, m.pts.read_entry(e_gpa) | extra)
            m.vm.gfn_to_pfn_nowait(0, _page(i) >> 12)
        m.run_programs([Program().read(_page(0)).build()])
        sh = _shadow(m)
        assert sh.counters()["prefetched"] == 7
        assert sh.counters()["faults"] == 1
        m.run_programs([Program().read(_page(3)).write(_page(2), 9).build()])
        assert sh.counters()["faults"] == 1  # both already mapped, page 2 writable
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


def test_default_limit_and_set_nr_mmu_pages():
    m = _machine(pages=16)
    try:
        sh = _shadow(m)
        total = sum(s.npages for slots in m.vm.memslots for s in slots.slots)
        assert sh.n_max == max(total * 20 // 1000, 64)
        with pytest.raises(InvalidConfig):
            m.vm.hook.mmu_set_nr_mmu_pages(vm=m.vm, nr=10)
        assert m.vm.hook.mmu_set_nr_mmu_pages(vm=m.vm, nr=100) == 100
        m.vm.add_memslot(7, DATA_GPA + (1 << 30), 1 << 20)
        assert sh.n_max == 100  # userspace's choice survives memslot changes
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["shadow", "legacy"])
def test_reclaim_keeps_the_limit_and_the_guest_view(config):
    regions = 80  # one last-level table per 2 MiB region: more than the 64-page limit
    m = _machine(config, pages=512 * regions)
    try:
        m.vm.hook.mmu_set_nr_mmu_pages(vm=m.vm, nr=64)
        prog = Program()
        for r in range(regions):
            prog.write(_page(512 * r + 3), r + 1)
        for r in range(regions):
            prog.read(_page(512 * r + 3))
        res = m.run_programs([prog.build()])[0]
        assert res[regions:, 0].tolist() == list(range(1, regions + 1))
        sh = _shadow(m)
        c = sh.counters()
        assert c["recycled"] > 0 and c["n_used_mmu_pages"] <= 64
        assert m.vm.memory().mmu_page_structs == c["n_used_mmu_pages"]
        freed = m.vm.hook.mmu_shrink_scan(vm=m.vm, nr_to_scan=10)
        after = sh.counters()
        assert freed >= 10 and after["n_used_mmu_pages"] == c["n_used_mmu_pages"] - freed
        assert after["shrink_zapped"] == c["shrink_zapped"] + freed
        assert after["recycled"] == c["recycled"] + freed  # reclaimed_pages counts it too
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


def test_zap_all_keeps_held_roots_invalid_until_released():
    m = _machine()
    try:
        m.run_programs([Program().read(_page(0)).build()])
        sh = _shadow(m)
        root = sh.vroots[0].root
        m.vm.zap_all()
        assert root.role.invalid and root.pfn in sh.by_pfn and root.root_count == 1
        assert audit(m.vm) == []
        m.run_programs([Program().read(_page(0)).build()])  # reloads: the old root goes
        assert root.pfn not in sh.by_pfn or sh.by_pfn[root.pfn] is not root
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("mode", [P.MODE_PAE, P.MODE_32])
def test_pae_and_32bit_guests_use_the_per_vcpu_pae_root(mode):
    m = _machine(mode=mode)
    try:
        prog = Program().read(_page(0)).mov_cr3(m.paging.cr3).read(_page(1))
        m.run_programs([prog.build()])
        sh = _shadow(m)
        st = sh.vroots[0]
        vcpu = m.vm.vcpus[0]
        assert vcpu.mmu_root == st.pml4_root and st.root is None and not st.prev
        assert st.pml4_root not in sh.by_pfn and st.pae_root not in sh.by_pfn  # no kvm_mmu_page
        roots = [sp for sp in st.pae if sp is not None]
        assert roots and all(sp.role.level == 2 and sp.root_count == 1 for sp in roots)
        if mode == P.MODE_32:  # four quarters of the one guest page directory
            assert sorted(sp.role.quadrant for sp in roots) == [0, 1, 2, 3]
        assert sh.n_used == len(sh.by_pfn)
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()
    assert m.vm.pt_pages_in_use() == 0


def test_sync_rebuilds_an_entry_whose_permissions_changed():
    m = _machine()
    try:
        e_gpa = m.pts.entry_gpa(_page(0), 1, create=False)
        gva = m.pts.pt_gva_of(e_gpa)
        ro = m.pts.leaf_value(_page(0), P.PT_PRESENT | P.PT_USER | P.PT_ACCESSED)
        prog = Program().write(_page(0), 7)             # the PTE gets D, the SPTE is writable
        prog.store_pte(gva, ro | P.PT_DIRTY)            # unsync; same frame, no longer writable
        prog.invlpg(_page(0)).read(_page(0)).write(_page(0), 8)
        res = m.run_programs([prog.build()])[0]
        assert res[3, 0] == 7 and res[4, 1] == 14       # the write takes #PF (protection)
        c = _shadow(m).counters()
        assert c["sync_rebuilt"] == 1 and c["sync_dropped"] == 0
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


def test_switching_between_two_address_spaces_reuses_cached_roots():
    m = _machine()
    try:
        tags = _tags(m, [4])
        pts = m.pts
        cr3_a = m.paging.cr3
        cr3_b = pts._alloc()  # a second PML4 sharing the lower tables, as two processes might
        for i in range(512):
            pts.write_entry(cr3_b + 8 * i, pts.read_entry(cr3_a + 8 * i))
        prog = Program().read(_page(0)).mov_cr3(cr3_b).read(_page(0))
        _remap(m, prog, 0, 4)  # unsyncs the shared last-level table
        prog.mov_cr3(cr3_a).read(_page(0))  # A comes back from prev_roots and is synced
        prog.mov_cr3(cr3_b).read(_page(0))
        res = m.run_programs([prog.build()])[0]
        assert res[5, 0] == tags[4] and res[7, 0] == tags[4]
        sh = _shadow(m)
        c = sh.counters()
        assert c["prev_root_hits"] == 2 and c["sync_roots"] >= 1
        st = sh.vroots[0]
        assert st.root.gfn == cr3_b >> 12 and [sp.gfn for sp, _pgd in st.prev] == [cr3_a >> 12]
        assert st.root.root_count == 1 and st.prev[0][0].root_count == 1
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["shadow", "tdp"])
def test_a_fault_the_guest_tables_forbid_is_injected_and_counted_once(config):
    # Shadow paging: the guest walk in FNAME(page_fault) fails, the backend counts it
    # (injected) and the core injects #PF (the vCPU's inject outcome). With TDP the hardware
    # delivers it without an exit (ST_GUEST_PF). A read of a mapped page is neither.
    m = _machine(config)
    try:
        res = m.run_programs([Program().read(_page(16 + 600)).read(_page(1)).build()])[0]
        assert res[0, C.RES_VECTOR] == 14 and res[1, C.RES_VECTOR] == 0
        vcpu = m.vm.vcpus[0]
        injected = _shadow(m).counters()["injected"] if config == "shadow" else 0
        assert (injected, vcpu.faults.get("inject", 0), int(vcpu.hw_stats[C.ST_GUEST_PF])) \
            == ((1, 1, 0) if config == "shadow" else (0, 0, 1))
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()
