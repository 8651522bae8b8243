"""Seeded protocol mutants: deliberate bugs, each switchable on, that the race explorer must
catch (issue: "Concurrency you can trust").

A mutant is a named check at one place in the core or an in-tree backend (`if
mutants.on("name"):` takes the buggy path). None is on unless enabled, in tests and in `mmu
explore --mutant NAME`, so the check costs one set lookup. The registry says what each bug
breaks; docs/concurrency.md carries the table of schedules needed to catch each.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mmu_core.errors import InvalidConfig

#: name -> (what the bug does, where it lives)
REGISTRY: dict[str, tuple[str, str]] = {
    "invalidate-pcid-keeps-prev-roots": (
        "a MOV CR3 without the no-flush bit or an INVPCID single-context leaves the cached "
        "previous roots of that PCID (kvm_invalidate_pcid), so a later no-flush switch "
        "reuses one whose unsync pages the guest has invalidated since",
        "core: Vcpu._invalidate_pcid"),
    "invpcid-gva-not-reaching-mmu": (
        "INVPCID individual-address under shadow paging flushes the hardware TLB only: the "
        "unsync shadow entry for the address is not resynced (kvm_mmu_invpcid_gva)",
        "core: Vcpu._invpcid"),
    "nested-zap-skipped": (
        "an MMU-notifier zap of L1 gfns leaves the EPT02 leaves that map them (nested EPT)",
        "shadow: NestedMixin.mmu_nested_zap_gfn_range"),
    "nested-skip-ept12-recheck": (
        "a nested fault installs its EPT02 leaf without checking that the EPT12 entries its "
        "walk read are unchanged (FNAME(gpte_changed))",
        "shadow: NestedMixin._ept12_changed"),
    "nested-unsync-never-synced": (
        "unsync EPT02 pages are never synced (not on INVEPT, not when a guest-mode root is "
        "loaded): EPT02 keeps what EPT12 mapped before L1's unexited stores",
        "shadow: NestedMixin._sync_ept02"),
    "nested-ept12-write-ignored": (
        "L1's store to a shadowed EPT12 entry does not zap the EPT02 leaves built through it",
        "shadow: NestedMixin.mmu_nested_ept12_write"),
    "tdp-wrprot-gfn-skipped": (
        "the TDP MMU does not write-protect L1's mapping of a gfn the nested shadow MMU starts "
        "to shadow or syncs (kvm_tdp_mmu_write_protect_gfn): L1 writes an in-sync EPT12 table "
        "without L0 noticing",
        "tdp: TdpMMU.mmu_write_protect_gfn"),
    "populate-no-recheck": (
        "gfn_to_pfn populates a missing page without looking again after its switch point",
        "core: VM.gfn_to_pfn"),
    "smm-keeps-root": (
        "entering or leaving SMM keeps the MMU context (no kvm_mmu_reset_context): the vCPU "
        "goes on with the other address space's root", "core: Vcpu._smm_changed"),
    "notifier-skips-smm": (
        "an MMU-notifier invalidation zaps only address space 0, not SMM's alias of the "
        "same host pages", "core: VM.invalidate_range_start"),
    "skip-invalidate-retry": (
        "a fault ignores MMU-notifier invalidations in progress and sequence changes",
        "core: VM.mmu_invalidate_retry_gfn"),
    "no-flush-after-zap": (
        "a notifier zap does not flush remote TLBs before the host frees the pages",
        "core: VM.invalidate_range_start"),
    "free-without-rcu": (
        "disconnected TDP tables are freed at once instead of after an RCU grace period",
        "tdp: TdpMMU._free_later"),
    "plain-write-not-cmpxchg": (
        "the TDP fault links a new table with a plain store instead of cmpxchg",
        "tdp: TdpMMU._link_table"),
    "skip-frozen-wait": (
        "handle_removed_pt does not wait for a frozen child entry to settle (not reachable: "
        "no task freezes an entry of a live table that a read-lock teardown can remove at "
        "2 MiB; docs/concurrency.md)",
        "tdp: TdpMMU._handle_removed"),
    "drop-root-refcount": (
        "loading a TDP root does not take a reference",
        "tdp: TdpMMU.mmu_load"),
    "writable-read-fault-logging": (
        "a read fault in a dirty-logged slot maps the page writable without marking it dirty",
        "tdp: TdpMMU._map_target"),
    "skip-mark-dirty": (
        "a write fault in a dirty-logged slot does not mark the page dirty",
        "tdp and shadow: the fault paths"),
    "memslot-update-no-srcu-sync": (
        "installing new memslots does not wait for an SRCU grace period, so a fault that "
        "resolved against the old ones may still be installing what it found",
        "core: VM._install_memslots"),
    "memslot-zap-after-install": (
        "delete and move install the final memslots first and zap after (no invalid step)",
        "core: VM.delete_memslot / move_memslot"),
    "mmio-generation-at-install": (
        "an MMIO SPTE takes the memslots generation current when it is installed, not the one "
        "the fault resolved against", "tdp: TdpMMU._map_target"),
    "skip-gpte-recheck": (
        "the shadow fault does not re-check the guest PTEs under the lock (gpte_changed)",
        "shadow: ShadowMMU._gptes_changed"),
    "no-write-protect-shadowed": (
        "a newly shadowed guest table is not write-protected",
        "shadow: ShadowMMU._get_sp"),
    "forget-rmap-removal": (
        "overwriting a shadow leaf keeps its old rmap entry",
        "shadow: ShadowMMU._drop_leaf"),
    "shadow-readonly-writable": (
        "the shadow fault maps a READONLY slot writable once the guest PTE is dirty",
        "shadow: ShadowMMU._shadow_fault"),
    # The complete TDP MMU (#7): fast page fault, dirty logging, splitting, recovery, NX.
    "fast-pf-no-mark-dirty": (
        "the fast page fault makes a write-protected SPTE writable without mark_page_dirty",
        "tdp and legacy: fastpf.fast_pf_fix_direct_spte"),
    "fast-pf-ignores-mmu-writable": (
        "the fast page fault makes any write-protected SPTE writable, not only MMU-writable "
        "ones (READONLY slots, KSM pages)", "tdp and legacy: fastpf.fast_page_fault"),
    "clear-dirty-log-no-flush": (
        "re-protecting harvested pages (D bits cleared or write-protected) does not flush "
        "TLBs: writes through cached translations go unlogged",
        "tdp: DirtyLogging.mmu_clear_dirty_log"),
    "split-plain-store": (
        "splitting a huge page (eager or on fault) links the new table with a plain store "
        "instead of cmpxchg", "tdp: TdpMMU._link_table"),
    "recover-ignores-host-level": (
        "recovering huge pages when logging stops does not check the host mapping level",
        "tdp: HugePages._recover_one"),
    "nx-tracking-kept": (
        "tearing down a table does not remove it from the NX huge-page recovery list",
        "tdp: TdpMMU._handle_removed; legacy: ShadowMMU._prepare_zap"),
    # The complete shadow MMU (#8): unsync pages and their sync, reclaim.
    "invlpg-no-sync": (
        "INVLPG does not resync the entry of an unsync shadow page",
        "shadow: ShadowMMU._invalidate_addr"),
    "sync-roots-skipped": (
        "KVM_REQ_MMU_SYNC (mmu_sync_roots) does nothing: a CR3 load that reuses a root "
        "leaves its unsync pages stale", "shadow: ShadowMMU.mmu_sync_roots"),
    "unsync-no-mark-parents": (
        "unsyncing a shadow page does not mark its parents (kvm_mmu_mark_parents_unsync)",
        "shadow: SyncMixin._unsync_page"),
    "sync-no-write-protect": (
        "mmu_sync_children syncs unsync pages without write-protecting their gfns first",
        "shadow: SyncMixin._sync_children"),
    "reclaim-no-flush": (
        "reclaiming the oldest shadow pages frees them without the remote TLB flush of "
        "kvm_mmu_commit_zap_page", "shadow: PagesMixin._zap_oldest"),
    # Eager page splitting and dirty logging in the shadow MMU (#8).
    "shadow-split-no-rmap": (
        "eager splitting in the shadow MMU installs the 4K leaves without their rmap entries",
        "shadow: split._split_one"),
    "shadow-dirty-log-no-wrprot": (
        "enabling dirty logging without PML leaves the slot's shadow-MMU leaves writable",
        "shadow: split.enable_dirty_log"),
    "lockless-walk-no-wait": (
        "committing zapped shadow pages frees them without waiting for the vCPUs in a "
        "lockless walk (the legacy MMU's fast page fault) that began before the flush",
        "shadow: fastpf.LocklessWalks.wait"),
    "recover-keeps-rmap": (
        "recovering huge pages when dirty logging stops clears the collapsible 4K leaves "
        "without taking them out of their rmaps", "shadow: recover.recover_huge_pages"),
    "direct-prefetch-logged-slot": (
        "the legacy MMU's prefetch maps neighbours of a fault writable in a dirty-logged slot "
        "(gfn_to_memslot_dirty_bitmap's refusal skipped): writes to them go unlogged",
        "shadow: direct_prefetch._prefetch_many"),
    "fast-zap-no-kick": (
        "the fast zap frees the obsolete shadow pages without the remote flush that waits "
        "for vCPUs in a lockless walk (kvm_zap_obsolete_pages's kvm_mmu_commit_zap_page)",
        "shadow: fastzap._zap_obsolete_pages"),
    "access-track-not-present": (
        "marking an SPTE for access tracking clears its MMU-present bit too (as when presence "
        "was read from RWX): its rmap entry then names an SPTE that is not present",
        "shadow: aging.Aging._aged"),
}

_active: frozenset[str] = frozenset()


def on(name: str) -> bool:
    """Whether mutant `name` is switched on (the buggy path is taken)."""
    return name in _active


def active() -> frozenset[str]:
    return _active


def validate(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise InvalidConfig("mutant", f"unknown mutant {unknown[0]!r} (one of: "
                            f"{', '.join(sorted(REGISTRY))})")
    return tuple(names)


@contextmanager
def enabled(*names: str) -> Iterator[None]:
    """Switch mutants on for the duration of a with-block (nesting adds)."""
    global _active
    validate(names)
    saved = _active
    _active = saved | frozenset(names)
    try:
        yield
    finally:
        _active = saved


@contextmanager
def disabled() -> Iterator[None]:
    """Switch every mutant off for the duration of a with-block (e.g. to calibrate)."""
    global _active
    saved = _active
    _active = frozenset()
    try:
        yield
    finally:
        _active = saved
