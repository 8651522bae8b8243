"""The compiled event loop for demand paging (docs/fastloop.md; issue #9 item 3).

The same model as the exact engine (engine.py, sync.py, the vCPU loop of vm/vcpu.py, GUP of
host/mm.py) for the one path it supports, as a state machine per task over numpy arrays:
an array heap keyed `(key, sequence)` as the exact engine's, the MMU rwlock and the mmap
lock with their cache lines, lazy accounting per task. The backend's part of a fault (and of
loading a root) is a compiled *kernel* obtained through the `mmu_compiled_kernels` hook: a
numba function called at each of the backend's switch points, which does the SPTE work on
the VM's real arrays and returns the next request (a delay, an atomic, a lock operation,
done). docs/fastloop.md is the specification; tests/test_fastloop.py checks that both engines
agree exactly.

What it supports is decided by `unsupported()`: anything else runs on the exact engine.
"""

from __future__ import annotations

import heapq
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numba import njit

from mmu_core import mutants
from mmu_core.arch.x86 import ept as EPT
from mmu_core.host.memory import FRAME_FREE, NO_SLOT, Purpose
from mmu_core.hw import cpu as C
from mmu_core.hw import walker as W
from mmu_core.sim.engine import SWITCH_PRIMITIVES

_GUEST_DATA = int(Purpose.GUEST_DATA)
MMU_PT = int(Purpose.MMU_PT)  # the purpose a kernel allocates table pages for

# --- requests a kernel returns (docs/plugin-guide.md, "Compiled kernels") -------------------
R_DELAY = 1  # arg ns: engine.delay(ns)
R_READ = 2  # engine.atomic("read")
R_CMPXCHG = 3  # engine.atomic("cmpxchg")
R_RLOCK = 4  # vm.mmu_lock.read_lock()
R_RUNLOCK = 5
R_WLOCK = 6
R_WUNLOCK = 7
R_RCU_LOCK = 8  # vm.rcu.read_lock()
R_RCU_UNLOCK = 9
R_CMPXCHG_FAILED = 10  # engine.note_cmpxchg_failure(): no switch point, the kernel goes on
R_DONE = 11  # arg: the Ret of the fault (K_FAULT) or 0 (K_LOAD)
R_ERROR = 12  # arg: a kernel-specific code for a state the kernel does not model

# --- what the core asks a kernel to do ---------------------------------------------------------
K_LOAD = 0  # mmu_load: the vCPU has no root
K_FAULT = 1  # mmu_page_fault with the gfn resolved (KS_* inputs)

# --- a kernel's per-task row (int64): the core fills the inputs of a fault ------------------
KS_STATE = 0  # the kernel's own state; the core sets it to 0 before each K_LOAD / K_FAULT
KS_GFN = 1
KS_WRITE = 2
KS_PFN = 3  # the host pfn gfn_to_pfn found
KS_LEVEL = 4  # the largest level it may be mapped at (max_mapping_level)
KS_WRITABLE = 5  # the host maps it writable and the slot is not read-only
KS_ROOT = 6  # the vCPU's root (-1: none); the kernel sets it in K_LOAD
KS_FREE = 8  # from here on the kernel's own
KS_SIZE = 32
KSU_SIZE = 8  # a per-task uint64 row for SPTE values

# --- the memory tuple's int64 counters -----------------------------------------------------
M_NEXT = 0  # HostMemory._next_pfn
M_NFREE1 = 1  # entries on the 1-frame free stack
M_NSLOTS = 2  # entries on the free table-row stack
M_LOGN = 3  # rows in the allocation log
M_POP4K = 4  # HostMM.stats.populated_4k
M_INUSE = 8  # frames_in_use[purpose]
M_PEAK = 12  # frames_peak[purpose]
M_SIZE = 16
LOG_ALLOC = 1
LOG_FREE = 2
LOG_ROWS = 1 << 16  # the allocation log's rows; the loop pauses for a flush near the end
LOG_MARGIN = 64  # more than one step's allocations and frees

# --- phases ------------------------------------------------------------------------------------
PH_OTHER, PH_GUEST, PH_WALK, PH_EXIT, PH_GUP, PH_USERFAULT, PH_UFFD_WAIT, PH_UFFD_COPY, \
    PH_UFFD_DELAY, PH_RUNQUEUE = range(10)
PHASE_NAMES = ("other", "guest", "walk", "exit", "gup", "userfault", "uffd_wait", "uffd_copy",
               "uffd_delay", "runqueue")
NPH = len(PHASE_NAMES)
PSTACK = 8

# --- task fields ----------------------------------------------------------------------------
(T_STATE, T_PC, T_END, T_CHUNK, T_MARK, T_WAITING, T_HOLDING, T_DEPTH, T_POP, T_LOCK_WAIT,
 T_LOCK_HELD, T_SWITCHES, T_ACQ, T_CONT, T_ATOMICS, T_CMPXFAIL, T_START, T_ENDT, T_FINISHED,
 T_STARTED, T_CPU_SINCE, T_OP, T_HVAI, T_LOCKW, T_STUCK_PC, T_STUCK, T_EXITS, T_RET,
 T_LOCKID, T_RESUME, T_NOPRE, T_ONCPU, T_CPU_NS, T_KIND, T_UFFD, T_WOKEN, T_MSG, T_BLOCKED,
 T_SLICE, T_PSTATE, T_PNS, T_PPH, T_PNEXT, T_INPOLL, T_WNEXT, T_COMP, T_CDONE, T_CWH, T_CWT,
 T_WL, T_WBASE, T_OUT) = range(52)
NOUT = 5  # fault outcomes counted per Ret value
T_FIRST = T_OUT + NOUT  # the step at which each outcome was first counted (dict order)
T_SIZE = T_FIRST + NOUT

# --- engine fields ------------------------------------------------------------------------
(E_NOW, E_SEQ, E_STEPS, E_HN, E_LIVE, E_RCU_SEQ, E_SEM_READERS, E_ERROR,
 E_ERROR_TASK) = range(9)
# host CPUs (engine._free_cpus, the run queue's head and length in RQ, sched_slice,
# context_switch)
E_FREE, E_RQH, E_RQN, E_SLICE, E_CSW = range(9, 14)
E_NMIS = 14  # rows of MIS in use
E_MODE = 24  # 0 fifo, 1 random
E_DRAWN = 25  # random: draws of the schedule's stream consumed so far (J's ring index)
E_RLIM = 26  # random: draws available in J (absolute count)
E_CUR = 27  # a task the loop paused between two of its steps (-1: none), resumed first
E_SIZE = 32
#: random: a slice pauses when fewer draws than this are left in J
J_MARGIN = 64

# --- locks (LK rows): the MMU lock, the mmap lock's line, then each uffd's wait-queue lock ---
LK_MMU = 0
LK_MMAP = 1  # only its line: the semaphore's readers are E_SEM_READERS
LK_UFFD = 2  # + uffd index
(LK_READERS, LK_WHELD, LK_WRITER, LK_QH, LK_QN, LK_OWNER, LK_FREE, LK_TRANS, LK_WAIT,
 LK_ACC) = range(10)
LK_SIZE = 10

# --- userfaultfds (U rows; one handler each, or a reader per vCPU with -a) --------------------
# Messages wait in a ring per uffd (MQ rows: hva index, write); the readers asleep in poll()
# are a list threaded through T_PNEXT (U_PHEAD .. U_PTAIL); a fault's Completion belongs to
# the vCPU that reported the page (T_CPAGE, T_CDONE, its waiters threaded through T_WNEXT),
# found from the page by an open-addressing table (HK keys, HV owners): uffd._pending.
(U_START, U_END, U_MQH, U_MQN, U_PHEAD, U_PTAIL, U_NPOLL, U_WAITING, U_FAULTS, U_COPIES,
 U_EMPTY) = range(11)
U_SIZE = 11

# --- cost fields -------------------------------------------------------------------------------
(C_GUEST, C_WALK, C_EXIT, C_ENTRY, C_HANDOFF, C_RACQ, C_WACQ, C_REL, C_ATOMIC_READ, C_CMPXCHG,
 C_RCU_LOCK, C_RCU_UNLOCK, C_GUP, C_ALLOC, C_BUDGET, C_SPIN_ACQ, C_SPIN_REL, C_NOTIFY, C_UCOPY,
 C_UDELAY, C_DATA_GFN, C_DATA_HVAI) = range(22)
C_SIZE = 22

# --- errors (E_ERROR) --------------------------------------------------------------------
ERR_EXIT_KIND = 1  # the CPU loop exited for something other than an EPT violation
ERR_NO_SLOT = 2  # a fault outside every memslot (MMIO)
ERR_WRITE_PROTECTED = 3  # a write to a page the host maps read-only
ERR_KERNEL = 4  # the kernel returned R_ERROR
ERR_STUCK = 5  # MAX_FAULTS_PER_OP faults on one op
ERR_SEM = 6  # the mmap lock was not free for read (a writer: not in this workload)
ERR_MISMATCHES = 7  # more results unlike the expected ones than MIS can keep
ERR_DEADLOCK = 8  # live tasks and nothing scheduled
ERROR_TEXT = {
    ERR_EXIT_KIND: "the CPU loop exited for something other than an EPT violation",
    ERR_NO_SLOT: "a fault outside every memslot (MMIO)",
    ERR_WRITE_PROTECTED: "a write fault on a page the host maps read-only",
    ERR_KERNEL: "the backend's kernel reached a state it does not model",
    ERR_STUCK: "no progress: one op faulted more than MAX_FAULTS_PER_OP times",
    ERR_SEM: "the mmap lock was not free for read",
    ERR_DEADLOCK: "deadlock: every live task is blocked",
    ERR_MISMATCHES: "too many guest accesses gave unexpected results to stream them "
                    "(run it with --engine exact)",
}

# --- vCPU states -----------------------------------------------------------------------------
(V_LOOP, V_AFTER_GUEST, V_AFTER_WALK, V_GUP1, V_GUP2, V_FAULTIN, V_FAULTIN2, V_GUP3,
 V_KERNEL, V_KRESUME, V_ENTRY, V_ENTRY2, V_DONE) = range(13)
