"""The VM: memslots, the MMU lock and RCU, host memory, vCPUs, and the backend for its role.

`create_vm()` validates a VMConfig, snapshots the module parameters, chooses the backend for
each MMU role, and builds everything or nothing: on any error what was built is torn down and
the typed error propagates. The services backends use (page-table pages, atomic SPTE access,
gfn -> pfn, remote TLB flushes, dirty logging, write tracking) live here so that every
backend spends and counts them the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmu_core import mutants, plugins
from mmu_core.arch.x86.paging import MODE_5LEVEL
from mmu_core.arch.x86.spte import MMIO_SPTE_GEN_MASK
from mmu_core.config import VMConfig
from mmu_core.errors import InvalidConfig, MMUError, PluginError, UseAfterFree
from mmu_core.host import NO_PFN, Backing, HostMemory, HostMM, Purpose
from mmu_core.host.memory import NO_SLOT
from mmu_core.host.userfault import Userfaultfd
from mmu_core.params import Params
from mmu_core.sim import RCU, Completion, Engine, RWLock
from mmu_core.types import HostPfn, Role
from mmu_core.vm.memslot import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMSLOT_INVALID,
    Memslot,
    Memslots,
)
from mmu_core.vm.vcpu import REQ_MMU_RELOAD, REQ_TLB_FLUSH, Vcpu

KVM_MIN_ALLOC_MMU_PAGES = 64  # kvm_host.h: the least KVM_SET_NR_MMU_PAGES accepts


def create_vm(config: VMConfig, engine: Engine | None = None) -> VM:
    """Build a VM from a validated config; on failure nothing is left half-built."""
    vm = VM.__new__(VM)
    try:
        vm._build(config, engine)
    except MMUError:
        vm._teardown_partial()
        raise
    return vm


class VM:
    """One guest: what `create_vm` builds. Backends receive it in every VM-level hook and use
    the services below (mmu_core.hookspecs lists them; each method says what it promises).

    Attributes a backend reads: `engine` (virtual time, costs, atomics), `mmu_lock` (an
    RWLock), `rcu`, `observe` (the observers' hooks), `host` (frames and table rows),
    `memslots` (one `Memslots` per address space), `vcpus`, `role`, `config`,
    `mmu_invalidate_seq`.
    """

    config: VMConfig
    params: Params

    def _build(self, config: VMConfig, engine: Engine | None) -> None:
        self.config = config
        self.params = config.params  # the snapshot: later parameter changes don't reach us
        self.engine = engine or Engine(config.seed, config.cost, config.policy,
                                       **config.engine_options())
        self.host = HostMemory()
        self.mm = HostMM(self.host, self.engine)
        self.mmu_lock = RWLock(self.engine, "mmu_lock")
        self.rcu = RCU(self.engine)
        # kvm->srcu: vCPUs hold it while they are out of guest mode (vcpu_run drops it around
        # each VM entry), so a memslot update's synchronize_srcu_expedited waits for every
        # exit that may have looked at the old memslots. Its read side is in the exit cost.
        self.srcu = RCU(self.engine, "srcu", self.engine.cost.srcu_expedited_grace_period,
                        charge_readers=False)
        self.memslots = [Memslots(0), Memslots(1)]
        self.generation = 0
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self._invalidating: list[list[tuple[int, int, int]]] = []  # gfn ranges in progress
        self._collecting: list[tuple[int, set[int]]] = []  # dirty logs being re-protected
        self._track_writes: list[tuple[int, int]] = []  # emulated writes awaiting track_write
        self._slot_updates: dict[tuple[int, int], Completion] = {}  # slots being deleted/moved
        self._tracked: list[dict[int, int]] = [{}, {}]
        self._lpage_disallowed: list[dict[int, int]] = [{}, {}]  # gfn -> disallow count
        self.vcpus: list[Vcpu] = []
        self.backend_instances: dict[str, Any] = {}
        self.tlb_flushes = 0
        # Told of every guest operation as it completes (ops_done(vcpu, prog, results, lo,
        # hi)), before any switch point: the reference model of mmu_core.testing uses it.
        self.recorder = None
        self.role = Role.DIRECT if self.params.ept else Role.SHADOW
        self.backends = plugins.choose(self.params)
        self.managers = plugins.build_managers(self, self.backends)
        # One plugin manager per backend instance (tdp: the TDP MMU's and the nested shadow
        # MMU's; legacy and shadow: one), for the services every MMU of the VM must see.
        seen: dict[str, Any] = {}
        for r in (self.role, *Role):
            seen.setdefault(self.backends[r].name, self.managers[r])
        self._instance_managers = list(seen.values())
        self.observe = plugins.observer_manager().hook
        self.hook = self.managers[self.role].hook
        # The per-fault hooks, resolved once: the backend's bound methods when it alone
        # implements them (no pluggy call per fault), else calls through pluggy
        # (plugins.dispatcher); fast_page_fault is None when nothing implements it.
        self.page_fault = plugins.dispatcher(self.hook.mmu_page_fault, "vcpu", "fault")
        self.fast_page_fault = plugins.dispatcher(self.hook.mmu_fast_page_fault, "vcpu",
                                                  "fault")
        # and the per-page one: the host's page aging asks about every page it clears
        self._age_gfn_range = plugins.dispatcher(self.hook.mmu_age_gfn_range, "vm", "as_id",
                                                 "start", "end")
        self.backend_name = self.backends[self.role].name
        levels = 5 if self.role is Role.DIRECT and config.maxphyaddr > 48 else 4
        if self.backends[self.role].info.capabilities.max_root_level < levels:
            raise PluginError(f"backend '{self.backend_name}' builds at most "
                              f"{self.backends[self.role].info.capabilities.max_root_level}-level "
                              f"tables; MAXPHYADDR {config.maxphyaddr} needs {levels}-level EPT")
        self.mm.notifiers.append(self)
        self.mm.shrinkers.append(self._shrink)  # KVM's mmu_shrinker
        self.hook.mmu_init_vm(vm=self)
        self._alive = True
        for ms in config.memslots:
            self.add_memslot(
                ms.slot, ms.gpa, ms.size, Backing(ms.backing), as_id=ms.as_id,
                userfault=ms.userfault, readonly=ms.readonly, log_dirty=ms.log_dirty,
            )
        for i in range(config.vcpus):
            vcpu = Vcpu(self, i)
            self.vcpus.append(vcpu)
            self.hook.mmu_init_vcpu(vcpu=vcpu)

    def _teardown_partial(self) -> None:
        if getattr(self, "_alive", False):
            self.destroy()

    # --- lifecycle ---------------------------------------------------------------------------
    def destroy(self) -> None:
        """Tear the VM down, whatever state its engine stopped in.

        The engine is closed first: every task still parked (daemons at the end of a run; any
        task at all after an interrupted or failed run, possibly inside an RCU read section or
        holding the MMU lock) unwinds its finally blocks, and the locks and RCU forget the dead
        tasks. Only then can the backends tear down outside the engine and the RCU barrier
        run the callbacks still queued (it refuses while readers are inside). Closing also
        frees the greenlets, which would otherwise keep the VM alive.
        """
        if not getattr(self, "_alive", False):
            return
        self._alive = False
        if self._shrink in self.mm.shrinkers:
            self.mm.shrinkers.remove(self._shrink)
        self.engine.close()
        for vcpu in self.vcpus:
            vcpu.mmu_root = None
        self.hook.mmu_destroy_vm(vm=self)
        self.rcu.barrier()  # callbacks the backend's teardown queued, if it did not wait

    def _shrink(self, nr_to_scan: int) -> int:
        """The host's shrinker calls this under memory pressure (HostMM.shrink_slab): the
        backend frees page-table pages no vCPU holds (mmu_shrink_scan; a backend without a
        page cache to give back, like the TDP MMU, does not implement it)."""
        return self.hook.mmu_shrink_scan(vm=self, nr_to_scan=nr_to_scan) or 0

    def hook_all(self, name: str, **kwargs: Any) -> None:
        """Call an optional hook on the backend of the VM's role (if it implements it)."""
        getattr(self.hook, name)(**kwargs)

    def root_levels(self, vcpu: Vcpu) -> int:
        """Levels of the structure the hardware walks from vcpu.mmu_root: EPT has 5 levels when
        guest-physical addresses need more than 48 bits (KVM: get_tdp_level), shadow tables
        as many as the guest's linear addresses (5 with LA57)."""
        if self.role is Role.DIRECT:
            return 5 if self.config.maxphyaddr > 48 else 4
        return 5 if vcpu.mode == MODE_5LEVEL else 4

    # --- memslots ------------------------------------------------------------------------------
    # KVM's update protocol (kvm_set_memslot): a slot being deleted or moved is first marked
    # KVM_MEMSLOT_INVALID, so faults on it retry; then its range is zapped; then the final
    # memslots are installed. Every installation bumps the generation (MMIO SPTEs go stale)
    # and, as kvm_swap_active_memslots does, waits for an SRCU grace period: every vCPU exit
    # that may have resolved a gfn against the old memslots has finished before the caller
    # goes on (to zap the slot, or to write-protect it for dirty logging).
    def _install_memslots(self, as_id: int, change: tuple | None = None) -> None:
        """Publish the memslots of as_id and wait for the grace period. `change` is
        (old, new, kind) for a create or move: the backend hears of it (mmu_memslot_changed)
        as soon as the new memslots are visible, before anything can switch, because a fault
        may use the new slot from then on and find the backend's metadata for it (KVM
        allocates the rmaps in kvm_prepare_memory_region, before the swap)."""
        self.memslots[as_id].update()
        self.generation += 1
        if change is not None:
            old, new, kind = change
            self.hook_all("mmu_memslot_changed", vm=self, as_id=as_id, old=old, new=new,
                          change=kind)
        if not mutants.on("memslot-update-no-srcu-sync"):
            self.srcu.synchronize_rcu()
        if self.generation & MMIO_SPTE_GEN_MASK == 0 and self.vcpus:
            # kvm_mmu_invalidate_mmio_sptes: SPTEs keep only the low 19 bits of the
            # generation, so when those wrap an MMIO SPTE from 2^19 updates ago would look
            # current again. KVM zaps everything then (the very rare case), and so do we.
            self.zap_all()

    def add_memslot(
        self, slot_id: int, gpa: int, size: int, backing: Backing = Backing.ANON, *,
        as_id: int = 0, userfault: bool = False, readonly: bool = False,
        log_dirty: bool = False, hva: int | None = None,
    ) -> Memslot:
        """KVM_SET_USER_MEMORY_REGION creating a slot: new host memory of `backing`, or, with
        `hva`, memory the host process already maps (the way a VMM gives SMM's address space
        an alias of RAM: two slots, one host page each gfn, both zapped by the notifier)."""
        if gpa % 4096 or size % 4096 or size <= 0:
            raise InvalidConfig("memslot", f"gpa {gpa:#x} and size {size:#x} must be 4 KiB aligned")
        if as_id not in (0, 1):
            raise InvalidConfig("memslot", f"address space {as_id} does not exist (0, or 1 "
                                "for SMM)")
        base, npages = gpa >> 12, size >> 12
        if self.memslots[as_id].by_id(slot_id) is not None \
                or self.memslots[as_id].overlaps(base, npages):
            raise InvalidConfig("memslot", f"slot {slot_id} at {gpa:#x} overlaps a slot of "
                                f"address space {as_id}")
        if hva is not None:
            if hva % 4096 or userfault:
                raise InvalidConfig("memslot", f"an existing mapping must be 4 KiB aligned "
                                    f"and not registered again with userfaultfd ({hva:#x})")
            region = self.mm.region_of(hva)
            if hva + size > region.end:
                raise InvalidConfig("memslot", f"[{hva:#x}, {hva + size:#x}) runs past the "
                                    f"host mapping that ends at {region.end:#x}")
            start = hva
        else:
            region = self.mm.mmap(size, backing, name=f"slot{slot_id}")
            start = region.start
        if userfault:
            Userfaultfd(self.engine, self.mm, region.start, region.size)
        flags = (KVM_MEM_READONLY if readonly else 0) | (KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        slot = Memslot(slot_id, as_id, base, npages, start, flags)
        if log_dirty:
            slot.dirty_bitmap = np.zeros(slot.npages, dtype=np.uint8)
        self.memslots[as_id].slots.append(slot)
        self._install_memslots(as_id, (None, slot, "create"))
        return slot

    def _slot(self, as_id: int, slot_id: int) -> Memslot:
        slot = self.memslots[as_id].by_id(slot_id)
        if slot is None or slot.invalid:
            raise InvalidConfig("memslot", f"no slot {slot_id} in address space {as_id}")
        return slot

    def _invalidate_slot(self, slot: Memslot) -> Completion:
        """Steps 1 and 2 of a delete or move: mark the slot invalid, zap what maps it."""
        done = Completion(self.engine)
        self._slot_updates[(slot.as_id, slot.id)] = done
        if mutants.on("memslot-zap-after-install"):
            self._late_zap = (slot.as_id, slot.base_gfn, slot.end_gfn)
            return done
        slot.flags |= KVM_MEMSLOT_INVALID
        self._install_memslots(slot.as_id)
        # kvm_arch_flush_shadow_memslot: with KVM_X86_QUIRK_SLOT_ZAP_ALL (the default) every
        # mapping goes, by the fast zap (kvm_mmu_zap_all_fast: roots invalidated, vCPUs
        # reload): zapping only the slot's range broke a guest with an assigned device in
        # 2019 and was reverted, and 6.12 made it opt-in ("KVM: x86/mmu: Introduce a quirk to
        # control memslot zap behavior"); with the quirk disabled, the slot's range only.
        if self.params.slot_zap_all:
            self.zap_all()
        else:
            self.zap_gfn_range(slot.as_id, slot.base_gfn, slot.end_gfn)
        return done

    def _slot_updated(self, slot: Memslot, done: Completion) -> None:
        del self._slot_updates[(slot.as_id, slot.id)]
        done.complete()
        if mutants.on("memslot-zap-after-install"):
            self.zap_gfn_range(*self._late_zap)

    def delete_memslot(self, as_id: int, slot_id: int) -> None:
        slot = self._slot(as_id, slot_id)
        done = self._invalidate_slot(slot)
        self.memslots[as_id].slots.remove(slot)
        self._install_memslots(as_id)
        self._slot_updated(slot, done)
        self.hook_all("mmu_memslot_changed", vm=self, as_id=as_id, old=slot, new=None,
                      change="delete")

    def move_memslot(self, as_id: int, slot_id: int, new_gpa: int) -> None:
        """KVM_MR_MOVE: same host memory, new guest-physical base."""
        slot = self._slot(as_id, slot_id)
        new_base = new_gpa >> 12
        if new_gpa % 4096 or self.memslots[as_id].overlaps(new_base, slot.npages, ignore=slot):
            raise InvalidConfig("memslot", f"cannot move slot {slot_id} to {new_gpa:#x}")
        old = Memslot(slot.id, as_id, slot.base_gfn, slot.npages, slot.userspace_addr, slot.flags)
        done = self._invalidate_slot(slot)
        slot.base_gfn = new_base
        slot.flags &= ~KVM_MEMSLOT_INVALID
        self._install_memslots(as_id, (old, slot, "move"))
        self._slot_updated(slot, done)

    def set_nr_mmu_pages(self, n: int) -> int | None:
        """KVM_SET_NR_MMU_PAGES (kvm_vm_ioctl_set_nr_mmu_pages): limit the MMU's page-table
        pages to n; below KVM_MIN_ALLOC_MMU_PAGES (64) the ioctl fails with EINVAL. The
        backend (hook mmu_set_nr_mmu_pages) zaps the oldest pages at once if more are in use
        and stops following memslot changes. Returns the limit in force, or None when the
        backend has no limit (KVM's TDP MMU: the ioctl succeeds and changes nothing it uses)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise InvalidConfig("nr_mmu_pages", f"{n!r} is not a page count")
        if n < KVM_MIN_ALLOC_MMU_PAGES:
            raise InvalidConfig("nr_mmu_pages", f"{n} is below KVM's minimum of "
                                f"{KVM_MIN_ALLOC_MMU_PAGES}")
        if not self.hook.mmu_set_nr_mmu_pages.get_hookimpls():
            return None
        return self.hook.mmu_set_nr_mmu_pages(vm=self, nr=int(n))

    def set_dirty_logging(self, as_id: int, slot_id: int, enable: bool) -> None:
        """Set or clear KVM_MEM_LOG_DIRTY_PAGES on a slot (kvm_mmu_slot_apply_flags).

        Enabling: the bitmap starts empty and the backend protects the slot (write-protection
        or D-bit clearing) and may split its huge pages eagerly; with
        KVM_DIRTY_LOG_INITIALLY_SET every bit starts set and nothing is protected until
        userspace clears it. Disabling: the backend may map the slot huge again."""
        slot = self._slot(as_id, slot_id)
        if enable == slot.log_dirty:
            return
        initially_set = self.config.dirty_log_initially_set
        if enable:
            fill = 1 if initially_set else 0
            slot.dirty_bitmap = np.full(slot.npages, fill, dtype=np.uint8)
        if enable:
            # Until the slot is protected the guest may still write through old writable
            # SPTEs unlogged: the ioctl has not returned, so that is allowed.
            enabling = (as_id, set(range(slot.base_gfn, slot.end_gfn)))
            self._collecting.append(enabling)
        slot.flags ^= KVM_MEM_LOG_DIRTY_PAGES
        self._install_memslots(as_id)
        if enable:
            try:
                if self.hook.mmu_enable_dirty_log.get_hookimpls():
                    if self.hook.mmu_enable_dirty_log(vm=self, slot=slot,
                                                      protect=not initially_set):
                        self.flush_remote_tlbs()
                elif not initially_set:
                    self.zap_gfn_range(as_id, slot.base_gfn, slot.end_gfn)
            finally:
                self._collecting.remove(enabling)
        else:
            self.sync_dirty_log()  # PML entries still buffered belong to the old bitmap
            slot.dirty_bitmap = None
            if self.hook.mmu_disable_dirty_log.get_hookimpls():
                if self.hook.mmu_disable_dirty_log(vm=self, slot=slot):
                    self.flush_remote_tlbs()
        self.hook_all("mmu_memslot_changed", vm=self, as_id=as_id, old=slot, new=slot,
                      change="flags")

    def _logged_slot(self, as_id: int, slot_id: int) -> Memslot:
        slot = self.memslots[as_id].by_id(slot_id)
        if slot is None or slot.dirty_bitmap is None:
            raise InvalidConfig("memslot", f"slot {slot_id} does not log dirty pages")
        return slot

    def get_dirty_log(self, as_id: int, slot_id: int) -> np.ndarray:
        """KVM_GET_DIRTY_LOG: the dirty gfns. Without manual protection: fetch, clear and
        re-protect them (kvm_get_dirty_log_protect). With it: only a copy of the bitmap;
        userspace clears with clear_dirty_log."""
        slot = self._logged_slot(as_id, slot_id)
        self.sync_dirty_log()
        gfns = np.flatnonzero(slot.dirty_bitmap) + slot.base_gfn
        if self.config.dirty_log_manual_protect:
            self.engine.delay(slot.npages // 64 * self.engine.cost.atomic_read)
            return gfns
        # xchg per bitmap word, charged first: from the harvest to _protect there must be no
        # switch point, or a writer could see its page neither logged nor protected.
        self.engine.delay(slot.npages // 64 * self.engine.cost.xchg)
        gfns = np.flatnonzero(slot.dirty_bitmap) + slot.base_gfn
        slot.dirty_bitmap[:] = 0
        self._protect(slot, gfns)
        return gfns

    def clear_dirty_log(self, as_id: int, slot_id: int, first_page: int = 0,
                        num_pages: int | None = None, bitmap: np.ndarray | None = None
                        ) -> int:
        """KVM_CLEAR_DIRTY_LOG (manual protection): clear the bits of pages [first_page,
        first_page + num_pages) of the slot that `bitmap` selects (all when None) and
        re-protect those that were dirty. Returns how many were. As KVM requires, first_page
        is a multiple of 64 and the range lies in the slot."""
        if not self.config.dirty_log_manual_protect:
            raise InvalidConfig("clear_dirty_log", "needs dirty_log_manual_protect "
                                "(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")
        slot = self._logged_slot(as_id, slot_id)
        num_pages = slot.npages - first_page if num_pages is None else num_pages
        if first_page % 64 or num_pages < 0 or first_page + num_pages > slot.npages:
            raise InvalidConfig("clear_dirty_log", f"pages [{first_page}, "
                                f"{first_page + num_pages}) are not 64-aligned within slot "
                                f"{slot_id} ({slot.npages} pages)")
        self.sync_dirty_log()
        self.engine.delay(-(-num_pages // 64) * self.engine.cost.xchg)  # before the harvest
        part = slot.dirty_bitmap[first_page:first_page + num_pages]
        want = part != 0 if bitmap is None else (part != 0) & (np.asarray(bitmap[:num_pages]) != 0)
        offsets = np.flatnonzero(want)
        part[offsets] = 0
        self._protect(slot, offsets + first_page + slot.base_gfn)
        return len(offsets)

    def _protect(self, slot: Memslot, gfns: np.ndarray) -> None:
        """Re-protect harvested gfns (kvm_arch_mmu_enable_log_dirty_pt_masked), then flush.

        From the harvest until the re-protection (and its flush) are done, the guest may
        still write through old writable SPTEs without a new dirty bit: harmless, since the
        pages are reported dirty now and the caller reads them after we return."""
        if not len(gfns):
            return
        as_id = slot.as_id
        collecting = (as_id, set(gfns.tolist()))
        self._collecting.append(collecting)
        try:
            if self.hook.mmu_clear_dirty_log.get_hookimpls():
                if self.hook.mmu_clear_dirty_log(vm=self, slot=slot, gfns=gfns):
                    self.flush_remote_tlbs()
            else:
                flush = False
                for gfn in gfns.tolist():
                    flush |= bool(self.hook.mmu_zap_gfn_range(vm=self, as_id=as_id, start=gfn,
                                                              end=gfn + 1))
                if flush:
                    self.flush_remote_tlbs()
        finally:
            self._collecting.remove(collecting)

    def sync_dirty_log(self) -> None:
        """kvm_arch_sync_dirty_log: bring what the hardware logged but KVM has not seen yet
        into the dirty bitmaps (PML buffers, flushed by kicking each vCPU)."""
        for vcpu in self.vcpus:
            vcpu.flush_pml(kick=True)

    def collecting_dirty(self, as_id: int, gfn: int) -> bool:
        """Whether a get_dirty_log (or enabling dirty logging) that covers gfn is still
        re-protecting it: until it returns, a writable SPTE of a logged slot may legitimately
        exist for a gfn whose dirty bit was just harvested. For audits; no switch point."""
        return any(a == as_id and gfn in gfns for a, gfns in self._collecting)

    def memslots_generation(self) -> int:
        """The memslots generation, one counter for both address spaces: every memslot
        change bumps it. An MMIO SPTE carries it (``& MMIO_SPTE_GEN_MASK``) and is stale once
        it differs. No switch point."""
        return self.generation

    def gfn_to_memslot(self, as_id: int, gfn: int) -> Memslot | None:
        """The memslot of address space as_id that covers gfn, or None (MMIO). A slot being
        deleted or moved is returned with ``slot.invalid`` set (``gfn_to_pfn`` waits for the
        update instead). No switch point."""
        return self.memslots[as_id].find(gfn)

    # --- gfn -> pfn (KVM: __gfn_to_pfn_memslot / hva_to_pfn) ------------------------------------
    def gfn_to_pfn(self, as_id: int, gfn: int, write: bool) -> HostPfn | None:
        """(pfn, host mapping level, slot, host-writable), or None when no memslot covers gfn
        (MMIO).

        Runs as get_user_pages would (HostMM.fault_in): a missing page is populated, a
        swapped-out one read back, and a missing page in a userfault region blocks the calling
        task until the region's handler copies it in. With `write`, a page the host maps
        read-only (KSM) gets copy-on-write first, so the result is writable; a read of such a
        page returns the shared pfn with writable=False, and the backend maps it read-only.
        Accounted to the "gup" phase. Every delay is a switch point, so the host state is
        looked up again after each one; the result is read with no switch point after it.

        Read ``mmu_invalidate_seq`` before calling it and check ``mmu_invalidate_retry_gfn``
        under the MMU lock before installing the result: it may be stale by then. Call it with
        no lock held (it may block). A write to a READONLY slot still resolves; the backend
        must not map it (``slot.readonly``).
        """
        slot = self.memslots[as_id].find(gfn)
        while slot is not None and slot.invalid:
            # Being deleted or moved: KVM's fault returns RET_PF_RETRY and the vCPU re-enters
            # the guest, leaving kvm->srcu, until the update is done. Waiting stands in for
            # those retries; it must leave SRCU too, or the update's synchronize would wait
            # for us while we wait for it.
            with self.srcu.outside():
                self._slot_updates[(as_id, slot.id)].wait("memslot_update")
            slot = self.memslots[as_id].find(gfn)
        if slot is None:
            return None
        hva = slot.gfn_to_hva(gfn)
        mm = self.mm
        with self.engine.phase("gup"):
            pfn = mm.get_user_pages(hva, write)
        return HostPfn(pfn, mm.mapping_level(hva), slot, mm.host_writable(hva))

    def host_writable(self, hva: int) -> bool:
        """Whether the host maps hva writable (False for KSM and other copy-on-write pages)."""
        return self.mm.host_writable(hva)

    def max_mapping_level(self, slot: Memslot, gfn: int, host_level: int, max_level: int = 3) -> int:
        """Largest level at which gfn may be mapped: no larger than the host mapping, and the
        huge page must lie inside the slot with gfn and hva equally aligned (KVM:
        kvm_mmu_max_mapping_level and the lpage_info disallow counts)."""
        level = min(host_level, max_level)
        while level > 1:
            pages = 1 << (9 * (level - 1))
            base = gfn & ~(pages - 1)
            hva_pg = slot.userspace_addr >> 12
            aligned = (slot.base_gfn - hva_pg) % pages == 0
            if aligned and base >= slot.base_gfn and base + pages <= slot.end_gfn:
                if not (slot.log_dirty or self._lpage_disallowed_in(slot.as_id, base, base + pages)):
                    return level
            level -= 1
        return 1

    def read_guest_u64(self, as_id: int, gpa: int) -> int:
        """A host-side read of guest memory (kvm_read_guest), populating if needed. A read:
        a KSM page stays shared."""
        res = self.gfn_to_pfn_nowait(as_id, gpa >> 12, write=False)
        if res is None:
            return 0
        return self.host.read_u64((res << 12) | (gpa & 0xFF8))

    def gfn_to_pfn_nowait(self, as_id: int, gfn: int, write: bool = True) -> int | None:
        """The pfn behind gfn for the host's own access to guest memory (setup code, the
        guest OS model's page-table edits), or None outside every memslot.

        Never waits for a userfault handler: a missing page is populated directly. Swapped
        pages are read back. `write` defaults to True because callers may store through the
        pfn: a KSM page then gets its private copy first, so a host-side store never reaches
        a frame another hva shares. Pass write=False for reads. Inside an engine task the
        kernel's work is charged (switch points); outside, it is free.
        """
        slot = self.memslots[as_id].find(gfn)
        if slot is None:
            return None
        hva = slot.gfn_to_hva(gfn)
        pfn = self.mm.fault_in(hva, write)
        if pfn == NO_PFN:  # missing in a userfault region: bypass the handler
            pfn = self.mm.populate(hva)
        return pfn

    # --- page-table pages, atomics, flushes -------------------------------------------------
    def alloc_pt_page(self) -> int:
        """A zeroed page-table page (its 512 entries are all zero = not present); returns its
        pfn. Charged (a switch point). Every page allocated must be freed with
        ``free_pt_page`` by the end of ``mmu_destroy_vm``: the core checks for leaks."""
        self.engine.delay(self.engine.cost.pt_page_alloc)
        pfn = self.host.alloc(Purpose.MMU_PT)
        self.host.table(pfn)
        return pfn

    def free_pt_page(self, pfn: int) -> None:
        """Free a page-table page at once. The caller has made it unreachable and flushed
        TLBs; if a lockless walker may still be inside it, free it from an RCU callback
        (``vm.rcu.call_rcu``) instead. Touching it afterwards raises UseAfterFree. No switch
        point."""
        self.host.free(pfn)

    def pt_pages_in_use(self) -> int:
        """Page-table pages allocated and not yet freed, for ``mmu_memory``."""
        return int(self.host.frames_in_use[Purpose.MMU_PT])

    def spte_table(self, pfn: int) -> np.ndarray:
        """The 512 SPTEs of table pfn as a writable uint64 numpy row: plain loads and stores
        with no switch point and no cost, for code that holds the lock for write or reads
        state between steps (audits, jitted range operations, which charge their own cost
        with ``vm.engine.delay``). A concurrent fault path uses ``spte_read``/``spte_cmpxchg``.
        Raises UseAfterFree for a freed page."""
        return self.host.pt[self._pt_row(pfn)]

    def _pt_row(self, pfn: int) -> int:
        """The row holding table pfn's entries; a freed table has none, and touching it is
        the use-after-free that RCU-deferred freeing exists to prevent."""
        row = int(self.host.pt_slot[pfn])
        if row == NO_SLOT:
            raise UseAfterFree(f"SPTE access to page-table page {pfn:#x}, which is not a "
                               "table (freed)")
        return row

    def spte_read(self, pfn: int, idx: int) -> int:
        """READ_ONCE of an SPTE: a switch point."""
        self.engine.atomic("read")
        return int(self.host.pt[self._pt_row(pfn), idx])

    def spte_cmpxchg(self, pfn: int, idx: int, old: int, new: int) -> bool:
        """try_cmpxchg64 on an SPTE: a switch point; False (and a counted failure) if the SPTE
        no longer holds `old`."""
        self.engine.atomic("cmpxchg")
        table = self.host.pt[self._pt_row(pfn)]
        if int(table[idx]) != old:
            self.engine.note_cmpxchg_failure()
            return False
        table[idx] = np.uint64(new)
        return True

    def spte_xchg(self, pfn: int, idx: int, new: int) -> int:
        """xchg on an SPTE: store `new`, return what was there. A switch point; used to
        freeze a table's entries while other tasks may still change them."""
        self.engine.atomic("xchg")
        table = self.host.pt[self._pt_row(pfn)]
        old = int(table[idx])
        table[idx] = np.uint64(new)
        return old

    def spte_write(self, pfn: int, idx: int, new: int) -> None:
        """A plain store, for SPTEs only the lock holder (write mode) can touch, or that the
        caller froze first. Charged (a switch point)."""
        self.engine.delay(self.engine.cost.spte_write)
        self.host.pt[self._pt_row(pfn), idx] = np.uint64(new)

    def flush_remote_tlbs(self) -> None:
        """kvm_flush_remote_tlbs: once it returns, no vCPU uses a TLB or paging-structure
        cache entry from before the call (each services the flush request before its next
        guest access), and observers have heard of it. Charged (a switch point). The core
        calls it after range hooks that return True; a backend calls it itself before
        freeing a table page a vCPU may still cache, or after replacing a present SPTE in a
        fault."""
        cost = self.engine.cost
        self.engine.delay(
            cost.remote_tlb_flush_base + cost.remote_tlb_flush_per_vcpu * len(self.vcpus),
            "tlb_flush",
        )
        for vcpu in self.vcpus:
            vcpu.make_request(REQ_TLB_FLUSH)
        self.tlb_flushes += 1
        self.observe.mmu_on_tlb_flush(vm=self, nr_vcpus=len(self.vcpus))

    def zap_gfn_range(self, as_id: int, start: int, end: int) -> None:
        if self.hook.mmu_zap_gfn_range(vm=self, as_id=as_id, start=start, end=end):
            self.flush_remote_tlbs()

    def zap_all(self) -> None:
        if self.hook.mmu_zap_all(vm=self):
            self.flush_remote_tlbs()
        for vcpu in self.vcpus:
            vcpu.make_request(REQ_MMU_RELOAD)

    # --- dirty logging and write tracking --------------------------------------------------------
    def mark_page_dirty(self, as_id: int, gfn: int) -> None:
        """Set gfn's bit in its slot's dirty bitmap if the slot logs dirty pages (else
        nothing). The backend calls it before it installs a writable SPTE in a logged slot
        (KVM's make_spte), and for guest tables its software walk set A/D in; the core calls
        it for writes it emulates. No switch point."""
        slot = self.memslots[as_id].find(gfn)
        if slot is not None and slot.dirty_bitmap is not None:
            slot.dirty_bitmap[gfn - slot.base_gfn] = 1

    def track_gfn(self, as_id: int, gfn: int) -> None:
        """kvm_write_track_add_gfn: guest writes to gfn must exit and be emulated; no huge
        page may map it (kvm_mmu_gfn_disallow_lpage)."""
        _count_up(self._tracked[as_id], gfn)
        self.disallow_lpage(as_id, gfn)

    def untrack_gfn(self, as_id: int, gfn: int) -> None:
        """Drop one reference taken by ``track_gfn``; writes stop exiting with the last."""
        _count_down(self._tracked[as_id], gfn)
        self.allow_lpage(as_id, gfn)

    def disallow_lpage(self, as_id: int, gfn: int) -> None:
        """kvm_mmu_gfn_disallow_lpage: ``max_mapping_level`` maps gfn at 4K only until the
        matching ``allow_lpage`` (a guest table the shadow MMU shadows, write-tracked or
        only write-protected: a huge SPTE over it would let writes to it through)."""
        _count_up(self._lpage_disallowed[as_id], gfn)

    def allow_lpage(self, as_id: int, gfn: int) -> None:
        """kvm_mmu_gfn_allow_lpage: drop one ``disallow_lpage``."""
        _count_down(self._lpage_disallowed[as_id], gfn)

    def write_protect_gfn(self, as_id: int, gfn: int) -> bool:
        """kvm_mmu_slot_gfn_write_protect: every backend of the VM clears W and MMU-writable
        in its SPTEs mapping gfn (hook ``mmu_write_protect_gfn``: the shadow MMU's rmaps and
        the TDP MMU's tables). For a backend that shadows guest tables (a shadowed gfn may be
        mapped by another backend, as L1's TDP MMU maps the EPT12 tables the nested shadow
        MMU shadows). The caller holds the MMU lock for write; True if a flush is due."""
        flush = False
        for pm in self._instance_managers:
            flush |= any(pm.hook.mmu_write_protect_gfn(vm=self, as_id=as_id, gfn=gfn))
        return flush

    def mmu_try_to_unsync_pages(self, as_id: int, gfn: int, can_unsync: bool = True,
                                prefetch: bool = False) -> bool:
        """make_spte's mmu_try_to_unsync_pages for a backend that does not shadow guest
        tables itself (the TDP MMU): whether gfn may be mapped writable. False if it is
        write-tracked; otherwise every other backend that shadows it (the nested shadow
        MMU) unsyncs its pages or says no (hook ``mmu_try_to_unsync_pages``). Under the MMU
        lock, either mode; no switch point."""
        if self.is_tracked(as_id, gfn):
            return False
        for pm in self._instance_managers[1:]:  # the L1 backend's own pages are its business
            if pm.hook.mmu_try_to_unsync_pages(vm=self, as_id=as_id, gfn=gfn,
                                               can_unsync=can_unsync,
                                               prefetch=prefetch) is False:
                return False
        return True

    def track_write_in_flight(self, as_id: int, gfn: int) -> bool:
        """Whether an emulated write to tracked gfn has landed and mmu_track_write has not
        yet returned (the backend's view of that guest table may lag until it does)."""
        return (as_id, gfn) in self._track_writes

    def is_tracked(self, as_id: int, gfn: int) -> bool:
        """Whether gfn is write-tracked: no SPTE may map it writable (the core emulates
        writes to it and reports them through ``mmu_track_write``)."""
        return gfn in self._tracked[as_id]

    def tracked_gfns(self) -> frozenset[tuple[int, int]]:
        """Every write-tracked (as_id, gfn), for audits."""
        return frozenset((as_id, gfn) for as_id, t in enumerate(self._tracked) for gfn in t)

    def _lpage_disallowed_in(self, as_id: int, start: int, end: int) -> bool:
        t = self._lpage_disallowed[as_id]
        if end - start > len(t):
            return any(start <= g < end for g in t)
        return any(g in t for g in range(start, end))

    # --- MMU notifier (registered with the host mm) ----------------------------------------------
    # KVM's protocol (virt/kvm/kvm_main.c): invalidate_range_start raises
    # mmu_invalidate_in_progress and widens the range in progress, then zaps; the host changes
    # or frees the pages; invalidate_range_end bumps mmu_invalidate_seq and drops the count.
    # A fault samples the sequence before get_user_pages and, under the MMU lock, retries if
    # its gfn lies in a range in progress or the sequence moved (mmu_invalidate_retry_gfn), so
    # it never installs a pfn the host is taking away.
    def invalidate_range_start(self, start: int, end: int, event: str) -> None:
        self.mmu_invalidate_in_progress += 1
        spaces = (0,) if mutants.on("notifier-skips-smm") else (0, 1)
        ranges = [(as_id, first, last) for as_id in spaces
                  for _slot, first, last in self.memslots[as_id].overlapping_hva(start, end)]
        self._invalidating.append(ranges)
        flush = False
        for as_id, first, last in ranges:
            res = self.hook.mmu_unmap_gfn_range(vm=self, as_id=as_id, start=first, end=last,
                                                event=event)
            if res is None and not self.hook.mmu_unmap_gfn_range.get_hookimpls():
                res = self.hook.mmu_zap_gfn_range(vm=self, as_id=as_id, start=first, end=last)
            flush |= bool(res)
        if flush and not mutants.on("no-flush-after-zap"):
            self.flush_remote_tlbs()

    def invalidate_range_end(self, start: int, end: int, event: str) -> None:
        self.mmu_invalidate_seq += 1
        self.mmu_invalidate_in_progress -= 1
        self._invalidating.pop(0)  # ranges end in the order they started (one host mm lock)

    def invalidating_gfn(self, as_id: int, gfn: int) -> bool:
        """Whether gfn lies in an MMU-notifier invalidation that has started and not yet
        ended (its SPTEs may still map the old pfn). For audits; faults use
        ``mmu_invalidate_retry_gfn``."""
        return any(a == as_id and first <= gfn < last
                   for ranges in self._invalidating for a, first, last in ranges)

    def mmu_invalidate_retry_gfn(self, mmu_seq: int, as_id: int, gfn: int) -> bool:
        """KVM's mmu_invalidate_retry_gfn: call under the MMU lock (either mode) with
        ``mmu_seq``, the ``mmu_invalidate_seq`` sampled before ``gfn_to_pfn``; True means the
        pfn (or the memslot) may be stale and the fault must return Ret.RETRY without
        installing anything. No switch point."""
        if mutants.on("skip-invalidate-retry"):
            return False
        if self.mmu_invalidate_in_progress and self.invalidating_gfn(as_id, gfn):
            return True
        return self.mmu_invalidate_seq != mmu_seq

    def clear_young(self, start: int, end: int) -> int:
        young = 0
        age = self._age_gfn_range  # resolved at creation; None: the backend does not age
        for as_id in (0, 1):
            for _slot, first, last in self.memslots[as_id].overlapping_hva(start, end):
                young += int(bool(age(self, as_id, first, last))) if age else last - first
        return young

    # --- figures ---------------------------------------------------------------------------------
    def memory(self):
        return self.hook.mmu_memory(vm=self)


def _count_up(counts: dict[int, int], key: int) -> None:
    counts[key] = counts.get(key, 0) + 1


def _count_down(counts: dict[int, int], key: int) -> None:
    n = counts.get(key, 0) - 1
    if n <= 0:
        counts.pop(key, None)
    else:
        counts[key] = n
