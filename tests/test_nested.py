"""Nested EPT (#8 item 7): an L1 hypervisor's L2 guests, EPT02 built by the nested-role
backend, exits reflected to L1, EPT12 write tracking, INVEPT; L2-visible parity."""

from __future__ import annotations

import numpy as np
import pytest

from mmu_core import Role, VMConfig
from mmu_core.arch.x86 import ept as E
from mmu_core.errors import GuestError
from mmu_core.guest.machine import DATA_GPA, MachineSpec, build_machine
from mmu_core.guest.nested import L1Hypervisor
from mmu_core.guest.program import Program
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.audit import audit

PAGES = 32


def _machine(config, vcpus=1, pages=PAGES, **kw):
    return build_machine(MachineSpec(vcpus=vcpus, data_size=pages * 4096, **kw),
                         VMConfig(params=CONFIGURATIONS[config]))


def _page(i):
    return DATA_GPA + 4096 * i


def _program(seed, first=0, pages=PAGES, n=200):
    """Random reads and writes of pages [first, first + pages): vCPUs get disjoint pages,
    so the final contents do not depend on timing."""
    rng = np.random.default_rng(seed)
    p = Program()
    for k in range(n):
        page = first + int(rng.integers(pages))
        if rng.random() < 0.4:
            p.write(_page(page), 0x5000 + k)
        else:
            p.read(_page(page))
    return p.build()


def _digest(m, pages=PAGES):
    vm = m.vm
    return [int(vm.host.tag[vm.gfn_to_pfn_nowait(0, _page(i) >> 12, write=False)])
            for i in range(pages)]


def _run(config, nested, seed=1, vcpus=1, prefault=False, check=True):
    m = _machine(config, vcpus=vcpus)
    try:
        l2 = None
        if nested:
            hv = L1Hypervisor(m.pts)
            pre = [(0, m.pts.end_gfn << 12), (DATA_GPA, PAGES * 4096)] if prefault else None
            l2 = hv.new_l2(prefault=pre)
            for v in m.vm.vcpus:
                v.enter_l2(l2)
        per = PAGES // vcpus
        progs = [_program(seed + i, i * per, per) for i in range(vcpus)]
        res = m.run_programs(progs)
        if check:
            assert audit(m.vm) == []
        exits = {}
        for v in m.vm.vcpus:
            for k, n in v.exits.items():
                exits[k] = exits.get(k, 0) + n
        return [r.tolist() for r in res], _digest(m), exits, l2, m
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_l2_sees_what_l1_sees(config):
    direct = _run(config, False)
    for prefault in (False, True):
        res, digest, exits, l2, _ = _run(config, True, prefault=prefault)
        assert res == direct[0]
        assert digest == direct[1]
        if prefault:
            assert exits.get("reflected_to_l1", 0) == 0
        else:
            # every page L2 touches (data and the guest tables it walks) once, no more
            assert exits["reflected_to_l1"] == l2.reflected == len(l2.mapped)


def test_parity_across_configurations_and_vcpus():
    outs = {c: _run(c, True, seed=7, vcpus=2) for c in ("tdp", "legacy")}
    direct = _run("tdp", False, seed=7, vcpus=2)
    for c, out in outs.items():
        assert out[1] == direct[1], c


def test_backends_per_role():
    for config, l1 in (("tdp", "tdp"), ("legacy", "shadow")):
        m = _machine(config)
        try:
            assert m.vm.backends[Role.DIRECT].name == l1
            assert m.vm.backends[Role.NESTED].name == "shadow"
        finally:
            m.vm.destroy()
    m = _machine("shadow")
    try:
        with pytest.raises(GuestError):
            m.vm.vcpus[0].enter_l2(L1Hypervisor(m.pts).new_l2())
    finally:
        m.vm.destroy()


