"""The demand-paging workload end to end, on each configuration."""

import pytest

from mmu_core.params import CONFIGURATIONS
from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging


@pytest.fixture(scope="module")
def reports():
    opts = DemandPagingOptions(vcpus=4, bytes_per_vcpu=1 << 20, seed=3)
    return {name: run_demand_paging(opts, p) for name, p in CONFIGURATIONS.items()}


def test_every_page_is_verified_in_every_configuration(reports):
    for r in reports.values():
        assert (r.verified, r.mismatches, r.pages) == (True, 0, 4 * 256)


def test_configurations_are_indistinguishable_to_the_guest(reports):
    assert len({r.digest for r in reports.values()}) == 1


def test_time_categories_add_up_per_vcpu(reports):
    for r in reports.values():
        for v in r.per_vcpu:
            t = v.time
            parts = (t.guest_ns + t.walk_ns + t.exit_ns + t.lock_wait_ns + t.lock_held_ns
                     + t.gup_ns + t.tlb_flush_ns + t.other_ns)
            assert parts == t.total_ns == v.time_ns


def test_tdp_metadata_is_nil_while_legacy_and_shadow_report_rmap_and_structs(reports):
    tdp, legacy, shadow = reports["tdp"], reports["legacy"], reports["shadow"]
    assert (tdp.memory.rmap_bytes, tdp.memory.mmu_page_structs) == (0, 0)
    assert tdp.memory.page_table_pages > 0
    for r in (legacy, shadow):
        assert r.memory.rmap_bytes > 0 and r.memory.mmu_page_structs > 0


def test_same_seed_same_report_figures():
    opts = DemandPagingOptions(vcpus=3, bytes_per_vcpu=256 << 10, seed=11, uffd_delay_ns=5000)
    a = run_demand_paging(opts, CONFIGURATIONS["tdp"])
    b = run_demand_paging(opts, CONFIGURATIONS["tdp"])
    assert (a.total_time_ns, a.faults, a.time, a.digest) == (b.total_time_ns, b.faults, b.time, b.digest)


def test_thp_backing_maps_2m_pages_under_tdp_without_uffd():
    opts = DemandPagingOptions(vcpus=1, bytes_per_vcpu=4 << 20, backing="thp", uffd=False)
    r = run_demand_paging(opts, CONFIGURATIONS["tdp"])
    assert r.verified
    assert r.mappings_by_level["2M"] == 2 and r.mappings_by_level["4K"] >= 1


def test_legacy_lock_wait_share_exceeds_tdp_with_many_vcpus():
    opts = DemandPagingOptions(vcpus=32, bytes_per_vcpu=64 << 10, seed=1)
    tdp = run_demand_paging(opts, CONFIGURATIONS["tdp"])
    legacy = run_demand_paging(opts, CONFIGURATIONS["legacy"])
    assert legacy.lock_wait_share > 2 * tdp.lock_wait_share
    assert tdp.digest == legacy.digest


@pytest.mark.parametrize("mode", ["5level", "pae", "32bit", "none"])
def test_other_paging_modes_run_and_agree(mode):
    opts = DemandPagingOptions(vcpus=2, bytes_per_vcpu=128 << 10, mode=mode)
    digests = {run_demand_paging(opts, p).digest for p in CONFIGURATIONS.values()}
    assert len(digests) == 1


def test_bad_options_are_rejected():
    from mmu_core import InvalidConfig, validate

    with pytest.raises(InvalidConfig) as exc:
        validate(DemandPagingOptions, vcpus=0)
    assert exc.value.field == "vcpus"
    with pytest.raises(InvalidConfig):
        validate(DemandPagingOptions, bytes_per_vcpu=3072)


@pytest.mark.parametrize("name", ["tdp", "legacy"])
def test_hugetlb_with_userfault_copies_whole_1g_pages_and_maps_them_at_1g(name):
    opts = DemandPagingOptions(vcpus=1, bytes_per_vcpu=1 << 30, backing="hugetlb")
    r = run_demand_paging(opts, CONFIGURATIONS[name])
    assert (r.verified, r.mappings_by_level["1G"]) == (True, 1)
