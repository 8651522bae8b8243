"""Synchronisation primitives in virtual time: spinlock, queued rwlock, RCU, completion, channel.

Every operation is a switch point that costs what the cost model says. Locks are fair (FIFO
queued, like Linux's ticket spinlock and qrwlock: a reader waits behind a queued writer), so
who gets a lock when depends only on virtual time and the seed.

Lock accounting: the acquire (its atomic, plus `lock_handoff` when the lock's cache line comes
from another task) counts as lock wait even when uncontended; the release counts as lock held,
and the lock is free only once the release's cost has been paid.

A lock's word lives in one cache line (CacheLine), and the line moves between CPUs one
transfer at a time: each acquire, release and hand-over by a task other than the line's last
owner reserves the next `lock_handoff` slot of the line. Sixty-four readers taking a rwlock
at once therefore queue for the line even though none waits for the lock itself, which is
what makes a read-mostly lock's word a bottleneck on a large machine (see docs/engine.md).

Called outside any task (setup and teardown code), a free lock is taken at no cost; anything
that would have to wait is a RuntimeError.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mmu_core.sim.engine import Engine, Task

READ = "read"
WRITE = "write"


class _Guard:
    """`with lock.read():` / `with lock.write():` without a generator per use."""

    __slots__ = ("_enter", "_exit")

    def __init__(self, enter: Callable[[], None], exit_: Callable[[], None]) -> None:
        self._enter = enter
        self._exit = exit_

    def __enter__(self) -> None:
        self._enter()

    def __exit__(self, *exc: object) -> None:
        self._exit()


class CacheLine:
    """One cache line that atomics from different CPUs (tasks) contend for.

    Transfers are serialized: a task other than the line's owner waits for the line to be
    free of earlier transfers, then for its own transfer (`transfer_ns`), and becomes the
    owner. The owner's own accesses hit in its cache and cost nothing here. Used for lock
    words (the MMU lock, the mmap lock) and other hot shared words (a uffd's wait queue).
    """

    __slots__ = ("engine", "owner", "free_at", "transfer_ns", "transfers", "wait_ns")

    def __init__(self, engine: Engine, transfer_ns: int | None = None) -> None:
        self.engine = engine
        self.owner: Task | None = None
        self.free_at = 0  # virtual time at which the last reserved transfer completes
        self.transfer_ns = engine.cost.lock_handoff if transfer_ns is None else transfer_ns
        self.transfers = 0
        self.wait_ns = 0  # summed time tasks queued behind other transfers (not their own)

    def reserve(self, task: Task | None) -> int:
        """Reserve `task`'s transfer of the line; returns how long from now until the line is
        in its cache (0 if it already is, or outside any task). Does not advance time."""
        if task is None or self.owner is None or self.owner is task:
            # Outside the engine nothing costs time; a line nobody has touched yet (or last
            # touched by setup code) is taken as it is, as the lock's first acquire always was.
            self.owner = task
            return 0
        now = self.engine.now
        start = self.free_at if self.free_at > now else now
        self.free_at = start + self.transfer_ns
        self.wait_ns += start - now
        self.transfers += 1
        self.owner = task
        return self.free_at - now

    def touch(self, op_ns: int | None = None) -> None:
        """The current task does an atomic on the line: it waits until the line is its own,
        then for the operation (`op_ns`), a switch point even when free. One switch point for
        both: nothing another task could observe happens in between, and each switch point
        costs wall time. Without `op_ns`, only a transfer is a switch point."""
        engine = self.engine
        ns = self.reserve(engine.current)
        if op_ns is not None:
            engine.delay(ns + op_ns)
        elif ns:
            engine.delay(ns)

    def forget(self) -> None:
        self.owner = None


class _ReadWrite:
    """read_lock/read_unlock/write_lock/write_unlock and the `with` guards, over a class's
    `_acquire(write)` and `_release(write)` (RWLock, RWSem)."""

    _read_guard: _Guard
    _write_guard: _Guard

    def _guards(self) -> None:
        self._read_guard = _Guard(self.read_lock, self.read_unlock)
        self._write_guard = _Guard(self.write_lock, self.write_unlock)

    def read_lock(self) -> None:
        self._acquire(False)

    def read_unlock(self) -> None:
        self._release(False)

    def write_lock(self) -> None:
        self._acquire(True)

    def write_unlock(self) -> None:
        self._release(True)

    def read(self) -> _Guard:
        """`with lock.read():` holds it for read."""
        return self._read_guard

    def write(self) -> _Guard:
        """`with lock.write():` holds it for write."""
        return self._write_guard


class _QueuedLock:
    """The mechanics shared by RWLock and SpinLock: a FIFO queue of (task, write) waiters."""

    def __init__(self, engine: Engine, name: str, read_ns: int, write_ns: int,
                 release_ns: int, accounted: bool = True) -> None:
        self.engine = engine
        self.name = name
        # An accounted lock's wait and hold are "lock wait" and "lock held" in the tasks'
        # accounting, which stand for the MMU lock; any other lock's count in the task's
        # current phase. Either way the task spins and keeps its CPU, preemption off.
        self.accounted = accounted
        self.readers: dict[Task | None, int] = {}  # holder -> read nesting (None: no task)
        self.writer: Task | None = None
        self._write_held = False  # separate from `writer`, which is None outside tasks
        self._queue: deque[tuple[Task, bool]] = deque()
        self.line = CacheLine(engine)  # the lock word's cache line
        self._read_ns = read_ns
        self._write_ns = write_ns
        self._release_ns = release_ns
        engine._adopt(self)

    def _forget_tasks(self) -> None:
        """Engine.close(): every task is dead, so drop them as holders and waiters.

        Holders outside any task (None: setup or teardown code) stay.
        """
        for task in [t for t in self.readers if t is not None]:
            del self.readers[task]
        if self._write_held and self.writer is not None:
            self.writer = None
            self._write_held = False
        self._queue.clear()
        self.line.forget()

    def _free_for(self, write: bool) -> bool:
        # Nobody queued also means no writer queued ahead of a reader: that is the fairness.
        if self._write_held or self._queue:
            return False
        return not write or not self.readers

    def _acquire(self, write: bool) -> None:
        engine = self.engine
        task = engine.current
        if task is None:
            if not self._free_for(write):
                raise RuntimeError(f"{self.name}: contended outside a task (it would wait forever)")
            self._grant(None, write)
            return
        if (self._write_held and self.writer is task) or (write and task in self.readers):
            raise RuntimeError(f"{self.name}: {task.name} would deadlock against itself")
        accounted = self.accounted
        task.nopreempt += 1
        if accounted:
            task.account()
            task.waiting += 1
        if engine.trace_enabled:
            engine._record(task, "lock_acquire", (self.name, WRITE if write else READ))
        # The atomic needs the lock word's line first (queueing behind other CPUs' transfers),
        # then executes; what it read decides whether the lock was free.
        self.line.touch(self._write_ns if write else self._read_ns)
        if self._free_for(write):
            self._grant(task, write)
        else:
            if accounted:
                task.lock_contended += 1
            self._queue.append((task, write))
            engine._park(task, f"lock_wait {self.name} ({WRITE if write else READ})", spin=True)
        if accounted:
            task.account()
            task.waiting -= 1
        if engine.trace_enabled:
            engine._record(task, "lock", (self.name, WRITE if write else READ))

    def _grant(self, task: Task | None, write: bool) -> None:
        # Only ever called while `task` is still waiting, so its category does not change.
        if write:
            self.writer = task
            self._write_held = True
        else:
            self.readers[task] = self.readers.get(task, 0) + 1
        if task is not None and self.accounted:
            task.holding += 1
            task.lock_acquires += 1

    def _release(self, write: bool) -> None:
        engine = self.engine
        task = engine.current
        if write:
            if not (self._write_held and self.writer is task):
                raise RuntimeError(f"{self.name}: write unlock by a task that does not hold it")
        elif not self.readers.get(task):
            raise RuntimeError(f"{self.name}: read unlock by a task that does not hold it")
        if task is not None:
            self.line.touch(self._release_ns)
            task.nopreempt -= 1
            if self.accounted:
                task.account()
                task.holding -= 1
        if write:
            self.writer = None
            self._write_held = False
        else:
            n = self.readers[task]
            if n == 1:
                del self.readers[task]
            else:
                self.readers[task] = n - 1
        if task is None:
            self.line.reserve(None)
        if engine.trace_enabled:
            engine._record(task, "unlock", (self.name, WRITE if write else READ))
        if self._queue:
            self._hand_over()

    def _hand_over(self) -> None:
        """Grant the lock to the head of the queue: one writer, or every reader up to one."""
        q = self._queue
        while q and not self._write_held:
            task, write = q[0]
            if write and self.readers:
                return
            q.popleft()
            # The spinning waiter sees the release once the line has travelled to its CPU
            # (after any transfers already queued for the line): it resumes then.
            after = self.line.reserve(task)
            self._grant(task, write)
            self.engine._wake(task, after)

    @property
    def write_held(self) -> bool:
        """Whether any task holds the lock for write."""
        return self._write_held

    @property
    def contended(self) -> bool:
        """Whether any task is queued for the lock."""
        return bool(self._queue)


class RWLock(_QueuedLock, _ReadWrite):
    """A fair queued reader-writer lock (Linux's qrwlock), e.g. KVM's mmu_lock."""

    def __init__(self, engine: Engine, name: str) -> None:
        c = engine.cost
        super().__init__(engine, name, c.rwlock_read_acquire, c.rwlock_write_acquire,
                         c.rwlock_release)
        self._guards()

    def held_by_current(self, mode: str) -> bool:
        task = self.engine.current
        if mode == READ:
            return task in self.readers
        if mode == WRITE:
            return self._write_held and self.writer is task
        raise ValueError(f"mode must be {READ!r} or {WRITE!r}, not {mode!r}")

    def cond_resched(self, mode: str) -> bool:
        """If anyone waits for the lock, drop it, yield and retake it in the same mode.

        KVM's cond_resched_rwlock_read/write; returns True if the lock was dropped.
        """
        write = {READ: False, WRITE: True}[mode]
        if not self._queue:
            return False
        self._release(write)
        self.engine.delay(0)
        self._acquire(write)
        return True


class SpinLock(_QueuedLock):
    """An exclusive FIFO lock (a ticket spinlock). `accounted=False` for locks other than
    the MMU lock (a uffd's wait queue): their wait is the task's phase, not "lock wait"."""

    def __init__(self, engine: Engine, name: str, accounted: bool = True) -> None:
        c = engine.cost
        super().__init__(engine, name, c.spin_acquire, c.spin_acquire, c.spin_release,
                         accounted)

    def lock(self) -> None:
        self._acquire(True)

    def unlock(self) -> None:
        self._release(True)

    def __enter__(self) -> SpinLock:
        self._acquire(True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._release(True)

    def held_by_current(self) -> bool:
        return self._write_held and self.writer is self.engine.current

    @property
    def locked(self) -> bool:
        return self._write_held


class RWSem(_ReadWrite):
    """A sleeping reader-writer semaphore, FIFO and fair to writers (Linux's rw_semaphore;
    the mmap lock).

    Unlike RWLock, a waiter sleeps (it gives its host CPU up) and its wait is not "lock wait"
    in the accounting, which stands for the MMU lock: it is the phase `name`. The semaphore's
    count lives in one CacheLine, so down_read/up_read by many CPUs queue for the line even
    when nobody waits for the semaphore: that is what the seed's 416 vCPUs, all in
    get_user_pages and UFFDIO_COPY at once, pay for the mmap lock. The atomics cost what the
    rwlock's do (the same LOCK XADD / CMPXCHG on a count).
    """

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self.line = CacheLine(engine)
        self.readers = 0
        self.writer = False
        self._queue: deque[tuple[Task, bool]] = deque()
        self._granted: set[Task] = set()
        c = engine.cost
        self._read_ns = c.rwlock_read_acquire
        self._write_ns = c.rwlock_write_acquire
        self._release_ns = c.rwlock_release
        self._guards()
        self.contended = 0  # acquires that slept
        engine._adopt(self)

    def _forget_tasks(self) -> None:
        self._queue.clear()
        self._granted.clear()
        self.line.forget()

    def _free_for(self, write: bool) -> bool:
        if self.writer or self._queue:
            return False
        return not write or not self.readers

    def _take(self, write: bool) -> None:
        if write:
            self.writer = True
        else:
            self.readers += 1

    def _acquire(self, write: bool) -> None:
        engine = self.engine
        task = engine.current
        if task is None:
            if not self._free_for(write):
                raise RuntimeError(f"{self.name}: contended outside a task (it would wait forever)")
            self._take(write)
            return
        self.line.touch(self._write_ns if write else self._read_ns)
        if self._free_for(write):
            self._take(write)
            return
        self.contended += 1
        self._queue.append((task, write))
        try:
            while task not in self._granted:
                engine.block(self.name)
        except BaseException:
            # Killed while asleep (engine.close): leave nothing behind in line or granted.
            if task in self._granted:
                self._granted.discard(task)
                self._release(write, charge=False)
            else:
                self._queue.remove((task, write))
            raise
        self._granted.discard(task)

    def _release(self, write: bool, charge: bool = True) -> None:
        engine = self.engine
        if write:
            if not self.writer:
                raise RuntimeError(f"{self.name}: write unlock while not write-locked")
        elif not self.readers:
            raise RuntimeError(f"{self.name}: read unlock while not read-locked")
        if charge and engine.current is not None:
            self.line.touch(self._release_ns)
        if write:
            self.writer = False
        else:
            self.readers -= 1
        q = self._queue
        while q and not self.writer:
            task, w = q[0]
            if w and self.readers:
                break
            q.popleft()
            self._take(w)
            self._granted.add(task)
            # The sleeper runs once woken and the count's line is in its cache.
            engine.wake(task, self.line.reserve(task))


class Completion:
    """Waiters sleep until complete(); it stays complete until reinit()."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.done = False
        self._waiters: list[Task] = []

    def wait(self, phase: str) -> None:
        if self.done:
            return
        task = self.engine.current
        if task is None:
            raise RuntimeError("Completion.wait outside a task would never return")
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
    """A FIFO message queue: put never blocks, get blocks while it is empty."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._items: deque[Any] = deque()
        self._getters: deque[Task] = deque()

    def put(self, item: Any) -> None:
        self._items.append(item)
        if self._getters:
            self.engine.wake(self._getters.popleft())

    def get(self, phase: str) -> Any:
        if self._items:
            return self._items.popleft()
        task = self.engine.current
        if task is None:
            raise RuntimeError("Channel.get on an empty channel outside a task would never return")
        self._getters.append(task)
        while True:
            self.engine.block(phase)
            if self._items:
                return self._items.popleft()
            # A running task took the item first: wait again, keeping our place in line.
            self._getters.appendleft(task)

    def __len__(self) -> int:
        return len(self._items)


class RCU:
    """Read-copy-update: a callback runs once every reader that predates it has left.

    Readers take a sequence number when they enter; a callback queued at sequence s runs, in
    the `name` daemon task, once no reader with an entry number <= s remains and at least
    `grace_ns` (default: rcu_grace_period) after call_rcu. Entry numbers only grow and the
    reader dict keeps insertion order, so its first entry is always the oldest reader.

    One class serves RCU and SRCU (KVM's kvm->srcu, which protects the memslots): an SRCU
    domain has its own readers, callbacks and worker, and its read side may sleep. With
    `charge_readers=False` entering and leaving cost nothing here, for a domain whose
    read-side cost is already in a larger measured constant (KVM's vCPUs leave and re-enter
    kvm->srcu around every guest entry: part of the exit cost).
    """

    def __init__(self, engine: Engine, name: str = "rcu", grace_ns: int | None = None,
                 charge_readers: bool = True) -> None:
        self.engine = engine
        self.name = name
        self.grace_ns = engine.cost.rcu_grace_period if grace_ns is None else grace_ns
        self.charge_readers = charge_readers
        self._seq = 0
        self._readers: dict[Task | None, list[int]] = {}  # task -> [nesting, entry number]
        self._callbacks: deque[tuple[int, int, Callable[..., Any], tuple[Any, ...]]] = deque()
        self._worker: Task | None = None
        self._guard = _Guard(self.read_lock, self.read_unlock)
        engine._adopt(self)

    def _forget_tasks(self) -> None:
        """Engine.close(): readers that were tasks are dead and will never leave; forget them
        so that barrier() can run the callbacks at teardown. The worker is gone too."""
        for task in [t for t in self._readers if t is not None]:
            del self._readers[task]
        self._worker = None

    # --- readers ------------------------------------------------------------------------------
    def read_lock(self) -> None:
        engine = self.engine
        task = engine.current
        if task is not None and self.charge_readers:
            engine.delay(engine.cost.rcu_read_lock)
        reader = self._readers.get(task)
        if reader is None:
            self._seq += 1
            self._readers[task] = [1, self._seq]
            if engine.trace_enabled:
                engine._record(task, f"{self.name}_read_lock", self._seq)
        else:
            reader[0] += 1

    def read_unlock(self) -> None:
        engine = self.engine
        task = engine.current
        reader = self._readers.get(task)
        if reader is None:
            raise RuntimeError(f"{self.name}_read_unlock without {self.name}_read_lock")
        reader[0] -= 1
        if not reader[0]:
            del self._readers[task]
            if engine.trace_enabled:
                engine._record(task, f"{self.name}_read_unlock", reader[1])
            # Only a reader the oldest callback waits for can make it ready.
            if self._callbacks and reader[1] <= self._callbacks[0][0]:
                self._kick()
        if task is not None and self.charge_readers:
            engine.delay(engine.cost.rcu_read_unlock)

    def read(self) -> _Guard:
        """`with rcu.read():` is a read-side critical section."""
        return self._guard

    def holding(self) -> bool:
        """Whether the calling task is inside a read-side section. No switch point."""
        return self.engine.current in self._readers

    @contextmanager
    def outside(self) -> Iterator[None]:
        """`with srcu.outside():` leaves the calling task's read-side section (all nesting
        levels) for the body and re-enters it after, as a new reader: for a sleeping SRCU
        reader that must not hold up a grace period while it waits. A task outside any
        section just runs the body."""
        task = self.engine.current
        reader = self._readers.get(task)
        depth = reader[0] if reader is not None else 0
        for _ in range(depth):
            self.read_unlock()
        try:
            yield
        finally:
            for _ in range(depth):
                self.read_lock()

    # --- updaters -----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Callbacks queued and not yet run."""
        return len(self._callbacks)

    def call_rcu(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) in the "rcu" task after a grace period."""
        engine = self.engine
        self._seq += 1
        self._callbacks.append((self._seq, engine.now + self.grace_ns, fn, args))
        if engine.trace_enabled:
            engine._record(engine.current, f"call_{self.name}", self._seq)
        self._kick()
        if engine.current is not None:
            engine.delay(engine.cost.call_rcu)

    def synchronize_rcu(self) -> None:
        """Block until every reader that is inside now has left (and a grace period passed)."""
        engine = self.engine
        task = engine.current
        if task in self._readers:
            raise RuntimeError(f"synchronize_{self.name} inside a {self.name} read-side critical "
                               "section")
        if task is None:
            if self._readers:
                raise RuntimeError(f"synchronize_{self.name} outside a task with readers inside")
            return  # nobody to wait for, and time does not pass outside the engine
        done = Completion(engine)
        self.call_rcu(done.complete)
        done.wait(f"{self.name}_sync")

    def barrier(self) -> None:
        """rcu_barrier: outside the engine, run every queued callback now (teardown);
        inside a task, wait until the callbacks queued so far have run."""
        if self.engine.current is None:
            if self._readers:
                raise RuntimeError("rcu_barrier outside a task with readers inside")
            while self._callbacks:  # callbacks may queue more
                _seq, _due, fn, args = self._callbacks.popleft()
                fn(*args)
            return
        if self._callbacks:
            self.synchronize_rcu()  # the worker runs callbacks in order: ours is last

    # --- the worker ---------------------------------------------------------------------------
    def _kick(self) -> None:
        engine = self.engine
        if self._worker is not None:
            engine.wake(self._worker)
        elif not engine.closed:  # after close(), only barrier() runs callbacks
            self._worker = engine.spawn(self.name, self._work, daemon=True)

    def _work(self) -> None:
        engine = self.engine
        callbacks = self._callbacks
        while True:
            if not callbacks:
                engine.block(f"{self.name}_idle")
                continue
            seq, due, fn, args = callbacks[0]
            if engine.now < due:
                engine.delay(due - engine.now, f"{self.name}_grace")
                continue
            readers = self._readers
            if readers and next(iter(readers.values()))[1] <= seq:
                engine.block(f"{self.name}_idle")  # woken when the readers it waits for leave
                continue
            callbacks.popleft()
            if engine.trace_enabled:
                engine._record(engine.current, f"{self.name}_callback", seq)
            fn(*args)