# kernel-request continuations (the state to go to once the switch point is passed)
(V_LOCK2, V_LOCK3, V_UNLOCK2, V_RCU2) = range(20, 24)
# a delay that found the task past its slice with others waiting for a CPU: it leaves its
# CPU (V_PREEMPT) and, given one back, makes the delay it was asked for (V_PREEMPTED)
(V_PREEMPT, V_PREEMPTED) = range(24, 26)
# userfaults: the vCPU's wait_for, and the handler's read and copy
(V_UF_REL, V_UF_W0, V_UF_W1, V_UF_W2, V_UF_W3, V_UF_WAIT, V_UF_WOKE, V_UF_W2B) = range(30, 38)
(H_READ, H_LOOP, H_HELD, H_POLL, H_POLLED, H_GOT, H_COPY, H_COPY2, H_COPY3, H_COPY4, H_COPY5,
 H_COPY6, H_COPY7) = range(40, 53)


@njit(cache=True, _nrt=False)
def _account(E, T, PS, PH, t):
    now = E[E_NOW]
    dt = now - T[t, T_MARK]
    if dt:
        T[t, T_MARK] = now
        if T[t, T_WAITING]:
            T[t, T_LOCK_WAIT] += dt
        elif T[t, T_HOLDING]:
            T[t, T_LOCK_HELD] += dt
        else:
            PH[t, PS[t, T[t, T_DEPTH]]] += dt


@njit(cache=True, _nrt=False)
def _less(HP, a, b):
    return HP[a, 0] < HP[b, 0] or (HP[a, 0] == HP[b, 0] and HP[a, 1] < HP[b, 1])


@njit(cache=True, _nrt=False)
def _swap(HP, a, b):
    for k in range(4):
        x = HP[a, k]
        HP[a, k] = HP[b, k]
        HP[b, k] = x


@njit(cache=True, _nrt=False)
def _push(E, HP, key, due, t):
    E[E_SEQ] += 1
    i = E[E_HN]
    E[E_HN] = i + 1
    HP[i, 0] = key
    HP[i, 1] = E[E_SEQ]
    HP[i, 2] = due
    HP[i, 3] = t
    while i > 0:
        p = (i - 1) >> 1
        if _less(HP, i, p):
            _swap(HP, i, p)
            i = p
        else:
            break


@njit(cache=True, _nrt=False)
def _pop(E, HP):
    """Remove the head (heapq order); returns its row index 0's task after moving it."""
    n = E[E_HN] - 1
    E[E_HN] = n
    _swap(HP, 0, n)
    i = 0
    while True:
        left = 2 * i + 1
        if left >= n:
            break
        m = left
        if left + 1 < n and _less(HP, left + 1, left):
            m = left + 1
        if _less(HP, m, i):
            _swap(HP, m, i)
            i = m
        else:
            break
    return n  # the popped row now sits at index n


@njit(cache=True, _nrt=False)
def _jitter(E, J):
    """random: the next draw of the schedule's stream, as int(random() * (jitter_ns + 1))
    (drawn in Python from the engine's own stream, in order)."""
    if E[E_MODE] == 0:
        return 0
    k = E[E_DRAWN]
    E[E_DRAWN] = k + 1
    return J[k % J.shape[0]]


@njit(cache=True, _nrt=False)
def _preempt_due(E, T, t, ns, phase):
    """engine.delay's first check: a task past its slice (outside spinlocks) with others
    waiting for a CPU leaves it before the delay. Then the delay (ns, phase: -1 for none) is
    kept for when it runs again (V_PREEMPT, V_PREEMPTED) and True returned."""
    if E[E_RQN] and E[E_NOW] - T[t, T_SLICE] >= E[E_SLICE] and not T[t, T_NOPRE]:
        T[t, T_PSTATE] = T[t, T_STATE]
        T[t, T_PNS] = ns
        T[t, T_PPH] = phase
        T[t, T_STATE] = V_PREEMPT
        return True
    return False


@njit(cache=True, _nrt=False)
def _delay(E, HP, J, T, t, ns):
    """engine.delay(ns) under fifo or random: True if the caller keeps running (the fast
    path: its key is below the head's, or it is to leave its CPU first: V_PREEMPT)."""
    if _preempt_due(E, T, t, ns, -1):
        return True
    return _delay_now(E, HP, J, t, ns)


@njit(cache=True, _nrt=False)
def _delay_now(E, HP, J, t, ns):
    """engine.delay(ns) past its preemption check."""
    E[E_STEPS] += 1
    target = E[E_NOW] + ns
    key = target + _jitter(E, J)
    if E[E_HN] == 0 or HP[0, 0] > key:
        E[E_NOW] = target
        return True
    _push(E, HP, key, target, t)
    return False


@njit(cache=True, _nrt=False)
def _schedule(E, HP, J, when, t):
    """engine._schedule: runnable at `when` (spawn, wake, a lock's hand-over)."""
    _push(E, HP, when + _jitter(E, J), when, t)


@njit(cache=True, _nrt=False)
def _delay_phase(E, HP, J, T, PS, PH, t, ns, phase):
    """engine.delay(ns, phase)."""
    if _preempt_due(E, T, t, ns, phase):
        return True
    return _delay_phase_now(E, HP, J, T, PS, PH, t, ns, phase)


@njit(cache=True, _nrt=False)
def _delay_phase_now(E, HP, J, T, PS, PH, t, ns, phase):
    _account(E, T, PS, PH, t)
    d = T[t, T_DEPTH] + 1
    T[t, T_DEPTH] = d
    PS[t, d] = phase
    T[t, T_POP] = 1  # popped when the task resumes (at the due time)
    return _delay_now(E, HP, J, t, ns)


@njit(cache=True, _nrt=False)
def _push_phase(E, T, PS, PH, t, phase):
    _account(E, T, PS, PH, t)
    d = T[t, T_DEPTH] + 1
    T[t, T_DEPTH] = d
    PS[t, d] = phase


@njit(cache=True, _nrt=False)
def _pop_phase(E, T, PS, PH, t):
    _account(E, T, PS, PH, t)
    T[t, T_DEPTH] -= 1


@njit(cache=True, _nrt=False)
def _reserve(E, LK, lk, t, cost):
    """CacheLine.reserve of lock lk's line for task t; returns the wait until the line is in
    t's cache."""
    owner = LK[lk, LK_OWNER]
    if owner == -1 or owner == t:
        LK[lk, LK_OWNER] = t
        return 0
    now = E[E_NOW]
    start = LK[lk, LK_FREE] if LK[lk, LK_FREE] > now else now
    LK[lk, LK_FREE] = start + cost[C_HANDOFF]
    LK[lk, LK_WAIT] += start - now
    LK[lk, LK_TRANS] += 1
    LK[lk, LK_OWNER] = t
    return LK[lk, LK_FREE] - now


@njit(cache=True, _nrt=False)
def _grant(LK, T, lk, t, write):
    """_QueuedLock._grant of lock lk to task t (still waiting: no accounting change)."""
    if write:
        LK[lk, LK_WHELD] = 1
        LK[lk, LK_WRITER] = t
    else:
        LK[lk, LK_READERS] += 1
    if LK[lk, LK_ACC]:
        T[t, T_HOLDING] += 1
        T[t, T_ACQ] += 1


@njit(cache=True, _nrt=False)
def _lock(E, HP, J, LK, T, PS, PH, cost, t, lk, write, resume):
    """_QueuedLock._acquire up to its switch point; V_LOCK2/V_LOCK3 go on, then `resume`."""
    T[t, T_LOCKID] = lk
    T[t, T_LOCKW] = write
    T[t, T_RESUME] = resume
    T[t, T_NOPRE] += 1
    if LK[lk, LK_ACC]:
        _account(E, T, PS, PH, t)
        T[t, T_WAITING] += 1
    if lk == LK_MMU:
        op = cost[C_WACQ] if write else cost[C_RACQ]
    else:
        op = cost[C_SPIN_ACQ]
    T[t, T_STATE] = V_LOCK2
    return _delay(E, HP, J, T, t, _reserve(E, LK, lk, t, cost) + op)


@njit(cache=True, _nrt=False)
def _unlock(E, HP, J, LK, T, cost, t, lk, write, resume):
    """_QueuedLock._release up to its switch point; V_UNLOCK2 goes on, then `resume`."""
    T[t, T_LOCKID] = lk
    T[t, T_LOCKW] = write
    T[t, T_RESUME] = resume
    op = cost[C_REL] if lk == LK_MMU else cost[C_SPIN_REL]
    T[t, T_STATE] = V_UNLOCK2
    return _delay(E, HP, J, T, t, _reserve(E, LK, lk, t, cost) + op)


@njit(cache=True, _nrt=False)
def _put_cpu(E, HP, J, T, PS, PH, RQ, t):
    """engine._put_cpu: t leaves its CPU; the run queue's head gets it after a context
    switch (its "runqueue" phase ends now), else the CPU is free."""
    if T[t, T_ONCPU]:
        now = E[E_NOW]
        T[t, T_CPU_NS] += now - T[t, T_CPU_SINCE]
        T[t, T_ONCPU] = 0
        if E[E_RQN]:
            h = E[E_RQH]
            nxt = RQ[h]
            E[E_RQH] = (h + 1) % RQ.shape[0]
            E[E_RQN] -= 1
            _pop_phase(E, T, PS, PH, nxt)
            T[nxt, T_ONCPU] = 1
            T[nxt, T_CPU_SINCE] = now
            T[nxt, T_SLICE] = now
            _schedule(E, HP, J, now + E[E_CSW], nxt)
        else:
            E[E_FREE] += 1


@njit(cache=True, _nrt=False)
def _to_runqueue(E, T, PS, PH, RQ, t):
    """t waits for a CPU at the back of the run queue, in phase "runqueue"."""
    _push_phase(E, T, PS, PH, t, PH_RUNQUEUE)
    RQ[(E[E_RQH] + E[E_RQN]) % RQ.shape[0]] = t
    E[E_RQN] += 1


