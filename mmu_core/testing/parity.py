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


def guest_digest(vm, results: list[np.ndarray], exclude: frozenset[int] = frozenset()) -> str:
    """`exclude`: gfns (address space 0) left out, contents and dirty bits: an L1 hypervisor's
    own pages (its EPT12 tables, docs/nested.md) when the digest is what its L2 guest sees."""
    h = hashlib.sha256()
    for vcpu, res in zip(vm.vcpus, results, strict=True):
        h.update(b"vcpu%d" % vcpu.id)
        h.update(np.ascontiguousarray(res).tobytes())
        h.update(repr(vcpu.mmio).encode())
    for slots in vm.memslots:
        for slot in slots.slots:
            h.update(b"slot%d/%d" % (slot.as_id, slot.id))
            mm = vm.mm
            lo = mm.index(slot.userspace_addr)
            pfns = mm.hva_pfn[lo : lo + slot.npages]
            # A swapped-out page is still guest memory: its contents come from the swap store.
            resident = pfns >= 0
            held = np.flatnonzero(resident | mm.hva_swapped[lo : lo + slot.npages])
            if exclude and slot.as_id == 0:
                held = held[~np.isin(held + slot.base_gfn, list(exclude))]
            tags = np.zeros(len(held), dtype=np.uint64)
            in_mem = resident[held]
            tags[in_mem] = vm.host.tag[pfns[held[in_mem]]]
            rows: list[tuple[int, np.ndarray]] = []
            mem_offs = held[in_mem]
            for off in mem_offs[vm.host.pt_slot[pfns[mem_offs]] >= 0].tolist():
                rows.append((off, vm.host.table(int(pfns[off]))))
            for k in np.flatnonzero(~in_mem).tolist():
                off = int(held[k])
                entry = mm.page_contents(slot.userspace_addr + (off << 12))
                tags[k] = np.uint64(entry.tag)
                if entry.table is not None:
                    rows.append((off, entry.table))
            rows = sorted((r for r in rows if r[1].any()), key=lambda r: r[0])
            nz = tags != 0
            h.update(held[nz].astype(np.int64).tobytes())
            h.update(tags[nz].tobytes())
            for off, row in rows:
                h.update(b"pt%d" % off)
                h.update(row.tobytes())
            if slot.dirty_bitmap is not None:
                bits = slot.dirty_bitmap
                if exclude and slot.as_id == 0:
                    bits = bits.copy()
                    offs = [g - slot.base_gfn for g in exclude if slot.base_gfn <= g < slot.end_gfn]
                    bits[offs] = 0
                h.update(b"dirty")
                h.update(bits.tobytes())
    return h.hexdigest()
