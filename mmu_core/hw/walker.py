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
29.3.5): A on every EPT entry used and D on the leaf of a written page, where writing a guest
entry's A/D bits is a write to its table page. Without it the EPT entries are left alone (and
their A bits do not gate caching). With page-modification logging (a `pml` buffer, 29.3.6),
each EPT D bit set from 0 to 1 appends that page's gpa to the vCPU's log, and an EPT A/D
update that finds the log full stops the walk (W_PML_FULL) for the VM exit that drains it.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.hw.tlb import PSC_EPT, PSC_LINEAR, TLB_COLS, psc_enabled, psc_fill, psc_lookup

# --- register block passed to the walker (int64 array) ------------------------------------
R_MODE = 0
R_CR3 = 1
R_FLAGS = 2
R_PKRU = 3
R_MAXPHY = 4
R_PDPTR = 5  # 4 PAE PDPTE registers: 5..8
R_SIZE = 9

F_WP = 1 << 0  # CR0.WP
F_NXE = 1 << 1  # EFER.NXE
F_SMEP = 1 << 2
F_SMAP = 1 << 3
F_PKE = 1 << 4
F_PSE = 1 << 5
F_AC = 1 << 6  # RFLAGS.AC
F_USER = 1 << 7  # CPL == 3

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
OUT_SIZE = 20

A_USER = 1 << 0  # U/S=1 at every level
A_WRITABLE = 1 << 1  # R/W=1 at every level
A_NX = 1 << 2  # XD=1 at some level (only counted when EFER.NXE=1)
A_DIRTY = 1 << 3  # leaf D bit after this walk's update; in a 2-D walk with EPT A/D flags, the
#                   guest leaf's D and the EPT leaf's D (SDM vol. 3C 29.4: a write through a
#                   translation cached with either clear walks again to set it)
A_HOST_R = 1 << 4  # second-dimension permissions (EPT R/W/X; all set without EPT)
A_HOST_W = 1 << 5
A_HOST_X = 1 << 6
A_PKEY_SHIFT = 8

_ADDR_MASK_52 = ((1 << 52) - 1) & ~0xFFF


@njit(cache=True)
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


@njit(cache=True)
def read_entry(pt, pt_slot, hpa, ebytes):
    """The entry at hpa as an int64 (bit 63 is the sign: numba keeps uint64 unsigned and
    mixing it with int64 promotes to float, so every entry is converted once, here)."""
    slot = pt_slot[hpa >> 12]
    if slot < 0:
        return np.int64(0)
    word = pt[slot, (hpa & 0xFFF) >> 3]
    if ebytes == 4:
        return np.int64((word >> np.uint64(32 * ((hpa >> 2) & 1))) & np.uint64(0xFFFFFFFF))
    return np.int64(word)


@njit(cache=True)
def or_entry(pt, pt_slot, hpa, ebytes, bits):
    slot = pt_slot[hpa >> 12]
    idx = (hpa & 0xFFF) >> 3
    if ebytes == 4:
        bits = bits << np.uint64(32 * ((hpa >> 2) & 1))
    pt[slot, idx] = pt[slot, idx] | bits


# ept_translate/_xlate results (int64 array of RES_SIZE)
RES_STATUS = 0
RES_HPA = 1
RES_PERM = 2
RES_LEVEL = 3
RES_READS = 4
RES_SKIPPED = 5
RES_DIRTY = 6  # 0 when EPT A/D flags are on and the leaf's D is clear after the translation
RES_SIZE = 7

#: the PML buffer is one 4 KiB page of 8-byte GPAs (vmx.h PML_ENTITY_NUM); a buffer array
#: holds the count in [0] and the GPAs after it, in the order they were logged
PML_ENTITY_NUM = 512
NO_PML = np.zeros(0, dtype=np.int64)  # PML off (pass it from Python; jitted code makes its own)