@njit(cache=True, _nrt=False)
def _block(E, HP, J, T, PS, PH, RQ, t, phase):
    """engine.block(phase): parked until woken, its CPU given up (no spinlock held)."""
    _push_phase(E, T, PS, PH, t, phase)
    T[t, T_POP] = 1
    T[t, T_BLOCKED] = 1
    E[E_STEPS] += 1
    if not T[t, T_NOPRE]:
        _put_cpu(E, HP, J, T, PS, PH, RQ, t)
    return False


@njit(cache=True, _nrt=False)
def _wake(E, HP, J, T, t):
    """engine.wake(t): runnable now if it is parked by block()."""
    if T[t, T_BLOCKED] and not T[t, T_WAITING] and not T[t, T_FINISHED]:
        T[t, T_BLOCKED] = 0
        _schedule(E, HP, J, E[E_NOW], t)


@njit(cache=True, _nrt=False)
def _wake_list(E, HP, J, T, head, link):
    """engine.wake of each task of a list threaded through T[:, link], in order."""
    w = head
    while w >= 0:
        nxt = T[w, link]
        T[w, link] = -1
        _wake(E, HP, J, T, w)
        w = nxt


@njit(cache=True, _nrt=False)
def _hhome(key, m):
    """The home slot of `key`: Fibonacci hashing with the product's high half folded in, since
    the keys (hva page indexes) of vCPUs faulting in step differ only in their high bits."""
    x = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64((x ^ (x >> np.uint64(32))) & np.uint64(m))


@njit(cache=True, _nrt=False)
def _hslot(HK, key):
    """The slot of `key` in the open-addressing table, or the empty slot where it would go."""
    m = HK.shape[0] - 1
    h = _hhome(key, m)
    while HK[h] != -1 and HK[h] != key:
        h = (h + 1) & m
    return h


@njit(cache=True, _nrt=False)
def _hget(HK, HV, key):
    h = _hslot(HK, key)
    return HV[h] if HK[h] == key else -1


@njit(cache=True, _nrt=False)
def _hdel(HK, HV, key):
    """Remove `key` (linear probing's backward-shift deletion: no tombstones)."""
    m = HK.shape[0] - 1
    h = _hslot(HK, key)
    if HK[h] != key:
        return
    j = h
    while True:
        j = (j + 1) & m
        if HK[j] == -1:
            break
        k = _hhome(HK[j], m)
        if (h <= j and h < k <= j) or (h > j and (k > h or k <= j)):
            continue  # its probe sequence does not pass through the hole
        HK[h] = HK[j]
        HV[h] = HV[j]
        h = j
    HK[h] = -1


@njit(cache=True, _nrt=False)
def _uffd_of(U, i):
    """The userfaultfd registered over hva index i, or -1 (a bisection: U rows are sorted)."""
    lo, hi = 0, U.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if U[mid, U_START] <= i:
            lo = mid + 1
        else:
            hi = mid
    k = lo - 1
    if k >= 0 and i < U[k, U_END]:
        return k
    return -1


# --- streamed programs and results (StreamSpec) -----------------------------------------------
G_PAGES, G_WRITES, G_BASE = 0, 1, 2  # gen: pages per vCPU, writes first, then each vCPU's gva
WINDOW = 256  # program rows per vCPU made at a time
(MIS_TASK, MIS_PC, MIS_ROW) = (0, 1, 2)  # MIS rows: vCPU, op, its 3 result words
MIS_SIZE = MIS_ROW + 3
PATTERN_MUL = 0x9E3779B97F4A7C15  # guest.machine.page_patterns
PATTERN_MASK = 0x7FFFFFFFFFFFFFFF


@njit(cache=True, _nrt=False)
def _pattern(gfn):
    """guest.machine.page_patterns of one gfn."""
    g = np.uint64(gfn) + np.uint64(1)
    return np.int64((g * np.uint64(PATTERN_MUL)) & np.uint64(PATTERN_MASK))


@njit(cache=True, _nrt=False)
def _op_at(gen, t, k):
    """vCPU t's op k (demand_paging.Programs): (op, gva, value)."""
    pages = gen[G_PAGES]
    page = k
    op = C.OP_READ
    if gen[G_WRITES]:
        if k < pages:
            op = C.OP_WRITE
        else:
            page = k - pages
    gva = gen[G_BASE + t] + (page << 12)
    return op, gva, _pattern(gva >> 12) if op == C.OP_WRITE else 0


@njit(cache=True, _nrt=False)
def _fill_window(gen, t, base, WP, WR):
    """vCPU t's program rows from op `base` on, and empty result rows."""
    nops = gen[G_PAGES] * (2 if gen[G_WRITES] else 1)
    for j in range(WP.shape[1]):
        for c in range(3):
            WR[t, j, c] = 0
        k = base + j
        if k < nops:
            op, gva, value = _op_at(gen, t, k)
            WP[t, j, 0] = op
            WP[t, j, 1] = gva
            WP[t, j, 2] = value


@njit(cache=True, _nrt=False)
def _fold_results(E, gen, t, base, lo, hi, WR, MIS):
    """Ops [lo, hi) of vCPU t are done: each result the expected one (Programs.
    expected_results: a read gives its page's pattern) is dropped, any other is kept in MIS;
    False when MIS is full."""
    for k in range(lo, hi):
        op, gva, _v = _op_at(gen, t, k)
        want = _pattern(gva >> 12) if op == C.OP_READ else 0
        j = k - base
        if WR[t, j, 0] != want or WR[t, j, 1] != 0 or WR[t, j, 2] != 0:
            n = E[E_NMIS]
            if n >= MIS.shape[0]:
                return False
            MIS[n, MIS_TASK] = t
            MIS[n, MIS_PC] = k
            for c in range(3):
                MIS[n, MIS_ROW + c] = WR[t, j, c]
            E[E_NMIS] = n + 1
    return True


# --- host memory (HostMemory.alloc / free / table for one frame) --------------------------
@njit(cache=True, _nrt=False)
def mem_alloc(mem, free1, tag, mapcount, frame_state, log, purpose):
    """HostMemory.alloc(purpose, 1): the free stack first, else the bump pointer."""
    if mem[M_NFREE1]:
        mem[M_NFREE1] -= 1
        base = free1[mem[M_NFREE1]]
    else:
        base = mem[M_NEXT]
        mem[M_NEXT] = base + 1
    tag[base] = 0
    mapcount[base] = 1
    frame_state[base] = purpose
    mem[M_INUSE + purpose] += 1
    if mem[M_INUSE + purpose] > mem[M_PEAK + purpose]:
        mem[M_PEAK + purpose] = mem[M_INUSE + purpose]
    n = mem[M_LOGN]
    log[n, 0] = LOG_ALLOC
    log[n, 1] = base
    log[n, 2] = purpose
    mem[M_LOGN] = n + 1
    return base


@njit(cache=True, _nrt=False)
def mem_table(mem, free_slots, pt_slot, pfn):
    """HostMemory.table(pfn): give the frame a (zeroed) row of table entries."""
    if pt_slot[pfn] == NO_SLOT:
        mem[M_NSLOTS] -= 1
        pt_slot[pfn] = free_slots[mem[M_NSLOTS]]


@njit(cache=True, _nrt=False)
def mem_free(mem, free1, free_slots, pt, pt_slot, mapcount, frame_state, log, base):
    """HostMemory.free(base) of a one-frame allocation."""
    slot = pt_slot[base]
    if slot != NO_SLOT:
        pt[slot, :] = 0
        pt_slot[base] = NO_SLOT
        free_slots[mem[M_NSLOTS]] = slot
        mem[M_NSLOTS] += 1
    purpose = frame_state[base]
    mapcount[base] = 0
    frame_state[base] = FRAME_FREE
    mem[M_INUSE + purpose] -= 1
    free1[mem[M_NFREE1]] = base
    mem[M_NFREE1] += 1
    n = mem[M_LOGN]
    log[n, 0] = LOG_FREE
    log[n, 1] = base
    log[n, 2] = purpose
    mem[M_LOGN] = n + 1


@njit(cache=True, _nrt=False)
def _max_level(slots, gfn, host_level):
    """vm.max_mapping_level for a slot without dirty logging or write tracking."""
    level = min(host_level, 3)
    k = -1
    for s in range(slots.shape[0]):
        if slots[s, 0] <= gfn < slots[s, 0] + slots[s, 1]:
            k = s
    while level > 1:
        pages = 1 << (9 * (level - 1))
        base = gfn & ~(pages - 1)
        aligned = (slots[k, 0] - (slots[k, 2] >> 12)) % pages == 0
        if aligned and base >= slots[k, 0] and base + pages <= slots[k, 0] + slots[k, 1]:
            return level
        level -= 1
    return 1


