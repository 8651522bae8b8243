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

TLB entries are tagged with the PCID they were filled under (SDM 4.10.1: CR3[11:0] while
CR4.PCIDE=1, else 0), or as global (the leaf's G bit with CR4.PGE=1, 4.10.2.4): the tag column
holds ((vpn << CTX_BITS) | ctx) + 1 with ctx the PCID or CTX_GLOBAL, so a hit is still one
compare. A non-global entry lives in row (vpn ^ salt(pcid)) & mask, so that two address spaces
using the same addresses under different PCIDs do not evict each other's entries; a global one in
row vpn & mask, which a lookup tries after a miss in its PCID's row. VPIDs are the vCPU's choice
of array (vm/vcpu.py: one TLB per tag).

Only invalidations empty the caches (SDM 4.10.4.1): `tlb_flush_all` (INVPCID type 2, a CR4.PGE
toggle, a remote flush request: VPID- or EPT-wide) drops every entry; `tlb_flush_pcid` (MOV CR3
without the no-flush bit, INVPCID type 1) the non-global entries of one PCID; `tlb_flush_nonglobal`
(INVPCID type 3) every non-global entry; `tlb_flush_va` (INVLPG) the address's entries for the
current PCID and its global entry, `tlb_flush_addr` (INVPCID type 0) the address's non-global
entry for one PCID. Each of them also drops every paging-structure-cache entry (the SDM asks for
those of the PCID concerned; for the EPT caches this is more than it asks, which is always
allowed). Until then a vCPU may keep walking through a table that the MMU has disconnected,
which is what the TDP MMU's flush-before-free exists for.

Row 0's column TLB_GEOM holds ntlb; the PSC geometry follows from the array's height.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# --- TLB rows ---------------------------------------------------------------------------------
TLB_VPN = 0  # the tag: ((vpn << CTX_BITS) | ctx) + 1 (tlb_tag); 0 marks an empty entry
TLB_PFN = 1
TLB_ATTR = 2
TLB_GEOM = 3  # row 0 only: the number of TLB rows (the PSC rows follow them)
TLB_COLS = 4
DEFAULT_ENTRIES = 1024
CTX_BITS = 13  # a tag's context field: a PCID (12 bits) or CTX_GLOBAL
CTX_GLOBAL = 1 << 12  # a global translation: any PCID may use it
CTX_MASK = (1 << CTX_BITS) - 1
ALL_PCIDS = -1  # tlb_flush_va: the address's entries whatever their PCID (INVVPID, KVM's
#                 flush_tlb_gva under shadow paging)

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


@njit(cache=True, _nrt=False, inline="always")
def tlb_tag(vpn, ctx):
    """The tag of vpn's entry for context ctx (a PCID, or CTX_GLOBAL). Never 0: ctx < 2^13 - 1."""
    return ((vpn << CTX_BITS) | ctx) + 1


@njit(cache=True, _nrt=False, inline="always")
def tlb_row(nmask, vpn, pcid):
    """The row of vpn's entry for `pcid` (pass 0 for a global entry)."""
    return (vpn ^ (pcid * 0x9E5)) & nmask


@njit(cache=True, _nrt=False)
def tlb_flush_all(tlb):
    tlb[:, TLB_VPN] = 0  # TLB_VPN == PSC_TAG: the PSC rows go too


@njit(cache=True, _nrt=False)
def _drop(tlb, row, tag):
    if tlb[row, TLB_VPN] == tag:
        tlb[row, TLB_VPN] = 0


@njit(cache=True, _nrt=False)
def tlb_flush_va(tlb, gva, pcid=0):
    """INVLPG: the entries for gva's page tagged with `pcid` and its global entry, and every
    paging-structure-cache entry. pcid=ALL_PCIDS: gva's entries whatever their PCID."""
    ntlb = tlb[0, TLB_GEOM]
    nmask = ntlb - 1
    vpn = gva >> 12
    if pcid == ALL_PCIDS:
        for row in range(ntlb):
            tag = tlb[row, TLB_VPN]
            if tag != 0 and ((tag - 1) >> CTX_BITS) == vpn:
                tlb[row, TLB_VPN] = 0
    else:
        _drop(tlb, tlb_row(nmask, vpn, pcid), tlb_tag(vpn, pcid))
        _drop(tlb, tlb_row(nmask, vpn, 0), tlb_tag(vpn, CTX_GLOBAL))
    tlb[ntlb:, PSC_TAG] = 0


@njit(cache=True, _nrt=False)
def tlb_flush_addr(tlb, gva, pcid):
    """INVPCID type 0: gva's non-global entry for `pcid`, and the paging-structure caches."""
    ntlb = tlb[0, TLB_GEOM]
    vpn = gva >> 12
    _drop(tlb, tlb_row(ntlb - 1, vpn, pcid), tlb_tag(vpn, pcid))
    tlb[ntlb:, PSC_TAG] = 0


@njit(cache=True, _nrt=False)
def tlb_flush_pcid(tlb, pcid):
    """MOV CR3 that flushes, INVPCID type 1: every non-global entry tagged with `pcid`, and
    the paging-structure caches. pcid=ALL_PCIDS: every non-global entry (INVPCID type 3)."""
    ntlb = tlb[0, TLB_GEOM]
    for row in range(ntlb):
        tag = tlb[row, TLB_VPN]
        if tag != 0:
            ctx = (tag - 1) & CTX_MASK
            if ctx != CTX_GLOBAL and (pcid == ALL_PCIDS or ctx == pcid):
                tlb[row, TLB_VPN] = 0
    tlb[ntlb:, PSC_TAG] = 0


@njit(cache=True, _nrt=False)
def tlb_flush_nonglobal(tlb):
    """INVPCID type 3: every non-global entry of every PCID, and the paging-structure caches."""
    tlb_flush_pcid(tlb, ALL_PCIDS)


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
def invalidate_addr(tlb, kind, addr, gva, pcid):
    """What a fault invalidates: the TLB entries for linear address `gva` (the current
    PCID's and the global one) and the paging-structure-cache entries of `kind` on `addr`'s
    path, for every root."""
    ntlb = tlb[0, TLB_GEOM]
    vpn = gva >> 12
    _drop(tlb, tlb_row(ntlb - 1, vpn, pcid), tlb_tag(vpn, pcid))
    _drop(tlb, tlb_row(ntlb - 1, vpn, 0), tlb_tag(vpn, CTX_GLOBAL))
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