@njit(cache=True)
def ept_translate(pt, pt_slot, root, levels, gpa, need, set_ad, dirty, ept_ad, psc, pml, res):
    """Translate gpa through EPT. res: see RES_*; `need` is EPT_READ/...

    `ept_ad` is EPTP bit 6, EPT accessed and dirty flags (kvm_intel.ept_ad). With it, and
    `set_ad`, the walk sets A on every entry it used and, for a write (`dirty`), D on the
    leaf, only when the access is allowed (SDM vol. 3C 29.3.5). Without it the processor
    neither sets nor heeds them (and caches entries whatever their A bit says).

    `psc` is the vCPU's TLB array (its EPT paging-structure caches are used and filled) or an
    empty array. `pml` is the vCPU's page-modification log (SDM 29.3.6) or NO_PML: when this
    translation is about to set an EPT A or D bit and the log is full, nothing is set and the
    status is W_PML_FULL (the access does not happen; a VM exit follows); when it sets a leaf's
    D from 0 to 1, the page-aligned gpa is appended.
    """
    perm = E.EPT_RWX
    table = root
    top = levels
    res[RES_READS] = 0
    res[RES_SKIPPED] = 0
    res[RES_DIRTY] = 0
    use_psc = psc_enabled(psc)
    if use_psc:
        hit, cached_table, cached_perm = psc_lookup(psc, PSC_EPT, root, gpa, levels)
        if hit:
            # Start below the cached entry, with what the levels above it granted.
            table = cached_table
            perm = cached_perm
            top = hit - 1
            res[RES_SKIPPED] = levels - top
    leaf_level = 0
    hpa = 0
    slots = np.empty(5, np.int64)
    idxs = np.empty(5, np.int64)
    # An entry is cacheable only when A is 1 in it and in every entry above it (SDM 4.10.3.1);
    # the others become cacheable once this walk sets A on the whole path.
    all_accessed = True
    unset_a = False  # an entry on the path (read from memory) has A clear
    pend_level = np.empty(5, np.int64)
    pend_table = np.empty(5, np.int64)
    pend_perm = np.empty(5, np.int64)
    npend = 0
    n = 0
    e = np.int64(0)
    for level in range(top, 0, -1):
        idx = (gpa >> (12 + 9 * (level - 1))) & 511
        slot = pt_slot[table]
        e = np.int64(pt[slot, idx]) if slot >= 0 else np.int64(0)
        res[RES_READS] += 1
        rwx = e & E.EPT_RWX
        if rwx == 0:
            res[RES_STATUS] = W_EPT_VIOLATION
            res[RES_PERM] = 0
            return
        if (rwx & E.EPT_WRITE) and not (rwx & E.EPT_READ):
            res[RES_STATUS] = W_EPT_MISCONFIG  # write-only or write+exec: KVM's MMIO SPTEs use this
            return
        large = (e & E.EPT_LARGE) != 0
        if large and level > 3:
            res[RES_STATUS] = W_EPT_MISCONFIG  # bit 7 is reserved in EPT PML4Es/PML5Es
            return
        perm &= rwx
        slots[n] = slot
        idxs[n] = idx
        n += 1
        accessed = (e & E.EPT_ACCESSED) != 0
        unset_a = unset_a or not accessed
        if level == 1 or large:
            mt = (e & E.EPT_MT_MASK) >> E.EPT_MT_SHIFT
            if mt == 2 or mt == 3 or mt == 7:
                res[RES_STATUS] = W_EPT_MISCONFIG
                return
            size = 1 << (12 + 9 * (level - 1))
            hpa = (e & _ADDR_MASK_52 & ~(size - 1)) | (gpa & (size - 1))
            leaf_level = level
            break
        table = (e & _ADDR_MASK_52) >> 12
        if use_psc:
            all_accessed = all_accessed and (accessed or not ept_ad)
            if all_accessed:
                psc_fill(psc, PSC_EPT, root, level, gpa, levels, table, perm)
            else:
                pend_level[npend] = level
                pend_table[npend] = table
                pend_perm[npend] = perm
                npend += 1
    if not (perm & need):
        res[RES_STATUS] = W_EPT_VIOLATION
        res[RES_PERM] = perm
        return
    leaf_dirty = (e & E.EPT_DIRTY) != 0
    if set_ad and ept_ad:
        set_d = dirty and not leaf_dirty
        if pml.shape[0] and (unset_a or set_d):
            if pml[0] >= pml.shape[0] - 1:
                res[RES_STATUS] = W_PML_FULL  # before any flag is set: the access waits
                return
            if set_d:
                pml[0] += 1
                pml[pml[0]] = gpa & ~0xFFF
        for i in range(n):
            pt[slots[i], idxs[i]] |= np.uint64(E.EPT_ACCESSED)
        if set_d:
            pt[slots[n - 1], idxs[n - 1]] |= np.uint64(E.EPT_DIRTY)
            leaf_dirty = True
        for i in range(npend):
            psc_fill(psc, PSC_EPT, root, pend_level[i], gpa, levels, pend_table[i],
                     pend_perm[i])
    res[RES_STATUS] = W_OK
    res[RES_HPA] = hpa
    res[RES_PERM] = perm
    res[RES_LEVEL] = leaf_level
    res[RES_DIRTY] = 1 if leaf_dirty or not ept_ad else 0