def _nested_instance(m):
    return m.vm.managers[Role.NESTED].get_plugin("shadow")


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_ept12_writes_are_tracked_and_invept_drops_ept02(config):
    m = _machine(config)
    try:
        hv = L1Hypervisor(m.pts)
        l2 = hv.new_l2()
        vcpu = m.vm.vcpus[0]
        vcpu.enter_l2(l2)
        p = Program()
        for i in range(4):
            p.write(_page(i), 0x100 + i)
        m.run_programs([p.build()])
        first = vcpu.exits["reflected_to_l1"]
        n = _nested_instance(m)
        nested = n.nested_counters()
        # L1's later mappings store into EPT12 pages L0 already shadows: into upper-level
        # ones they exit (write-tracked); the last-level one goes unsync on the first store
        assert nested["nested_fixed"] >= 4
        writes = nested["ept12_writes"]
        assert vcpu.exits.get("ept12_write", 0) == writes
        assert nested["ept12_unsync"] >= 1
        e_gpa = hv._entry_gpa(l2, _page(0), None, False)
        leaf = [sp for sp in n.by_gfn[(0, e_gpa >> 12)] if sp.role.guest_mode]
        assert leaf and all(sp.role.level == 1 and sp.unsync for sp in leaf)
        assert not m.vm.is_tracked(0, e_gpa >> 12)
        assert audit(m.vm) == []

        # L1 remaps L2's page 0 onto L1's page 5 (a store to an unsync EPT12 page: no
        # exit, EPT02 lags), then INVEPT as the SDM requires: the sync drops the stale leaf.
        def remap():
            hv.map(l2, _page(0), _page(5), vcpu=vcpu)
            assert audit(m.vm) == []  # EPT02 may lag an unsync EPT12 page
            dropped = n.stats["sync_dropped"]
            vcpu.invept(l2.eptp)
            assert n.stats["sync_dropped"] == dropped + 1

        m.vm.engine.spawn("l1", remap)
        m.vm.engine.run()
        assert vcpu.exits.get("ept12_write", 0) == writes
        assert all(not sp.unsync for sp in leaf)  # synced: write-protected again
        assert audit(m.vm) == []
        p = Program().read(_page(0)).read(_page(1)).write(_page(0), 0x777)
        res = m.run_programs([p.build()])[0]
        tag5 = int(m.vm.host.tag[m.vm.gfn_to_pfn_nowait(0, _page(5) >> 12, write=False)])
        assert tag5 == 0x777  # L2's page 0 is L1's page 5 now
        assert res[1, 0] == 0x101
        # after INVEPT everything refaults, but EPT12 maps it: fixed by L0, not reflected
        assert vcpu.exits["reflected_to_l1"] == first
        assert audit(m.vm) == []

        # L1 rewrites the (write-tracked) level-2 entry above L2's page 0: the store exits
        # and zaps the EPT02 entry built from it (ept02_zapped); L2 refaults through it
        zapped = n.nested_counters()["ept02_zapped"]

        def rewrite_pde():
            pde = hv._entry_gpa(l2, _page(0), None, False, leaf_level=2)
            assert m.vm.is_tracked(0, pde >> 12)
            vcpu.l1_store(pde, m.vm.read_guest_u64(0, pde))

        m.vm.engine.spawn("l1", rewrite_pde)
        m.vm.engine.run()
        assert n.nested_counters()["ept02_zapped"] == zapped + 1
        assert m.run_programs([Program().read(_page(0)).build()])[0][0, 0] == 0x777
        assert audit(m.vm) == []

        # read-only in EPT12: L2's write is reflected; L1 makes it writable
        def read_only():
            hv.map(l2, _page(2), _page(2), perm=E.EPT_READ, vcpu=vcpu)
            vcpu.invept(None)

        m.vm.engine.spawn("l1", read_only)
        m.vm.engine.run()
        m.run_programs([Program().read(_page(2)).write(_page(2), 0x42).build()])
        assert vcpu.exits["reflected_to_l1"] == first + 1
        assert hv.lookup(l2, _page(2)) & E.EPT_WRITE
        assert audit(m.vm) == []
        # the backend's count of each outcome is the vCPU's (the core counts what it got)
        ns = n.nested_counters()
        mine = [ns[f"nested_{k}"] for k in ("fixed", "reflected", "retries", "spurious",
                                             "emulated")]
        assert mine == [vcpu.faults.get(f"nested_{k}", 0)
                        for k in ("fixed", "inject", "retry", "spurious", "emulate")]
        assert ns["nested_faults"] == sum(mine) and ns["nested_reflected"] == first + 1
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_two_l2_guests_on_two_vcpus(config):
    m = _machine(config, vcpus=2)
    try:
        hv = L1Hypervisor(m.pts)
        a, b = hv.new_l2(), hv.new_l2()
        m.vm.vcpus[0].enter_l2(a)
        m.vm.vcpus[1].enter_l2(b)
        # b's L2 page 3 is L1's page 9; a's is identity
        hv.map(b, _page(3), _page(9))
        pa = Program().write(_page(3), 0xA).read(_page(3)).build()
        pb = Program().pause(10_000).write(_page(3), 0xB).read(_page(3)).build()
        ra, rb = m.run_programs([pa, pb])
        assert ra[1, 0] == 0xA and rb[2, 0] == 0xB
        assert _digest(m)[3] == 0xA and _digest(m)[9] == 0xB
        n = _nested_instance(m)
        roots = {st.nested.pfn for st in n.vroots.values() if st.nested is not None}
        assert len(roots) == 2 and all(n.by_pfn[r].role.guest_mode for r in roots)
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_switching_eptps_reuses_cached_ept02_roots(config):
    """L1 runs two L2 guests in turn on one vCPU: the nested VM entry's kvm_mmu_new_pgd keeps
    the other guest's EPT02 root in the previous-roots cache (with its reference, so reclaim
    leaves it) and takes it back at the next switch without a hash lookup; INVEPT of an EPTP
    frees its cached root too."""
    m = _machine(config)
    try:
        vm = m.vm
        v0 = vm.vcpus[0]
        hv = L1Hypervisor(m.pts)
        a, b = hv.new_l2(), hv.new_l2()
        hv.map(b, _page(3), _page(9))
        n = _nested_instance(m)
        roots = {}
        for k in range(6):
            l2 = (a, b)[k % 2]
            v0.enter_l2(l2)
            res = m.run_programs([Program().write(_page(3), 0xA0 + k).read(_page(3)).build()])
            assert res[0][1, 0] == 0xA0 + k
            roots.setdefault(l2.eptp, set()).add(n.vroots[v0.id].nested.pfn)
            v0.leave_l2()
            if k == 1:
                vm.set_nr_mmu_pages(64)
                vm.mm.shrink_slab(64)  # reclaims what no vCPU holds as a root
        c = n.nested_counters()
        assert c["ept02_root_allocs"] == 2 and c["ept02_prev_root_hits"] == 4
        assert all(len(r) == 1 for r in roots.values())  # the same root page each time
        assert _digest(m)[3] == 0xA4 and _digest(m)[9] == 0xA5
        st = n.vroots[v0.id]
        assert [sp.key for sp in st.nested_prev] == [n.by_pfn[next(iter(roots[a.eptp]))].key]
        v0.enter_l2(b)
        vm.engine.spawn("l1", v0.invept, a.eptp)  # frees the cached root of a's EPTP
        vm.engine.run()
        assert st.nested_prev == [] and st.nested is not None
        assert audit(vm) == []
    finally:
        m.vm.destroy()


