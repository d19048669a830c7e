"""The discrete-event kernel: one Numba function over flat arrays.

Model (message level, cut-through):
- A message of S serialisation cycles crossing links l_1..l_h, injected at t0: its head takes
  link l_i at s_i = max(head arrival, free_at[l_i]), holds it for S cycles
  (free_at[l_i] = s_i + S), and reaches the next router hop_latency cycles later. It is
  delivered at the end of link l_i at s_i + hop_latency + S (tail received). Uncontended:
  t0 + h * hop_latency + S.
- Each hop is one event at the cycle its head reaches the link, so links are granted
  first-come first-served in simulated time. Requests for one link in the same cycle are
  granted in a fixed order of the router's input ports, as a fixed-priority arbiter would:
  messages arriving along direction 0 (east), 1 (west), 2 (north), 3 (south), then the core's
  own (INJECT). Two requests of one port in one cycle came through the same upstream link (or
  from the same core) and keep that link's (the core's) order. So the result depends on
  nothing but the program and the target, not on the order in which the simulator happens to
  take a cycle's events (which a kernel split over threads could not keep).
- The events of one cycle are taken in rounds: events queued for the current cycle while it
  runs (zero-latency hops, zero-overhead sends) wait for the next round of that cycle.
- Cores run their instruction streams in order. COMPUTE takes its precomputed cycles plus a
  fixed overhead. SEND
  costs send_overhead cycles, then injects. RECV waits for its delivery, then costs
  recv_overhead cycles. A core is run inline from the moment it can proceed until it blocks on
  a delivery that has not been resolved yet; this is exact because a delivery's time never
  depends on when the receiver asks for it.
The plain-SimPy twin in wafersim/reference.py follows the same steps and must agree exactly.

Data layout (built by `wafersim.simulate.kernel_args`), chosen so that one hop event touches
few cache lines and the kernel's memory grows with instructions, receives and messages in
flight, not with route entries:
- `code` (int32 words): each core's instructions, in order, from word code_ptr[c]. The first
  word of an instruction holds its kind in the low 2 bits and an operand above them: COMPUTE's
  work cycles, RECV's delivery slot, SEND's hop count. A SEND carries its message inline in 5
  more words (first route entry; serialisation cycles, -1 - cycles if multicast; delivery;
  first link; route shape), so running a core reads its own words only.
- Routes: a route of at most two straight runs (dimension-ordered routing makes only those)
  is stepped arithmetically from its first link, its length and the entry where it turns
  (shape = hops before the turn << 2 | direction after it), so hops read no per-entry array;
  any other route (shape -1) is read link by link from `route_link`.
- Delivery slots: one per route entry that some RECV names, numbered in the order the cores'
  RECVs name them (so a core's receives use neighbouring slots). A unicast message delivers
  at its last entry only: its SEND's delivery word is that entry's slot (-1: nobody receives
  it). A multicast message delivers at every entry: its delivery word is d such that
  mc_slot[e + d] is entry e's slot (-1: none). A slot's state is one int64: EMPTY, the arrival
  time of a delivery not yet consumed (>= 0), or a blocked core c (-2 - c).
- A pending hop event is one row of 8 int32 (route entry, last entry, serialisation cycles, delivery
  word, link, turn entry, direction after the turn | input port << 2, next). Events of the next
  NEAR (256) cycles are rows of contiguous per-cycle, per-port arrays in push order ("near
  buckets", NEAR_ROWS rows each, then an overflow list), taken port by port, which is the grant
  order above at no cost per event beyond the bucket's index; the hop loop reads its events in
  sequence and can look ahead. NEAR covers
  nearly every hop queued behind a busy link and many SENDs (a core sends when its compute is done,
  often tens of cycles ahead): a far bucket's rows, linked in a list, missed the cache when copied
  into their near bucket (a fifth of the run time at 8 cycles); untouched rows of the near arrays
  are never backed by memory. Events further ahead are rows of a pool in per-cycle lists ("far
  buckets", up to WINDOW cycles ahead) or in the overflow heap beyond; a far bucket becomes a near
  bucket when its cycle comes within NEAR cycles. Freed pool rows are reused first (a free list).
  The pool and the heap are sized for every SEND the program runs (`max_pending`, an upper bound on
  messages in flight) but allocated uninitialised, so only rows in use are backed by memory: no
  program runs out of rows, and memory follows messages in flight. (Arrays are never reallocated
  inside the kernel: Numba reference-counts a reassigned array at every use, which cost 10% of the
  run time.)
- Per-core state is one row of 8 int64 (time, wait, busy, pc, stop, end, loop start, loop-backs
  left) on one cache line, so resuming a core reads one line of state.
- The hop loop prefetches what the events after the next will touch (their links, slots,
  receiving cores' rows and code), so the cache misses of unrelated hops overlap. (Prefetching a
  hop's lines when it is queued, a cycle and hundreds of events earlier, was wasted: the lines
  were gone again when it ran.)
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

WINDOW = 1 << 16  # cycles covered by the calendar queue's buckets
MASK = WINDOW - 1
COMPUTE, SEND, RECV = 0, 1, 2  # mirrors compiler.program; the kernel imports nothing
OK, DEADLOCK, WATCHDOG, OVERRUN, FULL, ABORTED = 0, 1, 2, 3, 4, 5
KIND_BITS = 2
SEND_WORDS = 6  # a SEND's words in `code`
MAX_OPERAND = (1 << (31 - KIND_BITS)) - 1  # largest operand of an instruction word

EMPTY = -1  # slot state: nothing delivered, nobody waiting

# per-core state columns
C_TIME, C_WAIT, C_BUSY, C_PC, C_STOP, C_END, C_LSTART, C_LEFT = range(8)
# event rows (near buckets and pool): route entry, last entry of the message, serialisation
# cycles (-1 - cycles if multicast), delivery word, link, entry where the route turns (-1: read
# the links from route_link), direction after the turn, next row (pool rows in lists)
R_ENTRY, R_LAST, R_SER, R_DELIVERY, R_LINK, R_TURN, R_DIR2, R_NEXT = range(8)
R_WIDTH = 8
NEAR = 256  # cycles of near buckets (a power of two)
NMASK = NEAR - 1
NEAR_ROWS = 1 << 13  # rows of a near bucket's array; more events overflow to a list
NPORT = 5  # router input ports: arriving along direction 0-3, and the core's own (INJECT)
INJECT = 4
NEVER = np.iinfo(np.int64).max  # the next event time of a partition with none
SYNC_ABORT = 12  # set when a partition's thread failed: the others leave their barrier
SYNC_ROWS = 16  # sync: the barrier's counter and sense on their own cache lines, then
SYNC_WIDTH = 4  # per round parity and partition: next event time, events, status
MAILBOX_ROWS = 1 << 22  # at most this many events a round from one partition to another
LOOKAHEAD = 4  # events ahead whose receiving core's row is prefetched (its code: 2 ahead)


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch arr[idx]'s cache line (LLVM's prefetch: read, high locality).
    The address is not checked and never read, so any index is harmless. 1-d arrays only."""
    if not isinstance(arr, types.Array) or arr.ndim != 1:
        return None
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]],
                                       wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


