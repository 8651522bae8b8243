"""VM configuration: a frozen pydantic model validated at the boundary, one message per error."""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mmu_core.errors import InvalidConfig
from mmu_core.params import Params
from mmu_core.sim.cost import CostModel
from mmu_core.sim.engine import (
    DEFAULT_HOST_CPUS,
    DEFAULT_JITTER_NS,
    DEFAULT_PCT_DEPTH,
    DEFAULT_PCT_STEPS,
    POLICIES,
)

PAGE = 4096


class ScheduleFields(BaseModel):
    """The engine's schedule policy and its parameters (docs/engine.md), shared by every
    config that creates an engine. Each parameter is validated whatever the policy, so a bad
    value is reported before the run that would have used it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    policy: str = Field("fifo", description="schedule policy: " + " | ".join(POLICIES))
    jitter_ns: int = Field(DEFAULT_JITTER_NS, ge=0,
                           description="random: widest reordering of due times, ns")
    pct_depth: int = Field(DEFAULT_PCT_DEPTH, ge=1,
                           description="pct: bug depth d (d - 1 priority change points)")
    pct_steps: int = Field(DEFAULT_PCT_STEPS, ge=1,
                           description="pct: change points are drawn from steps [1, pct_steps]")
    host_cpus: int | None = Field(DEFAULT_HOST_CPUS, ge=1,
                                  description="host logical CPUs shared by vCPU threads, userfault "
                                  "handlers and workers (None: unlimited); the default is the "
                                  "seed's kind of host (docs/engine.md)")

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v not in POLICIES:
            raise ValueError(f"unknown policy '{v}' (one of: {', '.join(POLICIES)})")
        return v

    @field_validator("pct_steps")
    @classmethod
    def _enough_steps(cls, v: int, info: ValidationInfo) -> int:
        depth = info.data.get("pct_depth")  # absent if pct_depth itself was invalid
        if depth is not None and v < depth - 1:
            raise ValueError(f"must be at least pct_depth - 1 = {depth - 1}: each of the "
                             f"{depth - 1} priority change points needs its own step")
        return v

    def engine_options(self) -> dict[str, object]:
        """Keyword arguments for Engine(seed, cost, policy, **these)."""
        return {"jitter_ns": self.jitter_ns, "pct_depth": self.pct_depth,
                "pct_steps": self.pct_steps, "host_cpus": self.host_cpus}


class MemslotConfig(BaseModel):
    """One memslot: guest-physical [gpa, gpa+size) backed by host memory of `backing`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    slot: int = Field(ge=0, lt=32768)
    as_id: int = Field(0, ge=0, le=1, description="0 normal, 1 SMM")
    gpa: int = Field(ge=0)
    size: int = Field(gt=0)
    backing: str = Field("anon", pattern="^(anon|thp|hugetlb)$")
    userfault: bool = False
    readonly: bool = False
    log_dirty: bool = False

    @field_validator("gpa", "size")
    @classmethod
    def _aligned(cls, v: int) -> int:
        if v % PAGE:
            raise ValueError(f"{v:#x} is not 4 KiB aligned")
        return v


class VMConfig(ScheduleFields):
    """What a VM is created with; `params` is the snapshot of the module parameters. The
    engine's seed, policy and its parameters come with it (ScheduleFields)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    vcpus: int = Field(1, ge=1, le=4096)
    memslots: tuple[MemslotConfig, ...] = ()
    maxphyaddr: int = Field(46, ge=36, le=52)
    tlb_entries: int = Field(1024, ge=16)
    seed: int = 0
    params: Params = Params()
    cost: CostModel = CostModel()
    # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, enabled per VM: KVM_GET_DIRTY_LOG only copies the
    # bitmap, and KVM_CLEAR_DIRTY_LOG clears and re-protects the pages userspace names.
    dirty_log_manual_protect: bool = False
    # KVM_DIRTY_LOG_INITIALLY_SET: enabling logging sets every bit and protects nothing; pages
    # are protected as userspace clears them (needs manual protect).
    dirty_log_initially_set: bool = False

    @field_validator("tlb_entries")
    @classmethod
    def _pow2(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("must be a power of two")
        return v

    @model_validator(mode="after")
    def _slots(self) -> VMConfig:
        if self.dirty_log_initially_set and not self.dirty_log_manual_protect:
            raise ValueError("dirty_log_initially_set needs dirty_log_manual_protect "
                             "(KVM_DIRTY_LOG_INITIALLY_SET is a flag of MANUAL_PROTECT2)")
        seen: dict[tuple[int, int], MemslotConfig] = {}
        ranges: dict[int, list[MemslotConfig]] = {0: [], 1: []}
        for ms in self.memslots:
            if (ms.as_id, ms.slot) in seen:
                raise ValueError(f"memslot {ms.slot} defined twice in address space {ms.as_id}")
            seen[(ms.as_id, ms.slot)] = ms
            if ms.gpa + ms.size > 1 << self.maxphyaddr:
                raise ValueError(
                    f"memslot {ms.slot} ends at {ms.gpa + ms.size:#x}, beyond MAXPHYADDR "
                    f"({self.maxphyaddr} bits)"
                )
            for other in ranges[ms.as_id]:
                if ms.gpa < other.gpa + other.size and other.gpa < ms.gpa + ms.size:
                    raise ValueError(f"memslots {other.slot} and {ms.slot} overlap")
            ranges[ms.as_id].append(ms)
        return self


def validate(model: type[BaseModel], **values: object) -> BaseModel:
    """Build a model, turning pydantic's report into one InvalidConfig naming the field."""
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or model.__name__
        msg = err["msg"].removeprefix("Value error, ")
        raise InvalidConfig(field, msg) from None