def test_host_invalidation_zaps_ept02():
    m = _machine("tdp")
    try:
        hv = L1Hypervisor(m.pts)
        l2 = hv.new_l2()
        vcpu = m.vm.vcpus[0]
        vcpu.enter_l2(l2)
        m.run_programs([Program().write(_page(1), 0x11).build()])
        n = _nested_instance(m)
        l1gfn = _page(1) >> 12
        assert n.rmaps.get(0, l1gfn, 1)  # the EPT02 leaf is in the rmap of its L1 gfn
        m.vm.zap_gfn_range(0, l1gfn, l1gfn + 1)
        assert not n.rmaps.get(0, l1gfn, 1)
        assert audit(m.vm) == []
        res = m.run_programs([Program().read(_page(1)).build()])[0]
        assert res[0, 0] == 0x11
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("nested", ["eager", "lazy"])
def test_the_nested_option_runs_demand_paging_in_l2_with_the_l1_digest(nested):
    """-n: DemandPagingOptions.nested puts the guest code in L2; the report says so, and its
    L2-visible digest is the L1 run's under tdp and legacy. Shadow paging has no nested EPT:
    one clear error, before anything is built."""
    from mmu_core import InvalidConfig
    from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging

    opts = dict(vcpus=2, bytes_per_vcpu=32 * 4096)
    l1 = run_demand_paging(DemandPagingOptions(**opts), CONFIGURATIONS["tdp"])
    for config in ("tdp", "legacy"):
        r = run_demand_paging(DemandPagingOptions(**opts, nested=nested), CONFIGURATIONS[config])
        assert r.nested == nested and r.verified and r.digest == l1.digest
        assert "l2_ept_violation" in r.exits and "ept_violation" not in r.exits
        reflected = r.exits.get("reflected_to_l1", 0)
        if nested == "eager":  # EPT12 maps everything up front: L0 fixes every fault
            assert reflected == 0 and "nested_fixed" in r.faults
        else:  # every data page, and the tables L2's walks read, reflected once
            assert reflected >= r.pages
    with pytest.raises(InvalidConfig, match="nested EPT needs EPT"):
        run_demand_paging(DemandPagingOptions(**opts, nested=nested), CONFIGURATIONS["shadow"])


