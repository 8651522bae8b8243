"""Shadow-page roles and keys: which shadow page shadows which guest table.

KVM keys shadow pages by (gfn, role) (kvm_mmu_page_role: level, direct, quadrant, access,
cr0_wp, smep_andnot_wp, smap_andnot_wp, efer_nx, smm, ...). Shadow tables here are always
4-level (5-level for LA57 guests) with 512 entries, so a shadow page at level L covers a
linear region of 2**(12+9L) bytes, and it shadows the smallest guest table whose region
contains it; `quadrant` says which part (32-bit tables cover 4 MiB/4 GiB, larger than one
shadow page). Levels above the guest's top table are `special` keys (for PAE and 32-bit
guests the vCPU's own pml4_root/pae_root pages stand in for them, pages.VcpuRoots), below a guest
huge page they are direct pages keyed by the gfn they map, and a nonpaging guest is direct
throughout: all as KVM does it.
"""

from __future__ import annotations

from typing import NamedTuple

from mmu_core.arch.x86 import paging as P

ACC_USER = 1
ACC_WRITE = 2
ACC_EXEC = 4
ACC_ALL = ACC_USER | ACC_WRITE | ACC_EXEC


class Role(NamedTuple):
    """kvm_mmu_page_role: every field that changes how a page's SPTEs are built, so pages
    built for different contexts are never shared (mmu_internal.h, spte.h)."""

    level: int
    direct: bool
    quadrant: int
    access: int
    paging_mode: int  # the guest's paging mode (KVM: has_4_byte_gpte, and the root level)
    guest_level: int  # the guest table level shadowed (0: direct or special)
    special: bool  # a root above the guest's top table (keyed by CR3)
    cr0_wp: bool
    efer_nx: bool
    smep_andnot_wp: bool
    smap_andnot_wp: bool
    as_id: int  # KVM: role.smm
    # A/D bits unavailable in these SPTEs (KVM: role.ad_disabled, set for TDP without EPT
    # A/D; shadow paging always has them). Constant per VM here, in the role as in KVM.
    ad_disabled: bool = False
    # KVM: role.guest_mode, a page built for an L2 guest: the EPT02 pages of nested EPT
    # (nested.py), keyed apart from L1's pages.
    guest_mode: bool = False
    # KVM: role.passthrough, a page above the guest's top level that shadows no guest table
    # (nested NPT with a PAE L1). Not built yet (item 7); shadow paging's equivalent here is
    # `special`.
    passthrough: bool = False
    # KVM: role.invalid, set by kvm_mmu_prepare_zap_page on a root that vCPUs still hold; an
    # invalid page is out of the hash and freed when its last reference goes.
    invalid: bool = False


class Key(NamedTuple):
    gfn: int
    role: Role


def shadow_region_bits(level: int) -> int:
    """log2 of the linear region one shadow page at `level` covers."""
    return 12 + 9 * level


def guest_region_bits(mode: int, level: int) -> int:
    """log2 of the linear region one guest table at `level` covers."""
    if mode == P.MODE_PAE and level == 3:
        return 32
    return 12 + int(P.MODE_INDEX_BITS[mode]) * level


def guest_entry_bits(mode: int, level: int) -> int:
    """log2 of the linear region one entry of a guest table at `level` covers."""
    return 12 + int(P.MODE_INDEX_BITS[mode]) * (level - 1)


class Context(NamedTuple):
    """What of the vCPU's state decides roles (the part of kvm_mmu_role that matters here)."""

    mode: int
    cr3: int
    cr0_wp: bool
    efer_nx: bool
    smep: bool
    smap: bool
    as_id: int
    ad_disabled: bool = False


def make_role(ctx: Context, level: int, *, direct: bool, quadrant: int = 0, access: int = ACC_ALL,
              guest_level: int = 0, special: bool = False) -> Role:
    return Role(
        level=level, direct=direct, quadrant=quadrant, access=access, paging_mode=ctx.mode,
        guest_level=guest_level, special=special, cr0_wp=ctx.cr0_wp, efer_nx=ctx.efer_nx,
        smep_andnot_wp=ctx.smep and not ctx.cr0_wp, smap_andnot_wp=ctx.smap and not ctx.cr0_wp,
        as_id=ctx.as_id, ad_disabled=ctx.ad_disabled,
    )


