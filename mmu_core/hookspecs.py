"""The formal MMU interface: every hook a backend implements, and what the core promises.

This file is the plugin author's manual. ``mmu_core.backend`` exports every name a backend
needs and states the fault protocol step by step; ``docs/plugin-guide.md`` walks an author
from an empty directory to a conforming backend.

A backend is a class published under the entry-point group ``mmu_core.backends``; the core
instantiates it once per VM (``Backend(vm)``) and registers the instance in that VM's plugin
manager for each MMU role it serves, so ``self`` holds the backend's per-VM state (roots,
caches, statistics), as ``struct kvm_arch`` does. The core calls every hook specified here
(tests/test_manual.py checks it); the observer hooks at the end are called by backends too.
Unsync shadow pages have ``mmu_sync_roots`` (KVM_REQ_MMU_SYNC) beside ``mmu_invlpg``; the
page limit and reclaim have ``mmu_set_nr_mmu_pages`` (KVM_SET_NR_MMU_PAGES) and
``mmu_shrink_scan`` (the MMU shrinker); docs/shadow.md says how the shadow backend uses them.

Conventions for every hook:

* Hooks sit at coarse boundaries: one fault, one range operation, one lifecycle event. Nothing
  here is called per guest access or inside a walk; loops over SPTEs belong in jitted code.
* "Lock" means ``vm.mmu_lock``, an ``RWLock`` of the engine. The core never takes it for a
  backend: each hook says whether the *backend* must take it, and in which mode. Taking it is
  a switch point; so are ``vm.spte_*`` atomic operations, RCU read sections and remote TLB
  flushes. Code between switch points runs without interference.
* The hardware (``mmu_core.hw``) walks what backends build. A backend never answers "what does
  this address translate to" for the guest; a wrong table is caught by the walker.
* Required hooks are marked *required*; a backend missing one fails validation at discovery,
  and so does one that declares a capability whose hook it lacks (see Capabilities below).

What a backend finds on the VM and the vCPU (every signature here is checked by a test):

* ``vm.engine``, the virtual-time engine: ``vm.engine.delay(ns)`` charges work (a switch
  point), ``vm.engine.yield_now()`` is cpu_relax() in a spin or retry loop, and
  ``vm.engine.cost`` holds the cost model's figures (``vm.engine.cost.spte_build``, ...).
* ``vm.mmu_lock``, the MMU lock: ``with vm.mmu_lock.read():`` or ``with vm.mmu_lock.write():``;
  long range operations poll ``vm.mmu_lock.contended`` and call
  ``vm.mmu_lock.cond_resched(mode)`` (after flushing what they zapped).
* ``vm.rcu``: ``with vm.rcu.read():`` around lockless walks, ``vm.rcu.call_rcu(fn, *args)``
  for frees after a grace period, ``vm.rcu.barrier()`` at teardown.
* ``vm.observe``: the observers' hooks, called with keywords:
  ``vm.observe.mmu_on_root_alloc(vm, as_id, role, root)`` and
  ``vm.observe.mmu_on_root_free(vm, as_id, role, root)``.
* ``vm.host``, host memory: jitted code reads a table as ``vm.host.pt[vm.host.pt_slot[pfn]]``.
* ``vm.memslots``: ``vm.memslots[as_id]`` holds one address space's slots (``.slots``,
  ``.find(gfn)``); also ``vm.vcpus``, ``vm.role`` (the VM's ``Role``) and ``vm.config``.
* Memory: ``vm.gfn_to_pfn(as_id, gfn, write)`` (a ``HostPfn``, or None outside every memslot),
  ``vm.gfn_to_memslot(as_id, gfn)``, ``vm.max_mapping_level(slot, gfn, host_level,
  max_level)``, ``vm.host_writable(hva)``, ``vm.read_guest_u64(as_id, gpa)``.
* Table pages: ``vm.alloc_pt_page()``, ``vm.free_pt_page(pfn)``, ``vm.pt_pages_in_use()``,
  ``vm.root_levels(vcpu)``. SPTEs: ``vm.spte_read(pfn, idx)``, ``vm.spte_cmpxchg(pfn, idx,
  old, new)``, ``vm.spte_xchg(pfn, idx, new)``, ``vm.spte_write(pfn, idx, new)``, and
  ``vm.spte_table(pfn)``, the raw row (no switch point, no cost).
* Flushes and dirty logging: ``vm.flush_remote_tlbs()``, ``vm.mark_page_dirty(as_id, gfn)``,
  ``vm.collecting_dirty(as_id, gfn)``.
* MMIO and invalidation: ``vm.memslots_generation()``, ``vm.mmu_invalidate_seq``,
  ``vm.mmu_invalidate_retry_gfn(mmu_seq, as_id, gfn)``, ``vm.invalidating_gfn(as_id, gfn)``.
* Write tracking (shadow paging): ``vm.track_gfn(as_id, gfn)``, ``vm.untrack_gfn(as_id,
  gfn)``, ``vm.is_tracked(as_id, gfn)``, ``vm.track_write_in_flight(as_id, gfn)``,
  ``vm.disallow_lpage(as_id, gfn)``, ``vm.allow_lpage(as_id, gfn)`` (no huge page over a
  shadowed gfn), ``vm.write_protect_gfn(as_id, gfn)`` (every backend of the VM drops W on
  it); for a direct-role backend beside one that shadows (nested EPT under the TDP MMU),
  ``vm.mmu_try_to_unsync_pages(as_id, gfn)`` before it maps a gfn writable.
* On a vCPU: ``vcpu.id``, ``vcpu.as_id`` (1 in SMM), ``vcpu.mode`` (the guest's paging
  mode), ``vcpu.mmu_root`` (the root pfn the hardware walks, or None) and
  ``vcpu.make_request(req)`` with ``REQ_MMU_RELOAD`` (drop the root before the next entry) or
  ``REQ_TLB_FLUSH``.

The contracts (the conformance suite, ``mmu_core.testing``, holds a backend to each):

* Invalidation retry. An MMU notifier (the host unmapping, migrating, swapping or merging a
  page) or a memslot update may run while a fault sleeps in ``vm.gfn_to_pfn``. A fault
  therefore reads ``seq = vm.mmu_invalidate_seq`` *before* ``vm.gfn_to_pfn`` and, once it
  holds ``vm.mmu_lock`` (either mode) and before it installs anything, returns ``Ret.RETRY``
  when ``vm.mmu_invalidate_retry_gfn(seq, as_id, gfn)`` is True (KVM:
  mmu_invalidate_retry_gfn). A backend that skips this maps a pfn the host has taken away.
* Writable policy. A leaf SPTE may be writable only if ``HostPfn.writable`` is True (else the
  host page is copy-on-write or KSM-shared), its slot is not READONLY and, in a slot with
  dirty logging (``slot.log_dirty``), the fault is a write (the model's rule, so that logs are
  comparable: docs/design.md). Shadow paging adds the guest's W and D bits and write
  tracking. A write to a READONLY slot installs nothing: set ``fault.mmio = True`` and return
  ``Ret.EMULATE`` (KVM exits to userspace).
* Dirty marking. The backend calls ``vm.mark_page_dirty(as_id, gfn)`` before it installs a
  writable SPTE in a logged slot, as KVM's make_spte does: once the SPTE is visible the guest
  writes without another exit. The core marks what it writes itself (emulated writes, A/D bits
  its software walks set); a backend that walks guest tables in software marks the tables
  whose A/D bits its walk set. ``vm.max_mapping_level`` never allows a huge page in a logged
  slot, so a fault marks one gfn.
* Flushing. Range hooks (``mmu_zap_gfn_range``, ``mmu_zap_all``, ``mmu_unmap_gfn_range``,
  ``mmu_enable_dirty_log``, ``mmu_clear_dirty_log``) return True when TLBs must be flushed,
  and the core flushes once (``vm.flush_remote_tlbs()``) before the host reuses the pages. A
  backend flushes itself where it cannot leave it to the caller: when a fault replaces a
  present SPTE, and before it frees a table page that a walker or a vCPU's paging-structure
  cache may still hold (and, if its walkers are lockless, frees it after an RCU grace period).
* MMIO. A gfn outside every memslot is MMIO. A backend that caches MMIO
  (``Capabilities.mmio_spte``) installs ``make_mmio_spte(gfn, access, gen, ept)`` with the
  ``gen = vm.memslots_generation()`` it read together with ``vm.mmu_invalidate_seq``, before
  ``gfn_to_pfn`` (the memslots it resolved against, as KVM's kvm_vcpu_memslots()->generation;
  a generation read at install time would hide a slot created in between). An MMIO SPTE whose
  ``get_mmio_spte_generation`` differs from ``vm.memslots_generation() & MMIO_SPTE_GEN_MASK``
  is stale and treated as absent.
* Teardown. After ``mmu_destroy_vm`` every page-table page is freed; the core checks leaks.
* Capabilities. ``BackendInfo.capabilities`` (``types.Capabilities``) declares what a backend
  offers beyond the required hooks: the lock mode its faults take, huge pages, MMIO SPTEs, how
  it re-protects for dirty logging, aging (``mmu_age_gfn_range``), a fast path
  (``mmu_fast_page_fault``), an audit (``mmu_audit``) and the deepest root it builds. The
  conformance suite requires what is declared and skips what is not; ``mmu backends`` shows
  them.
* Audit. ``mmu_audit`` lets the invariant audit (``mmu_core.testing.audit``) and the race
  explorer check a backend after every engine step; optional for running VMs.
* Statistics. ``mmu_stats`` returns a frozen ``types.MMUStats``; a report shows zeros, and
  says so, for a backend without it.
"""

