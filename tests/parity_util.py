"""Run one guest program under each of the three configurations and digest what it saw."""

from __future__ import annotations

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import DATA_GPA, MMIO_GPA, MachineSpec, build_machine
from mmu_core.params import CONFIGURATIONS
from mmu_core.testing.parity import guest_digest

DATA_PAGES = 16


def spec_for(mode: int, **kw) -> MachineSpec:
    return MachineSpec(vcpus=1, data_size=DATA_PAGES * 4096, mode=mode, **kw)


def run_everywhere(spec: MachineSpec, build_program, seed: int = 0) -> dict[str, tuple[str, list]]:
    """{config: (digest, results)}; build_program(machine) -> list of numpy programs."""
    out = {}
    for name, params in CONFIGURATIONS.items():
        machine = build_machine(spec, VMConfig(seed=seed, params=params))
        try:
            results = machine.run_programs(build_program(machine))
            out[name] = (guest_digest(machine.vm, results), results)
        finally:
            machine.vm.destroy()
    return out


def data_gva(i: int) -> int:
    return DATA_GPA + 4096 * i


MMIO_GVA = MMIO_GPA
__all__ = ["DATA_PAGES", "MMIO_GVA", "P", "data_gva", "run_everywhere", "spec_for"]
