"""demand_paging_test, modelled: N vCPUs each touch a disjoint region; userfault handlers
supply the pages.

As in KVM's selftest, each vCPU's region is registered with its own userfaultfd and served by
its own handler task, which waits `uffd_delay_ns` (the selftest's -d) and resolves the fault
with UFFDIO_COPY. Each vCPU reads every page of its region once and checks that it got the
handler's contents for that page. Without userfaults the vCPUs first write a pattern to each
page and then read it back. All times are virtual; the wall time of the simulation itself is
reported apart.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from pydantic import ConfigDict, Field, field_validator

from mmu_core.arch.x86 import paging as P
from mmu_core.config import ScheduleFields, VMConfig
from mmu_core.errors import BackendError, InvalidConfig
from mmu_core.guest.machine import (
    DATA_GPA,
    MachineSpec,
    build_machine,
    page_patterns,
    pt_slot_gpa,
    pt_slot_size,
)
from mmu_core.guest.nested import run_in_l2
from mmu_core.hw import cpu as C
from mmu_core.params import Params, configuration_name, report_params
from mmu_core.report.models import (
    BackendStats,
    DemandPagingReport,
    MemoryFigures,
    ScheduleFigures,
    TimeSplit,
    VcpuFigures,
)
from mmu_core.report.wall import Stopwatch
from mmu_core.sim import fastloop
from mmu_core.sim.cost import CostModel
from mmu_core.testing.parity import guest_digest
from mmu_core.types import MMUStats
from mmu_core.workloads.fixed_phases import fixed_phases
from mmu_core.workloads.heap import collect_earlier_runs, frozen_setup
from mmu_core.workloads.host_figures import host_figures

MODES = {name: i for i, name in enumerate(P.MODE_NAMES)}
PROGRESS_CHUNKS = 32  # progress reports per vCPU
BACKING_PAGE = {"anon": 4096, "thp": 2 << 20, "hugetlb": 1 << 30}


class DemandPagingOptions(ScheduleFields):
    """The selftest's options, plus the engine's seed, schedule policy and its parameters
    (ScheduleFields), which go to the VM config unchanged."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    vcpus: int = Field(1, ge=1, le=1024, description="-v: number of vCPUs")
    bytes_per_vcpu: int = Field(64 << 20, gt=0, description="-b: memory per vCPU")
    uffd: bool = Field(True, description="-u MISSING: serve faults with userfaultfd")
    uffd_delay_ns: int = Field(0, ge=0, description="-d: handler delay per fault")
    uffd_shared: bool = Field(False, description="-a: one userfaultfd for all vCPUs' memory, "
                              "read by one handler per vCPU (else one uffd and handler each)")
    nested: str = Field("off", pattern="^(off|eager|lazy)$", description="-n: the guest code "
                        "runs in L2, an L1 hypervisor's guest (docs/nested.md), with EPT12 "
                        "mapped up front as memstress does (eager) or page by page as L2 "
                        "touches it (lazy)")
    backing: str = Field("anon", pattern="^(anon|thp|hugetlb)$", description="-s: backing")
    mode: str = Field("4level", description="guest paging mode")
    engine: str = Field("auto", pattern="^(auto|exact|compiled)$", description="the exact "
                        "greenlet engine, the compiled loop (docs/fastloop.md), or auto: the "
                        "compiled loop when it supports the configuration")
    seed: int = 0

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in MODES:
            raise ValueError(f"unknown paging mode '{v}' (one of {', '.join(MODES)})")
        return v

    def model_post_init(self, _ctx) -> None:
        page = BACKING_PAGE[self.backing]
        if self.bytes_per_vcpu % page:
            raise InvalidConfig("bytes_per_vcpu",
                f"{self.bytes_per_vcpu} is not a multiple of the {self.backing} "
                f"page size ({page})")
        check_guest_memory("bytes_per_vcpu", self.guest_bytes(), self.mode,
                           streamed=self.engine != "exact", vcpus=self.vcpus)

    def guest_bytes(self) -> int:
        return self.vcpus * self.bytes_per_vcpu

    def host_bytes(self, params: Params | None = None) -> int:
        """What the run needs: on the compiled loop if it may take the run (may_stream;
        without `params`, unless the engine is exact: the least the run could need)."""
        streamed = may_stream(self, params) if params is not None else self.engine != "exact"
        return host_bytes_needed(self.guest_bytes(), streamed, self.vcpus)