from __future__ import annotations

import pluggy

PROJECT = "mmu_core"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

REQUIRED = (
    "mmu_backend_info",
    "mmu_init_vm",
    "mmu_destroy_vm",
    "mmu_load",
    "mmu_page_fault",
    "mmu_zap_gfn_range",
    "mmu_zap_all",
    "mmu_memory",
)


# --- identity -------------------------------------------------------------------------------
@hookspec(firstresult=True)
def mmu_backend_info():
    """*Required.* Return a ``BackendInfo``: name, version, the ``Role``s served, one line.

    Called at discovery and by ``mmu backends``; must not depend on a VM.
    """


# --- lifecycle (KVM: kvm_mmu_init_vm, kvm_mmu_create, kvm_mmu_load/unload, ...) -------------
@hookspec
def mmu_init_vm(vm):
    """*Required.* The VM was created (memslots not yet populated). No lock held, no task.

    Allocate per-VM state. After this the backend must accept every other hook.
    """


@hookspec
def mmu_destroy_vm(vm):
    """*Required.* The VM is being destroyed; every vCPU has stopped. No task, no lock.

    Afterwards every page-table page the backend allocated is freed (``vm.free_pt_page``),
    RCU callbacks included (use ``vm.rcu.barrier()``): the core checks for leaks.
    """


