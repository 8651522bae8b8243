"""The context-switch figures of docs/shadow.md: what a CR3 switch costs with and without
PCIDs, under tdp, legacy and shadow paging, in virtual time.

One vCPU runs P processes (address spaces sharing the kernel's lower tables, as
GuestPageTables.new_address_space makes them) round-robin for S switches. In each time slice
the process reads W pages of its own (the working set) and remaps one of them (a PTE store and
INVLPG, as munmap/mmap or a COW fault would). Without PCIDs every switch is a MOV CR3 that
flushes; with them (CR4.PCIDE=1, process i on PCID i+1) a switch sets the no-flush bit unless
the process's PCID must be flushed because it was remapped from elsewhere (never here: each
process edits only its own pages). Printed per switch: VM exits, shadow roots synced
(kvm_mmu_sync_roots that found unsync pages) and shadow pages synced, reuses of a cached
root (fast_pgd_switch), hardware TLB misses (walks) and the paging-structure entries they read,
and the virtual time of the whole run divided by S.

Run: python benchmarks/context_switch.py [--processes 4] [--switches 400] [--working-set 16]
"""

from __future__ import annotations

import argparse

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import DATA_GPA, MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.hw import cpu as C
from mmu_core.params import CONFIGURATIONS

FLAGS = P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER | P.PT_ACCESSED | P.PT_DIRTY


def run(config: str, pcids: bool, processes: int, switches: int, wset: int) -> dict:
    pages = processes * wset
    m = build_machine(MachineSpec(vcpus=1, data_size=pages * 4096),
                      VMConfig(params=CONFIGURATIONS[config]))
    try:
        pts = m.pts
        cr3 = [m.paging.cr3] + [pts.new_address_space() for _ in range(processes - 1)]
        prog = Program()
        if pcids:
            prog.mov_cr4(m.paging.cr4 | P.CR4_PCIDE)
        for s in range(switches):
            p = s % processes
            if pcids:
                prog.mov_cr3(cr3[p] | (p + 1), noflush=s >= processes)
            else:
                prog.mov_cr3(cr3[p])
            base = DATA_GPA + p * wset * 4096
            for i in range(wset):
                prog.read(base + 4096 * i)
            victim = base + 4096 * (s // processes % wset)
            e_gpa = pts.entry_gpa(victim, 1, create=False)
            prog.store_pte(pts.pt_gva_of(e_gpa), pts.leaf_value(victim, FLAGS))
            prog.invlpg(victim)
        m.run_programs([prog.build()])
        vcpu = m.vm.vcpus[0]
        out = {"exits": sum(vcpu.exits.values()), "walks": int(vcpu.hw_stats[C.ST_WALKS]),
               "walk_reads": int(vcpu.hw_stats[C.ST_WALK_READS]), "ns": m.vm.engine.now}
        sh = m.vm.backend_instances.get("shadow")
        c = sh.counters() if sh is not None and config == "shadow" else {}
        out.update(sync_roots=c.get("sync_roots", 0), sync_pages=c.get("sync_pages", 0),
                   prev_root_hits=c.get("prev_root_hits", 0))
        return out
    finally:
        m.vm.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--switches", type=int, default=400)
    ap.add_argument("--working-set", type=int, default=16)
    ap.add_argument("--configs", nargs="+", default=["tdp", "legacy", "shadow"])
    a = ap.parse_args()
    cols = ("exits", "sync_roots", "sync_pages", "prev_root_hits", "walks", "walk_reads", "ns")
    print(f"{a.processes} processes, {a.switches} switches, {a.working_set} pages read and one "
          "remapped per time slice; per switch:")
    print(f"{'config':8} {'PCIDs':5} " + " ".join(f"{c:>14}" for c in cols))
    for config in a.configs:
        for pcids in (False, True):
            r = run(config, pcids, a.processes, a.switches, a.working_set)
            print(f"{config:8} {'on' if pcids else 'off':5} "
                  + " ".join(f"{r[c] / a.switches:14.2f}" for c in cols))


if __name__ == "__main__":
    main()
