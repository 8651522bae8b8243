"""The TLB and the paging-structure caches of one vCPU, in one numpy array.

Rows [0, ntlb) are the TLB: a direct-mapped cache of final translations. An entry caches one
4 KiB piece of a translation (fracturing large pages is architecturally allowed): the host
frame and the combined attributes (walker.A_*), so that permission checks on a hit are
re-evaluated against the current CR0/CR4/PKRU/CPL. A hit that would fault, or a write through
an entry whose D bit was clear, drops the entry and walks again, as the SDM requires for setting
D and as it permits for permission faults. Under TDP with EPT A/D flags "D" is the guest leaf's
and the EPT leaf's together (walker.A_DIRTY): a write must also set a clear EPT D bit (SDM vol.
3C 29.4), which is what page-modification logging and D-bit dirty logging rely on.

Rows [ntlb, ntlb + PSC_LEVELS * sets) are the paging-structure caches (SDM vol. 3A 4.10.3; for
EPT, vol. 3C 29.4 "guest-physical mappings"): one direct-mapped region of `sets` rows per level
of non-leaf entry (PDE, PDPTE, PML4E, PML5E caches). An entry is keyed by the address prefix
that selects the cached entry (guest-physical under TDP, where the hardware caches the EPT
tables the backend built; linear under shadow paging, where it caches the shadow tables) and
tagged with the root it was reached from (EPT's EP4TA; the shadow root), and holds the table
the entry references and the permissions accumulated from the root down to it, so a walk that
starts there combines them exactly as a full walk would. The guest's own tables (the guest
dimension of a 2-D walk) are not cached.

Only flushes empty the caches: `tlb_flush_all` (MOV CR3, a remote flush request) drops every
entry; `tlb_flush_va` (INVLPG) drops the TLB entry for the address and every paging-structure
cache entry (SDM 4.10.4.1: INVLPG invalidates all paging-structure-cache entries for the current
PCID; for the EPT caches this is more than INVLPG must do, which is always allowed). Until then a
vCPU may keep walking through a table that the MMU has disconnected, which is what the TDP MMU's
flush-before-free exists for.

Row 0's column TLB_GEOM holds ntlb; the PSC geometry follows from the array's height.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# --- TLB rows ---------------------------------------------------------------------------------
TLB_VPN = 0  # vpn + 1; 0 marks an empty entry
TLB_PFN = 1
TLB_ATTR = 2
TLB_GEOM = 3  # row 0 only: the number of TLB rows (the PSC rows follow them)
TLB_COLS = 4
DEFAULT_ENTRIES = 1024

# --- paging-structure-cache rows (same columns, other meaning) --------------------------------
PSC_TAG = 0  # ((prefix << 1) | kind) + 1; 0 marks an empty entry. Column 0 in both row kinds,
#              so one store empties TLB and PSC alike.
PSC_ROOT = 1  # pfn of the root the entry was reached from
PSC_TABLE = 2  # pfn of the table the cached entry references (the next level to read)
PSC_ATTR = 3  # accumulated permissions: EPT R/W/X (AND), or walker A_USER|A_WRITABLE|A_NX
PSC_LEVELS = 4  # caches for entries of levels 2..5: PDE, PDPTE, PML4E, PML5E
PSC_LINEAR = 0  # kinds: keyed by linear address (shadow tables)
PSC_EPT = 1  # keyed by guest-physical address (EPT tables)
#: rows per level; the SDM leaves sizes open, a few dozen PDE-cache entries is typical
DEFAULT_PSC_SETS = 32


def new_tlb(entries: int = DEFAULT_ENTRIES, psc_sets: int | None = None) -> np.ndarray:
    """A vCPU's TLB with `entries` rows and `psc_sets` rows per paging-structure-cache level
    (both powers of two; psc_sets=0 turns the paging-structure caches off)."""
    psc_sets = DEFAULT_PSC_SETS if psc_sets is None else psc_sets
    if entries <= 0 or entries & (entries - 1):
        raise ValueError("TLB entries must be a power of two")
    if psc_sets < 0 or psc_sets & (psc_sets - 1):
        raise ValueError("paging-structure-cache sets must be 0 or a power of two")
    tlb = np.zeros((entries + PSC_LEVELS * psc_sets, TLB_COLS), dtype=np.int64)
    tlb[0, TLB_GEOM] = entries
    return tlb


@njit(cache=True, _nrt=False)
def tlb_entries(tlb):
    return tlb[0, TLB_GEOM]


@njit(cache=True, _nrt=False)
def tlb_flush_all(tlb):
    tlb[:, TLB_VPN] = 0  # TLB_VPN == PSC_TAG: the PSC rows go too


@njit(cache=True, _nrt=False)
def tlb_flush_va(tlb, gva):
    ntlb = tlb[0, TLB_GEOM]
    vpn = gva >> 12
    i = vpn & (ntlb - 1)
    if tlb[i, TLB_VPN] == vpn + 1:
        tlb[i, TLB_VPN] = 0
    tlb[ntlb:, PSC_TAG] = 0


@njit(cache=True, _nrt=False)
def _psc_row(tlb, level, prefix):
    ntlb = tlb[0, TLB_GEOM]
    sets = (tlb.shape[0] - ntlb) // PSC_LEVELS
    # Fold every 9-bit index of the prefix into the set, so that regions differing only in an
    # upper index (the guest's tables at gpa 0 and its data at 1 GiB) do not collide.
    h = prefix ^ (prefix >> 9) ^ (prefix >> 18) ^ (prefix >> 27) ^ (prefix >> 36)
    return ntlb + (level - 2) * sets + (h & (sets - 1))


@njit(cache=True, _nrt=False)
def psc_enabled(tlb):
    return tlb.shape[0] > 0 and tlb.shape[0] > tlb[0, TLB_GEOM]


@njit(cache=True, _nrt=False)
def psc_lookup(tlb, kind, root, addr, top):
    """The deepest cached non-leaf entry on addr's path below `root` (a structure of `top`
    levels, 9 index bits each): (level, table, attr), or (0, 0, 0) when nothing is cached."""
    addr &= (1 << (12 + 9 * top)) - 1
    for level in range(2, top + 1):
        prefix = addr >> (12 + 9 * (level - 1))
        row = _psc_row(tlb, level, prefix)
        if tlb[row, PSC_TAG] == ((prefix << 1) | kind) + 1 and tlb[row, PSC_ROOT] == root:
            return level, tlb[row, PSC_TABLE], tlb[row, PSC_ATTR]
    return 0, 0, 0


@njit(cache=True, _nrt=False)
def invalidate_addr(tlb, kind, addr, gva):
    """What a fault invalidates: the TLB entry for linear address `gva` and the
    paging-structure-cache entries of `kind` on `addr`'s path, for every root."""
    ntlb = tlb[0, TLB_GEOM]
    vpn = gva >> 12
    i = vpn & (ntlb - 1)
    if tlb[i, TLB_VPN] == vpn + 1:
        tlb[i, TLB_VPN] = 0
    if not psc_enabled(tlb):
        return
    addr &= (1 << 57) - 1
    for level in range(2, PSC_LEVELS + 2):
        prefix = addr >> (12 + 9 * (level - 1))
        row = _psc_row(tlb, level, prefix)
        if tlb[row, PSC_TAG] == ((prefix << 1) | kind) + 1:
            tlb[row, PSC_TAG] = 0