@njit(cache=True)
def _xlate(pt, pt_slot, xl, ept_root, ept_levels, ept_ad, ms, hva_pfn, gpa, need, set_ad, dirty,
           psc, pml, res):
    """gpa -> hpa for the walker; res like ept_translate's."""
    if xl == XL_NONE:
        res[RES_STATUS] = W_OK
        res[RES_HPA] = gpa
        res[RES_PERM] = E.EPT_RWX
        res[RES_LEVEL] = 1
        res[RES_READS] = 0
        res[RES_SKIPPED] = 0
        res[RES_DIRTY] = 1
    elif xl == XL_EPT:
        ept_translate(pt, pt_slot, ept_root, ept_levels, gpa, need, set_ad, dirty, ept_ad, psc,
                      pml, res)
    else:
        res[RES_READS] = 0
        res[RES_SKIPPED] = 0
        res[RES_DIRTY] = 1
        gfn = gpa >> 12
        i = memslot_find(ms, gfn)
        if i < 0:
            res[RES_STATUS] = W_NO_SLOT
            return
        hva = ms[i, MS_HVA] + ((gfn - ms[i, MS_BASE_GFN]) << 12)
        pfn = hva_pfn[(hva - HVA_BASE) >> 12]
        if pfn < 0:
            res[RES_STATUS] = W_NEED_GFN
            return
        res[RES_STATUS] = W_OK
        res[RES_HPA] = (pfn << 12) | (gpa & 0xFFF)
        res[RES_PERM] = E.EPT_RWX
        res[RES_LEVEL] = 1


@njit(cache=True)
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


@njit(cache=True)
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


@njit(cache=True)
def _ept_need(acc):
    if acc == EC.ACC_WRITE:
        return E.EPT_WRITE
    if acc == EC.ACC_FETCH:
        return E.EPT_EXEC
    return E.EPT_READ


@njit(cache=True)
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


@njit(cache=True)
def walk(pt, pt_slot, regs, gva, acc, set_ad, xl, ept_root, ept_levels, ms, hva_pfn, out):
    """Translate linear address `gva` for access `acc`; fills `out` (see OUT_*). No
    paging-structure caches and no page-modification log; EPT (XL_EPT) with A/D flags: KVM's
    software walk, and the reference for the hardware's."""
    walk_cached(pt, pt_slot, regs, gva, acc, set_ad, xl, ept_root, ept_levels, True, ms,
                hva_pfn, np.zeros((0, TLB_COLS), np.int64), np.zeros(0, np.int64), out)


