"""simulate(program, target): time a MeshProgram with the Numba event kernel.

This module turns the program and target into the kernel's flat arrays (compute cycles per
instruction, serialisation cycles per message), runs the kernel, and packs a SimResult.
"""

from __future__ import annotations

import time

import numpy as np

from compiler.program import COMPUTE, KIND_NAMES, RECV, SEND, MeshProgram
from compiler.targets import MeshTarget
from wafersim.engine import DEADLOCK, FULL, OVERRUN, WATCHDOG, run_kernel
from wafersim.result import SimResult, SimulationError


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


def kernel_args(program: MeshProgram, target: MeshTarget, max_events: int | None = None):
    """The kernel's positional arguments, in order (also used by the SimPy reference)."""
    if program.width > target.width or program.height > target.height:
        raise SimulationError(f"program needs a {program.width}x{program.height} mesh, target "
                              f"{target.name} has {target.width}x{target.height}")
    if 2 * program.n_hops >= 2**31:
        raise SimulationError(f"program has {program.n_hops:,} message hops; the engine takes "
                              "at most 2**30")
    if max_events is None:
        reps = program.ins_repeats()
        hops = int((np.diff(program.route_ptr) * program.msg_repeats()).sum())
        max_events = 4 * (program.cores + hops + int(reps.sum())) + 16
    entry_ser = message_cycles(program, target)[program.entry_msg].astype(np.int32)
    last = program.route_ptr[1:] - 1
    last = last[np.diff(program.route_ptr) > 0]
    entry_ser[last] = -1 - entry_ser[last]
    arg = program.ins_arg.copy()
    send = program.ins_kind == SEND
    arg[send] = program.route_ptr[arg[send]]
    entry_recv = np.zeros(program.n_hops, dtype=np.bool_)
    entry_recv[program.ins_arg[program.ins_kind == RECV]] = True
    if len(program.loop_count):
        loops = (program.loop_start, program.loop_end, program.loop_count)
    else:
        start = program.core_ptr[:-1]
        loops = (start, start, np.ones(program.cores, dtype=np.int64))
    return (program.core_ptr, program.ins_kind, compute_cycles(program, target), arg,
            program.route_link, entry_ser, program.cores * 4, target.hop_latency_cycles,
            target.send_overhead_cycles, target.recv_overhead_cycles,
            target.compute_overhead_cycles, max_events, *loops, entry_recv)


def simulate(program: MeshProgram, target: MeshTarget, max_events: int | None = None
             ) -> SimResult:
    """Simulate `program` on `target`; raises SimulationError on deadlock or watchdog."""
    args = kernel_args(program, target, max_events)
    t0 = time.perf_counter()
    status, events, core_time, busy, overhead, wait, pc, _arrival, _free = run_kernel(*args)
    wall = time.perf_counter() - t0
    if status == WATCHDOG:
        raise SimulationError(f"watchdog: more than {args[11]:,} events; the program does not "
                              "terminate")
    if status == DEADLOCK:
        raise SimulationError(_deadlock_message(program, pc))
    if status == OVERRUN:
        raise SimulationError("a loop iteration delivered a message before the previous "
                              "iteration's copy was received; simulate the layers unrolled")
    if status == FULL:
        raise SimulationError("the engine's event pool is full (a loop runs far ahead)")
    entry_msg = program.entry_msg
    n_links = program.cores * 4
    msg_reps = program.msg_repeats()
    msg_cycles = message_cycles(program, target) * msg_reps
    msg_bytes = program.msg_bytes * msg_reps
    return SimResult(
        system=target.name, width=program.width, height=program.height,
        clock_hz=target.clock_hz, makespan_cycles=int(core_time.max(initial=0)),
        core_busy=busy, core_overhead=overhead, core_wait=wait,
        core_active=np.diff(program.core_ptr) > 0,
        link_bytes=np.bincount(program.route_link, weights=msg_bytes[entry_msg],
                               minlength=n_links).astype(np.int64),
        link_busy=np.bincount(program.route_link, weights=msg_cycles[entry_msg],
                              minlength=n_links).astype(np.int64),
        messages=int(msg_reps.sum()),
        hops=int((np.diff(program.route_ptr) * msg_reps).sum()), events=int(events),
        sim_wall_s=wall,
        flops=int((program.ins_flops * program.ins_repeats())[program.ins_kind == COMPUTE].sum()),
        meta=dict(program.meta),
    )


def _deadlock_message(program: MeshProgram, pc: np.ndarray) -> str:
    stuck = np.flatnonzero(pc < program.core_ptr[1:])
    parts = []
    for c in stuck[:4]:
        i = pc[c]
        what = KIND_NAMES[program.ins_kind[i]]
        detail = ""
        if what == "recv":
            m = int(program.entry_msg[program.ins_arg[i]])
            src = int(program.msg_src[m])
            detail = f" of message {m} from core ({src % program.width},{src // program.width})"
        parts.append(f"core ({c % program.width},{c // program.width}) at instruction "
                     f"{i - program.core_ptr[c]} ({what}{detail})")
    more = f" and {len(stuck) - 4} more" if len(stuck) > 4 else ""
    return f"deadlock: {len(stuck)} cores never finish: " + "; ".join(parts) + more