def may_stream(opts: DemandPagingOptions, params: Params) -> bool:
    """Whether the compiled loop may take a run, judged from its options and parameters
    alone (docs/fastloop.md, Status: fifo or random, 4 KiB anonymous backing, no nesting,
    the tdp or legacy kernel, EPT A/D bits on), for the memory it is planned with. The run
    itself decides (fastloop.unsupported), and is checked again if it then goes exact."""
    return (opts.engine != "exact" and opts.policy in ("fifo", "random")
            and opts.backing == "anon" and opts.nested == "off" and params.ept
            and params.ept_ad and params.backend in ("tdp", "shadow"))


def check_guest_memory(field: str, total: int, mode: str = "4level", streamed: bool = False,
                       vcpus: int = 1) -> None:
    """Refuse, naming `field`, `total` bytes of test memory that the layout cannot hold (the
    paging mode's reach, MAXPHYADDR) or this machine cannot model. `streamed`: the run may
    go to the compiled loop, which needs less (host_bytes_needed) with `vcpus` vCPUs."""
    end = DATA_GPA + total
    if mode in ("32bit", "pae", "none") and end > 0xC000_0000:
        raise InvalidConfig(field, "32-bit guests can address at most 2 GiB of test memory here")
    pt_size = pt_slot_size(total >> 12)
    end = max(end, pt_slot_gpa(total, pt_size) + pt_size)
    if end > 1 << GUEST_MAXPHYADDR:
        raise InvalidConfig(field, f"{total >> 30} GiB of guest memory and its page tables "
                            f"do not fit below MAXPHYADDR ({GUEST_MAXPHYADDR} bits)")
    need, have = host_bytes_needed(total, streamed, vcpus), host_bytes_available()
    if need > have:
        raise InvalidConfig(field, f"this run needs about {need / 2**30:.1f} GiB "
                            f"of host memory for the model, and {have / 2**30:.1f} GiB is "
                            "available")


#: Host memory the model spends per 4 KiB guest page, all configurations: measured with
#: tracemalloc as the slope between 64 and 256 MiB runs (tdp 307-359 B, legacy/shadow
#: 703-875 B with their rmap dicts), rounded up; plus what the interpreter, numba and numpy
#: hold before any guest memory exists.
HOST_BYTES_PER_PAGE = 1024
HOST_BYTES_BASE = 400 << 20
#: The same on the compiled loop, which streams programs and results (docs/fastloop.md,
#: "Streaming"): what is left is the host model's arrays and the page tables. Measured as the
#: peak-RSS slope between `-v 416 -b 64M` and `-b 256M` with userfaultfd (session 8): tdp
#: 34.5 B, legacy 43.5 B (its rmap: 8 B per gfn); the larger serves both.
HOST_BYTES_PER_PAGE_STREAMED = 44
#: ... plus, at the end of a streamed run, one vCPU's program and results made whole for the
#: verification and the digest (docs/fastloop.md), per page of that vCPU's region: up to two
#: ops per page, three int64 columns each for the program, its copy in the expected results,
#: and the results.
STREAMED_BYTES_PER_VCPU_PAGE = 2 * 3 * 3 * 8
GUEST_MAXPHYADDR = 46  # VMConfig's default: the guest physical address width of these runs


