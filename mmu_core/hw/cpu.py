"""The CPU: runs a vCPU program through the TLB and the page walker until something exits.

`run_ops` is the jitted inner loop. It executes guest operations (rows of a program array)
and returns to Python only for what real hardware would hand to the hypervisor (EPT
violation or misconfiguration, or a full page-modification log, under TDP; a #PF on the shadow
tables under shadow paging) or for operations the model handles in Python (INVLPG, MOV to
CR0/CR3/CR4, CPL and AC changes). Under TDP a guest #PF is delivered by the hardware straight
to the guest, with no exit; the guest's handler records it and skips the instruction, which is
what every program here does.

A TLB miss walks with the vCPU's paging-structure caches (`tlb` holds both, see hw/tlb.py), so
a walk reads only the levels below the deepest cached non-leaf entry; ST_WALK_READS counts the
entries actually read, which the vCPU charges as walk time.

Under TDP with EPT A/D flags a TLB entry's A_DIRTY means that the guest's and EPT's leaf D
bits were both set when it was filled, so a write through an entry filled by a read walks
again and sets EPT D (and logs the page when PML is on). KVM clears EPT D bits for dirty
logging and then flushes the TLBs, so the next write after the flush walks as well.

The loop, the walker and the TLB are compiled without numba's runtime (`_nrt=False`): they
cannot allocate an array, and no reference counting runs per access. What they need beyond
their arguments lives in preallocated per-vCPU arrays (the walker's output block is part of
`xinfo`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.host.memory import NO_SLOT
from mmu_core.hw import walker as W
from mmu_core.hw.tlb import (
    CTX_BITS,
    CTX_GLOBAL,
    PSC_EPT,
    PSC_LINEAR,
    TLB_ATTR,
    TLB_PFN,
    TLB_VPN,
    invalidate_addr,
    tlb_entries,
    tlb_row,
    tlb_tag,
)

# --- guest operations: rows of (op, gva, value) --------------------------------------------
OP_READ = 0  # data read; records the page's tag
OP_WRITE = 1  # data write of `value` (the page's tag)
OP_FETCH = 2  # instruction fetch; records the tag
OP_WPTE = 3  # 8-byte store of `value` into a page-table page, at gva
OP_WPTE32 = 4  # 4-byte store (32-bit paging entries)
OP_RPTE = 5  # 8-byte load from a page-table page
OP_INVLPG = 6
OP_MOV_CR3 = 7
OP_MOV_CR0 = 8
OP_MOV_CR4 = 9
OP_SET_CPL = 10
OP_SET_AC = 11
OP_WRPKRU = 12
OP_PAUSE = 13  # guest computation for `value` ns without memory accesses (a switch point)
OP_INVPCID = 14  # INVPCID: gva = the descriptor's linear address, value = type << 56 | the
#                  descriptor's PCID field (bits 55:0; bits 63:12 of the field must be 0)
OP_SMI = 15  # a system-management interrupt arrives (enter SMM, or latch it while in SMM)
OP_RSM = 16  # resume from SMM (#UD outside it)
OP_NAMES = (
    "read", "write", "fetch", "wpte", "wpte32", "rpte", "invlpg", "mov_cr3", "mov_cr0",
    "mov_cr4", "set_cpl", "set_ac", "wrpkru", "pause", "invpcid", "smi", "rsm",
)
INVPCID_TYPE_SHIFT = 56
MEM_OPS_END = OP_RPTE  # ops <= this access memory

# --- per-op results: (value, vector, error code) --------------------------------------------
RES_VALUE = 0
RES_VECTOR = 1
RES_CODE = 2
RES_COLS = 3

# --- exits ----------------------------------------------------------------------------------
X_NONE = 0  # ran to `end` or out of budget
X_EPT_VIOLATION = 1
X_EPT_MISCONFIG = 2
X_SHADOW_PF = 3  # #PF on the shadow tables (intercepted under shadow paging)
X_OP = 4  # an operation Python handles
X_NEED_TABLE = 5  # a page-table store to a frame that has no table contents yet
X_PML_FULL = 6  # an EPT A/D update found the PML buffer full (XI_GPA: the gpa it was for)
X_NAMES = ("none", "ept_violation", "ept_misconfig", "shadow_pf", "op", "need_table",
           "pml_full")

XI_KIND = 0
XI_GVA = 1
XI_GPA = 2
XI_CODE = 3  # error code or exit qualification
XI_ACC = 4
XI_PFN = 5
XI_WALK = 6  # the walker's output block (W.OUT_SIZE) for the walks run_ops makes: its scratch
XI_SIZE = XI_WALK + W.OUT_SIZE

ST_OPS = 0
ST_TLB_HITS = 1
ST_WALKS = 2
ST_WALK_READS = 3  # paging-structure entries read from memory, both dimensions
ST_GUEST_PF = 4
ST_PSC_SKIPPED = 5  # entry reads the paging-structure caches saved
ST_SIZE = 6


@njit(cache=True, _nrt=False)
def _acc_of(op):
    if op == OP_WRITE or op == OP_WPTE or op == OP_WPTE32:
        return EC.ACC_WRITE
    if op == OP_FETCH:
        return EC.ACC_FETCH
    return EC.ACC_READ


@njit(cache=True, _nrt=False)
def _host_ok(attr, acc):
    if acc == EC.ACC_WRITE:
        return (attr & W.A_HOST_W) != 0
    if acc == EC.ACC_FETCH:
        return (attr & W.A_HOST_X) != 0
    return (attr & W.A_HOST_R) != 0


@njit(cache=True, _nrt=False)
def run_ops(prog, pc, end, res, pt, pt_slot, tag, regs, tdp, ept_ad, root, root_levels, tlb,
            pml, xinfo, stats, budget):
    """Run ops [pc, end) until an exit or `budget` ops; returns the next pc.

    `regs` are what the hardware runs with: the guest's own registers under TDP, and KVM's
    shadow-paging register state (R_CR3 = the shadow root) under shadow paging. Under TDP,
    `ept_ad` is EPTP bit 6 (EPT A/D flags) and `pml` the page-modification log, or
    walker.NO_PML when PML is off (see walker.ept_translate).
    """
    out = xinfo[XI_WALK:]  # preallocated with the vCPU: the loop allocates nothing
    xinfo[XI_KIND] = X_NONE
    mode = regs[W.R_MODE]
    has_pkeys = P.MODE_HAS_PKEYS[mode]
    nmask = tlb_entries(tlb) - 1
    # TLB entries are tagged with the current PCID, or global (hw/tlb.py); the PCID and
    # CR4.PGE do not change within a call.
    pcid = regs[W.R_PCID]
    pge = (regs[W.R_FLAGS] & W.F_PGE) != 0
    # tlb_row and tlb_tag with the PCID's part computed once: row (vpn ^ salt) & nmask, tag
    # (vpn << CTX_BITS) + tag_base
    salt = tlb_row(-1, 0, pcid)
    tag_base = tlb_tag(0, pcid)
    done = 0
    hits = 0
    ops = 0
    # The permission check of a TLB hit depends only on (attributes, access kind) while the
    # registers stay as they are (they do for a whole call): the last outcome is kept.
    memo_key = -1
    memo_ok = False
    while pc < end and done < budget:
        op = prog[pc, 0]
        gva = prog[pc, 1]
        if op > MEM_OPS_END:
            xinfo[XI_KIND] = X_OP
            break
        acc = _acc_of(op)
        vpn = gva >> 12
        i = (vpn ^ salt) & nmask
        pfn = -1
        if tlb[i, TLB_VPN] != (vpn << CTX_BITS) + tag_base:
            i = -1  # a miss in the PCID's row: the global entry's, if PGE is on
            if pge and tlb[vpn & nmask, TLB_VPN] == tlb_tag(vpn, CTX_GLOBAL):
                i = vpn & nmask
        if i >= 0:
            attr = tlb[i, TLB_ATTR]
            pkey = (attr >> W.A_PKEY_SHIFT) & 0xF
            key = (attr << 2) | acc
            if key != memo_key:
                memo_key = key
                memo_ok = (
                    W.access_fault(attr, acc, regs[W.R_FLAGS], has_pkeys, pkey,
                                   regs[W.R_PKRU]) == 0
                    and _host_ok(attr, acc)
                    and (acc != EC.ACC_WRITE or (attr & W.A_DIRTY) != 0)
                )
            if memo_ok:
                pfn = tlb[i, TLB_PFN]
                hits += 1
            else:
                tlb[i, TLB_VPN] = 0
        if pfn < 0:
            # The walk is inlined here, once per dimension (a constant, so each copy is compiled
            # for its own): no call and no argument copies per TLB miss.
            if tdp:
                W._walk(pt, pt_slot, regs, gva, acc, True, W.XL_EPT, root, root_levels, ept_ad,
                        W.EMPTY_MS, W.EMPTY_HVA, tlb, pml, out)
            else:
                W._walk(pt, pt_slot, regs, gva, acc, True, W.XL_NONE, root, root_levels, ept_ad,
                        W.EMPTY_MS, W.EMPTY_HVA, tlb, pml, out)
            stats[ST_WALKS] += 1
            stats[ST_WALK_READS] += out[W.OUT_READS]
            stats[ST_PSC_SKIPPED] += out[W.OUT_SKIPPED]
            st = out[W.OUT_STATUS]
            if st == W.W_PF:
                # A page fault invalidates the TLB and paging-structure-cache entries used to
                # translate the faulting linear address (SDM vol. 3A 4.10.4.1).
                invalidate_addr(tlb, PSC_LINEAR, gva, gva, pcid)
            elif st == W.W_EPT_VIOLATION or st == W.W_EPT_MISCONFIG:
                # An EPT violation or misconfiguration invalidates the guest-physical and
                # combined mappings for its address (vol. 3C 29.4.3.1): a vCPU that cached a
                # table KVM has since replaced by a huge leaf sees the leaf when it retries.
                invalidate_addr(tlb, PSC_EPT, out[W.OUT_ADDR], gva, pcid)
            if st == W.W_PF:
                if tdp:
                    res[pc, RES_VALUE] = 0
                    res[pc, RES_VECTOR] = EC.PF_VECTOR
                    res[pc, RES_CODE] = out[W.OUT_CODE]
                    stats[ST_GUEST_PF] += 1
                    pc += 1
                    done += 1
                    continue
                xinfo[XI_KIND] = X_SHADOW_PF
                xinfo[XI_GVA] = gva
                xinfo[XI_CODE] = out[W.OUT_CODE]
                xinfo[XI_ACC] = acc
                break
            if st == W.W_PML_FULL:
                # SDM 29.3.6: the update that found the log full exits before it happens; the
                # op runs again once KVM has drained the log.
                xinfo[XI_KIND] = X_PML_FULL
                xinfo[XI_GVA] = gva
                xinfo[XI_GPA] = out[W.OUT_ADDR]
                xinfo[XI_ACC] = acc
                break
            if st != W.W_OK:
                xinfo[XI_KIND] = X_EPT_VIOLATION if st == W.W_EPT_VIOLATION else X_EPT_MISCONFIG
                xinfo[XI_GVA] = gva
                xinfo[XI_GPA] = out[W.OUT_ADDR]
                xinfo[XI_CODE] = out[W.OUT_CODE]
                xinfo[XI_ACC] = acc
                break
            pfn = out[W.OUT_HPA] >> 12
            attr = out[W.OUT_ATTR]
            if attr & W.A_GLOBAL:
                i = vpn & nmask
                tlb[i, TLB_VPN] = tlb_tag(vpn, CTX_GLOBAL)
            else:
                i = tlb_row(nmask, vpn, pcid)
                tlb[i, TLB_VPN] = tlb_tag(vpn, pcid)
            tlb[i, TLB_PFN] = pfn
            tlb[i, TLB_ATTR] = attr
        if pfn >= tag.shape[0]:
            # A frame beyond host memory (only nonsense tables lead there): it reads as 0 and
            # keeps nothing written, and nothing is read or written outside the arrays.
            if op == OP_READ or op == OP_FETCH or op == OP_RPTE:
                res[pc, RES_VALUE] = 0
        elif op == OP_READ or op == OP_FETCH:
            res[pc, RES_VALUE] = tag[pfn]
        elif op == OP_WRITE:
            tag[pfn] = prog[pc, 2]
        else:
            slot = pt_slot[pfn]
            if slot == NO_SLOT and op != OP_RPTE:
                xinfo[XI_KIND] = X_NEED_TABLE
                xinfo[XI_PFN] = pfn
                break
            word = (gva & 0xFFF) >> 3
            if op == OP_RPTE:
                res[pc, RES_VALUE] = pt[slot, word] if slot != NO_SLOT else 0
            elif op == OP_WPTE:
                pt[slot, word] = np.uint64(prog[pc, 2])
            else:
                sh = np.uint64(32 * ((gva >> 2) & 1))
                keep = pt[slot, word] & ~(np.uint64(0xFFFFFFFF) << sh)
                pt[slot, word] = keep | ((np.uint64(prog[pc, 2]) & np.uint64(0xFFFFFFFF)) << sh)
        ops += 1
        pc += 1
        done += 1
    # Counted in registers, stored once: no memory update per access.
    stats[ST_TLB_HITS] += hits
    stats[ST_OPS] += ops
    return pc


def new_program(rows: list[tuple[int, int, int]]) -> np.ndarray:
    prog = np.zeros((max(len(rows), 0), 3), dtype=np.int64)
    for k, (op, gva, value) in enumerate(rows):
        # Entries with bit 63 (XD) set are stored as their two's-complement int64 value.
        prog[k] = (op, gva, value - (1 << 64) if value >= 1 << 63 else value)
    return prog
