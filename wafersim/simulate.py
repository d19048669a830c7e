"""simulate(program, target): time a MeshProgram with the Numba event kernel.

This module turns the program and target into the kernel's arrays (wafersim.engine describes
them: code words with compute cycles, delivery slots and inline messages; the multicast slot
table), runs the kernel, and packs a SimResult. The conversions are Numba loops over the
program's arrays, so they allocate only their outputs and per-message scratch (no
per-instruction or per-hop temporaries), whatever the integer dtypes of the program's arrays;
values that do not fit the kernel's int32 words raise SimulationError. A stamped program
(compiler.stamp) is run from its parts, never expanded: the glue and the layer body are encoded
once each and the body's words copied into every region (`_encoded_stamped`), and the totals
are tallied copy by copy; the run is the expansion's to the cycle. `simulate_loops` runs one
program with several sets of loop counts (a 1- and a 2-layer step) from one encoding.

The route check runs beside the encoding, and the totals beside the kernel, each in a second
thread (all of them are Numba loops that release the GIL): on a machine with two or more cores
the run takes the encoding and the kernel's time only. A large program's kernel runs on every
core this process may use (`kernel_threads`), which gives the same result to the cycle
(wafersim.engine); then the totals run beside the encoding instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numba
import numpy as np

from compiler.program import COMPUTE, KIND_NAMES, RECV, SEND, MeshProgram, far_core
from compiler.stamp import Stamped
from compiler.targets import MeshTarget
from wafersim.engine import (
    DEADLOCK,
    FULL,
    KIND_BITS,
    MAX_OPERAND,
    OVERRUN,
    SEND_WORDS,
    WATCHDOG,
    run_kernel,
)
from wafersim.result import SimResult, SimulationError, extrapolate

BLOCK_SHIFT = 4  # route entries per block of the entry -> message index: 16


def compute_cycles(program: MeshProgram, target: MeshTarget) -> np.ndarray:
    """Cycles of each instruction's work: max(FLOPs / rate, SRAM bytes / SRAM bandwidth).

    Zero for SEND and RECV, whose cost is the target's fixed overheads and the fabric.
    """
    rate = target.rate(program.dtype)
    flop_cycles = np.ceil(program.ins_flops / rate)
    byte_cycles = np.ceil(program.ins_bytes / target.sram_bytes_per_cycle)
    cycles = np.maximum(flop_cycles, byte_cycles).astype(np.int64)
    return np.where(program.ins_kind == COMPUTE, cycles, 0)


def message_cycles(program: MeshProgram, target: MeshTarget) -> np.ndarray:
    """Serialisation cycles of each message on one link."""
    return np.ceil(program.msg_bytes / target.link_bytes_per_cycle).astype(np.int64)


@numba.njit(cache=True, nogil=True)
def _route_shape(route_link, first, end, width):
    """(hops before the turn) << 2 | direction after it, for a route of at most two straight
    runs (as dimension-ordered routing makes), else -1 (the kernel then reads its links)."""
    n1 = 1
    dir2 = 0
    turned = False
    for e in range(first + 1, end):
        prev, link = route_link[e - 1], route_link[e]
        if link >> 2 != far_core(prev, width):
            return -1
        if not turned and link & 3 == prev & 3:
            n1 += 1
        elif not turned:
            turned = True
            dir2 = link & 3
        elif link & 3 != dir2:
            return -1
    return n1 << 2 | dir2


@numba.njit(cache=True, nogil=True)
def _encode(core_ptr, ins_kind, ins_flops, ins_bytes, ins_arg, rate, sram_bytes_per_cycle,
            route_ptr, route_link, width, msg_bytes, multicast, link_bytes_per_cycle,
            loop_start, loop_end, loop_count):
    """The kernel's arrays (see wafersim.engine): code words, per-core word offsets, loops in
    words, the multicast slot table and the number of delivery slots, and how many
    instructions and hops (`runs`) and SENDs (`sends`) the program runs, with loop repeats.
    Returns (code, code_ptr, loop_start, loop_end, mc_slot, n_slots, runs, sends, error,
    index); error 1 = compute cycles do not fit,
    2 = SEND or RECV of an unknown message / entry, 3 = SEND of a message with no hops, 4 =
    RECV of an intermediate hop of a unicast message, 5 = a loop outside its core's
    instructions, 6 = serialisation cycles of message `index` do not fit, 7 = too many
    receives."""
    n_cores = core_ptr.shape[0] - 1
    n = ins_kind.shape[0]
    n_msgs = msg_bytes.shape[0]
    n_entries = route_ptr[n_msgs]
    code_ptr = np.empty(n_cores + 1, np.int64)
    lstart = np.empty(n_cores, np.int64)
    lend = np.empty(n_cores, np.int64)
    code = np.empty(0, np.int32)
    mc_slot = np.empty(0, np.int32)
    n_slots = 0
    runs = 0  # instructions and hops run
    sends = 0
    # Per message: serialisation cycles (-1 - cycles if multicast) and its delivery: the slot
    # of a unicast message's last entry (-1: not received), or a multicast message's first
    # entry in mc_slot.
    msg = np.empty((n_msgs, 2), np.int32)
    n_mc = 0
    for m in range(n_msgs):
        ser = math.ceil(msg_bytes[m] / link_bytes_per_cycle)
        if ser < 0 or ser > MAX_OPERAND or n_mc > MAX_OPERAND:
            return code, code_ptr, lstart, lend, mc_slot, n_slots, runs, sends, 6, m
        if multicast[m]:
            msg[m, 0] = -1 - np.int32(ser)
            msg[m, 1] = n_mc
            n_mc += route_ptr[m + 1] - route_ptr[m]
        else:
            msg[m, 0] = np.int32(ser)
            msg[m, 1] = -1
    mc_slot = np.full(n_mc, -1, np.int32)
    # entry -> message: block k of 2**BLOCK_SHIFT entries starts in message block_msg[k]
    n_blocks = (n_entries >> BLOCK_SHIFT) + 1
    block_msg = np.empty(n_blocks, np.int32)
    m = 0
    for k in range(n_blocks):
        e0 = k << BLOCK_SHIFT
        while m < n_msgs - 1 and route_ptr[m + 1] <= e0:
            m += 1
        block_msg[k] = m
    n_words = 0
    for i in range(n):
        n_words += SEND_WORDS if ins_kind[i] == SEND else 1
    code = np.empty(n_words, np.int32)
    # One pass writes the words; delivery slots are numbered in the order the cores' RECVs
    # name them, so a SEND's delivery word is filled in by a second pass over the SENDs.
    w = 0
    for c in range(n_cores):
        code_ptr[c] = w
        if not (core_ptr[c] <= loop_start[c] <= loop_end[c] <= core_ptr[c + 1]):
            return code, code_ptr, lstart, lend, mc_slot, n_slots, runs, sends, 5, c
        reps = np.int64(loop_count[c]) if loop_start[c] < loop_end[c] else np.int64(1)
        runs += core_ptr[c + 1] - core_ptr[c] + (reps - 1) * (loop_end[c] - loop_start[c])
        for i in range(core_ptr[c], core_ptr[c + 1] + 1):
            if i == loop_start[c]:
                lstart[c] = w
            if i == loop_end[c]:
                lend[c] = w
            if i == core_ptr[c + 1]:
                break
            kind = ins_kind[i]
            if kind == COMPUTE:
                flop_cycles = math.ceil(ins_flops[i] / rate)
                byte_cycles = math.ceil(ins_bytes[i] / sram_bytes_per_cycle)
                cycles = max(flop_cycles, byte_cycles)
                if cycles < 0 or cycles > MAX_OPERAND:
                    return code, code_ptr, lstart, lend, mc_slot, n_slots, runs, sends, 1, i
                code[w] = np.int32(cycles) << KIND_BITS | COMPUTE
                w += 1
            elif kind == SEND:
                m = ins_arg[i]
                if m < 0 or m >= n_msgs:
                    return code, code_ptr, lstart, lend, mc_slot, n_slots, runs, sends, 2, i
                first = route_ptr[m]
                hops = route_ptr[m + 1] - first
                if hops == 0:
                    return code, code_ptr, lstart, lend, mc_slot, n_slots, runs, sends, 3, i
                r = reps if loop_start[c] <= i < loop_end[c] else 1
                runs += hops * r
                sends += r
                code[w] = np.int32(hops) << KIND_BITS | SEND
                code[w + 1] = first
                code[w + 2] = msg[m, 0]
                code[w + 4] = route_link[first]
                code[w + 5] = _route_shape(route_link, first, first + hops, width)
                w += SEND_WORDS
            else:
                e = ins_arg[i]
                if e < 0 or e >= n_entries:
                    return code, code_ptr, lstart, lend, mc_slot, n_slots, runs, sends, 2, i
                m = block_msg[e >> BLOCK_SHIFT]
                while route_ptr[m + 1] <= e:
                    m += 1
                if msg[m, 0] < 0:
                    k = msg[m, 1] + e - route_ptr[m]
                    if mc_slot[k] < 0:
                        mc_slot[k] = n_slots
                        n_slots += 1
                    s = mc_slot[k]
                elif e != route_ptr[m + 1] - 1:
                    return code, code_ptr, lstart, lend, mc_slot, n_slots, runs, sends, 4, i
                else:
                    if msg[m, 1] < 0:
                        msg[m, 1] = n_slots
                        n_slots += 1
                    s = msg[m, 1]
                if n_slots > MAX_OPERAND:
                    return code, code_ptr, lstart, lend, mc_slot, n_slots, runs, sends, 7, i
                code[w] = np.int32(s) << KIND_BITS | RECV
                w += 1
    code_ptr[n_cores] = w
    w = 0
    for i in range(n):
        if ins_kind[i] != SEND:
            w += 1
            continue
        m = ins_arg[i]
        first = route_ptr[m]
        code[w + 3] = msg[m, 1] - first if msg[m, 0] < 0 else msg[m, 1]
        w += SEND_WORDS
    return code, code_ptr, lstart, lend, mc_slot, n_slots, runs, sends, 0, 0


@numba.njit(cache=True, nogil=True)
def _tally(core_ptr, ins_kind, ins_arg, ins_flops, ins_bytes, loop_start, loop_end, loop_count,
           route_ptr, route_link, msg_bytes, link_bytes_per_cycle, n_links):
    """Totals with loop repeats: (messages sent, hops, FLOPs, SRAM bytes of compute, bytes and
    busy cycles per link)."""
    n_cores = core_ptr.shape[0] - 1
    link_bytes = np.zeros(n_links, np.int64)
    link_busy = np.zeros(n_links, np.int64)
    messages = 0
    hops = 0
    flops = 0
    sram = 0
    for c in range(n_cores):
        for i in range(core_ptr[c], core_ptr[c + 1]):
            reps = np.int64(loop_count[c]) if loop_start[c] <= i < loop_end[c] else np.int64(1)
            kind = ins_kind[i]
            if kind == COMPUTE:
                flops += reps * np.int64(ins_flops[i])
                sram += reps * np.int64(ins_bytes[i])
            elif kind == SEND:
                m = ins_arg[i]
                messages += reps
                hops += reps * (route_ptr[m + 1] - route_ptr[m])
                nbytes = reps * np.int64(msg_bytes[m])
                ser = reps * np.int64(math.ceil(msg_bytes[m] / link_bytes_per_cycle))
                for e in range(route_ptr[m], route_ptr[m + 1]):
                    link = route_link[e]
                    link_bytes[link] += nbytes
                    link_busy[link] += ser
    return messages, hops, flops, sram, link_bytes, link_busy


def totals(program: MeshProgram | Stamped, target: MeshTarget) -> dict:
    """What one run of `program` does, every loop iteration counted: messages, hops, FLOPs,
    SRAM bytes read and written by compute, and bytes and busy cycles per link. A stamped
    program's from its parts: the glue's, then the body's for each copy, with that copy's
    layer counts and its links."""
    keys = ("messages", "hops", "flops", "sram_bytes", "link_bytes", "link_busy")
    bw = float(target.link_bytes_per_cycle)

    def tally(p, loops):
        return list(_tally(np.asarray(p.core_ptr, np.int64), p.ins_kind, p.ins_arg, p.ins_flops,
                           p.ins_bytes, *loops, p.route_ptr, p.route_link, p.msg_bytes, bw,
                           p.cores * 4))

    if not isinstance(program, Stamped):
        return dict(zip(keys, tally(program, _loops(program))))
    g, t = program.glue, program.body
    out = tally(g, _no_loop(g, g.loop_start))  # the glue's loop is where the body goes
    cores = np.flatnonzero(np.diff(t.core_ptr))
    counts = np.ones(program.cores, np.int64)
    for off in program.offsets:
        counts[cores] = program.loop_count[cores + off]
        part = tally(t, (t.core_ptr[:-1], t.core_ptr[1:], counts))
        for i in range(4):
            out[i] += part[i]
        for i in (4, 5):  # this copy's links: 4 per core further on
            _add_shifted(out[i], part[i], 4 * int(off))
    return dict(zip(keys, out))


def _add_shifted(out: np.ndarray, a: np.ndarray, shift: int) -> None:
    """out[i + shift] += a[i] (a's entries shifted out of range are zero)."""
    if shift >= 0:
        out[shift:] += a[:len(a) - shift]
    else:
        out[:shift] += a[-shift:]


def _loops(program: MeshProgram):
    if len(program.loop_count):
        return tuple(np.asarray(a, dtype=np.int64) for a in (
            program.loop_start, program.loop_end, program.loop_count))
    return _no_loop(program)


def _no_loop(program: MeshProgram, at: np.ndarray | None = None):
    """Loop arrays for `program` run once (an empty loop at instruction `at` of each core)."""
    start = np.asarray(program.core_ptr[:-1] if at is None else at, dtype=np.int64)
    return start, start, np.ones(program.cores, dtype=np.int64)


_ROUTE_FAULTS = {1: "starts away from its source core", 2: "leaves the mesh (a missing core)",
                 3: "jumps between cores that are not neighbours",
                 4: "does not end at its destination core"}


@numba.njit(cache=True, nogil=True)
def _bad_route(msg_src, msg_dst, route_ptr, route_link, width, height):
    """(message, fault) of the first route that is not a walk over the mesh's links from its
    source to its destination (fault codes in _ROUTE_FAULTS), or (-1, 0)."""
    for m in range(msg_src.shape[0]):
        at = np.int64(msg_src[m])
        for e in range(route_ptr[m], route_ptr[m + 1]):
            link = np.int64(route_link[e])
            core, d = link // 4, link % 4
            if core != at:
                return m, 1 if e == route_ptr[m] else 3
            x, y = core % width, core // width
            if (d == 0 and x == width - 1) or (d == 1 and x == 0) or (d == 2 and y == 0) or (
                    d == 3 and y == height - 1) or core < 0 or core >= width * height:
                return m, 2
            at = core + (1 if d == 0 else -1 if d == 1 else -width if d == 2 else width)
        if at != msg_dst[m] and route_ptr[m + 1] > route_ptr[m]:
            return m, 4
    return -1, 0


class _Encoded(NamedTuple):
    """_encode's arrays and counts."""
    code: np.ndarray
    code_ptr: np.ndarray
    loop_start: np.ndarray
    loop_end: np.ndarray
    mc_slot: np.ndarray
    n_slots: int
    runs: int
    sends: int


def _encoded(program: MeshProgram, target: MeshTarget, loops, what: str = "") -> _Encoded:
    """_encode of `program` with `loops`; an error names the instruction (in `what`)."""
    *out, err, at = _encode(
        np.asarray(program.core_ptr, np.int64), program.ins_kind, program.ins_flops,
        program.ins_bytes, program.ins_arg, float(target.rate(program.dtype)),
        float(target.sram_bytes_per_cycle), program.route_ptr, program.route_link,
        program.width, program.msg_bytes, program.msg_multicast,
        float(target.link_bytes_per_cycle), *loops)
    if err:
        why = {1: f"its compute takes more than {MAX_OPERAND:,} cycles",
               2: "it names an unknown message or route entry",
               3: "it sends a message with an empty route",
               4: "it receives an intermediate hop of a unicast message",
               5: "the core's loop lies outside its instructions",
               6: f"it takes more than {MAX_OPERAND:,} cycles per link",
               7: f"the program receives more than {MAX_OPERAND:,} route entries"}[err]
        name = {5: "core", 6: "message"}.get(err, "instruction")
        raise SimulationError(f"{name} {at}{what} cannot be simulated: {why}")
    return _Encoded(*out)


def _encoded_stamped(st: Stamped, target: MeshTarget) -> tuple[_Encoded, np.ndarray]:
    """The encoding of a stamped program's expansion, and its core_ptr, without expanding it:
    the glue and the body are encoded once each, then the body's words are copied into every
    copy's cores (`_stamp_code`). Delivery slots: the glue's, then each copy's in turn."""
    f = st.frame()
    g, t, k = st.glue, st.body, st.copies
    ge = _encoded(g, target, _no_loop(g, g.loop_start), " of the stamped program's glue")
    te = _encoded(t, target, _no_loop(t), " of the stamped program's layer body")
    n_slots = ge.n_slots + k * te.n_slots
    if n_slots > MAX_OPERAND:
        raise SimulationError(f"the program receives {n_slots:,} route entries; the engine "
                              f"takes at most {MAX_OPERAND:,}")
    body_words = np.where(f.copy_of >= 0, np.diff(te.code_ptr)[f.tcore], 0)
    code_ptr = np.zeros(st.cores + 1, np.int64)
    np.cumsum(np.diff(ge.code_ptr) + body_words, out=code_ptr[1:])
    loop_start = code_ptr[:-1] + (ge.loop_start - ge.code_ptr[:-1])
    code = np.empty(int(code_ptr[-1]), np.int32)
    runs, sends = _stamp_code(ge.code, ge.code_ptr, ge.loop_start, te.code, te.code_ptr,
                              f.copy_of, st.offsets, st.loop_count, code_ptr, code, g.n_hops,
                              t.n_hops, ge.n_slots, te.n_slots, len(ge.mc_slot),
                              len(te.mc_slot))
    received = te.mc_slot >= 0
    copies = np.where(received, te.mc_slot + ge.n_slots, -1) + np.outer(
        np.arange(k) * te.n_slots, received)
    mc_slot = np.concatenate([ge.mc_slot, copies.ravel().astype(np.int32)])
    return _Encoded(code, code_ptr, loop_start, loop_start + body_words, mc_slot, n_slots,
                    ge.runs + runs, ge.sends + sends), f.core_ptr


@numba.njit(cache=True, nogil=True)
def _stamp_code(g_code, g_ptr, g_split, t_code, t_ptr, copy_of, offsets, loop_count, out_ptr,
                out, g_entries, t_entries, g_slots, t_slots, g_mc, t_mc):
    """The words of a stamped program (as _stamp_column writes its instructions): each core's
    glue words before the split, its copy's body words, the rest of its glue words; in copy k
    a body word's delivery slot, route entry, multicast table offset and first link are moved
    to copy k's. Returns (instructions and hops run, SENDs run) of the copies."""
    runs = 0
    sends = 0
    for c in range(out_ptr.shape[0] - 1):
        o = out_ptr[c]
        for w in range(g_ptr[c], g_split[c]):
            out[o] = g_code[w]
            o += 1
        k = copy_of[c]
        if k >= 0:
            tc = c - offsets[k]
            reps = np.int64(loop_count[c])
            slots = g_slots + k * t_slots
            entries = g_entries + k * t_entries
            w = t_ptr[tc]
            while w < t_ptr[tc + 1]:
                word = t_code[w]
                kind = word & 3
                if kind == SEND:
                    out[o:o + SEND_WORDS] = t_code[w:w + SEND_WORDS]
                    out[o + 1] += entries
                    if t_code[w + 2] < 0:  # multicast: mc_slot[entry + d] is the entry's slot
                        out[o + 3] += g_mc + k * t_mc - entries
                    elif t_code[w + 3] >= 0:
                        out[o + 3] += slots
                    out[o + 4] += 4 * offsets[k]
                    runs += reps * (1 + (word >> KIND_BITS))
                    sends += reps
                    o += SEND_WORDS
                    w += SEND_WORDS
                    continue
                out[o] = word + (slots << KIND_BITS) if kind == RECV else word
                runs += reps
                o += 1
                w += 1
        for w in range(g_split[c], g_ptr[c + 1]):
            out[o] = g_code[w]
            o += 1
    return runs, sends


def _checked_routes(program: MeshProgram | Stamped) -> np.ndarray:
    """The program's route_link, after checking that every route walks the mesh from its
    message's source to its destination."""
    names = ("msg_src", "msg_dst", "route_ptr", "route_link")
    cols = (program.messages(names) if isinstance(program, Stamped)
            else {n: getattr(program, n) for n in names})
    m, why = _bad_route(cols["msg_src"], cols["msg_dst"], cols["route_ptr"], cols["route_link"],
                        program.width, program.height)
    if m >= 0:
        src = int(cols["msg_src"][m])
        raise SimulationError(f"message {m} from core ({src % program.width},"
                              f"{src // program.width}): its route {_ROUTE_FAULTS[why]}")
    return cols["route_link"]


def kernel_args(program: MeshProgram | Stamped, target: MeshTarget,
                max_events: int | None = None, arrivals: bool = True):
    """The kernel's positional arguments, in order (also used by the SimPy reference).

    `arrivals`: the kernel records every route entry's delivery time (8 bytes per hop; needed
    by callers that read the kernel's `entry_arrival`, not by `simulate`). A stamped program
    is encoded from its parts (`_encoded_stamped`), never expanded."""
    if program.width > target.width or program.height > target.height:
        raise SimulationError(f"program needs a {program.width}x{program.height} mesh, target "
                              f"{target.name} has {target.width}x{target.height}")
    if program.n_hops >= 2**31 - 1 or program.n_messages > MAX_OPERAND:
        raise SimulationError(f"program has {program.n_hops:,} message hops and "
                              f"{program.n_messages:,} messages; the engine takes at most "
                              f"2**31 - 2 and {MAX_OPERAND:,}")
    with ThreadPoolExecutor(1) as pool:  # the encoding reads no link beyond a route's first
        routes = pool.submit(_checked_routes, program)
        try:
            if isinstance(program, Stamped):
                enc, core_ptr = _encoded_stamped(program, target)
                loop_count = np.asarray(program.loop_count, np.int64)
            else:
                loops = _loops(program)
                enc = _encoded(program, target, loops)
                core_ptr, loop_count = np.asarray(program.core_ptr, np.int64), loops[2]
        finally:
            route_link = routes.result()  # a bad route is the first error reported
    if max_events is None:
        max_events = 4 * (program.cores + enc.runs) + 16
    return (core_ptr, enc.code_ptr, enc.code, route_link, enc.mc_slot, enc.n_slots,
            program.cores * 4, program.width, target.hop_latency_cycles,
            target.send_overhead_cycles, target.recv_overhead_cycles,
            target.compute_overhead_cycles, max_events, enc.sends, enc.loop_start,
            enc.loop_end, loop_count, arrivals)


MAX_EVENTS_ARG = 12  # positions of max_events and loop_count in kernel_args' tuple
LOOP_COUNT_ARG = 16
THREAD_MIN_HOPS = 1 << 20  # smaller programs run on one thread: starting more costs more


def kernel_threads(program: MeshProgram | Stamped) -> int:
    """Threads for the kernel: the cores this process may use (WAFERSIM_THREADS overrides),
    or 1 for programs of fewer than THREAD_MIN_HOPS route entries."""
    env = os.environ.get("WAFERSIM_THREADS", "").strip()
    if env and (not env.isdigit() or int(env) < 1):
        raise SimulationError(f"WAFERSIM_THREADS={env!r} must be a whole number >= 1")
    if program.n_hops < THREAD_MIN_HOPS:
        return 1
    if env:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def simulate(program: MeshProgram | Stamped, target: MeshTarget, max_events: int | None = None,
             threads: int | None = None) -> SimResult:
    """Simulate `program` (or a stamped program's parts, as its expansion) on `target`;
    raises SimulationError on deadlock or watchdog. `threads`: the kernel's (default
    `kernel_threads`); any number gives the same result."""
    return simulate_loops(program, target, [None], max_events, threads)[0]


def simulate_loops(program: MeshProgram | Stamped, target: MeshTarget, counts,
                   max_events: int | None = None, threads: int | None = None
                   ) -> list[SimResult]:
    """`simulate` of `program` once per entry of `counts`: per-core loop counts (None: the
    program's own), as wafersim.layer's 1- and 2-layer steps. The program is encoded once, with
    the largest counts (its code words do not depend on them), and every run reuses it."""
    threads = kernel_threads(program) if threads is None else threads
    runs = [program if c is None else dataclasses.replace(
        program, loop_count=np.asarray(c, np.int64)) for c in counts]
    widest = runs[0] if len(runs) == 1 else dataclasses.replace(
        program, loop_count=np.max([r.loop_count for r in runs], axis=0))
    out = []
    with ThreadPoolExecutor(1) as pool:
        # The totals beside the kernel; beside the encoding when the kernel takes every core.
        tallied = [pool.submit(totals, run, target) for run in runs] if threads > 1 else None
        args = kernel_args(widest, target, max_events, arrivals=False)
        if tallied is None:
            tallied = [pool.submit(totals, run, target) for run in runs]
        else:
            tallied[-1].result()  # one worker, in order: the last done means all are
        for count, run, tally in zip(counts, runs, tallied):
            t0 = time.perf_counter()
            loop_count = args[LOOP_COUNT_ARG] if count is None else run.loop_count
            status, events, core_time, busy, overhead, wait, pc, _arrival, _free = run_kernel(
                *args[:LOOP_COUNT_ARG], loop_count, *args[LOOP_COUNT_ARG + 1:],
                threads=threads)
            wall = time.perf_counter() - t0
            _raise_status(status, run, pc, args[MAX_EVENTS_ARG])
            tot = tally.result()
            out.append(SimResult(
                system=target.name, width=run.width, height=run.height,
                clock_hz=target.clock_hz, makespan_cycles=int(core_time.max(initial=0)),
                core_busy=busy, core_overhead=overhead, core_wait=wait,
                core_active=np.diff(args[0]) > 0,
                link_bytes=tot["link_bytes"], link_busy=tot["link_busy"],
                messages=int(tot["messages"]), hops=int(tot["hops"]), events=int(events),
                sim_wall_s=wall, flops=int(tot["flops"]), sram_bytes=int(tot["sram_bytes"]),
                meta=dict(run.meta)))
    return out


def _raise_status(status: int, program: MeshProgram | Stamped, pc: np.ndarray,
                  max_events: int) -> None:
    if status == WATCHDOG:
        raise SimulationError(f"watchdog: more than {max_events:,} events; the program does "
                              "not terminate")
    if status == DEADLOCK:
        raise SimulationError(_deadlock_message(
            program.expand(True) if isinstance(program, Stamped) else program, pc))
    if status == OVERRUN:
        raise SimulationError("a loop iteration delivered a message before the previous "
                              "iteration's copy was received; simulate the layers unrolled")
    if status == FULL:
        raise SimulationError("the engine's event pool is full (a loop runs far ahead)")


def simulate_sampled(lower, target: MeshTarget, full: int, sample: tuple[int, int]
                     ) -> SimResult:
    """`lower(steps)` gives a program running `steps` of a loop's `full` identical steps
    (compiler.algorithms.meshgemm's sampled steps); both sampled programs are simulated and the
    result extrapolated to `full` steps (wafersim.result.extrapolate)."""
    short, long_ = sample
    t_long = simulate(lower(long_), target)  # the larger first: its peak with least else held
    return extrapolate(simulate(lower(short), target), t_long, short, long_, full)


def _deadlock_message(program: MeshProgram, pc: np.ndarray) -> str:
    stuck = np.flatnonzero(pc < program.core_ptr[1:])
    parts = []
    for c in stuck[:4]:
        i = pc[c]
        what = KIND_NAMES[program.ins_kind[i]]
        detail = ""
        if what == "recv":
            e = int(program.ins_arg[i])
            m = int(np.searchsorted(program.route_ptr, e, side="right")) - 1
            src = int(program.msg_src[m])
            detail = f" of message {m} from core ({src % program.width},{src // program.width})"
        parts.append(f"core ({c % program.width},{c // program.width}) at instruction "
                     f"{i - program.core_ptr[c]} ({what}{detail})")
    more = f" and {len(stuck) - 4} more" if len(stuck) > 4 else ""
    return f"deadlock: {len(stuck)} cores never finish: " + "; ".join(parts) + more
