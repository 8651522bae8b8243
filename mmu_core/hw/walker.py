"""The CPU's page walker: one generic, jitted walk for every paging mode, 1-D or 2-D.

`walk()` serves three callers with the same rules:
  * the hardware 2-D walk under TDP: guest tables (guest-physical) whose every access, and the
    final address, is translated through EPT (`XL_EPT`);
  * the hardware 1-D walk over shadow tables (host-physical, `XL_NONE`), with the register
    state KVM loads into hardware under shadow paging;
  * KVM's software walk of the guest's tables (paging_tmpl.h's walk_addr), for the shadow MMU
    and the emulator, reaching guest memory through memslots and the host page tables
    (`XL_SLOTS`).
Paging modes are data (mmu_core.arch.x86.paging); permission rules follow SDM vol. 3A 4.6,
reserved bits 4.3-4.5, error codes 4.7, and A/D updates follow KVM's software walker: A on
every level used and D on a written leaf, only when the access succeeds (SDM 4.8 allows it).

`walk_cached()` is the hardware's walk: it also uses and fills the vCPU's paging-structure
caches (hw/tlb.py) for the structure the hardware walks from the MMU's root, the EPT tables in
a 2-D walk and the shadow tables in a 1-D walk over them. A walk starts below the deepest cached
non-leaf entry with the permissions accumulated down to it and reads only the levels below.
Reserved bits and misconfigurations of cached levels are not checked again (only valid entries
are cached, SDM 4.10.3.1), and an entry is cached only once the accessed flags are 1 in it and
every entry above it, so starting from the cache sets exactly the A/D bits a full walk would.
The guest's own tables in a 2-D walk are not cached.

A 2-D walk also keeps EPT's own flags when EPTP bit 6 enables them (`ept_ad`, SDM vol. 3C
29.3.5): A on every EPT entry used, for the guest tables' addresses as for the final one, and D
on the leaf of a written page, where writing a guest entry's A/D bits is a write to its table
page. Without it the EPT entries are left alone (and their A bits do not gate caching). With
page-modification logging (a `pml` buffer, 29.3.6), each EPT D bit set from 0 to 1 appends that
page's gpa to the vCPU's log, and an EPT A/D update that finds the log full stops the walk
(W_PML_FULL) for the VM exit that drains it. One deliberate difference from the SDM: with EPT
A/D on, the processor treats its reads of guest paging structures as writes (EPT write
permission needed, the table page's EPT D set and logged); the model treats them as reads, so
that dirty logs hold what the guest wrote and stay comparable with shadow paging, where KVM's
software walk only reads the tables.

A table address beyond host memory reads as 0 (not present), as a frame that holds no table
does: the walk faults and never reads outside the arrays. The walk allocates nothing: the
translations return scalars and the walk's scratch state lives in `out`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.host.memory import NO_SLOT, PFN_DTYPE
from mmu_core.hw.tlb import PSC_EPT, PSC_LINEAR, TLB_COLS, psc_enabled, psc_fill, psc_lookup

# --- register block passed to the walker (int64 array) ------------------------------------
R_MODE = 0
R_CR3 = 1
R_FLAGS = 2
R_PKRU = 3
R_MAXPHY = 4
R_PDPTR = 5  # 4 PAE PDPTE registers: 5..8
R_PCID = 9  # the current PCID (CR3[11:0] while CR4.PCIDE=1, else 0): what TLB entries are
#             tagged with (hw/tlb.py)
R_SIZE = 10

F_WP = 1 << 0  # CR0.WP
F_NXE = 1 << 1  # EFER.NXE
F_SMEP = 1 << 2
F_SMAP = 1 << 3
F_PKE = 1 << 4
F_PSE = 1 << 5
F_AC = 1 << 6  # RFLAGS.AC
F_USER = 1 << 7  # CPL == 3
F_PGE = 1 << 8  # CR4.PGE: a leaf's G bit makes its translation global (SDM 4.10.2.4)

# --- how table and final addresses become host-physical ------------------------------------
XL_NONE = 0  # already host-physical (shadow tables; unit tests of the guest rules)
XL_EPT = 1  # through EPT rooted at `ept_root` (a pfn)
XL_SLOTS = 2  # through memslots (rows of `ms`) and the host page tables (`hva_pfn`)

MS_BASE_GFN = 0
MS_NPAGES = 1
MS_HVA = 2
MS_FLAGS = 3
MS_COLS = 4
HVA_BASE = 0x7F00_0000_0000

# --- result block (int64 array of OUT_SIZE) --------------------------------------------------
W_OK = 0
W_PF = 1  # guest page fault: OUT_CODE is the error code
W_EPT_VIOLATION = 2  # OUT_ADDR is the gpa, OUT_CODE the exit qualification
W_EPT_MISCONFIG = 3  # OUT_ADDR is the gpa
W_NEED_GFN = 4  # XL_SLOTS: the host page of guest table gfn OUT_ADDR>>12 is not populated
# (a missing final data page is not an error: W_OK with OUT_HPA = -1, as walk_addr)
W_NO_SLOT = 5  # XL_SLOTS: a guest table lies outside every memslot
W_PML_FULL = 6  # an EPT A/D update found the PML buffer full (OUT_ADDR: the gpa translated)

OUT_STATUS = 0
OUT_ADDR = 1  # final gpa (W_OK), or the faulting gpa
OUT_CODE = 2
OUT_LEVEL = 3  # level of the leaf that mapped the address
OUT_ATTR = 4  # combined attributes, see A_*
OUT_HPA = 5  # final host-physical address (W_OK)
OUT_N = 6  # number of guest entries read
OUT_ADW = 7  # bit i: entry i had A (or D) newly set by this walk
OUT_TGPA = 8  # 5 slots: gpa of the entry read at step i (top level first)
OUT_TPTE = 13  # 5 slots: its value as read (before A/D updates)
OUT_READS = 18  # paging-structure entries read from memory, both dimensions (walk cost)
OUT_SKIPPED = 19  # entry reads that paging-structure-cache hits saved
# The walker's scratch (per entry read, like OUT_TGPA): so that a walk allocates nothing.
OUT_THPA = 20  # 5 slots: host-physical address of entry i (-1: a PAE PDPTE register)
OUT_PTABLE = 25  # 5 slots: shadow-table walks, the table entry i references (a pfn) ...
OUT_PATTR = 30  # 5 slots: ... and the permissions down to it, cached once A is set
OUT_SIZE = 35

A_USER = 1 << 0  # U/S=1 at every level
A_WRITABLE = 1 << 1  # R/W=1 at every level
A_NX = 1 << 2  # XD=1 at some level (only counted when EFER.NXE=1)
A_DIRTY = 1 << 3  # leaf D bit after this walk's update; in a 2-D walk with EPT A/D flags, the
#                   guest leaf's D and the EPT leaf's D (SDM vol. 3C 29.4: a write through a
#                   translation cached with either clear walks again to set it)
A_HOST_R = 1 << 4  # second-dimension permissions (EPT R/W/X; all set without EPT)
A_HOST_W = 1 << 5
A_HOST_X = 1 << 6
A_GLOBAL = 1 << 7  # the leaf's G bit with CR4.PGE=1: a global translation (hw/tlb.py)
A_PKEY_SHIFT = 8

_ADDR_MASK_52 = ((1 << 52) - 1) & ~0xFFF
_PAE_RSVD_62_52 = ((1 << 63) - 1) & ~((1 << 52) - 1)  # reserved in PAE PDEs and PTEs


@njit(cache=True, _nrt=False)
def memslot_find(ms: np.ndarray, gfn: int) -> int:
    """Index of the memslot row containing gfn (rows sorted by base gfn), or -1."""
    lo, hi = 0, ms.shape[0] - 1
    while lo <= hi:
        mid = (lo + hi) >> 1
        base = ms[mid, MS_BASE_GFN]
        if gfn < base:
            hi = mid - 1
        elif gfn >= base + ms[mid, MS_NPAGES]:
            lo = mid + 1
        else:
            return mid
    return -1


@njit(cache=True, _nrt=False, inline="always")
def table_word(pt, pt_slot, pfn, idx):
    """Entry idx of the page-table page at host frame pfn, as an int64; 0 (not present) for a
    frame that holds no table, and for a frame beyond host memory: a table address there ends
    the walk in a fault, never in a read outside the arrays."""
    if pfn < 0 or pfn >= pt_slot.shape[0]:
        return np.int64(0)
    slot = pt_slot[pfn]
    if slot == NO_SLOT:
        return np.int64(0)
    return np.int64(pt[slot, idx])


@njit(cache=True, _nrt=False, inline="always")
def read_entry(pt, pt_slot, hpa, ebytes):
    """The entry at hpa as an int64 (bit 63 is the sign: numba keeps uint64 unsigned and
    mixing it with int64 promotes to float, so every entry is converted once, here)."""
    word = table_word(pt, pt_slot, hpa >> 12, (hpa & 0xFFF) >> 3)
    if ebytes == 4:
        return (word >> (32 * ((hpa >> 2) & 1))) & 0xFFFFFFFF
    return word


@njit(cache=True, _nrt=False, inline="always")
def or_entry(pt, pt_slot, hpa, ebytes, bits):
    """Set `bits` in the entry at hpa (one that read_entry found present, so its frame holds a
    table)."""
    slot = pt_slot[hpa >> 12]
    idx = (hpa & 0xFFF) >> 3
    if ebytes == 4:
        bits = bits << np.uint64(32 * ((hpa >> 2) & 1))
    pt[slot, idx] = pt[slot, idx] | bits


#: the PML buffer is one 4 KiB page of 8-byte GPAs (vmx.h PML_ENTITY_NUM); a buffer array
#: holds the count in [0] and the GPAs after it, in the order they were logged
PML_ENTITY_NUM = 512
NO_PML = np.zeros(0, dtype=np.int64)  # PML off

#: a translation's `perm` when it reports none (a misconfiguration, a full PML log, a memslot
#: miss): the walker's qualification then keeps the last permissions reported in the walk
NO_PERM = -1


@njit(cache=True, _nrt=False)
def _ept_set_ad(pt, pt_slot, table, top, perm, gpa, set_d, use_psc, psc, root, levels):
    """The second pass of a translation that must set EPT flags: A on every entry from level
    `top` (table `table`, reached with permissions `perm`) down to the leaf, D on the leaf when
    `set_d`, and every non-leaf entry on the way into the paging-structure caches (all of them
    now have A set; those cached by the first pass are written again with the same values)."""
    for level in range(top, 0, -1):
        idx = (gpa >> (12 + 9 * (level - 1))) & 511
        slot = pt_slot[table]
        e = np.int64(pt[slot, idx])
        leaf = level == 1 or (e & E.EPT_LARGE) != 0
        bits = E.EPT_ACCESSED | (E.EPT_DIRTY if leaf and set_d else 0)
        pt[slot, idx] |= np.uint64(bits)
        if leaf:
            return
        perm &= e & E.EPT_RWX
        table = (e & _ADDR_MASK_52) >> 12
        if use_psc:
            psc_fill(psc, PSC_EPT, root, level, gpa, levels, table, perm)


@njit(cache=True, _nrt=False, inline="always")
def _ept_walk(pt, pt_slot, root, levels, gpa, need, ept_ad, psc):
    """The reading pass of an EPT translation (see ept_translate), inlined where walks are hot.
    Returns (status, hpa, perm, level, reads, skipped, leaf_dirty, unset_a, top, top_table,
    top_perm): unset_a says an entry read has A clear; the walk started at level `top` of
    table `top_table` with permissions `top_perm` (below a paging-structure-cache hit)."""
    perm = E.EPT_RWX
    table = root
    top = levels
    skipped = 0
    use_psc = psc_enabled(psc)
    if use_psc:
        hit, cached_table, cached_perm = psc_lookup(psc, PSC_EPT, root, gpa, levels)
        if hit:
            # Start below the cached entry, with what the levels above it granted.
            table = cached_table
            perm = cached_perm
            top = hit - 1
            skipped = levels - top
    top_table = table
    top_perm = perm
    reads = 0
    # An entry is cacheable only when A is 1 in it and in every entry above it (SDM 4.10.3.1);
    # the others become cacheable once this translation sets A on the whole path.
    all_accessed = True
    unset_a = False  # an entry on the path (read from memory) has A clear
    for level in range(top, 0, -1):
        idx = (gpa >> (12 + 9 * (level - 1))) & 511
        e = table_word(pt, pt_slot, table, idx)
        reads += 1
        rwx = e & E.EPT_RWX
        if rwx == 0:
            return W_EPT_VIOLATION, 0, 0, 0, reads, skipped, False, False, 0, 0, 0
        if (rwx & E.EPT_WRITE) and not (rwx & E.EPT_READ):
            # write-only or write+exec: KVM's MMIO SPTEs use this
            return W_EPT_MISCONFIG, 0, NO_PERM, 0, reads, skipped, False, False, 0, 0, 0
        large = (e & E.EPT_LARGE) != 0
        if large and level > 3:
            # bit 7 is reserved in EPT PML4Es/PML5Es
            return W_EPT_MISCONFIG, 0, NO_PERM, 0, reads, skipped, False, False, 0, 0, 0
        perm &= rwx
        accessed = (e & E.EPT_ACCESSED) != 0
        unset_a = unset_a or not accessed
        if level == 1 or large:
            mt = (e & E.EPT_MT_MASK) >> E.EPT_MT_SHIFT
            if mt == 2 or mt == 3 or mt == 7:
                return W_EPT_MISCONFIG, 0, NO_PERM, 0, reads, skipped, False, False, 0, 0, 0
            if not (perm & need):
                return W_EPT_VIOLATION, 0, perm, 0, reads, skipped, False, False, 0, 0, 0
            size = 1 << (12 + 9 * (level - 1))
            hpa = (e & _ADDR_MASK_52 & ~(size - 1)) | (gpa & (size - 1))
            return (W_OK, hpa, perm, level, reads, skipped, (e & E.EPT_DIRTY) != 0, unset_a,
                    top, top_table, top_perm)
        table = (e & _ADDR_MASK_52) >> 12
        if use_psc:
            all_accessed = all_accessed and (accessed or not ept_ad)
            if all_accessed:
                psc_fill(psc, PSC_EPT, root, level, gpa, levels, table, perm)
    return W_EPT_VIOLATION, 0, 0, 0, reads, skipped, False, False, 0, 0, 0  # not reached


@njit(cache=True, _nrt=False)
def ept_translate(pt, pt_slot, root, levels, gpa, need, set_ad, dirty, ept_ad, psc, pml):
    """Translate gpa through EPT for an access needing `need` (EPT_READ/...). Returns
    (status, hpa, perm, level, reads, skipped, dirty, pending):
      status  W_OK, W_EPT_VIOLATION, W_EPT_MISCONFIG or W_PML_FULL;
      hpa, level  the host-physical address and the level of the EPT leaf (W_OK);
      perm    the AND of R/W/X over the entries read (W_OK, W_EPT_VIOLATION), else NO_PERM;
      reads, skipped  entries read from memory, and those a paging-structure-cache hit saved;
      dirty   0 when EPT A/D flags are on and the leaf's D is clear after the translation;
      pending 1 when the translation needs A/D updates that set_ad=False left undone (the
              walker checks every part of an access first and sets flags only then).

    `ept_ad` is EPTP bit 6, EPT accessed and dirty flags (kvm_intel.ept_ad). With it, and
    `set_ad`, the walk sets A on every entry it used and, for a write (`dirty`), D on the
    leaf, only when the access is allowed (SDM vol. 3C 29.3.5). Without it the processor
    neither sets nor heeds them (and caches entries whatever their A bit says).

    `psc` is the vCPU's TLB array (its EPT paging-structure caches are used and filled) or an
    empty array. `pml` is the vCPU's page-modification log (SDM 29.3.6) or NO_PML: when this
    translation is about to set an EPT A or D bit and the log is full, nothing is set and the
    status is W_PML_FULL (the access does not happen; a VM exit follows); when it sets a leaf's
    D from 0 to 1, the page-aligned gpa is appended. Nothing is allocated: results are scalars.
    """
    st, hpa, perm, level, reads, skipped, leaf_dirty, unset_a, top, top_table, top_perm = \
        _ept_walk(pt, pt_slot, root, levels, gpa, need, ept_ad, psc)
    if st != W_OK:
        return st, 0, perm, 0, reads, skipped, 0, 0
    pending = 0
    if ept_ad:
        set_d = dirty and not leaf_dirty
        if unset_a or set_d:
            if not set_ad:
                pending = 1
            else:
                if pml.shape[0]:
                    if pml[0] >= pml.shape[0] - 1:
                        # before any flag is set: the access waits
                        return W_PML_FULL, 0, NO_PERM, 0, reads, skipped, 0, 0
                    if set_d:
                        pml[0] += 1
                        pml[pml[0]] = gpa & ~0xFFF
                _ept_set_ad(pt, pt_slot, top_table, top, top_perm, gpa, set_d, psc_enabled(psc),
                            psc, root, levels)
                leaf_dirty = leaf_dirty or set_d
    return W_OK, hpa, perm, level, reads, skipped, 1 if leaf_dirty or not ept_ad else 0, pending


@njit(cache=True, _nrt=False, inline="always")
def _xlate_read(pt, pt_slot, xl, ept_root, ept_levels, ept_ad, ms, hva_pfn, gpa, need, dirty,
                psc):
    """gpa -> hpa for the walker, setting nothing: ept_translate's results with set_ad=False
    (inlined where walks are hot)."""
    if xl == XL_NONE:
        return W_OK, gpa, E.EPT_RWX, 1, 0, 0, 1, 0
    if xl == XL_EPT:
        st, hpa, perm, level, reads, skipped, leaf_dirty, unset_a, _, _, _ = _ept_walk(
            pt, pt_slot, ept_root, ept_levels, gpa, need, ept_ad, psc)
        if st != W_OK:
            return st, 0, perm, 0, reads, skipped, 0, 0
        if not ept_ad:
            return W_OK, hpa, perm, level, reads, skipped, 1, 0
        pending = 1 if unset_a or (dirty and not leaf_dirty) else 0
        return W_OK, hpa, perm, level, reads, skipped, 1 if leaf_dirty else 0, pending
    gfn = gpa >> 12
    i = memslot_find(ms, gfn)
    if i < 0:
        return W_NO_SLOT, 0, NO_PERM, 0, 0, 0, 1, 0
    page = (ms[i, MS_HVA] + ((gfn - ms[i, MS_BASE_GFN]) << 12) - HVA_BASE) >> 12
    # widened before the shift: hva_pfn holds 4-byte pfns (host/memory.py PFN_DTYPE)
    pfn = np.int64(hva_pfn[page]) if 0 <= page < hva_pfn.shape[0] else -1
    if pfn < 0:
        return W_NEED_GFN, 0, NO_PERM, 0, 0, 0, 1, 0
    return W_OK, (pfn << 12) | (gpa & 0xFFF), E.EPT_RWX, 1, 0, 0, 1, 0


def pdpte_reserved(value: int, maxphy: int) -> bool:
    """Whether loading this PAE PDPTE faults: present with a reserved bit (2:1, 8:5 or
    63:MAXPHYADDR, SDM table 4-8). MOV to CR3, and a MOV to CR0 or CR4 that reloads the
    PDPTEs, then raises #GP(0) and loads none of the four (SDM 4.4.1), so the PDPTE registers
    the walker reads never hold one."""
    value &= (1 << 64) - 1
    return bool(value & P.PT_PRESENT) and bool(value & (P.PDPTE_RSVD_LOW | _pae_rsvd_hi(maxphy)))


def _pae_rsvd_hi(maxphy: int) -> int:
    """Bits 63:MAXPHYADDR: reserved in a PDPTE (63 too: no XD there)."""
    return ((1 << 64) - 1) & ~((1 << maxphy) - 1)


@njit(cache=True, _nrt=False)
def access_fault(attr, acc, flags, has_pkeys, pkey, pkru):
    """Error-code bits (without P/W/U/ID) and a fault flag for the rules of SDM 4.6.

    Returns 0 when the access is allowed, else PFERR_PRESENT | (PFERR_PK if keys forbid).
    """
    user = (flags & F_USER) != 0
    u_all = (attr & A_USER) != 0
    w_all = (attr & A_WRITABLE) != 0
    fault = False
    if acc == EC.ACC_FETCH:
        if attr & A_NX:
            fault = True
        elif user:
            fault = not u_all
        elif (flags & F_SMEP) and u_all:
            fault = True
    else:
        if user:
            fault = not u_all or (acc == EC.ACC_WRITE and not w_all)
        else:
            if u_all and (flags & F_SMAP) and not (flags & F_AC):
                fault = True
            if acc == EC.ACC_WRITE and (flags & F_WP) and not w_all:
                fault = True
    pk = False
    if has_pkeys and (flags & F_PKE) and u_all and acc != EC.ACC_FETCH:
        ad = (pkru >> (2 * pkey)) & 1
        wd = (pkru >> (2 * pkey + 1)) & 1
        if ad or (acc == EC.ACC_WRITE and wd and (user or (flags & F_WP))):
            pk = True
    code = 0
    if fault or pk:
        code = EC.PFERR_PRESENT
        if pk:
            code |= EC.PFERR_PK
    return code


@njit(cache=True, _nrt=False, inline="always")
def access_bits(acc, flags, mode):
    """The W, U and I/D bits of an error code for this access (SDM 4.7)."""
    code = 0
    if acc == EC.ACC_WRITE:
        code |= EC.PFERR_WRITE
    if flags & F_USER:
        code |= EC.PFERR_USER
    if acc == EC.ACC_FETCH and (
        (flags & F_SMEP) or ((flags & F_NXE) and mode >= P.MODE_PAE)
    ):
        code |= EC.PFERR_FETCH
    return code


@njit(cache=True, _nrt=False, inline="always")
def _ept_need(acc):
    if acc == EC.ACC_WRITE:
        return E.EPT_WRITE
    if acc == EC.ACC_FETCH:
        return E.EPT_EXEC
    return E.EPT_READ


@njit(cache=True, _nrt=False, inline="always")
def _ept_qual(acc, perm, final):
    q = E.EPT_QUAL_GLA_VALID | (perm << E.EPT_QUAL_PERM_SHIFT)
    if acc == EC.ACC_WRITE:
        q |= E.EPT_QUAL_WRITE
    elif acc == EC.ACC_FETCH:
        q |= E.EPT_QUAL_FETCH
    else:
        q |= E.EPT_QUAL_READ
    if final:
        q |= E.EPT_QUAL_GLA_FINAL
    return q


@njit(cache=True, _nrt=False)
def walk(pt, pt_slot, regs, gva, acc, set_ad, xl, ept_root, ept_levels, ms, hva_pfn, out):
    """Translate linear address `gva` for access `acc`; fills `out` (see OUT_*). No
    paging-structure caches and no page-modification log; EPT (XL_EPT) with A/D flags: KVM's
    software walk, and the reference for the hardware's."""
    none = out[:0]  # empty views of `out`: no caches, no log, and nothing allocated
    walk_cached(pt, pt_slot, regs, gva, acc, set_ad, xl, ept_root, ept_levels, True, ms,
                hva_pfn, none.reshape((0, TLB_COLS)), none, out)


