"""x86 architecture facts: the single home of bit layouts (guest PTEs, EPT, SPTEs, error codes).

No other module of the project spells one of these numbers.
"""

from mmu_core.arch.x86 import ept, errcode, paging

__all__ = ["ept", "errcode", "paging"]
