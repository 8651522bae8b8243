"""A deterministic discrete-event engine in virtual time whose tasks are greenlets.

Tasks (vCPUs, userfault handlers, the RCU worker) are ordinary sequential Python calling
`delay()`, `block()`, `atomic()` and the primitives of sync.py. Each such call is a switch
point (a *step*): the calling task's clock advances and the engine resumes whichever task the
schedule policy picks. The scheduler is the greenlet that called `run()`; every task switches
back to it, never to another task, so control flow is always scheduler -> task -> scheduler.

Runnable tasks wait in a heap of (key, sequence, due time, task). The policy decides the key:

- "fifo": the due time. Ties go in scheduling order.
- "random": the due time plus a seeded draw from [0, jitter_ns], so operations whose due
  times lie within jitter_ns of each other run in a seed-dependent order.
- "pct": minus the task's priority, ignoring time (probabilistic concurrency testing,
  Burckhardt et al., ASPLOS 2010): tasks get random distinct priorities, the highest-priority
  runnable task runs, and at pct_depth - 1 random steps in [1, pct_steps] the running task's
  priority drops below every initial one.

A popped task resumes at max(now, due): the clock never goes back, and a task that runs after
its due time has just seen preemption latency. Everything random comes from streams seeded by
the engine's seed, so (seed, policy, parameters) replays the same interleaving exactly. A
task that would still be picked next keeps running without a greenlet switch: the fast path
that makes millions of switch points affordable.

Host CPUs. With `host_cpus` set, a task needs a CPU to run: it holds one while it runs, while
it is due after a `delay` (it is computing) and while it spins for a spinlock; it gives it
up when it sleeps (`block`) unless it holds or takes a spinlock, and when it finishes. A task
popped from the heap without a CPU and with none free waits in a FIFO run queue (phase
"runqueue"); a CPU given up goes to the queue's head, which runs after `context_switch`. A
task that has run `sched_slice` outside spinlocks goes to the back of the queue at its next
`delay` if anyone waits. With no limit (None) nobody ever waits, and runs are exactly as
without the model; on-CPU time is counted either way (`TaskStats.cpu_ns`).

Accounting per task is exclusive: waiting for a lock, else holding one, else the innermost
phase ("other" by default). The categories always add up to the task's total time.
"""

from __future__ import annotations

import heapq
import random
import signal
import threading
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import greenlet

from mmu_core.sim.cost import CostModel

