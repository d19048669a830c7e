"""The discrete-event kernel: one Numba function over flat arrays.

Model (message level, cut-through):
- A message of S serialisation cycles crossing links l_1..l_h, injected at t0: its head takes
  link l_i at s_i = max(head arrival, free_at[l_i]), holds it for S cycles
  (free_at[l_i] = s_i + S), and reaches the next router hop_latency cycles later. It is
  delivered at the end of link l_i at s_i + hop_latency + S (tail received). Uncontended:
  t0 + h * hop_latency + S.
- Each hop is one event in a queue ordered by (time, push order), so links are granted
  first-come first-served in simulated time.
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
  word, link, turn entry, direction after the turn, next). Events of the next NEAR (256) cycles are
  rows of contiguous per-cycle arrays in push order ("near buckets", NEAR_ROWS rows each, then an
  overflow list), so the hop loop reads its events in sequence and can look ahead. NEAR covers
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

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

WINDOW = 1 << 16  # cycles covered by the calendar queue's buckets
MASK = WINDOW - 1
COMPUTE, SEND, RECV = 0, 1, 2  # mirrors compiler.program; the kernel imports nothing
OK, DEADLOCK, WATCHDOG, OVERRUN, FULL = 0, 1, 2, 3, 4
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
NEAR_ROWS = 1 << 14  # rows of a near bucket's array; more events overflow to a list
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


def run_kernel(core_ptr, code_ptr, code, route_link, mc_slot, n_slots, n_links, width,
               hop_latency, send_overhead, recv_overhead, compute_overhead, max_events,
               max_pending, loop_start, loop_end, loop_count, record_arrivals):
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
    time advances, before anything else can be queued there. Taking buckets in time order and
    each bucket in push order gives the order of one (time, push order) heap at O(1) per event.

    Loops: core c runs words loop_start[c]:loop_end[c] loop_count[c] times, reusing the
    messages' route entries. A RECV consumes its delivery; a delivery to a slot whose
    previous delivery is still unconsumed is an OVERRUN (an iteration ran ahead of its
    receiver), reported rather than silently mistimed. FULL: more than `max_pending` messages
    in flight (not possible when it counts every SEND the program runs).
    """
    n_cores = len(core_ptr) - 1
    # Large per-core and per-link arrays come from numpy's zeroed (lazily mapped) memory: pages
    # of cores and links that nothing touches are never written.
    buf = np.zeros(n_cores * 8 + 8, np.int64)
    align = (-(buf.ctypes.data >> 3)) & 7  # rows on 64-byte cache lines
    core_state = buf[align:align + n_cores * 8]
    link_free_at = np.zeros(n_links, np.int64)
    core_time = np.zeros(n_cores, np.int64)
    core_busy = np.zeros(n_cores, np.int64)
    core_overhead = np.zeros(n_cores, np.int64)
    core_wait = np.zeros(n_cores, np.int64)
    pc = np.array(code_ptr[:-1], dtype=np.int64)
    status, events, entry_arrival = _run(
        core_state, link_free_at, core_time, core_busy, core_overhead, core_wait, pc,
        code_ptr, code, route_link, mc_slot, n_slots, width, hop_latency, send_overhead,
        recv_overhead, compute_overhead, max_events, max(int(max_pending), 1), loop_start,
        loop_end, loop_count, record_arrivals, NEAR_ROWS)
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
    """The core at the far end of a link (directions as compiler.program.link_dst)."""
    d = link & 3
    return (link >> 2) + (1 if d == 0 else (-1 if d == 1 else (-width if d == 2 else width)))


