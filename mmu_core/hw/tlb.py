"""The TLB: a direct-mapped cache of final translations, one per vCPU, in a numpy array.

An entry caches one 4 KiB piece of a translation (fracturing large pages is architecturally
allowed): the host frame and the combined attributes (walker.A_*), so that permission checks on
a hit are re-evaluated against the current CR0/CR4/PKRU/CPL. A hit that would fault, or a write
through an entry whose D bit was clear, drops the entry and walks again, as the SDM requires for
setting D and as it permits for permission faults. Paging-structure caches are not modelled
separately: INVLPG and MOV CR3 drop what they would drop from the TLB itself.
"""

from __future__ import annotations

import numpy as np
from numba import njit

TLB_VPN = 0  # vpn + 1; 0 marks an empty entry
TLB_PFN = 1
TLB_ATTR = 2
TLB_COLS = 3
DEFAULT_ENTRIES = 1024


def new_tlb(entries: int = DEFAULT_ENTRIES) -> np.ndarray:
    if entries & (entries - 1):
        raise ValueError("TLB entries must be a power of two")
    return np.zeros((entries, TLB_COLS), dtype=np.int64)


@njit(cache=True)
def tlb_flush_all(tlb):
    tlb[:, TLB_VPN] = 0


@njit(cache=True)
def tlb_flush_va(tlb, gva):
    vpn = gva >> 12
    i = vpn & (tlb.shape[0] - 1)
    if tlb[i, TLB_VPN] == vpn + 1:
        tlb[i, TLB_VPN] = 0
