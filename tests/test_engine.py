"""The virtual-time engine and its primitives: determinism, lock semantics, accounting, RCU."""

import pytest

from mmu_core.sim import RCU, Channel, CostModel, Deadlock, Engine, RWLock

ZERO = CostModel(**{name: 0 for name in CostModel.model_fields if name != "quantum"})


def contention_workload(seed: int, policy: str) -> list:
    engine = Engine(seed, policy=policy, trace=True)
    lock = RWLock(engine, "mmu_lock")
    rcu = RCU(engine)
    slots = [0] * 8

    def worker(i):
        rng = engine.rng
        for _ in range(20):
            if rng.random() < 0.3:
                with lock.write():
                    engine.delay(rng.randrange(50, 200))
            else:
                with lock.read(), rcu.read():
                    engine.atomic("cmpxchg")
                    slots[i % 8] += 1
                    rcu.call_rcu(lambda: None)
            engine.delay(rng.randrange(0, 100))

    for i in range(20):
        engine.spawn(f"t{i}", worker, i)
    engine.run()
    return engine.trace


def test_same_seed_same_trace():
    assert contention_workload(7, "random") == contention_workload(7, "random")
    assert contention_workload(7, "fifo") == contention_workload(7, "fifo")


def test_random_policy_with_different_seeds_interleaves_differently():
    assert contention_workload(1, "random") != contention_workload(2, "random")


def test_lock_accounting_adds_up_and_matches_hand_computation():
    engine = Engine(0, cost=ZERO)
    lock = RWLock(engine, "l")

    def a():
        with lock.write():
            engine.delay(100, "work")  # held: 0..100
        engine.delay(10, "after")

    def b():
        engine.delay(10, "before")  # other: 0..10
        with lock.read():  # waits 10..100, holds 100..130
            engine.delay(30)

    ta = engine.spawn("a", a)
    tb = engine.spawn("b", b)
    engine.run()
    sa, sb = ta.statistics(), tb.statistics()
    assert (sa.lock_held_ns, sa.lock_wait_ns, dict(sa.phases)) == (100, 0, {"after": 10})
    assert (sb.lock_wait_ns, sb.lock_held_ns, dict(sb.phases)) == (90, 30, {"before": 10})
    for s in (sa, sb):
        assert s.lock_wait_ns + s.lock_held_ns + sum(s.phases.values()) == s.total_ns
    assert sb.lock_contended == 1


def test_accounting_adds_up_for_every_task_under_contention():
    engine = Engine(3, policy="random")
    lock = RWLock(engine, "l")

    def worker():
        for _ in range(30):
            with engine.phase("prep"):
                engine.delay(engine.rng.randrange(1, 50))
            with (lock.write() if engine.rng.random() < 0.5 else lock.read()):
                engine.delay(engine.rng.randrange(1, 50), "inside")

    tasks = [engine.spawn(f"w{i}", worker) for i in range(10)]
    engine.run()
    for t in tasks:
        s = t.statistics()
        assert s.lock_wait_ns + s.lock_held_ns + sum(s.phases.values()) == s.total_ns
        assert s.lock_held_ns > 0


def test_readers_share_writer_excludes_and_a_queued_writer_blocks_later_readers():
    engine = Engine(0, cost=ZERO)
    lock = RWLock(engine, "l")
    log = []

    def reader(name, start):
        engine.delay(start)
        with lock.read():
            log.append((engine.now, name, "in"))
            engine.delay(100)

    def writer(start):
        engine.delay(start)
        with lock.write():
            log.append((engine.now, "w", "in"))
            engine.delay(50)

    engine.spawn("r1", reader, "r1", 0)
    engine.spawn("r2", reader, "r2", 10)  # shares with r1
    engine.spawn("w", writer, 20)  # waits for r1 and r2
    engine.spawn("r3", reader, "r3", 30)  # queued behind the writer
    engine.run()
    assert log == [(0, "r1", "in"), (10, "r2", "in"), (110, "w", "in"), (160, "r3", "in")]


def test_rcu_callback_waits_for_preexisting_readers_and_the_grace_period():
    cost = ZERO.model_copy(update={"rcu_grace_period": 1000})
    engine = Engine(0, cost=cost)
    rcu = RCU(engine)
    ran = []

    def reader():
        with rcu.read():
            engine.delay(5000)

    def updater():
        engine.delay(10)
        rcu.call_rcu(lambda: ran.append(engine.now))

    def waiter():
        engine.delay(20)
        rcu.synchronize_rcu()
        ran.append(("sync", engine.now))

    engine.spawn("reader", reader)
    engine.spawn("updater", updater)
    engine.spawn("waiter", waiter)
    engine.run()
    assert ran == [5000, ("sync", 5000)]


def test_deadlock_names_the_blocked_tasks():
    engine = Engine(0)
    ch = Channel(engine)
    engine.spawn("consumer", ch.get, "waiting_for_message")
    with pytest.raises(Deadlock) as exc:
        engine.run()
    assert "consumer (waiting_for_message)" in str(exc.value)


def test_exception_in_a_task_propagates_out_of_run():
    engine = Engine(0)

    def boom():
        engine.delay(5)
        raise ValueError("boom")

    engine.spawn("b", boom)
    with pytest.raises(ValueError, match="boom"):
        engine.run()


def test_a_lone_task_advances_the_clock_without_switching():
    engine = Engine(0)

    def spin():
        for _ in range(100_000):
            engine.delay(1)

    t = engine.spawn("spin", spin)
    engine.run()
    assert engine.now == 100_000
    assert t.statistics().switches == 1


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="fifo, random"):
        Engine(0, policy="lottery")
