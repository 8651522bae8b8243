"""Run reports: pydantic models with one JSON schema; the CLI renders them as tables or JSON."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Tag

# 2: `schedule` added; wall-clock figures grouped under `wall`. 3: `backend_stats` (the
# backend's mmu_stats hook) added. The selftest workloads' reports (below) were added in 3 and
# a compare report's runs may be any of them; the demand-paging report did not change.
# 4: the host model: `host` (HostFigures), `uffd_shared` and `nested` in the demand-paging
# report;
# BackendStats gained reclaimed_pages, unsync_pages, syncs and emulated_pte_writes (optional,
# None by default, so reports of 4 without them still load).
# 5: `fixed` (the test's fixed phases) and `test_time_ns` in the demand-paging report.
# 6: `wall.cpu_seconds` (optional: None in reports of 5).
SCHEMA_VERSION = 6


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class TimeSplit(Frozen):
    """Virtual nanoseconds by exclusive category; they add up to `total_ns`."""

    total_ns: int
    guest_ns: int
    walk_ns: int
    exit_ns: int
    lock_wait_ns: int
    lock_held_ns: int
    gup_ns: int  # get_user_pages, incl. waiting for the userfault handler
    tlb_flush_ns: int
    other_ns: int


class VcpuFigures(Frozen):
    vcpu: int
    pages: int
    time_ns: int
    pages_per_sec: float
    time: TimeSplit


class MemoryFigures(Frozen):
    page_table_pages: int
    page_table_bytes: int
    peak_page_table_pages: int
    mmu_page_structs: int
    mmu_page_struct_bytes: int
    rmap_bytes: int
    metadata_bytes: int
    guest_memory_bytes: int
    page_table_share: float  # of guest memory
    metadata_share: float


class BackendStats(Frozen):
    """The backend's own counts (hook mmu_stats, types.MMUStats), as reported."""

    faults: int  # mmu_page_fault calls the backend handled
    retries: int  # of those, answered RETRY
    mapped_4k: int
    mapped_2m: int
    mapped_1g: int
    mmio_sptes: int
    # The shadow MMU's events (types.MMUStats); None for a backend without them (tdp) and in
    # reports written before they were added.
    reclaimed_pages: int | None = None
    unsync_pages: int | None = None
    syncs: int | None = None
    emulated_pte_writes: int | None = None


class ScheduleFigures(Frozen):
    """How the engine interleaved the tasks: (seed, policy, parameters) replay it exactly.
    Parameters of other policies are None."""

    policy: str  # fifo | random | pct
    seed: int
    jitter_ns: int | None  # random
    pct_depth: int | None  # pct
    pct_steps: int | None  # pct
    steps: int  # switch points passed in the run: what pct_steps should be near


class WallClock(Frozen):
    """The only figures that differ between two runs of the same schedule: the simulation's
    own cost on this machine (strip `wall` from the JSON to compare runs)."""

    seconds: float
    sim_faults_per_sec: float
    peak_rss_bytes: int
    #: the process's CPU time over the run (time.process_time): on a shared machine the wall
    #: time moves with the other processes' load, this does not
    cpu_seconds: float | None = None
    #: which engine ran the run (docs/fastloop.md): "exact" (greenlets) or "compiled"; both
    #: give the same report apart from this group
    engine: str = "exact"
    #: under --engine auto, why the compiled loop did not run it (None: it did, or not asked)
    engine_note: str | None = None


class HostFigures(Frozen):
    """The host as the engine modelled it (docs/engine.md, "The host"): its CPUs, who was
    on them, and the cache lines that queued."""

    host_cpus: int | None  # None: unlimited
    vcpu_on_cpu_ns: int  # vCPU threads running or spinning (not asleep, not in a run queue)
    all_on_cpu_ns: int  # every task: vCPUs, userfault handlers, workers
    # The vCPUs' MMU-lock wait as a share of their on-CPU time (lock_wait_share divides by
    # all of their time, asleep in userfault included)
    lock_wait_share_on_cpu: float
    # Every task's MMU-lock wait as a share of all on-CPU time: what a system-wide profile
    # (the seed's 1-second perf run) samples as time spent waiting for the MMU lock
    profile_lock_share: float
    runqueue_ns: int  # summed time tasks were due to run but waited for a free CPU
    mmap_lock_transfers: int  # of the mmap lock's cache line between CPUs
    mmap_lock_line_wait_ns: int  # queued behind other CPUs' transfers of that line
    mmap_lock_sleeps: int  # acquires that found the mmap lock taken and slept
    mmu_lock_transfers: int
    mmu_lock_line_wait_ns: int
    uffd_empty_reads: int  # handlers woken by a fault another handler read first


