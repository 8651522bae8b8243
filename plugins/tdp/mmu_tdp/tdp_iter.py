"""tdp_iter: the pre-order walk over a TDP paging structure, on which every operation loops.

Mirrors KVM's arch/x86/kvm/mmu/tdp_iter.c: start at the root, step down into present non-leaf
entries, step sideways along a table, step up when a table is exhausted. Each step reads the
entry it lands on through `vm.spte_read` (a switch point: other tasks may change entries
between steps), and stepping down re-reads the entry first so the walk never enters a table
that was unlinked meanwhile. After the caller yields the MMU lock (`yielded = True`) the next
step restarts from the root at the last leaf-level gfn reached, since the tables visited may
be gone.
"""

from __future__ import annotations

from mmu_core.arch.x86 import spte as S


class TdpIter:
    __slots__ = (
        "vm", "root", "root_level", "min_level", "end", "level", "gfn", "pt_path",
        "sptep", "old_spte", "next_last_level_gfn", "valid", "yielded", "atomic",
    )

    def __init__(self, vm, root: int, root_level: int, min_level: int, start: int, end: int,
                 atomic: bool = True) -> None:
        self.vm = vm
        self.root = root
        self.root_level = root_level
        self.min_level = min_level
        self.end = end
        self.pt_path = [0] * (root_level + 1)
        self.pt_path[root_level] = root
        self.next_last_level_gfn = start
        self.atomic = atomic  # read through the switch-point primitive (shared lock mode)
        self.yielded = False
        self.restart()

    def _read(self) -> None:
        table = self.pt_path[self.level]
        idx = S.spte_index(self.gfn, self.level)
        self.sptep = (table, idx)
        if self.atomic:
            self.old_spte = self.vm.spte_read(table, idx)
        else:
            self.old_spte = int(self.vm.spte_table(table)[idx])

    def restart(self) -> None:
        self.yielded = False
        self.level = self.root_level
        self.gfn = S.gfn_round_for_level(self.next_last_level_gfn, self.level)
        self.valid = True
        self._read()

    def _step_down(self) -> bool:
        if self.level == self.min_level:
            return False
        self._read()  # re-read: the entry may have been zapped since we landed on it
        spte = self.old_spte
        if not S.is_shadow_present_pte(spte) or S.is_last_spte(spte, self.level):
            return False
        self.level -= 1
        self.pt_path[self.level] = S.spte_to_pfn(spte)
        self.gfn = S.gfn_round_for_level(self.next_last_level_gfn, self.level)
        self._read()
        return True

    def _step_side(self) -> bool:
        if S.spte_index(self.gfn, self.level) == S.SPTE_ENT_PER_PAGE - 1:
            return False
        self.gfn += S.pages_per_level(self.level)
        self.next_last_level_gfn = self.gfn
        self._read()
        return True

    def _step_up(self) -> bool:
        if self.level == self.root_level:
            return False
        self.level += 1
        self.gfn = S.gfn_round_for_level(self.gfn, self.level)
        self._read()
        return True

    def next(self) -> None:
        if self.yielded:
            self.restart()
            return
        if self._step_down():
            return
        while True:
            if self._step_side():
                return
            if not self._step_up():
                break
        self.valid = False

    def __iter__(self):
        while self.valid and self.gfn < self.end:
            yield self
            self.next()
