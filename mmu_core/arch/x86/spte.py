"""KVM's SPTEs: the software bits and special values KVM keeps in the tables it builds.

Source: Linux arch/x86/kvm/mmu/spte.h and spte.c (6.x). Two formats share these bits:
EPT entries (the TDP MMU and the legacy MMU with EPT) and x86 PTEs (shadow paging). Bits
KVM owns are ones the hardware ignores: bit 11 (SPTE_MMU_PRESENT_MASK) marks every present
SPTE, so that "present to KVM" never depends on the hardware R/W/X or P bits (which access
tracking and MMIO SPTEs reuse); host-writable and MMU-writable say whether a write fault may
be fixed by just setting W.
"""

from __future__ import annotations

from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import paging as P

SPTE_ENT_PER_PAGE = 512
PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3
PT64_ROOT_4LEVEL, PT64_ROOT_5LEVEL = 4, 5

#: ignored by hardware in both formats; set in every shadow-present SPTE (spte.h)
SPTE_MMU_PRESENT_MASK = 1 << 11
#: bit 7: PS in x86 PTEs, "large page" in EPT entries
EPT_LARGE_MASK = E.EPT_LARGE
SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF

# Host-writable / MMU-writable: EPT uses two of bits 57..63 (ignored by EPT), the x86 format
# bits 9 and 10 (available to software). spte.h: EPT_SPTE_HOST_WRITABLE, EPT_SPTE_MMU_WRITABLE,
# DEFAULT_SPTE_HOST_WRITABLE, DEFAULT_SPTE_MMU_WRITABLE.
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58
SHADOW_SPTE_HOST_WRITABLE = 1 << 9
SHADOW_SPTE_MMU_WRITABLE = 1 << 10

#: FROZEN_SPTE (formerly REMOVED_SPTE): a value no present or MMIO SPTE can take; an entry
#: holding it is being changed by someone else, and for the hardware it is not present.
FROZEN_SPTE = 0x5A0

# MMIO SPTEs carry the memslots generation so a stale one is detected (spte.h: the low part
# in bits 3..10, the high part in bits 52..62; 19 bits in all) and the gfn in the address bits.
MMIO_SPTE_GEN_LOW_START, MMIO_SPTE_GEN_LOW_END = 3, 10
MMIO_SPTE_GEN_HIGH_START, MMIO_SPTE_GEN_HIGH_END = 52, 62
MMIO_SPTE_GEN_LOW_BITS = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1
MMIO_SPTE_GEN_MASK = (1 << (MMIO_SPTE_GEN_LOW_BITS + MMIO_SPTE_GEN_HIGH_END
                            - MMIO_SPTE_GEN_HIGH_START + 1)) - 1
#: EPT: write+execute without read is a misconfiguration (VMX_EPT_MISCONFIG_WX_VALUE), so an
#: access exits as EPT_MISCONFIG and KVM knows it is MMIO without a walk.
EPT_MMIO_VALUE = E.EPT_WRITE | E.EPT_EXEC
EPT_MMIO_MASK = E.EPT_RWX
#: shadow paging: present with a reserved physical-address bit, so the access faults with
#: PFERR_RSVD (KVM picks the highest reserved bit below 52 for the host's MAXPHYADDR).
HOST_MAXPHYADDR = 46
SHADOW_MMIO_VALUE = P.PT_PRESENT | (1 << 51)
SHADOW_MMIO_MASK = P.PT_PRESENT | (1 << 51) | SPTE_MMU_PRESENT_MASK
MMIO_GFN_MASK = ((1 << (HOST_MAXPHYADDR - 12)) - 1)