@hookspec
def mmu_init_vcpu(vcpu):
    """A vCPU was created (before it first runs). No lock. Optional: for per-vCPU state
    (neither in-tree backend keeps any here)."""


@hookspec
def mmu_load(vcpu):
    """*Required.* Make ``vcpu.mmu_root`` (a pfn) the root the hardware walks, for the vCPU's
    current role and address space (``vcpu.as_id``). Called from the vCPU's task before entry
    when ``vcpu.mmu_root`` is ``None`` (first run, after ``mmu_unload`` or a reload request).
    Take the lock as the backend needs (KVM's TDP MMU: read for a root lookup, write to
    allocate one; the shadow MMU: write).
    """


@hookspec
def mmu_unload(vcpu):
    """Drop the vCPU's reference to its root (``vcpu.mmu_root = None`` afterwards)."""


@hookspec
def mmu_reset_context(vcpu):
    """CR0.PG/WP, CR4.PAE/PSE/SMEP/SMAP/PKE/LA57 or EFER.NXE/LMA changed (KVM:
    kvm_init_mmu). The role may have changed; the core unloads the root first and reloads it
    after. Shadow backends must not reuse shadow pages across incompatible roles.
    """


@hookspec
def mmu_new_cr3(vcpu, cr3):
    """MOV to CR3 (shadow paging intercepts it; with TDP it is never called): KVM's
    kvm_mmu_new_pgd. ``cr3`` is the new value with its PCID (CR3[11:0] while CR4.PCIDE=1)
    and without the no-flush bit. The core has set ``vcpu.mmu_root = None``; a backend that
    caches previous roots (KVM's prev_roots, fast_pgd_switch) may set it to a cached root
    for this ``cr3`` (PCID included) here, which the vCPU then uses as it is: no sync and no
    TLB flush unless the core asks for them. Otherwise ``mmu_load`` follows before the next
    entry, and the core flushes the TLB after it (kvm_mmu_load). Unless the guest set the
    no-flush bit, the core then invalidates the PCID: ``mmu_sync_roots`` before the next
    entry, a TLB flush, and ``mmu_invalidate_pcid`` when PCIDs are on.
    """