@njit(cache=True, _nrt=False)
def psc_fill(tlb, kind, root, level, addr, top, table, attr):
    """Cache the non-leaf entry at `level` on addr's path (it references `table`; `attr` is
    what the levels from the root down to it grant together)."""
    addr &= (1 << (12 + 9 * top)) - 1
    prefix = addr >> (12 + 9 * (level - 1))
    row = _psc_row(tlb, level, prefix)
    tlb[row, PSC_TAG] = ((prefix << 1) | kind) + 1
    tlb[row, PSC_ROOT] = root
    tlb[row, PSC_TABLE] = table
    tlb[row, PSC_ATTR] = attr


def cached_frames(tlb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a vCPU's caches can still reach without reading memory: (data_pfns, table_pfns),
    the host frames of valid TLB entries and the page-table pages valid paging-structure-cache
    entries reference (sorted, unique). For invariant audits: after the flush that precedes
    freeing, neither may hold a freed frame."""
    ntlb = int(tlb[0, TLB_GEOM])
    t = tlb[:ntlb]
    p = tlb[ntlb:]
    return (np.unique(t[t[:, TLB_VPN] != 0, TLB_PFN]),
            np.unique(p[p[:, PSC_TAG] != 0, PSC_TABLE]))


def psc_count(tlb: np.ndarray) -> int:
    """The number of valid paging-structure-cache entries."""
    ntlb = int(tlb[0, TLB_GEOM])
    return int(np.count_nonzero(tlb[ntlb:, PSC_TAG]))
