"""KVM's SPTEs: the software bits and special values KVM keeps in the tables it builds.

Sources (Linux 6.x): arch/x86/kvm/mmu/spte.h (the masks, the MMIO generation layout,
SHADOW_NONPRESENT_VALUE, FROZEN_SPTE, the small inline predicates, restore_acc_track_spte),
arch/x86/kvm/mmu/spte.c (make_mmio_spte, generation_mmio_spte_mask, make_nonleaf_spte,
mark_spte_for_access_track, kvm_mmu_set_mmio_spte_mask, kvm_mmu_set_ept_masks,
kvm_mmu_reset_all_pte_masks), arch/x86/kvm/mmu/mmu.c (get_mmio_spte_gfn,
get_mmio_spte_access) and arch/x86/include/asm/vmx.h (VMX_EPT_*). The hardware meaning of the
EPT bits is the SDM's and lives in `ept.py`; the x86 PTE bits live in `paging.py`. This module
only names them the way KVM does and adds what KVM owns.

Two formats share the software bits. EPT entries (the TDP MMU, and the legacy MMU on EPT) use
the high ignored bits for KVM's state, since EPT ignores few low bits; x86 PTEs (shadow paging)
use bits 9 and 10. Which set is live is decided in KVM at module load
(kvm_mmu_set_ept_masks vs kvm_mmu_reset_all_pte_masks); the model names both, with an `ept`
flag where a helper must choose.

Representation. Every SPTE value here is a non-negative Python int (0 .. 2**64-1), as stored in
the uint64 page-table arrays. The helpers are numba-jitted with explicit signatures that take
SPTEs as uint64: numba's dispatcher refuses a Python int >= 2**63 once an int64 version exists,
and SPTEs with bit 63 set are the rule here (SHADOW_NONPRESENT_VALUE, FROZEN_SPTE, EPT SPTEs
with suppress-#VE, x86 SPTEs with NX). Jitted callers may pass int64 (it is reinterpreted).
SPTE-valued helpers return uint64; pfns, gfns, generations and indices come back as int64;
predicates as booleans.

Overlaps that are intended (as in KVM): the A/D-type field (52-53), the saved access bits
(54, 56) and the EPT host/MMU-writable bits (57, 58) lie inside the MMIO generation's high part
(52-62). They never meet: the former are meaningful only in shadow-present SPTEs, the generation
only in MMIO SPTEs, which are never shadow-present (bit 11 clear).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba import types as nbt

from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import paging as P

_U64 = nbt.uint64
_I64 = nbt.int64
_B = nbt.boolean


def _genmask(hi: int, lo: int) -> int:
    """Bits hi..lo set (GENMASK_ULL)."""
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


# --- levels (arch/x86/include/asm/kvm_host.h, pgtable_types.h; spte.h SPTE_LEVEL_BITS) ---------
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
PT64_ROOT_4LEVEL = 4
PT64_ROOT_5LEVEL = 5
SPTE_LEVEL_BITS = 9
SPTE_ENT_PER_PAGE = 1 << SPTE_LEVEL_BITS  # 512
PAGE_SHIFT = P.PAGE_SHIFT  # 12

# --- the EPT entry as KVM uses it (asm/vmx.h; meaning: SDM 29.3.2, in ept.py) -------------------
VMX_EPT_READABLE_MASK = E.EPT_READ  # bit 0
VMX_EPT_WRITABLE_MASK = E.EPT_WRITE  # bit 1
VMX_EPT_EXECUTABLE_MASK = E.EPT_EXEC  # bit 2 (supervisor execute under MBEC)
VMX_EPT_RWX_MASK = VMX_EPT_READABLE_MASK | VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK
VMX_EPT_MT_EPTE_SHIFT = E.EPT_MT_SHIFT  # memory type, bits 5:3 of a leaf
VMX_EPT_MT_MASK = E.EPT_MT_MASK
MTRR_TYPE_WRBACK = E.EPT_MT_WB  # 6: the type KVM's vmx_get_mt_mask gives normal RAM
VMX_EPT_IPAT_BIT = E.EPT_IGNORE_PAT  # bit 6
PT_PAGE_SIZE_MASK = E.EPT_LARGE  # bit 7: "large page" in EPT, PS in x86 PTEs (same bit)
EPT_LARGE_MASK = PT_PAGE_SIZE_MASK
VMX_EPT_ACCESS_BIT = E.EPT_ACCESSED  # bit 8
VMX_EPT_DIRTY_BIT = E.EPT_DIRTY  # bit 9
#: bit 10, user-mode execute with mode-based execute control (SDM); mainline KVM does not use it
VMX_EPT_USER_EXECUTABLE_MASK = E.EPT_USER_EXEC
VMX_EPT_SUPPRESS_VE_BIT = E.EPT_SUPPRESS_VE  # bit 63
#: W+X without R is an EPT misconfiguration (SDM 29.3.3.1): KVM's MMIO marker (asm/vmx.h)
VMX_EPT_MISCONFIG_WX_VALUE = VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK

# The same bits in the x86 format (shadow paging), under KVM's names (asm/pgtable_types.h).
PT_PRESENT_MASK = P.PT_PRESENT
PT_WRITABLE_MASK = P.PT_WRITABLE  # bit 1 in both formats: is_writable_pte() needs no flag
PT_USER_MASK = P.PT_USER
PT_ACCESSED_MASK = P.PT_ACCESSED
PT_DIRTY_MASK = P.PT_DIRTY
PT64_NX_MASK = P.PT_NX

# --- address bits ---------------------------------------------------------------------------------
#: spte.h SPTE_BASE_ADDR_MASK without CONFIG_DYNAMIC_PHYSICAL_MASK: bits 51:12
SPTE_BASE_ADDR_MASK = _genmask(51, PAGE_SHIFT)
#: the model's host MAXPHYADDR (kvm_host.maxphyaddr); below 52, so a reserved PA bit exists
HOST_MAXPHYADDR = 46

# --- KVM's software bits (spte.h) -----------------------------------------------------------------
#: "MMU-present": set in every SPTE backed by memory, leaf or not; ignored by every SPTE flavour.
#: MMIO, frozen and non-present SPTEs never have it.
SPTE_MMU_PRESENT_MASK = 1 << 11

#: How A/D is tracked for a TDP SPTE, bits 53:52. ENABLED must be 0 (those bits are reserved in
#: PAE/NPT-PAE entries, and shadow paging always has A/D).
SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_ENABLED = 0 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_DISABLED = 1 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_WRPROT_ONLY = 2 << SPTE_TDP_AD_SHIFT

#: Access tracking without A bits: R and X are parked at bits 54 and 56 while RWX is cleared
#: (W is not saved: it comes back through a write fault, which also dirty-logs).
SHADOW_ACC_TRACK_SAVED_BITS_MASK = VMX_EPT_READABLE_MASK | VMX_EPT_EXECUTABLE_MASK
SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54
SHADOW_ACC_TRACK_SAVED_MASK = SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
#: shadow_acc_track_mask as kvm_mmu_set_ept_masks sets it (0 for x86 SPTEs, which always have A/D)
EPT_ACC_TRACK_MASK = VMX_EPT_RWX_MASK

# Host-writable / MMU-writable (why a present leaf is read-only; see spte.h's table above
# is_writable_pte). EPT: high ignored bits clear of the A/D type and the saved bits; x86: bits
# 9 and 10, ignored by all non-EPT PTEs (DEFAULT_SPTE_{HOST,MMU}_WRITABLE).
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58
SHADOW_SPTE_HOST_WRITABLE = 1 << 9
SHADOW_SPTE_MMU_WRITABLE = 1 << 10

#: shadow_present_mask for EPT (kvm_mmu_set_ept_masks, CPU with execute-only support; R then
#: comes from ACC_USER via shadow_user_mask): every present EPT SPTE suppresses #VE.
EPT_SHADOW_PRESENT_MASK = VMX_EPT_SUPPRESS_VE_BIT

# Guest access bits as KVM carries them (spte.h ACC_*).
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = PT_WRITABLE_MASK
ACC_USER_MASK = PT_USER_MASK
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

# --- special values (spte.h) ----------------------------------------------------------------------
#: The value of an empty SPTE. Current kernels (since the 2024 TDX preparation, ~6.10) use bit
#: 63 on x86-64, not 0: for EPT it is "suppress #VE", so with EPT-violation #VE enabled (TDX
#: requires it) an access to an entry KVM has not filled still exits as an EPT violation instead
#: of raising #VE in the guest; NPT and x86 PTEs ignore every other bit of a non-present entry,
#: so one value serves all formats. KVM fills new table pages with it. (0 on 32-bit hosts and
#: in older kernels; the model's tables start zeroed, which the hardware also sees as empty.)
SHADOW_NONPRESENT_VALUE = 1 << 63

#: FROZEN_SPTE (REMOVED_SPTE in older kernels): an entry another thread is in the middle of
#: changing (TDP MMU only). No RWX or P bit (not present to EPT or NPT), no PFN bits (no L1TF
#: gadget), no MMU-present bit, and it can't match the MMIO mask because MMIO needs RWX bits.
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | 0x5A0

# --- MMIO SPTEs (spte.h, spte.c) ------------------------------------------------------------------
# 19 bits of the memslots generation: bits 0-7 in SPTE bits 3-10, bits 8-18 in SPTE bits 52-62.
MMIO_SPTE_GEN_LOW_START = 3
MMIO_SPTE_GEN_LOW_END = 10
MMIO_SPTE_GEN_HIGH_START = 52
MMIO_SPTE_GEN_HIGH_END = 62
MMIO_SPTE_GEN_LOW_MASK = _genmask(MMIO_SPTE_GEN_LOW_END, MMIO_SPTE_GEN_LOW_START)
MMIO_SPTE_GEN_HIGH_MASK = _genmask(MMIO_SPTE_GEN_HIGH_END, MMIO_SPTE_GEN_HIGH_START)
MMIO_SPTE_GEN_LOW_BITS = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1  # 8
MMIO_SPTE_GEN_HIGH_BITS = MMIO_SPTE_GEN_HIGH_END - MMIO_SPTE_GEN_HIGH_START + 1  # 11
MMIO_SPTE_GEN_LOW_SHIFT = MMIO_SPTE_GEN_LOW_START - 0
MMIO_SPTE_GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS  # 44
#: the largest MMIO generation an SPTE can hold; KVM keeps generation & this
MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_BITS)) - 1

#: bits an MMIO mask may use (spte.h SPTE_MMIO_ALLOWED_MASK): 63, the PA bits, and RWX
SPTE_MMIO_ALLOWED_MASK = (1 << 63) | _genmask(51, 12) | _genmask(2, 0)

# EPT (kvm_mmu_set_ept_masks): kvm_mmu_set_mmio_spte_mask(VMX_EPT_MISCONFIG_WX_VALUE,
# VMX_EPT_RWX_MASK | VMX_EPT_SUPPRESS_VE_BIT, 0). The access goes through as an EPT
# misconfiguration exit; suppress-#VE stays clear; no guest access bits are kept.
EPT_MMIO_VALUE = VMX_EPT_MISCONFIG_WX_VALUE
EPT_MMIO_MASK = VMX_EPT_RWX_MASK | VMX_EPT_SUPPRESS_VE_BIT
EPT_MMIO_ACCESS_MASK = 0

# x86 format (kvm_mmu_reset_all_pte_masks): P plus reserved PA bit 51, so the walk faults with
# PFERR_RSVD; possible only while the host MAXPHYADDR is below 52. Keeps guest W and U.
SHADOW_MMIO_VALUE = (1 << 51) | PT_PRESENT_MASK
SHADOW_MMIO_MASK = SHADOW_MMIO_VALUE
SHADOW_MMIO_ACCESS_MASK = ACC_WRITE_MASK | ACC_USER_MASK

# L1TF (kvm_mmu_reset_all_pte_masks): the model's host is not affected, so
# shadow_nonpresent_or_rsvd_mask is 0 and the MMIO gfn sits unshifted in bits MAXPHYADDR-1:12.
SHADOW_NONPRESENT_OR_RSVD_MASK_LEN = 5
SHADOW_NONPRESENT_OR_RSVD_MASK = 0
SHADOW_NONPRESENT_OR_RSVD_LOWER_GFN_MASK = _genmask(HOST_MAXPHYADDR - 1, PAGE_SHIFT)
#: the gfns an MMIO SPTE can carry (a gfn value mask, not an SPTE mask)
MMIO_GFN_MASK = SHADOW_NONPRESENT_OR_RSVD_LOWER_GFN_MASK >> PAGE_SHIFT


def _static_asserts() -> None:
    """The static_asserts of spte.h and the WARNs of kvm_mmu_set_mmio_spte_mask, for our values."""
    checks = (
        SPTE_TDP_AD_ENABLED == 0,
        not SPTE_TDP_AD_MASK & SHADOW_ACC_TRACK_SAVED_MASK,
        not (EPT_SPTE_HOST_WRITABLE | EPT_SPTE_MMU_WRITABLE)
        & (SPTE_TDP_AD_MASK | SHADOW_ACC_TRACK_SAVED_MASK),
        not SPTE_MMU_PRESENT_MASK & (MMIO_SPTE_GEN_LOW_MASK | MMIO_SPTE_GEN_HIGH_MASK),
        not SPTE_MMIO_ALLOWED_MASK
        & (SPTE_MMU_PRESENT_MASK | MMIO_SPTE_GEN_LOW_MASK | MMIO_SPTE_GEN_HIGH_MASK),
        MMIO_SPTE_GEN_LOW_BITS == 8 and MMIO_SPTE_GEN_HIGH_BITS == 11,
        not SHADOW_NONPRESENT_VALUE & SPTE_MMU_PRESENT_MASK,
        not FROZEN_SPTE & SPTE_MMU_PRESENT_MASK,
        HOST_MAXPHYADDR < 52,
    )
    for mmio_value, mmio_mask in ((EPT_MMIO_VALUE, EPT_MMIO_MASK),
                                  (SHADOW_MMIO_VALUE, SHADOW_MMIO_MASK)):
        checks += (
            not mmio_mask & ~SPTE_MMIO_ALLOWED_MASK,
            mmio_value & mmio_mask == mmio_value,
            FROZEN_SPTE & mmio_mask != mmio_value,
            not mmio_value & SHADOW_NONPRESENT_OR_RSVD_LOWER_GFN_MASK,
        )
    if not all(checks):
        raise AssertionError("SPTE layout constants are inconsistent")


_static_asserts()

# Combinations the jitted helpers use, folded here so that numba sees one constant each.
_AT_CLEAR = EPT_ACC_TRACK_MASK | VMX_EPT_ACCESS_BIT  # mark_spte_for_access_track
_AT_RESTORE_CLEAR = EPT_ACC_TRACK_MASK | SHADOW_ACC_TRACK_SAVED_MASK  # restore_acc_track_spte
_WRPROT_CLEAR = PT_WRITABLE_MASK | EPT_SPTE_MMU_WRITABLE | SHADOW_SPTE_MMU_WRITABLE
_EPT_NONLEAF = SPTE_MMU_PRESENT_MASK | EPT_SHADOW_PRESENT_MASK | VMX_EPT_RWX_MASK | VMX_EPT_ACCESS_BIT
_EPT_LEAF = (SPTE_MMU_PRESENT_MASK | EPT_SHADOW_PRESENT_MASK | VMX_EPT_READABLE_MASK
             | (MTRR_TYPE_WRBACK << VMX_EPT_MT_EPTE_SHIFT) | VMX_EPT_ACCESS_BIT
             | EPT_SPTE_HOST_WRITABLE)
_EPT_LEAF_WRITE = VMX_EPT_WRITABLE_MASK | VMX_EPT_DIRTY_BIT | EPT_SPTE_MMU_WRITABLE
_X86_NONLEAF = SPTE_MMU_PRESENT_MASK | PT_PRESENT_MASK | PT_WRITABLE_MASK | PT_USER_MASK \
    | PT_ACCESSED_MASK
_X86_LEAF = SPTE_MMU_PRESENT_MASK | PT_PRESENT_MASK | PT_ACCESSED_MASK | SHADOW_SPTE_HOST_WRITABLE
_X86_LEAF_WRITE = PT_WRITABLE_MASK | PT_DIRTY_MASK | SHADOW_SPTE_MMU_WRITABLE


# --- levels ---------------------------------------------------------------------------------------
@njit(_U64(_I64), cache=True)
def pfn_mask(maxphyaddr):
    """The address field of an EPT/x86 SPTE for a MAXPHYADDR: bits maxphyaddr-1 .. 12."""
    return ((np.uint64(1) << np.uint64(maxphyaddr)) - np.uint64(1)) & ~np.uint64(0xFFF)


@njit(_I64(_I64), cache=True)
def pages_per_level(level):
    """4 KiB pages mapped by one SPTE at `level` (KVM_PAGES_PER_HPAGE): 1, 512, 262144, ..."""
    return np.int64(1) << (SPTE_LEVEL_BITS * (level - 1))


@njit(_I64(_I64, _I64), cache=True)
def spte_index(gfn, level):
    """Index of gfn's SPTE in its table at `level` (SPTE_INDEX, on a gfn instead of an address)."""
    return (gfn >> (SPTE_LEVEL_BITS * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


@njit(_I64(_I64, _I64), cache=True)
def gfn_round_for_level(gfn, level):
    """The first gfn of the region one SPTE at `level` maps (mmu_internal.h gfn_round_for_level)."""
    return gfn & -(np.int64(1) << (SPTE_LEVEL_BITS * (level - 1)))


# --- predicates and accessors (spte.h) ------------------------------------------------------------
@njit(_B(_U64), cache=True)
def is_frozen_spte(spte):
    return spte == np.uint64(FROZEN_SPTE)


@njit(_B(_U64), cache=True)
def is_shadow_present_pte(spte):
    """MMU-present bit set. (FROZEN_SPTE lacks the bit; the second test only spells it out.)"""
    return (spte & np.uint64(SPTE_MMU_PRESENT_MASK)) != 0 and spte != np.uint64(FROZEN_SPTE)


@njit(_B(_U64), cache=True)
def is_large_pte(spte):
    return (spte & np.uint64(PT_PAGE_SIZE_MASK)) != 0


@njit(_B(_U64, _I64), cache=True)
def is_last_spte(spte, level):
    return level == PG_LEVEL_4K or (spte & np.uint64(PT_PAGE_SIZE_MASK)) != 0


@njit(_I64(_U64), cache=True)
def spte_to_pfn(spte):
    return np.int64((spte & np.uint64(SPTE_BASE_ADDR_MASK)) >> np.uint64(PAGE_SHIFT))


@njit(_B(_U64), cache=True)
def is_writable_pte(spte):
    """The hardware W bit (bit 1 in EPT and x86 entries alike)."""
    return (spte & np.uint64(PT_WRITABLE_MASK)) != 0


@njit(_B(_U64, _B), cache=True)
def is_mmu_writable_spte(spte, ept):
    """MMU-writable: the SPTE may be made writable without mmu_lock (spte.h)."""
    bit = EPT_SPTE_MMU_WRITABLE if ept else SHADOW_SPTE_MMU_WRITABLE
    return (spte & np.uint64(bit)) != 0


@njit(_B(_U64), cache=True)
def spte_ad_enabled(spte):
    """A/D bits are in use for this (present) SPTE (spte.h spte_ad_enabled)."""
    return (spte & np.uint64(SPTE_TDP_AD_MASK)) != np.uint64(SPTE_TDP_AD_DISABLED)


@njit(_B(_U64), cache=True)
def spte_ad_need_write_protect(spte):
    """Dirty tracking must write-protect (A/D disabled, or PML-style WRPROT_ONLY)."""
    return (spte & np.uint64(SPTE_TDP_AD_MASK)) != np.uint64(SPTE_TDP_AD_ENABLED)


@njit(_B(_U64), cache=True)
def is_access_track_spte(spte):
    """A present EPT SPTE without A/D whose RWX were parked by mark_spte_for_access_track.

    spte.h: !spte_ad_enabled(spte) && !(spte & shadow_acc_track_mask); KVM only asks it of
    present SPTEs, and here a non-present one answers False.
    """
    return ((spte & np.uint64(SPTE_MMU_PRESENT_MASK)) != 0
            and (spte & np.uint64(SPTE_TDP_AD_MASK)) == np.uint64(SPTE_TDP_AD_DISABLED)
            and (spte & np.uint64(EPT_ACC_TRACK_MASK)) == 0)


@njit(_B(_U64), cache=True)
def is_accessed_spte(spte):
    """Accessed bit of an EPT SPTE (current spte.h: spte & shadow_accessed_mask; KVM now keeps
    the bit in software for A/D-disabled SPTEs too, and mark_spte_for_access_track clears it)."""
    return (spte & np.uint64(VMX_EPT_ACCESS_BIT)) != 0


@njit(_B(_U64), cache=True)
def is_dirty_spte(spte):
    """Dirty bit of an A/D-enabled EPT SPTE; W for an A/D-disabled one (spte.h is_dirty_spte as
    of 6.1; current kernels dropped the helper)."""
    if (spte & np.uint64(SPTE_TDP_AD_MASK)) != np.uint64(SPTE_TDP_AD_DISABLED):
        return (spte & np.uint64(VMX_EPT_DIRTY_BIT)) != 0
    return (spte & np.uint64(PT_WRITABLE_MASK)) != 0


# --- access tracking (spte.c mark_spte_for_access_track, spte.h restore_acc_track_spte) ------------
@njit(_U64(_U64), cache=True)
def mark_spte_for_access_track(spte):
    """Age an EPT SPTE. With A/D: clear the Accessed bit. Without: park R and X in bits 54/56
    and clear RWX and A, so the next access faults and restore_acc_track_spte undoes it.
    W is dropped, not saved. Already-tracked SPTEs come back unchanged."""
    if (spte & np.uint64(SPTE_TDP_AD_MASK)) != np.uint64(SPTE_TDP_AD_DISABLED):
        return spte & ~np.uint64(VMX_EPT_ACCESS_BIT)
    if (spte & np.uint64(EPT_ACC_TRACK_MASK)) == 0:
        return spte
    saved = spte & np.uint64(SHADOW_ACC_TRACK_SAVED_BITS_MASK)
    spte |= saved << np.uint64(SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)
    return spte & ~np.uint64(_AT_CLEAR)


@njit(_U64(_U64), cache=True)
def restore_acc_track_spte(spte):
    """Put the parked R/X bits back and clear the parking place (W stays clear)."""
    saved = (spte >> np.uint64(SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)) \
        & np.uint64(SHADOW_ACC_TRACK_SAVED_BITS_MASK)
    spte &= ~np.uint64(_AT_RESTORE_CLEAR)
    return spte | saved


@njit(_U64(_U64), cache=True)
def clear_writable(spte):
    """Write-protect a leaf for shadow-paging purposes: W and MMU-writable go (spte.h case 2).

    Clears both formats' MMU-writable bits; in an EPT SPTE bit 10 is the MBEC user-execute bit,
    which the model never sets.
    """
    return spte & ~np.uint64(_WRPROT_CLEAR)


# --- MMIO SPTEs -----------------------------------------------------------------------------------
@njit(_U64(_I64), cache=True)
def generation_mmio_spte_mask(gen):
    """The SPTE bits holding MMIO generation `gen` (spte.c generation_mmio_spte_mask)."""
    g = np.uint64(gen) & np.uint64(MMIO_SPTE_GEN_MASK)
    bits = (g << np.uint64(MMIO_SPTE_GEN_LOW_SHIFT)) & np.uint64(MMIO_SPTE_GEN_LOW_MASK)
    bits |= (g << np.uint64(MMIO_SPTE_GEN_HIGH_SHIFT)) & np.uint64(MMIO_SPTE_GEN_HIGH_MASK)
    return bits


@njit(_U64(_I64, _I64, _I64, _B), cache=True)
def make_mmio_spte(gfn, access, gen, ept):
    """An MMIO SPTE for gfn (spte.c make_mmio_spte): generation `gen & MMIO_SPTE_GEN_MASK`,
    the MMIO value of the format, the guest access bits the format keeps, and the gfn.

    KVM assumes gfn fits below the host MAXPHYADDR; the gfn is masked so that a larger one can't
    spill into the MMIO and generation bits.
    """
    spte = generation_mmio_spte_mask(gen)
    if ept:
        spte |= np.uint64(EPT_MMIO_VALUE) | (np.uint64(access) & np.uint64(EPT_MMIO_ACCESS_MASK))
    else:
        spte |= np.uint64(SHADOW_MMIO_VALUE) \
            | (np.uint64(access) & np.uint64(SHADOW_MMIO_ACCESS_MASK))
    return spte | ((np.uint64(gfn) & np.uint64(MMIO_GFN_MASK)) << np.uint64(PAGE_SHIFT))


@njit(_B(_U64, _B), cache=True)
def is_mmio_spte(spte, ept):
    """(spte & shadow_mmio_mask) == shadow_mmio_value, with the format's mask and value."""
    if ept:
        return (spte & np.uint64(EPT_MMIO_MASK)) == np.uint64(EPT_MMIO_VALUE)
    return (spte & np.uint64(SHADOW_MMIO_MASK)) == np.uint64(SHADOW_MMIO_VALUE)


@njit(_I64(_U64), cache=True)
def get_mmio_spte_gfn(spte):
    """mmu.c get_mmio_spte_gfn with no L1TF relocation (SHADOW_NONPRESENT_OR_RSVD_MASK == 0)."""
    gpa = spte & np.uint64(SHADOW_NONPRESENT_OR_RSVD_LOWER_GFN_MASK)
    return np.int64(gpa >> np.uint64(PAGE_SHIFT))


@njit(_I64(_U64), cache=True)
def get_mmio_spte_generation(spte):
    """spte.h get_mmio_spte_generation: the 19-bit generation back from bits 3-10 and 52-62."""
    gen = (spte & np.uint64(MMIO_SPTE_GEN_LOW_MASK)) >> np.uint64(MMIO_SPTE_GEN_LOW_SHIFT)
    gen |= (spte & np.uint64(MMIO_SPTE_GEN_HIGH_MASK)) >> np.uint64(MMIO_SPTE_GEN_HIGH_SHIFT)
    return np.int64(gen)


@njit(_I64(_U64, _B), cache=True)
def get_mmio_spte_access(spte, ept):
    """mmu.c get_mmio_spte_access: spte & shadow_mmio_access_mask (0 for EPT: nothing kept)."""
    mask = EPT_MMIO_ACCESS_MASK if ept else SHADOW_MMIO_ACCESS_MASK
    return np.int64(spte & np.uint64(mask))


# --- building present SPTEs -----------------------------------------------------------------------
@njit(_U64(_I64), cache=True)
def make_nonleaf_spte(child_pfn):
    """An EPT entry pointing at a child table (spte.c make_nonleaf_spte with EPT masks, A/D on):
    MMU-present, suppress-#VE, R (shadow_user_mask), W, X, Accessed."""
    return np.uint64(_EPT_NONLEAF) | (np.uint64(child_pfn) << np.uint64(PAGE_SHIFT))


@njit(_U64(_I64, _I64, _B, _B), cache=True)
def make_leaf_spte(pfn, level, writable, executable):
    """An EPT leaf mapping pfn (the first frame of the page at `level`) as make_spte builds it
    for a non-prefetch fault with A/D on: R, write-back, Accessed, host-writable; W with Dirty
    and MMU-writable if writable; X if executable; the large-page bit above 4K."""
    spte = np.uint64(_EPT_LEAF)
    spte |= np.uint64(pfn) << np.uint64(PAGE_SHIFT)
    if executable:
        spte |= np.uint64(VMX_EPT_EXECUTABLE_MASK)
    if writable:
        spte |= np.uint64(_EPT_LEAF_WRITE)
    if level > PG_LEVEL_4K:
        spte |= np.uint64(PT_PAGE_SIZE_MASK)
    return spte


@njit(_U64(_I64), cache=True)
def make_shadow_nonleaf_spte(child_pfn):
    """An x86 entry pointing at a child shadow table: P, W, U, A, MMU-present (permissions are
    enforced at the leaves)."""
    return np.uint64(_X86_NONLEAF) | (np.uint64(child_pfn) << np.uint64(PAGE_SHIFT))


@njit(_U64(_I64, _B, _B, _B), cache=True)
def make_shadow_leaf_spte(pfn, writable, user, nx):
    """An x86 4 KiB leaf with the guest's combined access (shadow paging)."""
    spte = np.uint64(_X86_LEAF)
    spte |= np.uint64(pfn) << np.uint64(PAGE_SHIFT)
    if writable:
        spte |= np.uint64(_X86_LEAF_WRITE)
    if user:
        spte |= np.uint64(PT_USER_MASK)
    if nx:
        spte |= np.uint64(PT64_NX_MASK)
    return spte
