"""The kvm-unit-tests x86/access.c matrix, in all four paging modes.

Every combination of PTE flags (P, W, U, NX, a reserved bit, A/D) and PDE flags (P, W, U,
NX, PS), of CR0.WP, EFER.NXE, CR4.SMEP, CR4.SMAP with RFLAGS.AC, of CPL 0/3 and of
read/write/fetch, walked by the jitted walker and checked against access_oracle: the fault,
the error code, and the A/D bits left behind. Protection keys have their own matrix.
"""

from __future__ import annotations

import itertools

import pytest
from access_oracle import Ctl, Entry, expect
from walker_util import DATA_GPA, LARGE_GPA, MAXPHY, Path

from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.hw import walker as W

ACCESSES = {"read": EC.ACC_READ, "write": EC.ACC_WRITE, "fetch": EC.ACC_FETCH}
CTL_SETS = [
    (wp, nxe, smep, smap, ac)
    for wp, nxe, smep in itertools.product((0, 1), repeat=3)
    for smap, ac in ((0, 0), (1, 0), (1, 1))
]


def flags_of(wp, nxe, smep, smap, ac, user, pke=0) -> int:
    f = W.F_PSE
    f |= W.F_WP if wp else 0
    f |= W.F_NXE if nxe else 0
    f |= W.F_SMEP if smep else 0
    f |= W.F_SMAP if smap else 0
    f |= W.F_AC if ac else 0
    f |= W.F_USER if user else 0
    f |= W.F_PKE if pke else 0
    return f


def entry_bits(p, w, u, nx, a=0, d=0):
    v = (P.PT_PRESENT if p else 0) | (P.PT_WRITABLE if w else 0) | (P.PT_USER if u else 0)
    v |= (P.PT_ACCESSED if a else 0) | (P.PT_DIRTY if d else 0)
    return v | (P.PT_NX if nx else 0)


def run_matrix(mode: int) -> tuple[int, list[str]]:
    path = Path(mode)
    has_nx = bool(P.MODE_HAS_NX[mode])
    nx_values = (0, 1) if has_nx else (0,)
    rsvd_values = (0, 1) if has_nx else (0,)  # 32-bit 4K PTEs have no reserved bits
    top = int(P.MODE_LEVELS[mode])
    uppers = [Entry() for _ in range(top - 2 - (1 if mode == P.MODE_PAE else 0))]
    if mode == P.MODE_PAE:
        uppers = [Entry()]  # the PDPTE register: present, no permission bits
    mismatches: list[str] = []
    checked = 0
    pde_states = []
    for pp, pw, pu, pnx, ps in itertools.product((0, 1), (0, 1), (0, 1), nx_values, (0, 1)):
        if ps:
            for ad in (0, 1):
                pde_states.append(((pp, pw, pu, pnx, ps, ad), None))
        else:
            for tp, tw, tu, tnx, rsvd, ad in itertools.product(
                    (0, 1), (0, 1), (0, 1), nx_values, rsvd_values, (0, 1)):
                pde_states.append(((pp, pw, pu, pnx, ps, 0), (tp, tw, tu, tnx, rsvd, ad)))
    for (pp, pw, pu, pnx, ps, pad), pte in pde_states:
        for wp, nxe, smep, smap, ac in CTL_SETS:
            ctl = Ctl(wp=bool(wp), nxe=bool(nxe), smep=bool(smep), smap=bool(smap), ac=bool(ac),
                      has_nx=has_nx, has_pk=False)
            pde_e = Entry(present=bool(pp), writable=bool(pw), user=bool(pu), nx=bool(pnx),
                          reserved=bool(pnx and not nxe), leaf=bool(ps))
            entries = [*uppers, pde_e]
            if ps:
                large = LARGE_GPA if mode == P.MODE_32 else LARGE_GPA & ~((2 << 20) - 1)
                pde_v = large | entry_bits(pp, pw, pu, pnx, pad, pad) | P.PT_PAGE_SIZE
            else:
                tp, tw, tu, tnx, rsvd, tad = pte
                pde_v = path.pde_to_pt(entry_bits(pp, pw, pu, pnx))
                pte_v = DATA_GPA | entry_bits(tp, tw, tu, tnx, tad, tad)
                if rsvd:
                    pte_v |= 1 << MAXPHY
                entries.append(Entry(present=bool(tp), writable=bool(tw), user=bool(tu),
                                     nx=bool(tnx), reserved=bool(rsvd or (tnx and not nxe)),
                                     leaf=True))
            for user, (name, acc) in itertools.product((0, 1), ACCESSES.items()):
                path.set(2, pde_v)
                if not ps:
                    path.set(1, pte_v)
                want = expect(entries, ctl, bool(user), name)
                out = path.walk(flags_of(wp, nxe, smep, smap, ac, user), acc)
                got_fault = int(out[W.OUT_STATUS]) == W.W_PF
                got_code = int(out[W.OUT_CODE]) if got_fault else 0
                leaf_level = 2 if ps else 1
                leaf_after = path.get(leaf_level)
                leaf_before = pde_v if ps else pte_v
                want_a = bool(leaf_before & P.PT_ACCESSED) or not want.fault
                want_d = bool(leaf_before & P.PT_DIRTY) or want.set_dirty_on_leaf
                pde_after = path.get(2)
                want_pde_a = bool(pde_v & P.PT_ACCESSED) or not want.fault
                checked += 1
                got = (got_fault, got_code, bool(leaf_after & P.PT_ACCESSED),
                       bool(leaf_after & P.PT_DIRTY), bool(pde_after & P.PT_ACCESSED))
                expected = (want.fault, want.error_code, want_a, want_d, want_pde_a)
                if got != expected and len(mismatches) < 20:
                    mismatches.append(
                        f"pde={(pp, pw, pu, pnx, ps)} pte={pte} ctl={(wp, nxe, smep, smap, ac)} "
                        f"user={user} {name}: expected {expected}, got {got}")
    return checked, mismatches


