"""Reverse maps as KVM keeps them: per memslot, per level, one head per gfn.

KVM's memslot carries `arch.rmap[level]`, an array of `struct kvm_rmap_head` (one unsigned
long) per gfn at each level (4K, 2M, 1G; kvm_alloc_memslot_metadata, indexed by
gfn_to_index). A head is empty, points at one SPTE, or (low bit set) points at a chain of
`pte_list_desc`s holding up to PTE_LIST_EXT SPTE pointers each (pte_list_add /
pte_list_remove). Here an SPTE pointer is `table_pfn * 512 + index`, a head is an int64:
0 empty, >0 one SPTE (pointer + 1), <0 a descriptor list (its id, negated). The arrays are
numpy, so their memory is what KVM's is: 8 bytes per gfn per level, plus 128 bytes per
descriptor.

The TDP MMU does not need rmaps, so with it KVM allocates them only when the first shadow
root appears (mmu_first_shadow_root_alloc, kvm_memslots_have_rmaps): `Rmaps.allocated` is
False until `allocate_all` runs, and slots created meanwhile get none.
"""

from __future__ import annotations

import numpy as np

LEVELS = (1, 2, 3)  # PG_LEVEL_4K, 2M, 1G: the levels a leaf can map
PTE_LIST_EXT = 14  # SPTE pointers per pte_list_desc (KVM 6.x: fills 128 bytes)
PTE_LIST_DESC_BYTES = 128
RMAP_HEAD_BYTES = 8


def _shift(level: int) -> int:
    return 9 * (level - 1)


class SlotRmap:
    """One memslot's rmap heads, one array per level."""

    __slots__ = ("as_id", "slot_id", "base", "npages", "heads")

    def __init__(self, as_id: int, slot_id: int, base: int, npages: int) -> None:
        self.as_id = as_id
        self.slot_id = slot_id
        self.base = base
        self.npages = npages
        # gfn_to_index(gfn, base, level) = (gfn >> shift) - (base >> shift); the array for a
        # level covers every index of [base, base + npages).
        self.heads = [np.zeros(((base + npages - 1) >> _shift(lv)) - (base >> _shift(lv)) + 1,
                               dtype=np.int64) for lv in LEVELS]

    def index(self, gfn: int, level: int) -> int:
        return (gfn >> _shift(level)) - (self.base >> _shift(level))

    def contains(self, gfn: int) -> bool:
        return self.base <= gfn < self.base + self.npages


class Rmaps:
    def __init__(self) -> None:
        self.slots: dict[tuple[int, int], SlotRmap] = {}
        self.descs: dict[int, list[int]] = {}  # descriptor id -> SPTE pointers
        self._next = 1
        self.allocated = False

    # --- memslot metadata ---------------------------------------------------------------
    def alloc_slot(self, as_id: int, slot) -> None:
        """kvm_alloc_memslot_metadata's rmap part (only once rmaps are in use)."""
        if self.allocated:
            self.slots[(as_id, slot.id)] = SlotRmap(as_id, slot.id, slot.base_gfn, slot.npages)

    def free_slot(self, as_id: int, slot_id: int) -> None:
        """kvm_arch_free_memslot: the slot's SPTEs were zapped before it went away."""
        rm = self.slots.pop((as_id, slot_id), None)
        if rm is None:
            return
        for heads in rm.heads:
            for h in heads[heads < 0].tolist():
                self.descs.pop(-h, None)

    def allocate_all(self, memslots) -> bool:
        """mmu_first_shadow_root_alloc: allocate every slot's rmaps; True the first time."""
        if self.allocated:
            return False
        self.allocated = True
        for as_id, slots in enumerate(memslots):
            for slot in slots.slots:
                self.alloc_slot(as_id, slot)
        return True

    def find(self, as_id: int, gfn: int) -> SlotRmap | None:
        for rm in self.slots.values():
            if rm.as_id == as_id and rm.contains(gfn):
                return rm
        return None

    # --- pte_list_add / pte_list_remove -------------------------------------------------------
    def add(self, as_id: int, gfn: int, level: int, sptep: int) -> int:
        """Record that SPTE `sptep` maps gfn at `level`; returns how many SPTEs the head now
        holds (KVM's rmap_add uses it to recycle long chains). -1: no rmap for the gfn."""
        rm = self.find(as_id, gfn)
        if rm is None:
            return -1
        heads = rm.heads[level - 1]
        i = rm.index(gfn, level)
        h = int(heads[i])
        if h == 0:
            heads[i] = sptep + 1
            return 1
        if h > 0:
            d = self._next
            self._next += 1
            self.descs[d] = [h - 1, sptep]
            heads[i] = -d
            return 2
        chain = self.descs[-h]
        chain.append(sptep)
        return len(chain)

    def remove(self, as_id: int, gfn: int, level: int, sptep: int) -> bool:
        """Forget SPTE `sptep` of gfn's head; False if it was not there."""
        rm = self.find(as_id, gfn)
        if rm is None:
            return False
        heads = rm.heads[level - 1]
        i = rm.index(gfn, level)
        h = int(heads[i])
        if h > 0:
            if h - 1 != sptep:
                return False
            heads[i] = 0
            return True
        if h == 0:
            return False
        chain = self.descs[-h]
        try:
            chain.remove(sptep)
        except ValueError:
            return False
        if len(chain) == 1:  # back to a single pointer, as pte_list_desc_remove_entry
            heads[i] = chain[0] + 1
            del self.descs[-h]
        return True

    def get(self, as_id: int, gfn: int, level: int) -> list[int]:
        rm = self.find(as_id, gfn)
        if rm is None:
            return []
        return self._unpack(int(rm.heads[level - 1][rm.index(gfn, level)]))

    def _unpack(self, h: int) -> list[int]:
        if h == 0:
            return []
        if h > 0:
            return [h - 1]
        return list(self.descs[-h])

    def in_range(self, as_id: int, start: int, end: int, level: int) -> list[int]:
        """Every SPTE pointer whose leaf at `level` maps a gfn range touching [start, end)
        (the walk of for_each_slot_rmap_range)."""
        out: list[int] = []
        for rm in self.slots.values():
            if rm.as_id != as_id:
                continue
            lo = max(start, rm.base)
            hi = min(end, rm.base + rm.npages)
            if lo >= hi:
                continue
            heads = rm.heads[level - 1]
            seg = heads[rm.index(lo, level):rm.index(hi - 1, level) + 1]
            for h in seg[seg != 0].tolist():
                out.extend(self._unpack(h))
        return out

    def all_entries(self):
        """(as_id, gfn, level, sptep) for every entry (the audit)."""
        for rm in self.slots.values():
            for level in LEVELS:
                heads = rm.heads[level - 1]
                base_index = rm.base >> _shift(level)
                for i in np.flatnonzero(heads).tolist():
                    gfn = (base_index + i) << _shift(level)
                    for sptep in self._unpack(int(heads[i])):
                        yield rm.as_id, gfn, level, sptep

    def nbytes(self) -> int:
        heads = sum(h.size for rm in self.slots.values() for h in rm.heads) * RMAP_HEAD_BYTES
        descs = sum((len(c) + PTE_LIST_EXT - 1) // PTE_LIST_EXT for c in self.descs.values())
        return heads + descs * PTE_LIST_DESC_BYTES