def spte_index(gfn: int, level: int) -> int:
    return (gfn >> (9 * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


def pages_per_level(level: int) -> int:
    return 1 << (9 * (level - 1))


def gfn_round_for_level(gfn: int, level: int) -> int:
    return gfn & ~(pages_per_level(level) - 1)


def is_frozen_spte(spte: int) -> bool:
    return spte == FROZEN_SPTE


def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_MMU_PRESENT_MASK) and spte != FROZEN_SPTE


def is_large_pte(spte: int) -> bool:
    return bool(spte & EPT_LARGE_MASK)


def is_last_spte(spte: int, level: int) -> bool:
    return level == PG_LEVEL_4K or is_large_pte(spte)


def spte_to_pfn(spte: int) -> int:
    return (spte & SPTE_BASE_ADDR_MASK) >> 12


def is_writable_pte(spte: int) -> bool:
    return bool(spte & P.PT_WRITABLE)  # bit 1 is W in both formats


def clear_writable(spte: int) -> int:
    return spte & ~(P.PT_WRITABLE | EPT_SPTE_MMU_WRITABLE | SHADOW_SPTE_MMU_WRITABLE)


# --- building SPTEs ---------------------------------------------------------------------------
def make_nonleaf_spte(child_pfn: int) -> int:
    """An EPT entry pointing at a child table: full permissions, accessed (make_nonleaf_spte)."""
    return (child_pfn << 12) | E.EPT_RWX | E.EPT_ACCESSED | SPTE_MMU_PRESENT_MASK


def make_leaf_spte(pfn: int, level: int, writable: bool, executable: bool) -> int:
    """An EPT leaf mapping pfn (the first frame of the page at `level`), write-back."""
    spte = (pfn << 12) | E.EPT_READ | (E.EPT_MT_WB << E.EPT_MT_SHIFT) | E.EPT_ACCESSED
    spte |= SPTE_MMU_PRESENT_MASK | EPT_SPTE_HOST_WRITABLE
    if executable:
        spte |= E.EPT_EXEC
    if writable:
        spte |= E.EPT_WRITE | E.EPT_DIRTY | EPT_SPTE_MMU_WRITABLE
    if level > PG_LEVEL_4K:
        spte |= EPT_LARGE_MASK
    return spte


def make_shadow_nonleaf_spte(child_pfn: int) -> int:
    """An x86 entry pointing at a child shadow table: P, R/W, U/S, A (permissions at leaves)."""
    return (child_pfn << 12) | P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER | P.PT_ACCESSED \
        | SPTE_MMU_PRESENT_MASK


def make_shadow_leaf_spte(pfn: int, writable: bool, user: bool, nx: bool) -> int:
    """An x86 4 KiB leaf with the guest's combined access (shadow paging)."""
    spte = (pfn << 12) | P.PT_PRESENT | P.PT_ACCESSED | SPTE_MMU_PRESENT_MASK
    spte |= SHADOW_SPTE_HOST_WRITABLE
    if writable:
        spte |= P.PT_WRITABLE | P.PT_DIRTY | SHADOW_SPTE_MMU_WRITABLE
    if user:
        spte |= P.PT_USER
    if nx:
        spte |= P.PT_NX
    return spte


# Access tracking without A bits (spte.h: SHADOW_ACC_TRACK_SAVED_BITS_SHIFT/MASK): the R and X
# bits move up to bits 54..56 and are cleared, so the next access faults and restores them.
SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54
SHADOW_ACC_TRACK_SAVED_MASK = E.EPT_READ | E.EPT_EXEC


def is_access_track_spte(spte: int) -> bool:
    return is_shadow_present_pte(spte) and not spte & E.EPT_RWX


def mark_spte_for_access_track(spte: int) -> int:
    """Make an EPT SPTE fault on its next access, remembering R/X (W is dropped: the write
    fault path restores it through MMU-writable)."""
    saved = spte & SHADOW_ACC_TRACK_SAVED_MASK
    spte &= ~(E.EPT_RWX | E.EPT_ACCESSED | (SHADOW_ACC_TRACK_SAVED_MASK
                                             << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT))
    return spte | (saved << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)


def restore_acc_track_spte(spte: int) -> int:
    saved = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_MASK
    spte &= ~(SHADOW_ACC_TRACK_SAVED_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)
    return spte | saved


def _gen_bits(gen: int) -> int:
    gen &= MMIO_SPTE_GEN_MASK
    low = gen & ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1)
    high = gen >> MMIO_SPTE_GEN_LOW_BITS
    return (low << MMIO_SPTE_GEN_LOW_START) | (high << MMIO_SPTE_GEN_HIGH_START)


def make_mmio_spte(gfn: int, access: int, gen: int, ept: bool) -> int:
    """An MMIO SPTE for gfn carrying memslots generation `gen` (make_mmio_spte)."""
    value = EPT_MMIO_VALUE if ept else SHADOW_MMIO_VALUE
    del access  # the model's MMIO exits do not depend on the guest access bits
    return value | _gen_bits(gen) | ((gfn & MMIO_GFN_MASK) << 12)


def is_mmio_spte(spte: int, ept: bool) -> bool:
    if ept:
        return (spte & EPT_MMIO_MASK) == EPT_MMIO_VALUE and spte != FROZEN_SPTE
    return (spte & SHADOW_MMIO_MASK) == SHADOW_MMIO_VALUE


def get_mmio_spte_gfn(spte: int) -> int:
    return (spte >> 12) & MMIO_GFN_MASK


def get_mmio_spte_generation(spte: int) -> int:
    low = (spte >> MMIO_SPTE_GEN_LOW_START) & ((1 << MMIO_SPTE_GEN_LOW_BITS) - 1)
    high = (spte >> MMIO_SPTE_GEN_HIGH_START) & ((1 << (MMIO_SPTE_GEN_HIGH_END
                                                         - MMIO_SPTE_GEN_HIGH_START + 1)) - 1)
    return low | (high << MMIO_SPTE_GEN_LOW_BITS)