def _l2_over_regions(config, regions, vcpus=1):
    """A machine whose one vCPU runs in a lazily mapped L2 and touches one page in each of
    `regions` 2 MiB regions: one EPT12 last-level table, so one EPT02 page, per region."""
    m = build_machine(MachineSpec(vcpus=vcpus, data_size=512 * regions * 4096),
                      VMConfig(params=CONFIGURATIONS[config]))
    hv = L1Hypervisor(m.pts)
    l2 = hv.new_l2()
    for v in m.vm.vcpus:
        v.enter_l2(l2)
    return m, hv, l2


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_ept02_is_made_of_shadow_pages(config):
    """One guest_mode shadow page per EPT12 table, in the shadow MMU's hash, keyed by the
    EPT12 table's gfn; counted in n_used_mmu_pages and mmu_memory; leaves in the rmaps."""
    m, hv, l2 = _l2_over_regions(config, 4)
    try:
        p = Program()
        for r in range(4):
            p.write(DATA_GPA + r * (2 << 20), r + 1)
        m.run_programs([p.build()])
        n = _nested_instance(m)
        ept02 = [sp for sp in n.by_pfn.values() if sp.role.guest_mode]
        assert ept02 and all(n.pages[sp.key] is sp for sp in ept02)
        assert {sp.gfn for sp in ept02 if not sp.role.direct} <= hv.tables
        assert {sp.role.level for sp in ept02} == {1, 2, 3, 4}
        assert n.n_used == len(n.by_pfn) >= len(ept02)
        assert m.vm.memory().mmu_page_structs >= len(ept02)
        assert n.nested_counters()["ept02_pages"] == len(ept02)
        for r in range(4):
            gfn = (DATA_GPA + r * (2 << 20)) >> 12
            assert any(n.by_pfn[p >> 9].role.guest_mode for p in n.rmaps.get(0, gfn, 1))
        # tables above the last level are write-tracked; last-level ones write-protected
        assert all(m.vm.is_tracked(0, sp.gfn) for sp in ept02 if not sp.role.direct
                   and sp.role.level > 1)
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_reclaimed_ept02_pages_refault(config):
    """Under KVM's minimum page limit, and with the host's shrinker, EPT02 pages are
    reclaimed like any shadow page; L2 then refaults them without L1 seeing anything, and
    reads what it wrote."""
    regions = 80
    m, hv, l2 = _l2_over_regions(config, regions)
    try:
        assert m.vm.set_nr_mmu_pages(64) == 64
        n = _nested_instance(m)
        vcpu = m.vm.vcpus[0]
        w = Program()
        for r in range(regions):
            w.write(DATA_GPA + r * (2 << 20), 0x1000 + r)
        m.run_programs([w.build()])
        assert n.counters()["recycled"] > 0 and n.n_used <= 64 + 5
        reflected = vcpu.exits["reflected_to_l1"]
        assert m.vm.mm.shrink_slab(8) > 0
        assert audit(m.vm) == []
        r = Program()
        for k in range(regions):
            r.read(DATA_GPA + k * (2 << 20))
        res = m.run_programs([r.build()])[0]
        assert [int(v) for v in res[:, 0]] == [0x1000 + k for k in range(regions)]
        assert vcpu.exits["reflected_to_l1"] == reflected  # EPT12 maps them: L0 refaults
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_the_shadow_audit_covers_ept02(config):
    """A writable EPT02 leaf where EPT12 is read-only, and an EPT02 leaf missing from its
    rmap, are violations of the audit (with tdp through the nested instance's own)."""
    m, hv, l2 = _l2_over_regions(config, 1)
    try:
        hv.map(l2, _page(1), _page(1), perm=E.EPT_READ)
        m.run_programs([Program().write(_page(0), 1).read(_page(1)).build()])
        n = _nested_instance(m)
        vm = m.vm
        leaves = {}
        for sp in n.by_pfn.values():
            if sp.role.guest_mode and sp.role.level == 1:
                row = vm.spte_table(sp.pfn)
                for idx in np.flatnonzero(row).tolist():
                    leaves[sp.leaf_gfn(idx)] = (sp, idx)
        sp, idx = leaves[_page(1) >> 12]
        spte = int(vm.spte_table(sp.pfn)[idx])
        assert not spte & E.EPT_WRITE
        vm.spte_write(sp.pfn, idx, spte | E.EPT_WRITE)
        assert "backend:nested-ept12-readonly" in {v.invariant for v in audit(vm)}
        vm.spte_write(sp.pfn, idx, spte)
        assert audit(vm) == []
        sp, idx = leaves[_page(0) >> 12]
        n.rmaps.remove(0, _page(0) >> 12, 1, sp.pfn * 512 + idx)
        assert "backend:rmap-missing" in {v.invariant for v in audit(vm)}
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_huge_ept02_leaves_follow_ept12_and_the_host(config):
    """kvm_mmu_hugepage_adjust for EPT02: a 1G EPT12 leaf over THP-backed L1 memory gives 2M
    EPT02 leaves (the host's level), in direct pages keyed by L1 gfn; L2 reads what it wrote,
    and the audit holds."""
    from mmu_core.guest.nested import run_in_l2

    regions = 4
    m = build_machine(MachineSpec(vcpus=1, data_size=512 * regions * 4096, backing="thp"),
                      VMConfig(params=CONFIGURATIONS[config]))
    try:
        run_in_l2(m, prefault=True)
        p = Program()
        for r in range(regions):
            for k in range(4):
                p.write(DATA_GPA + r * (2 << 20) + k * 4096 * 100, r * 16 + k)
        for r in range(regions):
            p.read(DATA_GPA + r * (2 << 20) + 4096 * 100)
        res = m.run_programs([p.build()])[0]
        assert [int(v) for v in res[-regions:, 0]] == [r * 16 + 1 for r in range(regions)]
        n = _nested_instance(m)
        c = n.nested_counters()
        # 2M for the data; the guest's page tables (anon, not THP) get 4K leaves
        assert c["ept02_mapped_2m"] == regions and c["ept02_mapped_1g"] == 0
        for r in range(regions):
            gfn = (DATA_GPA + r * (2 << 20)) >> 12
            assert n.rmaps.get(0, gfn, 2) and not n.rmaps.get(0, gfn + 100, 1)
            assert all(n.by_pfn[p >> 9].role.direct for p in n.rmaps.get(0, gfn, 2))
        assert audit(m.vm) == []
    finally:
        m.vm.destroy()


def test_eager_ept12_covers_page_tables_above_the_data():
    """Over about 256 GiB of data the guest's page tables sit above it (machine.pt_slot_gpa);
    memstress_setup_ept's eager EPT12 must map that slot too, or every page-table page L2's
    walks touch is a reflected EPT violation. 300 GiB of data (only the touched page is
    backed; the machine's own tables take about 1.8 GB and 15 s to build)."""
    from mmu_core.guest.nested import run_in_l2

    size = 300 << 30
    m = build_machine(MachineSpec(vcpus=1, data_size=size), VMConfig(params=CONFIGURATIONS["tdp"]))
    try:
        assert m.pts.base_gfn << 12 >= DATA_GPA + size  # the slot is above the data
        l2 = run_in_l2(m, prefault=True)
        p = Program()
        p.write(DATA_GPA + size - 4096, 7)
        p.read(DATA_GPA + size - 4096)
        res = m.run_programs([p.build()])[0]
        assert int(res[-1, 0]) == 7
        assert l2.reflected == 0 and "reflected_to_l1" not in m.vm.vcpus[0].exits
    finally:
        m.vm.destroy()


def _walk_ept12_python(vm, eptp, l2gpa):
    """The EPT12 walk read entry by entry through kvm_read_guest (the Python reading the
    jitted walk replaced): (l1 gpa or None, permissions, path)."""
    table, perm, path = eptp & ~0xFFF & ((1 << 52) - 1), E.EPT_RWX, []
    for level in range(4, 0, -1):
        idx = (l2gpa >> (12 + 9 * (level - 1))) & 511
        entry = vm.read_guest_u64(0, table + 8 * idx)
        path.append((table >> 12, idx, entry))
        rwx = entry & E.EPT_RWX
        if not rwx or (rwx & E.EPT_WRITE and not rwx & E.EPT_READ):
            return None, 0, path
        perm &= rwx
        if level == 1 or (level <= 3 and entry & E.EPT_LARGE):
            size = 1 << (12 + 9 * (level - 1))
            return (entry & 0x000F_FFFF_FFFF_F000 & ~(size - 1)) | (l2gpa & (size - 1)), \
                perm, path
        table = entry & 0x000F_FFFF_FFFF_F000
    raise AssertionError("unreachable")