POLICIES = ("fifo", "random", "pct")
_FIFO, _RANDOM, _PCT = range(3)
#: random: the widest reordering, one contended cache-line transfer (cost.lock_handoff).
#: Operations further apart keep their fifo order. Reordering costs preemption latency: on
#: 8-vCPU demand paging 100 ns moves total time by <1% and lock wait by ~5% (200 ns: 2%, 17%)
DEFAULT_JITTER_NS = 100
#: pct: bugs of depth d need d - 1 priority changes at the right steps; 3 finds the classic
#: depth-2 (ordering) and depth-3 races
DEFAULT_PCT_DEPTH = 3
#: pct: the change points are drawn from steps [1, pct_steps]; best set near engine.steps of a
#: whole run (a run with more steps never changes priority after pct_steps)
DEFAULT_PCT_STEPS = 10_000
#: host logical CPUs when a config does not say: the seed ran its 416-vCPU test on the host of
#: a Google Cloud m2-ultramem-416 VM, an 8-socket Cascade Lake machine (8 x 28 cores x 2
#: threads = 448; Google Cloud's memory-optimized machine family page, Intel ARK 8280L)
DEFAULT_HOST_CPUS = 448
DEFAULT_PHASE = "other"
#: the phase of a task that is due to run but waits for a host CPU
RUNQUEUE_PHASE = "runqueue"
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
    cpu_ns: int = 0  # on a host CPU: running, or spinning for a lock (what perf samples)


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
        "cmpxchg_failures", "priority", "on_cpu", "cpu_since", "cpu_ns", "slice_start", "nopreempt",
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
        self.priority: float = 0.0  # pct only: the highest runnable priority runs
        # The host CPU model: whether the task occupies a CPU (running, due after a delay, or
        # spinning for a lock), since when, its on-CPU time so far, and when its slice began.
        self.on_cpu = False
        self.cpu_since = 0
        self.cpu_ns = 0
        self.slice_start = 0
        self.nopreempt = 0  # spinlocks being taken or held: the CPU is kept, never preempted

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
            cpu_ns=self.cpu_ns + (self.engine.now - self.cpu_since if self.on_cpu else 0),
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
    """The scheduler and virtual clock; see the module docstring.

    Parameters beyond (seed, cost, policy, trace) only matter to their policy: `jitter_ns`
    to "random", `pct_depth` and `pct_steps` to "pct". They are validated whatever the policy,
    so a typo is caught before the run that would have used it.
    """

    # Slots keep attribute access on the hot paths (delay, the scheduler loop) fast however
    # many attributes the engine grows: CPython 3.11 slows every access down once an
    # instance's __dict__ holds 30 keys. __dict__ stays for anything else (tests wrap delay).
    __slots__ = (
        "seed", "cost", "policy", "_pct_params", "_mode", "rng", "_sched_rng", "_jitter_span",
        "_pct_changes", "_pct_next", "_pct_floor", "steps", "_atomic_ns", "now", "tasks",
        "current", "trace_enabled", "trace", "_queue", "_seq", "_live", "_until", "_limit",
        "_interrupted", "_main", "_running", "_failed", "_closing", "_primitives",
        "step_hook", "host_cpus", "_free_cpus", "_runqueue", "_slice_ns", "_switch_ns",
        "__dict__", "__weakref__",
    )

    def __init__(self, seed: int, cost: CostModel | None = None, policy: str = "fifo",
                 trace: bool = False, *, jitter_ns: int = DEFAULT_JITTER_NS,
                 pct_depth: int = DEFAULT_PCT_DEPTH, pct_steps: int = DEFAULT_PCT_STEPS,
                 host_cpus: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r} (one of: {', '.join(POLICIES)})")
        if jitter_ns < 0:
            raise ValueError(f"jitter_ns must be >= 0, not {jitter_ns}")
        if pct_depth < 1:
            raise ValueError(f"pct_depth must be >= 1, not {pct_depth}")
        if host_cpus is not None and host_cpus < 1:
            raise ValueError(f"host_cpus must be >= 1 (or None: unlimited), not {host_cpus}")
        if pct_steps < max(1, pct_depth - 1):
            raise ValueError(f"pct_steps must be >= max(1, pct_depth - 1) = "
                             f"{max(1, pct_depth - 1)}, not {pct_steps}")
        self.seed = seed
        self.cost = cost if cost is not None else CostModel()
        self.policy = policy
        self._pct_params = (pct_depth, pct_steps)
        self._mode = POLICIES.index(policy)
        self.rng = random.Random(seed)  # for the tasks' own seeded decisions
        # The schedule draws from its own stream, so how often the engine schedules does not
        # perturb the tasks' random decisions (and vice versa).
        self._sched_rng = random.Random(f"{policy}:{seed}")
        self._jitter_span = jitter_ns + 1  # int(random() * span) is uniform on [0, jitter_ns]
        # pct: change point step -> the priority the running task drops to (1 .. d-1, below
        # every initial priority, which lie in (d, d+1)); drawn up front, so they depend on
        # the seed alone.
        self._pct_changes: dict[int, int] = {}
        if self._mode == _PCT:
            points = self._sched_rng.sample(range(1, pct_steps + 1), pct_depth - 1)
            self._pct_changes = {step: i + 1 for i, step in enumerate(points)}
        self._pct_next = min(self._pct_changes, default=_NO_LIMIT)
        self._pct_floor = 1.0  # below every priority handed out so far (yield_now goes under)
        #: called in the scheduler each time a task hands control back (None: nothing);
        #: an exception it raises stops run() as a task's would
        self.step_hook: Callable[[], None] | None = None
        self.steps = 0  # switch points passed by tasks so far: the unit of pct_steps
        self._atomic_ns = {"read": self.cost.atomic_read, "cmpxchg": self.cost.cmpxchg,
                           "xchg": self.cost.xchg}
        self.now = 0
        self.tasks: list[Task] = []
        self.current: Task | None = None
        self.trace_enabled = trace
        self.trace: list[tuple[int, str, str, Any]] = []
        self._queue: list[tuple[float, int, int, Task]] = []  # (key, seq, due time, task)
        self._seq = 0
        self._live = 0  # non-daemon tasks not yet finished
        self._until = _NO_LIMIT  # run(until): the scheduler pauses before a task due later
        # Bound of delay()'s fast path: `until`, or -1 while something (close, an interrupt)
        # needs every switch point to come back to the scheduler.
        self._limit = _NO_LIMIT
        self._interrupted = False  # SIGINT seen during run(): raise at the next switch point
        self._main: greenlet.greenlet | None = None
        self._running = False
        self._failed: BaseException | None = None
        self._closing = False  # close() was called: tasks are being (or have been) killed
        # Primitives holding per-task state (locks, RCU), told to forget the tasks on close().
        self._primitives: list[weakref.ref] = []
        # The host's CPUs ("Host CPUs" in the module docstring): None is unlimited.
        self.host_cpus = host_cpus
        self._free_cpus = _NO_LIMIT if host_cpus is None else host_cpus
        self._runqueue: deque[Task] = deque()  # tasks due to run, waiting for a free CPU
        self._slice_ns = self.cost.sched_slice
        self._switch_ns = self.cost.context_switch

    @property
    def jitter_ns(self) -> int:
        """random: the widest reordering, in ns (keys are due time + U[0, jitter_ns])."""
        return self._jitter_span - 1

    @property
    def pct_depth(self) -> int:
        """pct: the bug depth targeted; pct_depth - 1 priority change points."""
        return self._pct_params[0]

    @property
    def pct_steps(self) -> int:
        """pct: change points are drawn from steps [1, pct_steps]."""
        return self._pct_params[1]

    # --- tasks ----------------------------------------------------------------------------------
    def spawn(self, name: str, fn: Callable[..., Any], *args: Any, daemon: bool = False,
              **kwargs: Any) -> Task:
        """A new task running fn(*args, **kwargs), runnable at the current time."""
        if self._closing:
            raise RuntimeError(f"spawn({name!r}) on a closed engine")
        task = Task(self, name, len(self.tasks), daemon)
        if self._mode == _PCT:
            # A uniform draw above pct_depth: a random distinct rank among all tasks, however
            # many are spawned later (the paper's random permutation of d .. d+n-1).
            task.priority = self.pct_depth + self._sched_rng.random()

        def body() -> None:
            task.result = fn(*args, **kwargs)
            if task.holding or task.nopreempt:
                raise RuntimeError(f"task {task.name} finished holding "
                                   f"{max(task.holding, task.nopreempt)} lock(s)")
            task.account()
            task.finished = True
            task.end = self.now
            if task.on_cpu:
                self._put_cpu(task)
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

    # --- host CPUs ----------------------------------------------------------------------------
    def _take_cpu(self, task: Task) -> bool:
        """A task due to run needs a CPU: take a free one, else wait in the run queue."""
        if self._free_cpus:
            self._free_cpus -= 1
            task.on_cpu = True
            task.cpu_since = task.slice_start = self.now
            return True
        task.account()
        task._stack.append(RUNQUEUE_PHASE)
        self._runqueue.append(task)
        if self.trace_enabled:
            self._record(task, "runqueue", None)
        return False

    def _put_cpu(self, task: Task) -> None:
        """`task` leaves its CPU: the run queue's head gets it after a context switch."""
        task.on_cpu = False
        task.cpu_ns += self.now - task.cpu_since
        rq = self._runqueue
        if rq and not self._closing:
            nxt = rq.popleft()
            nxt.account()
            nxt._stack.pop()
            nxt.on_cpu = True
            nxt.cpu_since = nxt.slice_start = self.now
            self._schedule(nxt, self.now + self._switch_ns)
        else:
            self._free_cpus += 1

    def _preempt(self, task: Task) -> None:
        """The running task used up its slice while others wait for a CPU: to the back."""
        self._put_cpu(task)
        task.account()
        task._stack.append(RUNQUEUE_PHASE)
        self._runqueue.append(task)
        if self.trace_enabled:
            self._record(task, "preempt", None)
        self._yield()

    @property
    def runqueue_length(self) -> int:
        """Tasks due to run that wait for a free host CPU."""
        return len(self._runqueue)

    def _key(self, task: Task, when: int) -> float:
        """Where a task due at `when` goes in the run queue under the policy."""
        mode = self._mode
        if mode == _FIFO:
            return when
        if mode == _RANDOM:
            return when + int(self._sched_rng.random() * self._jitter_span)
        return -task.priority

    def _schedule(self, task: Task, when: int) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (self._key(task, when), self._seq, when, task))

    def _step(self, task: Task) -> None:
        """Count a switch point of `task`; under pct, apply a priority change point."""
        self.steps += 1
        if self.steps == self._pct_next:
            self._change_priority(task)

    def _change_priority(self, task: Task) -> None:
        """pct: step self.steps is a change point; the running task drops to its priority."""
        task.priority = self._pct_changes[self.steps]
        self._pct_floor = min(self._pct_floor, task.priority)
        self._pct_next = min((s for s in self._pct_changes if s > self.steps), default=_NO_LIMIT)
        if self.trace_enabled:
            self._record(task, "priority", task.priority)

    def _adopt(self, primitive: Any) -> None:
        """Register a primitive whose `_forget_tasks()` close() must call (see sync.py)."""
        self._primitives.append(weakref.ref(primitive))

    def _record(self, task: Task | None, event: str, detail: Any) -> None:
        self.trace.append((self.now, task.name if task is not None else "-", event, detail))

    # --- the scheduler ----------------------------------------------------------------------
    def run(self, until: int | None = None) -> None:
        """Run until every non-daemon task has finished, or until virtual time `until`.

        Raises Deadlock if live tasks remain but nothing is scheduled. An exception raised in
        a task propagates from here unchanged, and the engine stays stopped.

        Ctrl-C (SIGINT, when Python's default handler is installed and this is the main
        thread) is deferred to the running task's next switch point: the task parks there and
        run() raises KeyboardInterrupt with every task parked at a switch point, so the
        engine can be closed cleanly (or run again: the schedule continues as if never
        interrupted). A second Ctrl-C before then raises at once, wherever Python is.
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
        self._until = self._limit = _NO_LIMIT if until is None else until
        self._running = True
        queue = self._queue
        old_handler = None
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            while self._live:
                if self._interrupted:
                    raise KeyboardInterrupt
                if not queue:
                    raise Deadlock([(t.name, t.blocked or "runnable") for t in self.tasks
                                    if not t.finished and not t.daemon])
                when = queue[0][2]
                # Pause on the due time, not the key: whatever the policy, a run paused at
                # `until` and continued then pops the same tasks at the same times.
                if when > self._until:
                    self.now = self._until
                    return
                task = heapq.heappop(queue)[3]
                if when > self.now:
                    self.now = when
                if not task.on_cpu and not self._take_cpu(task):
                    continue  # every CPU is busy: it waits in the run queue
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
                    if self.step_hook is not None:
                        self.step_hook()  # e.g. the invariant audit, between two steps
                except BaseException as exc:
                    self._failed = exc
                    raise
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            self._interrupted = False
            self.current = None
            self._running = False
            self._until = self._limit = _NO_LIMIT

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._interrupted:
            raise KeyboardInterrupt  # the second press, or tasks stuck between switch points
        self._interrupted = True
        self._limit = -1  # off the fast path: the running task's next switch point parks it

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
        Exceptions they raise are dropped: the engine is being torn down. Then the locks and
        RCU forget every task (a task killed between taking a lock and entering its `with`,
        or one that died of an exception in the middle of a release, would otherwise hold it
        forever), so teardown code can take them and run RCU callbacks.
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
        self._runqueue.clear()
        for ref in self._primitives:
            primitive = ref()
            if primitive is not None:
                primitive._forget_tasks()
        self._primitives.clear()

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
        if (self._runqueue and self.now - task.slice_start >= self._slice_ns
                and not task.nopreempt and not self._closing):
            self._preempt(task)  # preemptible code past its slice, with others waiting
        if self.trace_enabled:
            self._record(task, "delay", ns if phase is None else (ns, phase))
        if phase is not None:
            task.account()
            task._stack.append(phase)
        self.steps += 1
        target = self.now + ns
        if self._mode:  # random or pct; fifo's key is the due time itself
            if self._mode == _RANDOM:
                key = target + int(self._sched_rng.random() * self._jitter_span)
            else:
                if self.steps == self._pct_next:
                    self._change_priority(task)
                key = -task.priority
        else:
            key = target
        queue = self._queue
        # The fast path: the caller would be popped next anyway (its key is below the head's),
        # so it just moves the clock. Equal keys switch: the queued task was there first.
        if (not queue or queue[0][0] > key) and target <= self._limit:
            self.now = target
        elif not self._closing:  # (close() forces this branch: time stands still as it unwinds)
            self._seq += 1
            heapq.heappush(queue, (key, self._seq, target, task))
            self._yield()
        if phase is not None:
            task.account()
            task._stack.pop()

    def yield_now(self) -> None:
        """A switch point for spin and retry loops: let the others run first.

        Under pct the caller's priority drops below every other task's (as PCT
        implementations treat yields): strict priorities would otherwise let a spinning task
        starve, forever, the task it waits for. Under fifo and random it is delay(0): free,
        and tasks due no later than the caller go first. A spin loop must still spend time
        (fifo resumes the caller at once when nobody else is due yet).
        """
        task = self.current
        if task is None:
            return
        if self._mode != _PCT:
            self.delay(0)
            return
        if self.trace_enabled:
            self._record(task, "yield", None)
        self._step(task)
        self._pct_floor -= 1
        task.priority = self._pct_floor
        queue = self._queue
        if (queue or self._interrupted) and not self._closing:
            self._seq += 1
            heapq.heappush(queue, (-task.priority, self._seq, self.now, task))
            self._yield()

    def block(self, phase: str) -> None:
        """Park the current task until wake(); the time parked goes to `phase`."""
        task = self.current
        if task is None:
            raise RuntimeError(f"block({phase!r}) outside a task would never return")
        with _Phase(self, phase):
            self._park(task, phase)

    def _park(self, task: Task, why: str, spin: bool = False) -> None:
        """Park until woken. A task spinning for a lock (`spin`), or sleeping while it holds
        one (preemption is off under a spinlock), keeps its CPU; any other gives it up."""
        task.blocked = why
        if self.trace_enabled:
            self._record(task, "block", why)
        self._step(task)
        if not spin and not task.nopreempt and task.on_cpu:
            self._put_cpu(task)
        self._yield()

    def wake(self, task: Task, after: int = 0) -> bool:
        """Make a task parked by block() runnable at now + after; False if it was not parked.

        Tasks waiting for a lock are not woken this way: only the lock hands itself over.
        """
        if task.blocked is None or task.waiting or task.finished or self._closing:
            return False
        self._wake(task, after)
        return True

    def _wake(self, task: Task, after: int) -> None:
        task.blocked = None
        if self._closing:
            return  # teardown: nothing will run again
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
            cmpxchg_failures=total("cmpxchg_failures"), cpu_ns=total("cpu_ns"),
        )
        return EngineStats(now=self.now, tasks=per_task, totals=totals)


#: The switch-point primitives as this module defines them, taken when it is loaded, before
#: anything can wrap one (tests wrap `delay` to interrupt a run at a chosen step): the
#: compiled loop reproduces exactly these, and leaves an engine whose class or instance has
#: others to the exact engine (fastloop.unsupported). Taken here, not where the loop is
#: imported, which may come after a wrapper is installed.
SWITCH_PRIMITIVES = {name: Engine.__dict__[name] for name in
                     ("delay", "block", "wake", "atomic", "yield_now", "_park", "_schedule",
                      "_yield")}
