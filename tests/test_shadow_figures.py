"""Shadow MMU figures on KVM's demand_paging_test (docs/shadow.md), per configuration:

    python tests/test_shadow_figures.py [-v 8] [-b 16M] [--nr-mmu-pages N] [--remap K]

(pytest runs the small case at the end; the script lives with the tests because it builds
machines through the model's internals, which a backend's own code may not import.)

Exits per fault, emulated guest-PTE writes, unsync and sync counts, shadow pages, reclaim. The
demand-paging guest never edits its page tables, so `--remap K` adds a phase in which each
vCPU remaps K pages of its region (store the PTE, INVLPG, read): the case unsync pages are for.
"""

from __future__ import annotations

import argparse

import numpy as np

from mmu_core import VMConfig
from mmu_core.arch.x86 import paging as P
from mmu_core.guest.machine import MachineSpec, build_machine
from mmu_core.guest.program import Program
from mmu_core.params import CONFIGURATIONS
from mmu_core.workloads.demand_paging import DemandPagingOptions, _programs


def _size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * mult[text[-1]] if text[-1] in mult else int(text)


def run(config: str, vcpus: int, per_vcpu: int, nr_mmu_pages: int | None, remap: int) -> dict:
    opts = DemandPagingOptions(vcpus=vcpus, bytes_per_vcpu=per_vcpu)
    spec = MachineSpec(vcpus=vcpus, data_size=vcpus * per_vcpu, userfault=True)
    m = build_machine(spec, VMConfig(vcpus=vcpus, params=CONFIGURATIONS[config]))
    vm = m.vm
    try:
        if nr_mmu_pages:
            vm.hook.mmu_set_nr_mmu_pages(vm=vm, nr=nr_mmu_pages)
        progs = _programs(opts)
        if remap:
            pages = per_vcpu >> 12
            for v in range(vcpus):
                base = m.data_gva + v * per_vcpu
                extra = Program()
                for k in range(remap):
                    gva = base + 4096 * (k * 37 % pages)
                    target = base + 4096 * ((k * 37 + 1) % pages)
                    e_gpa = m.pts.entry_gpa(gva, 1, create=False)
                    extra.store_pte(m.pts.pt_gva_of(e_gpa), m.pts.leaf_value(
                        target, P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER | P.PT_ACCESSED))
                    extra.invlpg(gva).read(gva)
                progs[v] = np.concatenate([progs[v], extra.build()])
        m.spawn_uffd_handlers(0)
        m.run_programs(progs)
        exits: dict[str, int] = {}
        faults = 0
        for vcpu in vm.vcpus:
            for k, n in vcpu.exits.items():
                exits[k] = exits.get(k, 0) + n
            faults += sum(vcpu.faults.values())
        out = {"config": config, "faults": faults, "exits": sum(exits.values()),
               "exits_by_reason": exits, "tlb_flushes": vm.tlb_flushes}
        mem = vm.memory()
        out.update(mmu_pages=mem.mmu_page_structs, rmap_bytes=mem.rmap_bytes)
        sh = vm.backend_instances.get("shadow")
        if sh is not None and vm.backend_name == "shadow":
            out.update(sh.counters())
        return out
    finally:
        vm.destroy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-v", type=int, default=8)
    ap.add_argument("-b", default="16M")
    ap.add_argument("--nr-mmu-pages", type=int, default=None)
    ap.add_argument("--remap", type=int, default=0)
    ap.add_argument("--configs", default="tdp,legacy,shadow")
    a = ap.parse_args()
    keys = ["faults", "exits", "tlb_flushes", "mmu_pages", "rmap_bytes", "track_writes",
            "emulated", "unsync", "sync_pages", "sync_spte", "sync_dropped", "invlpg_sync",
            "prefetched", "prev_root_hits", "recycled", "shadow_zapped", "zap_batches",
            "n_used_mmu_pages", "n_max_mmu_pages", "enospc"]
    rows = [run(c, a.v, _size(a.b), a.nr_mmu_pages, a.remap) for c in a.configs.split(",")]
    print(f"{'':20}" + "".join(f"{r['config']:>14}" for r in rows))
    for k in keys:
        print(f"{k:20}" + "".join(f"{r.get(k, '-')!s:>14}" for r in rows))
    print(f"{'exits/fault':20}" + "".join(
        f"{r['exits'] / max(r['faults'], 1):>14.3f}" for r in rows))
    for r in rows:
        print(r["config"], "exits:", r["exits_by_reason"])


def test_figures_on_a_small_demand_paging_run():
    rows = {c: run(c, 2, 2 << 20, None, 8) for c in ("tdp", "shadow")}
    tdp, shadow = rows["tdp"], rows["shadow"]
    assert tdp["exits"] == tdp["faults"] and "unsync" not in tdp
    # each vCPU remaps 8 pages of its own 2 MiB (one table): its first store unsyncs the
    # table, each INVLPG syncs (drops) one entry
    assert shadow["unsync"] == 2 and shadow["track_writes"] == 0
    assert shadow["invlpg_sync"] == shadow["sync_dropped"] == 16
    assert shadow["exits_by_reason"]["invlpg"] == 16
    limited = run("shadow", 2, 8 << 20, 64, 0)
    assert limited["n_used_mmu_pages"] <= 64 and limited["recycled"] == 0


if __name__ == "__main__":
    main()