def _run_loop(kernel, E, HP, J, T, PS, PH, LK, LQ, RQ, U, MQ, HK, HV, cost, bounds, gen, WP, WR, MIS,
             regs, tlbs,
             xinfos, hwstats, ept_ad, root_levels, slots, hva_base, hva_pfn, hva_level,
             hva_writable, ks, ksu, kg, kstats, mem, free1, free_slots, pt, pt_slot, tag,
             mapcount, frame_state, log, max_steps):
    """Run until every vCPU has finished or `max_steps` more steps have passed (so Python can
    report progress and take a Ctrl-C between calls); returns the number of live tasks."""
    stop = E[E_STEPS] + max_steps
    nochunks = bounds.shape[1] - 1
    while E[E_LIVE] and not E[E_ERROR]:
        t = E[E_CUR]
        if t >= 0:
            E[E_CUR] = -1  # a task paused between two steps continues: no switch
        else:
            # the scheduler: pop the head, resume it at max(now, due) on a CPU
            if E[E_HN] == 0:
                E[E_ERROR] = ERR_DEADLOCK  # engine.Deadlock: live tasks, none scheduled
                E[E_ERROR_TASK] = -1
                return E[E_LIVE]
            row = _pop(E, HP)
            when = HP[row, 2]
            t = HP[row, 3]
            if when > E[E_NOW]:
                E[E_NOW] = when
            if not T[t, T_ONCPU]:
                if not E[E_FREE]:
                    _to_runqueue(E, T, PS, PH, RQ, t)  # every CPU is busy
                    continue
                E[E_FREE] -= 1
                T[t, T_ONCPU] = 1
                T[t, T_CPU_SINCE] = E[E_NOW]
                T[t, T_SLICE] = E[E_NOW]
            T[t, T_STARTED] = 1
            T[t, T_SWITCHES] += 1
        running = True
        while running:
            if E[E_STEPS] >= stop or (E[E_MODE] and E[E_RLIM] - E[E_DRAWN] < J_MARGIN) \
                    or mem[M_LOGN] > log.shape[0] - LOG_MARGIN:
                E[E_CUR] = t  # back to Python (progress, Ctrl-C, more draws) and on
                return E[E_LIVE]
            if T[t, T_POP]:
                T[t, T_POP] = 0
                _pop_phase(E, T, PS, PH, t)
            st = T[t, T_STATE]
            if st == V_LOOP:
                pc = T[t, T_PC]
                if pc >= T[t, T_END]:
                    c = T[t, T_CHUNK] + 1
                    if c >= nochunks:
                        # the task's body returns: it finishes now
                        _account(E, T, PS, PH, t)
                        T[t, T_FINISHED] = 1
                        T[t, T_ENDT] = E[E_NOW]
                        T[t, T_STATE] = V_DONE
                        _put_cpu(E, HP, J, T, PS, PH, RQ, t)
                        E[E_LIVE] -= 1
                        running = False
                        continue
                    T[t, T_CHUNK] = c
                    T[t, T_END] = bounds[t, c + 1]
                    continue
                if ks[t, KS_ROOT] < 0:
                    T[t, T_OP] = K_LOAD
                    ks[t, KS_STATE] = 0
                    T[t, T_STATE] = V_KERNEL
                    continue
                before_ops = hwstats[t, C.ST_OPS]
                before_reads = hwstats[t, C.ST_WALK_READS]
                # One Vcpu.run_ops call of `budget` ops, over the streamed program's window
                # (refilled where it ends: the calls' sum is the one call)
                end = T[t, T_END]
                budget = cost[C_BUDGET]
                while True:
                    base = T[t, T_WBASE]
                    if pc < base or pc >= base + WP.shape[1]:
                        base = pc
                        _fill_window(gen, t, base, WP, WR)
                        T[t, T_WBASE] = base
                    wend = min(end, base + WP.shape[1])
                    npc = base + C.run_ops(
                        WP[t], pc - base, wend - base, WR[t], pt, pt_slot, tag, regs[t], True,
                        ept_ad, ks[t, KS_ROOT], root_levels, tlbs[t], W.NO_PML, xinfos[t],
                        hwstats[t], budget)
                    if not _fold_results(E, gen, t, base, pc, npc, WR, MIS):
                        E[E_ERROR] = ERR_MISMATCHES
                        E[E_ERROR_TASK] = t
                        return E[E_LIVE]
                    budget -= npc - pc
                    pc = npc
                    if xinfos[t, C.XI_KIND] != C.X_NONE or pc >= end or budget <= 0:
                        break
                T[t, T_PC] = pc
                T[t, T_RET] = hwstats[t, C.ST_WALK_READS] - before_reads  # reads, for later
                T[t, T_STATE] = V_AFTER_GUEST
                running = _delay_phase(E, HP, J, T, PS, PH, t,
                                       (hwstats[t, C.ST_OPS] - before_ops) * cost[C_GUEST],
                                       PH_GUEST)
            elif st == V_AFTER_GUEST:
                T[t, T_STATE] = V_AFTER_WALK
                if T[t, T_RET]:
                    running = _delay_phase(E, HP, J, T, PS, PH, t, T[t, T_RET] * cost[C_WALK],
                                           PH_WALK)
            elif st == V_AFTER_WALK:
                kind = xinfos[t, C.XI_KIND]
                if kind == C.X_NONE:
                    T[t, T_STATE] = V_LOOP
                    continue
                if kind != C.X_EPT_VIOLATION:
                    E[E_ERROR] = ERR_EXIT_KIND
                    E[E_ERROR_TASK] = t
                    return E[E_LIVE]
                pc = T[t, T_PC]
                if pc == T[t, T_STUCK_PC]:
                    T[t, T_STUCK] += 1
                    if T[t, T_STUCK] > 1000:
                        E[E_ERROR] = ERR_STUCK
                        E[E_ERROR_TASK] = t
                        return E[E_LIVE]
                else:
                    T[t, T_STUCK_PC] = pc
                    T[t, T_STUCK] = 0
                # Vcpu._fault: the exit, then (no fast path for a non-present fault) the
                # slow path, whose gfn_to_pfn runs in phase "gup"
                T[t, T_EXITS] += 1
                gfn = xinfos[t, C.XI_GPA] >> 12
                ks[t, KS_GFN] = gfn
                ks[t, KS_WRITE] = 1 if xinfos[t, C.XI_CODE] & EPT.EPT_QUAL_WRITE else 0
                k = -1
                for s in range(slots.shape[0]):
                    if slots[s, 0] <= gfn < slots[s, 0] + slots[s, 1]:
                        k = s
                if k < 0:
                    E[E_ERROR] = ERR_NO_SLOT
                    E[E_ERROR_TASK] = t
                    return E[E_LIVE]
                T[t, T_HVAI] = ((slots[k, 2] + ((gfn - slots[k, 0]) << 12)) - hva_base) >> 12
                T[t, T_STATE] = V_GUP1
                running = _delay_phase(E, HP, J, T, PS, PH, t, cost[C_EXIT], PH_EXIT)
            elif st == V_GUP1:
                # after the exit: enter "gup" and charge GUP-fast
                _push_phase(E, T, PS, PH, t, PH_GUP)
                T[t, T_STATE] = V_GUP2
                running = _delay(E, HP, J, T, t, cost[C_GUP])
            elif st == V_GUP2:
                i = T[t, T_HVAI]
                if hva_pfn[i] >= 0 and (not ks[t, KS_WRITE] or hva_writable[i]):
                    T[t, T_STATE] = V_GUP3 + 100  # done with gup, no lock taken
                    continue
                # the slow path under the mmap lock held for read
                T[t, T_LOCKW] = 0
                T[t, T_STATE] = V_FAULTIN
                running = _delay(E, HP, J, T, t, _reserve(E, LK, LK_MMAP, t, cost) + cost[C_RACQ])
            elif st == V_FAULTIN:
                if T[t, T_LOCKW] == 0:
                    # just acquired: RWSem._free_for(read) (no writer in this workload)
                    E[E_SEM_READERS] += 1
                    T[t, T_LOCKW] = 1
                i = T[t, T_HVAI]
                if hva_pfn[i] >= 0:
                    if ks[t, KS_WRITE] and not hva_writable[i]:
                        E[E_ERROR] = ERR_WRITE_PROTECTED
                        E[E_ERROR_TASK] = t
                        return E[E_LIVE]
                    T[t, T_STATE] = V_GUP3
                    running = _delay(E, HP, J, T, t,
                                     _reserve(E, LK, LK_MMAP, t, cost) + cost[C_REL])
                elif U.shape[0] and _uffd_of(U, i) >= 0:
                    # missing in a userfault region: handle_userfault drops the mmap lock
                    T[t, T_UFFD] = _uffd_of(U, i)
                    T[t, T_STATE] = V_UF_REL
                    running = _delay(E, HP, J, T, t,
                                     _reserve(E, LK, LK_MMAP, t, cost) + cost[C_REL])
                else:
                    T[t, T_STATE] = V_FAULTIN2
                    running = _delay(E, HP, J, T, t, cost[C_ALLOC])
            elif st == V_FAULTIN2:
                i = T[t, T_HVAI]
                if hva_pfn[i] < 0:  # HostMM.populate of one 4 KiB page
                    base = mem_alloc(mem, free1, tag, mapcount, frame_state, log, _GUEST_DATA)
                    hva_pfn[i] = base
                    hva_level[i] = 1
                    hva_writable[i] = True
                    mem[M_POP4K] += 1
                T[t, T_STATE] = V_FAULTIN
            elif st == V_UF_REL:
                E[E_SEM_READERS] -= 1
                T[t, T_STATE] = V_UF_W0
            elif st == V_UF_W0:
                # Userfaultfd.wait_for: while the page is missing
                u = T[t, T_UFFD]
                i = T[t, T_HVAI]
                if hva_pfn[i] >= 0:
                    # the page is there: get_user_pages retakes the mmap lock and looks again
                    T[t, T_LOCKW] = 0
                    T[t, T_STATE] = V_FAULTIN
                    running = _delay(E, HP, J, T, t,
                                     _reserve(E, LK, LK_MMAP, t, cost) + cost[C_RACQ])
                else:
                    o = _hget(HK, HV, i)
                    if o < 0:  # a new Completion for the page, this vCPU's
                        h = _hslot(HK, i)
                        HK[h] = i
                        HV[h] = t
                        T[t, T_CDONE] = 0
                        T[t, T_CWH] = -1
                        T[t, T_COMP] = t
                        U[u, U_FAULTS] += 1
                        T[t, T_STATE] = V_UF_W1
                        running = _delay_phase(E, HP, J, T, PS, PH, t, cost[C_NOTIFY],
                                               PH_USERFAULT)
                    else:
                        T[t, T_COMP] = o
                        T[t, T_STATE] = V_UF_WAIT
            elif st == V_UF_W1:
                _push_phase(E, T, PS, PH, t, PH_USERFAULT)
                running = _lock(E, HP, J, LK, T, PS, PH, cost, t, LK_UFFD + T[t, T_UFFD], 1,
                                V_UF_W2)
            elif st == V_UF_W2:
                u = T[t, T_UFFD]
                q = (U[u, U_MQH] + U[u, U_MQN]) % MQ.shape[1]
                MQ[u, q, 0] = T[t, T_HVAI]
                MQ[u, q, 1] = ks[t, KS_WRITE]
                U[u, U_MQN] += 1
                # _wake_pollers: the list is taken whole (off poll() at once), its readers
                # visited, then woken in order
                n = U[u, U_NPOLL]
                T[t, T_WL] = U[u, U_PHEAD]
                w = U[u, U_PHEAD]
                while w >= 0:
                    T[w, T_INPOLL] = 0
                    w = T[w, T_PNEXT]
                U[u, U_PHEAD] = U[u, U_PTAIL] = -1
                U[u, U_NPOLL] = 0
                T[t, T_STATE] = V_UF_W2B
                if n > 1:
                    running = _delay(E, HP, J, T, t, (n - 1) * 2 * cost[C_HANDOFF])
            elif st == V_UF_W2B:
                _wake_list(E, HP, J, T, T[t, T_WL], T_PNEXT)
                running = _unlock(E, HP, J, LK, T, cost, t, LK_UFFD + T[t, T_UFFD], 1,
                                  V_UF_W3)
            elif st == V_UF_W3:
                _pop_phase(E, T, PS, PH, t)
                T[t, T_STATE] = V_UF_WAIT
            elif st == V_UF_WAIT:
                u = T[t, T_UFFD]
                U[u, U_WAITING] += 1
                o = T[t, T_COMP]
                if T[o, T_CDONE]:  # Completion.wait on a completed one: no sleep
                    U[u, U_WAITING] -= 1
                    T[t, T_STATE] = V_UF_W0
                else:
                    T[t, T_WNEXT] = -1
                    if T[o, T_CWH] < 0:
                        T[o, T_CWH] = t
                    else:
                        T[T[o, T_CWT], T_WNEXT] = t
                    T[o, T_CWT] = t
                    T[t, T_STATE] = V_UF_WOKE
                    running = _block(E, HP, J, T, PS, PH, RQ, t, PH_USERFAULT)
            elif st == V_UF_WOKE:
                U[T[t, T_UFFD], U_WAITING] -= 1
                T[t, T_STATE] = V_UF_W0
            elif st == V_GUP3 or st == V_GUP3 + 100:
                if st == V_GUP3:
                    E[E_SEM_READERS] -= 1
                _pop_phase(E, T, PS, PH, t)
                i = T[t, T_HVAI]
                ks[t, KS_PFN] = np.int64(hva_pfn[i])  # 4 bytes in hva_pfn
                ks[t, KS_LEVEL] = _max_level(slots, ks[t, KS_GFN], hva_level[i])
                ks[t, KS_WRITABLE] = 1 if hva_writable[i] else 0
                ks[t, KS_STATE] = 0
                T[t, T_OP] = K_FAULT
                T[t, T_STATE] = V_KERNEL
            elif st == V_KERNEL or st == V_RCU2:
                if st == V_RCU2:
                    E[E_RCU_SEQ] += 1  # rcu_read_lock registers the reader after its delay
                req, arg = kernel(T[t, T_OP], t, ks, ksu, kg, kstats, mem, free1, free_slots,
                                  pt, pt_slot, tag, mapcount, frame_state, log, hva_pfn,
                                  hva_writable)
                T[t, T_STATE] = V_KERNEL
                if req == R_DELAY:
                    running = _delay(E, HP, J, T, t, arg)
                elif req == R_READ:
                    T[t, T_ATOMICS] += 1
                    running = _delay(E, HP, J, T, t, cost[C_ATOMIC_READ])
                elif req == R_CMPXCHG:
                    T[t, T_ATOMICS] += 1
                    running = _delay(E, HP, J, T, t, cost[C_CMPXCHG])
                elif req == R_CMPXCHG_FAILED:
                    T[t, T_CMPXFAIL] += 1
                elif req == R_RLOCK or req == R_WLOCK:
                    running = _lock(E, HP, J, LK, T, PS, PH, cost, t, LK_MMU,
                                    1 if req == R_WLOCK else 0, V_KERNEL)
                elif req == R_RUNLOCK or req == R_WUNLOCK:
                    running = _unlock(E, HP, J, LK, T, cost, t, LK_MMU,
                                      1 if req == R_WUNLOCK else 0, V_KERNEL)
                elif req == R_RCU_LOCK:
                    T[t, T_STATE] = V_RCU2
                    running = _delay(E, HP, J, T, t, cost[C_RCU_LOCK])
                elif req == R_RCU_UNLOCK:
                    running = _delay(E, HP, J, T, t, cost[C_RCU_UNLOCK])
                elif req == R_DONE:
                    if T[t, T_OP] == K_LOAD:
                        T[t, T_STATE] = V_LOOP
                    else:
                        if T[t, T_OUT + arg] == 0:
                            T[t, T_FIRST + arg] = E[E_STEPS]
                        T[t, T_OUT + arg] += 1
                        T[t, T_STATE] = V_ENTRY
                        if arg == 2:  # Ret.RETRY: yield_now(), delay(0) under fifo
                            running = _delay(E, HP, J, T, t, 0)
                else:
                    E[E_ERROR] = ERR_KERNEL
                    E[E_ERROR_TASK] = t
                    return E[E_LIVE]
            elif st == V_LOCK2:
                lk = T[t, T_LOCKID]
                write = T[t, T_LOCKW]
                free = (not LK[lk, LK_WHELD] and LK[lk, LK_QN] == 0
                        and (not write or LK[lk, LK_READERS] == 0))
                T[t, T_STATE] = V_LOCK3
                if free:
                    _grant(LK, T, lk, t, write)
                else:
                    if LK[lk, LK_ACC]:
                        T[t, T_CONT] += 1
                    q = (LK[lk, LK_QH] + LK[lk, LK_QN]) % LQ.shape[1]
                    LQ[lk, q, 0] = t
                    LQ[lk, q, 1] = write
                    LK[lk, LK_QN] += 1
                    E[E_STEPS] += 1  # _park: a step; spinning, it keeps its CPU
                    running = False
            elif st == V_LOCK3:
                if LK[T[t, T_LOCKID], LK_ACC]:
                    _account(E, T, PS, PH, t)
                    T[t, T_WAITING] -= 1
                T[t, T_STATE] = T[t, T_RESUME]
            elif st == V_UNLOCK2:
                lk = T[t, T_LOCKID]
                T[t, T_NOPRE] -= 1
                if LK[lk, LK_ACC]:
                    _account(E, T, PS, PH, t)
                    T[t, T_HOLDING] -= 1
                if T[t, T_LOCKW]:
                    LK[lk, LK_WHELD] = 0
                    LK[lk, LK_WRITER] = -1
                else:
                    LK[lk, LK_READERS] -= 1
                # _hand_over: one writer, or every reader up to the next writer
                while LK[lk, LK_QN] and not LK[lk, LK_WHELD]:
                    h = LK[lk, LK_QH]
                    qt = LQ[lk, h, 0]
                    qw = LQ[lk, h, 1]
                    if qw and LK[lk, LK_READERS]:
                        break
                    LK[lk, LK_QH] = (h + 1) % LQ.shape[1]
                    LK[lk, LK_QN] -= 1
                    after = _reserve(E, LK, lk, qt, cost)
                    _grant(LK, T, lk, qt, qw)
                    _schedule(E, HP, J, E[E_NOW] + after, qt)
                T[t, T_STATE] = T[t, T_RESUME]
            elif st == V_PREEMPT:
                # engine._preempt: the CPU to the run queue's head, this task to its back
                _put_cpu(E, HP, J, T, PS, PH, RQ, t)
                _to_runqueue(E, T, PS, PH, RQ, t)
                T[t, T_STATE] = V_PREEMPTED
                running = False
            elif st == V_PREEMPTED:
                # on a CPU again: the delay it was about to make, without a second check
                T[t, T_STATE] = T[t, T_PSTATE]
                if T[t, T_PPH] >= 0:
                    running = _delay_phase_now(E, HP, J, T, PS, PH, t, T[t, T_PNS],
                                               T[t, T_PPH])
                else:
                    running = _delay_now(E, HP, J, t, T[t, T_PNS])
            elif st == V_ENTRY:
                T[t, T_STATE] = V_ENTRY2
                running = _delay_phase(E, HP, J, T, PS, PH, t, cost[C_ENTRY], PH_EXIT)
            elif st == V_ENTRY2:
                T[t, T_STATE] = V_LOOP
            # --- a userfault handler (machine._uffd_handler) ------------------------------
            elif st == H_READ:
                T[t, T_WOKEN] = 0
                T[t, T_STATE] = H_LOOP
            elif st == H_LOOP:
                running = _lock(E, HP, J, LK, T, PS, PH, cost, t, LK_UFFD + T[t, T_UFFD], 1,
                                H_HELD)
            elif st == H_HELD:
                u = T[t, T_UFFD]
                if U[u, U_MQN]:
                    T[t, T_MSG] = MQ[u, U[u, U_MQH], 0]
                    U[u, U_MQH] = (U[u, U_MQH] + 1) % MQ.shape[1]
                    U[u, U_MQN] -= 1
                    running = _unlock(E, HP, J, LK, T, cost, t, LK_UFFD + u, 1, H_GOT)
                else:
                    if T[t, T_WOKEN]:
                        U[u, U_EMPTY] += 1
                    T[t, T_PNEXT] = -1  # on fd_wqh, at the back
                    T[t, T_INPOLL] = 1
                    if U[u, U_PHEAD] < 0:
                        U[u, U_PHEAD] = t
                    else:
                        T[U[u, U_PTAIL], T_PNEXT] = t
                    U[u, U_PTAIL] = t
                    U[u, U_NPOLL] += 1
                    running = _unlock(E, HP, J, LK, T, cost, t, LK_UFFD + u, 1, H_POLL)
            elif st == H_POLL:
                if T[t, T_INPOLL]:
                    T[t, T_STATE] = H_POLLED
                    running = _block(E, HP, J, T, PS, PH, RQ, t, PH_UFFD_WAIT)
                else:
                    T[t, T_WOKEN] = 1
                    T[t, T_STATE] = H_LOOP
            elif st == H_POLLED:
                T[t, T_WOKEN] = 1
                T[t, T_STATE] = H_LOOP
            elif st == H_GOT:
                T[t, T_STATE] = H_COPY
                if cost[C_UDELAY]:
                    running = _delay_phase(E, HP, J, T, PS, PH, t, cost[C_UDELAY],
                                           PH_UFFD_DELAY)
            elif st == H_COPY:
                # Userfaultfd.copy: UFFDIO_COPY under the mmap lock held for read
                _push_phase(E, T, PS, PH, t, PH_UFFD_COPY)
                T[t, T_STATE] = H_COPY2
                running = _delay(E, HP, J, T, t, _reserve(E, LK, LK_MMAP, t, cost) + cost[C_RACQ])
            elif st == H_COPY2:
                E[E_SEM_READERS] += 1
                T[t, T_STATE] = H_COPY3
                running = _delay(E, HP, J, T, t, cost[C_UCOPY])
            elif st == H_COPY3:
                T[t, T_STATE] = H_COPY4
                running = _delay(E, HP, J, T, t, _reserve(E, LK, LK_MMAP, t, cost) + cost[C_REL])
            elif st == H_COPY4:
                E[E_SEM_READERS] -= 1
                _pop_phase(E, T, PS, PH, t)
                u = T[t, T_UFFD]
                i = T[t, T_MSG]
                if hva_pfn[i] < 0:
                    base = mem_alloc(mem, free1, tag, mapcount, frame_state, log, _GUEST_DATA)
                    hva_pfn[i] = base
                    hva_level[i] = 1
                    hva_writable[i] = True
                    mem[M_POP4K] += 1
                    g = np.uint64(cost[C_DATA_GFN] + (i - cost[C_DATA_HVAI]) + 1)
                    tag[base] = (g * np.uint64(0x9E3779B97F4A7C15)) \
                        & np.uint64(0x7FFFFFFFFFFFFFFF)
                    U[u, U_COPIES] += 1
                _push_phase(E, T, PS, PH, t, PH_UFFD_COPY)
                running = _lock(E, HP, J, LK, T, PS, PH, cost, t, LK_UFFD + u, 1, H_COPY5)
            elif st == H_COPY5:
                u = T[t, T_UFFD]
                T[t, T_STATE] = H_COPY6
                if U[u, U_WAITING] > 1:
                    running = _delay(E, HP, J, T, t, (U[u, U_WAITING] - 1) * cost[C_HANDOFF])
            elif st == H_COPY6:
                u = T[t, T_UFFD]
                o = _hget(HK, HV, T[t, T_MSG])
                if o >= 0:  # _pending.pop(page).complete(): its waiters run now
                    _hdel(HK, HV, T[t, T_MSG])
                    T[o, T_CDONE] = 1
                    w = T[o, T_CWH]
                    T[o, T_CWH] = -1
                    _wake_list(E, HP, J, T, w, T_WNEXT)
                running = _unlock(E, HP, J, LK, T, cost, t, LK_UFFD + u, 1, H_COPY7)
            elif st == H_COPY7:
                _pop_phase(E, T, PS, PH, t)
                T[t, T_STATE] = H_READ
    return E[E_LIVE]


