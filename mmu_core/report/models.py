"""Run reports: pydantic models with one JSON schema; the CLI renders them as tables or JSON."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# 2: `schedule` added; wall-clock figures grouped under `wall`. 3: `backend_stats` (the
# backend's mmu_stats hook) added.
SCHEMA_VERSION = 3


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
    digest: str
    wall: WallClock


class CompareReport(Frozen):
    schema_version: int = SCHEMA_VERSION
    workload: str
    runs: list[DemandPagingReport]
    identical: bool  # guest-visible digests equal across configurations