def _item_pointer(context, builder, signature, args):
    aryty = signature.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)


@intrinsic
def _atomic_add(typingctx, arr, idx, val):
    """arr[idx] += val atomically (sequentially consistent); returns the old value."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype != types.int64:
        return None

    def codegen(context, builder, signature, args):
        val = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", _item_pointer(context, builder, signature, args), val,
                                  "seq_cst")

    return types.int64(arr, idx, val), codegen


@intrinsic
def _atomic_load(typingctx, arr, idx):
    """arr[idx], read atomically (sequentially consistent)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_item_pointer(context, builder, signature, args), "seq_cst",
                                   8)

    return types.int64(arr, idx), codegen


@intrinsic
def _atomic_store(typingctx, arr, idx, val):
    """arr[idx] = val, written atomically (sequentially consistent)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or arr.dtype != types.int64:
        return None

    def codegen(context, builder, signature, args):
        val = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(val, _item_pointer(context, builder, signature, args), "seq_cst", 8)
        return context.get_dummy_value()

    return types.void(arr, idx, val), codegen


@intrinsic
def _yield_cpu(typingctx):
    """sched_yield(): give the core away while waiting (when there are more threads than
    cores, a waiter spinning through its time slice would hold up the thread it waits for)."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        builder.call(cgutils.get_or_insert_function(builder.module, fnty, "sched_yield"), [])
        return context.get_dummy_value()

    return types.void(), codegen


@numba.njit(cache=True, nogil=True)
def _barrier(sync, n_parts, sense):
    """Wait until all n_parts partitions have come (a sense-reversing barrier); returns the
    partition's new sense."""
    sense = 1 - sense
    if _atomic_add(sync, 0, 1) == n_parts - 1:
        _atomic_store(sync, 0, 0)
        _atomic_store(sync, 8, sense)
    else:
        spins = 0
        while _atomic_load(sync, 8) != sense:
            if _atomic_load(sync, SYNC_ABORT) != 0:
                return -1
            spins += 1
            if spins > 2000:
                _yield_cpu()
    return sense


@numba.njit(cache=True, nogil=True, inline="never")
def _push(heap, n, t, seq, row):
    """Push (t, seq) -> pool row onto the overflow heap of n items (room for one more)."""
    i = n
    while i > 0:
        parent = (i - 1) >> 1
        if heap[parent, 0] < t or (heap[parent, 0] == t and heap[parent, 1] < seq):
            break
        heap[i, 0] = heap[parent, 0]
        heap[i, 1] = heap[parent, 1]
        heap[i, 2] = heap[parent, 2]
        i = parent
    heap[i, 0] = t
    heap[i, 1] = seq
    heap[i, 2] = row
    return n + 1