_LOOP_MODULES: dict = {}


def run_loop(kernel, *args):
    """`_run_loop` with this kernel (see _loop_module)."""
    fn = kernel.py_func
    module = None
    if "." not in fn.__qualname__ and fn.__module__ != "__main__":
        try:
            module = _loop_module(kernel)
        except (OSError, ImportError):
            pass  # the cache directory is not writable, or the kernel's module not importable
    if module is None:
        # not importable by name (defined in a function, or in a script): compiled in this
        # process with the kernel as an argument, not cached
        loop = _LOOP_MODULES.get(None)
        if loop is None:
            loop = _LOOP_MODULES[None] = njit(_nrt=False)(_run_loop)
        return loop(kernel, *args)
    return module.run_loop(*args)


def _loop_module(kernel):
    """A module whose `run_loop` is `_run_loop` with `kernel` bound as a global.

    Passed as an argument, the kernel made numba specialise the loop on its dispatcher's type,
    which the on-disk cache cannot key: every process compiled the loop afresh (about 5 s,
    most of a small run's time). Typed as a first-class function instead it caches, but every
    kernel call then goes through numba's C wrapper, 10-20% slower per fault. So each
    backend's loop is written out as a module of its own (under numba's cache directory,
    which is keyed by the core's sources) that imports its kernel by name: numba caches it like
    any jitted function, and the kernel is called directly. The file's name carries a hash of
    the loop's source and of every file of the kernel's package, so that a changed kernel
    gets a new loop rather than stale machine code that may have inlined the old one.
    """
    fn = kernel.py_func
    key = (fn.__module__, fn.__qualname__)
    module = _LOOP_MODULES.get(key)
    if module is not None:
        return module
    import hashlib
    import importlib.util
    import os
    import sys
    import tempfile
    from pathlib import Path

    import numba

    body = inspect.getsource(_run_loop)
    assert body.startswith("def _run_loop(kernel, ")
    body = "def run_loop(" + body[len("def _run_loop(kernel, "):]
    digest = hashlib.sha256(body.encode())
    source = getattr(importlib.import_module(fn.__module__), "__file__", None)
    if source is None:
        raise ImportError(f"{fn.__module__} has no source file")
    package = Path(source).parent
    for path in sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())
    name = f"mmu_loop_{fn.__module__.replace('.', '_')}_{fn.__name__}_{digest.hexdigest()[:16]}"
    directory = Path(numba.config.CACHE_DIR or tempfile.gettempdir()) / "mmu_loops"
    path = directory / f"{name}.py"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        text = (f'"""The compiled demand-paging loop with {fn.__module__}.{fn.__qualname__} '
                f'as its kernel: written by\nmmu_core.sim.fastloop._loop_module; do not '
                f'edit."""\n\n'
                f"from numba import njit\n\n"
                f"from mmu_core.sim import fastloop as _fastloop\n"
                f"from {fn.__module__} import {fn.__qualname__} as kernel\n\n"
                f"globals().update((k, v) for k, v in vars(_fastloop).items()\n"
                f"                 if not k.startswith('__') and k != 'run_loop')\n\n\n"
                f"@njit(cache=True, _nrt=False)\n{body}")
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)  # atomic: a concurrent process writes the same text
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # numba's cache finds the loop's globals by module name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _LOOP_MODULES[key] = module
    return module


