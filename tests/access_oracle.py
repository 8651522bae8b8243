"""The x86 access rules, restated from the SDM as a small table-driven oracle.

Used as the source of expected values for the walker's tests; it never calls the walker.
SDM vol. 3A: 4.6.1 (determination of access rights), 4.6.2 (protection keys), 4.7 (error
code), 4.8 (A/D flags, here as KVM's software walker sets them: only on success).
"""

from __future__ import annotations

from dataclasses import dataclass

P_, W_, U_, RSVD_, ID_, PK_ = 1, 2, 4, 8, 16, 32


@dataclass(frozen=True)
class Entry:
    present: bool = True
    writable: bool = True
    user: bool = True
    nx: bool = False
    reserved: bool = False  # some reserved bit of this entry is set
    leaf: bool = False
    pkey: int = 0


@dataclass(frozen=True)
class Ctl:
    wp: bool = False
    nxe: bool = False
    smep: bool = False
    smap: bool = False
    ac: bool = False
    pke: bool = False
    pkru: int = 0
    has_nx: bool = True  # PAE, 4-level, 5-level
    has_pk: bool = True  # 4-level, 5-level


@dataclass(frozen=True)
class Outcome:
    fault: bool
    error_code: int
    set_accessed: tuple[bool, ...]  # per entry walked
    set_dirty_on_leaf: bool


def id_bit(ctl: Ctl, fetch: bool) -> int:
    """I/D is reported only with SMEP, or with NXE in PAE/4-level/5-level paging (4.7)."""
    return ID_ if fetch and (ctl.smep or (ctl.nxe and ctl.has_nx)) else 0


def expect(entries: list[Entry], ctl: Ctl, user: bool, access: str) -> Outcome:
    write, fetch = access == "write", access == "fetch"
    base = (W_ if write else 0) | (U_ if user else 0) | id_bit(ctl, fetch)
    none = Outcome(False, 0, (), False)
    for e in entries:
        if not e.present:
            return Outcome(True, base, none.set_accessed, False)
        if e.reserved:
            return Outcome(True, base | P_ | RSVD_, none.set_accessed, False)
    user_page = all(e.user for e in entries)  # "user-mode address"
    writable = all(e.writable for e in entries)
    executable = not (ctl.has_nx and ctl.nxe and any(e.nx for e in entries))
    leaf = entries[-1]
    # 4.6.1, one rule per line
    if user:
        allowed = user_page and (not write or writable) and (not fetch or executable)
    elif fetch:
        allowed = executable and not (ctl.smep and user_page)
    else:
        smap_blocks = ctl.smap and user_page and not ctl.ac
        wp_blocks = write and ctl.wp and not writable
        allowed = not smap_blocks and not wp_blocks
    # 4.6.2: keys apply to data accesses to user-mode addresses
    pk_blocks = False
    if ctl.has_pk and ctl.pke and user_page and not fetch:
        ad = ctl.pkru >> (2 * leaf.pkey) & 1
        wd = ctl.pkru >> (2 * leaf.pkey + 1) & 1
        pk_blocks = bool(ad) or (write and bool(wd) and (user or ctl.wp))
    if not allowed or pk_blocks:
        return Outcome(True, base | P_ | (PK_ if pk_blocks else 0), (), False)
    return Outcome(False, 0, tuple(True for _ in entries), write)
