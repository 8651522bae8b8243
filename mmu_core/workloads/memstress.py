"""What the KVM selftests share (tools/testing/selftests/kvm/lib/memstress.c, formerly
perf_test_util.c), modelled: a VM whose test memory the vCPUs access, vCPU threads that wait
for the main thread to start a round and report when they are done, and the guest's access
loop with a check of every value it reads.

A run is two kinds of engine tasks, as the selftests are threads: one per vCPU, parked between
rounds, and the main task that starts rounds, times them in virtual time (`vm.engine.now`),
and issues the VM ioctls between them (dirty logging, memslots). The guest program of a round
is an array of accesses; what each read must return is known in advance (the value last
written to the page, 0 before any write), so every round is verified as it completes. The
values written name the round and the page, so a read that reaches the wrong page, or an old
copy of the right one, is caught. Wall time is reported apart, as for demand paging.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import ConfigDict, Field

from mmu_core.config import ScheduleFields, VMConfig
from mmu_core.errors import InvalidConfig
from mmu_core.guest.machine import DATA_GPA, DATA_SLOT, MachineSpec, build_machine
from mmu_core.host import Backing
from mmu_core.hw import cpu as C
from mmu_core.params import Params, configuration_name, report_params
from mmu_core.report.models import NamedTime, TimeSplit
from mmu_core.report.wall import Stopwatch
from mmu_core.sim import Channel, Completion, CostModel
from mmu_core.testing.parity import guest_digest
from mmu_core.workloads.demand_paging import (
    BACKING_PAGE,
    _split,
    backend_stats,
    check_guest_memory,
    schedule_figures,
    vcpu_counts,
)
from mmu_core.workloads.heap import collect_earlier_runs, frozen_setup

DATA_GFN = DATA_GPA >> 12
#: the selftests' names of the backing sources (vm_mem_backing_src_alias)
BACKING_NAMES = {"anon": "anonymous", "thp": "anonymous_thp", "hugetlb": "anonymous_hugetlb_1gb"}
IDLE = "idle"  # the phase of a vCPU thread parked between rounds: not counted as its time

Progress = Callable[[int, int], None]


class SelftestOptions(ScheduleFields):
    """Options every selftest workload has: the selftests' -v and -s, and the engine's seed
    and schedule (ScheduleFields), which go to the VM config unchanged."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    vcpus: int = Field(1, ge=1, le=512, description="-v: number of vCPUs")
    backing: str = Field("anon", pattern="^(anon|thp|hugetlb)$",
                         description="-s: backing source (anon | thp | hugetlb)")
    seed: int = 0

    #: the option that sets the test memory's size, for error messages
    SIZE_FIELD: ClassVar[str] = "bytes_per_vcpu"

    def test_bytes(self) -> int:
        """Bytes of test memory the VM gets."""
        raise NotImplementedError

    def model_post_init(self, _ctx) -> None:
        check_guest_memory(self.SIZE_FIELD, self.test_bytes())


class PerVcpuOptions(SelftestOptions):
    """Selftests where each vCPU accesses a region of its own (-b bytes each)."""

    bytes_per_vcpu: int = Field(16 << 20, gt=0, description="-b: memory each vCPU accesses")

    def test_bytes(self) -> int:
        return self.vcpus * self.bytes_per_vcpu

    def model_post_init(self, _ctx) -> None:
        page = BACKING_PAGE[self.backing]
        if self.bytes_per_vcpu % page:
            raise InvalidConfig("bytes_per_vcpu", f"{self.bytes_per_vcpu} is not a multiple "
                                f"of the {self.backing} page size ({page})")
        super().model_post_init(_ctx)


def seconds(ns: int) -> str:
    """A virtual time as the selftests print a timespec: 's.nnnnnnnnns'."""
    return f"{ns // 10**9}.{ns % 10**9:09d}s"