@njit(cache=True, _nrt=False, inline="always")
def _guest_ad_bits(e, leaf, acc):
    """The A/D bits a successful access sets in guest entry e (KVM's software walker: A in
    every entry used, D in the leaf of a write)."""
    bits = 0
    if not (e & P.PT_ACCESSED):
        bits |= P.PT_ACCESSED
    if leaf and acc == EC.ACC_WRITE and not (e & P.PT_DIRTY):
        bits |= P.PT_DIRTY
    return bits


@njit(cache=True, _nrt=False, inline="always")
def _stop(out, status, addr, code):
    """End the walk with an exit-causing status for gpa `addr`."""
    out[OUT_STATUS] = status
    out[OUT_ADDR] = addr
    out[OUT_CODE] = code


@njit(cache=True, _nrt=False, inline="always")
def _pf(out, code):
    """End the walk with a guest page fault."""
    out[OUT_STATUS] = W_PF
    out[OUT_CODE] = code


@njit(cache=True, _nrt=False, inline="always")
def _ept_step(pt, pt_slot, ept_root, ept_levels, ept_ad, psc, pml, out, gpa, acc, final, set_ad,
              last_perm):
    """One EPT translation of _set_flags: a check (set_ad False) or the flag update, for a
    guest entry (a read or a write of it) or the final address (`final`: access `acc`). Returns
    (ok, dirty, pending, last_perm); when not ok, `out` says why the walk stopped."""
    need = _ept_need(acc)
    write = acc == EC.ACC_WRITE
    st, _, perm, _, _, _, dirty, pending = ept_translate(pt, pt_slot, ept_root, ept_levels, gpa,
                                                        need, set_ad, write, ept_ad, psc, pml)
    last_perm = perm if perm != NO_PERM else last_perm
    if st != W_OK:
        _stop(out, st, gpa, _ept_qual(acc, last_perm, final))
        return False, dirty, pending, last_perm
    return True, dirty, pending, last_perm


