"""Runs of workloads in separate processes at once: `mmu compare --jobs N` runs its
configurations this way (and `mmu sweep --jobs N` checks its points' memory the same way).

A run's report does not depend on the process it ran in: the engine is deterministic, each
run builds its own VM from its options and parameters, and only the `wall` figures (wall
time, faults per wall second, peak RSS) are the process's own. Each job runs in a fresh
interpreter (the spawn start method: no state inherited from the parent but what the job's
arguments carry), at most `workers` at once, and the results come back in the jobs' order.

Errors come back as what they are: an error a run raises (bad input found only when the run
reads it, a failed check, a backend breaking the contract) is raised again in the parent with
its class and message, and the other runs are stopped. Ctrl-C stops every run: a worker starts
with SIGINT ignored (the disposition is inherited; the signal mask is not) until its job
starts, so a Ctrl-C while it imports prints nothing; the parent, while it starts a worker,
ignores SIGINT too but blocks it first, and Linux keeps a blocked signal pending even when it
is ignored, so that Ctrl-C reaches the parent once the worker has started. A worker
interrupted inside its run tears its VM down and reports it, and the parent, whatever
interrupted it, terminates and reaps every worker still alive before it re-raises: no
process outlives the command.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any

from mmu_core.errors import InvalidConfig, MMUError

#: seconds a worker gets to exit after SIGTERM before SIGKILL
_GRACE = 5.0


@dataclass(frozen=True)
class Job:
    """One run: `fn(*args, **kwargs)`, plus `progress=callback` when `progress` is "relay"
    (to the parent) or "silent" (a callback that does nothing: a workload may pace itself
    by whether it has one, and its report must not depend on where it ran); `fn` must be
    importable (a module-level function) and its arguments picklable."""

    fn: Callable[..., Any]
    args: tuple = ()
    progress: str | None = "silent"
    label: str = ""
    kwargs: dict = field(default_factory=dict)


def check_parallel_memory(needs: Sequence[int], workers: int, available: int,
                          what: str = "points") -> None:
    """Each run alone fits (its options were validated); the `workers` largest of them at
    once, each in its own process needing `needs[i]` bytes (host_bytes), must fit together
    in `available` bytes."""
    at_once = sorted(needs, reverse=True)[:max(1, workers)]
    need = sum(at_once)
    if len(at_once) > 1 and need > available:
        raise InvalidConfig("jobs", f"{len(at_once)} {what} at once need about "
                            f"{need / 2**30:.1f} GiB of host memory for the model, and "
                            f"{available / 2**30:.1f} GiB is available: use fewer --jobs")


def guest_bytes(opts: Any) -> int:
    """The test memory a workload's options give its VM (0 when the options do not say, as
    for a trace, whose footprint is known only once it is read)."""
    if hasattr(opts, "test_bytes"):
        return int(opts.test_bytes())
    if hasattr(opts, "bytes_per_vcpu"):
        return int(opts.vcpus * opts.bytes_per_vcpu)
    return 0


def host_bytes(opts: Any, params: Any = None) -> int:
    """The host memory a run with `opts` (under `params`) needs for the model: its own
    estimate when the workload has one (demand paging: less on the compiled loop, when it
    may take the run), else by its test memory."""
    from mmu_core.workloads.demand_paging import host_bytes_needed

    if hasattr(opts, "host_bytes"):
        return int(opts.host_bytes(params))
    return host_bytes_needed(guest_bytes(opts))


class _Rebuilt:
    """An exception as it crosses the pipe: its class, args and attributes (an exception
    whose __init__ takes other arguments than its args, as InvalidConfig's, does not unpickle
    as itself)."""

    def __init__(self, exc: BaseException) -> None:
        self.cls, self.args, self.attrs = type(exc), exc.args, dict(vars(exc))
        self.trace = ("".join(traceback.format_exception(exc))
                      if not isinstance(exc, MMUError) else "")

    def exception(self) -> BaseException:
        exc = self.cls.__new__(self.cls)
        exc.args = self.args
        vars(exc).update(self.attrs)
        if self.trace:
            exc.add_note(f"in the worker process:\n{self.trace.rstrip()}")
        return exc


def _worker(conn, job: Job) -> None:
    from mmu_core.plugins import PluginWarning

    warnings.simplefilter("ignore", PluginWarning)  # the parent has printed them
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored until now
        kwargs = dict(job.kwargs)
        if job.progress == "relay":
            kwargs["progress"] = lambda done, total: conn.send(("progress", done, total))
        elif job.progress == "silent":
            kwargs["progress"] = lambda done, total: None
        conn.send(("ok", job.fn(*job.args, **kwargs)))
    except KeyboardInterrupt:
        _send(conn, ("interrupted",))
    except BaseException as exc:  # noqa: BLE001 - every error goes back to the parent
        try:
            conn.send(("error", _Rebuilt(exc)))
        except Exception:  # an attribute that does not pickle: the message still goes
            _send(conn, ("error", _Rebuilt(RuntimeError(f"{type(exc).__name__}: {exc}"))))
    finally:
        conn.close()


def _send(conn, msg) -> None:
    try:
        conn.send(msg)
    except (OSError, ValueError):
        pass  # the parent is gone or stopped listening: nothing to tell


def run_parallel(jobs: Sequence[Job], workers: int,
                 progress: Callable[[int, int, int], None] | None = None) -> list[Any]:
    """Run `jobs` in worker processes, at most `workers` at once; return their results in
    the jobs' order. `progress(i, done, total)` relays job i's own progress callback."""
    ctx = mp.get_context("spawn")
    results: list[Any] = [None] * len(jobs)
    queue = list(enumerate(jobs))
    running: dict[Any, tuple[int, Any]] = {}  # connection -> (job index, process)
    try:
        while queue or running:
            while queue and len(running) < max(1, workers):
                i, job = queue.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker, args=(send, job), daemon=True,
                                   name=f"mmu-{job.label or i}")
                # ignored in the child until its job starts; blocked and ignored here while
                # it starts, and delivered here afterwards if it came meanwhile
                mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
                handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
                try:
                    proc.start()
                finally:
                    signal.signal(signal.SIGINT, handler)
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                send.close()
                running[recv] = (i, proc)
            for conn in wait(list(running)):
                i, proc = running[conn]
                try:
                    msg = conn.recv()
                except EOFError:
                    proc.join()
                    del running[conn]
                    conn.close()
                    raise MMUError(f"{jobs[i].label or f'job {i}'}: the worker process "
                                   f"died (exit code {proc.exitcode})") from None
                if msg[0] == "progress":
                    if progress:
                        progress(i, msg[1], msg[2])
                    continue
                del running[conn]
                conn.close()
                proc.join()
                if msg[0] == "ok":
                    results[i] = msg[1]
                elif msg[0] == "interrupted":
                    raise KeyboardInterrupt
                else:
                    raise msg[1].exception()
    finally:
        _stop([proc for _, proc in running.values()])
        for conn in running:
            conn.close()
    return results


def _stop(procs: list) -> None:
    """Terminate and reap the workers still running (after an error or an interrupt)."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(_GRACE)
        if proc.is_alive():
            proc.kill()
            proc.join()


__all__ = ["Job", "check_parallel_memory", "guest_bytes", "host_bytes", "run_parallel"]
