"""HostFigures for a run's report: CPUs, on-CPU time and the contended lines (docs/engine.md)."""

from __future__ import annotations

from mmu_core.report.models import HostFigures
from mmu_core.sim import RUNQUEUE_PHASE, Task


def host_figures(vm, vcpu_tasks: list[Task], uffds=()) -> HostFigures:
    """What the host model saw during the run of `vcpu_tasks` in `vm`'s engine."""
    engine = vm.engine
    everyone = [t.statistics() for t in engine.tasks]
    vcpus = [t.statistics() for t in vcpu_tasks]
    vcpu_cpu = sum(s.cpu_ns for s in vcpus)
    all_cpu = sum(s.cpu_ns for s in everyone)
    sem = vm.mm.mmap_lock
    return HostFigures(
        host_cpus=engine.host_cpus,
        vcpu_on_cpu_ns=vcpu_cpu,
        all_on_cpu_ns=all_cpu,
        lock_wait_share_on_cpu=sum(s.lock_wait_ns for s in vcpus) / vcpu_cpu if vcpu_cpu else 0.0,
        profile_lock_share=(sum(s.lock_wait_ns for s in everyone) / all_cpu
                            if all_cpu else 0.0),
        runqueue_ns=sum(s.phases.get(RUNQUEUE_PHASE, 0) for s in everyone),
        mmap_lock_transfers=sem.line.transfers if sem is not None else 0,
        mmap_lock_line_wait_ns=sem.line.wait_ns if sem is not None else 0,
        mmap_lock_sleeps=sem.contended if sem is not None else 0,
        mmu_lock_transfers=vm.mmu_lock.line.transfers,
        mmu_lock_line_wait_ns=vm.mmu_lock.line.wait_ns,
        uffd_empty_reads=sum(u.empty_reads for u in uffds),
    )
