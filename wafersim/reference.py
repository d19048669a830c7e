"""A plain SimPy implementation of the engine's message-level model, for checking and speed.

It takes the same arguments as `wafersim.engine.run_kernel` and follows the same steps, with
SimPy's environment as the clock and event queue: each heap push of the kernel is one
`env.timeout` here, and SimPy orders events of equal time by scheduling order, as the kernel's
(time, push order) heap does. So the two must agree exactly, cycle for cycle. It is slow by
design (Python objects per event) and never used by `simulate`.
"""

from __future__ import annotations

import numpy as np
import simpy

from wafersim.engine import COMPUTE, DEADLOCK, OK, SEND


def run_reference(core_ptr, ins_kind, ins_cycles, ins_arg, route_link, entry_ser, n_links,
                  hop_latency, send_overhead, recv_overhead, compute_overhead, max_events=None,
                  loop_start=None, loop_end=None, loop_count=None, entry_recv=None):
    """Returns (status, events, core_time, core_busy, core_overhead, core_wait)."""
    if loop_count is not None and np.any(np.asarray(loop_count) > 1):
        raise ValueError("the SimPy reference does not run looped programs")
    n_cores = len(core_ptr) - 1
    env = simpy.Environment()
    core_time = [0] * n_cores
    busy = [0] * n_cores
    overhead = [0] * n_cores
    wait = [0] * n_cores
    pc = [int(p) for p in core_ptr[:-1]]
    end = [int(p) for p in core_ptr[1:]]
    arrival: dict[int, int] = {}
    waiter: dict[int, int] = {}
    free_at = [0] * n_links
    events = [0]

    def at(time, callback):
        env.timeout(time - env.now).callbacks.append(callback)

    def run_core(c):
        while pc[c] < end[c]:
            i = pc[c]
            if ins_kind[i] == COMPUTE:
                core_time[c] += int(ins_cycles[i]) + compute_overhead
                busy[c] += int(ins_cycles[i])
                overhead[c] += compute_overhead
            elif ins_kind[i] == SEND:
                core_time[c] += send_overhead
                overhead[c] += send_overhead
                at(core_time[c], lambda _ev, e=int(ins_arg[i]): hop(e))
            else:
                e = int(ins_arg[i])
                if e not in arrival:
                    waiter[e] = c
                    return
                receive(c, arrival[e])
            pc[c] += 1

    def receive(c, t_arrival):
        if t_arrival > core_time[c]:
            wait[c] += t_arrival - core_time[c]
            core_time[c] = t_arrival
        core_time[c] += recv_overhead
        overhead[c] += recv_overhead

    def hop(e):
        events[0] += 1
        link, ser = int(route_link[e]), int(entry_ser[e])
        last = ser < 0
        if last:
            ser = -1 - ser
        start = max(env.now, free_at[link])
        free_at[link] = start + ser
        arrival[e] = start + hop_latency + ser
        if not last:
            at(start + hop_latency, lambda _ev, nxt=e + 1: hop(nxt))
        c = waiter.pop(e, None)
        if c is not None:
            receive(c, arrival[e])
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
