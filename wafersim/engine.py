"""The discrete-event kernel: one Numba function over flat arrays.

Model (message level, cut-through):
- A message of S serialisation cycles crossing links l_1..l_h, injected at t0: its head takes
  link l_i at s_i = max(head arrival, free_at[l_i]), holds it for S cycles
  (free_at[l_i] = s_i + S), and reaches the next router hop_latency cycles later. It is
  delivered at the end of link l_i at s_i + hop_latency + S (tail received). Uncontended:
  t0 + h * hop_latency + S.
- Each hop is one event in a binary heap ordered by (time, push order), so links are granted
  first-come first-served in simulated time.
- Cores run their instruction streams in order. COMPUTE takes its precomputed cycles plus a
  fixed overhead. SEND
  costs send_overhead cycles, then injects. RECV waits for its delivery, then costs
  recv_overhead cycles. A core is run inline from the moment it can proceed until it blocks on
  a delivery that has not been resolved yet; this is exact because a delivery's time never
  depends on when the receiver asks for it.
The plain-SimPy twin in wafersim/reference.py follows the same steps and must agree exactly.
"""

from __future__ import annotations

import numba
import numpy as np

WINDOW = 1 << 16  # cycles covered by the calendar queue's buckets
MASK = WINDOW - 1
COMPUTE, SEND, RECV = 0, 1, 2  # mirrors compiler.program; the kernel imports nothing
OK, DEADLOCK, WATCHDOG, OVERRUN, FULL = 0, 1, 2, 3, 4


@numba.njit(cache=True, nogil=True, inline="never")
def _push(ht, hs, hp, n, t, seq, payload):
    i = n
    ht[i], hs[i], hp[i] = t, seq, payload
    while i > 0:
        parent = (i - 1) >> 1
        if ht[parent] < ht[i] or (ht[parent] == ht[i] and hs[parent] < hs[i]):
            break
        ht[i], ht[parent] = ht[parent], ht[i]
        hs[i], hs[parent] = hs[parent], hs[i]
        hp[i], hp[parent] = hp[parent], hp[i]
        i = parent
    return n + 1


@numba.njit(cache=True, nogil=True, inline="never")
def _pop(ht, hs, hp, n):
    n -= 1
    ht[0], hs[0], hp[0] = ht[n], hs[n], hp[n]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= n:
            break
        best = left
        right = left + 1
        if right < n and (ht[right] < ht[left] or (ht[right] == ht[left] and hs[right] < hs[left])):
            best = right
        if ht[i] < ht[best] or (ht[i] == ht[best] and hs[i] < hs[best]):
            break
        ht[i], ht[best] = ht[best], ht[i]
        hs[i], hs[best] = hs[best], hs[i]
        hp[i], hp[best] = hp[best], hp[i]
        i = best
    return n


@numba.njit(cache=True, nogil=True, inline="always")
def _append(b, slot, e, head, tail, ev_entry, ev_next):
    """Append the hop event of route entry `e` to bucket `b` in pool slot `slot`."""
    ev_entry[slot] = e
    ev_next[slot] = -1
    if tail[b] < 0:
        head[b] = slot
    else:
        ev_next[tail[b]] = slot
    tail[b] = slot


