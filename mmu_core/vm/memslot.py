"""Memslots: guest-physical ranges backed by host virtual memory, in two address spaces.

Each address space (as_id 0 normal, 1 SMM) keeps its slots sorted by base gfn and mirrors them
in an int64 array (walker.MS_* columns) for the jitted walkers. Every change bumps the VM's
memslots generation, which MMIO SPTEs carry so that a stale one is recognised (KVM: the
memslots generation in kvm_memslots, checked by check_mmio_spte).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmu_core.hw import walker as W

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
#: KVM's KVM_MEMSLOT_INVALID: the slot is being deleted or moved; faults on it wait
KVM_MEMSLOT_INVALID = 1 << 16


@dataclass
class Memslot:
    id: int
    as_id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int = 0
    dirty_bitmap: np.ndarray | None = field(default=None, repr=False)

    @property
    def end_gfn(self) -> int:
        return self.base_gfn + self.npages

    @property
    def readonly(self) -> bool:
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def invalid(self) -> bool:
        return bool(self.flags & KVM_MEMSLOT_INVALID)

    @property
    def log_dirty(self) -> bool:
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    def gfn_to_hva(self, gfn: int) -> int:
        return self.userspace_addr + ((gfn - self.base_gfn) << 12)


class Memslots:
    """The slots of one address space."""

    def __init__(self, as_id: int) -> None:
        self.as_id = as_id
        self.slots: list[Memslot] = []
        self.array = W.EMPTY_MS.copy()

    def _rebuild(self) -> None:
        self.slots.sort(key=lambda s: s.base_gfn)
        arr = np.zeros((len(self.slots), W.MS_COLS), dtype=np.int64)
        for i, s in enumerate(self.slots):
            arr[i] = (s.base_gfn, s.npages, s.userspace_addr, s.flags)
        self.array = arr

    def add(self, slot: Memslot) -> None:
        self.slots.append(slot)
        self._rebuild()

    def remove(self, slot: Memslot) -> None:
        self.slots.remove(slot)
        self._rebuild()

    def update(self) -> None:
        self._rebuild()

    def find(self, gfn: int) -> Memslot | None:
        i = int(W.memslot_find(self.array, gfn))
        return None if i < 0 else self.slots[i]

    def overlaps(self, base_gfn: int, npages: int, ignore: Memslot | None = None) -> bool:
        """Whether [base_gfn, base_gfn + npages) meets a slot (other than `ignore`)."""
        return any(s is not ignore and base_gfn < s.end_gfn and s.base_gfn < base_gfn + npages
                   for s in self.slots)

    def by_id(self, slot_id: int) -> Memslot | None:
        return next((s for s in self.slots if s.id == slot_id), None)

    def overlapping_hva(self, start: int, end: int) -> list[tuple[Memslot, int, int]]:
        """(slot, first gfn, end gfn) for each slot whose hva range meets [start, end)."""
        out = []
        for s in self.slots:
            lo = max(start, s.userspace_addr)
            hi = min(end, s.userspace_addr + (s.npages << 12))
            if lo < hi:
                first = s.base_gfn + ((lo - s.userspace_addr) >> 12)
                last = s.base_gfn + ((hi - s.userspace_addr + 4095) >> 12)
                out.append((s, first, last))
        return out