@numba.njit(cache=True, nogil=True, inline="never")
def _pop(heap, n):
    """Remove the heap's minimum (row 0); returns the new size."""
    n -= 1
    t, s, p = heap[n, 0], heap[n, 1], heap[n, 2]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= n:
            break
        best = left
        right = left + 1
        if right < n and (heap[right, 0] < heap[left, 0] or (
                heap[right, 0] == heap[left, 0] and heap[right, 1] < heap[left, 1])):
            best = right
        if t < heap[best, 0] or (t == heap[best, 0] and s < heap[best, 1]):
            break
        heap[i, 0] = heap[best, 0]
        heap[i, 1] = heap[best, 1]
        heap[i, 2] = heap[best, 2]
        i = best
    heap[i, 0] = t
    heap[i, 1] = s
    heap[i, 2] = p
    return n


@numba.njit(cache=True, nogil=True)
def _to_near(near, near_len, ovf_head, ovf_tail, pool, ev, base, free_head):
    """Move the list of pool rows from `ev` into the near buckets base + port, each row to its
    port's rows (or, when they are full, its overflow list), in order. Returns (free_head,
    rows moved)."""
    near_rows = near.shape[1]
    moved = 0
    while ev >= 0:
        nxt = pool[ev, R_NEXT]
        mb = base + (pool[ev, R_DIR2] >> 2)
        if ovf_head[mb] < 0 and near_len[mb] < near_rows:
            r = near_len[mb]
            for k in range(R_NEXT):
                near[mb, r, k] = pool[ev, k]
            near_len[mb] = r + 1
            pool[ev, R_NEXT] = free_head
            free_head = ev
        else:
            pool[ev, R_NEXT] = -1
            if ovf_tail[mb] < 0:
                ovf_head[mb] = ev
            else:
                pool[ovf_tail[mb], R_NEXT] = ev
            ovf_tail[mb] = ev
        moved += 1
        ev = nxt
    return free_head, moved