@hookspec
def mmu_invalidate_pcid(vcpu, pcid):
    """Shadow paging with CR4.PCIDE=1: the guest invalidated every non-global translation
    of ``pcid`` (a MOV CR3 without the no-flush bit, INVPCID single-context). KVM's
    kvm_invalidate_pcid frees the cached previous roots whose CR3 has that PCID, so that a
    later no-flush switch does not reuse them unsynced. No lock held.
    """


@hookspec
def mmu_invpcid_gva(vcpu, gva, pcid):
    """Shadow paging: INVPCID individual-address (kvm_mmu_invpcid_gva). Resync the entry for
    ``gva`` in the current root if ``pcid`` is the current PCID and in the previous roots
    whose CR3 has that PCID; roots not cached are synced when loaded. The core has flushed
    the hardware TLB's entries for ``gva``. No lock held.
    """


@hookspec
def mmu_sync_prev_roots(vcpu):
    """Shadow paging, KVM_REQ_TLB_FLUSH_GUEST (INVPCID all-context, a CR4.PGE toggle, CR4.PCIDE
    turned off): kvm_mmu_sync_prev_roots frees every cached previous root with unsync pages
    below it (the current one gets ``mmu_sync_roots``). No lock held.
    """


# --- faults ---------------------------------------------------------------------------------
@hookspec(firstresult=True)
def mmu_page_fault(vcpu, fault):
    """*Required.* Handle one fault (``types.PageFault``) and return a ``types.Ret``.

    Called from the vCPU's task, no lock held. Direct role: ``fault.gpa`` is the faulting
    guest-physical address (EPT violation or misconfiguration); shadow role: ``fault.gva``
    with the hardware's error code. The handler resolves gfn -> hva -> pfn with
    ``vm.gfn_to_pfn`` (which may block on a userfault: do it before taking the lock, as KVM's
    kvm_faultin_pfn does), then installs SPTEs with ``vm.spte_cmpxchg``/``vm.spte_write``,
    keeping the invalidation-retry, writable-policy and dirty-marking contracts above (the
    steps, in order, are in ``mmu_core.backend``).

    Return ``Ret.FIXED``/``SPURIOUS``/``RETRY`` to re-enter the guest, ``Ret.EMULATE`` to have
    the core emulate the access (write-tracked guest page tables; set ``fault.mmio`` for an
    address outside every memslot), or ``Ret.INJECT`` with ``fault.inject_error_code`` when
    the guest's own tables forbid the access. A gfn outside every memslot is MMIO: install an
    MMIO SPTE carrying the ``vm.memslots_generation()`` read before ``gfn_to_pfn`` so that
    later accesses exit as
    misconfigurations, and return ``Ret.EMULATE`` with ``fault.mmio = True``. An MMIO SPTE
    with a stale generation must be treated as absent. READONLY slots are never writable:
    a write to one is MMIO too (KVM exits to userspace).
    """


