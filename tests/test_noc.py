"""Synthetic traffic: patterns, injection, closed forms of latency and saturation, the CLI."""

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compiler.program import COMPUTE, RECV, SEND, xy_routes
from compiler.targets import WSE2
from wafersim.cli import app
from wafersim.noc import (
    PATTERNS,
    TrafficSpec,
    channel_load,
    fabric_target,
    generation_times,
    hotspot_cores,
    latency_curve,
    mean_hops,
    measure_point,
    parse_rates,
    run_traffic,
    saturation_bound,
    traffic_matrix,
    traffic_program,
    uniform_bound_flits,
    zero_load_latency,
)
from wafersim.simulate import compute_cycles

MESH16 = WSE2.with_mesh(16, 16)  # 4-byte links: one flit per cycle
# Hop latency 2 and 40-byte messages (10 flits) so that hops and serialisation both show.
SLOW_HOPS = dataclasses.replace(WSE2.with_mesh(8, 8), hop_latency_cycles=2)
SPEC = TrafficSpec(msg_bytes=40, warmup_cycles=300, measure_cycles=600, drain_cycles=300)
# Traffic so light that messages rarely meet: 1 message per 5,000 cycles per core.
LIGHT = dataclasses.replace(SPEC, warmup_cycles=0, measure_cycles=20_000, drain_cycles=0)


def _per_message(traffic):
    arrival, _, _ = run_traffic(traffic)
    prog = traffic.program
    delivered = arrival[prog.route_ptr[1:] - 1]
    return delivered - traffic.generated, np.diff(prog.route_ptr)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_zero_load_latency_is_hops_times_hop_latency_plus_serialisation(pattern):
    spec = dataclasses.replace(LIGHT, pattern=pattern)
    traffic = traffic_program(spec, SLOW_HOPS, rate=0.002)
    latency, hops = _per_message(traffic)
    closed = hops * 2 + 10
    excess = latency - closed
    assert excess.min() == 0  # never faster than the closed form
    assert np.mean(excess == 0) > 0.95  # and exactly it unless two messages met
    point = measure_point(spec, SLOW_HOPS, 0.002)
    assert point.zero_load_latency == pytest.approx(point.hops_avg * 2 + 10)
    # The pattern's exact mean (not sampled) agrees with the messages drawn.
    expected = zero_load_latency(spec, SLOW_HOPS)
    assert point.latency_avg == pytest.approx(expected, rel=0.05)


def test_with_overheads_adds_send_and_receive_overheads_but_no_compute_overhead():
    tgt = dataclasses.replace(SLOW_HOPS, send_overhead_cycles=5, recv_overhead_cycles=7,
                              compute_overhead_cycles=3)
    spec = dataclasses.replace(LIGHT, pattern="transpose")
    latency, hops = _per_message(traffic_program(spec, tgt, 0.002, with_overheads=True))
    excess = latency + 7 - (5 + hops * 2 + 10 + 7)
    assert excess.min() == 0 and np.mean(excess == 0) > 0.95
    point = measure_point(spec, tgt, 0.002, with_overheads=True)
    assert point.zero_load_latency == pytest.approx(5 + point.hops_avg * 2 + 10 + 7)
    fabric = fabric_target(tgt)
    assert (fabric.send_overhead_cycles, fabric.recv_overhead_cycles,
            fabric.compute_overhead_cycles) == (0, 0, 0)


def test_send_overhead_queues_injections_at_the_source():
    """A core injects at most one message per send overhead: with a 50-cycle overhead and
    Poisson arrivals at 0.1 messages per cycle, messages wait in the core and then the
    first link."""
    tgt = dataclasses.replace(SLOW_HOPS, send_overhead_cycles=50)
    spec = dataclasses.replace(SPEC, pattern="neighbour", process="poisson", msg_bytes=4)
    traffic = traffic_program(spec, tgt, rate=0.1, with_overheads=True)
    prog, fab = traffic.program, traffic.target
    send_at = _send_times(prog, fab)
    gen = traffic.generated
    # The Lindley recursion by hand, core by core.
    expected = np.empty_like(gen)
    for c in np.unique(prog.msg_src):
        done = 0
        for m in np.flatnonzero(prog.msg_src == c):
            done = max(gen[m], done) + 50
            expected[m] = done
    assert np.array_equal(send_at, expected)