def partition(n_cores: int, width: int, n_parts: int) -> np.ndarray:
    """Core -> partition of the kernel: stripes of columns dealt out in turn, about four per
    partition, so that a region (a whole-model layout's regions are bands of columns) is split
    between partitions and all of them have work at once."""
    stripe = max(1, -(-width // (4 * n_parts)))
    return ((np.arange(n_cores) % width // stripe) % n_parts).astype(np.int8)


def run_kernel(core_ptr, code_ptr, code, route_link, mc_slot, n_slots, n_links, width,
               hop_latency, send_overhead, recv_overhead, compute_overhead, max_events,
               max_pending, loop_start, loop_end, loop_count, record_arrivals, threads=1):
    """Simulate a program. Times are integer cycles. See the module doc for the arrays.

    `core_ptr` indexes instructions, `code_ptr`, `loop_start` and `loop_end` words of `code`.
    Returns (status, events, core_time, core_busy, core_overhead, core_wait, pc,
    entry_arrival, link_free_at); pc[c] is the instruction core c stopped at.
    `entry_arrival[e]` is the latest delivery at route entry e
    (-1: none) when `record_arrivals`, else an empty array; a hop's link was taken at
    entry_arrival - hop_latency - (its serialisation cycles).
    `core_busy` counts compute cycles, `core_overhead` fixed instruction overheads (compute,
    send, receive), `core_wait` cycles blocked on a delivery; the rest of the makespan is idle
    after finishing. `events` counts hop events plus one start event per active core.

    Pending hop events live in a calendar queue: WINDOW FIFO buckets, one per cycle of the
    next WINDOW cycles, and an overflow heap for events further ahead, moved into buckets as
    time advances, before anything else can be queued there; events within NEAR cycles sit in
    per-port buckets. Taking buckets in time order, each cycle's port by port, grants each
    link's requests in the module doc's order at O(1) per event.

    Loops: core c runs words loop_start[c]:loop_end[c] loop_count[c] times, reusing the
    messages' route entries. A RECV consumes its delivery; a delivery to a slot whose
    previous delivery is still unconsumed is an OVERRUN (an iteration ran ahead of its
    receiver), reported rather than silently mistimed. FULL: more than `max_pending` messages
    in flight (not possible when it counts every SEND the program runs).
    """
    n_cores = len(core_ptr) - 1
    n_parts = max(1, min(int(threads), width))
    # Large per-core and per-link arrays come from numpy's zeroed (lazily mapped) memory: pages
    # of cores and links that nothing touches are never written.
    buf = np.zeros(n_cores * 8 + 8, np.int64)
    align = (-(buf.ctypes.data >> 3)) & 7  # rows on 64-byte cache lines
    core_state = buf[align:align + n_cores * 8]
    link_free_at = np.zeros(n_links, np.int64)
    slot = np.full(n_slots, EMPTY, np.int64)
    entry_arrival = np.full(len(route_link) if record_arrivals else 0, -1, np.int64)
    core_time = np.zeros(n_cores, np.int64)
    core_busy = np.zeros(n_cores, np.int64)
    core_overhead = np.zeros(n_cores, np.int64)
    core_wait = np.zeros(n_cores, np.int64)
    pc = np.array(code_ptr[:-1], dtype=np.int64)
    owner = partition(n_cores, width, n_parts)
    sync = np.zeros(SYNC_ROWS + 2 * n_parts * SYNC_WIDTH, np.int64)
    cap = min(int(max_pending), MAILBOX_ROWS) if n_parts > 1 else 0
    mbox = np.empty((n_parts, n_parts, 2, cap, R_WIDTH), np.int32)
    mbox_t = np.empty((n_parts, n_parts, 2, cap), np.int64)
    mbox_n = np.zeros((n_parts, n_parts, 2), np.int64)

    def part(me):
        return _run(
            core_state, link_free_at, slot, entry_arrival, core_time, core_busy, core_overhead,
            core_wait, pc, code_ptr, code, route_link, mc_slot, width, hop_latency,
            send_overhead, recv_overhead, compute_overhead, max_events,
            max(int(max_pending), 1), loop_start, loop_end, loop_count, record_arrivals,
            NEAR_ROWS, owner, me, n_parts, sync, mbox, mbox_t, mbox_n)

    if n_parts == 1:
        status, events = part(0)
    else:
        out = [None] * n_parts
        failed = []

        def work(me):
            try:
                out[me] = part(me)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the join
                failed.append(exc)
                sync[SYNC_ABORT] = 1  # the other partitions leave their barrier
        workers = [threading.Thread(target=work, args=(me,)) for me in range(1, n_parts)]
        for w in workers:
            w.start()
        work(0)
        for w in workers:
            w.join()
        if failed:
            raise failed[0]
        statuses = [s for s, _ in out]
        events = sum(e for _, e in out)
        errors = [s for s in statuses if s not in (OK, DEADLOCK, ABORTED)]
        status = errors[0] if errors else (DEADLOCK if DEADLOCK in statuses else OK)
    pc = _instruction_index(code, code_ptr, core_ptr, pc)
    return (status, events, core_time, core_busy, core_overhead, core_wait, pc, entry_arrival,
            link_free_at)


@numba.njit(cache=True, nogil=True)
def _instruction_index(code, code_ptr, core_ptr, pc):
    """Word positions -> instruction indices (cores that are done, or walk their words)."""
    out = np.empty(pc.shape[0], np.int64)
    for c in range(pc.shape[0]):
        if pc[c] >= code_ptr[c + 1]:
            out[c] = core_ptr[c + 1]
            continue
        w = code_ptr[c]
        i = core_ptr[c]
        while w < pc[c]:
            w += SEND_WORDS if code[w] & 3 == SEND else 1
            i += 1
        out[c] = i
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _far_core(link, width):
    """compiler.program.far_core (the kernel imports nothing)."""
    d = link & 3
    return (link >> 2) + (1 if d == 0 else (-1 if d == 1 else (-width if d == 2 else width)))


@numba.njit(cache=True, nogil=True)
def _run(flat, link_free_at, slot, entry_arrival, core_time, core_busy, core_overhead,
         core_wait, pc_out, core_ptr, code, route_link, mc_slot, width, hop_latency,
         send_overhead, recv_overhead, compute_overhead, max_events, max_pending, loop_start,
         loop_end, loop_count, record_arrivals, near_rows, owner, me, n_parts, sync, mbox,
         mbox_t, mbox_n):
    """run_kernel's event loop for the cores and links of partition `me` of `n_parts`; `flat`
    (zeros) holds the per-core rows, the outputs are filled for its active cores (pc_out holds
    every core's first word on entry). `core_ptr` here is run_kernel's `code_ptr`. Returns
    (status, events of this partition, whether it stopped at a barrier)."""
    n_cores = core_ptr.shape[0] - 1
    st = flat.reshape((n_cores, 8))  # rows of inactive cores stay zero
    for k in range(n_cores):
        if core_ptr[k] == core_ptr[k + 1] or owner[k] != me:
            continue
        st[k, C_PC] = core_ptr[k]
        st[k, C_END] = core_ptr[k + 1]
        st[k, C_LSTART] = loop_start[k]
        left = loop_count[k] - 1 if loop_start[k] < loop_end[k] else 0
        st[k, C_LEFT] = left
        st[k, C_STOP] = loop_end[k] if left > 0 else core_ptr[k + 1]
    # one step along each direction, in link ids (link = core * 4 + direction)
    step = np.array([4, -4, -4 * width, 4 * width], np.int64)

    # Near buckets: the events of times <= promoted (the next NEAR cycles), each bucket a
    # contiguous array of up to near_rows rows in push order, then an overflow list of pool
    # rows. Far buckets (times up to now + WINDOW): lists of pool rows. Further ahead: the
    # overflow heap of pool rows. Freed pool rows are linked through R_NEXT from free_head,
    # rows never used start at n_rows; the pool and heap are uninitialised, so only rows in
    # use are ever touched.
    near = np.empty((NEAR * NPORT, near_rows, R_WIDTH), np.int32)
    near_len = np.zeros(NEAR * NPORT, np.int64)
    ovf_head = np.full(NEAR * NPORT, -1, np.int64)
    ovf_tail = np.full(NEAR * NPORT, -1, np.int64)
    promoted = NEAR - 1
    port = 0  # the port whose events of `now` are being taken: bucket nb = now's * NPORT + port
    nb = 0
    pos = 0  # its next near row
    near_n = np.zeros(NEAR, np.int64)  # events queued into a cycle's near buckets (a hint)
    hold_head = -1  # events queued for `now` while it runs (its next round), a list of pool rows
    hold_tail = -1
    in_near = 0
    pool = np.empty((max_pending, R_WIDTH), np.int32)
    free_head = -1
    n_rows = 0
    head = np.full(WINDOW, -1, np.int32)
    tail = np.full(WINDOW, -1, np.int32)
    heap = np.empty((max_pending, 3), np.int64)  # overflow heap: time, push order, pool row
    n_heap = 0
    in_far = 0
    seq = 0
    now = 0
    events = 0
    status = OK
    # Partitions: the events a partition queues for another's link go to its mailbox for that
    # round's parity, taken after the round's barrier (sync: counter, sense, then each round
    # parity's posted next time, events and status per partition).
    cap = mbox.shape[3]
    par = 0
    sense = 0
    sent_min = NEVER
    synced = False

    next_start = 0  # cores not yet started (all start at time 0, in core order)
    c = -1
    resume = -1  # arrival time of the delivery the resumed core c was blocked on
    while True:
        if c < 0 and next_start < n_cores:
            c = next_start
            next_start += 1
            if core_ptr[c] == core_ptr[c + 1] or owner[c] != me:
                c = -1
                continue
            events += 1
        if c >= 0:
            # Run core c inline until it blocks or finishes.
            t = st[c, C_TIME]
            wait = st[c, C_WAIT]
            busy = st[c, C_BUSY]
            pc = st[c, C_PC]
            stop = st[c, C_STOP]
            if resume >= 0:
                # The blocked core resumes when the data is in, then pays the receive overhead.
                if resume > t:
                    wait += resume - t
                    t = resume
                t += recv_overhead
                pc += 1
                resume = -1
            while True:
                if pc == stop:
                    left = st[c, C_LEFT]
                    if left == 0:
                        break
                    pc = st[c, C_LSTART]
                    left -= 1
                    st[c, C_LEFT] = left
                    if left == 0:
                        stop = st[c, C_END]
                    continue
                w = code[pc]
                kind = w & 3
                val = np.int64(w >> KIND_BITS)
                if kind == COMPUTE:
                    t += val + compute_overhead
                    busy += val
                elif kind == SEND:
                    t += send_overhead
                    first = code[pc + 1]
                    link0 = code[pc + 4]
                    shape = code[pc + 5]
                    _prefetch(link_free_at, link0)
                    turn = first + (shape >> 2) if shape >= 0 else -1
                    mb = (t & NMASK) * NPORT + INJECT
                    q = me if n_parts == 1 else owner[_far_core(link0, width)]
                    if q != me:  # another partition's link
                        k = mbox_n[me, q, par]
                        if k == cap:
                            status = FULL
                            break
                        mbox_n[me, q, par] = k + 1
                        mbox[me, q, par, k, R_ENTRY] = first
                        mbox[me, q, par, k, R_LAST] = first + val - 1
                        mbox[me, q, par, k, R_SER] = code[pc + 2]
                        mbox[me, q, par, k, R_DELIVERY] = code[pc + 3]
                        mbox[me, q, par, k, R_LINK] = link0
                        mbox[me, q, par, k, R_TURN] = turn
                        mbox[me, q, par, k, R_DIR2] = (shape & 3) | (INJECT << 2)
                        mbox_t[me, q, par, k] = t
                        if t < sent_min:
                            sent_min = t
                    elif (t != now and t <= promoted and ovf_head[mb] < 0
                          and near_len[mb] < near_rows):
                        r = near_len[mb]
                        near_len[mb] = r + 1
                        near[mb, r, R_ENTRY] = first
                        near[mb, r, R_LAST] = first + val - 1
                        near[mb, r, R_SER] = code[pc + 2]
                        near[mb, r, R_DELIVERY] = code[pc + 3]
                        near[mb, r, R_LINK] = link0
                        near[mb, r, R_TURN] = turn
                        near[mb, r, R_DIR2] = (shape & 3) | (INJECT << 2)
                        in_near += 1
                        near_n[t & NMASK] += 1
                    else:
                        if free_head >= 0:
                            ev = free_head
                            free_head = pool[ev, R_NEXT]
                        elif n_rows < max_pending:
                            ev = n_rows
                            n_rows += 1
                        else:
                            status = FULL
                            break
                        pool[ev, R_ENTRY] = first
                        pool[ev, R_LAST] = first + val - 1
                        pool[ev, R_SER] = code[pc + 2]
                        pool[ev, R_DELIVERY] = code[pc + 3]
                        pool[ev, R_LINK] = link0
                        pool[ev, R_TURN] = turn
                        pool[ev, R_DIR2] = (shape & 3) | (INJECT << 2)
                        pool[ev, R_NEXT] = -1
                        # Queued inline: a helper taking the arrays cost a dozen atomic
                        # reference count updates per event queued, a quarter of the run time.
                        if t == now:  # the next round of `now`
                            if hold_tail < 0:
                                hold_head = ev
                            else:
                                pool[hold_tail, R_NEXT] = ev
                            hold_tail = ev
                        elif t <= promoted:  # the near bucket's overflow list
                            if ovf_tail[mb] < 0:
                                ovf_head[mb] = ev
                            else:
                                pool[ovf_tail[mb], R_NEXT] = ev
                            ovf_tail[mb] = ev
                            in_near += 1
                            near_n[t & NMASK] += 1
                        elif t < now + WINDOW:  # a far bucket
                            b = t & MASK
                            if tail[b] < 0:
                                head[b] = ev
                            else:
                                pool[tail[b], R_NEXT] = ev
                            tail[b] = ev
                            in_far += 1
                        else:
                            n_heap = _push(heap, n_heap, t, seq, ev)
                    seq += 1
                    pc += SEND_WORDS - 1
                else:
                    s = slot[val]
                    if s < 0:
                        slot[val] = -2 - c
                        break
                    slot[val] = EMPTY
                    if s > t:
                        wait += s - t
                        t = s
                    t += recv_overhead
                pc += 1
            st[c, C_TIME] = t
            st[c, C_WAIT] = wait
            st[c, C_BUSY] = busy
            st[c, C_PC] = pc
            st[c, C_STOP] = stop
            if status != OK:
                break
            c = -1
            continue

        # Next hop event. The events of `now` are taken port by port, each port's in push
        # order, so one cycle's requests for a link are granted in port order (module doc).
        # Then the events queued for `now` meanwhile are its next round; then time advances
        # (to the overflow heap's first event if nothing else is pending), due heap events move
        # into far buckets and due far buckets into near buckets, before anything else is
        # queued there.
        while pos >= near_len[nb] and ovf_head[nb] < 0:
            near_len[nb] = 0
            pos = 0
            if port < INJECT:
                port += 1
                nb += 1
                continue
            port = 0
            nb -= INJECT
            # The round of `now` is done. When is this partition's next event?
            g = NEVER
            if hold_head >= 0:
                g = now
            elif in_near > 0:
                x = now + 1
                while x <= promoted:
                    if near_n[x & NMASK] > 0:
                        g = x
                        break
                    x += 1
            if g == NEVER and in_far > 0:
                x = promoted + 1
                while x < now + WINDOW:
                    if head[x & MASK] >= 0:
                        g = x
                        break
                    x += 1
            if g == NEVER and n_heap > 0:
                g = heap[0, 0]
            if n_parts > 1:
                # Post it (or the earliest event sent to another partition), wait for all,
                # take the events sent here, and go on at the earliest time of any.
                if sent_min < g:
                    g = sent_min
                sent_min = NEVER
                row = SYNC_ROWS + (par * n_parts + me) * SYNC_WIDTH
                sync[row] = g
                sync[row + 1] = events
                sync[row + 2] = status
                sense = _barrier(sync, n_parts, sense)
                if sense < 0:
                    status = ABORTED
                    synced = True
                    break
                total = 0
                for p in range(n_parts):
                    row = SYNC_ROWS + (par * n_parts + p) * SYNC_WIDTH
                    if sync[row] < g:
                        g = sync[row]
                    total += sync[row + 1]
                    if sync[row + 2] != OK and status == OK:
                        status = sync[row + 2]
                if status == OK and total > max_events:
                    status = WATCHDOG
                if status != OK:  # every partition stops at this barrier
                    synced = True
                    break
                for p in range(n_parts):
                    if p == me:
                        continue
                    for k in range(mbox_n[p, me, par]):
                        t = mbox_t[p, me, par, k]
                        mb = (t & NMASK) * NPORT + (mbox[p, me, par, k, R_DIR2] >> 2)
                        if (t != now and t <= promoted and ovf_head[mb] < 0
                                and near_len[mb] < near_rows):
                            r = near_len[mb]
                            near_len[mb] = r + 1
                            for f in range(R_NEXT):
                                near[mb, r, f] = mbox[p, me, par, k, f]
                            in_near += 1
                            near_n[t & NMASK] += 1
                            continue
                        if free_head >= 0:
                            ev = free_head
                            free_head = pool[ev, R_NEXT]
                        elif n_rows < max_pending:
                            ev = n_rows
                            n_rows += 1
                        else:
                            status = FULL
                            break
                        for f in range(R_NEXT):
                            pool[ev, f] = mbox[p, me, par, k, f]
                        pool[ev, R_NEXT] = -1
                        if t == now:
                            if hold_tail < 0:
                                hold_head = ev
                            else:
                                pool[hold_tail, R_NEXT] = ev
                            hold_tail = ev
                        elif t <= promoted:
                            if ovf_tail[mb] < 0:
                                ovf_head[mb] = ev
                            else:
                                pool[ovf_tail[mb], R_NEXT] = ev
                            ovf_tail[mb] = ev
                            in_near += 1
                            near_n[t & NMASK] += 1
                        elif t < now + WINDOW:
                            b = t & MASK
                            if tail[b] < 0:
                                head[b] = ev
                            else:
                                pool[tail[b], R_NEXT] = ev
                            tail[b] = ev
                            in_far += 1
                        else:
                            n_heap = _push(heap, n_heap, t, seq, ev)
                        seq += 1
                    if status != OK:
                        break
                if status != OK:  # the others hear of it at the next barrier
                    break
                par ^= 1
                for q in range(n_parts):
                    mbox_n[me, q, par] = 0
            if hold_head >= 0:  # the next round of `now`
                free_head, moved = _to_near(near, near_len, ovf_head, ovf_tail, pool, hold_head,
                                            nb, free_head)
                in_near += moved
                hold_head = -1
                hold_tail = -1
                continue
            if g == NEVER:
                synced = True
                break
            if g == now:  # another partition's next round of `now`
                continue
            if in_near == 0 and in_far == 0:
                # Nothing queued short of the heap, whose events all lie at g or later: jump.
                now = g - 1
                promoted = now if now > promoted else promoted
            while now < g:
                # Step by step, so that a heap event enters its far bucket only once no earlier
                # cycle's bucket of the same index can still be promoted.
                now += 1
                while n_heap > 0 and heap[0, 0] < now + WINDOW:
                    t = heap[0, 0]
                    ev = heap[0, 2]
                    n_heap = _pop(heap, n_heap)
                    b = t & MASK
                    pool[ev, R_NEXT] = -1
                    if tail[b] < 0:
                        head[b] = ev
                    else:
                        pool[tail[b], R_NEXT] = ev
                    tail[b] = ev
                    in_far += 1
                while promoted < now + NEAR - 1:
                    promoted += 1
                    b = promoted & MASK
                    if head[b] < 0:
                        continue
                    free_head, moved = _to_near(near, near_len, ovf_head, ovf_tail, pool,
                                                head[b], (promoted & NMASK) * NPORT, free_head)
                    in_far -= moved
                    in_near += moved
                    near_n[promoted & NMASK] += moved
                    head[b] = -1
                    tail[b] = -1
            nb = (now & NMASK) * NPORT
            if near_n[now & NMASK] == 0:  # nothing at `now`: its ports need no visit
                port = INJECT
                nb += INJECT
            near_n[now & NMASK] = 0
        if status != OK or synced:
            break
        if pos < near_len[nb]:
            r = pos
            pos += 1
            ev = -1
            e = np.int64(near[nb, r, R_ENTRY])
            last_entry = near[nb, r, R_LAST]
            ser_word = near[nb, r, R_SER]
            delivery = np.int64(near[nb, r, R_DELIVERY])
            link = np.int64(near[nb, r, R_LINK])
            turn = near[nb, r, R_TURN]
            dir2 = near[nb, r, R_DIR2] & 3
            # Look ahead in the bucket: the link of the event after next (and, if it
            # delivers, its slot and the receiving core's row and code; one event ahead is too
            # late for these misses, more ahead was no faster), the core row of one further on.
            n_nb = near_len[nb]
            k = pos + 1
            if k < n_nb:
                link1 = near[nb, k, R_LINK]
                _prefetch(link_free_at, link1)
                e1 = near[nb, k, R_ENTRY]
                s1 = -1
                if near[nb, k, R_SER] < 0:
                    s1 = mc_slot[e1 + near[nb, k, R_DELIVERY]]
                elif e1 == near[nb, k, R_LAST]:
                    s1 = near[nb, k, R_DELIVERY]
                if s1 >= 0:
                    _prefetch(slot, s1)
                    core1 = _far_core(link1, width)
                    _prefetch(flat, core1 * 8)
                    _prefetch(code, flat[core1 * 8 + C_PC] + 1)
            k = pos + LOOKAHEAD
            if k < n_nb and (near[nb, k, R_SER] < 0 or near[nb, k, R_ENTRY] == near[nb, k, R_LAST]):
                _prefetch(flat, _far_core(near[nb, k, R_LINK], width) * 8)
        elif ovf_head[nb] >= 0:
            ev = ovf_head[nb]
            ovf_head[nb] = pool[ev, R_NEXT]
            if ovf_head[nb] < 0:
                ovf_tail[nb] = -1
            e = np.int64(pool[ev, R_ENTRY])
            last_entry = pool[ev, R_LAST]
            ser_word = pool[ev, R_SER]
            delivery = np.int64(pool[ev, R_DELIVERY])
            link = np.int64(pool[ev, R_LINK])
            turn = pool[ev, R_TURN]
            dir2 = pool[ev, R_DIR2] & 3
        else:
            break  # nothing pending
        in_near -= 1
        events += 1
        if events > max_events:
            status = WATCHDOG
            break
        # The hop: take the link first-come first-served, deliver, queue the next hop.
        multicast = ser_word < 0
        ser = np.int64(-1 - ser_word if multicast else ser_word)
        start = now if now > link_free_at[link] else link_free_at[link]
        link_free_at[link] = start + ser
        arrival = start + hop_latency + ser
        last = e == last_entry
        if multicast:
            sl = np.int64(mc_slot[e + delivery])
        elif last:
            sl = delivery
        else:
            sl = -1
        if not last:
            t = start + hop_latency
            if turn < 0:
                link1 = np.int64(route_link[e + 1])  # a route of more than two straight runs
            elif e + 1 == turn:
                link1 = _far_core(link, width) * 4 + dir2
            else:
                link1 = link + step[link & 3]
            port_dir2 = dir2 | ((link & 3) << 2)
            mb = (t & NMASK) * NPORT + (link & 3)
            q = me if n_parts == 1 else owner[_far_core(link1, width)]
            if q != me:  # another partition's link
                k = mbox_n[me, q, par]
                if k == cap:
                    status = FULL
                    break
                mbox_n[me, q, par] = k + 1
                mbox[me, q, par, k, R_ENTRY] = e + 1
                mbox[me, q, par, k, R_LAST] = last_entry
                mbox[me, q, par, k, R_SER] = ser_word
                mbox[me, q, par, k, R_DELIVERY] = delivery
                mbox[me, q, par, k, R_LINK] = link1
                mbox[me, q, par, k, R_TURN] = turn
                mbox[me, q, par, k, R_DIR2] = port_dir2
                mbox_t[me, q, par, k] = t
                if t < sent_min:
                    sent_min = t
                if ev >= 0:
                    pool[ev, R_NEXT] = free_head
                    free_head = ev
            elif t != now and t <= promoted and ovf_head[mb] < 0 and near_len[mb] < near_rows:
                r = near_len[mb]
                near_len[mb] = r + 1
                near[mb, r, R_ENTRY] = e + 1
                near[mb, r, R_LAST] = last_entry
                near[mb, r, R_SER] = ser_word
                near[mb, r, R_DELIVERY] = delivery
                near[mb, r, R_LINK] = link1
                near[mb, r, R_TURN] = turn
                near[mb, r, R_DIR2] = port_dir2
                in_near += 1
                near_n[t & NMASK] += 1
                if ev >= 0:
                    pool[ev, R_NEXT] = free_head
                    free_head = ev
            else:
                if ev < 0:
                    if free_head >= 0:
                        ev = free_head
                        free_head = pool[ev, R_NEXT]
                    elif n_rows < max_pending:
                        ev = n_rows
                        n_rows += 1
                    else:
                        status = FULL
                        break
                    pool[ev, R_LAST] = last_entry
                    pool[ev, R_SER] = ser_word
                    pool[ev, R_DELIVERY] = delivery
                    pool[ev, R_TURN] = turn
                pool[ev, R_DIR2] = port_dir2
                pool[ev, R_ENTRY] = e + 1
                pool[ev, R_LINK] = link1
                pool[ev, R_NEXT] = -1
                if t == now:  # as for a SEND
                    if hold_tail < 0:
                        hold_head = ev
                    else:
                        pool[hold_tail, R_NEXT] = ev
                    hold_tail = ev
                elif t <= promoted:
                    if ovf_tail[mb] < 0:
                        ovf_head[mb] = ev
                    else:
                        pool[ovf_tail[mb], R_NEXT] = ev
                    ovf_tail[mb] = ev
                    in_near += 1
                    near_n[t & NMASK] += 1
                elif t < now + WINDOW:
                    b = t & MASK
                    if tail[b] < 0:
                        head[b] = ev
                    else:
                        pool[tail[b], R_NEXT] = ev
                    tail[b] = ev
                    in_far += 1
                else:
                    n_heap = _push(heap, n_heap, t, seq, ev)
            seq += 1
        elif ev >= 0:
            pool[ev, R_NEXT] = free_head
            free_head = ev
        if record_arrivals:
            entry_arrival[e] = arrival
        if sl >= 0:
            s = slot[sl]
            if s == EMPTY:
                slot[sl] = arrival
            elif s >= 0:
                status = OVERRUN
                break
            else:
                slot[sl] = EMPTY
                c = -2 - s
                resume = arrival

    if n_parts > 1 and not synced:
        # Stopped by an error inside a round: the others hear of it at the round's barrier.
        row = SYNC_ROWS + (par * n_parts + me) * SYNC_WIDTH
        sync[row] = NEVER
        sync[row + 1] = events
        sync[row + 2] = status
        _barrier(sync, n_parts, sense)
    for k in range(n_cores):
        if core_ptr[k] == core_ptr[k + 1] or owner[k] != me:
            continue
        if status == OK and (st[k, C_PC] < st[k, C_END] or st[k, C_LEFT] > 0):
            status = DEADLOCK
        core_time[k] = st[k, C_TIME]
        core_busy[k] = st[k, C_BUSY]
        core_wait[k] = st[k, C_WAIT]
        core_overhead[k] = st[k, C_TIME] - st[k, C_BUSY] - st[k, C_WAIT]
        pc_out[k] = st[k, C_PC]
    return status, events
