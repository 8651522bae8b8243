"""tdp_iter: pre-order over a real TDP structure, restart after a yield, racing faults."""

from parity_util import data_gva, spec_for

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import DATA_GPA, build_machine
from mmu_core.guest.program import Program
from mmu_core.hw import cpu as C
from mmu_core.params import CONFIGURATIONS
from mmu_tdp.tdp_iter import TdpIter

G = DATA_GPA >> 12  # 0x40000: the first data gfn, 1 GiB aligned


def machine_with_two_pages():
    m = build_machine(spec_for(P.MODE_NONE), VMConfig(params=CONFIGURATIONS["tdp"]))
    m.run_programs([Program().read(data_gva(0)).read(data_gva(1)).build()])
    return m


def test_iteration_is_pre_order_down_then_side():
    m = machine_with_two_pages()
    try:
        root = m.vm.vcpus[0].mmu_root
        seen = [(it.level, it.gfn) for it in TdpIter(m.vm, root, 4, 1, G, G + 3)]
        assert seen == [(4, 0), (3, G), (2, G), (1, G), (1, G + 1), (1, G + 2)]
    finally:
        m.vm.destroy()


def test_iteration_restarts_from_the_root_after_a_yield():
    m = machine_with_two_pages()
    try:
        root = m.vm.vcpus[0].mmu_root
        it = TdpIter(m.vm, root, 4, 1, G, G + 2)
        seen = []
        for step in it:
            seen.append((step.level, step.gfn))
            if (step.level, step.gfn) == (1, G + 1) and len(seen) == 5:
                step.yielded = True  # as if the MMU lock had been dropped and retaken
        assert seen == [(4, 0), (3, G), (2, G), (1, G), (1, G + 1),
                        (4, 0), (3, G), (2, G), (1, G + 1)]
    finally:
        m.vm.destroy()


def test_min_level_stops_the_descent():
    m = machine_with_two_pages()
    try:
        root = m.vm.vcpus[0].mmu_root
        assert [(it.level, it.gfn) for it in TdpIter(m.vm, root, 4, 2, G, G + 1)] == [
            (4, 0), (3, G), (2, G)]
    finally:
        m.vm.destroy()


def test_vcpus_racing_on_one_page_lose_cmpxchg_and_retry_but_all_read_it():
    spec = spec_for(P.MODE_NONE)
    spec.vcpus = 8
    m = build_machine(spec, VMConfig(params=CONFIGURATIONS["tdp"], policy="random", seed=5))
    try:
        progs = [Program().write(data_gva(0), 42).read(data_gva(0)).build()
                 if i == 0 else Program().read(data_gva(3)).build() for i in range(8)]
        results = m.run_programs(progs)
        backend = m.vm.backend_instances["tdp"]
        assert backend.stats["cmpxchg_lost"] + backend.stats["spurious"] > 0
        assert results[0][1, C.RES_VALUE] == 42
        assert all(r[0, C.RES_VECTOR] == 0 for r in results)
        assert m.vm.mmu_lock.writer is None and not m.vm.mmu_lock.readers
    finally:
        m.vm.destroy()
