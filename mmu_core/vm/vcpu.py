"""A vCPU: architectural register state, its TLB, and the loop that runs guest programs.

`Vcpu.run()` is the body of the vCPU's engine task. It enters the jitted CPU loop and handles
what comes back the way KVM's vcpu_run does: a fault goes to the backend's mmu_page_fault,
an emulation request to the core emulator, INVLPG/MOV CR to the core and, where shadow paging
intercepts them, to the backend. Guest-visible results of every operation land in `results`.
Under EPT the vCPU turns page-modification logging on while any memslot logs dirty pages,
drains the log at every exit (and when the dirty log is read), and takes the PML-full exit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mmu_core import mutants
from mmu_core.arch.x86 import ept as E
from mmu_core.arch.x86 import errcode as EC
from mmu_core.arch.x86 import paging as P
from mmu_core.arch.x86 import spte as S
from mmu_core.errors import BackendError, GuestError
from mmu_core.hw import cpu as C
from mmu_core.hw import walker as W
from mmu_core.hw.tlb import (
    ALL_PCIDS,
    new_tlb,
    tlb_flush_addr,
    tlb_flush_all,
    tlb_flush_nonglobal,
    tlb_flush_pcid,
    tlb_flush_va,
)
from mmu_core.types import FaultKind, PageFault, Ret, Role

if TYPE_CHECKING:
    from mmu_core.vm.vm import VM

# Requests serviced before the next entry (KVM_REQ_*).
REQ_TLB_FLUSH = 1 << 0
REQ_MMU_RELOAD = 1 << 1
REQ_MMU_SYNC = 1 << 2  # KVM_REQ_MMU_SYNC: bring unsync shadow pages in sync (shadow paging)
#: KVM_REQ_TLB_FLUSH_GUEST (kvm_vcpu_flush_tlb_guest): everything the guest's TLB may hold;
#: under shadow paging the current root synced and unsync previous roots freed first
REQ_TLB_FLUSH_GUEST = 1 << 3
#: a vCPU faulting this often on one operation means the backend's fix does not take
MAX_FAULTS_PER_OP = 1000
#: a fault handler's return value -> its name in Vcpu.faults (Ret(ret) is an enum lookup per
#: fault); a value that is not a Ret still raises, from Ret(ret)
_OUTCOMES = {int(r): r.name.lower() for r in Ret}

# SMM (KVM: arch/x86/kvm/smm.c). SMBASE after reset (kvm_vcpu_reset), and where the 64-bit
# state-save map keeps what the model saves, as offsets from the vCPU's SMBASE (struct
# kvm_smram_state_64, the AMD64 layout KVM uses for every 64-bit-capable guest).
SMBASE = 0x30000
SMRAM_SS = 0xFE20  # selector, then attributes from bit 16 (DPL in bits 5-6 of them: the CPL)
SMRAM_EFER = 0xFED0
SMRAM_REVISION = 0xFEF8  # smm_revision is the high half of this word (0xFEFC)
SMRAM_SMBASE = 0xFF00  # the low half
SMRAM_CR4 = 0xFF48
SMRAM_CR3 = 0xFF50
SMRAM_CR0 = 0xFF58
SMRAM_RFLAGS = 0xFF70
SMM_REVISION_64 = 0x00020064  # KVM's smm_revision for the 64-bit map
_RFLAGS_AC = 1 << 18

_CR0_PAGING_BITS = P.CR0_PG | P.CR0_WP | P.CR0_PE
_CR4_PAGING_BITS = P.CR4_PAE | P.CR4_PSE | P.CR4_SMEP | P.CR4_SMAP | P.CR4_PKE | P.CR4_LA57


def mmio_read_value(gpa: int) -> int:
    """What the model's MMIO device returns for a read: a fixed function of the address."""
    return (gpa * 0x9E3779B97F4A7C15) & 0x7FFF_FFFF_FFFF_FFFF


PML_ENTITY_NUM = W.PML_ENTITY_NUM  # vmx.h: the PML buffer is one 4 KiB page of 8-byte GPAs


