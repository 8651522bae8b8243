"""Single-vCPU guest programs for backend parity, as a library: the conformance suite for
third-party backends and the project's own tests share them.

A program follows the architecture's rules for a well-behaved OS: after editing an entry the
guest invalidates what it changed (INVLPG for a leaf, MOV CR3 for a non-leaf), since what a
stale TLB entry yields is implementation-specific and may legitimately differ between
configurations. `run_everywhere` runs one program under several configurations (built-in
names or installed backends) and returns each one's guest-visible digest and results;
`assert_parity` says where the first difference is. Random programs come from
`mmu_core.testing.strategies` (hypothesis).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import numpy as np

from mmu_core.arch.x86 import paging as P
from mmu_core.config import VMConfig
from mmu_core.guest.machine import DATA_GPA, MMIO_GPA, MachineSpec, build_machine, smm_memslots
from mmu_core.guest.program import Program
from mmu_core.params import CONFIGURATIONS, configuration
from mmu_core.testing.parity import guest_digest
from mmu_core.vm.vcpu import SMBASE

DATA_PAGES = 16
PCID_FLAGS = P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER | P.PT_ACCESSED | P.PT_DIRTY
MMIO_GVA = MMIO_GPA
FLAG_BITS = (P.PT_PRESENT, P.PT_WRITABLE, P.PT_USER, P.PT_ACCESSED, P.PT_DIRTY)


def spec_for(mode: int, **kw) -> MachineSpec:
    return MachineSpec(vcpus=1, data_size=DATA_PAGES * 4096, mode=mode, **kw)


def data_gva(i: int) -> int:
    return DATA_GPA + 4096 * i


def run_everywhere(spec: MachineSpec, build_program: Callable, seed: int = 0,
                   configs: Iterable[str] = tuple(CONFIGURATIONS)) -> dict[str, tuple[str, list]]:
    """{config: (digest, results)}; build_program(machine) -> list of numpy programs.

    Each configuration must run an MMU of its own (the role its VM serves and the backend
    serving it): two that ran the same one would agree whatever that MMU does."""
    configs = tuple(configs)
    if len(set(configs)) != len(configs):
        raise ValueError(f"a configuration is named twice: {', '.join(configs)}")
    out: dict[str, tuple[str, list]] = {}
    served: dict[tuple[str, str], str] = {}
    for name in configs:
        machine = build_machine(spec, VMConfig(seed=seed, params=configuration(name)))
        try:
            mmu = (machine.vm.role.value, machine.vm.backend_name)
            if mmu in served:
                raise AssertionError(f"configurations {served[mmu]} and {name} both ran "
                                     f"backend {mmu[1]!r} for the {mmu[0]} role")
            served[mmu] = name
            results = machine.run_programs(build_program(machine))
            out[name] = (guest_digest(machine.vm, results), results)
        finally:
            machine.vm.destroy()
    return out


def _gva(i: int) -> int:
    if i == DATA_PAGES:
        return MMIO_GVA
    if i == DATA_PAGES + 1:
        return data_gva(DATA_PAGES + 600)  # unmapped: not present at the leaf or above
    return data_gva(i)


def build(ops, mode):
    def program(machine):
        pts = machine.pts
        setup = machine.paging
        ebytes = int(P.MODE_ENTRY_BYTES[mode])
        prog = Program()
        cr0, cr4 = setup.cr0, setup.cr4
        smm = False
        for op in ops:
            kind = op[0]
            if kind == "read":
                prog.read(_gva(op[1]) + 8)
            elif kind == "write":
                prog.write(_gva(op[1]), op[2])
            elif kind == "fetch":
                prog.fetch(_gva(op[1]))
            elif kind == "pte" and mode != P.MODE_NONE:
                _, page, flags, nx, target = op
                value = sum(b for k, b in enumerate(FLAG_BITS) if flags >> k & 1)
                if nx and pts.nx:
                    value |= P.PT_NX
                e_gpa = pts.entry_gpa(data_gva(page), 1, create=False)
                prog.store_pte(pts.pt_gva_of(e_gpa), pts.leaf_value(data_gva(target), value), ebytes)
                prog.invlpg(data_gva(page))
            elif kind == "pde" and mode != P.MODE_NONE:
                _, flags, nx = op
                value = P.PT_PRESENT | (P.PT_WRITABLE if flags & 1 else 0) | (P.PT_USER if flags & 2 else 0)
                value |= P.PT_ACCESSED if flags & 4 else 0
                if nx and pts.nx:
                    value |= P.PT_NX
                e_gpa = pts.entry_gpa(data_gva(0), 2, create=False)
                child = pts.read_entry(e_gpa) & ~0xFFF & ((1 << 52) - 1)
                prog.store_pte(pts.pt_gva_of(e_gpa), child | value, ebytes)
                prog.mov_cr3(setup.cr3)
            elif kind == "cpl":
                prog.set_cpl(op[1])
            elif kind == "ac":
                prog.set_ac(op[1])
            elif kind == "wp":
                cr0 = (cr0 | P.CR0_WP) if op[1] else (cr0 & ~P.CR0_WP)
                prog.mov_cr0(cr0)
            elif kind == "cr4":
                cr4 = cr4 & ~(P.CR4_SMEP | P.CR4_SMAP)
                cr4 |= (P.CR4_SMEP if op[1] else 0) | (P.CR4_SMAP if op[2] else 0)
                prog.mov_cr4(cr4)
            elif kind == "cr3":
                prog.mov_cr3(setup.cr3)
            elif kind == "smm":
                # an SMI, accesses with paging off (data through SMM's alias of RAM, and
                # SMRAM), RSM: the state comes back from SMRAM as it was saved
                if not smm:
                    smm_memslots(machine.vm)
                    smm = True
                prog.smi()
                for page, value in op[1]:
                    gpa = SMBASE + 0x1000 if page == DATA_PAGES else DATA_GPA + 4096 * page
                    if value:
                        prog.write(gpa, value)
                    else:
                        prog.read(gpa)
                prog.rsm()
        # End by reading every data page, so the final state is observed too.
        for i in range(DATA_PAGES):
            prog.read(data_gva(i))
        return [prog.build()]

    return program


def pcid_kernel(seed: int, rounds: int = 40) -> Callable:
    """A well-behaved kernel with two address spaces (PCIDs 1 and 2) sharing its tables:
    switches with and without the no-flush bit, global and non-global remaps, each followed
    by invalidations that cover every PCID that may cache the page (INVLPG, INVPCID of each
    type, a flushing switch later, or a CR4.PGE toggle), reads and writes."""
    def build(machine):
        rng = random.Random(seed)  # the same program for every configuration
        pts = machine.pts
        cr3 = {1: machine.paging.cr3, 2: pts.new_address_space()}
        cr4 = machine.paging.cr4 | P.CR4_PCIDE | P.CR4_PGE
        prog = Program().mov_cr4(cr4)
        cur = 1
        prog.mov_cr3(cr3[1] | 1)
        for i in range(14):
            prog.write(data_gva(i), 100 + i)
        dirty = {1: set(), 2: set()}  # pages a PCID must flush before it next runs
        ever_global = set()  # pages that may have a global entry: INVLPG or type 2 needed
        for _ in range(rounds):
            r = rng.random()
            if r < 0.2:
                cur = 3 - cur
                flush = bool(dirty[cur]) or rng.random() < 0.3
                prog.mov_cr3(cr3[cur] | cur, noflush=not flush)
                dirty[cur] = set()
            elif r < 0.45:
                page, target = rng.randrange(8), rng.randrange(8, 14)
                glob = rng.random() < 0.4
                had_global = page in ever_global or glob
                if glob:
                    ever_global.add(page)
                e_gpa = pts.entry_gpa(data_gva(page), 1, create=False)
                flags = PCID_FLAGS | (P.PT_GLOBAL if glob else 0)
                frame = data_gva(target if rng.random() < 0.7 else page)
                prog.store_pte(pts.pt_gva_of(e_gpa), pts.leaf_value(frame, flags))
                how = rng.randrange(5)
                if how == 0:
                    prog.invpcid(2)
                elif how == 1 and not had_global:
                    prog.invpcid(3)
                elif how == 2 and not had_global:
                    prog.invpcid(1, 1).invpcid(1, 2)
                elif how == 3:
                    prog.mov_cr4(cr4 & ~P.CR4_PGE).mov_cr4(cr4)
                else:
                    prog.invlpg(data_gva(page))  # this PCID's entry and the global one
                    other = 3 - cur
                    if rng.random() < 0.5:
                        prog.invpcid(0, other, data_gva(page))
                    else:
                        dirty[other].add(page)  # flushed at the next switch (Linux's way)
            elif r < 0.75:
                prog.read(data_gva(rng.randrange(14)))
            else:
                prog.write(data_gva(rng.randrange(8, 14)), rng.randrange(1, 1 << 30))
        for i in range(14):
            prog.read(data_gva(i))
        return [prog.build()]
    return build


def assert_parity(runs, reference: str = "tdp"):
    """Raise AssertionError naming the first op where a configuration differs from
    `reference`, or the digests if only memory, MMIO or dirty logs differ."""
    if reference not in runs or len(runs) < 2:
        raise AssertionError(f"parity needs {reference} and another configuration, got "
                             f"{', '.join(runs) or 'none'}")
    digests = {name: d for name, (d, _) in runs.items()}
    if len(set(digests.values())) != 1:
        base = runs[reference][1][0]
        for name, (_, res) in runs.items():
            diff = np.flatnonzero((res[0] != base).any(axis=1))
            if len(diff):
                raise AssertionError(f"{name} differs from {reference} first at op {diff[0]}: "
                                     f"{res[0][diff[0]]} vs {base[diff[0]]}; digests {digests}")
        raise AssertionError(f"digests differ (memory or MMIO): {digests}")
