"""A deterministic discrete-event engine in virtual time whose tasks are greenlets.

Tasks (vCPUs, userfault handlers, the RCU worker) are ordinary sequential Python calling
`delay()`, `block()`, `atomic()` and the primitives of sync.py. Each such call is a switch
point: the calling task's clock advances and the engine resumes whichever task is due first.
The scheduler is the greenlet that called `run()`; every task switches back to it, never to
another task, so control flow is always scheduler -> task -> scheduler.

Runnable tasks wait in a heap ordered by (time, tie-break, sequence). The tie-break is 0 under
"fifo" (ties go in scheduling order) and a draw from an RNG seeded by the engine's seed under
"random", so a run replays exactly from (seed, policy). A task whose next wake time is before
every queued one keeps running without a greenlet switch: the fast path that makes millions of
switch points affordable.

Accounting per task is exclusive: waiting for a lock, else holding one, else the innermost
phase ("other" by default). The categories always add up to the task's total time.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import greenlet

from mmu_core.sim.cost import CostModel

POLICIES = ("fifo", "random")
DEFAULT_PHASE = "other"
_NO_LIMIT = 1 << 62  # "no `until`": far beyond any run, and an int so comparisons stay cheap


class Deadlock(RuntimeError):
    """Every live (non-daemon) task is blocked and nothing is scheduled."""

    def __init__(self, blocked: list[tuple[str, str]]) -> None:
        self.blocked = tuple(blocked)
        names = ", ".join(f"{name} ({where})" for name, where in blocked)
        super().__init__(f"deadlock: every live task is blocked: {names}")


@dataclass(frozen=True)
class TaskStats:
    """Where one task's virtual time went; lock_wait + lock_held + sum(phases) == total."""

    name: str
    total_ns: int
    lock_wait_ns: int
    lock_held_ns: int
    phases: Mapping[str, int]
    switches: int
    lock_acquires: int
    lock_contended: int
    atomics: int
    cmpxchg_failures: int


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine: its clock, each task's figures and their sum ("total")."""

    now: int
    tasks: tuple[TaskStats, ...]
    totals: TaskStats


class Task:
    """One greenlet in the engine, with its accounting."""

    __slots__ = (
        "engine", "name", "id", "daemon", "glet", "started", "finished", "result", "start",
        "end", "blocked", "waiting", "holding", "_mark", "_phases", "_stack", "lock_wait",
        "lock_held", "switches", "lock_acquires", "lock_contended", "atomics",
        "cmpxchg_failures",
    )

    def __init__(self, engine: Engine, name: str, tid: int, daemon: bool) -> None:
        self.engine = engine
        self.name = name
        self.id = tid
        self.daemon = daemon
        self.glet: greenlet.greenlet | None = None
        self.started = False
        self.finished = False
        self.result: Any = None
        self.start = engine.now
        self.end: int | None = None
        self.blocked: str | None = None  # what a parked task waits for (None when runnable)
        self.waiting = 0  # > 0 while acquiring a lock (the acquire itself counts as waiting)
        self.holding = 0  # locks held, any mode
        self._mark = engine.now  # time up to which this task's time has been accounted
        self._phases: dict[str, int] = {}
        self._stack: list[str] = [DEFAULT_PHASE]
        self.lock_wait = 0
        self.lock_held = 0
        self.switches = 0
        self.lock_acquires = 0
        self.lock_contended = 0
        self.atomics = 0
        self.cmpxchg_failures = 0

    def account(self) -> None:
        """Charge the time since the last change of category to the current category.

        Called before anything that changes the category (phase push/pop, lock state), so
        accounting is lazy: a task parked for a long time costs nothing until it moves.
        """
        now = self.engine.now
        dt = now - self._mark
        if dt:
            self._mark = now
            if self.waiting:
                self.lock_wait += dt
            elif self.holding:
                self.lock_held += dt
            else:
                top = self._stack[-1]
                self._phases[top] = self._phases.get(top, 0) + dt

    def statistics(self) -> TaskStats:
        if not self.finished:
            self.account()
        end = self.end if self.end is not None else self.engine.now
        return TaskStats(
            name=self.name,
            total_ns=end - self.start,
            lock_wait_ns=self.lock_wait,
            lock_held_ns=self.lock_held,
            phases=MappingProxyType(dict(self._phases)),
            switches=self.switches,
            lock_acquires=self.lock_acquires,
            lock_contended=self.lock_contended,
            atomics=self.atomics,
            cmpxchg_failures=self.cmpxchg_failures,
        )

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.name}>"