# --- the Python side: which runs it can take, and running one ---------------------------------
#: steps per call of run_loop: Python reports progress and sees a Ctrl-C between calls (about 0.1 s)
SLICE_STEPS = 100_000


@dataclass(frozen=True)
class StreamSpec:
    """The demand-paging programs as the loop makes them (demand_paging.Programs): vCPU i's
    region starts at gva `bases[i]` and has `pages` pages; with `writes` it writes each page's
    pattern then reads them all, else it only reads. `expected(i)` gives vCPU i's results
    when every access does what it should."""

    bases: np.ndarray
    pages: int
    writes: bool
    expected: Callable[[int], np.ndarray]


class PerVcpu(Sequence):
    """A sequence of one array per vCPU, each made when asked for (`_make(i)`), so that
    nothing holds them all at once."""

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self._n))]
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._make(i)

    def _make(self, i: int) -> np.ndarray:
        raise NotImplementedError


class StreamedResults(PerVcpu):
    """The vCPUs' results of a streamed run, each made when asked for: the expected results
    with the unexpected ones the loop kept (rows vCPU, op, result words) in their places."""

    def __init__(self, expected: Callable[[int], np.ndarray], kept: np.ndarray, n: int) -> None:
        super().__init__(n)
        self._expected = expected
        self._kept = kept

    def _make(self, i: int) -> np.ndarray:
        res = self._expected(i)
        for row in self._kept[self._kept[:, MIS_TASK] == i]:
            res[row[MIS_PC]] = row[MIS_ROW:MIS_ROW + 3]
        return res


def kernels_of(vm):
    """The backend's compiled kernels (the mmu_compiled_kernels hook), or None."""
    if not vm.hook.mmu_compiled_kernels.get_hookimpls():
        return None
    return vm.hook.mmu_compiled_kernels(vm=vm)


def unsupported(vm, kernels) -> str | None:
    """None if the compiled loop can run the demand-paging programs about to be spawned in
    `vm` exactly as the exact engine would; otherwise why not (docs/fastloop.md, Status)."""
    engine = vm.engine
    if kernels is None:
        return f"backend '{vm.backend_name}' offers no compiled kernels"
    if engine.policy not in ("fifo", "random"):
        return f"policy {engine.policy} (the compiled loop runs fifo and random)"
    mm = vm.mm
    handlers = _handlers(vm)
    if engine._runqueue or engine._free_cpus != (engine.host_cpus or engine._free_cpus):
        return "a host CPU is taken or a task waits for one"
    if engine.trace_enabled or engine.step_hook is not None or vm.recorder is not None:
        return "the run is traced, audited between steps or recorded"
    if engine.__dict__ or any(getattr(type(engine), name) is not fn
                              for name, fn in SWITCH_PRIMITIVES.items()):
        # a primitive replaced on the instance or the class (tests wrap delay to interrupt a
        # run at a chosen switch point)
        return "the engine's primitives are instrumented"
    if mm.mmap_lock is None:
        return "no mmap lock"
    uffds = _uffds(vm)
    if ((not handlers or len(handlers) % len(uffds)) if uffds else handlers) \
            or any(t.started for t in engine.tasks) \
            or len(engine.tasks) != len(handlers) or len(engine._queue) != len(handlers):
        return "userfaultfd readers other than Machine.spawn_uffd_handlers's, or other tasks"
    if any(u._msgs or u._pollers or u._pending or u._waiting for u in uffds):
        return "a userfaultfd with messages, readers or faults pending"
    if any(r.backing.level != 1 for r in mm.regions):
        return "THP or hugetlb backing (not compiled yet)"
    if mm.hva_swapped.any():
        return "swapped-out pages"
    if len(vm.memslots) > 1 and vm.memslots[1].slots:
        return "SMM memslots"
    for slot in vm.memslots[0].slots:
        if slot.readonly or slot.log_dirty or slot.invalid:
            return "a read-only, dirty-logged or changing memslot"
    if any(vm._tracked[0].values()):
        return "write-tracked gfns"
    for v in vm.vcpus:
        if v.requests or v.l2 is not None or v.smm or v.mmu_root is not None:
            return "a vCPU in L2, in SMM, with requests pending or a root loaded"
    if engine.closed:
        return "the engine is closed"
    for line in _lines(vm):
        if line.owner is not None:
            return "a lock's line was last touched by a task"
    if vm.mmu_lock.readers or vm.mmu_lock.write_held or mm.mmap_lock.readers \
            or mm.mmap_lock.writer:
        return "a lock is held"
    if mutants.active():
        return "a mutant is active (the kernels implement the fixed code only)"
    return kernels.unsupported(vm)


