"""The same accesses on QEMU's softmmu, through Unicorn (the `bench` extra): a pointer chase.

x86-64 with 4-level paging: the data pages sit at hot_paths.DATA_GVA, mapped 4K each by the
same 4-level tables (identity-mapped code page aside), and each page holds the linear address
of the next page of the random cyclic order hot_paths uses at the same offset. The guest code
is the chase itself:

    loop: mov rax, [rax + 0x10]     ; the next page
          dec rcx
          jnz loop

so every iteration is one data read, through QEMU's software TLB (256 entries unless a flush
resizes it; none happens during a run) and, on a miss, its page walk (tlb_fill ->
get_physical_address). Figures are nanoseconds per iteration, loop included, on the
benchmarking thread's CPU time (best of `repeat`), as hot_paths measures ours.
"""

from __future__ import annotations

import struct

import hot_paths as H

try:
    import unicorn
    from unicorn import x86_const as X
except ImportError:  # the optional `bench` extra
    unicorn = None

MISSING = "Unicorn is not installed (pip install -e '.[bench]'): QEMU side skipped"
CODE_VA = 0x10_0000  # identity-mapped code page
PT_BASE = 0x20_0000  # page-table pages from here (physical)
DATA_PA = 0x1000_0000
CHASE = bytes.fromhex("488b4010" "48ffc9" "75f7")  # mov rax,[rax+0x10]; dec rcx; jnz loop
EFER = 0xC000_0080
PTE = 0x63  # P, RW, A, D (upper entries get P, RW, A)


def available() -> bool:
    return unicorn is not None


class Chase:
    """A Unicorn x86-64 machine with `npages` chained data pages under 4-level paging."""

    def __init__(self, npages: int, seed: int = 12) -> None:
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        self.uc = uc
        order = H._order(npages, seed)
        uc.mem_map(CODE_VA, 0x1000)
        uc.mem_write(CODE_VA, CHASE)
        uc.mem_map(DATA_PA, npages << 12)
        self.next_table = PT_BASE
        tables: dict[int, bytearray] = {}
        root = self._table(tables)

        def map_page(va: int, pa: int) -> None:
            table = root
            for level in (4, 3, 2):
                i = (va >> (12 + 9 * (level - 1))) & 511
                (e,) = struct.unpack_from("<Q", tables[table], 8 * i)
                if not e:
                    e = self._table(tables) | 0x23
                    struct.pack_into("<Q", tables[table], 8 * i, e)
                table = e & 0x000F_FFFF_FFFF_F000
            struct.pack_into("<Q", tables[table], 8 * ((va >> 12) & 511), pa | PTE)

        map_page(CODE_VA, CODE_VA)
        for k in range(npages):
            map_page(H.DATA_GVA + (k << 12), DATA_PA + (k << 12))
        nxt = order[1:] + order[:1]
        for k, n in zip(order, nxt, strict=True):
            uc.mem_write(DATA_PA + (k << 12) + 0x10, struct.pack("<Q", H.DATA_GVA + (n << 12)))
        uc.mem_map(PT_BASE, self.next_table - PT_BASE)
        for pa, t in tables.items():
            uc.mem_write(pa, bytes(t))
        uc.ctl_set_tlb_mode(unicorn.UC_TLB_CPU)  # QEMU's own TLB and page walker
        uc.reg_write(X.UC_X86_REG_CR3, root)
        uc.reg_write(X.UC_X86_REG_CR4, 0x20)  # PAE
        uc.msr_write(EFER, 0x500)  # LME, LMA
        uc.reg_write(X.UC_X86_REG_CR0, 0x8001_0001)  # PG, WP, PE
        self.start = H.DATA_GVA + (order[0] << 12)

    def _table(self, tables: dict[int, bytearray]) -> int:
        pa = self.next_table
        self.next_table += 0x1000
        tables[pa] = bytearray(0x1000)
        return pa

    def run(self, reads: int) -> int:
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_RAX, self.start)
        uc.reg_write(X.UC_X86_REG_RCX, reads)
        uc.emu_start(CODE_VA, CODE_VA + len(CHASE))
        return uc.reg_read(X.UC_X86_REG_RAX)


def ns_per_read(npages: int, reads: int, repeat: int = 5) -> float:
    chase = Chase(npages)
    expect = chase.run(npages)  # once round the cycle: back at the start
    assert expect == chase.start, (hex(expect), hex(chase.start))
    return H.best_of(lambda: chase.run(reads), repeat) / reads * 1e9


def tlb_hit_ns(repeat: int = 5) -> float:
    return ns_per_read(H.HIT_PAGES, H.HIT_READS, repeat)


def tlb_miss_ns(repeat: int = 5) -> float:
    return ns_per_read(H.MISS_PAGES, H.MISS_READS, repeat)