@njit(cache=True, _nrt=False)
def _set_flags(pt, pt_slot, xl, ept_root, ept_levels, ept_ad, psc, pml, out, gva, gpa, acc, n,
               ebytes, wmask, ept_amask, final_pend, lroot, levels, first_pend, start_level,
               last_perm):
    """What a successful walk sets (see walk_cached), once everything else is known: bit i of
    `wmask` is a guest entry to get A/D, of `ept_amask` an entry whose table's EPT translation
    has A flags to set; `final_pend` says the final address's EPT translation has flags to
    set; linear paging-structure-cache entries from step `first_pend` on are filled at the
    end. Returns (ok, the final EPT leaf's D afterwards or -1 if untouched, last_perm); when
    not ok, `out` holds why the walk stopped."""
    dirty_after = -1
    wpend = 0  # bit i: the write through EPT to entry i's table has EPT flags to set
    if xl == XL_EPT:
        # Each guest A/D update is a write through EPT: all must be allowed first. (Not
        # counted as reads: the hardware updates an entry with the translation it made to
        # read it; the model translates again to check EPT write permission.)
        for i in range(n):
            if wmask >> i & 1:
                ok, _, pend, last_perm = _ept_step(pt, pt_slot, ept_root, ept_levels, ept_ad, psc,
                                                   pml, out, out[OUT_TGPA + i], EC.ACC_WRITE,
                                                   False, False, last_perm)
                if not ok:
                    return False, dirty_after, last_perm
                wpend |= pend << i
        # The access happens: EPT A on every entry used to translate a guest table address
        # (SDM 29.3.5) ...
        for i in range(n):
            if ept_amask >> i & 1:
                ok, _, _, last_perm = _ept_step(pt, pt_slot, ept_root, ept_levels, ept_ad, psc,
                                                pml, out, out[OUT_TGPA + i], EC.ACC_READ, False,
                                                True, last_perm)
                if not ok:  # only a full PML log stops it now
                    return False, dirty_after, last_perm
        # ... EPT A/D for the final address ...
        if final_pend:
            ok, dirty_after, _, last_perm = _ept_step(pt, pt_slot, ept_root, ept_levels, ept_ad,
                                                      psc, pml, out, gpa, acc, True, True,
                                                      last_perm)
            if not ok:
                return False, dirty_after, last_perm
    # ... and the guest's A/D, each a write through EPT that sets that table's EPT A/D.
    for i in range(n):
        if not (wmask >> i & 1):
            continue
        if wpend >> i & 1:
            ok, _, _, last_perm = _ept_step(pt, pt_slot, ept_root, ept_levels, ept_ad, psc, pml,
                                            out, out[OUT_TGPA + i], EC.ACC_WRITE, False, True,
                                            last_perm)
            if not ok:
                return False, dirty_after, last_perm
        bits = _guest_ad_bits(out[OUT_TPTE + i], i == n - 1, acc)
        or_entry(pt, pt_slot, out[OUT_THPA + i], ebytes, np.uint64(bits))
        out[OUT_ADW] |= 1 << i
    if first_pend >= 0:
        for i in range(first_pend, n - 1):
            psc_fill(psc, PSC_LINEAR, lroot, start_level - i, gva, levels, out[OUT_PTABLE + i],
                     out[OUT_PATTR + i])
    return True, dirty_after, last_perm