def _handlers(vm) -> list:
    """The userfault handler tasks spawned for the run (daemons, not started), in the order
    of the userfaultfds they serve (Machine.spawn_uffd_handlers: one per uffd)."""
    return [t for t in vm.engine.tasks if t.daemon and t.name.startswith("uffd")]


def _uffds(vm) -> list:
    return [u for _start, _end, u in vm.mm._uffds]


def _lines(vm) -> list:
    """The cache lines of the LK rows: the MMU lock, the mmap lock, each uffd's queue lock."""
    return [vm.mmu_lock.line, vm.mm.mmap_lock.line] + [u.wqh.line for u in _uffds(vm)]


def _cost_array(vm, uffd_delay_ns: int = 0) -> np.ndarray:
    c = vm.engine.cost
    cost = np.zeros(C_SIZE, dtype=np.int64)
    cost[C_GUEST] = c.guest_access
    cost[C_WALK] = c.walk_level
    cost[C_EXIT] = c.vm_exit
    cost[C_ENTRY] = c.vm_entry
    cost[C_HANDOFF] = c.lock_handoff
    cost[C_RACQ] = c.rwlock_read_acquire
    cost[C_WACQ] = c.rwlock_write_acquire
    cost[C_REL] = c.rwlock_release
    cost[C_ATOMIC_READ] = c.atomic_read
    cost[C_CMPXCHG] = c.cmpxchg
    cost[C_RCU_LOCK] = c.rcu_read_lock
    cost[C_RCU_UNLOCK] = c.rcu_read_unlock
    cost[C_GUP] = c.gup_present
    cost[C_ALLOC] = c.host_page_alloc
    cost[C_BUDGET] = max(1, c.quantum // max(1, c.guest_access))
    cost[C_SPIN_ACQ] = c.spin_acquire
    cost[C_SPIN_REL] = c.spin_release
    cost[C_NOTIFY] = c.uffd_notify
    cost[C_UCOPY] = c.uffd_copy  # one 4 KiB page per UFFDIO_COPY (4 KiB backing)
    cost[C_UDELAY] = uffd_delay_ns
    from mmu_core.guest.machine import DATA_GPA

    data = vm.memslots[0].find(DATA_GPA >> 12)
    if data is not None:
        cost[C_DATA_GFN] = data.base_gfn
        cost[C_DATA_HVAI] = vm.mm.index(data.userspace_addr)
    return cost


@njit(cache=True, _nrt=False)
def _apply_log(order, log, n):
    """The allocator's orders after the loop's allocations and frees of single frames, in
    the order they happened (HostMemory.order: 0 at a one-frame allocation, -1 once freed)."""
    for i in range(n):
        order[log[i, 1]] = 0 if log[i, 0] == LOG_ALLOC else -1


class _Memory:
    """The host memory's arrays, grown up front so the loop never reallocates, and the
    allocator's Python bookkeeping replayed from the loop's log afterwards."""

    def __init__(self, host, frames: int, tables: int) -> None:
        self.host = host
        host._grow(host._next_pfn + frames + 1)
        n = len(host.pt)
        rows = n
        while rows - n + len(host._free_slots) < tables:
            rows *= 2
        if rows > n:
            grown = np.zeros((rows, host.pt.shape[1]), dtype=np.uint64)
            grown[:n] = host.pt
            host.pt = grown
        # pops take the old free rows first, then n, n + 1, ... as doubling would hand out
        stack = list(range(rows - 1, n - 1, -1)) + host._free_slots
        self.free_slots = np.zeros(rows, dtype=np.int64)
        self.free_slots[:len(stack)] = stack
        old_free = host._free.get(1, [])
        self.free1 = np.zeros(len(old_free) + tables + 1, dtype=np.int64)
        self.free1[:len(old_free)] = old_free
        # replayed and emptied between slices (flush_log), so it holds one slice's
        self.log = np.zeros((LOG_ROWS, 3), dtype=np.int64)
        self.mem = np.zeros(M_SIZE, dtype=np.int64)
        self.mem[M_NEXT] = host._next_pfn
        self.mem[M_NFREE1] = len(old_free)
        self.mem[M_NSLOTS] = len(stack)
        k = len(host.frames_in_use)
        self.mem[M_INUSE:M_INUSE + k] = host.frames_in_use
        self.mem[M_PEAK:M_PEAK + k] = host.frames_peak

    def args(self):
        h = self.host
        return (self.mem, self.free1, self.free_slots, h.pt, h.pt_slot, h.tag, h.mapcount,
                h.frame_state, self.log)

    def flush_log(self) -> None:
        """Replay the log's allocations and frees into HostMemory.order, in order, and
        empty it (nothing reads the orders during the loop)."""
        h, mem = self.host, self.mem
        n = int(mem[M_LOGN])
        if n:
            _apply_log(h.order, self.log, n)
            if (self.log[:n, 0] == LOG_ALLOC).any():
                h._sizes.add(1)
        mem[M_LOGN] = 0

    def write_back(self) -> int:
        self.flush_log()
        h, mem = self.host, self.mem
        h._next_pfn = int(mem[M_NEXT])
        nfree = int(mem[M_NFREE1])
        if nfree or 1 in h._free:
            h._free[1] = self.free1[:nfree].tolist()
        h._free_slots = self.free_slots[:int(mem[M_NSLOTS])].tolist()
        k = len(h.frames_in_use)
        h.frames_in_use[:] = mem[M_INUSE:M_INUSE + k]
        h.frames_peak[:] = mem[M_PEAK:M_PEAK + k]
        return int(mem[M_POP4K])


class _Draws:
    """random: the schedule's draws, taken from the engine's own stream in order and handed
    to the loop as jitter offsets in a ring; afterwards the stream is left exactly as far
    along as the draws the loop consumed (settle), as if the exact engine had run."""

    SIZE = 1 << 20

    def __init__(self, engine, Ea) -> None:
        self.rng = engine._sched_rng
        self.span = engine._jitter_span
        self.Ea = Ea
        self.on = engine.policy == "random"
        Ea[E_MODE] = 1 if self.on else 0
        self.ring = np.zeros(self.SIZE if self.on else 1, dtype=np.int64)
        self.checkpoints: list[tuple[int, object]] = []  # (absolute draw index, rng state)

    def refill(self) -> None:
        """Top the ring up to SIZE draws ahead of the loop."""
        if not self.on:
            return
        Ea = self.Ea
        lim, drawn = int(Ea[E_RLIM]), int(Ea[E_DRAWN])
        n = self.SIZE - (lim - drawn)
        if n < self.SIZE // 2:
            return
        self.checkpoints = [c for c in self.checkpoints if c[0] + self.SIZE > drawn]
        self.checkpoints.append((lim, self.rng.getstate()))
        rnd, span = self.rng.random, self.span
        vals = np.fromiter((int(rnd() * span) for _ in range(n)), dtype=np.int64, count=n)
        idx = (np.arange(lim, lim + n) % self.SIZE)
        self.ring[idx] = vals
        Ea[E_RLIM] = lim + n

    def settle(self) -> None:
        """Rewind the stream to just after the last draw the loop consumed."""
        if not self.on:
            return
        drawn = int(self.Ea[E_DRAWN])
        start, state = max((c for c in self.checkpoints if c[0] <= drawn), key=lambda c: c[0])
        self.rng.setstate(state)
        for _ in range(drawn - start):
            self.rng.random()


def run_compiled(vm, kernels, stream: StreamSpec, chunks: int, progress=None,
                 uffd_delay_ns: int = 0) -> tuple[list, StreamedResults]:
    """Run each vCPU's program (as demand_paging's vcpu_body would, in `chunks` calls of
    Vcpu.run) on the compiled loop, then write everything back: SPTEs and host memory are
    the VM's own arrays already; the allocator's bookkeeping, the backend's roots and
    statistics, the vCPUs' TLBs and counters, the engine's clock, the lock lines and one
    finished Task record per vCPU. The programs are made in the loop from `stream`, a
    window at a time, and their results checked as they complete. Returns those tasks and
    the results (made when asked for, from the expected ones and the unexpected ones kept)."""
    from mmu_core.sim.engine import Task
    from mmu_core.vm.vcpu import _OUTCOMES

    engine = vm.engine
    vcpus = vm.vcpus
    nv = len(vcpus)
    now0 = engine.now
    slots = vm.memslots[0].slots
    slot_arr = np.array([(s.base_gfn, s.npages, s.userspace_addr) for s in slots],
                        dtype=np.int64).reshape(-1, 3)
    mm = vm.mm
    missing = int(sum(np.count_nonzero(mm.hva_pfn[mm.index(s.userspace_addr):
                                                  mm.index(s.userspace_addr) + s.npages] < 0)
                      for s in slots))
    pages = int(sum(s.npages for s in slots))
    tables = 2 * (pages // 512) + pages // (1 << 17) + 8 * nv + 64
    memory = _Memory(vm.host, missing + tables, tables)
    kg, kstats = kernels.prepare(vm)

    handlers = _handlers(vm)
    uffds = _uffds(vm)
    nh = len(handlers)
    ntask = nv + nh
    T = np.zeros((ntask, T_SIZE), dtype=np.int64)
    nops = stream.pages * (2 if stream.writes else 1)
    bounds = np.tile(np.linspace(0, nops, chunks + 1).astype(np.int64), (nv, 1))
    T[:nv, T_PC] = bounds[:, 0]
    T[:nv, T_END] = bounds[:, 1]
    T[:, T_MARK] = now0
    T[:, T_START] = now0
    T[:, T_STUCK_PC] = -1
    T[nv:, T_KIND] = 1
    # Machine.spawn_uffd_handlers: for each uffd, its readers (one, or one per vCPU with -a)
    T[nv:, T_UFFD] = np.arange(nh) // max(1, nh // max(1, len(uffds)))
    T[:, T_PNEXT] = T[:, T_WNEXT] = T[:, T_CWH] = -1
    T[nv:, T_STATE] = H_READ
    for k, task in enumerate(handlers):
        T[nv + k, T_MARK] = task._mark
        T[nv + k, T_START] = task.start
    PS = np.zeros((ntask, PSTACK), dtype=np.int64)
    PH = np.zeros((ntask, NPH), dtype=np.int64)
    HP = np.zeros((ntask + 1, 4), dtype=np.int64)
    lines = _lines(vm)
    LK = np.zeros((len(lines), LK_SIZE), dtype=np.int64)
    LK[:, LK_OWNER] = -1
    LK[:, LK_WRITER] = -1
    LK[LK_MMU, LK_ACC] = 1
    for r, line in enumerate(lines):
        LK[r, LK_FREE] = line.free_at
        LK[r, LK_TRANS] = line.transfers
        LK[r, LK_WAIT] = line.wait_ns
    LQ = np.zeros((len(lines), ntask + 1, 2), dtype=np.int64)
    U = np.zeros((len(uffds), U_SIZE), dtype=np.int64)
    MQ = np.zeros((len(uffds), nv + 1, 2), dtype=np.int64)  # a vCPU has one message at most
    HK = np.full(1 << max(4, (4 * ntask).bit_length()), -1, dtype=np.int64)
    HV = np.zeros_like(HK)
    for k, u in enumerate(uffds):
        U[k, U_START] = mm.index(u.start)
        U[k, U_END] = mm.index(u.end)
        U[k, U_PHEAD] = U[k, U_PTAIL] = -1
        U[k, U_FAULTS] = u.faults
        U[k, U_COPIES] = u.copies
        U[k, U_EMPTY] = u.empty_reads
    Ea = np.zeros(E_SIZE, dtype=np.int64)
    Ea[E_NOW] = now0
    Ea[E_SEQ] = engine._seq
    Ea[E_STEPS] = engine.steps
    Ea[E_LIVE] = nv
    Ea[E_RCU_SEQ] = vm.rcu._seq
    Ea[E_CUR] = -1
    Ea[E_FREE] = engine._free_cpus  # (_NO_LIMIT when unlimited)
    Ea[E_SLICE] = engine._slice_ns
    Ea[E_CSW] = engine._switch_ns
    RQ = np.zeros(ntask, dtype=np.int64)  # the run queue, a ring (every task at most once)
    draws = _Draws(engine, Ea)
    J = draws.ring
    draws.refill()
    index = {task: nv + k for k, task in enumerate(handlers)}
    for key, seq, due, task in sorted(engine._queue):  # the handlers, spawned before
        n = int(Ea[E_HN])
        HP[n] = (key, seq, due, index[task])
        Ea[E_HN] = n + 1  # sorted rows are a heap
    engine._queue.clear()
    for t in range(nv):  # spawn order: each vCPU scheduled at now
        _schedule(Ea, HP, J, now0, t)
    ks = np.zeros((nv, KS_SIZE), dtype=np.int64)
    ks[:, KS_ROOT] = -1
    ksu = np.zeros((nv, KSU_SIZE), dtype=np.uint64)
    gen = np.concatenate(([stream.pages, int(stream.writes)], stream.bases)).astype(np.int64)
    WP = np.zeros((nv, WINDOW, 3), dtype=np.int64)
    WR = np.zeros((nv, WINDOW, 3), dtype=np.int64)
    T[:nv, T_WBASE] = -WINDOW  # no window yet
    MIS = np.zeros((1024, MIS_SIZE), dtype=np.int64)
    regs = np.stack([v.regs for v in vcpus])
    tlbs = np.stack([v.tlb for v in vcpus])
    xinfos = np.stack([v.xinfo for v in vcpus])
    hwstats = np.stack([v.hw_stats for v in vcpus])
    cost = _cost_array(vm, uffd_delay_ns)
    from mmu_core.host.mm import HVA_BASE
    from mmu_core.host.userfault import UffdMsg

    done_chunks = 0
    try:
        while Ea[E_LIVE] and not Ea[E_ERROR]:
            draws.refill()
            args = (Ea, HP, J, T, PS, PH, LK, LQ, RQ, U, MQ, HK, HV, cost, bounds, gen, WP,
                    WR, MIS, regs, tlbs, xinfos, hwstats, vm.params.ept_ad,
                    vm.root_levels(vcpus[0]), slot_arr, HVA_BASE, mm.hva_pfn, mm.hva_level,
                    mm.hva_writable, ks, ksu, kg, kstats, *memory.args(), SLICE_STEPS)
            run_loop(kernels.kernel, *args)
            memory.flush_log()
            if progress is not None:
                now_done = int(T[:, T_CHUNK].sum() + T[:, T_FINISHED].sum())
                for k in range(done_chunks + 1, now_done + 1):
                    progress(k, nv * chunks)
                done_chunks = now_done
    finally:
        mm.stats.populated_4k += memory.write_back()
        kernels.finish(vm, kg, kstats)
        for i, v in enumerate(vcpus):
            if ks[i, KS_ROOT] >= 0:
                v.mmu_root = int(ks[i, KS_ROOT])
    if Ea[E_ERROR]:
        from mmu_core.errors import BackendError

        who = f", vcpu{int(Ea[E_ERROR_TASK])}" if Ea[E_ERROR_TASK] >= 0 else ""
        raise BackendError(f"compiled loop{who}: "
                           f"{ERROR_TEXT.get(int(Ea[E_ERROR]), 'error')}")
    for i, v in enumerate(vcpus):
        v.tlb[:] = tlbs[i]
        v.xinfo[:] = xinfos[i]
        v.hw_stats[:] = hwstats[i]
        if T[i, T_EXITS]:
            v.exits["ept_violation"] = v.exits.get("ept_violation", 0) + int(T[i, T_EXITS])
        # outcomes in the order the vCPU first saw them, as its dict would have them
        for r in sorted((r for r in range(NOUT) if T[i, T_OUT + r]),
                        key=lambda r: T[i, T_FIRST + r]):
            name = _OUTCOMES[r]
            v.faults[name] = v.faults.get(name, 0) + int(T[i, T_OUT + r])
    draws.settle()
    engine.now = int(Ea[E_NOW])
    engine._seq = int(Ea[E_SEQ])
    engine.steps = int(Ea[E_STEPS])
    vm.rcu._seq = int(Ea[E_RCU_SEQ])
    tasks = []
    for i, v in enumerate(vcpus):
        task = Task(engine, f"vcpu{v.id}", len(engine.tasks), False)
        task.finished = True
        task.end = int(T[i, T_ENDT])
        engine.tasks.append(task)
        tasks.append(task)
        v.task = task
    everyone = tasks + handlers
    for i, task in enumerate(everyone):
        task.started = bool(T[i, T_STARTED]) or task.started
        task.start = int(T[i, T_START])
        task._mark = int(T[i, T_MARK])
        task._stack = [PHASE_NAMES[p] for p in PS[i, :int(T[i, T_DEPTH]) + 1]]
        task._phases = {PHASE_NAMES[p]: int(PH[i, p]) for p in range(NPH) if PH[i, p]}
        task.lock_wait = int(T[i, T_LOCK_WAIT])
        task.lock_held = int(T[i, T_LOCK_HELD])
        task.switches = int(T[i, T_SWITCHES])
        task.lock_acquires = int(T[i, T_ACQ])
        task.lock_contended = int(T[i, T_CONT])
        task.atomics = int(T[i, T_ATOMICS])
        task.cmpxchg_failures = int(T[i, T_CMPXFAIL])
        task.on_cpu = bool(T[i, T_ONCPU])
        task.cpu_since = int(T[i, T_CPU_SINCE])
        task.slice_start = int(T[i, T_SLICE])
        task.cpu_ns = int(T[i, T_CPU_NS])
        task.nopreempt = int(T[i, T_NOPRE])
        task.blocked = "uffd_wait" if T[i, T_BLOCKED] and i >= nv else None
    for n in range(int(Ea[E_HN])):  # handlers still due when the last vCPU finished
        key, seq, due, t = (int(x) for x in HP[n])
        engine._queue.append((key, seq, due, everyone[t]))
    heapq.heapify(engine._queue)
    engine._free_cpus = int(Ea[E_FREE])
    for k in range(int(Ea[E_RQN])):  # tasks still waiting for a CPU (handlers)
        engine._runqueue.append(everyone[int(RQ[(Ea[E_RQH] + k) % ntask])])
    for k, u in enumerate(uffds):
        u.faults = int(U[k, U_FAULTS])
        u.copies = int(U[k, U_COPIES])
        u.empty_reads = int(U[k, U_EMPTY])
        u._waiting = int(U[k, U_WAITING])
        pollers, w = [], int(U[k, U_PHEAD])
        while w >= 0:
            pollers.append(everyone[w])
            w = int(T[w, T_PNEXT])
        u._pollers = pollers
        u._msgs.clear()
        for q in range(int(U[k, U_MQN])):
            i, write = MQ[k, (U[k, U_MQH] + q) % MQ.shape[1]]
            u._msgs.append(UffdMsg(HVA_BASE + (int(i) << 12), bool(write)))
    for r, line in enumerate(lines):
        owner = int(LK[r, LK_OWNER])
        line.owner = everyone[owner] if owner >= 0 else None
        line.free_at = int(LK[r, LK_FREE])
        line.transfers = int(LK[r, LK_TRANS])
        line.wait_ns = int(LK[r, LK_WAIT])
    return tasks, StreamedResults(stream.expected, MIS[:int(Ea[E_NMIS])].copy(), nv)