class FixedPhases(Frozen):
    """What the whole test costs outside the simulated run, in virtual ns
    (mmu_core/workloads/fixed_phases.py)."""

    vm_create_ns: int
    vcpu_create_ns: int  # KVM_CREATE_VCPU for every vCPU
    memslot_create_ns: int  # SRCU grace periods and the metadata allocated with the slots
    threads_ns: int  # vCPU and userfault handler threads started and joined
    total_ns: int


class DemandPagingReport(Frozen):
    schema_version: int = SCHEMA_VERSION
    workload: str = "demand-paging"
    configuration: str  # tdp | legacy | shadow, or the backend name
    params: dict[str, str]
    backend: str
    seed: int
    schedule: ScheduleFigures
    vcpus: int
    bytes_per_vcpu: int
    backing: str
    paging_mode: str
    uffd: bool
    uffd_delay_ns: int
    uffd_shared: bool = False  # -a: one uffd for all, one handler per vCPU
    nested: str = "off"  # -n: the guest code ran in L2 (eager or lazy EPT12)
    pages: int
    verified: bool
    mismatches: int
    total_time_ns: int  # virtual: the demand-paging phase, first vCPU start to last finish
    pages_per_sec: float  # overall demand-paging rate, virtual time
    per_vcpu: list[VcpuFigures]
    time: TimeSplit  # summed over vCPUs
    lock_wait_share: float  # of summed vCPU time
    faults: dict[str, int]  # by outcome
    exits: dict[str, int]
    mappings_by_level: dict[str, int]  # from backend_stats; zeros when that is None
    backend_stats: BackendStats | None  # None: the backend does not implement mmu_stats
    cmpxchg_failures: int
    tlb_flushes: int
    memory: MemoryFigures
    host: HostFigures | None = None  # None in reports of schema 3
    fixed: FixedPhases | None = None  # None in reports before schema 5
    # The whole test: fixed phases + total_time_ns (the seed's "total time"); 0 before 5
    test_time_ns: int = 0
    digest: str
    wall: WallClock


# --- the KVM selftests beyond demand paging (mmu_core/workloads/selftests.py) ---------------
class NamedTime(Frozen):
    """One timed step as the selftest prints it: its label and virtual nanoseconds."""

    label: str  # e.g. "Iteration 2 get dirty log time", "Writing to idle memory"
    ns: int


class SelftestReport(Frozen):
    """What every selftest workload reports. `lines` are the selftest's own output lines
    (pr_info) with virtual times; `timings` hold the same times as numbers, in order."""

    schema_version: int = SCHEMA_VERSION
    configuration: str
    params: dict[str, str]
    backend: str
    seed: int
    schedule: ScheduleFigures
    vcpus: int
    bytes_per_vcpu: int  # memory each vCPU accesses (kvm-page-table: the shared region)
    backing: str
    lines: list[str]
    timings: list[NamedTime]
    verified: bool  # every read returned what was last written, no fault reached the guest
    mismatches: int
    faults: dict[str, int]  # by outcome, summed over vCPUs
    exits: dict[str, int]
    time: TimeSplit  # summed over vCPUs, idle time between rounds left out
    mappings_by_level: dict[str, int]  # at the end, from backend_stats; zeros when None
    backend_stats: BackendStats | None
    tlb_flushes: int
    digest: str  # guest-visible outcome (mmu_core.testing.parity.guest_digest)
    wall: WallClock