def _send_times(prog, target):
    """Core time at which every SEND injects, replaying each core's instructions (no RECV
    comes before a SEND in a traffic program, so nothing waits)."""
    cycles = compute_cycles(prog, target) + np.where(
        prog.ins_kind == SEND, target.send_overhead_cycles,
        np.where(prog.ins_kind == COMPUTE, target.compute_overhead_cycles, 0))
    out = np.empty(prog.n_messages, dtype=np.int64)
    for c in range(prog.cores):
        lo, hi = prog.core_ptr[c], prog.core_ptr[c + 1]
        t = np.cumsum(cycles[lo:hi])
        send = prog.ins_kind[lo:hi] == SEND
        out[prog.ins_arg[lo:hi][send]] = t[send]
    return out


@pytest.mark.parametrize("process", ["bernoulli", "poisson"])
def test_delay_instructions_inject_every_message_at_its_generation_cycle(process):
    spec = dataclasses.replace(SPEC, pattern="uniform", process=process)
    traffic = traffic_program(spec, SLOW_HOPS, rate=0.8)
    assert np.array_equal(_send_times(traffic.program, traffic.target), traffic.generated)


def test_program_is_ordinary_and_messages_keep_their_declared_order():
    spec = dataclasses.replace(SPEC, pattern="transpose")
    traffic = traffic_program(spec, SLOW_HOPS, rate=0.3)
    prog, gen = traffic.program, traffic.generated
    # Numbered by source, then generation cycle: the builder's own send order.
    assert np.all(np.diff(prog.msg_src) >= 0)
    same = np.diff(prog.msg_src) == 0
    assert np.all(np.diff(gen)[same] >= 0)
    x, y = prog.msg_src % 8, prog.msg_src // 8
    assert np.array_equal(prog.msg_dst, x * 8 + y)
    assert not np.any(x == y)  # the diagonal is silent
    assert traffic.sources == 56
    # One RECV per message, after every SEND of the core.
    recv = prog.ins_kind == RECV
    assert np.array_equal(np.sort(prog.entry_msg[prog.ins_arg[recv]]),
                          np.arange(prog.n_messages))
    core = np.repeat(np.arange(prog.cores), np.diff(prog.core_ptr))
    for c in range(prog.cores):
        kinds = prog.ins_kind[core == c]
        if (kinds == RECV).any() and (kinds == SEND).any():
            assert np.flatnonzero(kinds == RECV).min() > np.flatnonzero(kinds == SEND).max()
    prog.check(SLOW_HOPS)


def test_accepted_load_equals_offered_load_below_saturation():
    for pattern in ("uniform", "transpose", "tornado"):
        spec = TrafficSpec(pattern=pattern, measure_cycles=4000)
        bound = saturation_bound(spec, MESH16)
        for frac in (0.3, 0.6):
            p = measure_point(spec, MESH16, frac * bound)
            assert p.offered == pytest.approx(frac * bound, rel=0.05)
            assert p.accepted == pytest.approx(p.offered, rel=0.02)


def _rates(bound):
    return [bound * f for f in (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.3, 1.5)]


def test_uniform_saturation_within_10_percent_of_the_channel_load_bound():
    spec = TrafficSpec(pattern="uniform")
    bound = saturation_bound(spec, MESH16)
    assert bound == pytest.approx(4 * 255 / 16**3)  # 4 (k^2 - 1) / k^3, about 4 / k
    curve = latency_curve(spec, MESH16, _rates(bound), stop_after=1)
    assert curve.saturation is not None
    assert abs(curve.saturation_rate / bound - 1) < 0.10
    # At half the bound, queueing has started but latency is still near its zero-load value.
    assert curve.zero_load_latency < curve.points[0].latency_avg < 2 * curve.zero_load_latency


def test_transpose_saturates_below_uniform_as_the_channel_loads_say():
    k = 16
    uni = TrafficSpec(pattern="uniform")
    tra = TrafficSpec(pattern="transpose")
    # Transpose under XY routing: the east link into (k-1, k-1) carries the whole last row.
    assert saturation_bound(tra, MESH16) == pytest.approx(1 / (k - 1))
    c_uni = latency_curve(uni, MESH16, _rates(saturation_bound(uni, MESH16)), stop_after=1)
    c_tra = latency_curve(tra, MESH16, _rates(1 / (k - 1)), stop_after=1)
    assert c_tra.saturation_rate < 0.5 * c_uni.saturation_rate
    # The busiest link is saturated at the bound (its measured busy fraction reaches 1).
    at_bound = [p for p in c_tra.points if p.rate >= 1 / (k - 1) * 1.049][0]
    assert at_bound.max_link_busy > 0.97


