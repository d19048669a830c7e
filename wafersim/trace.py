"""Per-instruction timelines of chosen cores, and Chrome / Perfetto trace-event export.

The engine does not record when each instruction starts, but it can record when every route
entry's delivery arrives (`record_arrivals`). A core's timeline depends only on its own
instructions and the arrival times of what it receives (wafersim.engine: COMPUTE takes its
cycles plus the compute overhead, SEND the send overhead, RECV waits for its delivery and then
pays the receive overhead), so replaying a core's instruction stream against the recorded
arrivals gives its exact start and end time of every instruction. The replay is checked
against the engine's own per-core totals (finish time, wait cycles); a mismatch raises.

Limitation: a layer loop reuses route entries, so the engine keeps only the latest arrival of
each entry. A looped program (several layers per region) is therefore traced with each
region's loop run once (one layer per region, the `--layers one` base run); the trace says so
in its metadata (`loop_capped`). The trace is bounded: at most `max_cores` cores (evenly
sampled among the active ones) and `max_events` events in all (each core's stream is cut
after its share; `truncated` says so).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numba
import numpy as np

from compiler.program import COMPUTE, RECV, SEND, MeshProgram
from compiler.targets import MeshTarget
from wafersim.engine import DEADLOCK, OK, run_kernel
from wafersim.result import SimulationError
from wafersim.simulate import compute_cycles, kernel_args

KINDS = {COMPUTE: "compute", SEND: "send", RECV: "recv"}


@dataclasses.dataclass(frozen=True)
class CoreTimeline:
    """One core's instructions in order: kind, start and end cycle, cycles waited before it
    (RECV only: blocked on its delivery; the instruction's own span follows the wait)."""

    core: int
    kind: np.ndarray
    start: np.ndarray  # cycle the instruction began (after any wait)
    end: np.ndarray
    wait: np.ndarray


@dataclasses.dataclass(frozen=True)
class Timelines:
    cores: list[CoreTimeline]
    makespan_cycles: int
    clock_hz: float
    width: int
    loop_capped: bool  # the program's layer loops were run once (see the module doc)


@numba.njit(cache=True)
def _replay(kind, cycles, arrival, compute_oh, send_oh, recv_oh):
    n = kind.shape[0]
    start = np.empty(n, np.int64)
    end = np.empty(n, np.int64)
    wait = np.zeros(n, np.int64)
    t = np.int64(0)
    for i in range(n):
        if kind[i] == RECV:
            a = arrival[i]
            if a > t:
                wait[i] = a - t
                t = a
            start[i] = t
            t += recv_oh
        elif kind[i] == SEND:
            start[i] = t
            t += send_oh
        else:
            start[i] = t
            t += cycles[i] + compute_oh
        end[i] = t
    return start, end, wait


def sample_cores(active: np.ndarray, n: int, first: int | None = None) -> list[int]:
    """At most n active cores, evenly spread over the active ones (plus `first`, if given)."""
    idx = np.flatnonzero(active)
    if len(idx) > n:
        idx = idx[np.linspace(0, len(idx) - 1, n).round().astype(np.int64)]
    out = list(dict.fromkeys(([first] if first is not None else []) + idx.tolist()))
    return out[:max(n, 1)]


def core_timelines(program: MeshProgram, target: MeshTarget, cores: list[int] | None = None,
                   max_cores: int = 64) -> Timelines:
    """Simulate `program` with arrivals recorded and replay the chosen cores' instructions
    (default: `max_cores` evenly sampled active cores, the last to finish first)."""
    capped = program.looped
    if capped:
        program = dataclasses.replace(program, loop_count=np.minimum(program.loop_count, 1))
    args = kernel_args(program, target, arrivals=True)
    status, _ev, core_time, _busy, _oh, core_wait, _pc, arrival, _free = run_kernel(*args)
    if status != OK:
        raise SimulationError("deadlock" if status == DEADLOCK else
                              f"the engine stopped with status {status}")
    active = np.diff(program.core_ptr) > 0
    if cores is None:
        cores = sample_cores(active, max_cores, int(np.argmax(core_time)))
    for c in cores:
        if not 0 <= c < program.cores:
            raise ValueError(f"core {c} is not on the {program.width}x{program.height} mesh")
    cyc = compute_cycles(program, target)
    out = []
    for c in cores:
        lo, hi = int(program.core_ptr[c]), int(program.core_ptr[c + 1])
        kind = np.asarray(program.ins_kind[lo:hi], dtype=np.int64)
        arr = np.where(kind == RECV,
                       arrival[np.where(kind == RECV, program.ins_arg[lo:hi], 0)], 0)
        start, end, wait = _replay(kind, cyc[lo:hi], arr.astype(np.int64),
                                   target.compute_overhead_cycles, target.send_overhead_cycles,
                                   target.recv_overhead_cycles)
        done = int(end[-1]) if hi > lo else 0
        if done != core_time[c] or int(wait.sum()) != core_wait[c]:
            raise SimulationError(f"timeline replay of core {c} disagrees with the engine "
                                  f"({done} vs {core_time[c]} cycles)")
        out.append(CoreTimeline(c, kind, start, end, wait))
    return Timelines(out, int(core_time.max(initial=0)), target.clock_hz, program.width, capped)


def trace_events(tl: Timelines, max_events: int = 200_000) -> dict:
    """Chrome trace-event JSON (chrome://tracing, ui.perfetto.dev): one thread per core,
    "X" (complete) events per instruction, plus "wait" events for blocked receives. Times are
    microseconds of simulated time."""
    us = 1e6 / tl.clock_hz
    per_core = max(max_events // max(len(tl.cores), 1), 1)
    events: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
                           "args": {"name": "wafer cores"}}]
    truncated = False
    for ct in tl.cores:
        x, y = ct.core % tl.width, ct.core // tl.width
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": ct.core,
                       "args": {"name": f"core ({x},{y})"}})
        n = 0
        for k, s, e, w in zip(ct.kind.tolist(), ct.start.tolist(), ct.end.tolist(),
                              ct.wait.tolist()):
            if n >= per_core:
                truncated = True
                break
            if w:
                events.append({"name": "wait", "cat": "wait", "ph": "X", "pid": 0,
                               "tid": ct.core, "ts": (s - w) * us, "dur": w * us})
                n += 1
            events.append({"name": KINDS[k], "cat": KINDS[k], "ph": "X", "pid": 0,
                           "tid": ct.core, "ts": s * us, "dur": (e - s) * us})
            n += 1
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"source": "wafersim", "makespan_cycles": tl.makespan_cycles,
                          "clock_hz": tl.clock_hz, "cores": [c.core for c in tl.cores],
                          "loop_capped": tl.loop_capped, "truncated": truncated,
                          "note": "per-instruction times replayed from the engine's recorded "
                                  "arrivals; loop_capped: each region's layer loop run once"}}


def write_trace(program: MeshProgram, target: MeshTarget, path: str | Path,
                max_cores: int = 64, max_events: int = 200_000) -> dict:
    """Write the trace of `max_cores` sampled cores to `path`; returns its otherData."""
    trace = trace_events(core_timelines(program, target, max_cores=max_cores), max_events)
    Path(path).write_text(json.dumps(trace))
    return trace["otherData"]