@numba.njit(cache=True, nogil=True)
def run_kernel(core_ptr, ins_kind, ins_cycles, ins_arg, route_link, entry_ser, n_links,
               hop_latency, send_overhead, recv_overhead, compute_overhead, max_events,
               loop_start, loop_end, loop_count, entry_recv):
    """Simulate a program. Times are integer cycles.

    `ins_arg` is, for a SEND, the message's first route entry; for a RECV, the entry it waits
    for. `entry_ser[e]` is the serialisation cycles of entry e's message, stored as -1 - cycles
    on a message's last entry (so the kernel needs no per-message table).

    Returns (status, events, core_time, core_busy, core_overhead, core_wait, pc,
    entry_arrival, link_free_at). A hop's link was taken at
    entry_arrival - hop_latency - (its serialisation cycles).
    `core_busy` counts compute cycles, `core_overhead` fixed instruction overheads (compute,
    send, receive), `core_wait` cycles blocked on a delivery; the rest of the makespan is idle
    after finishing. `events` counts hop events plus one start event per active core.

    Pending hop events live in a calendar queue: WINDOW FIFO buckets, one per cycle of the
    next WINDOW cycles, and an overflow heap for events further ahead, moved into buckets as
    time advances, before anything else can be queued there. Taking buckets in time order and
    each bucket in push order gives the order of one (time, push order) heap at O(1) per event.

    Loops: core c runs instructions loop_start[c]:loop_end[c] loop_count[c] times, reusing the
    messages' route entries. A RECV consumes its delivery; a delivery to a receiving entry
    (`entry_recv`) whose previous delivery is still unconsumed is an OVERRUN (an iteration ran
    ahead of its receiver), reported rather than silently mistimed. FULL: the event pool ran out.
    """
    n_cores = core_ptr.shape[0] - 1
    n_entries = route_link.shape[0]
    core_time = np.zeros(n_cores, np.int64)
    core_busy = np.zeros(n_cores, np.int64)
    core_overhead = np.zeros(n_cores, np.int64)
    core_wait = np.zeros(n_cores, np.int64)
    pc = core_ptr[:-1].copy()
    entry_arrival = np.full(n_entries, -1, np.int64)  # latest delivery of each entry
    ready = np.zeros(n_entries, np.bool_)  # delivered, not yet consumed by its RECV
    waiter = np.full(n_entries, -1, np.int32)
    link_free_at = np.zeros(n_links, np.int64)

    # Every route entry is queued once, and moved from the heap to a bucket at most once.
    # Without loops every entry is queued once and moves from the heap to a bucket at most
    # once; loops reuse pool slots through a free list.
    cap = 2 * n_entries + 1024
    ev_entry = np.empty(cap, np.int32)
    ev_next = np.empty(cap, np.int32)
    free = np.arange(cap - 1, -1, -1).astype(np.int32)
    n_free = cap
    head = np.full(WINDOW, -1, np.int32)
    tail = np.full(WINDOW, -1, np.int32)
    ht = np.empty(cap, np.int64)  # overflow heap: time, push order, route entry
    hs = np.empty(cap, np.int64)
    hp = np.empty(cap, np.int64)
    iteration = np.zeros(n_cores, np.int64)
    n_heap = 0
    in_buckets = 0
    seq = 0
    now = 0
    events = 0
    status = OK

    next_start = 0  # cores not yet started (all start at time 0, in core order)
    c = -1
    while True:
        if c < 0 and next_start < n_cores:
            c = next_start
            next_start += 1
            if pc[c] == core_ptr[c + 1]:
                c = -1
                continue
            events += 1
        if c >= 0:
            # Run core c inline until it blocks or finishes.
            end = core_ptr[c + 1]
            while True:
                if pc[c] == loop_end[c] and iteration[c] + 1 < loop_count[c]:
                    pc[c] = loop_start[c]
                    iteration[c] += 1
                if pc[c] >= end:
                    break
                i = pc[c]
                kind = ins_kind[i]
                if kind == COMPUTE:
                    core_time[c] += ins_cycles[i] + compute_overhead
                    core_busy[c] += ins_cycles[i]
                    core_overhead[c] += compute_overhead
                elif kind == SEND:
                    core_time[c] += send_overhead
                    core_overhead[c] += send_overhead
                    t = core_time[c]
                    if n_free == 0 or n_heap == cap:
                        status = FULL
                        break
                    if t < now + WINDOW:
                        n_free -= 1
                        _append(t & MASK, free[n_free], ins_arg[i], head, tail, ev_entry,
                                ev_next)
                        in_buckets += 1
                    else:
                        n_heap = _push(ht, hs, hp, n_heap, t, seq, ins_arg[i])
                    seq += 1
                else:
                    e = ins_arg[i]
                    if not ready[e]:
                        waiter[e] = c
                        break
                    ready[e] = False
                    arrival = entry_arrival[e]
                    if arrival > core_time[c]:
                        core_wait[c] += arrival - core_time[c]
                        core_time[c] = arrival
                    core_time[c] += recv_overhead
                    core_overhead[c] += recv_overhead
                pc[c] += 1
            if status != OK:
                break
            c = -1
            continue

        # Next hop event: advance through empty buckets, moving due overflow events in.
        b = now & MASK
        while head[b] < 0:
            if in_buckets == 0:
                if n_heap == 0:
                    break
                now = ht[0]
            else:
                now += 1
            while n_heap > 0 and ht[0] < now + WINDOW and n_free > 0:
                t, e = ht[0], hp[0]
                n_heap = _pop(ht, hs, hp, n_heap)
                n_free -= 1
                _append(t & MASK, free[n_free], e, head, tail, ev_entry, ev_next)
                in_buckets += 1
            b = now & MASK
        if head[b] < 0:
            break  # nothing pending
        ev = head[b]
        head[b] = ev_next[ev]
        if head[b] < 0:
            tail[b] = -1
        in_buckets -= 1
        free[n_free] = ev
        n_free += 1
        events += 1
        if events > max_events:
            status = WATCHDOG
            break
        # The hop: take the link first-come first-served, deliver, queue the next hop.
        e = ev_entry[ev]
        link = route_link[e]
        ser = entry_ser[e]
        last = ser < 0
        if last:
            ser = -1 - ser
        start = now if now > link_free_at[link] else link_free_at[link]
        link_free_at[link] = start + ser
        arrival = start + hop_latency + ser
        if not last:
            t = start + hop_latency
            if t < now + WINDOW and n_free > 0:
                n_free -= 1
                _append(t & MASK, free[n_free], e + 1, head, tail, ev_entry, ev_next)
                in_buckets += 1
            elif n_heap == cap:
                status = FULL
                break
            else:
                n_heap = _push(ht, hs, hp, n_heap, t, seq, e + 1)
            seq += 1
        entry_arrival[e] = arrival
        w = waiter[e]
        if w < 0:
            if entry_recv[e]:
                if ready[e]:
                    status = OVERRUN
                    break
                ready[e] = True
        else:
            # The blocked core resumes when the data is in, then pays the receive overhead.
            waiter[e] = -1
            if arrival > core_time[w]:
                core_wait[w] += arrival - core_time[w]
                core_time[w] = arrival
            core_time[w] += recv_overhead
            core_overhead[w] += recv_overhead
            pc[w] += 1
            c = w

    if status == OK:
        for k in range(n_cores):
            if pc[k] < core_ptr[k + 1] or (iteration[k] + 1 < loop_count[k]
                                           and loop_start[k] < loop_end[k]):
                status = DEADLOCK
                break
    return (status, events, core_time, core_busy, core_overhead, core_wait, pc,
            entry_arrival, link_free_at)
