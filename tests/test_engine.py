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
from wafersim import engine
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


# --- engine data structures: many messages in flight, far-future events, loops, dtypes -------

def _replay_one_route(n, inject_every, ser, hops, recv_overhead):
    """The model by hand for n messages injected every `inject_every` cycles along the same
    route of `hops` links and received in order by one core: its finishing time."""
    free = [0] * hops
    done = 0
    for k in range(n):
        head = inject_every * (k + 1)
        for h in range(hops):
            start = max(head, free[h])
            free[h] = start + ser
            head = start + T.hop_latency_cycles
        done = max(done, start + T.hop_latency_cycles + ser) + recv_overhead
    return done


@pytest.mark.parametrize("near_rows", [None, 2])
def test_many_messages_in_flight_finish(near_rows, monkeypatch):
    """One core sends 5,000 messages before its neighbour receives any: all are in flight at
    once, and the engine needs no preset pool size."""
    if near_rows:
        monkeypatch.setattr(engine, "NEAR_ROWS", near_rows)
    n, nbytes = 5000, 64
    bld = ProgramBuilder(3, 1)
    src, dst = bld.buffers([0, 2], 1, nbytes // 2)
    m = bld.messages(np.zeros(n, np.int64), 2, nbytes, 0)
    bld.send(np.zeros(n, np.int64), np.arange(n), m, src)
    bld.recv(np.full(n, 2), n + np.arange(n), m, dst)
    prog = bld.build()
    res = simulate(prog, T)
    ser = nbytes // int(T.link_bytes_per_cycle)
    assert res.makespan_cycles == _replay_one_route(n, T.send_overhead_cycles, ser, 2,
                                                    T.recv_overhead_cycles)
    args = kernel_args(prog, T)
    ker, ref = run_kernel(*args), run_reference(*args)
    assert ker[0] == ref[0] == 0 and ker[1] == ref[1]
    for r, k in zip(ref[2:6], ker[2:6], strict=True):
        np.testing.assert_array_equal(r, k)


@pytest.mark.parametrize("near_rows", [None, 2])
def test_events_beyond_the_calendar_window_keep_their_order(near_rows, monkeypatch):
    """A link backlog longer than the calendar window sends later hops through the overflow
    heap, and a long compute sends a message there too; the SimPy twin agrees."""
    if near_rows:
        monkeypatch.setattr(engine, "NEAR_ROWS", near_rows)
    n, nbytes = 40, 8000  # 2,000 cycles per message on a link: an 80,000-cycle backlog
    bld = ProgramBuilder(4, 2)
    bufs = bld.buffers(np.arange(8), 1, nbytes // 2)
    m = bld.messages(np.zeros(n, np.int64), 3, nbytes, 0)
    bld.send(np.zeros(n, np.int64), np.arange(n), m, bufs[0])
    bld.recv(np.full(n, 3), n + np.arange(n), m, bufs[3])
    late = bld.messages(4, 7, 40, 1)
    bld.compute(4, 0, OP_MATMUL_ACC, c=bufs[4], a=bufs[4], b=bufs[4], flops=8 * 200_000)
    bld.send(4, 1, late, bufs[4])
    bld.recv(7, 0, late, bufs[7])
    prog = bld.build()
    res = simulate(prog, T)
    assert res.makespan_cycles > 1 << 16
    args = kernel_args(prog, T)
    ker, ref = run_kernel(*args), run_reference(*args)
    assert ker[0] == ref[0] == 0 and ker[1] == ref[1]
    for r, k in zip(ref[2:6], ker[2:6], strict=True):
        np.testing.assert_array_equal(r, k)


def _ping_pong(count, looped):
    """Core 0 sends to core 1, which computes and answers; `count` rounds, as a loop or
    unrolled into distinct messages."""
    bld = ProgramBuilder(2, 1)
    a, b = bld.buffers([0, 1], 4, 4)
    rounds = 1 if looped else count
    for r in range(rounds):
        ping, pong = bld.messages([0, 1], [1, 0], [40, 8], 0)
        s = 1 + 4 * r
        bld.send(0, s, ping, a)
        bld.recv(1, s, ping, b)
        bld.compute(1, s + 1, OP_MATMUL_ACC, c=b, a=b, b=b)
        bld.send(1, s + 2, pong, b)
        bld.recv(0, s + 2, pong, a)
    bld.compute([0, 1], 0, OP_MATMUL_ACC, c=[a, b], a=[a, b], b=[a, b])  # before the loop
    bld.compute([0, 1], 99, OP_MATMUL_ACC, c=[a, b], a=[a, b], b=[a, b])  # after it
    return bld.build(loop=(1, 5, count, 0) if looped else None)


def test_a_loop_times_like_its_unrolled_program():
    looped, unrolled = simulate(_ping_pong(3, True), T), simulate(_ping_pong(3, False), T)
    assert looped.makespan_cycles == unrolled.makespan_cycles
    for name in ("core_busy", "core_overhead", "core_wait"):
        np.testing.assert_array_equal(getattr(looped, name), getattr(unrolled, name))
    assert looped.messages == unrolled.messages == 6
    assert looped.hops == unrolled.hops and looped.events == unrolled.events
    np.testing.assert_array_equal(looped.link_bytes, unrolled.link_bytes)
    np.testing.assert_array_equal(looped.link_busy, unrolled.link_busy)


def test_a_loop_that_runs_ahead_of_its_receiver_is_an_overrun():
    bld = ProgramBuilder(2, 1)
    a, b = bld.buffers([0, 1], 8, 8)
    m, last = bld.messages([0, 0], [1, 1], 8, 0)
    bld.send(0, 1, m, a)  # the loop: sent 3 times ...
    bld.send(0, 5, last, a)
    bld.recv(1, 0, last, b)  # ... while its receiver still waits for the message sent after
    bld.recv(1, 1, m, b)
    with pytest.raises(SimulationError, match="loop iteration"):
        simulate(bld.build(loop=(1, 2, 3, 0)), T)


@st.composite
def multicast_programs(draw):
    """Multicast messages along rows and columns, received at a random subset of their hops
    (the rest pass through), mixed with unicast messages and compute."""
    w, h = draw(st.integers(2, 6)), draw(st.integers(1, 6))
    cores = w * h
    bld = ProgramBuilder(w, h)
    bufs = bld.buffers(np.arange(cores), 4, 4)
    steps = draw(st.lists(st.tuples(st.integers(0, cores - 1), st.integers(0, cores - 1),
                                    st.integers(1, 300), st.booleans(), st.integers(0, 255)),
                          min_size=1, max_size=25))
    for t, (a, b, nbytes, compute, mask) in enumerate(steps):
        ax, ay, bx, by = a % w, a // w, b % w, b // w
        if compute or a == b:
            bld.compute(a, t, OP_MATMUL_ACC, c=bufs[a], a=bufs[a], b=bufs[a])
        elif ax == bx or ay == by:  # a straight route: multicast to some of its routers
            m = bld.messages(a, b, nbytes, t % 4, multicast=True)
            bld.send(a, t, m, bufs[a])
            n_hops = abs(ax - bx) + abs(ay - by)
            step = 1 if b > a else -1
            stride = 1 if ay == by else w
            for hop in range(n_hops):
                if mask >> hop & 1 or hop == n_hops - 1:
                    core = a + step * stride * (hop + 1)
                    bld.recv(core, t, m, bufs[core], hop=hop)
        else:
            m = bld.messages(a, b, nbytes, t % 4)
            bld.send(a, t, m, bufs[a])
            bld.recv(b, t, m, bufs[b])
    return bld.build()


@pytest.mark.parametrize("near_rows", [None, 2])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(prog=multicast_programs())
def test_simpy_twin_agrees_on_multicast_programs(near_rows, monkeypatch, prog):
    if near_rows:
        monkeypatch.setattr(engine, "NEAR_ROWS", near_rows)
    args = kernel_args(prog, T)
    ker, ref = run_kernel(*args), run_reference(*args)
    assert ker[0] == ref[0] == 0 and ker[1] == ref[1]
    for r, k in zip(ref[2:6], ker[2:6], strict=True):
        np.testing.assert_array_equal(r, k)


def test_narrow_dtypes_give_the_same_result():
    """The compiler may store instruction fields in int32 / float32: same timing."""
    prog = lower_gemv(2, 300, 200, 12, 10)
    narrow = dataclasses.replace(
        prog, ins_flops=prog.ins_flops.astype(np.int32), ins_bytes=prog.ins_bytes.astype(np.int32),
        ins_arg=prog.ins_arg.astype(np.int32), ins_imm=prog.ins_imm.astype(np.float32),
        msg_bytes=prog.msg_bytes.astype(np.int32), route_ptr=prog.route_ptr.astype(np.int32))
    a, b = simulate(prog, WSE2), simulate(narrow, WSE2)
    assert a.makespan_cycles == b.makespan_cycles and a.events == b.events
    assert a.flops == b.flops and a.hops == b.hops and a.messages == b.messages
    for name in ("core_busy", "core_overhead", "core_wait", "link_bytes", "link_busy"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_entry_arrivals_are_recorded_only_when_asked():
    prog = lower_gemv(1, 64, 64, 4, 4)
    with_arrivals = run_kernel(*kernel_args(prog, WSE2))
    without = run_kernel(*kernel_args(prog, WSE2, arrivals=False))
    assert len(with_arrivals[7]) == prog.n_hops and (with_arrivals[7] >= 0).all()
    assert len(without[7]) == 0
    for x, y in zip(with_arrivals[2:7], without[2:7], strict=True):
        np.testing.assert_array_equal(x, y)


def test_deadlock_names_the_instruction_after_sends():
    bld = ProgramBuilder(2, 1)
    a, b = bld.buffers([0, 1], 1, 4)
    m = bld.messages([0, 0, 1], [1, 1, 0], 8, 0)
    bld.send(0, 0, m[0], a)
    bld.send(0, 1, m[1], a)
    bld.recv(0, 2, m[2], a)  # never sent
    bld.recv(1, 0, m[0], b)
    bld.recv(1, 1, m[1], b)
    with pytest.raises(SimulationError, match=r"core \(0,0\) at instruction 2 \(recv of message"):
        simulate(bld.build(), T)


def test_a_receive_the_engine_cannot_place_is_refused():
    prog = one_message(0, 3, 8)
    bad = prog.ins_arg.copy()
    bad[prog.ins_kind == 2] -= 1  # an intermediate hop of a unicast message
    with pytest.raises(SimulationError, match="intermediate hop"):
        simulate(dataclasses.replace(prog, ins_arg=bad), T)
    prog = lower_gemv(1, 64, 64, 2, 2)
    huge = prog.ins_flops.astype(np.int64)
    huge[prog.ins_kind == 0] = 1 << 40
    with pytest.raises(SimulationError, match="compute takes more than"):
        simulate(dataclasses.replace(prog, ins_flops=huge), T)


@pytest.fixture
def tiny_near_buckets(monkeypatch):
    """Near buckets of 2 rows: nearly every event goes through the overflow lists."""
    monkeypatch.setattr(engine, "NEAR_ROWS", 2)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(programs())
def test_overflowing_near_buckets_change_nothing(tiny_near_buckets, case):
    prog, target = case
    args = kernel_args(prog, target)
    ker, ref = run_kernel(*args), run_reference(*args)
    assert ker[0] == ref[0] and ker[1] == ref[1]
    for r, k in zip(ref[2:6], ker[2:6], strict=True):
        np.testing.assert_array_equal(r, k)


@pytest.mark.parametrize("make", [lambda: lower_gemv(2, 300, 200, 12, 10),
                                  lambda: lower_gemm(60, 60, 60, 6, 6, "cannon")])
def test_overflowing_near_buckets_on_algorithms(tiny_near_buckets, make):
    prog = make()
    args = kernel_args(prog, WSE2)
    ker, ref = run_kernel(*args), run_reference(*args)
    assert ker[1] == ref[1]
    for r, k in zip(ref[2:6], ker[2:6], strict=True):
        np.testing.assert_array_equal(r, k)


def test_routes_that_are_not_dimension_ordered_are_followed():
    """The kernel steps along straight routes itself; any other route (here a staircase)
    is read link by link from route_link."""
    w = 4
    bld = ProgramBuilder(w, 4)
    bufs = bld.buffers(np.arange(16), 1, 8)
    m = bld.messages([0, 0, 5], [10, 15, 6], 16, 0)  # (0,0)->(2,2), (0,0)->(3,3), (1,1)->(2,1)
    bld.send([0, 0, 5], [0, 1, 0], m, bufs[[0, 0, 5]])
    bld.recv([10, 15, 6], [0, 1, 0], m, bufs[[10, 15, 6]])
    prog = bld.build()
    links = prog.route_link.copy()
    east, south = 0, 3
    stairs = [(0, east), (1, south), (5, east), (6, south)]  # (0,0) E S E S -> (2,2)
    first = prog.route_ptr[0]
    links[first:first + 4] = [c * 4 + d for c, d in stairs]
    stair = dataclasses.replace(prog, route_link=links)
    args = kernel_args(stair, T)
    ker, ref = run_kernel(*args), run_reference(*args)
    assert ker[0] == ref[0] == 0 and ker[1] == ref[1]
    for r, k in zip(ref[2:6], ker[2:6], strict=True):
        np.testing.assert_array_equal(r, k)
    # the staircase turns south at (1,0); only message 1 goes on east from there
    res = simulate(stair, T)
    assert res.link_bytes[1 * 4 + south] == 16 and res.link_bytes[1 * 4 + east] == 16


@pytest.mark.parametrize("link,why", [
    (0 * 4 + 1, "leaves the mesh"),  # west from x = 0
    (2 * 4 + 0, "starts away from its source"),  # a link of another core
])
def test_a_route_through_a_missing_core_is_refused(link, why):
    bld = ProgramBuilder(3, 1, "fp32")
    a, b = bld.buffers([0, 1], 1, 1)
    m = bld.messages(0, 1, 4, 0)
    bld.send(0, 0, m, a)
    bld.recv(1, 0, m, b)
    prog = dataclasses.replace(bld.build(), route_link=np.array([link], np.int32))
    with pytest.raises(SimulationError, match=why):
        simulate(prog, T.with_mesh(3, 1))


# --- the kernel split over threads: the same result, whatever the split ---------------------

def _same_run(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    for x, y in zip(a[2:8], b[2:8], strict=True):
        np.testing.assert_array_equal(x, y)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.integers(2, 4))
def test_threads_give_the_same_result_on_random_programs(case, threads):
    """Zero-latency hops and zero overheads included (rounds within a cycle), with columns
    dealt to partitions one by one on these narrow meshes, so most hops cross partitions."""
    prog, target = case
    args = kernel_args(prog, target)
    _same_run(run_kernel(*args), run_kernel(*args, threads=threads))


@pytest.mark.parametrize("near_rows", [None, 2])
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(prog=multicast_programs())
def test_threads_give_the_same_result_on_multicast_programs(near_rows, monkeypatch, prog):
    if near_rows:
        monkeypatch.setattr(engine, "NEAR_ROWS", near_rows)
    args = kernel_args(prog, T)
    _same_run(run_kernel(*args), run_kernel(*args, threads=3))


@pytest.mark.parametrize("make", [lambda: lower_gemv(2, 300, 200, 12, 10),
                                  lambda: lower_gemm(60, 60, 60, 6, 6, "cannon"),
                                  lambda: lower_gemm(60, 60, 60, 5, 7, "summa"),
                                  lambda: _ping_pong(3, True)])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_the_same_result_on_algorithms_and_loops(make, threads):
    args = kernel_args(make(), T)
    _same_run(run_kernel(*args), run_kernel(*args, threads=threads))


def test_threads_keep_far_events_in_order():
    """Far-future hops through the overflow heap while another partition sets the pace."""
    n, nbytes = 40, 8000
    bld = ProgramBuilder(4, 2)
    bufs = bld.buffers(np.arange(8), 1, nbytes // 2)
    m = bld.messages(np.zeros(n, np.int64), 3, nbytes, 0)
    bld.send(np.zeros(n, np.int64), np.arange(n), m, bufs[0])
    bld.recv(np.full(n, 3), n + np.arange(n), m, bufs[3])
    args = kernel_args(bld.build(), T)
    _same_run(run_kernel(*args), run_kernel(*args, threads=2))


def test_threads_report_errors_like_one_thread():
    """A deadlock, the watchdog and an overrun stop every partition (no thread is left
    waiting at a barrier) with the status one thread gives."""
    stuck = ProgramBuilder(4, 1)
    a, b = stuck.buffers([0, 3], 4, 4)
    m = stuck.messages(0, 3, 8, 0)
    stuck.recv(3, 0, m, b)
    stuck.compute(0, 0, OP_MATMUL_ACC, c=a, a=a, b=a)
    ahead = ProgramBuilder(2, 1)
    a, b = ahead.buffers([0, 1], 8, 8)
    m, last = ahead.messages([0, 0], [1, 1], 8, 0)
    ahead.send(0, 1, m, a)
    ahead.send(0, 5, last, a)
    ahead.recv(1, 0, last, b)
    ahead.recv(1, 1, m, b)
    cases = [(kernel_args(stuck.build(), T), engine.DEADLOCK),
             (kernel_args(lower_gemv(1, 64, 64, 8, 8), WSE2, max_events=10), engine.WATCHDOG),
             (kernel_args(ahead.build(loop=(1, 2, 3, 0)), T), engine.OVERRUN)]
    for args, status in cases:
        assert run_kernel(*args)[0] == status
        assert run_kernel(*args, threads=2)[0] == status


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_refused_in_one_line(value, monkeypatch):
    monkeypatch.setenv("WAFERSIM_THREADS", value)
    with pytest.raises(SimulationError, match="WAFERSIM_THREADS=.* must be a whole number >= 1"):
        simulate(lower_gemv(1, 64, 64, 8, 8), WSE2)
