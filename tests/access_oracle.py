"""The x86 paging access rules as a small, readable oracle: the spec the walker tests check against.

Written from the Intel SDM, never from the walker (it imports nothing from mmu_core):
  * vol. 3A 4.3-4.5: entry formats, which entry maps a page, which bits are reserved;
  * 4.6.1: access rights (U/S, R/W, XD, CR0.WP, SMEP, SMAP with RFLAGS.AC);
  * 4.6.2: protection keys (PKRU AD/WD, 4-level and 5-level paging only);
  * 4.4.1: PAE PDPTE registers are loaded by MOV CR3, which refuses a reserved one (#GP);
  * 4.7: the page-fault error code (P, W/R, U/S, RSVD, I/D, PK);
  * 4.8: accessed and dirty flags, set here the way KVM's software walker sets them: A in every
    paging-structure entry used and D in the leaf of a write, and only if the access succeeds.

Entries are given as raw values, top level first (for PAE paging the first one is the PDPTE,
which lives in a register: no permission bits, never written back).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

MODES = ("32bit", "pae", "4level", "5level")
LEVELS = {"32bit": 2, "pae": 3, "4level": 4, "5level": 5}

# Page-fault error code (SDM 4.7)
PF_P, PF_W, PF_U, PF_RSVD, PF_ID, PF_PK = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5

# Entry bits (SDM tables 4-4 .. 4-20)
P_BIT, RW_BIT, US_BIT, A_BIT, D_BIT, PS_BIT, XD_BIT = 1 << 0, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7, 1 << 63
PKEY_SHIFT = 59  # bits 62:59 of a 4-level/5-level leaf

ACCESSES = ("read", "write", "fetch")


def bits(lo: int, hi: int) -> int:
    """Mask of bits lo..hi inclusive (empty when lo > hi)."""
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1) if lo <= hi else 0


@dataclass(frozen=True)
class Cpu:
    """Control state that the rules read. `cpl == 3` makes an access a user-mode access."""

    mode: str
    wp: bool = False  # CR0.WP
    nxe: bool = False  # EFER.NXE
    pse: bool = False  # CR4.PSE (32-bit paging only)
    smep: bool = False
    smap: bool = False
    ac: bool = False  # RFLAGS.AC
    pke: bool = False
    pkru: int = 0
    cpl: int = 0
    maxphyaddr: int = 46


@dataclass(frozen=True)
class Entry:
    """What the rules read from one present-or-not paging-structure entry."""

    present: bool
    reserved: bool  # a reserved bit is set (only meaningful when present)
    writable: bool
    user: bool
    xd: bool
    leaf: bool  # maps a page (level 1, or PS=1 where a large page is allowed)
    pkey: int
    in_memory: bool  # False for the PAE PDPTE registers: A/D never written there


@dataclass(frozen=True)
class Outcome:
    fault: bool
    error_code: int  # 0 when no fault
    after: tuple[int, ...]  # the entries' values once the access is over (A/D updates)
    leaf_level: int  # level of the entry that mapped the page (0 if the walk stopped earlier)


def reserved_mask(mode: str, level: int, value: int, nxe: bool, pse: bool, maxphy: int) -> int:
    """Bits of this entry that must be 0 (SDM 4.3 tables 4-4..4-6, 4.4 tables 4-8..4-11,
    4.5 tables 4-14..4-20)."""
    ps = bool(value & PS_BIT)
    if mode == "32bit":
        if level == 2 and ps and pse:
            # 4M page: bit 21 reserved; bits 20:13 hold PA bits 39:32 (PSE-36), reserved
            # where the PA bit is at or above MAXPHYADDR (at most 40 bits).
            pa_bits_above_32 = max(0, min(maxphy, 40) - 32)
            return bits(21, 21) | bits(13 + pa_bits_above_32, 20)
        return 0  # 32-bit PTEs and PDEs that reference a page table reserve nothing
    xd = 0 if nxe else XD_BIT  # XD is reserved while EFER.NXE = 0
    if mode == "pae":
        if level == 3:  # PDPTE: bits 2:1, 8:5 and 63:M
            return bits(1, 2) | bits(5, 8) | bits(maxphy, 63)
        rsvd = bits(maxphy, 62) | xd  # PAE PDEs and PTEs: 62:M
    else:
        rsvd = bits(maxphy, 51) | xd  # 4-level/5-level: 51:M (62:52 are ignored or the pkey)
        if level >= 4:
            rsvd |= PS_BIT  # PS is reserved in PML4Es and PML5Es
    if ps and level == 3 and mode in ("4level", "5level"):
        rsvd |= bits(13, 29)  # 1G page
    if ps and level == 2:
        rsvd |= bits(13, 20)  # 2M page
    return rsvd


@lru_cache(maxsize=1 << 16)
def decode(mode: str, level: int, value: int, nxe: bool, pse: bool, maxphy: int) -> Entry:
    ps = bool(value & PS_BIT)
    pdpte_register = mode == "pae" and level == 3
    if level == 1:
        leaf = True
    elif level == 2:
        leaf = ps and (mode != "32bit" or pse)  # 32-bit paging ignores PS without CR4.PSE
    elif level == 3:
        leaf = ps and mode in ("4level", "5level")  # 1G pages
    else:
        leaf = False
    return Entry(
        present=bool(value & P_BIT),
        reserved=bool(value & reserved_mask(mode, level, value, nxe, pse, maxphy)),
        # a PDPTE has no R/W, U/S or XD: it never restricts access
        writable=pdpte_register or bool(value & RW_BIT),
        user=pdpte_register or bool(value & US_BIT),
        xd=mode != "32bit" and not pdpte_register and bool(value & XD_BIT),
        leaf=leaf,
        pkey=(value >> PKEY_SHIFT) & 0xF if mode in ("4level", "5level") else 0,
        in_memory=not pdpte_register,
    )


def access_allowed(cpu: Cpu, user_page: bool, writable: bool, executable: bool, access: str) -> bool:
    """SDM 4.6.1, with user_page/writable/executable already combined over all levels."""
    if cpu.cpl == 3:  # user-mode access
        if not user_page:
            return False
        if access == "write":
            return writable
        if access == "fetch":
            return executable
        return True
    # supervisor-mode access
    if access == "fetch":
        if user_page and cpu.smep:
            return False
        return executable
    if user_page and cpu.smap and not cpu.ac:
        return False  # explicit supervisor data access to a user-mode address
    if access == "write" and cpu.wp:
        return writable
    return True


def pkey_blocks(cpu: Cpu, user_page: bool, pkey: int, access: str) -> bool:
    """SDM 4.6.2: only data accesses to user-mode addresses, 4/5-level paging, CR4.PKE=1."""
    if cpu.mode not in ("4level", "5level") or not cpu.pke or not user_page or access == "fetch":
        return False
    ad = cpu.pkru >> (2 * pkey) & 1
    wd = cpu.pkru >> (2 * pkey + 1) & 1
    if ad:
        return True
    return access == "write" and bool(wd) and (cpu.cpl == 3 or cpu.wp)


def error_code_base(cpu: Cpu, access: str) -> int:
    """W/R, U/S and I/D bits, reported for every kind of page fault (SDM 4.7)."""
    code = 0
    if access == "write":
        code |= PF_W
    if cpu.cpl == 3:
        code |= PF_U
    if access == "fetch" and (cpu.smep or (cpu.nxe and cpu.mode != "32bit")):
        code |= PF_ID
    return code


def pdpte_load_faults(cpu: Cpu, value: int) -> bool:
    """SDM 4.4.1: MOV to CR3 in PAE mode (or a MOV to CR0/CR4 that reloads the PDPTEs) raises
    #GP(0), and loads none of the four PDPTE registers, if a PDPTE is present with a reserved
    bit set. A PDPTE register therefore never holds one when a walk uses it."""
    return bool(value & P_BIT) and bool(value & reserved_mask("pae", 3, value, cpu.nxe, cpu.pse,
                                                             cpu.maxphyaddr))


def translate(cpu: Cpu, values: Sequence[int], access: str) -> Outcome:
    """Expected result of `access` through the entries `values` (top level first). For PAE
    paging values[0] is a PDPTE register, so it is one that could be loaded (pdpte_load_faults
    is False)."""
    top = LEVELS[cpu.mode]
    assert len(values) == top
    assert not (cpu.mode == "pae" and pdpte_load_faults(cpu, values[0])), "MOV CR3 refuses it"
    base = error_code_base(cpu, access)
    used: list[Entry] = []
    for level, value in zip(range(top, 0, -1), values, strict=True):
        e = decode(cpu.mode, level, value, cpu.nxe, cpu.pse, cpu.maxphyaddr)
        used.append(e)
        if not e.present:
            return Outcome(True, base, tuple(values), 0)
        if e.reserved:
            return Outcome(True, base | PF_P | PF_RSVD, tuple(values), 0)
        if e.leaf:
            leaf_level = level
            break
    user_page = all(e.user for e in used)
    writable = all(e.writable for e in used)
    executable = not (cpu.nxe and any(e.xd for e in used))
    allowed = access_allowed(cpu, user_page, writable, executable, access)
    pk = pkey_blocks(cpu, user_page, used[-1].pkey, access)
    if not allowed or pk:
        return Outcome(True, base | PF_P | (PF_PK if pk else 0), tuple(values), leaf_level)
    after = list(values)
    for i, e in enumerate(used):
        if e.in_memory:
            after[i] |= A_BIT
    if access == "write":
        after[len(used) - 1] |= D_BIT
    return Outcome(False, 0, tuple(after), leaf_level)
