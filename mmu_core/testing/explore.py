"""The race explorer: concurrent scenarios, a reference model of guest memory, the invariant
audit after every engine step, and a loop over schedules.

One execution is named by (scenario, configuration, policy, seed) and replays exactly. The
engine is sequential, so the order in which guest accesses and host events completed is
known: the reference model (`Reference`) applies them in that order, and every guest read
must return what the reference holds at that moment (or, where the architecture allows a
stale translation, one of the values it may see). Content-preserving host events are
invisible to it; a lost write, a read of a freed or stale page, or a dirty page missing from
the log is a failure. `run_schedule` runs one execution; `explore` runs many, over local
processes or a Dask cluster, and reports the first failure with its replay command.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mmu_core import mutants
from mmu_core.arch.x86 import paging as P
from mmu_core.config import VMConfig
from mmu_core.errors import HostStateError, InvalidConfig, MMUError, UseAfterFree
from mmu_core.guest.machine import (
    DATA_GPA,
    DATA_SLOT,
    MMIO_GPA,
    MachineSpec,
    build_machine,
    page_patterns,
)
from mmu_core.guest.program import Program, new_results
from mmu_core.hw import cpu as C
from mmu_core.params import CONFIGURATIONS, configuration
from mmu_core.plugins import discover
from mmu_core.sim import DEFAULT_HOST_CPUS
from mmu_core.testing.audit import audit
from mmu_core.vm.vcpu import mmio_read_value


class Failure(Exception):
    """One execution went wrong; `invariant` names what."""

    def __init__(self, invariant: str, detail: str) -> None:
        self.invariant = invariant
        self.detail = detail
        super().__init__(f"{invariant}: {detail}")


# --- the reference model ---------------------------------------------------------------------
class Reference:
    """Guest memory as it must be: a value per host page (by hva index), updated as accesses
    and host events complete. Installed as the VM's recorder."""

    def __init__(self, machine) -> None:
        self.vm = machine.vm
        self.mem: dict[int, int] = {}
        # What a page never written holds: zero, or the handler's pattern in userfault ranges.
        self.initial: Callable[[int], int] = lambda idx: 0
        # The gfn of each write completed while `log_window` is open, in completion order: the
        # writes a dirty log must report (DirtyLogCheck). Scenarios whose logging goes on and
        # off close the window outside the time logging is guaranteed.
        self.log_window = True
        self.logged: list[int] = []
        self.remap: dict[tuple[int, int], tuple[int, int]] = {}  # (vcpu, op) -> (page, gfn)
        self.target: dict[int, int] = {}  # gva page -> gfn, for pages a scenario remaps
        # (vcpu, gva page) -> the gfns the page was mapped to since that vCPU last
        # invalidated it: its TLB may still hold any of them (architecturally allowed).
        self.stale: dict[tuple[int, int], set[int]] = {}
        # vCPUs in SMM (their accesses resolve in address space 1), and their latched SMIs
        self.smm: set[int] = set()
        self.smi_latched: set[int] = set()

    def remappable(self, page: int) -> None:
        """Declare that a scenario remaps gva page (identity-mapped at the start)."""
        self.target[page] = page

    def _gfns(self, vcpu_id: int, page: int) -> set[int]:
        if page not in self.target:
            return {page}  # identity-mapped data
        return {self.target[page]} | self.stale.get((vcpu_id, page), set())

    def _value(self, gfn: int, as_id: int = 0) -> tuple[int | None, bool]:
        """(hva index or None for MMIO, slot is read-only)."""
        slot = self.vm.memslots[as_id].find(gfn)
        if slot is None:
            return None, False
        return self.vm.mm.index(slot.gfn_to_hva(gfn)), slot.readonly

    def ops_done(self, vcpu, prog, results, lo: int, hi: int) -> None:
        for pc in range(lo, hi):
            op, gva, value = (int(v) for v in prog[pc])
            page = gva >> 12
            as_id = int(vcpu.id in self.smm)  # SMM runs with paging off: gva == gpa
            if op <= C.MEM_OPS_END:
                if results[pc, C.RES_VECTOR]:
                    raise Failure("reference", f"vcpu{vcpu.id} op {pc} ({C.OP_NAMES[op]} "
                                  f"{gva:#x}) took #PF {int(results[pc, C.RES_CODE]):#x}")
            if op in (C.OP_READ, C.OP_FETCH):
                got = int(results[pc, C.RES_VALUE])
                allowed = set()
                for gfn in self._gfns(vcpu.id, page):
                    idx, _ro = self._value(gfn, as_id)
                    allowed.add(mmio_read_value(gfn << 12 | (gva & 0xFFF)) if idx is None
                                else self.mem[idx] if idx in self.mem else self.initial(idx))
                if got not in allowed:
                    raise Failure("reference", f"vcpu{vcpu.id} op {pc} read {gva:#x} = "
                                  f"{got:#x}, the reference allows {sorted(allowed)}")
            elif op == C.OP_WRITE:
                (gfn,) = self._gfns(vcpu.id, page)
                idx, ro = self._value(gfn, as_id)
                if idx is not None and not ro:
                    self.mem[idx] = value
                    if self.log_window and not as_id:
                        self.logged.append(gfn)
            elif op in (C.OP_WPTE, C.OP_WPTE32):
                change = self.remap.get((vcpu.id, pc))
                if change is not None:
                    vpage, gfn = change
                    for v in self.vm.vcpus:
                        self.stale.setdefault((v.id, vpage), set()).add(self.target[vpage])
                    self.target[vpage] = gfn
            elif op == C.OP_INVLPG:
                self.stale.pop((vcpu.id, page), None)
            elif op == C.OP_MOV_CR3:
                for key in [k for k in self.stale if k[0] == vcpu.id]:
                    del self.stale[key]
            elif op == C.OP_SMI:
                (self.smi_latched if as_id else self.smm).add(vcpu.id)
            elif op == C.OP_RSM and as_id:
                if vcpu.id in self.smi_latched:
                    self.smi_latched.discard(vcpu.id)  # entered again at once
                else:
                    self.smm.discard(vcpu.id)

    def discard(self, lo: int, hi: int) -> None:
        """The host dropped hva indices [lo, hi): they read as never written from now on
        (zero, or in a userfault range what the handler supplies when they fault again)."""
        for i in range(lo, hi):
            self.mem.pop(i, None)


# --- scenarios ----------------------------------------------------------------------------------
@dataclass
class Run:
    machine: object
    programs: list[np.ndarray]
    ref: Reference
    tasks: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    final: list[Callable[[], None]] = field(default_factory=list)


def _page(i: int) -> int:
    return DATA_GPA + 4096 * i


def _machine(config: VMConfig, vcpus: int, pages: int, **spec) -> object:
    spec = MachineSpec(vcpus=vcpus, data_size=pages * 4096, mode=P.MODE_4LEVEL, **spec)
    return build_machine(spec, config)


def _value(rng: random.Random) -> int:
    return rng.randrange(1, 1 << 40)


def scenario_first_touch(config: VMConfig, rng: random.Random, backing: str = "anon") -> Run:
    """Four vCPUs write and read a few shared, never-touched pages: racing first touches."""
    pages = 512 if backing == "thp" else 8
    m = _machine(config, 4, pages, backing=backing)
    shared = [0, 1, 2, 3] if backing == "anon" else [0, 1, 300, 301]
    progs = []
    for v in range(4):
        prog = Program()
        for k in range(12):
            prog.write(_page(shared[(v + k) % 4]), _value(rng)).read(_page(shared[(v + k + 1) % 4]))
        progs.append(prog.build())
    return Run(m, progs, Reference(m))


def scenario_first_touch_thp(config: VMConfig, rng: random.Random) -> Run:
    return scenario_first_touch(config, rng, backing="thp")


def scenario_pte_edit(config: VMConfig, rng: random.Random) -> Run:
    """vCPU 0 remaps a page among three frames, INVLPGs it and reads it back (it must see the
    new frame); vCPU 1 reads the page throughout (any frame it was mapped to is allowed)."""
    m = _machine(config, 2, 8)
    ref = Reference(m)
    pts = m.pts
    x, targets = 0, [4, 5, 6]
    _fill(ref, m, targets, rng)
    ref.remappable(_page(x) >> 12)
    e_gpa = pts.entry_gpa(_page(x), 1, create=False)
    a = Program()
    for k in range(8):
        t = targets[rng.randrange(3)]
        ref.remap[len(a.rows)] = (_page(x) >> 12, _page(t) >> 12)
        a.store_pte(pts.pt_gva_of(e_gpa), pts.leaf_value(_page(t), P.PT_PRESENT | P.PT_WRITABLE
                                                          | P.PT_USER))
        a.invlpg(_page(x)).read(_page(x)).read(_page(1 + k % 3))
    ref.remap = {(0, pc): change for pc, change in ref.remap.items()}
    b = Program()
    for _ in range(24):
        b.read(_page(x))
    return Run(m, [a.build(), b.build()], ref)


