"""Timing model: closed-form cases, invariants on random programs, and the SimPy twin."""

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.algorithms.meshgemm import lower_gemm
from compiler.algorithms.meshgemv import lower_gemv
from compiler.program import OP_MATMUL_ACC, ProgramBuilder
from compiler.targets import WSE2
from wafersim.engine import run_kernel
from wafersim.reference import run_reference
from wafersim.result import SimulationError
from wafersim.simulate import kernel_args, simulate

T = dataclasses.replace(WSE2.with_mesh(16, 16), hop_latency_cycles=3, send_overhead_cycles=5,
                        recv_overhead_cycles=7, compute_overhead_cycles=2)


def one_message(src, dst, nbytes, width=16, height=16):
    bld = ProgramBuilder(width, height)
    buf_s = bld.buffers(src, 1, max(1, nbytes // 2))
    buf_d = bld.buffers(dst, 1, max(1, nbytes // 2))
    m = bld.messages(src, dst, nbytes, 0)
    bld.send(src, 0, m, buf_s)
    bld.recv(dst, 0, m, buf_d)
    return bld.build()


@pytest.mark.parametrize("hops", [1, 2, 5, 15])
@pytest.mark.parametrize("nbytes", [4, 64, 1000])
def test_one_message_over_h_hops(hops, nbytes):
    prog = one_message(0, hops, nbytes)  # along row 0
    res = simulate(prog, T)
    ser = -(-nbytes // int(T.link_bytes_per_cycle))
    expected = T.send_overhead_cycles + hops * T.hop_latency_cycles + ser + T.recv_overhead_cycles
    assert res.makespan_cycles == expected
    assert res.core_wait[hops] == expected - T.recv_overhead_cycles


def test_xy_route_turns_once_and_costs_manhattan_hops():
    src, dst = 0, 5 * 16 + 7  # (0,0) -> (7,5)
    res = simulate(one_message(src, dst, 40), T)
    assert res.hops == 12
    assert res.makespan_cycles == 5 + 12 * 3 + 10 + 7


def test_two_messages_contending_for_one_link_serialise():
    bld = ProgramBuilder(4, 1)
    s0, s1 = bld.buffers([0, 1], 1, 50)
    d0, d1 = bld.buffers([3, 3], 1, 50)
    m = bld.messages([0, 1], 3, 100, 0)  # both cross links 1->2 and 2->3
    bld.send([0, 1], 0, m, [s0, s1])
    bld.recv([3, 3], 0, m, [d0, d1])
    res = simulate(bld.build(), T)
    ser = 25
    # Both inject at 5. Message 1 takes link 1->2 at 5; message 0 reaches it at 5 + 3 = 8 and
    # waits until 5 + 25 = 30, then takes 2->3 at 33 (message 1 held it from 8 to 33).
    first_arrival = 8 + 3 + ser  # message 1
    second_arrival = 33 + 3 + ser  # message 0
    assert first_arrival < second_arrival
    # core 3 receives message 0 first (program order), then message 1, which is already in
    assert res.makespan_cycles == second_arrival + 7 + 7
    assert res.link_busy[1 * 4 + 0] == 2 * ser  # link 1->2 east carried both


def test_single_core_gemv_tile_time_is_max_of_compute_and_sram():
    b, k, n = 1, 96, 40
    prog = lower_gemv(b, k, n, 1, 1)
    res = simulate(prog, T)
    flop_cycles = -(-2 * b * k * n // 8)
    byte_cycles = -(-(b * k + k * n + 2 * b * n) * 2 // 24)
    zero_cycles = -(-(b * n * 2) // 24)
    expected = max(flop_cycles, byte_cycles) + zero_cycles + 2 * T.compute_overhead_cycles
    assert res.makespan_cycles == expected
    assert res.core_busy[0] == expected - 2 * T.compute_overhead_cycles


def test_deadlock_is_reported_naming_the_core_and_instruction():
    bld = ProgramBuilder(2, 1)
    a, b = bld.buffers([0, 1], 1, 4)
    m = bld.messages([0, 1], [1, 0], 8, 0)
    bld.recv(0, 0, m[1], a)  # each waits for the other's message before sending its own
    bld.send(0, 1, m[0], a)
    bld.recv(1, 0, m[0], b)
    bld.send(1, 1, m[1], b)
    with pytest.raises(SimulationError, match=r"deadlock: 2 cores never finish: core \(0,0\)"):
        simulate(bld.build(), T)


def test_receive_that_no_message_satisfies_is_a_deadlock():
    bld = ProgramBuilder(2, 1)
    a, b = bld.buffers([0, 1], 1, 4)
    m = bld.messages(0, 1, 8, 0)
    bld.recv(1, 0, m, b)  # never sent
    with pytest.raises(SimulationError, match="recv of message 0"):
        simulate(bld.build(), T)


# --- random programs: invariants and exact agreement with the SimPy twin --------------------

@st.composite
def programs(draw):
    w, h = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    cores = w * h
    bld = ProgramBuilder(w, h)
    bufs = bld.buffers(np.arange(cores), 4, 4)
    steps = draw(st.lists(st.tuples(st.integers(0, cores - 1), st.integers(0, cores - 1),
                                    st.integers(1, 300), st.booleans()), max_size=40))
    for t, (a, b, nbytes, compute) in enumerate(steps):
        if compute or a == b:  # a global order of sends and receives cannot deadlock
            bld.compute(a, t, OP_MATMUL_ACC, c=bufs[a], a=bufs[a], b=bufs[a])
        else:
            m = bld.messages(a, b, nbytes, t % 4)
            bld.send(a, t, m, bufs[a])
            bld.recv(b, t, m, bufs[b])
    target = dataclasses.replace(
        WSE2.with_mesh(w, h), hop_latency_cycles=draw(st.integers(0, 4)),
        link_bytes_per_cycle=draw(st.sampled_from([1.0, 4.0, 7.0])),
        send_overhead_cycles=draw(st.integers(0, 5)), recv_overhead_cycles=draw(st.integers(0, 5)))
    return bld.build(), target


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_invariants_hold_on_random_programs(case):
    prog, target = case
    res = simulate(prog, target)
    # busy + overhead + idle == makespan on every core, nothing negative
    assert (res.core_idle >= 0).all() and (res.core_wait <= res.core_idle).all()
    np.testing.assert_array_equal(res.core_busy + res.core_overhead + res.core_idle,
                                  res.makespan_cycles)
    # no link is busy longer than the makespan
    assert (res.link_busy <= res.makespan_cycles).all()
    # bytes sent == bytes received: every message crosses each link of its route once
    hops = np.diff(prog.route_ptr)
    assert res.link_bytes.sum() == int((prog.msg_bytes * hops).sum())
    # the SimPy twin agrees cycle for cycle
    ref = run_reference(*kernel_args(prog, target))
    ker = run_kernel(*kernel_args(prog, target))
    assert ref[0] == ker[0]
    for r, k in zip(ref[2:6], ker[2:6], strict=False):
        np.testing.assert_array_equal(r, k)


def test_link_reservations_never_overlap():
    prog = lower_gemm(96, 96, 96, 8, 8, "summa")
    args = kernel_args(prog, T)
    arrival = run_kernel(*args)[7]
    msg_cycles = np.ceil(prog.msg_bytes / T.link_bytes_per_cycle).astype(int)[prog.entry_msg]
    start = arrival - T.hop_latency_cycles - msg_cycles
    end = start + msg_cycles
    order = np.lexsort((start, prog.route_link))
    same = prog.route_link[order][1:] == prog.route_link[order][:-1]
    assert (start[order][1:][same] >= end[order][:-1][same]).all()


@pytest.mark.parametrize("make", [lambda: lower_gemv(2, 300, 200, 12, 10),
                                  lambda: lower_gemv(1, 300, 200, 12, 10, "ring"),
                                  lambda: lower_gemm(60, 60, 60, 6, 6, "meshgemm"),
                                  lambda: lower_gemm(60, 60, 60, 6, 6, "cannon"),
                                  lambda: lower_gemm(60, 60, 60, 5, 7, "summa")])
def test_simpy_twin_agrees_on_algorithms(make):
    prog = make()
    args = kernel_args(prog, WSE2)
    ker, ref = run_kernel(*args), run_reference(*args)
    assert ker[1] == ref[1]
    for r, k in zip(ref[2:6], ker[2:6], strict=False):
        np.testing.assert_array_equal(r, k)


def test_ktree_beats_ring_on_a_long_column():
    k_tree = simulate(lower_gemv(1, 4096, 4096, 128, 32), WSE2)
    ring = simulate(lower_gemv(1, 4096, 4096, 128, 32, "ring"), WSE2)
    assert k_tree.makespan_cycles < ring.makespan_cycles


def test_watchdog_bounds_the_event_count():
    prog = lower_gemv(1, 64, 64, 8, 8)
    with pytest.raises(SimulationError, match="watchdog"):
        simulate(prog, WSE2, max_events=10)