@hookspec(firstresult=True)
def mmu_fast_page_fault(vcpu, fault):
    """Optional lockless fast path (KVM's fast_page_fault). When a backend implements it, the
    core calls it for every fault, from the vCPU's task with no lock held, before
    ``mmu_page_fault`` and with the same ``fault``. Return ``None`` to fall through to
    ``mmu_page_fault``, or a ``Ret`` to finish the fault here (the core counts it as
    ``fast_<ret>`` in ``vcpu.faults``). It fixes what an existing SPTE lacks (a write
    permission the SPTE is MMU-writable for, an access-tracked SPTE) with ``vm.spte_cmpxchg``
    inside ``vm.rcu.read()``; it does not call ``vm.gfn_to_pfn`` or take the lock, and it
    keeps the writable policy and dirty marking as the slow path does.
    """


# --- guest page-table changes (shadow) -------------------------------------------------------
@hookspec
def mmu_track_write(vcpu, gpa, nbytes, new):
    """The core emulated a guest write of ``nbytes`` at ``gpa`` into a page the backend
    write-protected with ``vm.track_gfn`` (KVM: kvm_page_track_write -> kvm_mmu_pte_write).
    Called from the vCPU's task, no lock held; the new value is already in guest memory.
    Afterwards no SPTE may still reflect the overwritten guest entry.
    """


@hookspec
def mmu_write_protect_gfn(vm, as_id, gfn):
    """Clear W and MMU-writable in every leaf SPTE of this backend that maps ``gfn``, at any
    level (KVM: kvm_mmu_slot_gfn_write_protect with PG_LEVEL_4K: the rmaps and
    kvm_tdp_mmu_write_protect_gfn). The core calls it on every backend instance of the VM
    through ``vm.write_protect_gfn``, which the backend that shadows guest tables calls when
    a gfn becomes shadowed or an unsync page is synced, so that a TDP MMU serving L1 beside
    a shadow MMU serving nested roles keeps L1's mapping of an EPT12 table read-only too.
    The caller holds the lock for write. Return True if a writable SPTE lost W (the caller
    flushes). Optional: a backend that never maps a gfn some other backend shadows need not
    implement it.
    """


@hookspec(firstresult=True)
def mmu_try_to_unsync_pages(vm, as_id, gfn, can_unsync, prefetch):
    """May ``gfn`` be mapped writable? (KVM: mmu_try_to_unsync_pages, called by make_spte
    for every writable leaf.) False when it is write-tracked or shadowed by pages that may
    not go unsync (``can_unsync`` False, or ``prefetch``); else True, after marking its
    shadow pages unsync. The core calls it, through ``vm.mmu_try_to_unsync_pages``, on the
    backend instances other than the caller's: a direct-role backend (the TDP MMU) asks
    before it installs a writable leaf, and keeps the leaf read-only and not MMU-writable on
    False (a write fault then returns ``Ret.EMULATE``: RET_PF_WRITE_PROTECTED). The caller
    holds the lock (either mode); no switch point. Optional.
    """


@hookspec
def mmu_invlpg(vcpu, gva):
    """INVLPG (intercepted under shadow paging). The core has flushed the vCPU's TLB entry;
    the backend drops or resyncs the SPTE that shadowed gva. No lock held.
    """


@hookspec
def mmu_sync_roots(vcpu):
    """KVM_REQ_MMU_SYNC (kvm_mmu_sync_roots), shadow paging only: a backend that lets guest
    page tables go out of sync (unsync shadow pages) brings every one reachable from the
    vCPU's root back in sync. The core raises the request at MOV CR3 without the no-flush bit
    (the load invalidates every non-global translation of its PCID, kvm_invalidate_pcid), at
    INVPCID of the current PCID and at KVM_REQ_TLB_FLUSH_GUEST, and calls this
    hook from the vCPU's task before its next entry, once ``vcpu.mmu_root`` is loaded (after
    ``mmu_load`` when the load was due). No lock held.
    """