@pytest.mark.parametrize("mode", [P.MODE_32, P.MODE_PAE, P.MODE_4LEVEL, P.MODE_5LEVEL],
                         ids=["32bit", "pae", "4level", "5level"])
def test_access_matrix(mode):
    checked, mismatches = run_matrix(mode)
    assert checked > 10_000
    assert mismatches == []


@pytest.mark.parametrize("mode", [P.MODE_4LEVEL, P.MODE_5LEVEL], ids=["4level", "5level"])
def test_protection_key_matrix(mode):
    path = Path(mode)
    mismatches = []
    for u, w, pkey, pkru_bits, wp, user, pke, (name, acc) in itertools.product(
            (0, 1), (0, 1), (0, 1), range(4), (0, 1), (0, 1), (0, 1), ACCESSES.items()):
        pkru = pkru_bits << (2 * 1)  # AD/WD of key 1 only
        path.set(2, path.pde_to_pt(P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER))
        path.set(1, DATA_GPA | entry_bits(1, w, u, 0) | (pkey << P.PT_PKEY_SHIFT))
        ctl = Ctl(wp=bool(wp), nxe=True, pke=bool(pke), pkru=pkru)
        entries = [Entry()] * (int(P.MODE_LEVELS[mode]) - 1) + [
            Entry(writable=bool(w), user=bool(u), leaf=True, pkey=pkey)]
        want = expect(entries, ctl, bool(user), name)
        out = path.walk(flags_of(wp, 1, 0, 0, 0, user, pke), acc, pkru)
        got = (int(out[W.OUT_STATUS]) == W.W_PF, int(out[W.OUT_CODE]))
        expected = (want.fault, want.error_code)
        if got[0] != expected[0] or (got[0] and got[1] != expected[1]):
            mismatches.append(f"u={u} w={w} key={pkey} pkru={pkru:#x} wp={wp} user={user} "
                              f"pke={pke} {name}: expected {expected} got {got}")
    assert mismatches == []
