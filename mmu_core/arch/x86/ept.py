"""EPT paging-structure entries and EPT-violation exit qualifications.

Sources: Intel SDM vol. 3C, 29.3.2 (EPT translation, tables 29-1..29-6), 29.3.3.1 (EPT
misconfigurations), 29.3.3.2 (EPT violations), table 28-7 (exit qualification for EPT
violations).
"""

from __future__ import annotations

EPT_READ = 1 << 0
EPT_WRITE = 1 << 1
EPT_EXEC = 1 << 2  # supervisor-mode execute when mode-based execute control is on
EPT_RWX = EPT_READ | EPT_WRITE | EPT_EXEC
EPT_MT_SHIFT = 3  # memory type, bits 5:3 of a leaf
EPT_MT_MASK = 0x7 << EPT_MT_SHIFT
EPT_MT_UC = 0
EPT_MT_WB = 6
EPT_IGNORE_PAT = 1 << 6
EPT_LARGE = 1 << 7  # in an EPT PDE (2M) or PDPTE (1G)
EPT_ACCESSED = 1 << 8
EPT_DIRTY = 1 << 9
EPT_USER_EXEC = 1 << 10
EPT_SUPPRESS_VE = 1 << 63

#: memory types that are a misconfiguration in a leaf (SDM 29.3.3.1): 2, 3 and 7
EPT_BAD_MEMTYPES = (2, 3, 7)

EPT_LEVELS_4 = 4
EPT_LEVELS_5 = 5

# Exit qualification for EPT violations (SDM table 28-7).
EPT_QUAL_READ = 1 << 0
EPT_QUAL_WRITE = 1 << 1
EPT_QUAL_FETCH = 1 << 2
EPT_QUAL_READABLE = 1 << 3  # bits 5:3 report the AND of R/W/X over the walked entries
EPT_QUAL_WRITABLE = 1 << 4
EPT_QUAL_EXECUTABLE = 1 << 5
EPT_QUAL_PERM_SHIFT = 3
EPT_QUAL_GLA_VALID = 1 << 7
EPT_QUAL_GLA_FINAL = 1 << 8  # 1: access to the translated address; 0: to a guest PT entry