def pte_access(pte: int, mode: int, efer_nx: bool) -> int:
    acc = 0
    if pte & P.PT_USER:
        acc |= ACC_USER
    if pte & P.PT_WRITABLE:
        acc |= ACC_WRITE
    if not (P.MODE_HAS_NX[mode] and efer_nx and pte & P.PT_NX):
        acc |= ACC_EXEC
    return acc


def chain_keys(ctx: Context, root_level: int, gva: int, tables: list[int], ptes: list[int],
               leaf_level: int, gpa: int) -> list[Key]:
    """Keys of the shadow pages from the root (index 0, level root_level) down to level 1.

    `tables`/`ptes` are the guest walk's entries, top level first (gpa of each entry read and
    its value); `leaf_level` is the guest level of the leaf; `gpa` the final address.
    """
    mode = ctx.mode
    glevels = int(P.MODE_LEVELS[mode])
    # accumulated access above each guest level, and the gfn of each guest table
    table_gfn: dict[int, int] = {}
    acc_above: dict[int, int] = {}
    acc = ACC_ALL
    for i, (tgpa, pte) in enumerate(zip(tables, ptes, strict=True)):
        glevel = glevels - i
        table_gfn[glevel] = tgpa >> 12
        acc_above[glevel] = acc
        if not (mode == P.MODE_PAE and glevel == 3):  # PDPTEs carry no permissions
            acc &= pte_access(pte, mode, ctx.efer_nx)
    keys: list[Key] = []
    for level in range(root_level, 0, -1):
        sbits = shadow_region_bits(level)
        if mode == P.MODE_NONE:
            gfn = (gva >> 12) & ~((1 << (9 * level)) - 1)
            keys.append(Key(gfn, make_role(ctx, level, direct=True)))
            continue
        if level < leaf_level or (leaf_level > 1 and sbits <= guest_entry_bits(mode, leaf_level)):
            # below a guest huge page: a direct page for the gfns it maps
            gfn = (gpa >> 12) & ~((1 << (9 * level)) - 1)
            keys.append(Key(gfn, make_role(ctx, level, direct=True, access=acc)))
            continue
        shadowed = None
        for glevel in range(1, glevels + 1):
            if guest_region_bits(mode, glevel) >= sbits and glevel in table_gfn:
                shadowed = glevel
                break
        if shadowed is None or (mode == P.MODE_PAE and shadowed == 3):
            gfn = ctx.cr3 >> 12
            keys.append(Key(gfn, make_role(ctx, level, direct=False, special=True)))
            continue
        q_bits = guest_region_bits(mode, shadowed) - sbits
        quadrant = (gva >> sbits) & ((1 << q_bits) - 1) if q_bits > 0 else 0
        keys.append(Key(table_gfn[shadowed], make_role(
            ctx, level, direct=False, quadrant=quadrant, access=acc_above[shadowed],
            guest_level=shadowed)))
    return keys


def root_key(ctx: Context, root_level: int) -> Key:
    """The root shadow page for a context, before any walk (KVM: mmu_alloc_shadow_roots)."""
    mode = ctx.mode
    if mode == P.MODE_NONE:
        return Key(0, make_role(ctx, root_level, direct=True))
    glevels = int(P.MODE_LEVELS[mode])
    if glevels == root_level and mode != P.MODE_PAE:
        return Key(ctx.cr3 >> 12, make_role(ctx, root_level, direct=False, guest_level=glevels))
    return Key(ctx.cr3 >> 12, make_role(ctx, root_level, direct=False, special=True))


def affected_indices(role: Role, offset: int, nbytes: int) -> range:
    """Indices of the SPTEs of a shadow page that depend on guest bytes [offset, offset+n) of
    the guest table it shadows (KVM: kvm_mmu_pte_write's get_written_sptes)."""
    mode = role.paging_mode
    esize = int(P.MODE_ENTRY_BYTES[mode])
    first_e = offset // esize
    last_e = (offset + nbytes - 1) // esize
    ebits = guest_entry_bits(mode, role.guest_level)
    sbits = shadow_region_bits(role.level)
    base = role.quadrant << sbits  # start of this shadow page inside the guest table's region
    lo = (first_e << ebits) - base
    hi = ((last_e + 1) << ebits) - base
    lo = max(lo, 0)
    hi = min(hi, 1 << sbits)
    if lo >= hi:
        return range(0)
    child_bits = shadow_region_bits(role.level - 1)
    return range(lo >> child_bits, ((hi - 1) >> child_bits) + 1)