# --- memslots ---------------------------------------------------------------------------------
@hookspec
def mmu_memslot_changed(vm, as_id, old, new, change):
    """A memslot was created, deleted, moved or had its flags changed (``change`` is one of
    "create", "delete", "move", "flags"; ``old``/``new`` are ``Memslot`` or None). Called
    with no lock held, after the new generation is visible: for create and move at once,
    before the update's SRCU grace period and before any switch point, so metadata the
    backend allocates here exists before a fault can use the new slot (KVM allocates it in
    kvm_prepare_memory_region); for delete and flags after the update. For delete and move the core has
    already zapped the old range through ``mmu_zap_gfn_range`` and flushed (KVM:
    kvm_arch_flush_shadow_memslot); this hook is for the backend's own bookkeeping.
    """


# --- zap ---------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def mmu_zap_gfn_range(vm, as_id, start, end):
    """*Required.* Remove every SPTE mapping gfns [start, end) in address space ``as_id``.
    Called with no lock held (the backend takes it for write, or for read if its SPTE
    updates are atomic). Return True if TLBs must be flushed.
    """


@hookspec(firstresult=True)
def mmu_zap_all(vm):
    """*Required.* Drop every mapping (KVM: kvm_mmu_zap_all / the fast invalidate). Afterwards
    no root of the VM maps anything; vCPUs reload their roots. Returns True if a flush is due.
    """


# --- MMU notifiers ---------------------------------------------------------------------------
@hookspec(firstresult=True)
def mmu_unmap_gfn_range(vm, as_id, start, end, event):
    """The host is taking pages away (unmap, DONTNEED, migrate, swap, KSM): drop the SPTEs
    for gfns [start, end). Called from the task that changed the host mm, no lock held.
    Return True if a flush is needed; the core flushes before the host frees the pages.
    Backends that do not implement it get ``mmu_zap_gfn_range`` instead.
    """


@hookspec(firstresult=True)
def mmu_age_gfn_range(vm, as_id, start, end):
    """clear_young: clear the Accessed state of the range's SPTEs; True if any was young.
    Optional: without it the core reports pages as young (never reclaimable), as KVM does
    for SPTEs without A bits.
    """


# --- dirty logging -----------------------------------------------------------------------------
@hookspec(firstresult=True)
def mmu_enable_dirty_log(vm, slot, protect):
    """KVM_MEM_LOG_DIRTY_PAGES was set on ``slot`` (kvm_mmu_slot_apply_flags). With
    ``protect`` every later guest write to the slot must reach the dirty bitmap: write-protect
    its SPTEs, or clear their D bits when PML logs them. Without it (KVM_DIRTY_LOG_INITIALLY_SET)
    nothing needs protecting until userspace clears bits. Either way a backend may split the
    slot's huge pages now (eager_page_split). Return True when a flush is needed. No lock held
    on entry. Optional: without it the core zaps the slot's range (when ``protect``), after
    which every first write faults and is logged.
    """


@hookspec(firstresult=True)
def mmu_disable_dirty_log(vm, slot):
    """KVM_MEM_LOG_DIRTY_PAGES was cleared on ``slot``: the backend may map it with huge
    pages again (kvm_mmu_recover_huge_pages, formerly zap_collapsible_sptes). Return True
    when a flush is needed. Optional: without it the slot stays mapped as it is, and huge
    pages come back only as the slot is zapped and faulted again.
    """


@hookspec(firstresult=True)
def mmu_clear_dirty_log(vm, slot, gfns):
    """The collector fetched and cleared the dirty bits of ``gfns`` (a numpy array): protect
    them again (write-protection, or D-bit clearing under PML) so the next write is logged.
    Return True if a flush is needed. Optional: without it the core zaps each gfn.
    """


