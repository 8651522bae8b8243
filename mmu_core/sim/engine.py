"""A deterministic discrete-event engine in virtual time; tasks are greenlets.

Tasks (vCPUs, userfault handlers, the RCU worker) are ordinary sequential Python that calls
`delay()`, `block()` and the primitives of sync.py. Each such call is a switch point: the
calling task's virtual clock advances and the engine resumes whichever task is due first.
Events are ordered by (time, tie-break, sequence): the tie-break is 0 under the "fifo" policy
and a draw from the seeded RNG under "random", so runs replay exactly from the seed.
A task that is due before anyone else keeps running without a greenlet switch (the fast path
that makes millions of switch points affordable).

Accounting per task is exclusive: waiting for a lock, else holding one, else the innermost
phase ("other" by default); the categories always add up to the task's total time.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import greenlet

from mmu_core.sim.cost import CostModel

POLICIES = ("fifo", "random")


class Deadlock(RuntimeError):
    """Every live task is blocked and nothing is scheduled."""


@dataclass(frozen=True)
class TaskStats:
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
    now: int
    tasks: tuple[TaskStats, ...]


class Task:
    __slots__ = (
        "engine", "name", "id", "daemon", "glet", "finished", "result", "start", "end",
        "_last", "_phases", "_stack", "waiting", "holding", "blocked", "lock_wait", "lock_held",
        "switches", "lock_acquires", "lock_contended", "atomics", "cmpxchg_failures",
    )

    def __init__(self, engine: Engine, name: str, tid: int, daemon: bool) -> None:
        self.engine = engine
        self.name = name
        self.id = tid
        self.daemon = daemon
        self.glet: greenlet.greenlet | None = None
        self.finished = False
        self.result: Any = None
        self.start = engine.now
        self.end: int | None = None
        self._last = engine.now
        self._phases: dict[str, int] = {}
        self._stack: list[str] = ["other"]
        self.waiting = 0  # > 0 while waiting for a lock
        self.holding = 0  # number of locks held
        self.blocked: str | None = None
        self.lock_wait = 0
        self.lock_held = 0
        self.switches = 0
        self.lock_acquires = 0
        self.lock_contended = 0
        self.atomics = 0
        self.cmpxchg_failures = 0

    def account(self) -> None:
        """Charge the time since the last change of category to the current category."""
        now = self.engine.now
        dt = now - self._last
        if dt:
            if self.waiting:
                self.lock_wait += dt
            elif self.holding:
                self.lock_held += dt
            else:
                top = self._stack[-1]
                self._phases[top] = self._phases.get(top, 0) + dt
            self._last = now

    def push_phase(self, name: str) -> None:
        self.account()
        self._stack.append(name)

    def pop_phase(self) -> None:
        self.account()
        self._stack.pop()

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
        return f"<Task {self.name}>"


class Engine:
    def __init__(self, seed: int, cost: CostModel | None = None, policy: str = "fifo",
                 trace: bool = False) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown schedule policy '{policy}' (one of {', '.join(POLICIES)})")
        self.seed = seed
        self.cost = cost or CostModel()
        self.policy = policy
        self.rng = random.Random(seed)
        self._tie = random.Random(seed ^ 0x5EED) if policy == "random" else None
        self.now = 0
        self._queue: list[tuple[int, float, int, Task]] = []
        self._seq = 0
        self.tasks: list[Task] = []
        self._live = 0  # non-daemon tasks not yet finished
        self.current: Task | None = None
        self._main: greenlet.greenlet | None = None
        self.trace_enabled = trace
        self.trace: list[tuple[int, str, str, Any]] = []

    # --- tasks --------------------------------------------------------------------------
    def spawn(self, name: str, fn: Callable[..., Any], *args: Any, daemon: bool = False,
              **kwargs: Any) -> Task:
        task = Task(self, name, len(self.tasks), daemon)

        def body() -> None:
            task.result = fn(*args, **kwargs)
            task.account()
            task.finished = True
            task.end = self.now
            if not task.daemon:
                self._live -= 1
            self._record(task, "exit", None)

        task.glet = greenlet.greenlet(body)
        self.tasks.append(task)
        if not daemon:
            self._live += 1
        self._schedule(task, self.now)
        return task

    def _schedule(self, task: Task, when: int) -> None:
        tie = self._tie.random() if self._tie is not None else 0.0
        self._seq += 1
        heapq.heappush(self._queue, (when, tie, self._seq, task))

    def _record(self, task: Task | None, event: str, detail: Any) -> None:
        if self.trace_enabled:
            self.trace.append((self.now, task.name if task else "-", event, detail))

    def run(self, until: int | None = None) -> None:
        """Run until every non-daemon task has finished (or virtual time `until`)."""
        self._main = greenlet.getcurrent()
        try:
            while True:
                if not self._live:
                    return
                if not self._queue:
                    blocked = [f"{t.name} ({t.blocked or 'runnable'})" for t in self.tasks
                               if not t.finished and not t.daemon]
                    raise Deadlock("all tasks are blocked: " + ", ".join(blocked))
                when, _tie, _seq, task = heapq.heappop(self._queue)
                if until is not None and when > until:
                    heapq.heappush(self._queue, (when, _tie, _seq, task))
                    self.now = until
                    return
                if task.finished:
                    continue
                self.now = max(self.now, when)
                self.current = task
                task.switches += 1
                task.glet.switch()
                self.current = None
        finally:
            self.current = None

    def _yield(self) -> None:
        task = self.current
        self._main.switch()
        self.current = task

    # --- switch points ----------------------------------------------------------------------
    def delay(self, ns: int, phase: str | None = None) -> None:
        """The current task spends ns of virtual time (in `phase`, if given)."""
        task = self.current
        if task is None:
            return
        if phase is not None:
            task.push_phase(phase)
        target = self.now + ns
        q = self._queue
        if not q or q[0][0] > target:
            self.now = target  # nobody is due before us: no switch needed
        else:
            self._schedule(task, target)
            self._yield()
        if phase is not None:
            task.pop_phase()

    def block(self, phase: str) -> None:
        """Park the current task until wake(); the time parked goes to `phase`."""
        task = self.current
        if task is None:
            raise RuntimeError("block() outside a task would wait forever")
        task.push_phase(phase)
        task.blocked = phase
        self._record(task, "block", phase)
        self._yield()
        task.pop_phase()

    def wake(self, task: Task, after: int = 0) -> bool:
        if task.blocked is None or task.finished:
            return False
        task.blocked = None
        self._record(task, "wake", after)
        self._schedule(task, self.now + after)
        return True

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        task = self.current
        if task is None:
            yield
            return
        task.push_phase(name)
        try:
            yield
        finally:
            task.pop_phase()

    def atomic(self, kind: str) -> None:
        """An atomic memory operation (read, cmpxchg, xchg) is about to happen: a switch point.

        The caller performs the operation right after this returns; nothing runs in between.
        """
        task = self.current
        if task is None:
            return
        task.atomics += 1
        cost = self.cost
        ns = cost.cmpxchg if kind == "cmpxchg" else cost.xchg if kind == "xchg" else cost.atomic_read
        self._record(task, "atomic", kind)
        self.delay(ns)

    def note_cmpxchg_failure(self) -> None:
        if self.current is not None:
            self.current.cmpxchg_failures += 1

    def stats(self) -> EngineStats:
        return EngineStats(self.now, tuple(t.statistics() for t in self.tasks))
