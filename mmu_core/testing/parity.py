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

from mmu_core.host.memory import NO_SLOT

#: Pages of a memslot taken at a time: the digest's temporaries are a few arrays of this
#: length, not of the slot's (at the seed's 416 x 4 GiB, whole-slot arrays were 10 GB).
#: About 50 bytes a page: 1 M pages is 50 MB above the run's arrays at any scale (4 M was
#: 200 MB, the run's peak RSS: measured by phase, docs/fastloop.md).
DIGEST_CHUNK = 1 << 20


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
            # The slot's populated pages hash as: every offset holding non-zero data, then
            # those pages' tags, then each non-empty page-table page. Three passes over the
            # slot in chunks feed sha256 exactly the bytes one pass over the whole slot would.
            chunks = range(0, slot.npages, DIGEST_CHUNK)
            for c in chunks:
                held, tags, _ = _chunk_contents(vm, slot, exclude, c)
                h.update(held[tags != 0].astype(np.int64).tobytes())
            for c in chunks:
                _, tags, _ = _chunk_contents(vm, slot, exclude, c)
                h.update(tags[tags != 0].tobytes())
            for c in chunks:
                for off, row in _chunk_contents(vm, slot, exclude, c, tables=True)[2]:
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


def _chunk_contents(vm, slot, exclude: frozenset[int], first: int, tables: bool = False):
    """Pages [first, first + DIGEST_CHUNK) of `slot`: the offsets (from the slot's start) of
    those the guest holds (resident or swapped out, not excluded), their tags, and, when
    `tables`, the (offset, entries) of each that holds a non-empty page table, by offset."""
    mm = vm.mm
    n = min(DIGEST_CHUNK, slot.npages - first)
    lo = mm.index(slot.userspace_addr) + first
    pfns = mm.hva_pfn[lo : lo + n]
    # A swapped-out page is still guest memory: its contents come from the swap store.
    resident = pfns >= 0
    held = np.flatnonzero(resident | mm.hva_swapped[lo : lo + n])
    if exclude and slot.as_id == 0:
        held = held[~np.isin(held + slot.base_gfn + first, list(exclude))]
    tags = np.zeros(len(held), dtype=np.uint64)
    in_mem = resident[held]
    tags[in_mem] = vm.host.tag[pfns[held[in_mem]]]
    rows: list[tuple[int, np.ndarray]] = []
    mem_offs = held[in_mem]
    if tables:
        for off in mem_offs[vm.host.pt_slot[pfns[mem_offs]] != NO_SLOT].tolist():
            rows.append((first + off, vm.host.table(int(pfns[off]))))
    for k in np.flatnonzero(~in_mem).tolist():
        off = int(held[k])
        entry = mm.page_contents(slot.userspace_addr + ((first + off) << 12))
        tags[k] = np.uint64(entry.tag)
        if tables and entry.table is not None:
            rows.append((first + off, entry.table))
    rows = sorted((r for r in rows if r[1].any()), key=lambda r: r[0])
    return held + first, tags, rows