# --- memory -----------------------------------------------------------------------------------
@hookspec(firstresult=True)
def mmu_memory(vm):
    """*Required.* Return ``types.MMUMemory``: page-table pages, struct kvm_mmu_page count and
    bytes, rmap bytes, as the kernel would spend them. No lock needed (figures may be racy).
    """


@hookspec(firstresult=True)
def mmu_set_nr_mmu_pages(vm, nr):
    """KVM_SET_NR_MMU_PAGES: limit the backend's page-table pages (struct kvm_mmu_page) to
    ``nr``, zapping the oldest at once if more are in use (kvm_mmu_change_mmu_pages); from
    then on it no longer follows memslot changes (KVM's default is 2% of guest memory, at
    least 64 pages). Returns the limit now in force. Raise ``InvalidConfig`` below 64. Called
    by the VMM (a task or setup code), no lock held. Optional: a backend without a limit
    (KVM's TDP MMU has none) leaves it unimplemented and the call returns None.
    """


@hookspec(firstresult=True)
def mmu_shrink_scan(vm, nr_to_scan):
    """The host is short of memory (KVM's MMU shrinker, mmu_shrink_scan): free up to
    ``nr_to_scan`` page-table pages that no vCPU holds as a root, oldest first, and return
    how many were freed. Called from a host task, no lock held. Optional (None: nothing to
    give back).
    """


@hookspec(firstresult=True)
def mmu_audit(vm):
    """Return a ``types.BackendAudit`` for the invariant audit (``mmu_core.testing.audit``):
    every live root (valid or invalid), the table pages held though possibly unreachable
    (queued for an RCU free, cached shadow pages), and violations of the backend's own
    invariants. Called between engine steps, with no task running: read state, change nothing,
    take no lock. Optional for running VMs; the explorer and the conformance suite need it.
    """


@hookspec(firstresult=True)
def mmu_stats(vm):
    """Return a ``types.MMUStats``: what the backend counted since ``mmu_init_vm`` (faults it
    handled, retries, leaf and MMIO SPTEs installed by level). Called by reports after a run,
    before ``mmu_destroy_vm``, with no task running: read state, change nothing, take no lock.
    Optional: without it reports show zeros and say that the backend has no statistics.
    """



@hookspec(firstresult=True)
def mmu_compiled_kernels(vm):
    """Offer compiled kernels for the compiled demand-paging loop (``mmu_core.sim.fastloop``,
    docs/fastloop.md), or return None (the exact engine runs). Called by the demand-paging
    workload before its vCPUs are spawned, with no task running. Return an object with:

    * ``name``: the backend's name, for the report;
    * ``kernel``: a numba-compiled function ``kernel(op, t, ks, ksu, kg, kstats, mem, free1,
      free_slots, pt, pt_slot, tag, mapcount, frame_state, log, hva_pfn, hva_writable) ->
      (request, arg)``, which
      runs ``mmu_load`` (``op`` K_LOAD) or the part of ``mmu_page_fault`` after
      ``gfn_to_pfn`` (K_FAULT) of task ``t`` up to its next switch point and returns that
      switch point as a request (fastloop's R_* codes); it is called again, with its state in
      ``ks[t]``/``ksu[t]``, once the switch point has passed. It changes SPTEs only in
      ``pt`` (through ``pt_slot``) and allocates and frees table pages only with
      ``fastloop.mem_alloc``/``mem_table``/``mem_free``; ``hva_pfn`` and ``hva_writable``
      (the host mm's page table, indexed by ``(hva - HVA_BASE) >> 12``; pfns in 4 bytes,
      ``host.memory.PFN_DTYPE``: widen one with ``np.int64`` before arithmetic) are read-only for
      it (the legacy MMU's prefetch looks up pages the host already maps);
    * ``unsupported(vm)``: None, or why this VM's configuration must run on the exact engine;
    * ``prepare(vm)``: its arrays ``(kg, kstats)``;
    * ``finish(vm, kg, kstats)``: write the run back into the backend's own state (roots,
      statistics), so that audits, reports and teardown see what the Python code would have
      left.

    Define ``kernel`` at the top level of a module: the loop is generated with it imported by
    name, so numba's disk cache keeps it (``fastloop._loop_module``).

    The kernel must reproduce the backend's Python fault path switch point by switch point:
    tests/test_fastloop.py runs both engines and compares every virtual time. Optional.
    """