@pytest.mark.parametrize("seed", range(3))
def test_the_jitted_ept12_walk_agrees_with_the_python_reading(seed):
    """Random EPT12 tables (4K, 2M and 1G leaves, any permissions including W without R and
    not-present, bits 52-63 set, an entry pointing outside memory, a table page swapped out)
    walked at random L2 addresses: the jitted walk returns what reading entry by entry does."""
    from mmu_shadow.nested import walk_ept12

    rng = np.random.default_rng(seed)
    m = _machine("tdp", pages=64)
    try:
        vm = m.vm
        hv = L1Hypervisor(m.pts)
        l2 = hv.new_l2()
        addrs = []
        for _ in range(60):
            level = int(rng.choice([1, 1, 1, 2, 3]))
            shift = 12 + 9 * (level - 1)
            l2gpa = (int(rng.integers(0, 1 << 20)) << 21) if level > 1 else \
                (int(rng.integers(0, 1 << 27)) << 12)
            l2gpa &= ~((1 << shift) - 1)
            try:
                hv.map(l2, l2gpa, _page(int(rng.integers(PAGES))) & ~((1 << shift) - 1),
                       perm=int(rng.integers(1, 8)), level=level)
            except GuestError:
                continue  # lies in a large leaf mapped before
            addrs.append(l2gpa | int(rng.integers(0, 1 << shift)))
        # damage some entries: not present, high bits, a table outside memory
        for t in sorted(hv.tables)[:6]:
            i = int(rng.integers(512))
            gpa = (t << 12) + 8 * i
            word = vm.read_guest_u64(0, gpa)
            hv._store(None, gpa, (word | (0xFFF << 52)) & ((1 << 64) - 1) if rng.random() < 0.5
                      else (0xFF_FFFF_F000 | E.EPT_RWX))
            addrs.append(int(rng.integers(0, 1 << 48)))
        vm.mm.swap_out(vm.memslots[0].find(max(hv.tables)).gfn_to_hva(max(hv.tables)))
        for _ in range(200):
            addrs.append(int(rng.integers(0, 1 << 48)))
        outcomes = set()
        for a in addrs:
            got = walk_ept12(vm, l2.eptp, a)
            assert got == _walk_ept12_python(vm, l2.eptp, a), hex(a)
            outcomes.add((got[0] is not None, len(got[2])))
        # mapped at 4K, 2M and 1G, and not mapped at several depths
        assert {(True, 4), (True, 3), (True, 2), (False, 1)} <= outcomes
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_an_l1_program_store_to_ept12_is_trapped(config):
    """L0's own (direct) mapping of a shadowed EPT12 table, the TDP MMU's under tdp and the
    legacy MMU's under legacy, is read-only (a last-level one) or write-tracked (above): an
    L1 program's first store to the last-level table faults and unsyncs its EPT02 page
    (mmu_try_to_unsync_pages), and L2 sees the new mapping after L1's INVEPT syncs it; a
    store to an upper-level table exits and is emulated (make_spte's
    RET_PF_WRITE_PROTECTED, kvm_mmu_track_write), zapping the EPT02 link."""
    m = _machine(config, vcpus=2)
    try:
        vm = m.vm
        hv = L1Hypervisor(m.pts)
        l2 = hv.new_l2()
        v0, v1 = vm.vcpus
        v0.enter_l2(l2)
        hv.map(l2, _page(0), _page(0))
        m.run_programs([Program().write(_page(0), 0xA0).write(_page(5), 0xA5).build(),
                        Program().read(_page(1)).build()])
        n = _nested_instance(m)
        e_gpa = hv._entry_gpa(l2, _page(0), None, False)
        leaf = [sp for sp in n.by_gfn[(0, e_gpa >> 12)] if sp.role.guest_mode]
        assert leaf and all(sp.unsync for sp in leaf)  # L1 mapped page 5 in it
        m.vm.engine.spawn("l1", v0.invept, None)  # synced: write-protected again
        m.vm.engine.run()
        assert not any(sp.unsync for sp in leaf)
        new = (_page(5) & ~0xFFF) | (hv.lookup(l2, _page(0)) & 0xFFF)
        # vCPU 1, in L1, stores the EPT12 entry through L1's own mapping of its tables
        p1 = Program().store_pte(m.pts.pt_gva_of(e_gpa), new).build()
        m.run_programs([Program().build(), p1])
        assert vm.read_guest_u64(0, e_gpa) == new
        assert all(sp.unsync for sp in leaf) and v1.faults.get("emulate", 0) == 0
        assert audit(vm) == []

        m.vm.engine.spawn("l1", v0.invept, l2.eptp)  # L1 on v0, whose EPT02 root it syncs
        m.vm.engine.run()
        res = m.run_programs([Program().read(_page(0)).build(), Program().build()])[0]
        assert res[0, 0] == 0xA5
        assert audit(vm) == []

        # an upper-level EPT12 table is write-tracked: the store exits and is emulated
        top = l2.eptp + 8 * ((_page(0) >> 39) & 511)
        assert vm.is_tracked(0, top >> 12)
        word = vm.read_guest_u64(0, top)
        p1 = Program().store_pte(m.pts.pt_gva_of(top), word).build()
        m.run_programs([Program().build(), p1])
        assert v1.faults.get("emulate", 0) >= 1
        if config == "tdp":  # the TDP MMU's part: W dropped from its leaf when the shadow
            # MMU write-protected a gfn (mmu_write_protect_gfn), the store to a tracked
            # table answered RET_PF_WRITE_PROTECTED
            tdp = vm.backend_instances["tdp"].stats
            assert tdp["gfn_write_protected"] >= 1 and tdp["write_protected"] == 1
        res = m.run_programs([Program().read(_page(0)).build(), Program().build()])[0]
        assert res[0, 0] == 0xA5
        assert audit(vm) == []
    finally:
        m.vm.destroy()