@pytest.mark.slow
def test_uniform_saturation_on_32x32_and_64x64():
    for k in (32, 64):
        tgt = WSE2.with_mesh(k, k)
        spec = TrafficSpec(pattern="uniform")
        bound = saturation_bound(spec, tgt)
        curve = latency_curve(spec, tgt, _rates(bound), stop_after=1)
        assert abs(curve.saturation_rate / bound - 1) < 0.10


@pytest.mark.parametrize("shape", [(6, 6), (5, 3), (4, 7)])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_channel_load_matches_enumerating_every_route(pattern, shape):
    w, h = shape
    if pattern == "transpose" and w != h:
        return
    spec = TrafficSpec(pattern=pattern, hotspots=2, hotspot_fraction=0.3)
    p = traffic_matrix(spec, w, h)
    assert np.allclose(p.sum(axis=1)[p.sum(axis=1) > 0], 1.0)
    src, dst = np.nonzero(p)
    ptr, links = xy_routes(src, dst, w)
    weights = np.repeat(p[src, dst], np.diff(ptr))
    brute = np.bincount(links, weights=weights, minlength=w * h * 4)
    assert np.allclose(channel_load(p, w, h), brute)
    assert mean_hops(spec, w, h) == pytest.approx((p[src, dst] * np.diff(ptr)).sum() / p.sum())


@pytest.mark.parametrize("shape", [(16, 16), (5, 3), (4, 7), (2, 9)])
def test_uniform_bound_closed_form_matches_the_routes(shape):
    w, h = shape
    p = traffic_matrix(TrafficSpec(), w, h)
    assert uniform_bound_flits(w, h) == pytest.approx(1 / channel_load(p, w, h).max())