class Vcpu:
    def __init__(self, vm: VM, vcpu_id: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.cr0 = P.CR0_PE | P.CR0_PG | P.CR0_WP
        self.cr3 = 0
        self.cr4 = P.CR4_PAE
        self.efer = P.EFER_LME | P.EFER_LMA | P.EFER_NXE
        self.pkru = 0
        self.cpl = 0
        self.ac = False
        self.smm = False
        self.smbase = SMBASE  # firmware relocates it (each CPU its own save area) at boot
        self.smi_latched = False  # an SMI that arrived in SMM, delivered after RSM
        self.pdptrs = [0, 0, 0, 0]
        self.tlb = new_tlb(vm.config.tlb_entries)
        self.requests = 0
        self.mmu_root: int | None = None
        self.regs = W.new_regs()
        self.hwregs = W.new_regs()
        self.xinfo = np.zeros(C.XI_SIZE, dtype=np.int64)
        self.hw_stats = np.zeros(C.ST_SIZE, dtype=np.int64)
        self.exits: dict[str, int] = {}
        self.faults: dict[str, int] = {}
        self.mmio: list[tuple[int, int, int, int]] = []  # (op index, gpa, is_write, value)
        self.task = None
        # The page-modification log (SDM 29.3.6), a VMCS-referenced page of 512 GPAs: entry
        # 0 holds how many are logged, then the GPAs. The hardware appends when it sets an
        # EPT D bit while PML is on; KVM drains it into the dirty bitmaps on every exit and
        # when userspace reads the log.
        self.pml = np.zeros(PML_ENTITY_NUM + 1, dtype=np.int64)
        self._pml_on = False  # PML enabled in this vCPU's VMCS (SECONDARY_EXEC_ENABLE_PML)
        self._pml_generation = -1  # the memslots generation _pml_on was decided at
        # Nested (docs/nested.md): the L2 guest this vCPU runs (KVM's is_guest_mode), or None
        # in L1; the EPT02 root the hardware walks in L2; the host state it was loaded at.
        self.l2 = None
        self.nested_root: int | None = None
        self._nested_seen = -1
        # VPID (SDM 28.1): with L1 giving its L2 a VPID, L1's and L2's linear and combined
        # mappings are tagged apart, so a switch keeps both. Modelled as one TLB per tag:
        # `tlb` is the running context's, `tlb_other` the other's (None until L2 has a VPID);
        # `_vpid12`/`_eptp12` the VPID (KVM maps it to its vpid02) and EPTP the L2 TLB
        # holds entries of.
        self.tlb_other: np.ndarray | None = None
        self._vpid12 = 0
        self._eptp12 = -1
        self._sync_regs()

    def flush_pml(self, kick: bool = False) -> int:
        """vmx_flush_pml_buffer: mark every logged gfn dirty in its slot and empty the
        buffer; returns how many entries there were. `kick` charges the IPI that makes a
        running vCPU exit to do it (kvm_arch_sync_dirty_log kicks every vCPU when PML is in
        use); the model then drains the buffer in the caller, which is charged for it too.
        Charged (a switch point) only when there is a kick or an entry."""
        vm = self.vm
        engine = vm.engine
        task = self.task
        if kick and self._has_pml() and task is not None and task.started and not task.finished:
            engine.delay(engine.cost.vcpu_kick)
        n = int(self.pml[0])
        if not n:
            return 0
        for gpa in self.pml[1:n + 1].tolist():
            vm.mark_page_dirty(self.as_id, gpa >> 12)
        self.pml[0] = 0
        engine.delay(n * engine.cost.pml_flush_per_entry, None if kick else "exit")
        return n

    def _has_pml(self) -> bool:
        """KVM uses PML on this VM (enable_pml, which needs EPT A/D; EPT, so not under
        shadow paging)."""
        return self.vm.params.pml_enabled and not self.shadowing

    def _pml_log(self) -> np.ndarray:
        """The log the hardware writes during the next entry: the PML buffer while PML is on
        for this vCPU, else walker.NO_PML. KVM turns PML on in every vCPU while any memslot
        logs dirty pages (kvm_mmu_update_cpu_dirty_logging: a request each vCPU services
        before its next entry, vmx_update_cpu_dirty_logging). Every change of a slot's flags
        installs new memslots, which bumps the generation, so the vCPU looks again when
        that changed."""
        vm = self.vm
        if self._pml_generation != vm.generation:
            self._pml_generation = vm.generation
            self._pml_on = self._has_pml() and any(
                slot.log_dirty for slots in vm.memslots for slot in slots.slots)
        return self.pml if self._pml_on else W.NO_PML

    def _drain_pml(self) -> None:
        """What vmx_handle_exit does first on every VM exit: flush the PML buffer."""
        if self.pml[0]:
            self.flush_pml()

    def _exit(self, reason: str) -> None:
        """A VM exit that KVM handles without the MMU, and the entry after it: counted,
        charged, and the PML buffer drained."""
        self._count(self.exits, reason)
        self._drain_pml()
        cost = self.vm.engine.cost
        self.vm.engine.delay(cost.vm_exit + cost.vm_entry, "exit")

    # --- architectural state -------------------------------------------------------------
    @property
    def as_id(self) -> int:
        return 1 if self.smm else 0

    @property
    def mode(self) -> int:
        return P.paging_mode(self.cr0, self.cr4, self.efer)

    @property
    def pcid(self) -> int:
        """The current PCID (kvm_get_active_pcid): CR3[11:0] while CR4.PCIDE=1, else 0."""
        return self.cr3 & P.CR3_PCID_MASK if self.cr4 & P.CR4_PCIDE else 0

    def set_paging(self, cr0: int, cr4: int, efer: int, cr3: int) -> None:
        """Set up paging state before the vCPU runs (what a test's setup code does)."""
        if cr4 & P.CR4_PCIDE and not (efer & P.EFER_LMA and cr0 & P.CR0_PG):
            raise GuestError("CR4.PCIDE needs long mode (EFER.LMA=1, CR0.PG=1)")
        self.cr0, self.cr4, self.efer, self.cr3 = cr0, cr4, efer, cr3
        if self.mode == P.MODE_PAE and not self._load_pdptrs(cr3):
            raise GuestError(f"a PDPTE at cr3 {cr3:#x} has a reserved bit set")
        self._sync_regs()
        tlb_flush_all(self.tlb)
        self.mmu_root = None

    def _flags(self, hw: bool) -> int:
        f = 0
        if self.cr0 & P.CR0_WP or hw:
            f |= W.F_WP  # shadow paging runs the hardware with CR0.WP=1 (KVM forces it)
        if self.efer & P.EFER_NXE or hw:
            f |= W.F_NXE
        # With paging off there are no user pages to protect; KVM also clears SMEP/SMAP in the
        # hardware CR4 it runs a non-paging guest with under shadow paging (vmx_set_cr4).
        paging = self.mode != P.MODE_NONE
        if self.cr4 & P.CR4_SMEP and paging:
            f |= W.F_SMEP
        if self.cr4 & P.CR4_SMAP and paging:
            f |= W.F_SMAP
        if self.cr4 & P.CR4_PKE and not hw:
            f |= W.F_PKE
        # Global pages (SDM 4.10.2.4): the guest's tables under TDP. KVM's shadow SPTEs never
        # carry G ("KVM doesn't mark global entries in the shadow page tables",
        # kvm_handle_invpcid), so the hardware under shadow paging holds no global entries.
        if self.cr4 & P.CR4_PGE and paging and not hw:
            f |= W.F_PGE
        if self.cr4 & P.CR4_PSE:
            f |= W.F_PSE
        if self.ac:
            f |= W.F_AC
        if self.cpl == 3:
            f |= W.F_USER
        return f

    def _sync_regs(self) -> None:
        r = self.regs
        r[W.R_MODE] = self.mode
        r[W.R_CR3] = self.cr3
        r[W.R_FLAGS] = self._flags(False)
        r[W.R_PKRU] = self.pkru
        r[W.R_MAXPHY] = self.vm.config.maxphyaddr
        r[W.R_PDPTR : W.R_PDPTR + 4] = self.pdptrs
        r[W.R_PCID] = self.pcid
        h = self.hwregs
        h[W.R_MODE] = P.MODE_5LEVEL if self.mode == P.MODE_5LEVEL else P.MODE_4LEVEL
        h[W.R_CR3] = (self.mmu_root or 0) << 12
        h[W.R_FLAGS] = self._flags(True)
        h[W.R_PKRU] = 0
        h[W.R_MAXPHY] = S.HOST_MAXPHYADDR  # so shadow MMIO SPTEs hit a reserved bit
        # vmx_load_mmu_pgd without EPT: the hardware CR3 is the shadow root | the active PCID
        h[W.R_PCID] = self.pcid

    def _load_pdptrs(self, cr3: int) -> bool:
        """MOV CR3 in PAE mode loads the four PDPTE registers from guest memory (SDM 4.4.1);
        if one is present with a reserved bit set, it loads none and returns False (the
        instruction raises #GP(0) and changes nothing)."""
        base = cr3 & 0xFFFFFFE0
        pdptrs = [self.vm.read_guest_u64(self.as_id, base + 8 * i) for i in range(4)]
        if any(W.pdpte_reserved(e, self.vm.config.maxphyaddr) for e in pdptrs):
            return False
        self.pdptrs = pdptrs
        return True

    @property
    def shadowing(self) -> bool:
        return self.vm.role is not Role.DIRECT

    # --- running ---------------------------------------------------------------------------
    def flush_tlb(self) -> None:
        tlb_flush_all(self.tlb)

    def _flush_tlbs(self) -> None:
        """Every context's entries (kvm_flush_remote_tlbs is an INVEPT all-context: it drops
        guest-physical and combined mappings whatever their VPID)."""
        tlb_flush_all(self.tlb)
        if self.tlb_other is not None:
            tlb_flush_all(self.tlb_other)

    def make_request(self, req: int) -> None:
        """kvm_make_request: serviced before the vCPU next enters the guest."""
        self.requests |= req

    def _service_requests(self) -> None:
        req, self.requests = self.requests, 0
        if req & REQ_TLB_FLUSH:
            self._flush_tlbs()
        if req & REQ_MMU_RELOAD:
            self._flush_tlbs()
            self.vm.hook_all("mmu_unload", vcpu=self)
            self.mmu_root = None
            self.nested_root = None  # the guest-mode roots go with the others
        if req & REQ_TLB_FLUSH_GUEST:
            if self.shadowing:
                # kvm_vcpu_flush_tlb_guest: the shadow tables must not keep what the guest
                # just invalidated (kvm_mmu_sync_roots, kvm_mmu_sync_prev_roots)
                if self.mmu_root is not None:
                    self.vm.hook.mmu_sync_roots(vcpu=self)
                self.vm.hook.mmu_sync_prev_roots(vcpu=self)
            self._flush_tlbs()
        if req & REQ_MMU_SYNC:
            if self.mmu_root is None:
                self.requests |= REQ_MMU_SYNC  # after mmu_load: the run loop comes back here
            else:
                self.vm.hook_all("mmu_sync_roots", vcpu=self)

    def run(self, prog: np.ndarray, results: np.ndarray, start: int = 0,
            end: int | None = None) -> None:
        """Run ops [start, end) of `prog`; results[i] gets (value, vector, error code) of op i."""
        srcu = self.vm.srcu
        srcu.read_lock()  # kvm_vcpu_srcu_read_lock in vcpu_run: held outside guest mode
        try:
            self._run_loop(prog, results, start, len(prog) if end is None else end)
        finally:
            if srcu.holding():  # not when killed in guest mode
                srcu.read_unlock()

    def _run_loop(self, prog: np.ndarray, results: np.ndarray, pc: int, end: int) -> None:
        vm = self.vm
        engine = vm.engine
        cost = engine.cost
        srcu = vm.srcu
        budget = max(1, cost.quantum // max(1, cost.guest_access))
        stats = self.hw_stats
        stuck_pc, stuck = -1, 0
        while pc < end:
            if self.requests:
                self._service_requests()
            if self.l2 is not None:
                if self.nested_root is None or self._nested_seen != vm.generation:
                    self._nested_load()
                    if self.requests:
                        continue
                before_ops, before_reads = stats[C.ST_OPS], stats[C.ST_WALK_READS]
                pc0 = pc
                srcu.read_unlock()  # vcpu_enter_guest leaves kvm->srcu for guest mode
                # L2 runs its own paging (the L2 guest's registers) through EPT02; vmcs02 has
                # no PML and the model's EPT02 no A/D flags (prepare_vmcs02_early).
                pc = C.run_ops(
                    prog, pc, end, results, vm.host.pt, vm.host.pt_slot, vm.host.tag,
                    self.regs, True, False, self.nested_root, 4, self.tlb, W.NO_PML,
                    self.xinfo, stats, budget,
                )
            else:
                if self.mmu_root is None:
                    vm.hook.mmu_load(vcpu=self)
                    if self.shadowing:
                        # kvm_mmu_load ends with flush_tlb_current: entries tagged with this
                        # PCID may come from a root no longer cached (freed by INVPCID, or
                        # evicted from prev_roots), which a MOV CR3 with the no-flush bit
                        # does not flush. (Under TDP every way here has flushed already.)
                        tlb_flush_all(self.tlb)
                    self._sync_regs()
                    if self.requests:
                        continue  # raised while mmu_load waited: service it before entering
                before_ops, before_reads = stats[C.ST_OPS], stats[C.ST_WALK_READS]
                pc0 = pc
                srcu.read_unlock()
                pc = C.run_ops(
                    prog, pc, end, results, vm.host.pt, vm.host.pt_slot, vm.host.tag,
                    self.hwregs if self.shadowing else self.regs, not self.shadowing,
                    vm.params.ept_ad, self.mmu_root, vm.root_levels(self), self.tlb,
                    self._pml_log(), self.xinfo, stats, budget,
                )
            if vm.recorder is not None and pc > pc0:
                vm.recorder.ops_done(self, prog, results, pc0, pc)  # before any switch point
            engine.delay(int(stats[C.ST_OPS] - before_ops) * cost.guest_access, "guest")
            reads = int(stats[C.ST_WALK_READS] - before_reads)
            if reads:
                engine.delay(reads * cost.walk_level, "walk")
            srcu.read_lock()  # the VM exit: back in KVM
            kind = int(self.xinfo[C.XI_KIND])
            if kind == C.X_NONE:
                continue
            if kind == C.X_OP:
                pc = self._do_op(prog, pc, results)
                if vm.recorder is not None:
                    vm.recorder.ops_done(self, prog, results, pc - 1, pc)
            elif kind == C.X_NEED_TABLE:
                vm.host.table(int(self.xinfo[C.XI_PFN]))
            elif kind == C.X_PML_FULL:
                self._exit("pml_full")  # drains the log; the op that found it full runs again
            else:
                if pc == stuck_pc:
                    stuck += 1
                    if stuck > MAX_FAULTS_PER_OP:
                        raise BackendError(
                            f"backend '{vm.backend_name}' made no progress: op {pc} "
                            f"({C.OP_NAMES[int(prog[pc, 0])]} {int(prog[pc, 1]):#x}) faulted "
                            f"{stuck} times in a row")
                else:
                    stuck_pc, stuck = pc, 0
                if self.l2 is not None:
                    pc = self._nested_fault(prog, pc, results, kind)
                else:
                    pc = self._fault(prog, pc, results, kind)

    # --- nested: L2 guests (docs/nested.md) -------------------------------------------------
    def enter_l2(self, l2) -> None:
        """L1 runs `l2` (VMLAUNCH/VMRESUME with its VMCS12): `l2` has `eptp` (the gpa of its
        EPT12 root) and `handle_ept_violation(vcpu, fault)`, L1's handler for the EPT
        violations reflected to it. The vCPU runs programs in L2 until `leave_l2`. Without
        VPIDs the transition flushes the TLB (nested_vmx_transition_tlb_flush)."""
        if not self.vm.params.ept:
            raise GuestError("nested EPT needs ept=on in L0")
        if not self.vm.managers[Role.NESTED].hook.mmu_nested_load.get_hookimpls():
            raise GuestError(f"backend '{self.vm.backends[Role.NESTED].name}' serves no "
                             "nested EPT")
        self.l2 = l2
        self.nested_root = None
        self._switch_tlb(True)

    def leave_l2(self) -> None:
        """Back to L1 (a nested VM exit L1 does not resume from)."""
        self._switch_tlb(False)
        self.l2 = None
        self.nested_root = None

    def _switch_tlb(self, into_l2: bool) -> None:
        """nested_vmx_transition_tlb_flush: without a VPID for L2 (vmcs12's VPID 0) every
        L1 <-> L2 switch flushes; with one, the running context's TLB changes (the entries
        are tagged apart), and entering with another VPID or EPTP than the L2 TLB holds
        flushes it."""
        vpid = getattr(self.l2, "vpid", 0) if self.l2 is not None else 0
        if not vpid:
            tlb_flush_all(self.tlb)
            return
        if self.tlb_other is None:
            self.tlb_other = new_tlb(self.vm.config.tlb_entries)
        self.tlb, self.tlb_other = self.tlb_other, self.tlb
        if into_l2 and (vpid, self.l2.eptp) != (self._vpid12, self._eptp12):
            # another VPID, or another EPTP: combined mappings are tagged with the EP4TA too
            tlb_flush_all(self.tlb)
            self._vpid12, self._eptp12 = vpid, self.l2.eptp

    def invvpid(self, kind: int, vpid: int, gla: int = 0) -> None:
        """L1 executes INVVPID (an exit L0 handles, handle_invvpid; SDM vol. 3C, INVVPID):
        type 0 individual-address (gla), 1 single-context, 2 all-context, 3
        single-context-retaining-globals. Invalidates the
        linear and combined mappings tagged with `vpid` (with EPT, KVM flushes vpid02's:
        vpid_sync_vcpu_addr / vpid_sync_context). A VPID of 0 for types 0, 1, 3 or an
        unknown type fails (VMfail)."""
        self._exit("invvpid")
        if kind not in (0, 1, 2, 3) or (kind != 2 and vpid == 0):
            raise GuestError(f"INVVPID type {kind} with VPID {vpid} fails (VMfailValid)")
        if kind != 2 and vpid != self._vpid12:
            return  # no entry of this vCPU carries that tag
        in_l2 = self.l2 is not None and getattr(self.l2, "vpid", 0)
        tlb = self.tlb if in_l2 else self.tlb_other
        if tlb is None:
            return
        if kind == 0:
            tlb_flush_va(tlb, gla, ALL_PCIDS)
        elif kind == 3:
            tlb_flush_nonglobal(tlb)
        else:
            tlb_flush_all(tlb)

    def request_nested_reload(self) -> None:
        """The backend dropped the EPT02 root this vCPU may use: load it again before the
        next L2 entry, with a flushed TLB (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS for guest mode)."""
        self.nested_root = None
        self.make_request(REQ_TLB_FLUSH)

    def _nested_load(self) -> None:
        vm = self.vm
        self._nested_seen = vm.generation
        self.nested_root = None
        root = self.vm.managers[Role.NESTED].hook.mmu_nested_load(vcpu=self, eptp=self.l2.eptp)
        if self.nested_root is None and not self.requests:
            self.nested_root = root

    def l1_store(self, gpa: int, value: int) -> None:
        """L1 (the guest hypervisor model) stores 8 bytes at its gpa: into its memory, marked
        dirty; when the page is an EPT12 page L0 write-tracks, the store exits and L0
        emulates it (charged) and the nested backend updates EPT02."""
        vm = self.vm
        pfn = vm.gfn_to_pfn_nowait(self.as_id, gpa >> 12)
        if pfn is None:
            raise GuestError(f"L1 store outside every memslot at {gpa:#x}")
        vm.host.table(pfn)[(gpa & 0xFFF) >> 3] = np.uint64(value & ((1 << 64) - 1))
        vm.mark_page_dirty(self.as_id, gpa >> 12)
        inflight = (self.as_id, gpa >> 12)
        vm._track_writes.append(inflight)  # until the backend has caught up (as emulate)
        try:
            tracked = vm.managers[Role.NESTED].hook.mmu_nested_ept12_write(vcpu=self, gpa=gpa,
                                                                           new=value)
        finally:
            vm._track_writes.remove(inflight)
        if tracked:
            self._count(self.exits, "ept12_write")
            cost = vm.engine.cost
            vm.engine.delay(cost.vm_exit + cost.emulate + cost.vm_entry, "exit")

    def invept(self, eptp: int | None) -> None:
        """L1 executes INVEPT (an exit L0 handles): single-context for eptp, all-context
        for None."""
        self._exit("invept")
        self.vm.managers[Role.NESTED].hook.mmu_nested_invept(vcpu=self, eptp=eptp)
        self._flush_tlbs()  # the EPTP's combined mappings, whatever their VPID

    def _nested_fault(self, prog: np.ndarray, pc: int, results: np.ndarray, kind: int) -> int:
        """An EPT violation or misconfiguration on EPT02 while in L2 (KVM: handle_ept_violation
        with the guest-mode MMU): the nested backend fixes it, or it is reflected to L1."""
        vm = self.vm
        x = self.xinfo
        acc = int(x[C.XI_ACC])
        qual = int(x[C.XI_CODE])
        fk = FaultKind.EPT_VIOLATION if kind == C.X_EPT_VIOLATION else FaultKind.EPT_MISCONFIG
        fault = PageFault(fk, gva=int(x[C.XI_GVA]), gpa=int(x[C.XI_GPA]), error_code=0,
                          exit_qualification=qual)
        fault.write = bool(qual & E.EPT_QUAL_WRITE)
        fault.fetch = acc == EC.ACC_FETCH
        fault.user = self.cpl == 3
        self._count(self.exits, "l2_" + fk.value)
        cost = vm.engine.cost
        vm.engine.delay(cost.vm_exit, "exit")
        hook = vm.managers[Role.NESTED].hook
        ret = hook.mmu_nested_page_fault(vcpu=self, fault=fault, eptp=self.l2.eptp)
        if ret is None:
            raise GuestError(f"nested backend returned nothing for {fk.value} at {fault.gpa:#x}")
        self._count(self.faults, "nested_" + (_OUTCOMES.get(ret) or Ret(ret).name.lower()))
        done = pc
        if ret == Ret.INJECT:
            # EPT12 does not map it: a nested VM exit to L1 (nested_ept_inject_page_fault,
            # nested_vmx_vmexit), L1's handler, its VMRESUME (an exit to L0, nested_vmx_run)
            # and the entry into L2.
            self._count(self.exits, "reflected_to_l1")
            vm.engine.delay(cost.nested_vmexit + cost.vm_entry, "exit")  # into L1
            vm.engine.delay(cost.l1_ept_fault, "exit")
            self._switch_tlb(False)
            self.l2.handle_ept_violation(self, fault)  # its stores to EPT12 may exit
            vm.engine.delay(cost.vm_exit + cost.nested_vmentry, "exit")  # L1's VMRESUME
            self._switch_tlb(True)
        elif ret == Ret.EMULATE:
            done = self.emulate(prog, pc, results)
        elif ret == Ret.RETRY:
            vm.engine.yield_now()
        vm.engine.delay(cost.vm_entry, "exit")
        return done

    def _count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def _fault(self, prog: np.ndarray, pc: int, results: np.ndarray, kind: int) -> int:
        vm = self.vm
        x = self.xinfo
        acc = int(x[C.XI_ACC])
        if kind == C.X_SHADOW_PF:
            fault = PageFault(FaultKind.SHADOW_PF, gva=int(x[C.XI_GVA]), gpa=0,
                              error_code=int(x[C.XI_CODE]))
        else:
            qual = int(x[C.XI_CODE])
            code = 0
            if qual & (E.EPT_RWX << E.EPT_QUAL_PERM_SHIFT):
                code |= EC.PFERR_PRESENT
            fk = FaultKind.EPT_VIOLATION if kind == C.X_EPT_VIOLATION else FaultKind.EPT_MISCONFIG
            if fk is FaultKind.EPT_MISCONFIG:
                code |= EC.PFERR_RSVD
            fault = PageFault(fk, gva=int(x[C.XI_GVA]), gpa=int(x[C.XI_GPA]), error_code=code,
                              exit_qualification=qual)
        # An EPT violation's qualification is authoritative: setting A/D in a guest table is a
        # write even when the instruction only read.
        if kind == C.X_SHADOW_PF:
            fault.write = acc == EC.ACC_WRITE
        else:
            fault.write = bool(fault.exit_qualification & E.EPT_QUAL_WRITE)
        fault.fetch = acc == EC.ACC_FETCH
        fault.user = self.cpl == 3
        if fault.write:
            fault.error_code |= EC.PFERR_WRITE
        self._count(self.exits, fault.kind.value)
        vm.engine.delay(vm.engine.cost.vm_exit, "exit")
        self._drain_pml()
        ret = None
        if vm.fast_page_fault is not None:  # the hooks, resolved at VM creation
            # KVM tries fast_page_fault first; None means "not a case the fast path fixes".
            ret = vm.fast_page_fault(self, fault)
            if ret is not None:
                self._count(self.faults, "fast_" + (_OUTCOMES.get(ret) or Ret(ret).name.lower()))
        if ret is None:
            ret = vm.page_fault(self, fault)
            if ret is None:
                raise GuestError(f"backend returned nothing for {fault.kind.value} at "
                                 f"{fault.gva:#x}")
            self._count(self.faults, _OUTCOMES.get(ret) or Ret(ret).name.lower())
        done = pc
        if ret == Ret.INJECT:
            results[pc] = (0, EC.PF_VECTOR, fault.inject_error_code)
            done += 1
            self._completed(prog, results, pc)
        elif ret == Ret.EMULATE:
            done = self.emulate(prog, pc, results)  # reports the op itself
        if ret == Ret.RETRY:
            vm.engine.yield_now()  # a retry loop spins: under pct, let the others run
        vm.engine.delay(vm.engine.cost.vm_entry, "exit")
        return done

    def _completed(self, prog: np.ndarray, results: np.ndarray, pc: int) -> None:
        """Op pc has completed: tell the VM's recorder, with no switch point in between."""
        if self.vm.recorder is not None:
            self.vm.recorder.ops_done(self, prog, results, pc, pc + 1)

    # --- emulation ---------------------------------------------------------------------------
    def emulate(self, prog: np.ndarray, pc: int, results: np.ndarray) -> int:
        """Perform op `pc` in software, as KVM's emulator does: a software walk of the guest's
        tables through memslots (setting A/D), then the access itself. Returns the next pc.
        """
        vm = self.vm
        vm.engine.delay(vm.engine.cost.emulate, "exit")
        op, gva, value = (int(v) for v in prog[pc])
        acc = C._acc_of(op)
        out = W.new_out()
        slots = vm.memslots[self.as_id]
        while True:
            W.walk(vm.host.pt, vm.host.pt_slot, self.regs, gva, acc, True, W.XL_SLOTS, 0, 0,
                   slots.array, vm.mm.hva_pfn, out)
            st = int(out[W.OUT_STATUS])
            for i in range(int(out[W.OUT_N])):  # guest tables whose A/D this walk set
                if int(out[W.OUT_ADW]) >> i & 1:
                    vm.mark_page_dirty(self.as_id, int(out[W.OUT_TGPA + i]) >> 12)
            if st == W.W_NEED_GFN or (st == W.W_OK and int(out[W.OUT_HPA]) < 0):
                # a guest table, or the data page itself, is not populated yet
                vm.gfn_to_pfn(self.as_id, int(out[W.OUT_ADDR]) >> 12, acc == EC.ACC_WRITE)
                continue
            if st == W.W_OK and acc == EC.ACC_WRITE:
                # A store into a page the host maps read-only (KSM) takes the write fault
                # first, as the emulator's copy to guest memory does: it must not change the
                # frame other pages share.
                wslot = slots.find(int(out[W.OUT_ADDR]) >> 12)
                if wslot is not None and not wslot.readonly and not vm.host_writable(
                        wslot.gfn_to_hva(int(out[W.OUT_ADDR]) >> 12)):
                    vm.gfn_to_pfn(self.as_id, int(out[W.OUT_ADDR]) >> 12, True)
                    continue
            break
        if st == W.W_PF:
            results[pc] = (0, EC.PF_VECTOR, int(out[W.OUT_CODE]))
            self._completed(prog, results, pc)
            return pc + 1
        gpa = int(out[W.OUT_ADDR])
        slot = slots.find(gpa >> 12)
        if st == W.W_NO_SLOT and not int(out[W.OUT_CODE]) & E.EPT_QUAL_GLA_FINAL:
            raise GuestError(f"guest page table at {gpa:#x} lies outside every memslot")
        if st == W.W_NO_SLOT or (slot is not None and slot.readonly and acc == EC.ACC_WRITE):
            pc = self._mmio(pc, gpa, op, value, results)
            self._completed(prog, results, pc - 1)
            return pc
        hpa = int(out[W.OUT_HPA])
        pfn = hpa >> 12
        host = vm.host
        if op in (C.OP_READ, C.OP_FETCH):
            results[pc, C.RES_VALUE] = int(host.tag[pfn])
        elif op == C.OP_WRITE:
            host.tag[pfn] = np.uint64(value)
        elif op == C.OP_RPTE:
            results[pc, C.RES_VALUE] = host.read_u64(hpa & ~7)
        else:
            nbytes = 8 if op == C.OP_WPTE else 4
            if nbytes == 8:
                host.write_u64(hpa & ~7, value)
            else:
                word = host.read_u64(hpa & ~7)
                sh = 32 * ((hpa >> 2) & 1)
                word = (word & ~(0xFFFFFFFF << sh)) | ((value & 0xFFFFFFFF) << sh)
                host.write_u64(hpa & ~7, word)
        self._completed(prog, results, pc)  # the access is done; what follows is KVM's
        if acc == EC.ACC_WRITE:
            vm.mark_page_dirty(self.as_id, gpa >> 12)
            if vm.is_tracked(self.as_id, gpa >> 12):
                nbytes = 4 if op == C.OP_WPTE32 else 8
                inflight = (self.as_id, gpa >> 12)
                vm._track_writes.append(inflight)  # until the backend has caught up
                try:
                    vm.hook_all("mmu_track_write", vcpu=self, gpa=gpa, nbytes=nbytes, new=value)
                finally:
                    vm._track_writes.remove(inflight)
        return pc + 1

    def _mmio(self, pc: int, gpa: int, op: int, value: int, results: np.ndarray) -> int:
        write = op in (C.OP_WRITE, C.OP_WPTE, C.OP_WPTE32)
        self.mmio.append((pc, gpa, int(write), value if write else mmio_read_value(gpa)))
        self._count(self.exits, "mmio")
        if not write:
            results[pc, C.RES_VALUE] = mmio_read_value(gpa)
        return pc + 1

    # --- operations the core handles ----------------------------------------------------------
    def _do_op(self, prog: np.ndarray, pc: int, results: np.ndarray) -> int:
        op, gva, value = (int(v) for v in prog[pc])
        vm = self.vm
        intercept = self.shadowing
        if op == C.OP_INVLPG:
            if intercept:
                # kvm_mmu_invlpg: flush_tlb_gva (the address, whatever its PCID) and the
                # address resynced in the current and previous roots
                tlb_flush_va(self.tlb, gva, ALL_PCIDS)
                self._exit("invlpg")
                vm.hook.mmu_invlpg(vcpu=self, gva=gva)
            else:
                tlb_flush_va(self.tlb, gva, self.pcid)  # the current PCID's and the global
        elif op == C.OP_MOV_CR3:
            return self._mov_cr3(pc, value & ((1 << 64) - 1), results)
        elif op in (C.OP_MOV_CR0, C.OP_MOV_CR4):
            old = (self.cr0, self.cr4)
            if op == C.OP_MOV_CR0 and not value & P.CR0_PG and self.cr4 & P.CR4_PCIDE:
                self._exit("cr")
                return self._gp(results, pc)  # clearing CR0.PG with CR4.PCIDE=1 (kvm_set_cr0)
            if op == C.OP_MOV_CR4 and value & P.CR4_PCIDE and not old[1] & P.CR4_PCIDE and (
                    self.mode not in (P.MODE_4LEVEL, P.MODE_5LEVEL)
                    or self.cr3 & P.CR3_PCID_MASK):
                self._exit("cr")
                return self._gp(results, pc)  # PCIDE 0 -> 1 outside long mode or PCID != 0
            if op == C.OP_MOV_CR0:
                self.cr0 = value
            else:
                self.cr4 = value
            tlb_flush_all(self.tlb)
            changed = (old[0] ^ self.cr0) & _CR0_PAGING_BITS or (old[1] ^ self.cr4) & _CR4_PAGING_BITS
            self._exit("cr")
            if changed and self.mode == P.MODE_PAE and not self._load_pdptrs(self.cr3):
                self.cr0, self.cr4 = old
                return self._gp(results, pc)
            if changed:
                vm.hook_all("mmu_unload", vcpu=self)
                self.mmu_root = None
                vm.hook_all("mmu_reset_context", vcpu=self)
            if intercept:
                self._post_set_cr4(old[1], bool(changed))
        elif op == C.OP_INVPCID:
            return self._invpcid(pc, gva, value & ((1 << 64) - 1), results)
        elif op == C.OP_SET_CPL:
            self.cpl = value
        elif op == C.OP_SET_AC:
            self.ac = bool(value)
        elif op == C.OP_WRPKRU:
            self.pkru = value & 0xFFFFFFFF
        elif op == C.OP_PAUSE:
            vm.engine.delay(value, "guest")
            return pc + 1  # no architectural state changed
        elif op == C.OP_SMI:
            if self.smm:
                self.smi_latched = True  # SMIs are blocked in SMM (SDM 32.5)
            else:
                self.enter_smm()
        elif op == C.OP_RSM:
            if not self.smm:
                results[pc] = (0, EC.UD_VECTOR, 0)
                return pc + 1
            self.leave_smm()
            if self.smi_latched:  # kvm_smm_changed: "process a latched INIT or SMI"
                self.smi_latched = False
                self.enter_smm()
        else:
            raise GuestError(f"unknown guest operation {op} at index {pc}")
        self._sync_regs()
        return pc + 1

    # --- SMM --------------------------------------------------------------------------------
    def enter_smm(self) -> None:
        """enter_smm (smm.c): exit, save the state in SMRAM (at SMBASE + 0xFE00, written
        through address space 1 once the vCPU is in SMM, as kvm_vcpu_write_guest does after
        kvm_smm_changed), then run with paging and protection off, CPL 0, CR4 and EFER
        clear. Address space 1 gets a new MMU context (kvm_mmu_reset_context: role.smm)."""
        if self.l2 is not None:
            raise GuestError("an SMI in L2 is not modelled (KVM leaves guest mode first)")
        self._exit("smi")  # drains PML into address space 0's slots before the switch
        saved = {SMRAM_CR0: self.cr0, SMRAM_CR3: self.cr3, SMRAM_CR4: self.cr4,
                 SMRAM_EFER: self.efer, SMRAM_RFLAGS: _RFLAGS_AC if self.ac else 0,
                 SMRAM_SS: (self.cpl & 3) << (16 + 5), SMRAM_REVISION: SMM_REVISION_64 << 32,
                 SMRAM_SMBASE: self.smbase}
        self.smm = True
        self._smm_changed()
        for off, value in saved.items():
            self._smram_write(off, value)
        self.cr0 &= ~(P.CR0_PE | P.CR0_PG)  # and EM, TS, which the model does not have
        self.cr4 = 0
        self.efer = 0
        self.cpl = 0
        self.ac = False
        self._sync_regs()

    def leave_smm(self) -> None:
        """RSM (em_rsm, emulator_leave_smm): exit, read the state back from SMRAM (what the
        SMM handler left there), leave SMM and restore it; a state that cannot be loaded
        (reserved PDPTE bits in PAE) shuts the VM down, as KVM's triple fault does."""
        self._exit("rsm")
        cr0, cr3, cr4, efer, rflags, ss, smbase = (self._smram_read(off) for off in (
            SMRAM_CR0, SMRAM_CR3, SMRAM_CR4, SMRAM_EFER, SMRAM_RFLAGS, SMRAM_SS, SMRAM_SMBASE))
        self.smbase = smbase & 0xFFFF_FFFF  # SMBASE relocation (rsm_load_state_64)
        self.smm = False
        self.cr0, self.cr3, self.cr4, self.efer = cr0, cr3, cr4, efer
        self.ac = bool(rflags & _RFLAGS_AC)
        self.cpl = (ss >> (16 + 5)) & 3
        self._smm_changed()
        if self.mode == P.MODE_PAE and not self._load_pdptrs(cr3):
            raise GuestError(f"RSM: a PDPTE at cr3 {cr3:#x} has a reserved bit set (the "
                             "vCPU shuts down)")
        self._sync_regs()

    def _smm_changed(self) -> None:
        """kvm_smm_changed -> kvm_mmu_reset_context: the MMU role (smm, hence as_id) changed;
        the old translations go (paging is turned off on entry and reloaded at RSM)."""
        vm = self.vm
        tlb_flush_all(self.tlb)
        if mutants.on("smm-keeps-root"):
            return
        vm.hook_all("mmu_unload", vcpu=self)
        self.mmu_root = None
        vm.hook_all("mmu_reset_context", vcpu=self)

    def _smram_pfn(self, gpa: int) -> int:
        pfn = self.vm.gfn_to_pfn_nowait(1, gpa >> 12)
        if pfn is None:
            raise GuestError(f"SMM: no memslot of address space 1 holds SMRAM at "
                             f"{gpa:#x} (KVM kills the VM)")
        return pfn

    def _smram_write(self, off: int, value: int) -> None:
        gpa = self.smbase + off
        self.vm.host.write_u64((self._smram_pfn(gpa) << 12) | (gpa & 0xFF8), value)
        self.vm.mark_page_dirty(1, gpa >> 12)

    def _smram_read(self, off: int) -> int:
        gpa = self.smbase + off
        self._smram_pfn(gpa)  # the same error when SMRAM went away while in SMM
        return self.vm.read_guest_u64(1, gpa)
    def _mov_cr3(self, pc: int, value: int, results: np.ndarray) -> int:
        """MOV to CR3 (SDM 4.10.4.1; KVM's kvm_set_cr3 where it intercepts it, shadow paging).
        With CR4.PCIDE=1, CR3[11:0] is the PCID and bit 63 set keeps the new PCID's entries
        (the bit is not stored); otherwise the load invalidates the new PCID's non-global
        entries. Bit 63 without PCIDs is reserved: #GP."""
        vm = self.vm
        intercept = self.shadowing
        noflush = bool(value & P.CR3_PCID_NOFLUSH)
        if noflush:
            if not self.cr4 & P.CR4_PCIDE:
                if intercept:
                    self._exit("cr3")
                return self._gp(results, pc)
            value &= ~P.CR3_PCID_NOFLUSH
        if self.mode == P.MODE_PAE and not self._load_pdptrs(value):
            if intercept:
                self._exit("cr3")
            return self._gp(results, pc)
        self.cr3 = value
        if intercept:
            self._exit("cr3")
            self.mmu_root = None
            # kvm_mmu_new_pgd: fast_pgd_switch may reuse a cached root (setting mmu_root);
            # otherwise mmu_load builds one before the next entry, synced and flushed.
            vm.hook.mmu_new_cr3(vcpu=self, cr3=value)
            if not noflush:
                self._invalidate_pcid(self.pcid)
        elif not noflush:
            tlb_flush_pcid(self.tlb, self.pcid)
        self._sync_regs()
        return pc + 1

    def _invalidate_pcid(self, pcid: int) -> None:
        """kvm_invalidate_pcid (shadow paging): the guest invalidated every non-global
        translation of `pcid`. For the current PCID the roots are synced before the next
        entry and the TLB flushed (KVM_REQ_MMU_SYNC, KVM_REQ_TLB_FLUSH_CURRENT: the VPID's
        entries, every PCID's); with PCIDs on, cached previous roots of that PCID are freed,
        since a later MOV CR3 with the no-flush bit would reuse them unsynced."""
        if pcid == self.pcid:
            self.make_request(REQ_MMU_SYNC)
            tlb_flush_all(self.tlb)
        if self.cr4 & P.CR4_PCIDE and not mutants.on("invalidate-pcid-keeps-prev-roots"):
            self.vm.hook.mmu_invalidate_pcid(vcpu=self, pcid=pcid)

    def _post_set_cr4(self, old_cr4: int, reset: bool) -> None:
        """kvm_post_set_cr4 under shadow paging: turning PCIDs on frees every root (the
        cached ones were kept under PCID 0 and a no-flush MOV CR3 must not reuse them);
        toggling PGE or turning PCIDs off is KVM_REQ_TLB_FLUSH_GUEST."""
        diff = old_cr4 ^ self.cr4
        if diff & P.CR4_PCIDE and self.cr4 & P.CR4_PCIDE and not reset:
            self.vm.hook_all("mmu_unload", vcpu=self)
            self.mmu_root = None
        if diff & P.CR4_PGE or (diff & P.CR4_PCIDE and not self.cr4 & P.CR4_PCIDE):
            self.make_request(REQ_TLB_FLUSH_GUEST)

    def _invpcid(self, pc: int, gla: int, value: int, results: np.ndarray) -> int:
        """INVPCID (SDM vol. 2, INVPCID; 4.10.4.1): type 0 one address of one PCID (not its
        global entry), 1 one PCID's non-global entries, 2 everything, 3 every non-global
        entry. #GP(0) at CPL > 0 (before any VM exit), for an unknown type, a PCID field
        above 12 bits, a PCID other than 0 for types 0 and 1 while CR4.PCIDE=0, or a
        non-canonical address for type 0. Under TDP the hardware runs it; under shadow
        paging it exits to kvm_handle_invpcid, which reaches the MMU."""
        kind = value >> C.INVPCID_TYPE_SHIFT
        pcid = value & ((1 << C.INVPCID_TYPE_SHIFT) - 1)
        if self.cpl > 0:
            return self._gp(results, pc)
        intercept = self.shadowing
        if intercept:
            self._exit("invpcid")
        pcide = bool(self.cr4 & P.CR4_PCIDE)
        if kind > 3 or pcid > P.CR3_PCID_MASK or (kind <= 1 and not pcide and pcid) or (
                kind == 0 and not self._canonical(gla)):
            return self._gp(results, pc)
        vm = self.vm
        if not intercept:
            if kind == 0:
                tlb_flush_addr(self.tlb, gla, pcid)
            elif kind == 1:
                tlb_flush_pcid(self.tlb, pcid)
            elif kind == 2:
                tlb_flush_all(self.tlb)
            else:
                tlb_flush_nonglobal(self.tlb)
        elif kind == 0:
            # kvm_mmu_invpcid_gva: the address resynced in the roots of that PCID, and
            # flush_tlb_gva (KVM skips the flush when no root has the PCID; flushing anyway
            # only drops entries the guest may not rely on)
            tlb_flush_va(self.tlb, gla, ALL_PCIDS)
            if not mutants.on("invpcid-gva-not-reaching-mmu"):
                vm.hook.mmu_invpcid_gva(vcpu=self, gva=gla, pcid=pcid)
        elif kind == 1:
            self._invalidate_pcid(pcid)
        else:
            # "KVM doesn't mark global entries in the shadow page tables, so a non-global
            # flush just degenerates to a global flush"
            self.make_request(REQ_TLB_FLUSH_GUEST)
        return pc + 1

    def _canonical(self, gla: int) -> bool:
        """A canonical linear address in 4- and 5-level paging (any address otherwise)."""
        mode = self.mode
        if mode not in (P.MODE_4LEVEL, P.MODE_5LEVEL):
            return True
        bits = 57 if mode == P.MODE_5LEVEL else 48
        gla &= (1 << 64) - 1
        top = gla >> (bits - 1)
        return top == 0 or top == (1 << (65 - bits)) - 1

    @staticmethod
    def _gp(results: np.ndarray, pc: int) -> int:
        """#GP(0) for op pc, which changed nothing; the guest's handler skips it."""
        results[pc] = (0, EC.GP_VECTOR, 0)
        return pc + 1