@njit(cache=True, _nrt=False)
def walk_cached(pt, pt_slot, regs, gva, acc, set_ad, xl, ept_root, ept_levels, ept_ad, ms,
                hva_pfn, psc, pml, out):
    """walk() as the hardware does it, with the paging-structure caches in `psc` (a vCPU's TLB
    array, see hw/tlb.py): the EPT caches under XL_EPT, the caches for the (shadow) tables of
    4-level and 5-level paging under XL_NONE. OUT_N, OUT_TGPA/TPTE and OUT_ADW then cover only
    the entries read from memory.

    Under XL_EPT, `ept_ad` (EPTP bit 6) says whether EPT A/D flags are in use and `pml` is
    the page-modification log or NO_PML (see ept_translate): every EPT D bit the walk sets
    from 0 to 1, for the data page or for a guest table whose A/D bits it writes, logs that
    page; a full log ends the walk with W_PML_FULL before the flag that needed it is set
    (flags already set stay set, as a later walk would set them).

    A walk first finds everything that can stop the access, then sets flags: the guest walk
    and its permission checks, the final address's EPT translation, and the EPT write
    permission of every guest table whose A/D bits it will set. Only when all succeed does it
    set, in this order, EPT A on the translations of the guest tables it read, EPT A/D for the
    final address, and each guest entry's A/D (a write through EPT, which sets that table's
    EPT A/D). Scratch state lives in `out` (OUT_THPA, OUT_PTABLE, OUT_PATTR); the walk
    allocates nothing."""
    _walk(pt, pt_slot, regs, gva, acc, set_ad, xl, ept_root, ept_levels, ept_ad, ms, hva_pfn,
          psc, pml, out)


