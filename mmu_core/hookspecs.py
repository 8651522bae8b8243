"""The formal MMU interface: every hook a backend implements, and what the core promises.

This file is the plugin author's manual. A backend is a class registered under the entry-point
group ``mmu_core.backends``; the core instantiates it once per VM (``Backend(vm)``) and
registers the instance in that VM's plugin manager for each MMU role it serves, so ``self``
holds the backend's per-VM state (roots, caches, statistics), as ``struct kvm_arch`` does.

Conventions for every hook:

* Hooks sit at coarse boundaries: one fault, one range operation, one lifecycle event. Nothing
  here is called per guest access or inside a walk; loops over SPTEs belong in jitted code.
* "Lock" means ``vm.mmu_lock``, an ``RWLock`` of the engine. The core never takes it for a
  backend: each hook says whether the *backend* must take it, and in which mode. Taking it is
  a switch point; so are ``vm.spte_*`` atomic operations, RCU read sections and remote TLB
  flushes. Code between switch points runs without interference.
* The hardware (``mmu_core.hw``) walks what backends build. A backend never answers "what does
  this address translate to" for the guest; a wrong table is caught by the walker.
* Range hooks return ``True`` when the caller must flush TLBs; the core flushes once
  (``vm.flush_remote_tlbs()``). Backends may also flush themselves when they must (before
  freeing a table page that a walker may still hold).
* Required hooks are marked *required*; a backend missing one fails validation at discovery.
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
    """A vCPU was created (before it first runs). No lock."""


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
    """MOV to CR3 (shadow paging intercepts it; with TDP it is never called). The core has
    already flushed the vCPU's TLB and set ``vcpu.mmu_root = None``; ``mmu_load`` follows.
    A backend may keep previous roots cached (KVM's prev_roots) and reuse them there.
    """


# --- faults ---------------------------------------------------------------------------------
@hookspec(firstresult=True)
def mmu_page_fault(vcpu, fault):
    """*Required.* Handle one fault (``types.PageFault``) and return a ``types.Ret``.

    Called from the vCPU's task, no lock held. Direct role: ``fault.gpa`` is the faulting
    guest-physical address (EPT violation or misconfiguration); shadow role: ``fault.gva``
    with the hardware's error code. The handler resolves gfn -> hva -> pfn with
    ``vm.gfn_to_pfn`` (which may block on a userfault: do it before taking the lock, as KVM's
    kvm_faultin_pfn does), then installs SPTEs with ``vm.spte_cmpxchg``/``vm.spte_write``.
    Sample ``vm.mmu_invalidate_seq`` before ``gfn_to_pfn`` and, under the lock, return
    ``Ret.RETRY`` when ``vm.mmu_invalidate_retry_gfn(seq, as_id, gfn)`` says an MMU-notifier
    invalidation raced with the lookup. Map an SPTE writable only if the returned
    ``HostPfn.writable`` is set (the host may map the page read-only: KSM, copy-on-write).

    Return ``Ret.FIXED``/``SPURIOUS``/``RETRY`` to re-enter the guest, ``Ret.EMULATE`` to have
    the core emulate the access (write-tracked guest page tables; set ``fault.mmio`` for an
    address outside every memslot), or ``Ret.INJECT`` with ``fault.inject_error_code`` when
    the guest's own tables forbid the access. A gfn outside every memslot is MMIO: install an
    MMIO SPTE carrying ``vm.memslots_generation(as_id)`` so that later accesses exit as
    misconfigurations, and return ``Ret.EMULATE`` with ``fault.mmio = True``. An MMIO SPTE
    with a stale generation must be treated as absent. READONLY slots are never writable:
    a write to one is MMIO too (KVM exits to userspace).
    """


@hookspec(firstresult=True)
def mmu_fast_page_fault(vcpu, fault):
    """Optional lockless fast path (KVM's fast_page_fault), tried before ``mmu_page_fault``.

    Return ``None`` to fall through to the slow path, or a ``Ret``.
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
def mmu_invlpg(vcpu, gva):
    """INVLPG (intercepted under shadow paging). The core has flushed the vCPU's TLB entry;
    the backend drops or resyncs the SPTE that shadowed gva. No lock held.
    """


@hookspec
def mmu_sync_roots(vcpu):
    """Resynchronise unsync shadow pages before entry (KVM_REQ_MMU_SYNC)."""


# --- memslots ---------------------------------------------------------------------------------
@hookspec
def mmu_memslot_changed(vm, as_id, old, new, change):
    """A memslot was created, deleted, moved or had its flags changed (``change`` is one of
    "create", "delete", "move", "flags"; ``old``/``new`` are ``Memslot`` or None). Called
    with no lock held, after the new generation is visible. For delete and move the core has
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
def mmu_enable_dirty_log(vm, slot):
    """KVM_MEM_LOG_DIRTY_PAGES was set on ``slot``: from now on every guest write to the slot
    must reach ``vm.mark_page_dirty``, i.e. write-protect (or clear D of) its SPTEs and return
    True when a flush is needed. No lock held on entry. Optional: without it the core zaps
    the slot's range, after which every first write faults and is logged.
    """


@hookspec(firstresult=True)
def mmu_clear_dirty_log(vm, slot, gfns):
    """The collector fetched and cleared the dirty bits of ``gfns`` (a numpy array): write-
    protect them again so the next write is logged. Return True if a flush is needed.
    Optional: without it the core zaps each gfn.
    """


# --- memory -----------------------------------------------------------------------------------
@hookspec(firstresult=True)
def mmu_memory(vm):
    """*Required.* Return ``types.MMUMemory``: page-table pages, struct kvm_mmu_page count and
    bytes, rmap bytes, as the kernel would spend them. No lock needed (figures may be racy).
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
def mmu_set_nr_mmu_pages(vm, nr_pages):
    """KVM_SET_NR_MMU_PAGES: keep at most ``nr_pages`` shadow pages, reclaiming the oldest."""


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