# --- nested EPT (the NESTED role; docs/nested.md) ------------------------------------------
# Called on the backend serving Role.NESTED (vm.managers[Role.NESTED]) while a vCPU runs an L2
# guest (``vcpu.l2``, set by ``vcpu.enter_l2``). Optional: a VM whose nested-role backend
# lacks them cannot enter L2 (``enter_l2`` raises GuestError).
@hookspec(firstresult=True)
def mmu_nested_load(vcpu, eptp):
    """Return the pfn of the EPT02 root for an L2 whose VMCS12 EPTP is ``eptp`` (the gpa of
    L1's EPT12 root), building it if needed. Called before every L2 entry that has no root
    (after ``vcpu.request_nested_reload`` too) and whenever the host invalidated a mapping or
    the memslots changed since the last entry. Called from the vCPU's task, no lock held."""


@hookspec(firstresult=True)
def mmu_nested_page_fault(vcpu, fault, eptp):
    """An EPT violation or misconfiguration on EPT02 at L2 gpa ``fault.gpa``. Return a
    ``Ret``: ``Ret.INJECT`` when EPT12 does not map the access (the core reflects the exit to
    L1, KVM's nested_ept_inject_page_fault), ``Ret.EMULATE`` with ``fault.mmio`` for L1 MMIO,
    else FIXED/SPURIOUS/RETRY as for ``mmu_page_fault``. No lock held."""


@hookspec(firstresult=True)
def mmu_nested_ept12_write(vcpu, gpa, new):
    """L1 stored ``new`` (8 bytes) at ``gpa`` in its memory, already written. Return True
    when the page is an EPT12 page the backend write-tracks (the store exited to L0 and was
    emulated: the core charges it); afterwards no EPT02 entry reflects the overwritten one.
    No lock held."""


@hookspec(firstresult=True)
def mmu_nested_invept(vcpu, eptp):
    """L1 executed INVEPT: single-context for ``eptp``, all-context when ``eptp`` is None
    (handle_invept). Afterwards no vCPU uses an EPT02 translation derived from the EPT12
    entries as they were. No lock held."""


@hookspec(firstresult=True)
def mmu_nested_zap_gfn_range(vm, as_id, start, end):
    """L1 gfns [start, end) of ``as_id`` lose their host pages or their L1 mappings (called
    by the core beside ``mmu_zap_gfn_range``, before it, for MMU-notifier invalidations, memslot
    deletions and zaps; ``end`` None: everything, beside ``mmu_zap_all``). Afterwards no EPT02
    entry maps them and no vCPU caches one (the backend flushes). No lock held."""


@hookspec(firstresult=True)
def mmu_nested_audit(vm):
    """Return a ``types.BackendAudit`` of the nested-role state, or None if there is none:
    the EPT02 roots (``direct`` False: indexed by L2 gfn), every EPT02 table held, and the
    nested invariants violated (every leaf one EPT12 maps, no more permissive). Called by
    ``mmu_core.testing.audit`` between engine steps: read only, no lock."""


# --- observers (tracing and statistics plugins) --------------------------------------------
# Observers are plugins of the entry-point group ``mmu_core.observers`` (or registered with
# ``plugins.register_observer``); they implement only these hooks. Backends and the core call
# them through ``vm.observe``. They are called per event, never per SPTE or per access.
@hookspec
def mmu_on_root_alloc(vm, as_id, role, root):
    """A root was allocated (``root`` is its pfn)."""


@hookspec
def mmu_on_root_free(vm, as_id, role, root):
    """A root was freed."""


@hookspec
def mmu_on_tlb_flush(vm, nr_vcpus):
    """The core flushed the TLBs of ``nr_vcpus`` vCPUs (remote flush)."""