@dataclass
class Round:
    """One vCPU's guest program for a round, and what its reads must return: `expect`, or
    `alt` where another vCPU writes the page in the same round (either value is right)."""

    prog: np.ndarray
    expect: np.ndarray
    alt: np.ndarray | None = None
    results: np.ndarray | None = None

    def mismatches(self) -> int:
        res = self.results
        reads = self.prog[:, 0] == C.OP_READ
        got = res[:, C.RES_VALUE]
        ok = got == self.expect
        if self.alt is not None:
            ok |= got == self.alt
        return int(np.count_nonzero(reads & ~ok)) + int(np.count_nonzero(res[:, C.RES_VECTOR]))

    def digest_rows(self) -> np.ndarray:
        """The results as the guest-visible digest takes them: racy reads (those with an
        `alt`) count only as having read one of the two values, which the check verified."""
        if self.alt is None:
            return self.results
        rows = self.results.copy()
        rows[self.prog[:, 0] == C.OP_READ, C.RES_VALUE] = 0
        return rows


class GuestMemory:
    """What each page of test memory holds as the guest sees it: the value last written to
    it, or 0. Values name the round that wrote them and the page: (tag << 40) | gfn."""

    def __init__(self, pages: int) -> None:
        self.value = np.zeros(pages, dtype=np.int64)

    @staticmethod
    def values(idx: np.ndarray, tag: int) -> np.ndarray:
        return (np.int64(tag) << 40) | (idx + DATA_GFN)

    def round(self, idx: np.ndarray, writes: np.ndarray, tag: int) -> Round:
        """Access pages `idx` (indices into test memory) in order, writing where `writes`;
        the memory is updated as if the round has run (pages are not repeated within it)."""
        prog = np.zeros((len(idx), 3), dtype=np.int64)
        prog[:, 0] = np.where(writes, C.OP_WRITE, C.OP_READ)
        prog[:, 1] = DATA_GPA + (idx << 12)
        values = self.values(idx, tag)
        prog[:, 2] = np.where(writes, values, 0)
        expect = self.value[idx].copy()
        self.value[idx[writes]] = values[writes]
        return Round(prog, expect)


class Crew:
    """The vCPU threads: each parks until the main task hands it work, runs it, and reports;
    the main task starts a round and waits for every vCPU (vcpu_last_completed_iteration)."""

    def __init__(self, vm) -> None:
        engine = vm.engine
        self.engine = engine
        self.inbox = [Channel(engine) for _ in vm.vcpus]
        self.done = Completion(engine)
        self.pending = 0
        self.tasks = [engine.spawn(f"vcpu{v.id}", self._thread, v) for v in vm.vcpus]

    def _thread(self, vcpu) -> None:
        while (work := self.inbox[vcpu.id].get(IDLE)) is not None:
            work(vcpu)
            self.pending -= 1
            if not self.pending:
                self.done.complete()

    def start(self, works: list[Callable]) -> None:
        self.done.reinit()
        self.pending = len(works)
        for inbox, work in zip(self.inbox, works, strict=True):
            inbox.put(work)

    def wait(self) -> None:
        self.done.wait("wait_vcpus")

    def round(self, works: list[Callable]) -> int:
        """Run one piece of work on every vCPU; the virtual time until the last is done."""
        t0 = self.engine.now
        self.start(works)
        self.wait()
        return self.engine.now - t0

    def stop(self) -> None:
        for inbox in self.inbox:
            inbox.put(None)


class Loop:
    """vCPUs running their guest loop until the main task stops them (Selftest.loop)."""

    def __init__(self, st: Selftest, rounds: list[Round]) -> None:
        self.st = st
        self.stopping = False
        self.passes = [0] * len(rounds)
        st.crew.start([self._worker(i, r) for i, r in enumerate(rounds)])

    def _worker(self, i: int, r: Round) -> Callable:
        def run(vcpu) -> None:
            while True:
                r.results = np.zeros((len(r.prog), C.RES_COLS), dtype=np.int64)
                vcpu.run(r.prog, r.results)
                self.st.check([r], record=False)
                self.passes[i] += 1
                if self.stopping:
                    return
                # back in userspace between runs (GUEST_SYNC): under pct the main task
                # would otherwise starve behind a vCPU that never blocks
                vcpu.vm.engine.yield_now()
        return run

    def join(self) -> None:
        self.stopping = True
        self.st.crew.wait()