def _writers(m, rng: random.Random, pages: list[int], rounds: int,
             pause_ns: int = 2000) -> list[np.ndarray]:
    """A program per vCPU: `rounds` reads or writes of random `pages`, with a pause of up to
    `pause_ns` after every third."""
    progs = []
    for _ in range(len(m.vm.vcpus)):
        prog = Program()
        for k in range(rounds):
            p = pages[rng.randrange(len(pages))]
            if rng.random() < 0.5:
                prog.write(_page(p), _value(rng))
            else:
                prog.read(_page(p))
            if k % 3 == 2:
                prog.pause(rng.randrange(0, pause_ns))
        progs.append(prog.build())
    return progs


def scenario_zap_all(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs fault pages in while a VMM task zaps everything, three times."""
    m = _machine(config, 2, 16)
    progs = _writers(m, rng, list(range(16)), 30)
    for k, prog in enumerate(progs):  # MMIO too: TDP's fast path walks under RCU alone
        mmio = Program()
        for _ in range(30):
            mmio.read(MMIO_GPA + 4096 * rng.randrange(2)).pause(rng.randrange(0, 1500))
        progs[k] = np.concatenate([prog, mmio.build()]) if k % 2 else \
            np.concatenate([mmio.build(), prog])
    run = Run(m, progs, Reference(m))
    delays = [rng.randrange(0, 40_000) for _ in range(3)]

    def vmm() -> None:
        for d in delays:
            m.vm.engine.delay(d)
            m.vm.zap_all()
    run.tasks.append(("vmm", vmm))
    return run


class DirtyLogCheck:
    """What a dirty log owes userspace: every page written while logging was on is in a
    harvest that ended after the write.

    A harvest is KVM_GET_DIRTY_LOG (fetch, clear and re-protect) or, with manual protection,
    KVM_GET_DIRTY_LOG's copy followed by KVM_CLEAR_DIRTY_LOG of the same bits; it ends when the
    call (the clear) returns, and userspace reads the pages after that. A write that completed
    before a harvest ended but is not in it must be in a later one: a union over all rounds
    would hide a write lost after its page had been reported once."""

    def __init__(self, ref: Reference, as_id: int = 0, slot_id: int = DATA_SLOT) -> None:
        self.ref = ref
        self.as_id = as_id
        self.slot_id = slot_id
        self.rounds: list[tuple[int, set[int]]] = []  # (writes recorded at its end, gfns)

    def harvest(self, vm, rng: random.Random | None = None) -> None:
        gfns = vm.get_dirty_log(self.as_id, self.slot_id)
        if vm.config.dirty_log_manual_protect and len(gfns):
            slot = vm.memslots[self.as_id].by_id(self.slot_id)
            bitmap = np.zeros(slot.npages, np.uint8)
            bitmap[gfns - slot.base_gfn] = 1
            # Userspace clears in 64-page-aligned pieces; two here, split at random.
            cut = 64 * (rng.randrange(slot.npages // 64 + 1) if rng else 0)
            for first, num in ((0, cut), (cut, slot.npages - cut)):
                if num:
                    vm.clear_dirty_log(self.as_id, self.slot_id, first, num,
                                       bitmap[first:first + num])
        self.rounds.append((len(self.ref.logged), set(gfns.tolist())))

    def check(self) -> None:
        slot = self.ref.vm.memslots[self.as_id].by_id(self.slot_id)
        later: list[set[int]] = [set()]  # later[k]: gfns of rounds k.. (reversed build)
        for _, gfns in reversed(self.rounds):
            later.append(later[-1] | gfns)
        later.reverse()
        k = 0
        for i, gfn in enumerate(self.ref.logged):
            if not slot.base_gfn <= gfn < slot.end_gfn:
                continue
            while k < len(self.rounds) and self.rounds[k][0] <= i:
                k += 1
            if gfn not in later[k]:
                raise Failure("dirty-lost", f"gfn {gfn:#x} written (write {i}) while logging was "
                              f"on is in no dirty-log harvest that ended after it ({k} of "
                              f"{len(self.rounds)} had ended)")


def scenario_dirty_log(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs write a logged slot while a collector fetches and clears the log; every page
    written must be in a later round's log."""
    m = _machine(config, 2, 16, log_dirty=True)
    ref = Reference(m)
    run = Run(m, _writers(m, rng, list(range(16)), 30), ref)
    log = DirtyLogCheck(ref)
    delays = [rng.randrange(0, 30_000) for _ in range(4)]

    def collector() -> None:
        for d in delays:
            m.vm.engine.delay(d)
            log.harvest(m.vm)

    def check() -> None:
        log.harvest(m.vm)
        log.check()
    run.tasks.append(("collector", collector))
    run.final.append(check)
    return run


def scenario_readonly(config: VMConfig, rng: random.Random) -> Run:
    """Writes to a READONLY slot exit as MMIO (setting the guest's D bit); the reads after
    them must still find the slot unwritable."""
    m = _machine(config, 2, 8, readonly=True)
    return Run(m, _writers(m, rng, list(range(8)), 20), Reference(m))


def scenario_host_events(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs use eight pages while the host drops, migrates, swaps and merges them."""
    m = _machine(config, 2, 8)
    ref = Reference(m)
    run = Run(m, _writers(m, rng, list(range(8)), 30), ref)
    vm = m.vm
    slot = vm.memslots[0].by_id(DATA_SLOT)
    hvas = [slot.gfn_to_hva(_page(i) >> 12) for i in range(8)]
    vm.mm.discard_listeners.append(ref.discard)
    plan = [(rng.randrange(0, 20_000), rng.choice(("dontneed", "migrate", "swap", "ksm")),
             rng.randrange(8), rng.randrange(8)) for _ in range(6)]

    run.tasks.append(("host", _host_events(vm, hvas, plan)))
    return run


def _host_events(vm, hvas: list[int], plan: list[tuple[int, str, int, int]]) -> Callable[[], None]:
    """A host task that, for each (delay, what, i, j) of `plan`, waits and then drops,
    migrates, swaps out page i or merges it with page j."""

    def host() -> None:
        for delay, what, i, j in plan:
            vm.engine.delay(delay)
            if what == "dontneed":
                vm.mm.madvise_dontneed(hvas[i], 4096)
            elif what == "migrate":
                vm.mm.migrate(hvas[i])
            elif what == "swap":
                vm.mm.swap_out(hvas[i])
            elif i != j:
                vm.mm.ksm_merge(hvas[i], hvas[j])  # merges only equal pages
    return host


def scenario_userfault(config: VMConfig, rng: random.Random) -> Run:
    """Three vCPUs write and read sixteen pages of a userfaultfd range that starts empty (one
    uffd per vCPU's part with a handler each, or, as the selftest's -a, one uffd with a
    reader per vCPU: the seed decides), while the host drops pages again with
    MADV_DONTNEED, migrates and swaps them: a dropped page faults to the handler once more.
    The faults sleep in handle_userfault with the mmap lock dropped, and UFFDIO_COPY and
    DONTNEED take it, so the MMU notifiers, the invalidation retry and the uffd wait queues
    all race the vCPUs' faults. A page the guest never wrote reads as the handler's
    pattern."""
    m = _machine(config, 3, 16, userfault=True, uffd_shared=rng.random() < 0.5)
    vm = m.vm
    ref = Reference(m)
    slot = vm.memslots[0].by_id(DATA_SLOT)
    first = vm.mm.index(slot.userspace_addr)
    ref.initial = lambda idx: int(page_patterns(np.array([slot.base_gfn + idx - first]))[0])
    m.spawn_uffd_handlers(rng.choice((0, 2_000)))
    run = Run(m, _writers(m, rng, list(range(16)), 30, pause_ns=4_000), ref)
    hvas = [slot.gfn_to_hva(_page(i) >> 12) for i in range(16)]
    vm.mm.discard_listeners.append(ref.discard)
    plan = [(rng.randrange(0, 15_000), rng.choice(("dontneed", "dontneed", "migrate", "swap")),
             rng.randrange(16), 0) for _ in range(8)]
    run.tasks.append(("host", _host_events(vm, hvas, plan)))
    return run


def _fill(ref: Reference, m, pages: list[int], rng: random.Random) -> None:
    """Give data pages distinct contents before the run (the host writes them)."""
    vm = m.vm
    slot = vm.memslots[0].by_id(DATA_SLOT)
    for t in pages:
        gfn = _page(t) >> 12
        val = _value(rng)
        vm.host.tag[vm.gfn_to_pfn_nowait(0, gfn)] = np.uint64(val)
        ref.mem[vm.mm.index(slot.gfn_to_hva(gfn))] = val


def scenario_pte_race(config: VMConfig, rng: random.Random) -> Run:
    """vCPU 1 remaps a page twice in a row, then reads it after its own INVLPG; vCPU 0 reads
    the page throughout, so now and then its fault walks the entry just before the second
    rewrite lands and takes the MMU lock just after (KVM's FNAME(gpte_changed) window)."""
    m = _machine(config, 2, 32)
    ref = Reference(m)
    pts = m.pts
    targets = rng.sample(range(2, 32), 12)
    _fill(ref, m, targets, rng)
    x = _page(0) >> 12
    ref.remappable(x)
    e_gpa = pts.entry_gpa(_page(0), 1, create=False)
    writer = Program()
    for k, t in enumerate(targets):
        ref.remap[(1, len(writer.rows))] = (x, _page(t) >> 12)
        writer.store_pte(pts.pt_gva_of(e_gpa), pts.leaf_value(
            _page(t), P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER))
        if k % 2:  # every other remap is invalidated and read back
            writer.invlpg(_page(0)).read(_page(0)).pause(rng.randrange(0, 3000)).read(_page(0))
    reader = Program()
    for _ in range(120):
        reader.read(_page(0)).pause(rng.randrange(0, 4000))
    return Run(m, [reader.build(), writer.build()], ref)


EXTRA_SLOT = 2
EXTRA_PAGES = 4
EXTRA_GPAS = (DATA_GPA + (64 << 20), DATA_GPA + (128 << 20))


def scenario_memslots(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs use a THP data slot and a small slot that a VMM task moves between two
    addresses, deletes and re-creates, while dirty logging on the data slot goes on and off:
    accesses to where the small slot is not are MMIO, and huge mappings must not survive
    logging being enabled. The seed picks KVM_X86_QUIRK_SLOT_ZAP_ALL (a delete or move zaps
    everything, by the fast zap) or not (only the slot)."""
    m = _machine(_tuned(config, {"slot_zap_all": rng.random() < 0.5}), 2, 512, backing="thp")
    vm = m.vm
    flags = P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER
    for gpa in EXTRA_GPAS:
        m.pts.map_range(gpa, gpa, EXTRA_PAGES, flags)
    vm.add_memslot(EXTRA_SLOT, EXTRA_GPAS[0], EXTRA_PAGES * 4096)
    ref = Reference(m)
    gvas = [_page(i) for i in (0, 1, 100, 511)] + \
        [gpa + 4096 * i for gpa in EXTRA_GPAS for i in range(EXTRA_PAGES)]
    progs = []
    for _ in range(2):
        prog = Program()
        for _ in range(40):
            gva = rng.choice(gvas)
            if rng.random() < 0.5:
                prog.write(gva, _value(rng))
            else:
                prog.read(gva)
            # Each memslot update waits for an SRCU grace period (14 us): the pauses keep the
            # vCPUs running through all twelve updates (about 300 us).
            prog.pause(rng.randrange(0, 12_000))
        progs.append(prog.build())
    run = Run(m, progs, ref)
    steps = [(rng.randrange(0, 8_000), what) for what in (
        "log_on", "move_b", "log_off", "move_a", "delete", "create", "log_on", "delete",
        "create", "log_off", "delete", "create")]

    def vmm() -> None:
        for delay, what in steps:
            vm.engine.delay(delay)
            if what in ("log_on", "log_off"):
                vm.set_dirty_logging(0, DATA_SLOT, what == "log_on")
            elif what in ("move_a", "move_b"):
                vm.move_memslot(0, EXTRA_SLOT, EXTRA_GPAS[what == "move_b"])
            elif what == "delete":
                vm.delete_memslot(0, EXTRA_SLOT)
            else:
                vm.add_memslot(EXTRA_SLOT, EXTRA_GPAS[0], EXTRA_PAGES * 4096)
    run.tasks.append(("vmm", vmm))
    return run


def scenario_thp_events(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs fault across a 2 MiB THP page while the host splits it, collapses it again
    and migrates pieces: every mapping level change must be invisible."""
    m = _machine(config, 2, 1024, backing="thp")
    vm = m.vm
    ref = Reference(m)
    vm.mm.discard_listeners.append(ref.discard)
    pages = [0, 1, 2, 255, 511, 512, 700]
    run = Run(m, _writers(m, rng, pages, 40), ref)
    slot = vm.memslots[0].by_id(DATA_SLOT)
    hva = slot.gfn_to_hva(_page(0) >> 12)
    plan = [(rng.randrange(0, 15_000), rng.choice(("split", "collapse", "migrate")),
             rng.choice(pages[:5])) for _ in range(6)]

    def host() -> None:
        for delay, what, page in plan:
            vm.engine.delay(delay)
            if what == "split":
                vm.mm.split_huge_page(hva)
            elif what == "collapse":
                vm.mm.collapse_huge_page(hva)
            elif not vm.mm.is_missing(hva + 4096 * page):
                vm.mm.migrate(hva + 4096 * page)
    run.tasks.append(("host", host))
    return run


# --- scenarios for the complete TDP MMU (#7) --------------------------------------------------
def _tuned(config: VMConfig, params: dict, **fields) -> VMConfig:
    """`config` with module parameters (and VM fields) changed. A backend ignores parameters
    it does not read, so legacy and shadow run the same scenario (PML hardware works under
    legacy too)."""
    return config.model_copy(update={"params": config.params.model_copy(update=params),
                                     **fields})


def _then_sleep(vm) -> None:
    """A VMM or host task has done one operation and sleeps until its next: under pct it
    yields (its priority drops below the vCPUs'), since a timed delay is no yield there and
    the task would otherwise run all its operations before any vCPU ran again."""
    vm.engine.yield_now()


#: Pages of one 2 MiB THP page (the audit's cost grows with the 4 KiB leaves of a split one).
THP_PAGES = [0, 1, 2, 63, 64, 200, 300, 450, 511]


def _log_phases(m, ref: Reference, rng: random.Random, phases: int, rounds: int,
                spread: int) -> tuple[Callable[[], None], DirtyLogCheck]:
    """A VMM task that, `phases` times, turns dirty logging of the data slot on, harvests
    `rounds` times, harvests once more and turns logging off (so that huge pages are
    recovered while the vCPUs fault), and the check of what it harvested. Writes count from
    when enabling returns until the last harvest of the phase starts."""
    vm = m.vm
    log = DirtyLogCheck(ref)
    ref.log_window = False
    plan = [(rng.randrange(spread), [rng.randrange(spread) for _ in range(rounds + 1)])
            for _ in range(phases)]
    cuts = random.Random(rng.random())  # where manual clears split the slot

    def vmm() -> None:
        for start, gaps in plan:
            vm.engine.delay(start)
            vm.set_dirty_logging(0, DATA_SLOT, True)
            ref.log_window = True
            for k, gap in enumerate(gaps):
                _then_sleep(vm)
                vm.engine.delay(gap)
                if k == rounds:
                    ref.log_window = False
                log.harvest(vm, cuts)
            _then_sleep(vm)
            vm.set_dirty_logging(0, DATA_SLOT, False)
            _then_sleep(vm)
    return vmm, log


def _scenario_dirty_log_thp(config: VMConfig, rng: random.Random, pml: bool) -> Run:
    """Two vCPUs write and read THP memory while a VMM task turns dirty logging on (eager
    split, or split on the first write), harvests the log (KVM_GET_DIRTY_LOG, or with manual
    protection get + clear, with or without KVM_DIRTY_LOG_INITIALLY_SET) and turns it off
    (huge pages recovered in place), twice; the host may split and migrate one THP, which then
    must not be mapped huge again. Every page written while logging was on must be in a later
    harvest. With `pml`, the TDP MMU clears D bits and the hardware logs; without, it
    write-protects and the fast page fault logs (EPT A/D on or off: the seed decides)."""
    manual = rng.random() < 0.5
    config = _tuned(config, {"pml": pml, "ept_ad": pml or rng.random() < 0.5,
                             "eager_page_split": rng.random() < 0.5},
                    dirty_log_manual_protect=manual,
                    dirty_log_initially_set=manual and rng.random() < 0.5)
    m = _machine(config, 2, 512, backing="thp")
    vm = m.vm
    ref = Reference(m)
    # The VMM's two phases take 100-150 us (each toggle of logging waits for SRCU): pauses
    # keep the vCPUs writing through all of them.
    run = Run(m, _writers(m, rng, THP_PAGES, 40, pause_ns=14_000), ref)
    vmm, log = _log_phases(m, ref, rng, phases=2, rounds=2, spread=12_000)
    run.tasks.append(("vmm", vmm))
    run.final.append(log.check)
    if rng.random() < 0.5:
        slot = vm.memslots[0].by_id(DATA_SLOT)
        hva = slot.gfn_to_hva(_page(0) >> 12)
        when, moved = rng.randrange(40_000), hva + 4096 * rng.choice(THP_PAGES)

        def host() -> None:
            vm.engine.delay(when)
            vm.mm.split_huge_page(hva)
            _then_sleep(vm)
            if not vm.mm.is_missing(moved):
                vm.mm.migrate(moved)
        run.tasks.append(("host", host))
    return run


def scenario_dirty_log_pml(config: VMConfig, rng: random.Random) -> Run:
    return _scenario_dirty_log_thp(config, rng, pml=True)


def scenario_dirty_log_wrprot(config: VMConfig, rng: random.Random) -> Run:
    return _scenario_dirty_log_thp(config, rng, pml=False)


def scenario_aging(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs read and write while the host ages their memory (clear_young: the TDP MMU
    clears Accessed bits, or without EPT A/D parks the SPTEs for access tracking and the fast
    page fault restores them) and dirty logging goes on and off once. EPT A/D and THP or
    4 KiB memory: the seed decides."""
    config = _tuned(config, {"ept_ad": rng.random() < 0.5})
    thp = rng.random() < 0.5
    pages = THP_PAGES if thp else list(range(16))
    m = _machine(config, 2, 512 if thp else 16, backing="thp" if thp else "anon")
    vm = m.vm
    ref = Reference(m)
    run = Run(m, _writers(m, rng, pages, 40), ref)
    slot = vm.memslots[0].by_id(DATA_SLOT)
    ages = [(rng.randrange(8_000), rng.choice(pages), rng.choice((1, 8, 512)))
            for _ in range(8)]

    def ager() -> None:
        for delay, page, n in ages:
            vm.engine.delay(delay)
            vm.mm.age(slot.gfn_to_hva(_page(page) >> 12), 4096 * min(n, slot.npages - page))
            _then_sleep(vm)
    vmm, log = _log_phases(m, ref, rng, phases=1, rounds=1, spread=20_000)
    run.tasks += [("ager", ager), ("vmm", vmm)]
    run.final.append(log.check)
    return run


NX_PERIOD_MS = 1  # the shortest recovery period kvm.nx_huge_pages_recovery_period_ms allows


def scenario_nx_recovery(config: VMConfig, rng: random.Random) -> Run:
    """With the NX huge-page mitigation, two vCPUs fetch from, read and write THP memory in
    bursts about a recovery period apart: a fetch maps 4 KiB (splitting a huge leaf; the table
    is tracked), a data access maps huge again, the recovery worker zaps tracked tables under
    the read lock every millisecond, and a VMM task zaps everything once (invalid roots are
    zapped under the read lock). The seed picks the recovery ratio, and one seed in three the
    fault path from before split-on-fault (tdp_mmu_revert), which freezes and zaps the huge
    leaf in its way."""
    params = {"nx_huge_pages": True, "nx_huge_pages_recovery_ratio": rng.choice((1, 2, 4)),
              "nx_huge_pages_recovery_period_ms": NX_PERIOD_MS}
    if rng.random() < 1 / 3:
        params["tdp_mmu_revert"] = "split-on-fault"
    m = _machine(_tuned(config, params), 2, 512, backing="thp")
    period = NX_PERIOD_MS * 1_000_000
    progs = []
    for _ in range(2):
        prog = Program()
        for _ in range(5):
            prog.pause(period - rng.randrange(0, 60_000))
            for _ in range(8):
                gva, what = _page(rng.choice(THP_PAGES)), rng.random()
                if what < 0.4:
                    prog.fetch(gva)
                elif what < 0.7:
                    prog.read(gva)
                else:
                    prog.write(gva, _value(rng))
                prog.pause(rng.randrange(0, 3000))
        progs.append(prog.build())
    run = Run(m, progs, Reference(m))
    when = rng.randrange(5 * period)

    def vmm() -> None:
        m.vm.engine.delay(when)
        m.vm.zap_all()
    run.tasks.append(("vmm", vmm))
    return run


def _remap_reader(rng: random.Random, x: int) -> Program:
    """Forty ops: reads of page x (the one the nested scenarios remap), each followed by a
    pause, between writes to pages 1-4 (never remapped, so their writes race nothing)."""
    prog = Program()
    for k in range(40):
        if k % 2:
            prog.read(_page(x)).pause(rng.randrange(0, 1500))
        else:
            prog.write(_page(rng.randrange(1, 5)), _value(rng))
    return prog


def _nested_machine(config: VMConfig, rng: random.Random):
    """Two vCPUs, eight data pages, a reference; page x (0) will be remapped among the
    targets, which get distinct contents."""
    m = _machine(config, 2, 8)
    ref = Reference(m)
    x, targets = 0, [5, 6, 7]
    _fill(ref, m, targets, rng)
    return m, ref, m.vm, x, targets


def scenario_nested(config: VMConfig, rng: random.Random) -> Run:
    """Nested EPT (docs/nested.md): two vCPUs run one L2 guest whose EPT12 L1 fills lazily
    (every first touch is an EPT violation reflected to L1, whose EPT12 stores exit once L0
    shadows the page), while the host drops, migrates, swaps and merges the L1 pages behind
    EPT02 and an L1 task remaps one L2 page among three L1 pages (read-only or not), with
    INVEPT after each remap. L2 must read what the reference holds (the remapped page: any page it was mapped
    to since that vCPU's last INVEPT, as the SDM allows); the audit checks EPT02 after every
    step. Nested EPT needs EPT in L0: under shadow paging the same programs run in L1."""
    from mmu_core.guest.nested import L1Hypervisor

    m, ref, vm, x, targets = _nested_machine(config, rng)
    progs = []
    for _ in range(2):  # the remapped page is only read (its writes would race the remaps)
        prog = Program()
        for k in range(40):
            p = rng.randrange(1, 5)
            if k % 2:
                prog.read(_page(x)).pause(rng.randrange(0, 2000))
            elif rng.random() < 0.5:
                prog.write(_page(p), _value(rng))
            else:
                prog.read(_page(p))
        progs.append(prog.build())
    run = Run(m, progs, ref)
    slot = vm.memslots[0].by_id(DATA_SLOT)
    hvas = [slot.gfn_to_hva(_page(i) >> 12) for i in range(8)]
    vm.mm.discard_listeners.append(ref.discard)
    plan = [(rng.randrange(0, 20_000), rng.choice(("dontneed", "migrate", "swap", "ksm")),
             rng.randrange(1, 8), rng.randrange(1, 8)) for _ in range(5)]
    if not vm.params.ept:
        return Run(m, progs, ref)  # no nested EPT without EPT: the programs run in L1
    hv = L1Hypervisor(m.pts)
    l2 = hv.new_l2()
    ref.remappable(_page(x) >> 12)
    first = targets[0]
    hv.map(l2, _page(x), _page(first))
    ref.target[_page(x) >> 12] = _page(first) >> 12
    for v in vm.vcpus:
        v.enter_l2(l2)
    run.tasks.append(("host", _host_events(vm, hvas, plan)))
    run.tasks.append(("l1", _l1_remaps(vm, ref, hv, l2, x, targets, rng)))
    return run


def _l1_remaps(vm, ref: Reference, hv, l2, x: int, targets: list[int], rng: random.Random,
               before: Callable[[int], None] | None = None) -> Callable[[], None]:
    """An L1 task that remaps L2's page x three times among `targets` (read-only or not),
    each time with a store to EPT12 and INVEPT, after a random delay or after `before(k)`;
    the reference allows either mapping from the store until the INVEPT."""
    from mmu_core.arch.x86 import ept as E

    remaps = [(rng.randrange(2_000, 25_000), targets[rng.randrange(len(targets))],
               rng.choice((E.EPT_RWX, E.EPT_READ))) for _ in range(3)]

    def l1() -> None:
        # L1 runs on vCPU 0 between its L2 runs (the model charges its exits there).
        v0 = vm.vcpus[0]
        page = _page(x) >> 12
        for k, (delay, t, perm) in enumerate(remaps):
            if before is None:
                vm.engine.delay(delay)
            else:
                before(k)
            # From L1's store until its INVEPT, a vCPU may use either mapping.
            for v in vm.vcpus:
                ref.stale.setdefault((v.id, page), set()).add(ref.target[page])
            ref.target[page] = _page(t) >> 12
            hv.map(l2, _page(x), _page(t), perm=perm, vcpu=v0)
            v0.invept(l2.eptp)
            for v in vm.vcpus:
                ref.stale.pop((v.id, page), None)
    return l1


SCENARIOS: dict[str, Callable[[VMConfig, random.Random], Run]] = {
    "first-touch": scenario_first_touch,
    "first-touch-thp": scenario_first_touch_thp,
    "pte-edit": scenario_pte_edit,
    "zap-all": scenario_zap_all,
    "dirty-log": scenario_dirty_log,
    "readonly": scenario_readonly,
    "host-events": scenario_host_events,
    "pte-race": scenario_pte_race,
    "memslots": scenario_memslots,
    "thp-events": scenario_thp_events,
    "dirty-log-pml": scenario_dirty_log_pml,
    "dirty-log-wrprot": scenario_dirty_log_wrprot,
    "aging": scenario_aging,
    "nx-recovery": scenario_nx_recovery,
    "nested": scenario_nested,
}


# --- one execution -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    scenario: str
    config: str
    policy: str
    seed: int
    ok: bool
    invariant: str = ""
    detail: str = ""
    steps: int = 0
    mutants: tuple[str, ...] = ()
    host_cpus: int | None = DEFAULT_HOST_CPUS

    def replay_command(self) -> str:
        extra = "".join(f" --mutant {m}" for m in self.mutants)
        if self.host_cpus != DEFAULT_HOST_CPUS:
            extra += f" --host-cpus {self.host_cpus or 0}"
        return (f"mmu explore --scenario {self.scenario} --config {self.config} "
                f"--policy {self.policy} --seed {self.seed} --schedules 1{extra}")


def check_names(scenarios: list[str], configs: list[str]) -> None:
    for s in scenarios:
        if s not in SCENARIOS:
            raise InvalidConfig("scenario", f"unknown scenario {s!r} (one of: "
                                f"{', '.join(SCENARIOS)})")
    installed = set(discover())
    for c in configs:
        if c not in CONFIGURATIONS and c not in installed:
            raise InvalidConfig("config", f"unknown configuration {c!r} (one of: "
                                f"{', '.join([*CONFIGURATIONS, *sorted(installed - set(CONFIGURATIONS))])})")


def run_schedule(scenario: str, config: str, policy: str, seed: int, *,
                 mutant_names: tuple[str, ...] = (), audit_every_step: bool = True,
                 trace: list | None = None,
                 host_cpus: int | None = DEFAULT_HOST_CPUS) -> Outcome:
    """Run one execution; returns its Outcome (never raises for a failure it can name).
    `host_cpus` (None: unlimited): with fewer CPUs than tasks, tasks wait in run queues and
    are preempted outside spinlocks (docs/engine.md), which other interleavings need."""
    check_names([scenario], [config])
    with mutants.enabled(*mutant_names):
        return _run(scenario, config, policy, seed, mutant_names, audit_every_step, trace,
                    host_cpus)


#: A schedule still running after this many steps, or this much virtual time, is a livelock
#: (every scenario finishes within a few thousand steps and a few ms): a failure, not a hang.
STEP_LIMIT = 200_000
TIME_LIMIT_NS = 1_000_000_000


def _run_bounded(run: Run) -> None:
    """run_programs, but a run still going at TIME_LIMIT_NS fails as a livelock (a task that
    spins on its own never returns to the scheduler, so a step count alone cannot see it)."""
    vm = run.machine.vm
    engine = vm.engine
    for vcpu, prog in zip(vm.vcpus, run.programs, strict=True):
        vcpu.task = engine.spawn(f"vcpu{vcpu.id}", vcpu.run, prog, new_results(prog))
    engine.run(until=TIME_LIMIT_NS)
    stuck = [t.name for t in engine.tasks if not t.finished and not t.daemon]
    if stuck:
        raise Failure("livelock", f"{', '.join(stuck)} still running after "
                      f"{TIME_LIMIT_NS / 1e9:g} s of virtual time")


@functools.cache
def pct_steps_for(scenario: str, config: str) -> int:
    """PCT draws its priority change points from steps [1, pct_steps], and works as its
    guarantee says only when pct_steps is about the length of the run (Burckhardt et al.'s
    k). Measured once per (scenario, configuration): the steps of its fifo run with seed 0,
    no audit and no mutant, so a replay computes the same value."""
    with mutants.disabled():
        vmconfig = VMConfig(seed=0, policy="fifo", params=configuration(config))
        run = SCENARIOS[scenario](vmconfig, random.Random(f"{scenario}:0"))
        engine = run.machine.vm.engine
        try:
            for name, fn in run.tasks:
                engine.spawn(name, fn)
            run.machine.run_programs(run.programs)
            return max(1, engine.steps)
        finally:
            run.machine.vm.destroy()


def _run(scenario, config, policy, seed, mutant_names, audit_every_step, trace,
         host_cpus) -> Outcome:
    extra = {"pct_steps": pct_steps_for(scenario, config)} if policy == "pct" else {}
    vmconfig = VMConfig(seed=seed, policy=policy, params=configuration(config),
                        host_cpus=host_cpus, **extra)
    rng = random.Random(f"{scenario}:{seed}")
    run = SCENARIOS[scenario](vmconfig, rng)
    vm = run.machine.vm
    engine = vm.engine
    engine.trace_enabled = trace is not None
    vm.recorder = run.ref
    outcome = dict(scenario=scenario, config=config, policy=policy, seed=seed,
                   mutants=tuple(mutant_names), host_cpus=host_cpus)

    def step() -> None:
        violations = audit(vm)
        if violations:
            raise Failure(violations[0].invariant, violations[0].detail)

    def bounded() -> None:
        if engine.steps > STEP_LIMIT:
            raise Failure("livelock", f"{engine.steps:,} steps and not done (a retry loop that "
                          f"never sees a new value?)")
        if audit_every_step:
            step()

    try:
        try:
            engine.step_hook = bounded
            for name, fn in run.tasks:
                engine.spawn(name, fn)
            _run_bounded(run)
            engine.step_hook = None
            step()
            for check in run.final:
                check()
        finally:
            steps = engine.steps
            if trace is not None:
                trace.extend(engine.trace)
            vm.recorder = None
            engine.step_hook = None
            vm.destroy()
        if vm.pt_pages_in_use():
            raise Failure("teardown-leak", f"{vm.pt_pages_in_use()} MMU table page(s) left "
                          "after destroy")
    except Failure as exc:
        return Outcome(ok=False, invariant=exc.invariant, detail=exc.detail, **outcome)
    except UseAfterFree as exc:
        return Outcome(ok=False, invariant="use-after-free", detail=str(exc), **outcome)
    except HostStateError as exc:
        return Outcome(ok=False, invariant="host-state", detail=str(exc), **outcome)
    except MMUError as exc:
        return Outcome(ok=False, invariant=type(exc).__name__, detail=str(exc), **outcome)
    except Exception as exc:  # a crash in the model under some schedule is a finding too
        return Outcome(ok=False, invariant="crash", detail=f"{type(exc).__name__}: {exc}",
                       **outcome)
    return Outcome(ok=True, steps=steps, **outcome)


# --- many executions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    scenario: str
    config: str
    policy: str
    seed: int
    mutants: tuple[str, ...] = ()
    host_cpus: int | None = DEFAULT_HOST_CPUS


def _run_job(job: Job) -> Outcome:
    return run_schedule(job.scenario, job.config, job.policy, job.seed, mutant_names=job.mutants,
                        host_cpus=job.host_cpus)


def _run_chunk(jobs: list[Job]) -> list[Outcome]:
    return [_run_job(j) for j in jobs]


def plan(scenarios: list[str], configs: list[str], policy: str, seed: int, schedules: int,
         mutant_names: tuple[str, ...] = (),
         host_cpus: int | None = DEFAULT_HOST_CPUS) -> list[Job]:
    check_names(scenarios, configs)
    mutants.validate(mutant_names)
    if host_cpus is not None and host_cpus < 1:
        raise InvalidConfig("host_cpus", f"must be at least 1 (or unlimited), not {host_cpus}")
    return [Job(s, c, policy, seed + i, tuple(mutant_names), host_cpus)
            for s in scenarios for c in configs for i in range(schedules)]


def explore(jobs: list[Job], workers: int = 1, scheduler: str | None = None,
            stop_on_failure: bool = True, progress: Callable[[int, int], None] | None = None
            ) -> list[Outcome]:
    """Run jobs; the outcomes come back in job order whatever the split. With
    `stop_on_failure`, the list ends at the first failing job (in job order)."""
    chunk = max(1, min(16, len(jobs) // max(1, workers * 4)))
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    results: list[Outcome] = []

    def take(outs: list[Outcome]) -> bool:
        results.extend(outs)
        if progress:
            progress(len(results), len(jobs))
        return stop_on_failure and any(not o.ok for o in outs)

    if scheduler:
        try:
            from dask.distributed import Client
        except ImportError:
            raise InvalidConfig("scheduler", "a Dask scheduler needs the 'dask' extra: pip "
                                "install 'kvm-mmu-model[dask]'") from None
        with Client(scheduler) as client:
            futures = client.map(_run_chunk, chunks, pure=False)
            for fut in futures:
                if take(fut.result()):
                    client.cancel(futures)
                    break
    elif workers <= 1:
        for c in chunks:
            if take(_run_chunk(c)):
                break
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_run_chunk, c) for c in chunks]
            for fut in futures:
                if take(fut.result()):
                    for f in futures:
                        f.cancel()
                    break
    if stop_on_failure:
        for k, o in enumerate(results):
            if not o.ok:
                return results[: k + 1]
    return results


__all__ = ["SCENARIOS", "Failure", "Job", "Outcome", "Reference", "explore", "plan",
           "run_schedule"]


# --- scenarios for the complete shadow MMU (#8) ------------------------------------------------
def _remap_program(ref: Reference, m, vcpu_id: int, page: int, targets: list[int],
                   others: list[int], rng: random.Random, rounds: int) -> Program:
    """vCPU `vcpu_id` remaps data page `page` among `targets` by storing its PTE, then
    invalidates by INVLPG, by reloading CR3 or not at all (x86 lets it see the old frame or
    the new one until it invalidates: the reference allows both), and reads it and `others`."""
    pts = m.pts
    cr3 = m.paging.cr3
    e_gpa = pts.entry_gpa(_page(page), 1, create=False)
    prog = Program()
    for _ in range(rounds):
        t = targets[rng.randrange(len(targets))]
        ref.remap[(vcpu_id, len(prog.rows))] = (_page(page) >> 12, _page(t) >> 12)
        prog.store_pte(pts.pt_gva_of(e_gpa), pts.leaf_value(
            _page(t), P.PT_PRESENT | P.PT_WRITABLE | P.PT_USER | P.PT_ACCESSED))
        how = rng.random()
        if how < 0.4:
            prog.invlpg(_page(page))
        elif how < 0.8:
            prog.mov_cr3(cr3)
        prog.read(_page(page)).read(_page(others[rng.randrange(len(others))]))
        prog.pause(rng.randrange(0, 3000))
    return prog


def scenario_unsync(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs each remap a page of one guest page table (under shadow paging the table's
    shadow page goes unsync at the first store and the stores no longer exit), invalidate by
    INVLPG, by reloading CR3 or not at all, and read both pages: after its own invalidation a
    vCPU must see the current frame (INVLPG resyncs the entry, the CR3 load syncs the
    root)."""
    m = _machine(config, 2, 16)
    ref = Reference(m)
    targets = [4, 5, 6, 7, 8, 9]
    _fill(ref, m, targets, rng)
    for page in (0, 1):
        ref.remappable(_page(page) >> 12)
    progs = [_remap_program(ref, m, v, v, targets, [0, 1, 10 + v], rng, 12).build()
             for v in (0, 1)]
    return Run(m, progs, ref)


RECLAIM_REGIONS = 8


def scenario_reclaim(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs use pages in eight 2 MiB regions (eight last-level tables) while the VMM
    sets the page limit to KVM's minimum (KVM_SET_NR_MMU_PAGES) and the host's shrinker
    reclaims the oldest shadow pages, and vCPU 0 remaps one page with INVLPG: reclaimed
    pages must be unreachable (flushed) before they are freed, and faults rebuild them."""
    m = _machine(config, 2, 512 * RECLAIM_REGIONS)
    vm = m.vm
    ref = Reference(m)
    pages = [512 * r + rng.randrange(1, 512) for r in range(RECLAIM_REGIONS)]
    targets = [pages[1], pages[2], pages[3]]
    _fill(ref, m, targets, rng)
    ref.remappable(_page(0) >> 12)
    a = _remap_program(ref, m, 0, 0, targets, pages, rng, 8)
    for p in pages:
        a.write(_page(p), _value(rng)).pause(rng.randrange(0, 2000))
    progs = [a.build(), _writers(m, rng, pages, 30)[1]]
    run = Run(m, progs, ref)
    plan = [(rng.randrange(0, 20_000), rng.randrange(2, 20)) for _ in range(5)]

    def host() -> None:
        vm.hook.mmu_set_nr_mmu_pages(vm=vm, nr=64)
        for delay, nr in plan:
            vm.engine.delay(delay)
            vm.mm.shrink_slab(nr)  # the host reclaims: kswapd runs the shrinkers
            _then_sleep(vm)
    run.tasks.append(("host", host))
    return run


SCENARIOS["userfault"] = scenario_userfault
SCENARIOS["unsync"] = scenario_unsync
SCENARIOS["reclaim"] = scenario_reclaim


def scenario_nested_reclaim(config: VMConfig, rng: random.Random) -> Run:
    """EPT02 pages reclaimed under nested EPT (docs/nested.md): two vCPUs run one lazily
    mapped L2 over pages in eight 2 MiB regions (one EPT12 last-level table, so one EPT02
    shadow page, each) while the VMM sets KVM's minimum page limit, the host's shrinker
    reclaims the oldest shadow pages (EPT02 ones among them, whose EPT12 tables then stop
    being write-tracked) and drops L1 pages, and an L1 task remaps one L2 page with INVEPT.
    An L1 store to an EPT12 table whose EPT02 page was just reclaimed does not exit, so a
    nested fault that walked the old entry must see that it changed (FNAME(gpte_changed))
    before it builds the page again; reclaimed pages refault without L1 noticing. Under
    shadow paging (no nested EPT) the same programs run in L1."""
    from mmu_core.guest.nested import L1Hypervisor

    m = _machine(config, 2, 512 * RECLAIM_REGIONS)
    vm = m.vm
    ref = Reference(m)
    pages = [512 * r + rng.randrange(1, 512) for r in range(RECLAIM_REGIONS)]
    x, targets = 0, pages[1:4]
    _fill(ref, m, targets, rng)
    progs = []
    for _ in range(2):  # the remapped page and its targets are only read
        prog = Program()
        for k in range(40):
            if k % 2:
                prog.read(_page(x))
            elif rng.random() < 0.5:
                prog.write(_page(rng.choice(pages[4:])), _value(rng))
            else:
                prog.read(_page(rng.choice(pages[1:])))
            prog.pause(rng.randrange(0, 1000))
        progs.append(prog.build())
    run = Run(m, progs, ref)
    if not vm.params.ept:
        return run
    slot = vm.memslots[0].by_id(DATA_SLOT)
    vm.mm.discard_listeners.append(ref.discard)
    plan = [(rng.randrange(0, 40_000), rng.randrange(2, 20)) for _ in range(4)]
    gaps = [(rng.randrange(10_000, 30_000), rng.randrange(0, 1_500)) for _ in range(3)]
    hv = L1Hypervisor(m.pts)
    l2 = hv.new_l2()
    ref.remappable(_page(x) >> 12)
    hv.map(l2, _page(x), _page(targets[0]))
    ref.target[_page(x) >> 12] = _page(targets[0]) >> 12
    for v in vm.vcpus:
        v.enter_l2(l2)

    def reclaim_x() -> None:
        # The host drops x's page (the next fault on x sleeps in gfn_to_pfn, after its EPT12
        # walk) and its shrinker reclaims every shadow page no vCPU holds as a root, x's
        # EPT02 table with the others.
        vm.mm.madvise_dontneed(slot.gfn_to_hva(ref.target[_page(x) >> 12]), 4096)
        vm.mm.shrink_slab(64)

    def host() -> None:
        vm.set_nr_mmu_pages(64)
        for delay, nr in plan:
            vm.engine.delay(delay)
            vm.mm.shrink_slab(nr)
            _then_sleep(vm)

    def before_remap(k: int) -> None:
        # One task plays the host and then L1, so that L1's store lands while x's EPT12
        # table is not shadowed (not write-tracked: the store does not exit) and a vCPU's
        # fault on x may be between its walk and the MMU lock.
        wait, gap = gaps[k]
        vm.engine.delay(wait)
        reclaim_x()
        vm.engine.delay(gap)
    run.tasks.append(("host", host))
    run.tasks.append(("host+l1", _l1_remaps(vm, ref, hv, l2, x, targets, rng, before_remap)))
    return run


SCENARIOS["nested-reclaim"] = scenario_nested_reclaim


def _l2_with_two_tables(m, ref: Reference, x: int, targets: list[int]):
    """An L2 guest over pages 1-4 (1:1) and x (on targets[0]), and a second last-level EPT12
    table for x's 2 MiB region with the same entries but x on targets[1]: (hv, l2, x's gfn,
    x's leaf entry gpa, its level-2 entry gpa, the two tables, their targets for x)."""
    from mmu_core.guest import nested as N
    from mmu_core.guest.nested import L1Hypervisor

    vm = m.vm
    hv = L1Hypervisor(m.pts)
    l2 = hv.new_l2()
    page = _page(x) >> 12
    ref.remappable(page)
    for i in range(1, 5):
        hv.map(l2, _page(i), _page(i))
    hv.map(l2, _page(x), _page(targets[0]))
    ref.target[page] = _page(targets[0]) >> 12
    # a second last-level table for x's 2 MiB region: the same entries, x on another target
    e1 = hv._entry_gpa(l2, _page(x), None, False)
    e2 = hv._entry_gpa(l2, _page(x), None, False, leaf_level=2)
    tables = [e1 & ~0xFFF, hv._alloc_table()]
    for i in range(512):
        hv._store(None, tables[1] + 8 * i, vm.read_guest_u64(0, tables[0] + 8 * i))
    alt = [targets[0], targets[1]]
    hv._store(None, tables[1] + (e1 & 0xFFF), (_page(alt[1]) & ~0xFFF) | N.LEAF_FLAGS)
    return hv, l2, page, e1, e2, tables, alt


def scenario_nested_unsync(config: VMConfig, rng: random.Random) -> Run:
    """Unsync EPT02 pages (docs/nested.md): two vCPUs run one L2 guest and read page x while
    an L1 task edits x's mapping in two ways, each followed by INVEPT: in x's last-level EPT12
    table (write-protected, not tracked: the first store unsyncs its EPT02 page and later ones
    do not exit, so EPT02 lags until the INVEPT syncs it), and one level up, switching x's
    2 MiB region between two last-level tables (a write-tracked EPT12 table: the store exits
    and zaps the EPT02 link; a fault that walked the old entry must retry). Meanwhile the host
    drops, migrates and swaps the pages and reclaims shadow pages. The reference allows the
    old target between L1's store and its INVEPT. Under shadow paging the programs run in L1."""
    from mmu_core.guest import nested as N

    m, ref, vm, x, targets = _nested_machine(config, rng)
    progs = [_remap_reader(rng, x).build() for _ in range(2)]
    run = Run(m, progs, ref)
    if not vm.params.ept:
        return run
    slot = vm.memslots[0].by_id(DATA_SLOT)
    hvas = [slot.gfn_to_hva(_page(i) >> 12) for i in range(8)]
    vm.mm.discard_listeners.append(ref.discard)
    hv, l2, page, e1, e2, tables, alt = _l2_with_two_tables(m, ref, x, targets)
    for v in vm.vcpus:
        v.enter_l2(l2)
    edits = [(rng.randrange(1_000, 15_000), rng.random() < 0.5, targets[rng.randrange(3)])
             for _ in range(4)]
    plan = [(rng.randrange(0, 20_000), rng.choice(("dontneed", "migrate", "swap", "shrink")),
             rng.randrange(1, 8)) for _ in range(4)]

    def l1() -> None:
        v0 = vm.vcpus[0]
        which = 0
        for delay, switch, t in edits:
            vm.engine.delay(delay)
            for v in vm.vcpus:
                ref.stale.setdefault((v.id, page), set()).add(ref.target[page])
            if switch:  # one level up: the region's other last-level table
                which ^= 1
                ref.target[page] = _page(alt[which]) >> 12
                v0.l1_store(e2, tables[which] | N.NONLEAF_FLAGS)
            else:  # in the last-level table in use
                alt[which] = t
                ref.target[page] = _page(t) >> 12
                v0.l1_store(tables[which] + (e1 & 0xFFF), (_page(t) & ~0xFFF) | N.LEAF_FLAGS)
            v0.invept(l2.eptp)
            for v in vm.vcpus:
                ref.stale.pop((v.id, page), None)

    def host() -> None:
        for delay, what, i in plan:
            vm.engine.delay(delay)
            if what == "shrink":
                vm.mm.shrink_slab(8)
            elif what == "dontneed":
                vm.mm.madvise_dontneed(hvas[i], 4096)
            elif what == "migrate":
                vm.mm.migrate(hvas[i])
            else:
                vm.mm.swap_out(hvas[i])
            _then_sleep(vm)
    run.tasks.append(("host", host))
    run.tasks.append(("l1", l1))
    return run


SCENARIOS["nested-unsync"] = scenario_nested_unsync


def scenario_shadow_split(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs write and read THP memory (2M leaves once faulted) while the VMM turns dirty
    logging on with eager page splitting, harvests twice and turns it off: under the legacy
    MMU the huge leaves are split under the write lock while the vCPUs write through them
    (their TLB entries and, with PML, D bits), then their 4K leaves lose D (PML: the seed
    decides) or W. Every split leaf must be in its rmap (the audit), and every page written
    while logging was on in a later harvest."""
    config = _tuned(config, {"eager_page_split": True, "pml": rng.random() < 0.5},
                    dirty_log_manual_protect=False)
    m = _machine(config, 2, 1024, backing="thp")
    ref = Reference(m)
    pages = THP_PAGES + [512, 513, 700, 1023]
    progs = []
    for _ in range(2):  # before, during and after the split (~110 us of rmap adds)
        prog = Program()
        for k in range(60):
            p = pages[rng.randrange(len(pages))]
            if rng.random() < 0.6:
                prog.write(_page(p), _value(rng))
            else:
                prog.read(_page(p))
            if k % 3 == 2:
                prog.pause(rng.randrange(0, 8000))
        progs.append(prog.build())
    run = Run(m, progs, ref)
    vmm, log = _log_phases(m, ref, rng, phases=1, rounds=2, spread=12_000)
    run.tasks.append(("vmm", vmm))
    run.final.append(log.check)
    return run


SCENARIOS["shadow-split"] = scenario_shadow_split


def scenario_fast_pf(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs read and then write pages of a slot logged by write-protection (no PML; EPT
    A/D on or off: the seed decides), so that their writes are fast page faults, without the
    MMU lock (legacy: a lockless walk of the shadow pages, fastpf.py; tdp: under RCU), while a
    collector harvests and re-protects the log, the host ages the pages (without A/D the
    SPTEs are access-tracked and the fast page fault restores them) and a VMM task zaps every
    page twice (the legacy MMU frees the zapped tables once the walks that began before its
    flush are done). Every page written must be in a later harvest."""
    config = _tuned(config, {"pml": False, "ept_ad": rng.random() < 0.5})
    m = _machine(config, 2, 16, log_dirty=True)
    vm = m.vm
    ref = Reference(m)
    progs = []
    for _ in range(2):
        prog = Program()
        for k in range(30):
            p = rng.randrange(16)
            prog.read(_page(p)).write(_page(p), _value(rng))
            if k % 3 == 2:
                prog.pause(rng.randrange(0, 2000))
        progs.append(prog.build())
    run = Run(m, progs, ref)
    log = DirtyLogCheck(ref)
    harvests = [rng.randrange(0, 20_000) for _ in range(4)]
    zaps = [rng.randrange(0, 40_000) for _ in range(2)]
    slot = vm.memslots[0].by_id(DATA_SLOT)
    ages = [(rng.randrange(10_000), rng.randrange(16), rng.choice((1, 16))) for _ in range(4)]

    def ager() -> None:
        for d, page, n in ages:
            vm.engine.delay(d)
            vm.mm.age(slot.gfn_to_hva(_page(page) >> 12), 4096 * min(n, 16 - page))
            _then_sleep(vm)

    def collector() -> None:
        for d in harvests:
            vm.engine.delay(d)
            log.harvest(vm)
            _then_sleep(vm)

    def vmm() -> None:
        for d in zaps:
            vm.engine.delay(d)
            vm.zap_all()
            _then_sleep(vm)

    def check() -> None:
        log.harvest(vm)
        log.check()
    run.tasks += [("collector", collector), ("vmm", vmm), ("ager", ager)]
    run.final.append(check)
    return run


SCENARIOS["fast-pf"] = scenario_fast_pf



def _access(prog: Program, rng: random.Random, gva: int) -> None:
    if rng.random() < 0.5:
        prog.write(gva, _value(rng))
    else:
        prog.read(gva)


def scenario_smm(config: VMConfig, rng: random.Random) -> Run:
    """Two vCPUs enter and leave SMM around their accesses (SMI ... RSM, one time in four
    with a second SMI latched in SMM and delivered at RSM). In SMM paging is off and the
    eight data pages are reached through address space 1's alias of RAM (a second memslot
    on the same host mapping), beside SMRAM pages of its own; each vCPU saves its state at
    its own SMBASE (vCPU 1's relocated, as firmware does at boot). Every transition resets
    the vCPU's MMU context (role.smm: another root). Meanwhile the host drops, migrates,
    swaps and merges the data pages, so the MMU notifier must zap the SPTEs of both address
    spaces, and a VMM task zaps everything once."""
    from mmu_core.guest.machine import smm_memslots
    from mmu_core.vm.vcpu import SMBASE

    m = _machine(config, 2, 8)
    vm = m.vm
    data = vm.memslots[0].by_id(DATA_SLOT)
    smm_memslots(vm)
    vm.vcpus[1].smbase = SMBASE - 0x10000
    ref = Reference(m)
    progs = []
    for v in range(2):
        # SMRAM pages below each vCPU's save area (SMBASE + 0xFE00)
        smram = [vm.vcpus[v].smbase + 0x1000 * k for k in range(1, 4)]
        prog = Program()
        for _ in range(4):
            for _ in range(rng.randrange(2, 6)):
                _access(prog, rng, _page(rng.randrange(8)))
            prog.smi()
            latched = rng.random() < 0.25
            for rounds in range(2 if latched else 1):
                if latched and not rounds:
                    prog.smi()
                for _ in range(rng.randrange(2, 6)):
                    _access(prog, rng, rng.choice([_page(rng.randrange(8)), rng.choice(smram)]))
                prog.rsm()
            prog.pause(rng.randrange(0, 3000))
        progs.append(prog.build())
    run = Run(m, progs, ref)
    hvas = [data.gfn_to_hva(_page(i) >> 12) for i in range(8)]
    vm.mm.discard_listeners.append(ref.discard)
    plan = [(rng.randrange(0, 20_000), rng.choice(("dontneed", "migrate", "swap", "ksm")),
             rng.randrange(8), rng.randrange(8)) for _ in range(6)]
    run.tasks.append(("host", _host_events(vm, hvas, plan)))
    when = rng.randrange(30_000)

    def vmm() -> None:
        vm.engine.delay(when)
        vm.zap_all()
    run.tasks.append(("vmm", vmm))
    return run


SCENARIOS["smm"] = scenario_smm


def scenario_nested_l1_program(config: VMConfig, rng: random.Random) -> Run:
    """An L1 *program* edits EPT12 while L2 runs on it (docs/nested.md): vCPU 0 runs one L2
    guest that reads page x and writes others, while vCPU 1, in L1, runs a program that
    stores, through L1's own mapping of its page-table memory, into x's last-level EPT12
    table (x remapped among three targets, read-only or RWX) and into the table above
    (switching x's 2 MiB region between two last-level tables), and an L1 task INVEPTs on
    vCPU 0 now and then. L0 traps those stores under either L1 backend as KVM does: L1's
    mapping of a last-level EPT12 table is write-protected, so the first store faults and
    unsyncs its EPT02 page (the TDP MMU's or the legacy MMU's make_spte ->
    mmu_try_to_unsync_pages) and later ones do not exit; the table above is write-tracked,
    so its store is kept read-only, emulated and zaps the EPT02 link (kvm_mmu_track_write).
    L2 may see any mapping x had since the last INVEPT began; the audit checks after every
    step that no SPTE, TDP or shadow, maps a write-tracked EPT12 table, or one whose EPT02
    pages are in sync, writable. Under shadow paging (no nested EPT) vCPU 0's program runs
    in L1 and vCPU 1 only reads."""
    from mmu_core.arch.x86 import ept as E
    from mmu_core.guest import nested as N

    m, ref, vm, x, targets = _nested_machine(config, rng)
    l2prog = _remap_reader(rng, x)
    if not vm.params.ept:
        return Run(m, [l2prog.build(), Program().read(_page(1)).build()], ref)
    pts = m.pts
    hv, l2, page, e1, e2, tables, alt = _l2_with_two_tables(m, ref, x, targets)
    # vCPU 1's program, in L1; the reference learns each remap as its store completes
    l1prog = Program().pause(rng.randrange(0, 3000))
    which = 0
    for _ in range(10):
        if rng.random() < 0.3:  # one level up: the region's other last-level table
            which ^= 1
            ref.remap[(1, len(l1prog.rows))] = (page, _page(alt[which]) >> 12)
            l1prog.store_pte(pts.pt_gva_of(e2), tables[which] | N.NONLEAF_FLAGS)
        else:  # in the last-level table in use, x on a target, read-only or RWX
            alt[which] = targets[rng.randrange(len(targets))]
            perm = rng.choice((E.EPT_RWX, E.EPT_READ))
            ref.remap[(1, len(l1prog.rows))] = (page, _page(alt[which]) >> 12)
            l1prog.store_pte(pts.pt_gva_of(tables[which] + (e1 & 0xFFF)),
                             (_page(alt[which]) & ~0xFFF) | (N.LEAF_FLAGS & ~E.EPT_RWX) | perm)
        l1prog.read(_page(rng.randrange(1, 5))).pause(rng.randrange(0, 3000))
    run = Run(m, [l2prog.build(), l1prog.build()], ref)
    # The targets x had, in the order L1's stores completed (an INVEPT resets what L2 may
    # see to those since it began).
    history: list[int] = []
    record = ref.ops_done

    def ops_done(vcpu, prog, results, lo: int, hi: int) -> None:
        record(vcpu, prog, results, lo, hi)
        history.extend(ref.remap[(vcpu.id, pc)][1] for pc in range(lo, hi)
                       if (vcpu.id, pc) in ref.remap)
    ref.ops_done = ops_done
    vm.vcpus[0].enter_l2(l2)
    invepts = [rng.randrange(2_000, 12_000) for _ in range(4)]

    def l1() -> None:
        v0 = vm.vcpus[0]  # L1 runs on vCPU 0 between its L2 runs (as in the nested scenario)
        for delay in invepts:
            vm.engine.delay(delay)
            n0, cur = len(history), ref.target[page]
            v0.invept(l2.eptp)
            ref.stale[(0, page)] = ({cur} | set(history[n0:])) - {ref.target[page]}
    run.tasks.append(("l1", l1))
    return run


SCENARIOS["nested-l1-program"] = scenario_nested_l1_program


# Scenarios kept in their own modules register themselves in SCENARIOS when imported.
from mmu_core.testing import explore_pcid  # noqa: E402, F401