def _edit_ept12_from_an_l1_program(config, nested):
    """L2 (or, with `nested` False, L1 itself) runs three programs on vCPU 0; between them an
    L1 program on vCPU 1 edits the mapping of pages 0-3: in L2 by storing into EPT12 through
    L1's own mapping of its page-table memory (page 0 remapped onto page 8, page 1 unmapped,
    page 2 made read-only, all in the last-level table; then the level-2 entry switched to a
    copy of that table in which page 3 maps page 9), each followed by INVEPT; in L1 by
    storing its own PTEs (0 -> 8, 3 -> 9) and INVLPG. Unmapped and read-only pages come back
    1:1 RWX through L1's handler of the reflected violations, so what L2 sees equals what
    L1 sees with the two remaps. Returns the results, the memory digest, vCPU 1's fault
    outcomes and the nested counters."""
    from mmu_core.arch.x86 import paging as P
    from mmu_core.guest import nested as N

    m = _machine(config, vcpus=2)
    try:
        vm, pts = m.vm, m.pts
        v0, v1 = vm.vcpus
        for i in range(PAGES):
            vm.host.tag[vm.gfn_to_pfn_nowait(0, _page(i) >> 12)] = 0xC000 + i
        # vCPU 0 invalidates what vCPU 1 remapped (INVLPG; in L2 the INVEPT flushes too)
        p1, p2, p3 = Program(), Program().invlpg(_page(0)), Program().invlpg(_page(3))
        for i in range(8):
            p1.write(_page(i), 0x100 + i).read(_page(i))
        for i in range(4):
            p2.read(_page(i))
        p2.write(_page(2), 0x222).read(_page(2)).write(_page(0), 0x200)
        p3.read(_page(3)).write(_page(3), 0x333).read(_page(0)).read(_page(8)).read(_page(9))
        idle = Program().build()
        l2 = None
        if nested:
            hv = L1Hypervisor(pts)
            l2 = hv.new_l2(prefault=[(0, pts.end_gfn << 12), (DATA_GPA, PAGES * 4096)])
            v0.enter_l2(l2)
        res = [m.run_programs([p1.build(), idle])[0]]

        def l1(ept12_edits, page, target):
            """vCPU 1 runs an L1 program: `ept12_edits` in L2's case (then L1 INVEPTs on
            vCPU 0), else the remap of `page` onto `target` in L1's own page tables."""
            edits = Program()
            if nested:
                ept12_edits(edits)
            else:
                gpte = pts.entry_gpa(_page(page), 1, create=False)
                edits.store_pte(pts.pt_gva_of(gpte), pts.leaf_value(
                    _page(target), P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER))
            m.run_programs([idle, edits.build()])
            if nested:
                vm.engine.spawn("l1", v0.invept, l2.eptp)
                vm.engine.run()

        flags = N.LEAF_FLAGS & ~E.EPT_RWX
        e = [hv._entry_gpa(l2, _page(i), None, False) for i in range(4)] if nested else []

        def last_level(edits):
            edits.store_pte(pts.pt_gva_of(e[0]), _page(8) | flags | E.EPT_RWX)
            edits.store_pte(pts.pt_gva_of(e[1]), 0)
            edits.store_pte(pts.pt_gva_of(e[2]), _page(2) | flags | E.EPT_READ)

        def one_level_up(edits):
            table = hv._alloc_table()
            for i in range(512):
                hv._store(None, table + 8 * i, vm.read_guest_u64(0, (e[3] & ~0xFFF) + 8 * i))
            hv._store(None, table + (e[3] & 0xFFF), _page(9) | flags | E.EPT_RWX)
            up = hv._entry_gpa(l2, _page(3), None, False, leaf_level=2)
            edits.store_pte(pts.pt_gva_of(up), table | N.NONLEAF_FLAGS)

        l1(last_level, 0, 8)
        res.append(m.run_programs([p2.build(), idle])[0])
        l1(one_level_up, 3, 9)
        res.append(m.run_programs([p3.build(), idle])[0])
        assert audit(vm) == []
        counters = _nested_instance(m).nested_counters() if nested else {}
        return [r[:, :2].tolist() for r in res], _digest(m), dict(v1.faults), counters, \
            dict(v0.exits)
    finally:
        m.vm.destroy()