class _Phase:
    """engine.phase(name): a class rather than @contextmanager because it is on hot paths."""

    __slots__ = ("engine", "name", "task")

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.task: Task | None = None

    def __enter__(self) -> None:
        task = self.task = self.engine.current
        if task is not None:
            task.account()
            task._stack.append(self.name)

    def __exit__(self, *exc: object) -> None:
        task = self.task
        if task is not None:
            task.account()
            task._stack.pop()


class Engine:
    """The scheduler and virtual clock; see the module docstring."""

    def __init__(self, seed: int, cost: CostModel | None = None, policy: str = "fifo",
                 trace: bool = False) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r} (one of: {', '.join(POLICIES)})")
        self.seed = seed
        self.cost = cost if cost is not None else CostModel()
        self.policy = policy
        self.rng = random.Random(seed)  # for the tasks' own seeded decisions
        # Tie-breaks draw from their own stream, so how often the engine schedules does not
        # perturb the tasks' random decisions (and vice versa).
        self._tie = random.Random(f"tie-break:{seed}") if policy == "random" else None
        self._atomic_ns = {"read": self.cost.atomic_read, "cmpxchg": self.cost.cmpxchg,
                           "xchg": self.cost.xchg}
        self.now = 0
        self.tasks: list[Task] = []
        self.current: Task | None = None
        self.trace_enabled = trace
        self.trace: list[tuple[int, str, str, Any]] = []
        self._queue: list[tuple[int, float, int, Task]] = []
        self._seq = 0
        self._live = 0  # non-daemon tasks not yet finished
        self._limit = _NO_LIMIT  # run(until): the fast path must not carry a task beyond it
        self._main: greenlet.greenlet | None = None
        self._running = False
        self._failed: BaseException | None = None
        self._closing = False  # close() was called: tasks are being (or have been) killed

    # --- tasks ----------------------------------------------------------------------------------
    def spawn(self, name: str, fn: Callable[..., Any], *args: Any, daemon: bool = False,
              **kwargs: Any) -> Task:
        """A new task running fn(*args, **kwargs), runnable at the current time."""
        if self._closing:
            raise RuntimeError(f"spawn({name!r}) on a closed engine")
        task = Task(self, name, len(self.tasks), daemon)

        def body() -> None:
            task.result = fn(*args, **kwargs)
            if task.holding:
                raise RuntimeError(f"task {task.name} finished holding {task.holding} lock(s)")
            task.account()
            task.finished = True
            task.end = self.now
            if not task.daemon:
                self._live -= 1
            if self.trace_enabled:
                self.trace.append((self.now, task.name, "exit", None))

        task.glet = greenlet.greenlet(body)
        self.tasks.append(task)
        if not daemon:
            self._live += 1
        self._schedule(task, self.now)
        if self.trace_enabled:
            self._record(task, "spawn", daemon)
        return task

    def _schedule(self, task: Task, when: int) -> None:
        tie = self._tie.random() if self._tie is not None else 0.0
        self._seq += 1
        heapq.heappush(self._queue, (when, tie, self._seq, task))

    def _record(self, task: Task | None, event: str, detail: Any) -> None:
        self.trace.append((self.now, task.name if task is not None else "-", event, detail))

    # --- the scheduler ----------------------------------------------------------------------
    def run(self, until: int | None = None) -> None:
        """Run until every non-daemon task has finished, or until virtual time `until`.

        Raises Deadlock if live tasks remain but nothing is scheduled. An exception raised in
        a task propagates from here unchanged, and the engine stays stopped.
        """
        if self._running:
            raise RuntimeError("Engine.run() is not reentrant")
        if self._closing:
            raise RuntimeError("the engine is closed")
        if self._failed is not None:
            raise RuntimeError("the engine stopped when a task raised; it cannot run again") \
                from self._failed
        if until is not None and until < self.now:
            raise ValueError(f"until={until} is in the past (now={self.now})")
        main = self._main = greenlet.getcurrent()
        self._limit = _NO_LIMIT if until is None else until
        self._running = True
        queue = self._queue
        try:
            while self._live:
                if not queue:
                    raise Deadlock([(t.name, t.blocked or "runnable") for t in self.tasks
                                    if not t.finished and not t.daemon])
                when = queue[0][0]
                if when > self._limit:
                    self.now = self._limit
                    return
                task = heapq.heappop(queue)[3]
                self.now = when
                self.current = task
                task.switches += 1
                if not task.started:
                    # A task spawned from inside another task would otherwise return (and
                    # raise) into its spawner; every task must come back to the scheduler.
                    task.started = True
                    task.glet.parent = main
                if self.trace_enabled:
                    self._record(task, "run", None)
                try:
                    task.glet.switch()
                except BaseException as exc:
                    self._failed = exc
                    raise
        finally:
            self.current = None
            self._running = False
            self._limit = _NO_LIMIT

    def _yield(self) -> None:
        """Back to the scheduler; returns when the scheduler resumes this task."""
        if self._closing:
            # close() is unwinding this task: its finally blocks must not wait for anything.
            raise greenlet.GreenletExit
        self._main.switch()

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Kill every unfinished task and stop the engine for good.

        Needed because greenlets do not take part in garbage collection: a suspended task's
        frames reference the engine, so an engine with parked tasks (daemons at the end of a
        run, say) is never freed unless closed. Each task gets GreenletExit where it is parked;
        its finally blocks run (releasing locks, leaving RCU sections) but never switch.
        Exceptions they raise are dropped: the engine is being torn down.
        """
        if self._running:
            raise RuntimeError("Engine.close() inside run()")
        self._closing = True
        self._limit = -1  # keeps delay() off its fast path, where time would advance
        here = greenlet.getcurrent()
        for task in self.tasks:
            glet, task.glet = task.glet, None
            if glet is not None and glet:  # started and not dead: suspended in _yield
                glet.parent = here
                self.current = task
                try:
                    glet.throw(greenlet.GreenletExit)
                except Exception:
                    pass  # a teardown error in a task being killed: nobody to report it to
        self.current = None
        self._queue.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- switch points ------------------------------------------------------------------------
    def delay(self, ns: int, phase: str | None = None) -> None:
        """The current task spends ns of virtual time (accounted to `phase`, if given)."""
        task = self.current
        if task is None:
            return  # setup code outside the engine: time does not pass
        if ns < 0:
            raise ValueError(f"negative delay {ns}")
        if self.trace_enabled:
            self._record(task, "delay", ns if phase is None else (ns, phase))
        if phase is not None:
            task.account()
            task._stack.append(phase)
        target = self.now + ns
        queue = self._queue
        if (not queue or queue[0][0] > target) and target <= self._limit:
            self.now = target  # the fast path: nobody is due before us, no switch
        elif not self._closing:  # (close() forces this branch: time stands still as it unwinds)
            self._schedule(task, target)
            self._yield()
        if phase is not None:
            task.account()
            task._stack.pop()

    def block(self, phase: str) -> None:
        """Park the current task until wake(); the time parked goes to `phase`."""
        task = self.current
        if task is None:
            raise RuntimeError(f"block({phase!r}) outside a task would never return")
        with _Phase(self, phase):
            self._park(task, phase)

    def _park(self, task: Task, why: str) -> None:
        task.blocked = why
        if self.trace_enabled:
            self._record(task, "block", why)
        self._yield()

    def wake(self, task: Task, after: int = 0) -> bool:
        """Make a task parked by block() runnable at now + after; False if it was not parked.

        Tasks waiting for a lock are not woken this way: only the lock hands itself over.
        """
        if task.blocked is None or task.waiting or task.finished:
            return False
        self._wake(task, after)
        return True

    def _wake(self, task: Task, after: int) -> None:
        task.blocked = None
        if self.trace_enabled:
            self._record(task, "wake", after)
        self._schedule(task, self.now + after)

    def phase(self, name: str) -> _Phase:
        """Context manager: time inside is accounted to `name` (innermost phase wins)."""
        return _Phase(self, name)

    def atomic(self, kind: str) -> None:
        """An atomic memory operation ("read", "cmpxchg" or "xchg") is about to happen.

        A switch point charging the operation's cost. The caller does the memory operation
        right after this returns; nothing else runs in between, which makes it atomic.
        """
        try:
            ns = self._atomic_ns[kind]
        except KeyError:
            raise ValueError(f"unknown atomic {kind!r} (one of: read, cmpxchg, xchg)") from None
        task = self.current
        if task is None:
            return
        task.atomics += 1
        if self.trace_enabled:
            self._record(task, "atomic", kind)
        self.delay(ns)

    def note_cmpxchg_failure(self) -> None:
        """Count a failed cmpxchg against the current task."""
        if self.current is not None:
            self.current.cmpxchg_failures += 1

    # --- figures ------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        per_task = tuple(t.statistics() for t in self.tasks)
        phases: dict[str, int] = {}
        for s in per_task:
            for name, ns in s.phases.items():
                phases[name] = phases.get(name, 0) + ns

        def total(field: str) -> int:
            return sum(getattr(s, field) for s in per_task)

        totals = TaskStats(
            name="total", total_ns=total("total_ns"), lock_wait_ns=total("lock_wait_ns"),
            lock_held_ns=total("lock_held_ns"), phases=MappingProxyType(phases),
            switches=total("switches"), lock_acquires=total("lock_acquires"),
            lock_contended=total("lock_contended"), atomics=total("atomics"),
            cmpxchg_failures=total("cmpxchg_failures"),
        )
        return EngineStats(now=self.now, tasks=per_task, totals=totals)
