"""The EPT12 walk in a jitted loop (#8 item 8): KVM's FNAME(walk_addr_generic) with PTTYPE_EPT,
reading L1's EPT12 tables through L1's memslots and the host's page tables, on the same numpy
arrays the hardware model walks (mmu_core/hw/walker.py: memslot rows, hva -> pfn, the
page-table frames).

`walk` stops with E12_NEED_GFN when the host page of an EPT12 table is not populated (or is
swapped out); the caller brings it in (kvm_read_guest would fault it in) and walks again, as
the shadow MMU's guest walk does with the hardware walker's W_NEED_GFN.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmu_core.hw import walker as W

LEVELS = 4
ADDR_MASK = 0x000F_FFFF_FFFF_F000
EPT_READ, EPT_WRITE, EPT_RWX, EPT_LARGE = 1, 2, 7, 1 << 7

E12_OK = 0
E12_NOT_MAPPED = 1  # an entry on the way is not present or W without R (misconfigured)
E12_NEED_GFN = 2  # OUT_ADDR: the gpa of an EPT12 table whose host page is not populated

OUT_STATUS = 0
OUT_ADDR = 1  # the L1 gpa the walk ends at (E12_OK)
OUT_PERM = 2  # R/W/X ANDed over the walk
OUT_N = 3  # entries read
OUT_GFN = 4  # 4 slots: the table gfn of entry i (top level first)
OUT_IDX = 8  # 4 slots: its index
OUT_ENTRY = 12  # 4 slots: its value (int64: bit 63 is the sign)
OUT_SIZE = 16


def new_out() -> np.ndarray:
    return np.zeros(OUT_SIZE, dtype=np.int64)


@njit(cache=True, _nrt=False)
def walk(pt, pt_slot, ms, hva_pfn, eptp, l2gpa, out):
    """Walk EPT12 from the EPTP's root for L2 gpa l2gpa; results in `out` (OUT_*)."""
    table = eptp & ADDR_MASK
    perm = EPT_RWX
    n = 0
    out[OUT_N] = 0
    for level in range(LEVELS, 0, -1):
        idx = (l2gpa >> (12 + 9 * (level - 1))) & 511
        gfn = table >> 12
        i = W.memslot_find(ms, gfn)
        entry = np.int64(0)  # outside every memslot: kvm_read_guest reads nothing
        if i >= 0:
            page = (ms[i, W.MS_HVA] + ((gfn - ms[i, W.MS_BASE_GFN]) << 12) - W.HVA_BASE) >> 12
            pfn = np.int64(hva_pfn[page]) if 0 <= page < hva_pfn.shape[0] else -1  # 4 bytes
            if pfn < 0:
                out[OUT_STATUS] = E12_NEED_GFN
                out[OUT_ADDR] = table
                return
            entry = W.table_word(pt, pt_slot, pfn, idx)
        out[OUT_GFN + n] = gfn
        out[OUT_IDX + n] = idx
        out[OUT_ENTRY + n] = entry
        n += 1
        out[OUT_N] = n
        rwx = entry & EPT_RWX
        if rwx == 0 or (rwx & EPT_WRITE and not rwx & EPT_READ):
            out[OUT_STATUS] = E12_NOT_MAPPED
            return
        perm &= rwx
        if level == 1 or (level <= 3 and entry & EPT_LARGE):
            size = np.int64(1) << (12 + 9 * (level - 1))
            out[OUT_ADDR] = (entry & ADDR_MASK & ~(size - 1)) | (l2gpa & (size - 1))
            out[OUT_PERM] = perm
            out[OUT_STATUS] = E12_OK
            return
        table = entry & ADDR_MASK