def test_patterns_map_cores_as_defined():
    rng = np.random.default_rng(1)
    w = h = 8
    cores = np.arange(64)
    x, y = cores % w, cores // w
    spec = TrafficSpec()
    fn = {name: pat.fn for name, pat in PATTERNS.items()}
    assert np.array_equal(fn["transpose"](cores, w, h, spec, rng), x * w + y)
    assert np.array_equal(fn["bitcomp"](cores, w, h, spec, rng), 63 - cores)  # ~bits, 6 bits
    assert np.array_equal(fn["tornado"](cores, w, h, spec, rng), (y + 3) % 8 * w + (x + 3) % 8)
    src = rng.integers(0, 64, 20000)
    d = fn["neighbour"](src, w, h, spec, rng)
    assert np.all(np.abs(d % w - src % w) + np.abs(d // w - src // w) == 1)
    d = fn["uniform"](src, w, h, spec, rng)
    assert not np.any(d == src) and len(np.unique(d)) == 64
    hot_spec = TrafficSpec(pattern="hotspot", hotspot_fraction=0.3, hotspots=4)
    hot = hotspot_cores(w, h, 4)
    assert set(hot) == {27, 28, 35, 36}  # the central 2 x 2
    d = fn["hotspot"](src, w, h, hot_spec, rng)
    assert not np.any(d == src)
    assert np.mean(np.isin(d, hot)) == pytest.approx(0.3 + 0.7 * 4 / 63, abs=0.015)


@pytest.mark.parametrize("process", ["bernoulli", "poisson"])
def test_injection_processes_offer_the_asked_rate(process):
    rng = np.random.default_rng(0)
    idx, t = generation_times(process, 0.2, 50, 20_000, rng)
    assert len(t) / (50 * 20_000) == pytest.approx(0.2, rel=0.02)
    assert t.min() >= 0 and t.max() < 20_000
    key = idx * 20_000 + t
    assert np.all(np.diff(key) >= 0)  # sorted by source, then cycle
    repeats = np.any(np.diff(key) == 0)
    assert repeats == (process == "poisson")  # Bernoulli: at most one per cycle


def test_rates_in_bytes_make_the_same_traffic_as_in_flits():
    spec_f = TrafficSpec(msg_bytes=32, warmup_cycles=200, measure_cycles=400, drain_cycles=100)
    spec_b = dataclasses.replace(spec_f, unit="bytes")
    pf = measure_point(spec_f, SLOW_HOPS, 0.2)
    pb = measure_point(spec_b, SLOW_HOPS, 0.8)  # 4 bytes per flit
    assert pb.offered == pytest.approx(4 * pf.offered)
    assert pb.latency_avg == pf.latency_avg
    assert saturation_bound(spec_b, SLOW_HOPS) == pytest.approx(
        4 * saturation_bound(spec_f, SLOW_HOPS))


def test_same_seed_same_curve_other_seed_other_traffic():
    def run(seed):
        spec = dataclasses.replace(SPEC, pattern="hotspot", seed=seed)
        d = latency_curve(spec, SLOW_HOPS, [0.1, 0.3]).to_dict()
        for p in d["points"]:
            del p["sim_wall_s"]
        return d

    assert run(3) == run(3)
    assert run(3) != run(4)
    a = traffic_program(SPEC, SLOW_HOPS, 0.3)
    b = traffic_program(SPEC, SLOW_HOPS, 0.3)
    assert np.array_equal(a.generated, b.generated)
    assert np.array_equal(a.program.msg_dst, b.program.msg_dst)


@pytest.mark.parametrize("make", [
    lambda: TrafficSpec(pattern="zipf"),
    lambda: TrafficSpec(unit="packets"),
    lambda: TrafficSpec(process="periodic"),
    lambda: TrafficSpec(msg_bytes=0),
    lambda: TrafficSpec(measure_cycles=0),
    lambda: TrafficSpec(warmup_cycles=-1),
    lambda: TrafficSpec(hotspot_fraction=1.5),
    lambda: measure_point(TrafficSpec(), SLOW_HOPS, 0.0),
    lambda: measure_point(TrafficSpec(), SLOW_HOPS, -0.1),
    lambda: measure_point(TrafficSpec(), SLOW_HOPS, float("nan")),
    lambda: measure_point(TrafficSpec(msg_bytes=4), SLOW_HOPS, 1.5),  # > 1 message per cycle
    lambda: measure_point(TrafficSpec(pattern="transpose"), WSE2.with_mesh(8, 4), 0.1),
    lambda: measure_point(TrafficSpec(pattern="hotspot", hotspots=65), SLOW_HOPS, 0.1),
    lambda: measure_point(TrafficSpec(), WSE2.with_mesh(1, 1), 0.1),
    lambda: measure_point(TrafficSpec(msg_bytes=4, process="poisson"), WSE2, 10.0),  # too big
    lambda: latency_curve(TrafficSpec(), SLOW_HOPS, []),
    lambda: parse_rates("0.5:0.1:0.1"),
    lambda: parse_rates("0.1:0.5:0"),
    lambda: parse_rates("0.1:0.5"),
    lambda: parse_rates("fast"),
    lambda: parse_rates("0.1,-0.2"),
])
def test_bad_traffic_gives_a_one_line_value_error(make):
    with pytest.raises(ValueError) as info:
        make()
    assert "\n" not in str(info.value) and str(info.value)


def test_parse_rates_includes_the_stop():
    assert parse_rates("0.02:0.5:0.02")[-1] == pytest.approx(0.5)
    assert len(parse_rates("0.02:0.5:0.02")) == 25
    assert parse_rates("0.1,0.3") == [0.1, 0.3]


def test_cli_noc_prints_one_json_object_and_plots(tmp_path):
    png = tmp_path / "curve.png"
    runner = CliRunner()
    res = runner.invoke(app, ["noc", "--target", "wse2", "--mesh", "8x8", "--pattern",
                              "tornado", "--rates", "0.1:0.5:0.1", "--msg-bytes", "16", "--json",
                              "-o", str(png)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["points"]) == 5 and out["pattern"] == "tornado"
    assert out["channel_load_bound"] == pytest.approx(1 / 3)  # 3 sources share a link
    assert png.stat().st_size > 1000
    res = runner.invoke(app, ["noc", "--mesh", "8x8", "--rates", "0.05,0.3"])
    assert res.exit_code == 0 and "saturation" in res.stdout


def test_cli_noc_bad_input_is_one_error_line():
    res = CliRunner().invoke(app, ["noc", "--pattern", "zipf"])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: pattern")
