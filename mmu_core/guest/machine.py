"""A guest machine: a VM, the guest's page tables and memory layout, and vCPU tasks.

Layout (guest-physical == guest-linear for data, as the selftests' identity maps):
  slot 0  page tables, at gpa 0 (above the data when their tables need more than the 1 GiB
          below it: over about 256 GiB of data), mapped by the guest at PT_GVA_* + gpa for
          its own PTE stores
  slot 1  data, at DATA_GPA (1 GiB, so 1 GiB pages can be aligned), optionally userfault
          registered in per-vCPU ranges (one handler each, like demand_paging_test), or as
          one range read by one handler per vCPU (uffd_shared, the selftest's -a)
  MMIO    MMIO_GPA: no memslot; accesses exit to the model's MMIO device
SMM's address space (1), when a test gives the machine one (smm_memslots): the data slot
aliased (the same host memory) and SMRAM of its own, from 0x20000 to 0x40000 (SMBASE
0x30000 after reset; 0x20000 for a vCPU relocated below it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmu_core.arch.x86 import paging as P
from mmu_core.config import MemslotConfig, VMConfig, validate
from mmu_core.guest.pagetables import PT_GVA_64, GuestPageTables, PagingSetup
from mmu_core.guest.program import new_results
from mmu_core.host.userfault import Userfaultfd
from mmu_core.vm.vm import VM, create_vm

DATA_GPA = 1 << 30
MMIO_GPA = 0xF000_0000
MMIO_PAGES = 16
DATA_SLOT = 1
PT_SLOT = 0
SMRAM_SLOT = 20
SMRAM_GPA, SMRAM_SIZE = 0x20000, 0x20000


def page_patterns(gfns: np.ndarray) -> np.ndarray:
    """Contents a userfault handler supplies for pages: a fixed function of each gfn."""
    g = gfns.astype(np.uint64) + np.uint64(1)
    return ((g * np.uint64(0x9E37_79B9_7F4A_7C15)) & np.uint64(0x7FFF_FFFF_FFFF_FFFF)).astype(np.int64)


def pt_slot_size(data_pages: int) -> int:
    """Enough 4 KiB pages for the tables mapping the data and the page-table slot itself."""
    leaf_tables = data_pages // 512 + 2
    size = (leaf_tables * 2 + 64) * 4096
    return (size + (2 << 20) - 1) & ~((2 << 20) - 1)


def pt_slot_gpa(data_size: int, pt_size: int) -> int:
    """Where the page-table slot goes: at gpa 0 when it fits below the data (every
    configuration up to about 256 GiB of data, the layout the tests pin), else on the first
    1 GiB boundary above the data, so that the guest's window onto it (PT_GVA_64 + gpa)
    lies above the data's identity map too (the seed's 416 x 4 GiB needs a slot of 7 GB)."""
    if pt_size <= DATA_GPA and DATA_GPA + data_size <= PT_GVA_64:
        return 0
    return (DATA_GPA + data_size + (1 << 30) - 1) & ~((1 << 30) - 1)


@dataclass
class MachineSpec:
    vcpus: int
    data_size: int
    backing: str = "anon"
    mode: int = P.MODE_4LEVEL
    userfault: bool = False
    # one userfaultfd over all the data, read by one handler per vCPU (demand_paging_test
    # -a), instead of one uffd (and one handler) per vCPU's region
    uffd_shared: bool = False
    data_flags: int = P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER
    map_data: bool = True
    log_dirty: bool = False
    readonly: bool = False
    smep: bool = False
    smap: bool = False
    pke: bool = False
    wp: bool = True


@dataclass
class Machine:
    vm: VM
    spec: MachineSpec
    pts: GuestPageTables
    paging: PagingSetup
    uffds: list[Userfaultfd] = field(default_factory=list)

    @property
    def data_gva(self) -> int:
        return DATA_GPA

    def vcpu_region(self, i: int) -> tuple[int, int]:
        per = self.spec.data_size // self.spec.vcpus
        return DATA_GPA + i * per, per

    def spawn_uffd_handlers(self, delay_ns: int = 0) -> None:
        """Handler tasks that read a fault, wait `delay_ns` and UFFDIO_COPY it: one per
        userfaultfd, or one per vCPU on the single uffd of `uffd_shared`."""
        engine = self.vm.engine
        readers = self.spec.vcpus if self.spec.uffd_shared else 1
        for k, uffd in enumerate(self.uffds):
            for r in range(readers):
                name = f"uffd{k}" if readers == 1 else f"uffd{k}.{r}"
                engine.spawn(name, _uffd_handler, engine, uffd, self.vm, delay_ns, daemon=True)

    def run_programs(self, programs: list[np.ndarray]) -> list[np.ndarray]:
        """Run one program per vCPU, concurrently in the engine; returns their results."""
        results = [new_results(p) for p in programs]
        for vcpu, prog, res in zip(self.vm.vcpus, programs, results, strict=True):
            vcpu.task = self.vm.engine.spawn(f"vcpu{vcpu.id}", vcpu.run, prog, res)
        self.vm.engine.run()
        return results


def _uffd_handler(engine, uffd: Userfaultfd, vm: VM, delay_ns: int) -> None:
    while True:
        msg = uffd.read()
        if delay_ns:
            engine.delay(delay_ns, "uffd_delay")
        slot = vm.memslots[0].find(DATA_GPA >> 12)
        first = uffd.copy_range(msg.hva)  # the page, or the whole huge page of hugetlbfs
        gfn = slot.base_gfn + ((first[0] - slot.userspace_addr) >> 12)
        uffd.copy(msg.hva, page_patterns(np.arange(gfn, gfn + first[1], dtype=np.int64)))


def smm_memslots(vm: VM) -> None:
    """What a VMM gives SMM (QEMU's SMRAM address space): address space 1 holds RAM (the
    data slot, aliased: a second memslot on the same host mapping, so the MMU notifier zaps
    both) and SMRAM that only SMM reaches."""
    data = vm.memslots[0].by_id(DATA_SLOT)
    vm.add_memslot(DATA_SLOT, data.base_gfn << 12, data.npages * 4096, as_id=1,
                   hva=data.userspace_addr)
    vm.add_memslot(SMRAM_SLOT, SMRAM_GPA, SMRAM_SIZE, as_id=1)


def build_machine(spec: MachineSpec, config: VMConfig) -> Machine:
    """Create the VM (config's memslots are replaced by the layout's) and the guest tables."""
    data_pages = spec.data_size >> 12
    pt_size = pt_slot_size(data_pages)
    pt_gpa = pt_slot_gpa(spec.data_size, pt_size)
    slots = (
        MemslotConfig(slot=PT_SLOT, gpa=pt_gpa, size=pt_size),
        MemslotConfig(slot=DATA_SLOT, gpa=DATA_GPA, size=spec.data_size, backing=spec.backing,
                      log_dirty=spec.log_dirty, readonly=spec.readonly),
    )
    config = config.model_copy(update={"memslots": slots, "vcpus": spec.vcpus})
    validate(VMConfig, **config.model_dump())  # one InvalidConfig, not pydantic's report
    vm = create_vm(config)
    try:
        pts = GuestPageTables(vm, spec.mode, pt_gpa, pt_size)
        if spec.map_data and spec.mode != P.MODE_NONE:
            pts.map_range(DATA_GPA, DATA_GPA, data_pages, spec.data_flags)
            pts.map_range(MMIO_GPA, MMIO_GPA, MMIO_PAGES, spec.data_flags)
        paging = pts.setup(wp=spec.wp, smep=spec.smep, smap=spec.smap, pke=spec.pke)
        machine = Machine(vm, spec, pts, paging)
        if spec.userfault:
            slot = vm.memslots[0].by_id(DATA_SLOT)
            nuffd = 1 if spec.uffd_shared else spec.vcpus
            per = spec.data_size // nuffd
            for i in range(nuffd):
                machine.uffds.append(
                    Userfaultfd(vm.engine, vm.mm, slot.userspace_addr + i * per, per))
        for vcpu in vm.vcpus:
            vcpu.set_paging(paging.cr0, paging.cr4, paging.efer, paging.cr3)
    except Exception:
        vm.destroy()
        raise
    return machine
