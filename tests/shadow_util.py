"""Helpers of the shadow-backend feature tests (fast page fault, aging): a one-vCPU machine
on a configuration, destroyed when the test ends, and guest accesses to its data pages."""

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import DATA_SLOT, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.audit import audit
from mmu_core.testing.programs import data_gva


def machine(request, config="legacy", pages=16, backing="anon", params=None, **spec):
    """A one-vCPU, 4-level machine with `pages` data pages; `params` changes module
    parameters of the configuration."""
    params = CONFIGURATIONS[config].model_copy(update=params or {})
    m = build_machine(MachineSpec(vcpus=1, data_size=pages * 4096, backing=backing,
                                  mode=P.MODE_4LEVEL, **spec), VMConfig(params=params))
    request.addfinalizer(m.vm.destroy)
    return m


def shadow(m):
    return m.vm.backend_instances["shadow"]


def touch(m, pages, write=True):
    """Write page p + 1 to (or read) each data page p in turn; returns the results."""
    prog = Program()
    for p in pages:
        prog = prog.write(data_gva(p), p + 1) if write else prog.read(data_gva(p))
    return m.run_programs([prog.build()])[0]


def data_gfn(m, page: int) -> int:
    slot = m.vm.memslots[0].by_id(DATA_SLOT)
    return slot.base_gfn + page


def leaves(m, page):
    """Every 4K SPTE that maps data page `page`, from the rmap."""
    return [int(m.vm.spte_table(p >> 9)[p & 511])
            for p in shadow(m).rmaps.get(0, data_gfn(m, page), 1)]


def clean(m):
    assert audit(m.vm) == []


def race_a_reader(vm, work) -> dict[str, int]:
    """Run work() in a task while another asks for the MMU lock for read 1 ns later; the
    virtual times at which work ended ("work_end") and the reader got the lock."""
    times = {}

    def worker():
        work()
        times["work_end"] = vm.engine.now

    def reader():
        vm.engine.delay(1)
        with vm.mmu_lock.read():
            times["reader_got_lock"] = vm.engine.now

    vm.engine.spawn("worker", worker)
    vm.engine.spawn("reader", reader)
    vm.engine.run()
    return times