@njit(cache=True)
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
    (guest A/D bits of entries already updated stay set, as a later walk would set them)."""
    mode = regs[R_MODE]
    flags = regs[R_FLAGS]
    maxphy = regs[R_MAXPHY]
    out[OUT_N] = 0
    out[OUT_ADW] = 0
    out[OUT_READS] = 0
    out[OUT_SKIPPED] = 0
    res = np.zeros(RES_SIZE, np.int64)
    hpas = np.zeros(5, np.int64)
    # Caches for the 1-D structure (shadow tables); 2-D walks cache only the EPT dimension.
    lpsc = xl == XL_NONE and (mode == P.MODE_4LEVEL or mode == P.MODE_5LEVEL) \
        and psc_enabled(psc)
    lroot = 0
    # As in ept_translate: cacheable once A is 1 from the root down to the entry.
    all_accessed = True
    pend_level = np.empty(5, np.int64)
    pend_table = np.empty(5, np.int64)
    pend_attr = np.empty(5, np.int64)
    npend = 0
    levels = 0
    base_bits = access_bits(acc, flags, mode)
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
        rsvd_hi = _ADDR_MASK_52 & ~phys_mask if ebytes == 8 else 0
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
            hpas[0] = -1  # a register: never written back
            n = 1
            if not (e & P.PT_PRESENT):
                out[OUT_STATUS] = W_PF
                out[OUT_CODE] = base_bits
                out[OUT_N] = n
                return
            if (e & (P.PDPTE_RSVD_LOW | rsvd_hi)) or e < 0:
                out[OUT_STATUS] = W_PF
                out[OUT_CODE] = base_bits | EC.PFERR_PRESENT | EC.PFERR_RSVD
                out[OUT_N] = n
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
        while True:
            shift = 12 + ibits * (level - 1)
            idx = (gva >> shift) & ((1 << ibits) - 1)
            pte_gpa = table + idx * ebytes
            _xlate(pt, pt_slot, xl, ept_root, ept_levels, ept_ad, ms, hva_pfn, pte_gpa,
                   E.EPT_READ, False, False, psc, pml, res)
            out[OUT_READS] += res[RES_READS]
            out[OUT_SKIPPED] += res[RES_SKIPPED]
            if res[RES_STATUS] != W_OK:
                out[OUT_STATUS] = res[RES_STATUS]
                out[OUT_ADDR] = pte_gpa
                out[OUT_CODE] = _ept_qual(EC.ACC_READ, res[RES_PERM], False)
                out[OUT_N] = n
                return
            hpa = res[RES_HPA]
            e = read_entry(pt, pt_slot, hpa, ebytes)
            out[OUT_READS] += 1
            out[OUT_TGPA + n] = pte_gpa
            out[OUT_TPTE + n] = e
            hpas[n] = hpa
            n += 1
            out[OUT_N] = n
            if not (e & P.PT_PRESENT):
                out[OUT_STATUS] = W_PF
                out[OUT_CODE] = base_bits
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
                out[OUT_STATUS] = W_PF
                out[OUT_CODE] = base_bits | EC.PFERR_PRESENT | EC.PFERR_RSVD
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
                    pend_level[npend] = level
                    pend_table[npend] = table >> 12
                    pend_attr[npend] = lattr
                    npend += 1
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
            out[OUT_STATUS] = W_PF
            out[OUT_CODE] = base_bits | fault
            out[OUT_LEVEL] = leaf_level
            return
        if e & P.PT_DIRTY or acc == EC.ACC_WRITE:
            attr |= A_DIRTY
    # The final address through the second dimension.
    _xlate(pt, pt_slot, xl, ept_root, ept_levels, ept_ad, ms, hva_pfn, gpa, _ept_need(acc),
           set_ad, acc == EC.ACC_WRITE, psc, pml, res)
    out[OUT_READS] += res[RES_READS]
    out[OUT_SKIPPED] += res[RES_SKIPPED]
    if xl == XL_SLOTS and res[RES_STATUS] == W_NEED_GFN:
        # KVM's walk_addr needs only the final gfn, not its page: the walk succeeds (A/D set)
        # and OUT_HPA = -1 says the data page is not populated yet.
        res[RES_STATUS] = W_OK
        res[RES_HPA] = -1
        res[RES_PERM] = E.EPT_RWX
    if res[RES_STATUS] != W_OK:
        out[OUT_STATUS] = res[RES_STATUS]
        out[OUT_ADDR] = gpa
        out[OUT_CODE] = _ept_qual(acc, res[RES_PERM], True)
        return
    hpa = res[RES_HPA]
    hperm = res[RES_PERM]
    if not res[RES_DIRTY]:
        attr &= ~A_DIRTY  # EPT A/D on and the EPT leaf clean: a write must walk to set it
    if set_ad and mode != P.MODE_NONE:
        # A on every entry used, D on a written leaf; in 2-D each is a write through EPT.
        for i in range(n):
            if hpas[i] < 0:
                continue
            e = out[OUT_TPTE + i]
            bits = 0
            if not (e & P.PT_ACCESSED):
                bits |= P.PT_ACCESSED
            if i == n - 1 and acc == EC.ACC_WRITE and not (e & P.PT_DIRTY):
                bits |= P.PT_DIRTY
            if bits == 0:
                continue
            if xl == XL_EPT:
                # Not counted as reads: the hardware updates the entry with the translation it
                # made to read it; the model translates again to check EPT write permission.
                _xlate(pt, pt_slot, xl, ept_root, ept_levels, ept_ad, ms, hva_pfn,
                       out[OUT_TGPA + i], E.EPT_WRITE, True, True, psc, pml, res)
                if res[RES_STATUS] != W_OK:
                    out[OUT_STATUS] = res[RES_STATUS]
                    out[OUT_ADDR] = out[OUT_TGPA + i]
                    out[OUT_CODE] = _ept_qual(EC.ACC_WRITE, res[RES_PERM], False)
                    return
            or_entry(pt, pt_slot, hpas[i], ebytes, np.uint64(bits))
            out[OUT_ADW] |= 1 << i
        for i in range(npend):
            psc_fill(psc, PSC_LINEAR, lroot, pend_level[i], gva, levels, pend_table[i],
                     pend_attr[i])
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
EMPTY_HVA = np.zeros(0, dtype=np.int64)