def test_l1_program_edits_of_ept12_are_seen_by_l2_as_in_l1_under_tdp_and_legacy():
    """An L1 program's stores to EPT12 (remap, unmap, read-only, and a switch one level up)
    reach L2 identically under tdp and legacy, and L2 sees what L1 sees with the same remaps
    of its own page tables: L0 traps every such store, whichever backend maps L1 (before,
    under tdp, the TDP MMU let them through and L2 kept the old mappings after INVEPT)."""
    l1 = _edit_ept12_from_an_l1_program("tdp", nested=False)
    runs = {c: _edit_ept12_from_an_l1_program(c, nested=True) for c in ("tdp", "legacy")}
    for config, (res, digest, faults, counters, exits) in runs.items():
        assert res == l1[0], config
        assert digest == l1[1], config
        # the last-level table: its first store faulted and unsynced the EPT02 page; the
        # level-2 one is write-tracked: the store was emulated, the EPT02 link zapped
        assert faults.get("emulate", 0) >= 1, config
        assert counters["ept02_pages"] >= 4, config
        # unmapped page 1 and the write to read-only page 2 were reflected to L1
        assert exits["reflected_to_l1"] == 2, config
    p2, p3 = l1[0][1][1:], l1[0][2][1:]
    assert [r[0] for r in p2[:4]] == [0xC008, 0x101, 0x102, 0x103]  # page 0 is page 8
    assert [r[0] for r in p3] == [0xC009, 0, 0x200, 0x200, 0x333]  # page 3 is page 9


def _l2_with_page0_read_only(config):
    """One vCPU in an L2 guest whose EPT12 maps L1's tables and data 1:1 (4K leaves), page 0
    read-only: (machine, hypervisor, L2 guest, the nested shadow instance)."""
    m = _machine(config)
    pts = m.pts
    hv = L1Hypervisor(pts)
    l2 = hv.new_l2(prefault=[(0, pts.end_gfn << 12), (DATA_GPA, PAGES * 4096)])
    hv.map(l2, _page(0), _page(0), perm=E.EPT_READ)
    m.vm.vcpus[0].enter_l2(l2)
    return m, hv, l2, _nested_instance(m)


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_invept_rebuilds_an_ept02_leaf_whose_target_is_unchanged(config):
    """FNAME(sync_spte) for EPT: when L1 changes only the permissions of an EPT12 entry of an
    unsync table and INVEPTs, the sync rebuilds the EPT02 leaf in place (no refault), with
    fewer permissions as with more; a new target is still dropped and refaults."""
    m, hv, l2, n = _l2_with_page0_read_only(config)
    try:
        vm = m.vm
        v0 = vm.vcpus[0]

        def l2_exits():
            return v0.exits.get("l2_ept_violation", 0)

        def l1_edit(target, perm):
            def run():
                hv.map(l2, _page(0), _page(target), perm=perm, vcpu=v0)
                v0.invept(l2.eptp)
            vm.engine.spawn("l1", run)
            vm.engine.run()

        m.run_programs([Program().read(_page(0)).build()])  # EPT02 leaf: read-only
        before, rebuilt = l2_exits(), n.stats["sync_rebuilt"]
        l1_edit(0, E.EPT_RWX)  # more permissions, same target: the leaf becomes writable
        assert n.stats["sync_rebuilt"] == rebuilt + 1
        res = m.run_programs([Program().write(_page(0), 0x51).read(_page(0)).build()])[0]
        assert res[1, 0] == 0x51 and l2_exits() == before  # no refault
        l1_edit(0, E.EPT_READ)  # fewer: rebuilt read-only, a write is reflected to L1
        assert n.stats["sync_rebuilt"] == rebuilt + 2
        reflected = v0.exits.get("reflected_to_l1", 0)
        m.run_programs([Program().read(_page(0)).build()])
        assert l2_exits() == before
        m.run_programs([Program().write(_page(0), 0x52).build()])
        assert v0.exits["reflected_to_l1"] == reflected + 1
        dropped = n.stats["sync_dropped"]
        l1_edit(7, E.EPT_RWX)  # another target: dropped, the next access refaults
        assert n.stats["sync_dropped"] == dropped + 1
        exits = l2_exits()
        res = m.run_programs([Program().read(_page(0)).build()])[0]
        assert l2_exits() == exits + 1
        assert res[0, 0] == int(vm.host.tag[vm.gfn_to_pfn_nowait(0, _page(7) >> 12)])
        assert audit(vm) == []
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_a_reflected_fault_resyncs_its_ept02_entry(config):
    """nested_ept_invalidate_addr: when L0 reflects an EPT violation because EPT12 maps the
    page without the permission, the EPT02 entry of that address in an unsync page is
    synced before L1 runs its handler, so a stale leaf (an older target) is gone at once;
    a fault on a page EPT12 does not map resyncs nothing."""
    m, hv, l2, n = _l2_with_page0_read_only(config)
    try:
        vm = m.vm
        v0 = vm.vcpus[0]
        m.run_programs([Program().read(_page(0)).read(_page(1)).build()])

        def remap_without_invept():
            hv.map(l2, _page(0), _page(6), perm=E.EPT_READ, vcpu=v0)  # the table goes unsync
        vm.engine.spawn("l1", remap_without_invept)
        vm.engine.run()
        e_gpa = hv._entry_gpa(l2, _page(0), None, False)
        leaf = [sp for sp in n.by_gfn[(0, e_gpa >> 12)] if sp.role.guest_mode]
        assert leaf and all(sp.unsync for sp in leaf)
        idx = (_page(0) >> 12) & 511
        seen = []
        handler = l2.handle_ept_violation

        def l1_handler(vcpu, fault):  # what L0 left in EPT02 when L1 got the exit
            seen.append([int(vm.spte_table(sp.pfn)[idx]) for sp in leaf])
            handler(vcpu, fault)
        l2.handle_ept_violation = l1_handler
        synced = n.nested_counters()["reflect_synced"]
        m.run_programs([Program().write(_page(0), 0x61).read(_page(0)).build()])
        assert seen == [[0] * len(leaf)]  # the stale read-only leaf (page 0) was dropped
        assert n.nested_counters()["reflect_synced"] == synced + 1
        assert int(vm.host.tag[vm.gfn_to_pfn_nowait(0, _page(0) >> 12)]) == 0x61
        hv.unmap(l2, _page(2), None)  # not present in EPT12: reflected without a resync
        m.run_programs([Program().read(_page(2)).build()])
        assert len(seen) == 2 and n.nested_counters()["reflect_synced"] == synced + 1
        assert audit(vm) == []
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_ept02_prefetch_maps_the_neighbours_access_tracked(config):
    """FNAME(pte_prefetch) for EPT02: a 4K fault maps the other entries of its group of
    eight that EPT12 maps to pages the host has, access-tracked since EPT02 pages have no A/D
    bits here, so each still costs L2 one EPT violation on first use (the guest-mode MMU has
    no fast page fault) and is then rebuilt; a page the host lacks ends the prefetch."""
    m, hv, l2, n = _l2_with_page0_read_only(config)
    try:
        vm = m.vm
        v0 = vm.vcpus[0]
        for i in range(8, 16):
            if i != 12:  # the host has every page of the second group but 12
                vm.host.tag[vm.gfn_to_pfn_nowait(0, _page(i) >> 12)] = 0xD000 + i
        prefetched = n.nested_counters()["ept02_prefetched"]
        m.run_programs([Program().read(_page(8)).build()])
        e_gpa = hv._entry_gpa(l2, _page(8), None, False)
        sp = next(sp for sp in n.by_gfn[(0, e_gpa >> 12)] if sp.role.guest_mode)
        row = vm.spte_table(sp.pfn)
        first = (_page(8) >> 12) & 511
        got = [int(row[first + k]) for k in range(8)]
        assert all(got[k] for k in (1, 2, 3)) and not any(got[k] for k in (4, 5, 6, 7))
        assert all(not got[k] & E.EPT_RWX for k in (1, 2, 3))  # access-tracked
        assert n.nested_counters()["ept02_prefetched"] >= prefetched + 3
        assert audit(vm) == []
        before = v0.exits.get("l2_ept_violation", 0)
        res = m.run_programs([Program().read(_page(9)).read(_page(10)).build()])[0]
        assert [int(r[0]) for r in res] == [0xD009, 0xD00A]
        assert v0.exits["l2_ept_violation"] == before + 2
        assert audit(vm) == []
    finally:
        m.vm.destroy()


