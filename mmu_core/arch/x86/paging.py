"""Guest paging formats: PTE bits and the paging modes as data for one generic walker.

Sources: Intel SDM vol. 3A, chapter 4 (4.3 32-bit paging, 4.4 PAE paging, 4.5 4-level and
5-level paging, 4.6 access rights, 4.8 accessed and dirty flags). Volatility3's intel layers
showed the idea of describing each mode as a table instead of writing one loop per mode.
"""

from __future__ import annotations

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)

# Bits common to every x86 paging-structure entry (SDM tables 4-4 .. 4-20).
PT_PRESENT = 1 << 0
PT_WRITABLE = 1 << 1
PT_USER = 1 << 2
PT_PWT = 1 << 3
PT_PCD = 1 << 4
PT_ACCESSED = 1 << 5
PT_DIRTY = 1 << 6
PT_PAGE_SIZE = 1 << 7  # PS: maps a large page at levels that allow one
PT_GLOBAL = 1 << 8
PT_PAT_LARGE = 1 << 12  # PAT bit of a 2M/4M/1G leaf sits where PS sits for a 4K leaf
PT_NX = 1 << 63  # XD; reserved unless EFER.NXE=1 (PAE and 4/5-level only)
PT_PKEY_SHIFT = 59  # protection key, bits 62:59 of a 4/5-level leaf
PT_PKEY_MASK = 0xF << PT_PKEY_SHIFT

# Paging modes. Values index the tables below, so they must stay dense and start at 0.
MODE_NONE = 0  # CR0.PG=0: linear address == physical address
MODE_32 = 1  # 32-bit paging, 2 levels of 1024 4-byte entries; 4M pages with CR4.PSE
MODE_PAE = 2  # PAE: 4 PDPTE registers loaded at MOV CR3, then 2 levels of 512 8-byte entries
MODE_4LEVEL = 3  # IA-32e 4-level
MODE_5LEVEL = 4  # IA-32e 5-level (CR4.LA57)
MODE_NAMES = ("none", "32bit", "pae", "4level", "5level")

#: number of levels the walker traverses (PAE counts its PDPTE level)
MODE_LEVELS = np.array([0, 2, 3, 4, 5], dtype=np.int64)
#: size in bytes of one entry
MODE_ENTRY_BYTES = np.array([8, 4, 8, 8, 8], dtype=np.int64)
#: index bits per level (the PAE PDPTE level uses 2 bits: 4 entries)
MODE_INDEX_BITS = np.array([0, 10, 9, 9, 9], dtype=np.int64)
#: MODE_LARGE_OK[mode, level]: whether PS=1 maps a page at that level (1-based levels)
MODE_LARGE_OK = np.zeros((5, 6), dtype=np.bool_)
MODE_LARGE_OK[MODE_32, 2] = True  # 4M, only when CR4.PSE=1 (checked by the walker)
MODE_LARGE_OK[MODE_PAE, 2] = True  # 2M
MODE_LARGE_OK[MODE_4LEVEL, 2] = True  # 2M
MODE_LARGE_OK[MODE_4LEVEL, 3] = True  # 1G
MODE_LARGE_OK[MODE_5LEVEL, 2] = True
MODE_LARGE_OK[MODE_5LEVEL, 3] = True
#: whether PK and NX exist in this format (32-bit paging has neither)
MODE_HAS_NX = np.array([False, False, True, True, True], dtype=np.bool_)
MODE_HAS_PKEYS = np.array([False, False, False, True, True], dtype=np.bool_)


def level_shift(mode: int, level: int) -> int:
    """Bit position of the lowest linear-address bit translated at `level`."""
    return PAGE_SHIFT + int(MODE_INDEX_BITS[mode]) * (level - 1)


def level_page_size(mode: int, level: int) -> int:
    return 1 << level_shift(mode, level)


# Control-register and EFER bits the walker depends on (SDM 2.5, 2.2.1).
CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_LA57 = 1 << 12
CR4_PCIDE = 1 << 17  # process-context identifiers (SDM 4.10.1): CR3[11:0] is the PCID
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_AC = 1 << 18
CR3_PCID_MASK = 0xFFF
CR3_PCID_NOFLUSH = 1 << 63  # MOV to CR3 with CR4.PCIDE=1: keep the new PCID's entries


def paging_mode(cr0: int, cr4: int, efer: int) -> int:
    """The paging mode selected by CR0.PG, CR4.PAE, EFER.LMA and CR4.LA57 (SDM table 4-1)."""
    if not cr0 & CR0_PG:
        return MODE_NONE
    if not cr4 & CR4_PAE:
        return MODE_32
    if not efer & EFER_LMA:
        return MODE_PAE
    return MODE_5LEVEL if cr4 & CR4_LA57 else MODE_4LEVEL


def cr3_table_mask(mode: int, maxphyaddr: int) -> int:
    """Mask that extracts the root table's physical address from CR3."""
    if mode == MODE_32:
        return 0xFFFFF000
    if mode == MODE_PAE:
        return 0xFFFFFFE0  # 32-byte aligned PDPT
    return ((1 << maxphyaddr) - 1) & PAGE_MASK


# PDPTE registers (PAE): P is the only permission-like bit; bits 2:1, 8:5 and 63:MAXPHYADDR
# are reserved (SDM table 4-8), so a PDPTE never restricts access.
PDPTE_RSVD_LOW = 0b1_1110_0110


def make_pte(addr: int, flags: int, mode: int = MODE_4LEVEL) -> int:
    """Compose an entry from a physical address and flag bits (no validation: tests need bad ones)."""
    del mode
    return (addr & PAGE_MASK & ((1 << 52) - 1)) | flags