@njit(cache=True, _nrt=False, inline="always")
def _walk(pt, pt_slot, regs, gva, acc, set_ad, xl, ept_root, ept_levels, ept_ad, ms, hva_pfn,
          psc, pml, out):
    """walk_cached's body, inlined into the CPU loop (no call, and no argument copies, per
    TLB miss). What sets flags after a successful walk is out of line in _set_flags."""
    mode = regs[R_MODE]
    flags = regs[R_FLAGS]
    maxphy = regs[R_MAXPHY]
    out[OUT_N] = 0
    out[OUT_ADW] = 0
    out[OUT_READS] = 0
    out[OUT_SKIPPED] = 0
    # The permissions a failed translation's qualification reports: the last ones a
    # translation of this walk reported (a misconfiguration reports none).
    last_perm = 0
    # Caches for the 1-D structure (shadow tables); 2-D walks cache only the EPT dimension.
    lpsc = xl == XL_NONE and (mode == P.MODE_4LEVEL or mode == P.MODE_5LEVEL) \
        and psc_enabled(psc)
    lroot = 0
    # As in ept_translate: cacheable once A is 1 from the root down to the entry. Entries
    # read from step `first_pend` on are cached after this walk sets their A bits.
    all_accessed = True
    first_pend = -1
    start_level = 0
    ept_amask = 0  # bit i: the EPT translation of entry i's table has A flags to set
    levels = 0
    base_bits = access_bits(acc, flags, mode)
    e = np.int64(0)
    if mode == P.MODE_NONE:
        gpa = gva & 0xFFFFFFFF
        attr = A_USER | A_WRITABLE | A_DIRTY
        leaf_level = 1
        n = 0
        ebytes = 8
        pkey = 0
    else:
        levels = P.MODE_LEVELS[mode]
        ebytes = P.MODE_ENTRY_BYTES[mode]
        ibits = P.MODE_INDEX_BITS[mode]
        has_nx = P.MODE_HAS_NX[mode] and (flags & F_NXE) != 0
        has_pkeys = P.MODE_HAS_PKEYS[mode]
        phys_mask = (1 << maxphy) - 1
        # Address bits at or above MAXPHYADDR are reserved; PAE entries also reserve 62:52
        # (SDM tables 4-8..4-11), where 4-level entries ignore them or hold the key.
        rsvd_hi = 0
        if ebytes == 8:
            rsvd_hi = _ADDR_MASK_52 & ~phys_mask
            if mode == P.MODE_PAE:
                rsvd_hi |= _PAE_RSVD_62_52
        u_all = 1
        w_all = 1
        nx_any = 0
        n = 0
        level = levels
        if mode == P.MODE_PAE:
            idx = (gva >> 30) & 3
            e = regs[R_PDPTR + idx]
            out[OUT_TGPA] = (regs[R_CR3] & 0xFFFFFFE0) + idx * 8
            out[OUT_TPTE] = e
            out[OUT_THPA] = -1  # a register: never written back
            n = 1
            out[OUT_N] = n
            if not (e & P.PT_PRESENT):
                _pf(out, base_bits)
                return
            # MOV CR3 refuses such a PDPTE (#GP, see pdpte_reserved): checked for registers
            # set some other way.
            if (e & (P.PDPTE_RSVD_LOW | rsvd_hi)) or e < 0:
                _pf(out, base_bits | EC.PFERR_PRESENT | EC.PFERR_RSVD)
                return
            table = e & _ADDR_MASK_52 & phys_mask
            level = 2
        else:
            table = regs[R_CR3] & (0xFFFFF000 if mode == P.MODE_32 else _ADDR_MASK_52 & phys_mask)
            if lpsc:
                lroot = table >> 12
                hit, cached_table, cached_attr = psc_lookup(psc, PSC_LINEAR, lroot, gva, levels)
                if hit:
                    # Start below the cached entry with what the levels above it granted.
                    table = cached_table << 12
                    level = hit - 1
                    u_all = 1 if cached_attr & A_USER else 0
                    w_all = 1 if cached_attr & A_WRITABLE else 0
                    nx_any = 1 if cached_attr & A_NX else 0
                    out[OUT_SKIPPED] = levels - level
        start_level = level
        while True:
            shift = 12 + ibits * (level - 1)
            idx = (gva >> shift) & ((1 << ibits) - 1)
            pte_gpa = table + idx * ebytes
            st, hpa, perm, _, rd, sk, _, pend = _xlate_read(
                pt, pt_slot, xl, ept_root, ept_levels, ept_ad, ms, hva_pfn, pte_gpa, E.EPT_READ,
                False, psc)
            last_perm = perm if perm != NO_PERM else last_perm
            out[OUT_READS] += rd
            out[OUT_SKIPPED] += sk
            if st != W_OK:
                _stop(out, st, pte_gpa, _ept_qual(EC.ACC_READ, last_perm, False))
                out[OUT_N] = n
                return
            ept_amask |= pend << n
            e = read_entry(pt, pt_slot, hpa, ebytes)
            out[OUT_READS] += 1
            out[OUT_TGPA + n] = pte_gpa
            out[OUT_TPTE + n] = e
            out[OUT_THPA + n] = hpa
            n += 1
            out[OUT_N] = n
            if not (e & P.PT_PRESENT):
                _pf(out, base_bits)
                return
            ps = (e & P.PT_PAGE_SIZE) != 0
            rsvd = 0
            if ebytes == 8:
                rsvd = e & rsvd_hi
                if not has_nx and P.MODE_HAS_NX[mode] and e < 0:
                    rsvd = 1  # XD is reserved while EFER.NXE=0
                if ps and level >= 4:
                    rsvd = 1  # PS is reserved in PML4Es and PML5Es
                elif ps and level == 3:
                    rsvd |= e & 0x3FFFE000  # 1G leaf: bits 29:13
                elif ps and level == 2:
                    rsvd |= e & 0x1FE000  # 2M leaf: bits 20:13
            elif ps and level == 2 and (flags & F_PSE):
                # 4M leaf: bit 21 is reserved; bits 20:13 hold PA bits 39:32 (PSE-36), and
                # those at or above MAXPHYADDR are reserved too.
                hi_ok = max(0, min(8, maxphy - 32))
                rsvd = e & (1 << 21)
                rsvd |= e & (((1 << 8) - 1) & ~((1 << hi_ok) - 1)) << 13
            if rsvd:
                _pf(out, base_bits | EC.PFERR_PRESENT | EC.PFERR_RSVD)
                return
            u_all &= (e >> 2) & 1
            w_all &= (e >> 1) & 1
            if has_nx and e < 0:
                nx_any = 1
            leaf = level == 1 or (
                ps and P.MODE_LARGE_OK[mode, level] and (mode != P.MODE_32 or (flags & F_PSE))
            )
            if leaf:
                size = 1 << shift
                if mode == P.MODE_32 and level == 2:
                    base = (e & 0xFFC00000) | (((e >> 13) & 0xFF) << 32)
                elif mode == P.MODE_32:
                    base = e & 0xFFFFF000
                else:
                    base = e & _ADDR_MASK_52 & phys_mask & ~(size - 1)
                gpa = base | (gva & (size - 1))
                leaf_level = level
                break
            table = e & (0xFFFFF000 if ebytes == 4 else _ADDR_MASK_52 & phys_mask)
            if lpsc:
                lattr = (A_USER if u_all else 0) | (A_WRITABLE if w_all else 0) | (
                    A_NX if nx_any else 0)
                all_accessed = all_accessed and (e & P.PT_ACCESSED) != 0
                if all_accessed:
                    psc_fill(psc, PSC_LINEAR, lroot, level, gva, levels, table >> 12, lattr)
                else:
                    first_pend = n - 1 if first_pend < 0 else first_pend
                    out[OUT_PTABLE + n - 1] = table >> 12
                    out[OUT_PATTR + n - 1] = lattr
            level -= 1
        attr = 0
        if u_all:
            attr |= A_USER
        if w_all:
            attr |= A_WRITABLE
        if nx_any:
            attr |= A_NX
        pkey = (e >> P.PT_PKEY_SHIFT) & 0xF if has_pkeys else 0
        fault = access_fault(attr, acc, flags, has_pkeys, pkey, regs[R_PKRU])
        if fault:
            _pf(out, base_bits | fault)
            out[OUT_LEVEL] = leaf_level
            return
        if e & P.PT_DIRTY or acc == EC.ACC_WRITE:
            attr |= A_DIRTY
        if (flags & F_PGE) and (e & P.PT_GLOBAL):
            attr |= A_GLOBAL  # G is ignored in non-leaf entries and while CR4.PGE=0
    # The final address through the second dimension, checked before any flag is set.
    write = acc == EC.ACC_WRITE
    st, hpa, hperm, _, rd, sk, hdirty, final_pend = _xlate_read(
        pt, pt_slot, xl, ept_root, ept_levels, ept_ad, ms, hva_pfn, gpa, _ept_need(acc), write,
        psc)
    last_perm = hperm if hperm != NO_PERM else last_perm
    out[OUT_READS] += rd
    out[OUT_SKIPPED] += sk
    if xl == XL_SLOTS and st == W_NEED_GFN:
        # KVM's walk_addr needs only the final gfn, not its page: the walk succeeds (A/D set)
        # and OUT_HPA = -1 says the data page is not populated yet.
        st = W_OK
        hpa = -1
        hperm = E.EPT_RWX
    if st != W_OK:
        _stop(out, st, gpa, _ept_qual(acc, last_perm, True))
        return
    if set_ad:
        # The guest entries whose A/D this access sets (bit i: entry i read from memory).
        wmask = 0
        if mode != P.MODE_NONE:
            for i in range(n):
                if out[OUT_THPA + i] >= 0 and _guest_ad_bits(out[OUT_TPTE + i], i == n - 1, acc):
                    wmask |= 1 << i
        if wmask or ept_amask or final_pend or first_pend >= 0:
            ok, dirty_after, last_perm = _set_flags(
                pt, pt_slot, xl, ept_root, ept_levels, ept_ad, psc, pml, out, gva, gpa, acc, n,
                ebytes, wmask, ept_amask, final_pend, lroot, levels, first_pend, start_level,
                last_perm)
            if not ok:
                return
            hdirty = dirty_after if dirty_after >= 0 else hdirty
    if not hdirty:
        attr &= ~A_DIRTY  # EPT A/D on and the EPT leaf clean: a write must walk to set it
    out[OUT_STATUS] = W_OK
    out[OUT_ADDR] = gpa
    out[OUT_CODE] = 0
    out[OUT_LEVEL] = leaf_level
    out[OUT_HPA] = hpa
    if hperm & E.EPT_READ:
        attr |= A_HOST_R
    if hperm & E.EPT_WRITE:
        attr |= A_HOST_W
    if hperm & E.EPT_EXEC:
        attr |= A_HOST_X
    out[OUT_ATTR] = attr | (pkey << A_PKEY_SHIFT)


def new_out() -> np.ndarray:
    return np.zeros(OUT_SIZE, dtype=np.int64)


def new_regs() -> np.ndarray:
    return np.zeros(R_SIZE, dtype=np.int64)


EMPTY_MS = np.zeros((0, MS_COLS), dtype=np.int64)
EMPTY_HVA = np.zeros(0, dtype=PFN_DTYPE)  # HostMM.hva_pfn's type: one compiled walker
