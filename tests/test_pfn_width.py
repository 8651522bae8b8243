"""Pfns in 4 bytes (HostMM.hva_pfn, host/memory.py PFN_DTYPE), on the paths that take a pfn out
of the host's page tables, with every frame of the machine above 2^21: there a pfn shifted to
an address in 4 bytes wraps (2^21 << 12 is 2^33), so a missed widening names another frame and
the guest reads the wrong data, the digest changes or the audit fails."""

from __future__ import annotations

import pytest
import test_host_events as H

from mmu_core.errors import InvalidConfig, OutOfMemory
from mmu_core.host import NO_PFN, HostMemory, Purpose
from mmu_core.host.memory import PFN_DTYPE, PFN_LIMIT
from mmu_core.params import configuration
from mmu_core.sim import fastloop
from mmu_core.testing.audit import audit
from mmu_core.vm import vm as vm_module
from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging

RESERVED = 1 << 20  # frames taken first: aligned to their size, so the machine's start at 2^21


def _reserved_host() -> HostMemory:
    host = HostMemory()
    assert host.alloc(Purpose.MMU_ROOT, RESERVED) == RESERVED
    return host


@pytest.fixture
def high_pfns(monkeypatch):
    """Every VM built in the test gets its frames above 2^21."""
    monkeypatch.setattr(vm_module, "HostMemory", _reserved_host)


def _mapped_pfns(vm):
    pfns = vm.mm.hva_pfn
    return pfns[pfns != NO_PFN]


@pytest.mark.parametrize("uffd", [False, True])
@pytest.mark.parametrize("config", ["tdp", "legacy"])
def test_demand_paging_with_high_pfns_is_the_same_run(monkeypatch, config, uffd):
    # Both engines (the exact one: GUP, the fault, the userfault copy, the walker; the
    # compiled loop: its GUP and both backends' kernels, the legacy prefetch's lookups) with
    # high pfns give the report of a run with low ones: nothing guest-visible or timed
    # depends on where the frames are. The audit and the mm's audit hold at the end.
    kw = dict(vcpus=4, bytes_per_vcpu=64 * 4096, uffd=uffd)
    low = run_demand_paging(DemandPagingOptions(engine="exact", **kw), configuration(config))
    seen = []
    destroy = vm_module.VM.destroy

    def check(vm):
        seen.append((int(_mapped_pfns(vm).min()), [str(v) for v in audit(vm)], vm.mm.audit()))
        destroy(vm)

    monkeypatch.setattr(vm_module.VM, "destroy", check)
    monkeypatch.setattr(vm_module, "HostMemory", _reserved_host)
    for engine in ("exact", "compiled"):
        high = run_demand_paging(DemandPagingOptions(engine=engine, **kw), configuration(config))
        assert high.wall.engine == engine and high.verified
        a, b = low.model_dump(exclude={"wall"}), high.model_dump(exclude={"wall"})
        assert {k for k in a if a[k] != b[k]} == set()
    assert [s[0] >= 2 * RESERVED for s in seen] == [True, True]
    assert [s[1:] for s in seen] == [([], [])] * 2


@pytest.mark.parametrize(("backing", "event"), list(H.EVENTS))
@pytest.mark.parametrize("name", ["tdp", "legacy"])
def test_host_events_with_high_pfns_are_invisible(high_pfns, name, backing, event):
    # swap out and in, migration, KSM and its copy-on-write, THP split and collapse
    H.test_contents_preserving_event_is_invisible_to_the_guest(name, backing, event)


@pytest.mark.parametrize("name", ["tdp", "legacy"])
def test_host_events_racing_a_vcpu_with_high_pfns_are_invisible(high_pfns, name):
    H.test_host_events_in_a_task_racing_a_vcpu_are_invisible(name, 1, "random")


def test_a_pfn_comes_out_of_the_host_page_tables_as_a_python_int(high_pfns):
    m = H.machine_for("tdp")
    try:
        H.run(m, H.Program().write(H.data_gva(0), 5))
        assert m.vm.mm.hva_pfn.dtype == PFN_DTYPE
        pfn = m.vm.mm.lookup(H.hva_of(m, 0))
        assert type(pfn) is int and pfn >= 2 * RESERVED and (pfn << 12) >> 12 == pfn
    finally:
        m.vm.destroy()


def test_more_frames_than_4_byte_pfns_name_are_refused():
    with pytest.raises(InvalidConfig, match="max_frames"):
        HostMemory(max_frames=PFN_LIMIT + 1)
    mem = HostMemory()
    with pytest.raises(OutOfMemory, match="8 TiB"):
        mem.alloc(Purpose.GUEST_DATA, PFN_LIMIT)  # aligned: it would start at 2^31
    # the compiled loop grows the frames up front through the same check
    with pytest.raises(OutOfMemory, match="8 TiB"):
        fastloop._Memory(mem, PFN_LIMIT, 8)
    assert len(mem.tag) < PFN_LIMIT and mem.frames_in_use.sum() == 0
