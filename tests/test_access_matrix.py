"""The kvm-unit-tests x86/access.c matrix, in all four paging modes, against access_oracle.

Every combination of
  * PTE flags P, W, U, A, D, NX, PKEY (key 1 vs 0) under a PDE with flags P, W, U, NX, or a
    large leaf (PS=1) in the PDE with flags P, W, U, A, D, NX, PKEY;
  * CR0.WP, EFER.NXE, CR4.SMEP, CR4.SMAP with RFLAGS.AC (off, on with AC=0, on with AC=1),
    CR4.PKE with PKRU AD/WD for key 1 (and PKE=0 with every key denied, which must not matter);
  * CPL 0/3 and read/write/fetch;
is walked once by the jitted walker (set_ad=True) and compared with the oracle: the status,
the error code, and every entry of the path afterwards (A on each level and D on a written leaf
exactly when the access succeeds). NX and keys are left out where the format has no such bit
(32-bit paging: no NX, no keys; PAE: no keys). A second, seeded random test sets arbitrary
flag and reserved bits at every level, with several MAXPHYADDR values; a PAE PDPTE with a
reserved bit is one MOV CR3 refuses (#GP), so there the load rule is compared instead of a walk.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time

import pytest
from access_oracle import ACCESSES, Cpu, pdpte_load_faults, translate
from walker_util import ACC, GVA, MAXPHY, MODE_NAME, PAGING_MODES, Guest, regs_flags

from mmu_core.arch.x86 import paging as P
from mmu_core.hw import walker as W

DATA = 0x1234_5000
LARGE = 0x8000_0000  # 4M-aligned (so 2M-aligned too), PSE-36 bits clear
KEY1 = 1 << P.PT_PKEY_SHIFT
AD1, WD1 = 1 << 2, 1 << 3  # PKRU bits of key 1
SMAP_AC = ((False, False), (True, False), (True, True))
ALL_KEYS_DENIED = 0xFFFF_FFFF
STATUS = {W.W_OK: "ok", W.W_PF: "#PF", W.W_EPT_VIOLATION: "ept-violation", W.W_EPT_MISCONFIG: "misconfig"}


def has_nx(mode: int) -> bool:
    return mode != P.MODE_32


def has_keys(mode: int) -> bool:
    return mode in (P.MODE_4LEVEL, P.MODE_5LEVEL)


def flag_choices(mode: int, names: str) -> list[int]:
    """Every combination of the named flags (those the format has) as entry bits."""
    bit = {"P": P.PT_PRESENT, "W": P.PT_WRITABLE, "U": P.PT_USER, "A": P.PT_ACCESSED,
           "D": P.PT_DIRTY, "NX": P.PT_NX, "KEY": KEY1}
    usable = [n for n in names.split() if not (n == "NX" and not has_nx(mode))
              and not (n == "KEY" and not has_keys(mode))]
    return [sum(bit[n] for n, on in zip(usable, ons, strict=True) if on)
            for ons in itertools.product((0, 1), repeat=len(usable))]


def page_configs(g: Guest) -> list[tuple[int, ...]]:
    """Entry values for every level, top first: PDE x PTE combinations, then large leaves."""
    uppers = tuple(g.link(lv) for lv in range(g.levels, 2, -1))
    configs = []
    for pde_flags in flag_choices(g.mode, "P W U NX"):
        for pte_flags in flag_choices(g.mode, "P W U A D NX KEY"):
            configs.append((*uppers, g.link(2, pde_flags), DATA | pte_flags))
    for leaf_flags in flag_choices(g.mode, "P W U A D NX KEY"):
        configs.append((*uppers, LARGE | P.PT_PAGE_SIZE | leaf_flags, 0))
    return configs


def cpu_states(mode: int) -> list[Cpu]:
    name = MODE_NAME[mode]
    if has_keys(mode):
        keys = [(False, ALL_KEYS_DENIED)] + [(True, pkru) for pkru in (0, AD1, WD1, AD1 | WD1)]
    else:
        keys = [(False, 0), (True, ALL_KEYS_DENIED)]
    return [
        Cpu(name, wp=wp, nxe=nxe, pse=True, smep=smep, smap=smap, ac=ac, pke=pke, pkru=pkru, cpl=cpl,
            maxphyaddr=MAXPHY)
        for wp, nxe, smep, (smap, ac), (pke, pkru), cpl in itertools.product(
            (False, True), (False, True), (False, True), SMAP_AC, keys, (0, 3))
    ]


def describe(value: int) -> str:
    names = [(P.PT_PRESENT, "P"), (P.PT_WRITABLE, "W"), (P.PT_USER, "U"), (P.PT_ACCESSED, "A"),
             (P.PT_DIRTY, "D"), (P.PT_PAGE_SIZE, "PS"), (P.PT_NX, "NX")]
    s = "|".join(n for b, n in names if value & b) or "0"
    key = (value >> P.PT_PKEY_SHIFT) & 0xF
    return f"{s}{f'|key{key}' if key else ''}({value:#x})"


def describe_cpu(cpu: Cpu) -> str:
    on = [n for n in ("wp", "nxe", "smep", "smap", "ac", "pke") if getattr(cpu, n)]
    return f"cpl{cpu.cpl} {','.join(on) or '-'} pkru={cpu.pkru:#x}"


def run_cases(g: Guest, cases, cpus: list[Cpu], access_names=ACCESSES, limit: int = 25):
    """Walk every (entry values, cpu, access); returns (count, mismatches, total mismatches)."""
    pt, pt_slot, regs, out = g.mem.pt, g.mem.pt_slot, g.regs, g.out
    first_mem = 1 if g.mode == P.MODE_PAE else 0  # the PDPTE is a register, not in `store`
    mismatches: list[str] = []
    count = bad = 0
    for values in cases:
        if g.mode == P.MODE_PAE:
            g.set(3, values[0])  # the PDPTE register
        mem_values = list(values[first_mem:])
        g.store(mem_values)
        for cpu in cpus:
            regs[W.R_FLAGS] = regs_flags(cpu)
            regs[W.R_PKRU] = cpu.pkru
            regs[W.R_MAXPHY] = cpu.maxphyaddr
            gp = g.mode == P.MODE_PAE and pdpte_load_faults(cpu, values[0])
            if gp or (g.mode == P.MODE_PAE and W.pdpte_reserved(values[0], cpu.maxphyaddr)):
                # MOV CR3 raises #GP(0) and loads nothing: no walk ever sees this PDPTE.
                count += len(access_names)
                if gp != W.pdpte_reserved(values[0], cpu.maxphyaddr):
                    bad += len(access_names)
                    if len(mismatches) < limit:
                        mismatches.append(f"PDPTE {describe(values[0])} maxphy={cpu.maxphyaddr}: "
                                          f"MOV CR3 should {'refuse' if gp else 'load'} it")
                continue
            for name in access_names:
                W.walk(pt, pt_slot, regs, GVA, ACC[name], True, W.XL_NONE, 0, 0, W.EMPTY_MS,
                       W.EMPTY_HVA, out)
                after = g.load()
                got = (int(out[W.OUT_STATUS]), int(out[W.OUT_CODE]), after)
                want = translate(cpu, values, name)
                expected = (W.W_PF if want.fault else W.W_OK, want.error_code,
                            list(want.after[first_mem:]))
                count += 1
                if got != expected:
                    bad += 1
                    if len(mismatches) < limit:
                        mismatches.append(
                            f"entries={[describe(v) for v in values]} {describe_cpu(cpu)} {name}: "
                            f"expected (status, code, entries after)={STATUS[expected[0]]}, "
                            f"{expected[1]:#x}, {[describe(v) for v in expected[2]]}; "
                            f"got {STATUS.get(got[0], got[0])}, {got[1]:#x}, "
                            f"{[describe(v) for v in got[2]]}")
                if after != mem_values:
                    g.store(mem_values)
    return count, mismatches, bad


EXPECTED_COUNTS = {  # page configs x cpu states x 3 accesses
    P.MODE_32: (8 * 32 + 32) * (2 * 2 * 2 * 3 * 2 * 2) * 3,
    P.MODE_PAE: (16 * 64 + 64) * (2 * 2 * 2 * 3 * 2 * 2) * 3,
    P.MODE_4LEVEL: (16 * 128 + 128) * (2 * 2 * 2 * 3 * 5 * 2) * 3,
    P.MODE_5LEVEL: (16 * 128 + 128) * (2 * 2 * 2 * 3 * 5 * 2) * 3,
}


@pytest.mark.parametrize("mode", PAGING_MODES, ids=[MODE_NAME[m] for m in PAGING_MODES])
def test_access_matrix_matches_the_sdm_rules(mode):
    g = Guest(mode)
    t0 = time.perf_counter()
    count, mismatches, bad = run_cases(g, page_configs(g), cpu_states(mode))
    print(f"{MODE_NAME[mode]}: {count} combinations in {time.perf_counter() - t0:.1f}s")
    assert count == EXPECTED_COUNTS[mode]
    assert bad == 0, f"{bad} of {count} combinations differ:\n" + "\n".join(mismatches)


# --- random entries: arbitrary flag and reserved bits at every level ----------------------------
def random_entry(rng: random.Random, g: Guest, level: int, maxphy: int) -> int:
    """A link (or leaf) entry with random low flags and each 'interesting' high bit set rarely."""
    if g.mode == P.MODE_PAE and level == 3:
        v = g.table_gpa(2) | (P.PT_PRESENT if rng.random() < 0.9 else 0)
        candidates = [1, 2, 5, 6, 7, 8, 9, 10, 11, maxphy, 63] + ([51] if maxphy <= 51 else [])
    elif level == 1:
        v = DATA | rng.getrandbits(12)
        candidates = [maxphy - 1, maxphy, 51, 52, 58, 59, 60, 61, 62, 63]
    elif rng.random() < (0.3 if level <= 3 else 0.04):  # a large leaf (PS is reserved above)
        v = LARGE | P.PT_PAGE_SIZE | (rng.getrandbits(12) & ~P.PT_PAGE_SIZE)
        candidates = [12, 13, 16, 17, 20, 21, 29, maxphy, 51, 52, 58, 59, 62, 63]
    else:  # a link: its address bits must keep naming the next table
        v = g.table_gpa(level - 1) | (rng.getrandbits(12) & ~P.PT_PAGE_SIZE)
        candidates = [maxphy, 52, 58, 59, 62, 63] + ([51] if maxphy <= 51 else [])
    if g.ebytes == 4:
        candidates = [b for b in candidates if b < 32]
    elif g.mode == P.MODE_PAE and level == 3:
        candidates += [52, 62]  # reserved in a PDPTE too (63:MAXPHYADDR)
    v |= P.PT_PRESENT if rng.random() < 0.9 else 0
    for b in candidates:
        if rng.random() < (0.12 if b == 63 else 0.03):
            v |= 1 << b
    return v & (0xFFFF_FFFF if g.ebytes == 4 else (1 << 64) - 1)


@pytest.mark.parametrize("mode", PAGING_MODES, ids=[MODE_NAME[m] for m in PAGING_MODES])
def test_random_entries_and_control_state_match_the_sdm_rules(mode):
    rng = random.Random(20_241_125 + mode)
    g = Guest(mode)
    name = MODE_NAME[mode]
    cases = []
    for _ in range(4000):
        maxphy = rng.choice((36, 39, 40, 46, 52)) if mode != P.MODE_32 else rng.choice((32, 36, 40, 46))
        values = tuple(random_entry(rng, g, lv, maxphy) for lv in range(g.levels, 0, -1))
        cpus = [Cpu(name, wp=rng.random() < 0.5, nxe=rng.random() < 0.5, pse=rng.random() < 0.7,
                    smep=rng.random() < 0.5, smap=rng.random() < 0.5, ac=rng.random() < 0.5,
                    pke=rng.random() < 0.5, pkru=rng.getrandbits(32), cpl=rng.choice((0, 3)),
                    maxphyaddr=maxphy) for _ in range(4)]
        if mode == P.MODE_32:
            # With CR4.PSE=0 a PS=1 PDE references a page table at its address bits: keep PS=1
            # PDEs to CPUs with PSE so that the oracle's entries are the ones the walker reads.
            if values[0] & P.PT_PAGE_SIZE:
                cpus = [dataclasses.replace(c, pse=True) for c in cpus]
        cases.append((values, cpus))
    count = bad = 0
    mismatches: list[str] = []
    for values, cpus in cases:
        c, m, b = run_cases(g, [values], cpus, limit=25 - len(mismatches))
        count, bad = count + c, bad + b
        mismatches += m
    assert count == 4000 * 4 * 3
    assert bad == 0, f"{bad} of {count} random combinations differ:\n" + "\n".join(mismatches)
