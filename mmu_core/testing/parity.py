"""The guest-visible digest: everything a guest can observe, hashed, for parity checks.

Two runs of the same program and seed are indistinguishable to the guest exactly when their
digests are equal: the value each access read, each fault injected (vector, error code; CR2
is the op's address), each MMIO exit, final guest memory (data tags and page-table contents,
including the A/D bits the walks set) and the dirty logs. Pages never populated read as zero
and are skipped, since when the host populates a page is not guest-visible.
"""

from __future__ import annotations

import hashlib

import numpy as np


def guest_digest(vm, results: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for vcpu, res in zip(vm.vcpus, results, strict=True):
        h.update(b"vcpu%d" % vcpu.id)
        h.update(np.ascontiguousarray(res).tobytes())
        h.update(repr(vcpu.mmio).encode())
    for slots in vm.memslots:
        for slot in slots.slots:
            h.update(b"slot%d/%d" % (slot.as_id, slot.id))
            lo = vm.mm.index(slot.userspace_addr)
            pfns = vm.mm.hva_pfn[lo : lo + slot.npages]
            present = np.flatnonzero(pfns >= 0)
            tags = vm.host.tag[pfns[present]]
            nz = tags != 0
            h.update(present[nz].astype(np.int64).tobytes())
            h.update(tags[nz].tobytes())
            for off in present.tolist():
                pfn = int(pfns[off])
                if vm.host.has_table(pfn):
                    row = vm.host.table(pfn)
                    if row.any():
                        h.update(b"pt%d" % off)
                        h.update(row.tobytes())
            if slot.dirty_bitmap is not None:
                h.update(b"dirty")
                h.update(slot.dirty_bitmap.tobytes())
    return h.hexdigest()
