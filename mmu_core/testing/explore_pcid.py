"""The `pcid` explorer scenario (docs/concurrency.md): vCPUs switch between two address spaces
tagged with PCIDs, mostly with the no-flush bit, while one of them edits the page tables the
two share and the kernel invalidates the way Linux does (INVLPG for its own PCID, INVPCID
individual-address or single-context for the other, all-context, or a flushing CR3 load
later). Under shadow paging this is KVM's fast CR3 switch (fast_pgd_switch) with unsync
pages: a cached root reused without sync, kvm_invalidate_pcid freeing the cached roots of a
PCID, kvm_mmu_invpcid_gva. The reference model keeps stale translations per (vCPU, PCID).
"""

from __future__ import annotations

import random

from mmu_core.arch.x86 import paging as P
from mmu_core.config import VMConfig
from mmu_core.guest.program import Program
from mmu_core.hw import cpu as C
from mmu_core.testing.explore import SCENARIOS, Reference, Run, _fill, _machine, _page

PCIDS = (1, 2)


class PcidReference(Reference):
    """Guest memory as it must be when vCPUs use PCIDs: a translation left stale by a remap
    may be seen in each PCID of each vCPU until that vCPU invalidates it for that PCID
    (SDM 4.10.4): INVLPG for its current PCID, INVPCID for the PCID it names (every PCID for
    types 2 and 3), MOV CR3 without the no-flush bit for the new PCID. The scenario uses no
    global pages."""

    def __init__(self, machine) -> None:
        super().__init__(machine)
        self.pstale: dict[tuple[int, int, int], set[int]] = {}  # (vcpu, pcid, page)

    def _gfns(self, vcpu_id: int, page: int) -> set[int]:
        if page not in self.target:
            return {page}
        pcid = self.vm.vcpus[vcpu_id].pcid  # no switch point since the ops ran
        return {self.target[page]} | self.pstale.get((vcpu_id, pcid, page), set())

    def _forget(self, vcpu_id: int, pcid: int | None, page: int | None = None) -> None:
        for key in [k for k in self.pstale if k[0] == vcpu_id and pcid in (None, k[1])
                    and page in (None, k[2])]:
            del self.pstale[key]

    def ops_done(self, vcpu, prog, results, lo: int, hi: int) -> None:
        for pc in range(lo, hi):
            op, gva, value = (int(v) for v in prog[pc])
            if op in (C.OP_WPTE, C.OP_WPTE32) and (vcpu.id, pc) in self.remap:
                vpage, gfn = self.remap[(vcpu.id, pc)]
                for v in self.vm.vcpus:
                    for pcid in PCIDS:
                        self.pstale.setdefault((v.id, pcid, vpage), set()).add(
                            self.target[vpage])
                self.target[vpage] = gfn
            elif op == C.OP_INVLPG:
                self._forget(vcpu.id, vcpu.pcid, gva >> 12)
            elif op == C.OP_MOV_CR3:
                if value >= 0 and not results[pc, C.RES_VECTOR]:  # bit 63 clear: a flush
                    self._forget(vcpu.id, vcpu.pcid)
            elif op == C.OP_INVPCID:
                kind = value >> C.INVPCID_TYPE_SHIFT
                pcid = value & P.CR3_PCID_MASK
                if kind == 0:
                    self._forget(vcpu.id, pcid, gva >> 12)
                elif kind == 1:
                    self._forget(vcpu.id, pcid)
                else:
                    self._forget(vcpu.id, None)
            else:
                super().ops_done(vcpu, prog, results, pc, pc + 1)


def scenario_pcid(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs run two processes (CR3 A with PCID 1, CR3 B with PCID 2, sharing every lower
    table) and switch between them, with the no-flush bit seven times in ten. vCPU 1 also
    remaps data page 0 among six frames by storing its PTE (under shadow paging the shared
    last-level table goes unsync) and invalidates it for itself (INVLPG, or INVPCID of every
    type) or not at all; vCPU 0 reads page 0 and flushes as a kernel answering shootdown
    IPIs would: INVLPG or INVPCID individual-address for one PCID, single-context for the
    PCID it is not running, or all-context. After its own invalidation for a PCID a vCPU
    must see the current frame in that PCID; before it, the reference allows every frame
    the page had since."""
    m = _machine(config, 2, 16)
    ref = PcidReference(m)
    pts = m.pts
    cr3 = {1: m.paging.cr3, 2: pts.new_address_space()}
    targets = [4, 5, 6, 7, 8, 9]
    _fill(ref, m, targets, rng)
    ref.remappable(_page(0) >> 12)
    e_gpa = pts.entry_gpa(_page(0), 1, create=False)
    progs = []
    for v in (0, 1):
        prog = Program().mov_cr4(m.paging.cr4 | P.CR4_PCIDE).mov_cr3(cr3[1] | 1)
        cur = 1
        for _ in range(16):
            r = rng.random()
            if r < 0.35:
                cur = 3 - cur
                prog.mov_cr3(cr3[cur] | cur, noflush=rng.random() < 0.7)
            elif v == 1 and r < 0.6:
                t = targets[rng.randrange(len(targets))]
                ref.remap[(v, len(prog.rows))] = (_page(0) >> 12, _page(t) >> 12)
                prog.store_pte(pts.pt_gva_of(e_gpa), pts.leaf_value(
                    _page(t), P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER | P.PT_ACCESSED))
                how = rng.randrange(5)
                if how == 0:
                    prog.invlpg(_page(0))
                elif how == 1:
                    prog.invpcid(1, 1).invpcid(1, 2)
                elif how == 2:
                    prog.invpcid(rng.choice((2, 3)))
                elif how == 3:
                    prog.invlpg(_page(0)).invpcid(0, 3 - cur, _page(0))
            elif v == 0 and r < 0.6:
                how = rng.randrange(4)
                if how == 0:
                    prog.invlpg(_page(0))
                elif how == 1:  # mostly for the PCID it runs, as a shootdown IPI's handler
                    prog.invpcid(0, cur if rng.random() < 0.7 else 3 - cur, _page(0))
                elif how == 2:
                    prog.invpcid(1, 3 - cur)
                else:
                    prog.invpcid(rng.choice((2, 3)))
            prog.read(_page(0)).read(_page(10 + v))
            prog.pause(rng.randrange(0, 3000))
        progs.append(prog.build())
    return Run(m, progs, ref)


SCENARIOS["pcid"] = scenario_pcid