class DirtyLogIteration(Frozen):
    iteration: int
    dirty_memory_ns: int
    get_dirty_log_ns: int
    clear_dirty_log_ns: int | None  # None without manual protection (-g)
    pages_written: int
    pages_logged: int
    logged_not_written: int  # beyond the pages KVM_DIRTY_LOG_INITIALLY_SET reports


class DirtyLogPerfReport(SelftestReport):
    workload: Literal["dirty-log-perf"] = "dirty-log-perf"
    iterations: int
    write_percent: int
    eager_page_split: bool  # the parameter the VM ran with
    manual_protect: bool  # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with KVM_DIRTY_LOG_INITIALLY_SET
    clear_chunk_pages: int  # pages per KVM_CLEAR_DIRTY_LOG call; 0 = the whole slot
    slots: int
    run_vcpus_while_disabling: bool
    populate_ns: int
    enable_dirty_logging_ns: int
    disable_dirty_logging_ns: int
    per_iteration: list[DirtyLogIteration]
    dirty_memory_total_ns: int
    get_dirty_log_total_ns: int
    clear_dirty_log_total_ns: int | None
    logged_not_written: int  # summed over iterations; 0 with exact (PML/D-bit/WP) logging


class IdleMarking(Frozen):
    """One pass of marking memory idle through page_idle, summed over vCPUs."""

    pages: int
    still_idle: int  # pages idle since the previous marking: accessed by no one
    no_pfn: int  # pages with nothing mapped (pagemap not present)
    tail_pages: int  # pages of huge folios other than the head: page_idle skips them


class AccessTrackingReport(SelftestReport):
    workload: Literal["access-tracking-perf"] = "access-tracking-perf"
    backend_ages: bool  # the backend implements mmu_age_gfn_range (else every page is young)
    markings: list[IdleMarking]


class MemslotStressReport(SelftestReport):
    workload: Literal["memslot-modification-stress"] = "memslot-modification-stress"
    iterations: int
    delay_ns: int
    modifications_ns: int  # the main task's add/delete loop, delays included
    add_memslot_ns: int  # summed over iterations
    delete_memslot_ns: int
    passes: list[int]  # passes over its memory each vCPU completed meanwhile


class StageFigures(Frozen):
    stage: str  # KVM_CREATE_MAPPINGS, KVM_UPDATE_MAPPINGS, KVM_ADJUST_MAPPINGS
    ns: int
    mappings_by_level: dict[str, int]  # leaf SPTEs faults installed so far (backend_stats)
    # leaf SPTEs mapped at the end of the stage (the backend's pages_4k/2m/1g gauges): splits
    # and merges show here; None when the backend does not keep them
    pages_by_level: dict[str, int] | None


class PageTableReport(SelftestReport):
    workload: Literal["kvm-page-table"] = "kvm-page-table"
    test_mem_size: int  # aligned up to the backing's page size
    large_page_size: int
    stages: list[StageFigures]
    enable_dirty_logging_ns: int
    disable_dirty_logging_ns: int


def _workload_of(value: object) -> str:
    if isinstance(value, dict):
        return str(value.get("workload", "demand-paging"))
    return str(getattr(value, "workload", "demand-paging"))


#: Any run's report, told apart by its `workload`.
RunReport = Annotated[
    Annotated[DemandPagingReport, Tag("demand-paging")]
    | Annotated[DirtyLogPerfReport, Tag("dirty-log-perf")]
    | Annotated[AccessTrackingReport, Tag("access-tracking-perf")]
    | Annotated[MemslotStressReport, Tag("memslot-modification-stress")]
    | Annotated[PageTableReport, Tag("kvm-page-table")],
    Discriminator(_workload_of),
]

REPORTS: dict[str, type[Frozen]] = {
    "demand-paging": DemandPagingReport, "dirty-log-perf": DirtyLogPerfReport,
    "access-tracking-perf": AccessTrackingReport,
    "memslot-modification-stress": MemslotStressReport, "kvm-page-table": PageTableReport,
}


class CompareReport(Frozen):
    schema_version: int = SCHEMA_VERSION
    workload: str
    runs: list[RunReport]
    identical: bool  # guest-visible digests equal across configurations
