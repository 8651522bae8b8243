"""Real programs' memory accesses as guest programs: valgrind lackey traces.

`valgrind --tool=lackey --trace-mem=yes --log-file=T prog` writes one line per access:
`I  addr,size` (instruction fetch), ` L addr,size` (load), ` S addr,size` (store) and
` M addr,size` (modify: a load then a store); lines starting with `==` are valgrind's own.
Gzip-compressed traces are read as they are.

The traced program's pages are packed, in order of address, into the guest's data slot
(the gva keeps the offset within the page), so a trace of a 64-bit process runs in any guest
paging mode. Each vCPU replays the whole trace in an address space of its own (its own copy
of the pages), so what every access reads does not depend on the interleaving and the
configurations must agree on the digest. A store writes a value that names it (its line).
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from mmu_core.config import ScheduleFields, VMConfig
from mmu_core.errors import InvalidConfig
from mmu_core.guest.machine import DATA_GPA, MachineSpec, build_machine
from mmu_core.hw import cpu as C
from mmu_core.params import Params, configuration_name
from mmu_core.report.models import Frozen, TimeSplit
from mmu_core.testing.parity import guest_digest
from mmu_core.workloads.demand_paging import _split
from mmu_core.workloads.heap import collect_earlier_runs, frozen_setup

_KINDS = {"I": (C.OP_FETCH,), "L": (C.OP_READ,), "S": (C.OP_WRITE,), "M": (C.OP_READ, C.OP_WRITE)}


class TraceOptions(ScheduleFields):
    vcpus: int = Field(1, ge=1, le=64, description="vCPUs, each replaying the whole trace")
    limit: int = Field(0, ge=0, description="replay at most this many accesses (0: all)")
    seed: int = 0


class TraceReport(Frozen):
    configuration: str
    backend: str
    trace: str
    vcpus: int
    accesses: int  # per vCPU
    pages: int  # distinct 4 KiB pages the program touched
    faults: dict[str, int]
    exits: dict[str, int]
    total_time_ns: int
    time: TimeSplit
    digest: str
    wall_seconds: float


def parse_lackey(path: str | Path, limit: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(op, address, line number) per access, in trace order."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidConfig("trace", f"cannot read {path}: {exc.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise InvalidConfig("trace", f"{path} is not valid gzip: {exc}") from None
    ops: list[int] = []
    addrs: list[int] = []
    lines: list[int] = []
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.startswith("=="):
            continue
        try:
            kind, rest = line.split(None, 1)
            addr_text, size_text = rest.strip().split(",")
            kinds, addr = _KINDS[kind], int(addr_text, 16)
            int(size_text)
        except (ValueError, KeyError):
            raise InvalidConfig("trace", f"{path}:{n}: not a lackey line: {line[:60]!r}") \
                from None
        for op in kinds:
            ops.append(op)
            addrs.append(addr)
            lines.append(n)
        if limit and len(ops) >= limit:
            break
    if not ops:
        raise InvalidConfig("trace", f"{path} holds no accesses")
    return (np.array(ops[: limit or None], np.int64), np.array(addrs[: limit or None], np.int64),
            np.array(lines[: limit or None], np.int64))


def run_trace(path: str | Path, opts: TraceOptions, params: Params) -> TraceReport:
    collect_earlier_runs()
    wall0 = time.perf_counter()
    ops, addrs, lines = parse_lackey(path, opts.limit)
    pages, index = np.unique(addrs >> 12, return_inverse=True)
    npages = len(pages)
    spec = MachineSpec(vcpus=opts.vcpus, data_size=npages * opts.vcpus * 4096)
    config = VMConfig(vcpus=opts.vcpus, seed=opts.seed, params=params, policy=opts.policy,
                      **opts.engine_options())
    machine = build_machine(spec, config)
    vm = machine.vm
    try:
        programs = []
        for v in range(opts.vcpus):
            prog = np.zeros((len(ops), 3), np.int64)
            prog[:, 0] = ops
            prog[:, 1] = DATA_GPA + ((index + v * npages) << 12) + (addrs & 0xFFF)
            prog[:, 2] = np.where(ops == C.OP_WRITE, (lines << 8) | (v + 1), 0)
            programs.append(prog)
        with frozen_setup():
            results = machine.run_programs(programs)
        stats = [v.task.statistics() for v in vm.vcpus]
        split = TimeSplit(**{f: sum(getattr(_split(s), f) for s in stats)
                             for f in TimeSplit.model_fields})
        faults: dict[str, int] = {}
        exits: dict[str, int] = {}
        for v in vm.vcpus:
            for k, n in v.faults.items():
                faults[k] = faults.get(k, 0) + n
            for k, n in v.exits.items():
                exits[k] = exits.get(k, 0) + n
        return TraceReport(
            configuration=configuration_name(params), backend=vm.backend_name,
            trace=Path(path).name, vcpus=opts.vcpus, accesses=len(ops), pages=npages,
            faults=faults, exits=exits, total_time_ns=vm.engine.now, time=split,
            digest=guest_digest(vm, results), wall_seconds=time.perf_counter() - wall0)
    finally:
        vm.destroy()
