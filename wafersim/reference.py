"""A plain SimPy implementation of the engine's message-level model, for checking and speed.

It takes the same arguments as `wafersim.engine.run_kernel` and follows the same model, with
SimPy's environment as the clock and event queue: each hop request the kernel queues is one
`env.timeout` here. The requests of one time are collected into a round and granted link by
link, each link's in port order (wafersim.engine's module doc), by an arbiter scheduled after
them; requests made while it runs (zero-latency hops) form the next round. The kernel gets the
same order differently, by queueing each port's events apart, so the two must agree exactly,
cycle for cycle. It reads each hop's link from `route_link` (the kernel steps straight routes
itself) and keeps deliveries in dicts, so it also checks the kernel's route stepping, slots and
event buckets. It is slow by design (Python objects per event) and never used by `simulate`.
"""

from __future__ import annotations

import numpy as np
import simpy

from wafersim.engine import COMPUTE, DEADLOCK, INJECT, KIND_BITS, OK, SEND, SEND_WORDS


def run_reference(core_ptr, code_ptr, code, route_link, mc_slot, n_slots, n_links, width,
                  hop_latency, send_overhead, recv_overhead, compute_overhead, max_events=None,
                  max_pending=None, loop_start=None, loop_end=None, loop_count=None,
                  record_arrivals=False):
    """Returns (status, events, core_time, core_busy, core_overhead, core_wait)."""
    if loop_count is not None and np.any(np.asarray(loop_count) > 1):
        raise ValueError("the SimPy reference does not run looped programs")
    n_cores = len(core_ptr) - 1
    env = simpy.Environment()
    core_time = [0] * n_cores
    busy = [0] * n_cores
    overhead = [0] * n_cores
    wait = [0] * n_cores
    pc = [int(p) for p in code_ptr[:-1]]  # positions in `code`
    end = [int(p) for p in code_ptr[1:]]
    arrival: dict[int, int] = {}  # delivery slot -> time
    waiter: dict[int, int] = {}  # delivery slot -> blocked core
    free_at = [0] * n_links
    events = [0]
    requests: list[tuple[int, int, tuple, int]] = []  # this round's: (link, port, msg, entry)

    def at(time, callback):
        env.timeout(time - env.now).callbacks.append(callback)

    def run_core(c):
        while pc[c] < end[c]:
            word = int(code[pc[c]])
            kind, operand = word & ((1 << KIND_BITS) - 1), word >> KIND_BITS
            if kind == COMPUTE:
                core_time[c] += operand + compute_overhead
                busy[c] += operand
                overhead[c] += compute_overhead
            elif kind == SEND:
                core_time[c] += send_overhead
                overhead[c] += send_overhead
                first, ser, delivery = (int(v) for v in code[pc[c] + 1:pc[c] + 4])
                message = (first + operand - 1, ser, delivery)  # last entry, ser, delivery
                at(core_time[c], lambda _ev, e=first, msg=message: request(msg, e, INJECT))
                pc[c] += SEND_WORDS - 1
            else:
                if operand not in arrival:
                    waiter[operand] = c
                    return
                receive(c, arrival.pop(operand))
            pc[c] += 1

    def receive(c, t_arrival):
        if t_arrival > core_time[c]:
            wait[c] += t_arrival - core_time[c]
            core_time[c] = t_arrival
        core_time[c] += recv_overhead
        overhead[c] += recv_overhead

    def request(msg, e, port):
        if not requests:
            at(env.now, arbitrate)  # after every request already queued for now
        requests.append((int(route_link[e]), port, msg, e))

    def arbitrate(_ev):
        batch = list(requests)
        requests.clear()
        by_link: dict[int, list] = {}
        for i, (link, port, msg, e) in enumerate(batch):
            by_link.setdefault(link, []).append((port, i, msg, e))
        for link, asks in by_link.items():
            for _port, _i, msg, e in sorted(asks, key=lambda a: a[:2]):
                hop(msg, e, link)

    def hop(msg, e, link):
        events[0] += 1
        last_entry, ser, delivery = msg
        multicast = ser < 0
        if multicast:
            ser = -1 - ser
        last = e == last_entry
        start = max(env.now, free_at[link])
        free_at[link] = start + ser
        t_arrival = start + hop_latency + ser
        if not last:
            at(start + hop_latency,
               lambda _ev, nxt=e + 1, port=link & 3: request(msg, nxt, port))
        if multicast:
            slot = int(mc_slot[e + delivery])
        else:
            slot = delivery if last else -1
        if slot < 0:
            return
        c = waiter.pop(slot, None)
        if c is None:
            arrival[slot] = t_arrival
        else:
            receive(c, t_arrival)
            pc[c] += 1
            run_core(c)

    def core_event(c):
        events[0] += 1
        run_core(c)

    for c in range(n_cores):
        if end[c] > pc[c]:
            at(0, lambda _ev, c=c: core_event(c))
    env.run()
    status = OK if all(p >= q for p, q in zip(pc, end, strict=False)) else DEADLOCK
    return (status, events[0], np.array(core_time), np.array(busy), np.array(overhead),
            np.array(wait))