@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_invvpid_and_vpid_tagged_l2_translations(config):
    """SDM vol. 3C, INVVPID and 28.3.3.3: with a VPID for L2, L2's linear translations survive
    L1 <-> L2 switches (tagged apart from L1's), so a guest PTE L1 changed without
    invalidating still maps the old page in L2 until INVVPID (individual address, single
    context or all context) drops it; without a VPID every switch flushes. INVVPID of VPID 0
    (types 0, 1, 3) and an unknown type fail."""
    m = _machine(config)
    try:
        vm = m.vm
        vcpu = vm.vcpus[0]
        hv = L1Hypervisor(m.pts)
        gva = _page(0)
        e_gpa = m.pts.entry_gpa(gva, 1, create=False)
        old = vm.read_guest_u64(0, e_gpa)
        for vpid, kind in ((7, 1), (7, 0), (7, 2), (0, None)):
            l2 = hv.new_l2(prefault=[(0, m.pts.end_gfn << 12), (DATA_GPA, PAGES * 4096)])
            l2.vpid = vpid
            m.pts._table_of_gpa(e_gpa)[(e_gpa & 0xFFF) >> 3] = old  # gva -> page 0
            vcpu.enter_l2(l2)
            res = m.run_programs([Program().write(gva, 0x50).read(gva).build()])[0]
            assert res[1, 0] == 0x50
            # L1 points the guest PTE of gva at page 3, without INVLPG, and L2 is resumed
            m.pts._table_of_gpa(e_gpa)[(e_gpa & 0xFFF) >> 3] = (old & 0xFFF) | _page(3)
            vcpu.leave_l2()
            vcpu.enter_l2(l2)
            res = m.run_programs([Program().read(gva).build()])[0]
            if vpid:
                assert res[0, 0] == 0x50  # the VPID-tagged translation survived the switch
                if kind != 2:  # all-context ignores the VPID given
                    m.vm.engine.spawn("l1", vcpu.invvpid, kind, 8, gva)  # another VPID
                    m.vm.engine.run()
                    assert m.run_programs([Program().read(gva).build()])[0][0, 0] == 0x50
                m.vm.engine.spawn("l1", vcpu.invvpid, kind, vpid, gva + 4096 * (kind == 0))
                m.vm.engine.run()
                if kind == 0:  # another address of the VPID: gva's entry stays
                    assert m.run_programs([Program().read(gva).build()])[0][0, 0] == 0x50
                    m.vm.engine.spawn("l1", vcpu.invvpid, 0, vpid, gva)
                    m.vm.engine.run()
                res = m.run_programs([Program().read(gva).build()])[0]
            assert res[0, 0] != 0x50  # page 3 now
            assert audit(vm) == []
            vcpu.leave_l2()
        assert vcpu.exits["invvpid"] >= 5
        for kind, vpid in ((1, 0), (0, 0), (3, 0), (4, 1)):
            with pytest.raises(GuestError, match="INVVPID"):
                vcpu.invvpid(kind, vpid)
    finally:
        m.vm.destroy()
