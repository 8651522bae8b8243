"""Synchronisation primitives in virtual time: spinlock, queued rwlock, RCU, completions.

Each operation is a switch point that costs what the cost model says. Locks are fair (FIFO
queued, like Linux's qspinlock and qrwlock: a reader waits behind a queued writer), so the
order in which contenders get a lock depends only on virtual time and the seed. Called
outside any task (setup and teardown code), a free lock is taken at no cost and anything that
would have to wait is an error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mmu_core.sim.engine import Engine, Task

READ = "read"
WRITE = "write"


class RWLock:
    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.readers: dict[Task | None, int] = {}
        self.writer: Task | None = None
        self._writer_held = False
        self._queue: deque[tuple[Task, str]] = deque()
        self._last_owner: Task | None = None

    # --- acquire / release -----------------------------------------------------------------
    def _acquire(self, mode: str) -> None:
        engine = self.engine
        task = engine.current
        cost = engine.cost
        ns = cost.rwlock_read_acquire if mode == READ else cost.rwlock_write_acquire
        if task is not None and self._last_owner is not None and self._last_owner is not task:
            ns += cost.lock_handoff
        engine.delay(ns)
        if self._can_take(mode):
            self._grant(task, mode)
        else:
            if task is None:
                raise RuntimeError(f"{self.name}: contended outside a task")
            task.account()
            task.waiting += 1
            task.lock_contended += 1
            self._queue.append((task, mode))
            engine._record(task, "lock_wait", (self.name, mode))
            engine.block("lock_wait")
        engine._record(task, "lock", (self.name, mode))

    def _can_take(self, mode: str) -> bool:
        if self._queue or self._writer_held:
            return False
        return mode == READ or not self.readers

    def _grant(self, task: Task | None, mode: str) -> None:
        if task is not None:
            task.account()
            task.holding += 1
            task.lock_acquires += 1
        if mode == READ:
            self.readers[task] = self.readers.get(task, 0) + 1
        else:
            self.writer = task
            self._writer_held = True
        self._last_owner = task

    def _release(self, mode: str) -> None:
        engine = self.engine
        task = engine.current
        if mode == READ:
            n = self.readers.get(task, 0)
            if n == 0:
                raise RuntimeError(f"{self.name}: read_unlock by a task that does not hold it")
            if n == 1:
                del self.readers[task]
            else:
                self.readers[task] = n - 1
        else:
            if not self._writer_held or self.writer is not task:
                raise RuntimeError(f"{self.name}: write_unlock by a task that does not hold it")
            self.writer = None
            self._writer_held = False
        if task is not None:
            task.account()
            task.holding -= 1
        engine._record(task, "unlock", (self.name, mode))
        self._hand_over()
        engine.delay(engine.cost.rwlock_release)

    def _hand_over(self) -> None:
        q = self._queue
        while q and not self._writer_held:
            task, mode = q[0]
            if mode == WRITE and self.readers:
                return
            q.popleft()
            task.account()
            task.waiting -= 1
            self._grant(task, mode)
            self.engine.wake(task)
            if mode == WRITE:
                return

    def read_lock(self) -> None:
        self._acquire(READ)

    def read_unlock(self) -> None:
        self._release(READ)

    def write_lock(self) -> None:
        self._acquire(WRITE)

    def write_unlock(self) -> None:
        self._release(WRITE)

    @contextmanager
    def read(self) -> Iterator[None]:
        self.read_lock()
        try:
            yield
        finally:
            self.read_unlock()

    @contextmanager
    def write(self) -> Iterator[None]:
        self.write_lock()
        try:
            yield
        finally:
            self.write_unlock()

    def held_by_current(self, mode: str) -> bool:
        task = self.engine.current
        if mode == READ:
            return task in self.readers
        return self._writer_held and self.writer is task

    @property
    def contended(self) -> bool:
        return bool(self._queue)

    def cond_resched(self, mode: str) -> bool:
        """Drop and retake the lock if anyone waits for it (cond_resched_rwlock_*)."""
        if not self._queue:
            return False
        self._release(mode)
        self.engine.delay(0)
        self._acquire(mode)
        return True


class SpinLock:
    """An exclusive FIFO lock (a ticket/queued spinlock)."""

    def __init__(self, engine: Engine, name: str) -> None:
        self._lock = RWLock(engine, name)

    def lock(self) -> None:
        self._lock.write_lock()

    def unlock(self) -> None:
        self._lock.write_unlock()

    def __enter__(self) -> SpinLock:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unlock()


class Completion:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.done = False
        self._waiters: list[Task] = []

    def wait(self, phase: str) -> None:
        if self.done:
            return
        task = self.engine.current
        self._waiters.append(task)
        self.engine.block(phase)

    def complete(self) -> None:
        self.done = True
        waiters, self._waiters = self._waiters, []
        for task in waiters:
            self.engine.wake(task)

    def reinit(self) -> None:
        self.done = False


class Channel:
    """A FIFO message queue: put never blocks, get blocks while empty."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._items: deque[Any] = deque()
        self._getters: deque[Task] = deque()

    def put(self, item: Any) -> None:
        self._items.append(item)
        if self._getters:
            self.engine.wake(self._getters.popleft())

    def get(self, phase: str) -> Any:
        while not self._items:
            self._getters.append(self.engine.current)
            self.engine.block(phase)
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


