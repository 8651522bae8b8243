"""Name numba's compiled code in `perf` profiles: runs a demand-paging configuration and
writes `/tmp/perf-<pid>.map` (perf's JIT symbol file) for every jitted function, so that
`perf report` shows `run_loop`, `_pop`, `run_ops`, the backends' kernels, ... instead of bare
addresses. With `--dump DIR` it also writes each function's machine code (`NAME.bin`,
`NAME.addr`) for an instruction-level look at the samples:

    python benchmarks/perf_map.py tdp 416 32M &          # prints its pid, then waits
    perf record -e cpu-clock -F 4000 -p PID -- sleep 15
    perf report --sort sym --stdio
    objdump -D -b binary -mi386:x86-64 --adjust-vma=$(cat DIR/run_loop.addr) DIR/run_loop.bin

The map is written after a warm-up run (so the loop is compiled) and again after the
measured run. docs/fastloop.md, "Speed", has what it showed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: the functions whose code --dump writes, by the prefix of their mangled names
DUMPED = {
    "run_loop": "_ZN8mmu_core3sim8fastloop8run_loop",
    "pop": "_ZN8mmu_core3sim8fastloop4_pop",
    "run_ops": "_ZN8mmu_core2hw3cpu7run_ops",
    "tdp_kernel": "_ZN7mmu_tdp8compiled10tdp_kernel",
    "legacy_kernel": "_ZN10mmu_shadow8compiled13legacy_kernel",
}


def jitted_functions() -> list[tuple[int, str]]:
    """(address, mangled name) of every compiled function of every numba dispatcher alive."""
    from numba.core.registry import CPUDispatcher

    rows, seen = [], set()
    for obj in gc.get_objects():
        if not isinstance(obj, CPUDispatcher):
            continue
        for cres in obj.overloads.values():
            lib = cres.library
            if id(lib) in seen:
                continue
            seen.add(id(lib))
            for fn in lib._final_module.functions:
                if fn.is_declaration:
                    continue
                addr = lib._codegen._engine.get_function_address(fn.name)
                if addr:
                    rows.append((addr, fn.name))
    return sorted(rows)


def write_perf_map(dump: Path | None = None) -> int:
    """Write perf's map for this process; each function extends to the next one's address
    (numba does not say how long a function is; the last is given 64 KiB)."""
    rows = jitted_functions()
    ends = [a for a, _ in rows[1:]] + [rows[-1][0] + 0x10000] if rows else []
    with open(f"/tmp/perf-{os.getpid()}.map", "w") as out:
        for (addr, name), end in zip(rows, ends, strict=True):
            out.write(f"{addr:x} {end - addr:x} {name}\n")
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        for (addr, name), end in zip(rows, ends, strict=True):
            for short, prefix in DUMPED.items():
                if name.startswith(prefix):
                    (dump / f"{short}.bin").write_bytes(ctypes.string_at(addr, end - addr))
                    (dump / f"{short}.addr").write_text(hex(addr))
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", choices=["tdp", "legacy"])
    ap.add_argument("vcpus", type=int)
    ap.add_argument("size", help="bytes per vCPU, e.g. 32M")
    ap.add_argument("--no-uffd", action="store_true", help="without userfaultfd")
    ap.add_argument("--wait", type=float, default=3.0,
                    help="seconds to wait after printing the pid, for perf to attach")
    ap.add_argument("--dump", type=Path, help="also write the hot functions' machine code here")
    args = ap.parse_args()

    from cli import parse_size
    from mmu_core.params import configuration
    from mmu_core.workloads.demand_paging import DemandPagingOptions, run_demand_paging

    uffd = not args.no_uffd
    run_demand_paging(DemandPagingOptions(vcpus=2, bytes_per_vcpu=1 << 20, uffd=uffd,
                                          engine="compiled"), configuration(args.config))
    n = write_perf_map(args.dump)
    print(f"pid {os.getpid()}: {n} functions mapped; running in {args.wait:g} s", flush=True)
    time.sleep(args.wait)
    opts = DemandPagingOptions(vcpus=args.vcpus, bytes_per_vcpu=parse_size(args.size),
                               uffd=uffd, engine="compiled")
    t0 = time.process_time()
    r = run_demand_paging(opts, configuration(args.config))
    cpu = time.process_time() - t0
    faults = sum(r.faults.values())
    write_perf_map(args.dump)
    print(f"{args.config}: {faults:,} faults, {cpu:.2f} s of CPU, "
          f"{1e9 * cpu / faults:,.0f} ns per fault ({r.wall.engine})")


if __name__ == "__main__":
    main()