class Selftest:
    """One run of a selftest workload: the machine, the main task and the vCPU threads, the
    output lines and timings, and the verified results that go into the digest."""

    def __init__(self, opts: SelftestOptions, params: Params, cost: CostModel | None,
                 progress: Progress | None = None, rounds: int = 1, **vm_options) -> None:
        collect_earlier_runs()
        self.stopwatch = Stopwatch()
        self.opts = opts
        self.params = params
        spec = MachineSpec(vcpus=opts.vcpus, data_size=opts.test_bytes(), backing=opts.backing)
        config = VMConfig(vcpus=opts.vcpus, seed=opts.seed, params=params,
                          cost=cost or CostModel(), policy=opts.policy,
                          **opts.engine_options(), **vm_options)
        self.machine = build_machine(spec, config)
        self.vm = self.machine.vm
        self.engine = self.vm.engine
        self.memory = GuestMemory(opts.test_bytes() >> 12)
        self.lines: list[str] = []
        self.timings: list[NamedTime] = []
        self.mismatches = 0
        self.digest_rows: list[list[np.ndarray]] = [[] for _ in self.vm.vcpus]
        self.crew: Crew | None = None
        self._progress = progress
        self._rounds = (0, max(1, rounds))

    # --- output -------------------------------------------------------------------------------
    def say(self, line: str) -> None:
        self.lines.append(line)

    def timed(self, label: str, ns: int, line: str | None = None) -> int:
        """Record a timing and print it as the selftest does (`line`, with {} for the time;
        default 'label: time')."""
        self.timings.append(NamedTime(label=label, ns=ns))
        self.say((line or label + ": {}").format(seconds(ns)))
        return ns

    @contextmanager
    def clock(self) -> Iterator[list[int]]:
        """`with st.clock() as t:` ... then t[0] is the virtual time the block took."""
        out = [self.engine.now]
        yield out
        out[0] = self.engine.now - out[0]

    def advance(self) -> None:
        """One more round of the run is done (the progress callback)."""
        done, total = self._rounds
        self._rounds = (done + 1, total)
        if self._progress:
            self._progress(min(done + 1, total), total)

    # --- running ------------------------------------------------------------------------------
    def run(self, main: Callable[[], None]) -> None:
        """Start the vCPU threads and the main task, run the engine until both are done."""
        self.crew = Crew(self.vm)

        def main_task() -> None:
            try:
                main()
            finally:
                self.crew.stop()

        self.engine.spawn("main", main_task)
        with frozen_setup():
            self.engine.run()

    def round(self, rounds: list[Round], record: bool = True) -> int:
        """Run one Round per vCPU; verify it; keep its results for the digest if `record`.
        Returns the virtual time from the start until the last vCPU finished."""
        def work(r: Round) -> Callable:
            def run(vcpu) -> None:
                r.results = np.zeros((len(r.prog), C.RES_COLS), dtype=np.int64)
                vcpu.run(r.prog, r.results)
            return run

        ns = self.crew.round([work(r) for r in rounds])
        self.check(rounds, record)
        self.advance()
        return ns

    def loop(self, rounds: list[Round]) -> Loop:
        """Start every vCPU running its Round pass after pass, each pass verified but not
        recorded, until `Loop.join()`; a vCPU completes at least one pass."""
        return Loop(self, rounds)

    def check(self, rounds: list[Round], record: bool = True) -> None:
        for i, r in enumerate(rounds):
            self.mismatches += r.mismatches()
            if record:
                self.digest_rows[i].append(r.digest_rows())

    def per_vcpu_pages(self, i: int, pages_per_vcpu: int) -> np.ndarray:
        """Indices into test memory of vCPU i's region (memstress partitions it)."""
        return np.arange(i * pages_per_vcpu, (i + 1) * pages_per_vcpu, dtype=np.int64)

    def split_data_slot(self, slots: int) -> list[int]:
        """The selftests' -x: test memory as `slots` memslots of equal size instead of one
        (memslot ids DATA_SLOT, DATA_SLOT + 1, ...). Run it in the main task, before the
        guest touches the memory."""
        if slots == 1:
            return [DATA_SLOT]
        vm = self.vm
        slot = vm.memslots[0].by_id(DATA_SLOT)
        base, size = slot.base_gfn << 12, slot.npages << 12
        vm.delete_memslot(0, DATA_SLOT)
        per = size // slots
        for k in range(slots):
            vm.add_memslot(DATA_SLOT + k, base + k * per, per, Backing(self.opts.backing))
        return [DATA_SLOT + k for k in range(slots)]

    def final_mismatches(self) -> int:
        """Pages of test memory whose contents differ from what the guest last wrote, read
        from the host's frames (a page never populated holds 0)."""
        vm, mm = self.vm, self.vm.mm
        bad = 0
        for slot in vm.memslots[0].slots:
            first = max(slot.base_gfn, DATA_GFN) - DATA_GFN
            last = min(slot.end_gfn - DATA_GFN, len(self.memory.value))
            if first >= last:
                continue
            lo = mm.index(slot.gfn_to_hva(first + DATA_GFN))
            pfns = mm.hva_pfn[lo:lo + last - first]
            held = np.zeros(last - first, dtype=np.int64)
            present = pfns >= 0
            held[present] = vm.host.tag[pfns[present]].astype(np.int64)
            bad += int(np.count_nonzero(held != self.memory.value[first:last]))
        return bad

    # --- the report -----------------------------------------------------------------------------
    def common(self, bytes_per_vcpu: int) -> dict:
        """The SelftestReport fields; call after the run, before the VM is destroyed."""
        vm = self.vm
        self.mismatches += self.final_mismatches()
        stats = backend_stats(vm)
        faults, exits = vcpu_counts(vm)
        splits = [busy_split(t.statistics()) for t in self.crew.tasks]
        summed = TimeSplit(**{f: sum(getattr(s, f) for s in splits)
                              for f in TimeSplit.model_fields})
        results = [np.concatenate(rows) if rows else np.zeros((0, C.RES_COLS), np.int64)
                   for rows in self.digest_rows]
        nfaults = sum(faults.values())
        return dict(
            configuration=configuration_name(self.params), params=report_params(self.params),
            backend=vm.backend_name, seed=self.opts.seed,
            schedule=schedule_figures(self.opts, vm.engine.steps), vcpus=self.opts.vcpus,
            bytes_per_vcpu=bytes_per_vcpu, backing=self.opts.backing, lines=self.lines,
            timings=self.timings, verified=self.mismatches == 0, mismatches=self.mismatches,
            faults=faults, exits=exits, time=summed,
            mappings_by_level=mappings_by_level(stats), backend_stats=stats,
            tlb_flushes=vm.tlb_flushes, digest=guest_digest(vm, results),
            wall=self.stopwatch.figures(nfaults))

    def close(self) -> None:
        self.vm.destroy()

    def __enter__(self) -> Selftest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mappings_by_level(stats) -> dict[str, int]:
    return {"4K": stats.mapped_4k if stats else 0, "2M": stats.mapped_2m if stats else 0,
            "1G": stats.mapped_1g if stats else 0}


def mapped_now(vm) -> dict[str, int] | None:
    """Leaf SPTEs mapped now by level (the backend's pages_4k/2m/1g gauges, KVM's
    statistics), or None when the backend does not keep them."""
    if not vm.hook.mmu_stats.get_hookimpls():
        return None
    st = vm.hook.mmu_stats(vm=vm)
    if getattr(st, "pages_4k", None) is None:
        return None
    return {"4K": st.pages_4k, "2M": st.pages_2m, "1G": st.pages_1g}


def busy_split(stats) -> TimeSplit:
    """A vCPU thread's time split without the time it sat parked between rounds."""
    split = _split(stats)
    idle = stats.phases.get(IDLE, 0)
    return split.model_copy(update={"total_ns": split.total_ns - idle,
                                    "other_ns": split.other_ns - idle})


def with_param(params: Params, name: str, value: object | None) -> Params:
    """The parameters with one module parameter set for this run (None: leave it)."""
    return params if value is None else params.model_copy(update={name: value})