class RCU:
    """Read-copy-update: callbacks run after every reader that predates them has left.

    Readers record a sequence number when they enter; a callback queued at sequence s runs,
    in the "rcu" daemon task, once no reader with an entry sequence <= s remains and at least
    rcu_grace_period ns have passed.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._seq = 0
        self._readers: dict[Task | None, tuple[int, int]] = {}  # task -> (nesting, entry seq)
        self._callbacks: deque[tuple[int, int, Callable[..., Any], tuple]] = deque()
        self._worker: Task | None = None
        self.grace_periods = 0

    def read_lock(self) -> None:
        task = self.engine.current
        nesting, entry = self._readers.get(task, (0, 0))
        if nesting == 0:
            self._seq += 1
            entry = self._seq
        self._readers[task] = (nesting + 1, entry)
        self.engine.delay(self.engine.cost.rcu_read_lock)

    def read_unlock(self) -> None:
        task = self.engine.current
        nesting, entry = self._readers.get(task, (0, 0))
        if nesting == 0:
            raise RuntimeError("rcu_read_unlock without rcu_read_lock")
        if nesting == 1:
            del self._readers[task]
            self._kick()
        else:
            self._readers[task] = (nesting - 1, entry)
        self.engine.delay(self.engine.cost.rcu_read_unlock)

    @contextmanager
    def read(self) -> Iterator[None]:
        self.read_lock()
        try:
            yield
        finally:
            self.read_unlock()

    @property
    def pending(self) -> int:
        return len(self._callbacks)

    def call_rcu(self, fn: Callable[..., Any], *args: Any) -> None:
        self._seq += 1
        self._callbacks.append((self._seq, self.engine.now + self.engine.cost.rcu_grace_period,
                                fn, args))
        self.engine.delay(self.engine.cost.call_rcu)
        self._kick()

    def _oldest_reader(self) -> int | None:
        return min((entry for _n, entry in self._readers.values()), default=None)

    def _ready(self) -> bool:
        if not self._callbacks:
            return False
        seq, _due, _fn, _args = self._callbacks[0]
        oldest = self._oldest_reader()
        return oldest is None or oldest > seq

    def _kick(self) -> None:
        engine = self.engine
        if not self._callbacks:
            return
        if self._worker is None or self._worker.finished:
            self._worker = engine.spawn("rcu", self._work, daemon=True)
        else:
            engine.wake(self._worker)

    def _work(self) -> None:
        engine = self.engine
        while True:
            if not self._ready():
                engine.block("rcu_idle")
                continue
            _seq, due, fn, args = self._callbacks[0]
            if engine.now < due:
                engine.delay(due - engine.now, "rcu_grace")
                continue
            self._callbacks.popleft()
            self.grace_periods += 1
            fn(*args)

    def synchronize_rcu(self) -> None:
        task = self.engine.current
        if task in self._readers:
            raise RuntimeError("synchronize_rcu inside an RCU read-side critical section")
        done = Completion(self.engine)
        self.call_rcu(done.complete)
        done.wait("rcu_sync")

    def barrier(self) -> None:
        """Run (outside the engine) or wait for (inside a task) every queued callback."""
        if self.engine.current is None:
            if self._readers:
                raise RuntimeError("rcu_barrier outside the engine with readers inside")
            while self._callbacks:
                _seq, _due, fn, args = self._callbacks.popleft()
                fn(*args)
            return
        self.synchronize_rcu()
        while self._callbacks:
            self.synchronize_rcu()
