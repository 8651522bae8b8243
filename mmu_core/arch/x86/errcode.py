"""Page-fault error codes (SDM vol. 3A, 4.7) and the exception vectors the model injects."""

from __future__ import annotations

PFERR_PRESENT = 1 << 0  # 0: non-present entry; 1: protection or reserved-bit violation
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_FETCH = 1 << 4  # only reported when CR4.SMEP=1 or (PAE paging and EFER.NXE=1)
PFERR_PK = 1 << 5

PF_VECTOR = 14
GP_VECTOR = 13
UD_VECTOR = 6  # invalid opcode (RSM outside SMM)

# Access kinds the walker is asked to perform; the user bit is separate (CPL=3).
ACC_READ = 0
ACC_WRITE = 1
ACC_FETCH = 2