def host_bytes_needed(guest_bytes: int, streamed: bool = False, vcpus: int = 1) -> int:
    """What a run over `guest_bytes` of test memory needs; `streamed`: on the compiled loop,
    with the memory split among `vcpus`."""
    if not streamed:
        return HOST_BYTES_BASE + HOST_BYTES_PER_PAGE * (guest_bytes >> 12)
    return (HOST_BYTES_BASE + HOST_BYTES_PER_PAGE_STREAMED * (guest_bytes >> 12)
            + STREAMED_BYTES_PER_VCPU_PAGE * (guest_bytes // vcpus >> 12))


def host_bytes_available() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping); else the
    machine's physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Programs(fastloop.PerVcpu):
    """The vCPUs' guest programs, each made when asked for (`programs[i]`), so that a run
    that streams them (the compiled loop, fastloop.StreamSpec) never holds them all: vCPU i
    writes each page of its region with the page's pattern, then reads each back; with
    userfaultfd it only reads (the handler supplies the pattern)."""

    def __init__(self, opts: DemandPagingOptions) -> None:
        super().__init__(opts.vcpus)
        self.vcpus = opts.vcpus
        self.bytes_per_vcpu = opts.bytes_per_vcpu
        self.pages = opts.bytes_per_vcpu >> 12
        self.writes = not opts.uffd

    def _make(self, i: int) -> np.ndarray:
        pages = self.pages
        gvas = DATA_GPA + i * self.bytes_per_vcpu + (np.arange(pages, dtype=np.int64) << 12)
        if not self.writes:
            prog = np.zeros((pages, 3), dtype=np.int64)
            prog[:, 0] = C.OP_READ
            prog[:, 1] = gvas
        else:
            prog = np.zeros((2 * pages, 3), dtype=np.int64)
            prog[:pages, 0] = C.OP_WRITE
            prog[:pages, 1] = gvas
            prog[:pages, 2] = _patterns(gvas)
            prog[pages:, 0] = C.OP_READ
            prog[pages:, 1] = gvas
        return prog

    def expected_results(self, i: int) -> np.ndarray:
        """vCPU i's results when every access did what it should: each read gives the
        page's pattern, nothing faults into the guest."""
        prog = self[i]
        res = np.zeros((len(prog), C.RES_COLS), dtype=np.int64)
        reads = prog[:, 0] == C.OP_READ
        res[reads, C.RES_VALUE] = _patterns(prog[reads, 1])
        return res

    def stream(self) -> fastloop.StreamSpec:
        return fastloop.StreamSpec(
            bases=DATA_GPA + np.arange(self.vcpus, dtype=np.int64) * self.bytes_per_vcpu,
            pages=self.pages, writes=self.writes, expected=self.expected_results)


def _programs(opts: DemandPagingOptions) -> list[np.ndarray]:
    """Every vCPU's program at once (for callers that edit them)."""
    return list(Programs(opts))


def _patterns(gvas: np.ndarray) -> np.ndarray:
    return page_patterns(gvas >> 12)


def _split(stats) -> TimeSplit:
    ph = dict(stats.phases)
    known = {"guest", "walk", "exit", "gup", "userfault", "tlb_flush"}
    return TimeSplit(
        total_ns=stats.total_ns,
        guest_ns=ph.get("guest", 0),
        walk_ns=ph.get("walk", 0),
        exit_ns=ph.get("exit", 0),
        lock_wait_ns=stats.lock_wait_ns,
        lock_held_ns=stats.lock_held_ns,
        gup_ns=ph.get("gup", 0) + ph.get("userfault", 0),
        tlb_flush_ns=ph.get("tlb_flush", 0),
        other_ns=sum(v for k, v in ph.items() if k not in known),
    )


def vcpu_counts(vm) -> tuple[dict[str, int], dict[str, int]]:
    """Fault outcomes and exits, summed over the VM's vCPUs."""
    faults: dict[str, int] = {}
    exits: dict[str, int] = {}
    for v in vm.vcpus:
        for k, n in v.faults.items():
            faults[k] = faults.get(k, 0) + n
        for k, n in v.exits.items():
            exits[k] = exits.get(k, 0) + n
    return faults, exits


def schedule_figures(opts, steps: int) -> ScheduleFigures:
    """How a run with `opts` (ScheduleFields and a seed) was scheduled, for its report."""
    return ScheduleFigures(
        policy=opts.policy, seed=opts.seed,
        jitter_ns=opts.jitter_ns if opts.policy == "random" else None,
        pct_depth=opts.pct_depth if opts.policy == "pct" else None,
        pct_steps=opts.pct_steps if opts.policy == "pct" else None,
        steps=steps)


def backend_stats(vm) -> BackendStats | None:
    """The statistics of the backend serving the VM's role, through its mmu_stats hook; None
    when it does not implement the hook (the report then says so instead of guessing)."""
    if not vm.hook.mmu_stats.get_hookimpls():
        return None
    stats = vm.hook.mmu_stats(vm=vm)
    if not isinstance(stats, MMUStats):
        raise BackendError(f"backend '{vm.backend_name}': mmu_stats returned "
                           f"{type(stats).__name__}, not MMUStats")
    return BackendStats(faults=stats.faults, retries=stats.retries, mapped_4k=stats.mapped_4k,
                        mapped_2m=stats.mapped_2m, mapped_1g=stats.mapped_1g,
                        mmio_sptes=stats.mmio_sptes, reclaimed_pages=stats.reclaimed_pages,
                        unsync_pages=stats.unsync_pages, syncs=stats.syncs,
                        emulated_pte_writes=stats.emulated_pte_writes)


def run_demand_paging(
    opts: DemandPagingOptions,
    params: Params,
    cost: CostModel | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DemandPagingReport:
    collect_earlier_runs()
    stopwatch = Stopwatch()
    spec = MachineSpec(vcpus=opts.vcpus, data_size=opts.vcpus * opts.bytes_per_vcpu,
                       backing=opts.backing, mode=MODES[opts.mode], userfault=opts.uffd,
                       uffd_shared=opts.uffd_shared)
    config = VMConfig(vcpus=opts.vcpus, seed=opts.seed, params=params, cost=cost or CostModel(),
                      policy=opts.policy, **opts.engine_options())
    if opts.nested != "off" and not params.ept:
        raise InvalidConfig("nested", "nested EPT needs EPT in L0: run it with the tdp or "
                            "legacy configuration (--configs tdp,legacy)")
    if opts.engine == "auto" and not may_stream(opts, params):
        # planned for the exact engine: checked before anything is built
        check_guest_memory("bytes_per_vcpu", spec.data_size, opts.mode)
    machine = build_machine(spec, config)
    vm = machine.vm
    try:
        ept12: frozenset[int] = frozenset()
        if opts.nested != "off":
            # L2's digest is L1's memory without L1's own EPT12 pages (docs/nested.md)
            hv = run_in_l2(machine, prefault=opts.nested == "eager").hv
        programs = Programs(opts)
        machine.spawn_uffd_handlers(opts.uffd_delay_ns)
        done = [0]
        chunks = PROGRESS_CHUNKS if progress else 1

        def vcpu_body(vcpu, prog, res):
            bounds = np.linspace(0, len(prog), chunks + 1).astype(int)
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                vcpu.run(prog, res, lo, hi)
                done[0] += 1
                if progress:
                    progress(done[0], opts.vcpus * chunks)

        start_ns = vm.engine.now
        kernels = fastloop.kernels_of(vm) if opts.engine != "exact" else None
        why_not = fastloop.unsupported(vm, kernels) if opts.engine != "exact" else None
        if opts.engine == "compiled" and why_not is not None:
            raise InvalidConfig("engine", f"the compiled loop cannot run this: {why_not}")
        if opts.engine == "exact" or why_not is not None:
            engine_used = "exact"
            need = host_bytes_needed(spec.data_size)
            # Planned for the compiled loop, refused for a reason the options do not show:
            # checked again (the machine is built by now, so this errs on the side of refusing)
            if why_not is not None and may_stream(opts, params) \
                    and need > host_bytes_available():
                raise InvalidConfig("engine", f"the compiled loop cannot run this ({why_not}), "
                                    f"and on the exact engine it needs about "
                                    f"{need / 2**30:.1f} GiB of host memory for the model: "
                                    f"{host_bytes_available() / 2**30:.1f} GiB is available")
            programs = list(programs)
            results = [np.zeros((len(p), C.RES_COLS), dtype=np.int64) for p in programs]
            tasks = [vm.engine.spawn(f"vcpu{v.id}", vcpu_body, v, p, r)
                     for v, p, r in zip(vm.vcpus, programs, results, strict=True)]
            with frozen_setup():
                vm.engine.run()
        else:
            engine_used = "compiled"
            with frozen_setup():
                tasks, results = fastloop.run_compiled(vm, kernels, programs.stream(), chunks,
                                                        progress, opts.uffd_delay_ns)
        total_ns = vm.engine.now - start_ns
        pages = opts.bytes_per_vcpu >> 12
        mismatches = 0
        for i, res in enumerate(results):
            expect = _patterns(programs[i][-pages:, 1])
            mismatches += int(np.count_nonzero(res[-pages:, C.RES_VALUE] != expect))
            mismatches += int(np.count_nonzero(res[:, C.RES_VECTOR]))
        per_vcpu = []
        for i, task in enumerate(tasks):
            st = task.statistics()
            per_vcpu.append(VcpuFigures(
                vcpu=i, pages=pages, time_ns=st.total_ns,
                pages_per_sec=pages / (st.total_ns / 1e9) if st.total_ns else 0.0,
                time=_split(st)))
        summed = TimeSplit(**{f: sum(getattr(v.time, f) for v in per_vcpu)
                              for f in TimeSplit.model_fields})
        faults, exits = vcpu_counts(vm)
        stats = backend_stats(vm)
        mem = vm.memory()
        guest_bytes = spec.data_size
        if opts.nested != "off":
            ept12 = frozenset(hv.tables)
        digest = guest_digest(vm, results, ept12)
        cmpxchg_failures = sum(t.statistics().cmpxchg_failures for t in tasks)
        steps = vm.engine.steps
        host = host_figures(vm, tasks, machine.uffds)
        handlers = len(machine.uffds) * (opts.vcpus if opts.uffd_shared else 1)
        fixed = fixed_phases(vm.engine.cost, opts.vcpus,
                             sum(len(slots.slots) for slots in vm.memslots), mem.rmap_bytes,
                             opts.vcpus + handlers)
    finally:
        vm.destroy()
    nfaults = sum(faults.values())
    return DemandPagingReport(
        configuration=configuration_name(params),
        params=report_params(params),
        backend=vm.backend_name,
        seed=opts.seed,
        schedule=schedule_figures(opts, steps),
        vcpus=opts.vcpus,
        bytes_per_vcpu=opts.bytes_per_vcpu,
        backing=opts.backing,
        paging_mode=opts.mode,
        uffd=opts.uffd,
        uffd_delay_ns=opts.uffd_delay_ns,
        uffd_shared=opts.uffd_shared,
        nested=opts.nested,
        pages=pages * opts.vcpus,
        verified=mismatches == 0,
        mismatches=mismatches,
        total_time_ns=total_ns,
        pages_per_sec=pages * opts.vcpus / (total_ns / 1e9) if total_ns else 0.0,
        per_vcpu=per_vcpu,
        time=summed,
        lock_wait_share=summed.lock_wait_ns / summed.total_ns if summed.total_ns else 0.0,
        faults=faults,
        exits=exits,
        mappings_by_level={"4K": stats.mapped_4k if stats else 0,
                           "2M": stats.mapped_2m if stats else 0,
                           "1G": stats.mapped_1g if stats else 0},
        backend_stats=stats,
        cmpxchg_failures=cmpxchg_failures,
        tlb_flushes=vm.tlb_flushes,
        memory=MemoryFigures(
            page_table_pages=mem.page_table_pages,
            page_table_bytes=mem.page_table_bytes,
            peak_page_table_pages=mem.peak_page_table_pages,
            mmu_page_structs=mem.mmu_page_structs,
            mmu_page_struct_bytes=mem.mmu_page_struct_bytes,
            rmap_bytes=mem.rmap_bytes,
            metadata_bytes=mem.metadata_bytes,
            guest_memory_bytes=guest_bytes,
            page_table_share=mem.page_table_bytes / guest_bytes,
            metadata_share=mem.metadata_bytes / guest_bytes,
        ),
        host=host,
        fixed=fixed,
        test_time_ns=fixed.total_ns + total_ns,
        digest=digest,
        wall=stopwatch.figures(nfaults, engine=engine_used, engine_note=why_not),
    )