@numba.njit(cache=True, nogil=True)
def _run(flat, link_free_at, core_time, core_busy, core_overhead, core_wait, pc_out,
         core_ptr, code, route_link, mc_slot, n_slots, width, hop_latency, send_overhead,
         recv_overhead, compute_overhead, max_events, max_pending, loop_start, loop_end,
         loop_count, record_arrivals, near_rows):
    """run_kernel's event loop; `flat` (zeros) holds the per-core rows, the outputs are filled
    for active cores (pc_out holds every core's first word on entry). `core_ptr` here is
    run_kernel's `code_ptr`."""
    n_cores = core_ptr.shape[0] - 1
    n_entries = route_link.shape[0]
    st = flat.reshape((n_cores, 8))  # rows of inactive cores stay zero
    for k in range(n_cores):
        if core_ptr[k] == core_ptr[k + 1]:
            continue
        st[k, C_PC] = core_ptr[k]
        st[k, C_END] = core_ptr[k + 1]
        st[k, C_LSTART] = loop_start[k]
        left = loop_count[k] - 1 if loop_start[k] < loop_end[k] else 0
        st[k, C_LEFT] = left
        st[k, C_STOP] = loop_end[k] if left > 0 else core_ptr[k + 1]
    slot = np.full(n_slots, EMPTY, np.int64)
    entry_arrival = np.full(n_entries if record_arrivals else 0, -1, np.int64)
    # one step along each direction, in link ids (link = core * 4 + direction)
    step = np.array([4, -4, -4 * width, 4 * width], np.int64)

    # Near buckets: the events of times <= promoted (the next NEAR cycles), each bucket a
    # contiguous array of up to near_rows rows in push order, then an overflow list of pool
    # rows. Far buckets (times up to now + WINDOW): lists of pool rows. Further ahead: the
    # overflow heap of pool rows. Freed pool rows are linked through R_NEXT from free_head,
    # rows never used start at n_rows; the pool and heap are uninitialised, so only rows in
    # use are ever touched.
    near = np.empty((NEAR, near_rows, R_WIDTH), np.int32)
    near_len = np.zeros(NEAR, np.int64)
    ovf_head = np.full(NEAR, -1, np.int64)
    ovf_tail = np.full(NEAR, -1, np.int64)
    promoted = NEAR - 1
    pos = 0  # next near row of the bucket of `now`
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

    next_start = 0  # cores not yet started (all start at time 0, in core order)
    c = -1
    resume = -1  # arrival time of the delivery the resumed core c was blocked on
    while True:
        if c < 0 and next_start < n_cores:
            c = next_start
            next_start += 1
            if core_ptr[c] == core_ptr[c + 1]:
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
                    mb = t & NMASK
                    if t <= promoted and ovf_head[mb] < 0 and near_len[mb] < near_rows:
                        r = near_len[mb]
                        near_len[mb] = r + 1
                        near[mb, r, R_ENTRY] = first
                        near[mb, r, R_LAST] = first + val - 1
                        near[mb, r, R_SER] = code[pc + 2]
                        near[mb, r, R_DELIVERY] = code[pc + 3]
                        near[mb, r, R_LINK] = link0
                        near[mb, r, R_TURN] = turn
                        near[mb, r, R_DIR2] = shape & 3
                        in_near += 1
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
                        pool[ev, R_DIR2] = shape & 3
                        pool[ev, R_NEXT] = -1
                        # Queued inline: a helper taking the arrays cost a dozen atomic
                        # reference count updates per event queued, a quarter of the run time.
                        if t <= promoted:  # the near bucket's overflow list
                            if ovf_tail[mb] < 0:
                                ovf_head[mb] = ev
                            else:
                                pool[ovf_tail[mb], R_NEXT] = ev
                            ovf_tail[mb] = ev
                            in_near += 1
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

        # Next hop event. When the bucket of `now` is done, advance time (to the overflow
        # heap's first event if nothing else is pending), move due heap events into far
        # buckets and due far buckets into near buckets, before anything else is queued there.
        nb = now & NMASK
        while pos >= near_len[nb] and ovf_head[nb] < 0:
            near_len[nb] = 0
            pos = 0
            if in_near == 0 and in_far == 0:
                if n_heap == 0:
                    break
                now = heap[0, 0]
                promoted = now - 1
            else:
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
                ev = head[b]
                if ev < 0:
                    continue
                mb = promoted & NMASK
                in_far -= 1
                in_near += 1
                while ev >= 0 and near_len[mb] < near_rows:
                    r = near_len[mb]
                    for k in range(R_NEXT):
                        near[mb, r, k] = pool[ev, k]
                    near_len[mb] = r + 1
                    nxt = pool[ev, R_NEXT]
                    pool[ev, R_NEXT] = free_head
                    free_head = ev
                    ev = nxt
                    if ev >= 0:
                        in_far -= 1
                        in_near += 1
                if ev >= 0:  # the rest overflows, in order
                    ovf_head[mb] = ev
                    ovf_tail[mb] = tail[b]
                    while pool[ev, R_NEXT] >= 0:
                        ev = pool[ev, R_NEXT]
                        in_far -= 1
                        in_near += 1
                head[b] = -1
                tail[b] = -1
            nb = now & NMASK
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
            dir2 = near[nb, r, R_DIR2]
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
            dir2 = pool[ev, R_DIR2]
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
            mb = t & NMASK
            if t <= promoted and ovf_head[mb] < 0 and near_len[mb] < near_rows:
                r = near_len[mb]
                near_len[mb] = r + 1
                near[mb, r, R_ENTRY] = e + 1
                near[mb, r, R_LAST] = last_entry
                near[mb, r, R_SER] = ser_word
                near[mb, r, R_DELIVERY] = delivery
                near[mb, r, R_LINK] = link1
                near[mb, r, R_TURN] = turn
                near[mb, r, R_DIR2] = dir2
                in_near += 1
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
                    pool[ev, R_DIR2] = dir2
                pool[ev, R_ENTRY] = e + 1
                pool[ev, R_LINK] = link1
                pool[ev, R_NEXT] = -1
                if t <= promoted:  # as for a SEND
                    if ovf_tail[mb] < 0:
                        ovf_head[mb] = ev
                    else:
                        pool[ovf_tail[mb], R_NEXT] = ev
                    ovf_tail[mb] = ev
                    in_near += 1
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

    for k in range(n_cores):
        if core_ptr[k] == core_ptr[k + 1]:
            continue
        if status == OK and (st[k, C_PC] < st[k, C_END] or st[k, C_LEFT] > 0):
            status = DEADLOCK
        core_time[k] = st[k, C_TIME]
        core_busy[k] = st[k, C_BUSY]
        core_wait[k] = st[k, C_WAIT]
        core_overhead[k] = st[k, C_TIME] - st[k, C_BUSY] - st[k, C_WAIT]
        pc_out[k] = st[k, C_PC]
    return status, events, entry_arrival
