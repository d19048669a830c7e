"""Fabric characterisation: latency against offered load under synthetic traffic.

Network-on-chip studies judge a fabric by standard curves: average message latency against
offered load for standard traffic patterns, and the load at which the network saturates. This
module produces them with the ordinary pipeline and no special path in the engine:

1. A traffic pattern (`PATTERNS`, by name) picks each message's destination; an injection
   process (Bernoulli or Poisson, per core, at a given rate) picks its generation cycle.
2. `traffic_program` lowers the traffic to a plain `MeshProgram`: every injecting core runs
   `COMPUTE(delay) SEND` per message, the delay being an OP_NONE compute whose FLOPs make it
   last exactly the gap to the next generation cycle, then one RECV per message it receives.
   Receives come after all sends, so a core's receiving never holds back its injection (the
   kernel fixes a delivery's time without asking when the receiver wants it).
3. `measure_point` runs the Numba kernel and reads each message's delivery time from the
   kernel's per-route-entry arrival times: latency = delivery - generation, so the source
   queue (the first link's backlog) counts, and the receiving core does not.
4. `latency_curve` repeats this over rates, marks saturation and sets the channel-load bound
   (`channel_load`: the busiest link's expected load, computed exactly from the routes) beside
   it.

Units. A flit is one link transfer: `target.link_bytes_per_cycle` bytes (WSE-2: one 32-bit
wavelet). A message of B bytes is S = ceil(B / link bytes) flits and holds each link S cycles.
Loads are per *injecting* core per cycle, in flits or bytes; patterns that map a core to itself
(the transpose diagonal, the bit-complement centre of an odd mesh) leave that core silent, as
is usual in NoC studies, and it is not counted.

By default the curve measures the fabric alone: the target's send, receive and compute
overheads are set to zero. `with_overheads=True` keeps the send overhead (each message costs
its source `send_overhead_cycles` before it enters the fabric, and a core injects at most one
message per send overhead) and adds `recv_overhead_cycles` to every latency; the delay
instructions never pay a compute overhead, as they are an artefact of the generator.

    >>> from compiler.targets import WSE2
    >>> spec = TrafficSpec(pattern="uniform", msg_bytes=32, warmup_cycles=200,
    ...                    measure_cycles=400, drain_cycles=200)
    >>> curve = latency_curve(spec, WSE2.with_mesh(8, 8), [0.05, 0.1])
    >>> [p.accepted >= 0.9 * p.offered for p in curve.points]
    [True, True]
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from compiler.program import OP_NONE, MeshProgram, ProgramBuilder
from compiler.targets import DTYPE_BYTES, MeshTarget
from wafersim.engine import DEADLOCK, WATCHDOG, run_kernel
from wafersim.result import SimulationError
from wafersim.simulate import kernel_args

PROCESSES = ("bernoulli", "poisson")
UNITS = ("flits", "bytes")
# Saturation: the first rate whose accepted load falls short of its offered load by more than
# this fraction. The latency knee, reported beside it, is where the average latency first
# exceeds this multiple of the zero-load latency.
SATURATION_THROUGHPUT_TOL = 0.05
KNEE_LATENCY_FACTOR = 3.0
# One point may cross at most this many links in all (about 60 bytes of memory per hop).
MAX_HOPS_PER_POINT = 60_000_000
# Exact channel loads need a cores x cores traffic matrix; above this many cores it is skipped.
MAX_CORES_FOR_BOUND = 4096


class TrafficError(ValueError):
    """Traffic that cannot be generated: a bad pattern, rate, window or mesh."""


@dataclass(frozen=True)
class TrafficSpec:
    """Synthetic traffic for one curve; the offered rate is given per point.

    `hotspot_fraction` of hotspot traffic goes to `hotspots` cores nearest the mesh centre,
    the rest is uniform random. Windows are in cycles: traffic is generated for
    warmup + measure + drain cycles; only messages generated in the measurement window count
    for latency, and accepted load counts deliveries inside it.
    """

    pattern: str = "uniform"
    msg_bytes: int = 32
    unit: str = "flits"  # rates in flits or bytes per cycle per injecting core
    process: str = "bernoulli"
    warmup_cycles: int = 1000
    measure_cycles: int = 1000
    drain_cycles: int = 500
    seed: int = 0
    hotspot_fraction: float = 0.2
    hotspots: int = 4

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise TrafficError(f"pattern {self.pattern!r} is not one of {', '.join(PATTERNS)}")
        if self.unit not in UNITS:
            raise TrafficError(f"unit {self.unit!r} is not one of {', '.join(UNITS)}")
        if self.process not in PROCESSES:
            raise TrafficError(f"injection process {self.process!r} is not one of "
                               f"{', '.join(PROCESSES)}")
        for name, low in (("msg_bytes", 1), ("warmup_cycles", 0), ("measure_cycles", 1),
                          ("drain_cycles", 0), ("hotspots", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise TrafficError(f"{name}={value!r} must be an integer >= {low}")
        if not 0.0 <= self.hotspot_fraction <= 1.0:
            raise TrafficError(f"hotspot_fraction={self.hotspot_fraction!r} must be in [0, 1]")

    @property
    def cycles(self) -> int:
        return self.warmup_cycles + self.measure_cycles + self.drain_cycles


# ---------------------------------------------------------------------------------------------
# Traffic patterns. Each takes source cores (one entry per message) and returns destinations;
# a permutation returns the source itself where it maps a core to itself (that core is silent).


def _xy(cores, width):
    return cores % width, cores // width


def uniform(src, width, height, spec, rng):
    """Every other core equally likely."""
    n = width * height
    dst = rng.integers(0, n - 1, len(src))
    return dst + (dst >= src)


def transpose(src, width, height, spec, rng):
    """(x, y) -> (y, x); square meshes only; the diagonal is silent."""
    if width != height:
        raise TrafficError(f"transpose traffic needs a square mesh, not {height}x{width}")
    x, y = _xy(src, width)
    return x * width + y


def bit_complement(src, width, height, spec, rng):
    """(x, y) -> (W-1-x, H-1-y): every bit of the address flipped on a power-of-two mesh."""
    x, y = _xy(src, width)
    return (height - 1 - y) * width + (width - 1 - x)


def tornado(src, width, height, spec, rng):
    """(x, y) -> ((x + ceil(W/2) - 1) mod W, (y + ceil(H/2) - 1) mod H), as in BookSim."""
    x, y = _xy(src, width)
    dx, dy = (width + 1) // 2 - 1, (height + 1) // 2 - 1
    return ((y + dy) % height) * width + (x + dx) % width


def neighbour(src, width, height, spec, rng):
    """One of the core's mesh neighbours (2 to 4 of them), equally likely: every message 1 hop."""
    table, degree = _neighbour_table(width, height)
    pick = (rng.random(len(src)) * degree[src]).astype(np.int64)
    return table[src, pick]


def hotspot(src, width, height, spec, rng):
    """`hotspot_fraction` of messages to one of the hotspot cores (never the source itself),
    the rest uniform random."""
    n = width * height
    hot = hotspot_cores(width, height, spec.hotspots)
    dst = uniform(src, width, height, spec, rng)
    own = np.full(n, -1, dtype=np.int64)
    own[hot] = np.arange(len(hot))
    is_hot = own[src] >= 0
    choices = len(hot) - is_hot
    to_hot = (rng.random(len(src)) < spec.hotspot_fraction) & (choices > 0)
    j = (rng.random(len(src)) * np.maximum(choices, 1)).astype(np.int64)
    j += is_hot & (j >= own[src])
    return np.where(to_hot, hot[np.minimum(j, len(hot) - 1)], dst)


@dataclass(frozen=True)
class Pattern:
    fn: Callable
    random: bool  # a fresh destination per message; otherwise a fixed permutation of cores
    description: str


PATTERNS: dict[str, Pattern] = {
    "uniform": Pattern(uniform, True, "uniform random over the other cores"),
    "transpose": Pattern(transpose, False, "(x, y) -> (y, x)"),
    "bitcomp": Pattern(bit_complement, False, "bit complement: (x, y) -> (W-1-x, H-1-y)"),
    "hotspot": Pattern(hotspot, True, "a fraction to a few central cores, the rest uniform"),
    "neighbour": Pattern(neighbour, True, "a random mesh neighbour"),
    "tornado": Pattern(tornado, False, "half way round each dimension, minus one"),
}


def hotspot_cores(width: int, height: int, count: int) -> np.ndarray:
    """The `count` cores nearest the mesh centre (ties by core id)."""
    n = width * height
    if count > n:
        raise TrafficError(f"hotspots={count} is more than the {n} cores of the mesh")
    x, y = _xy(np.arange(n), width)
    dist = (2 * x - (width - 1)) ** 2 + (2 * y - (height - 1)) ** 2
    return np.sort(np.lexsort((np.arange(n), dist))[:count])


def _neighbour_table(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Per core: its neighbours (valid ones first, -1 after) and how many there are."""
    x, y = _xy(np.arange(width * height), width)
    cand = np.stack([np.where(x + 1 < width, x + 1 + y * width, -1),
                     np.where(x > 0, x - 1 + y * width, -1),
                     np.where(y > 0, x + (y - 1) * width, -1),
                     np.where(y + 1 < height, x + (y + 1) * width, -1)], axis=1)
    table = -np.sort(-cand, axis=1)  # valid (>= 0) ids before the -1s
    return table, (cand >= 0).sum(axis=1)


def injecting_cores(spec: TrafficSpec, width: int, height: int) -> np.ndarray:
    """Cores that inject traffic: all of them, less those a permutation maps to themselves."""
    cores = np.arange(width * height)
    pattern = PATTERNS[spec.pattern]
    if pattern.random:
        return cores
    dst = pattern.fn(cores, width, height, spec, None)
    return cores[dst != cores]


def traffic_matrix(spec: TrafficSpec, width: int, height: int) -> np.ndarray:
    """P[s, d]: probability that a message from injecting core s goes to d (rows of silent
    cores are zero). Exact, not sampled."""
    n = width * height
    src = injecting_cores(spec, width, height)
    p = np.zeros((n, n))
    if spec.pattern in ("uniform", "hotspot"):
        p[src] = 1.0 / (n - 1)
        p[src, src] = 0.0
    if spec.pattern == "hotspot":
        hot = hotspot_cores(width, height, spec.hotspots)
        hot_mask = np.zeros((n, n), dtype=bool)
        hot_mask[:, hot] = True
        hot_mask[np.arange(n), np.arange(n)] = False
        k = hot_mask.sum(axis=1, keepdims=True)
        f = np.where(k > 0, spec.hotspot_fraction, 0.0)
        p = p * (1 - f) + np.where(hot_mask, f / np.maximum(k, 1), 0.0)
    elif spec.pattern == "neighbour":
        table, degree = _neighbour_table(width, height)
        for j in range(4):
            ok = table[:, j] >= 0
            p[np.flatnonzero(ok), table[ok, j]] = 1.0 / degree[ok]
    elif not PATTERNS[spec.pattern].random:
        p[src, PATTERNS[spec.pattern].fn(src, width, height, spec, None)] = 1.0
    return p


def channel_load(p: np.ndarray, width: int, height: int) -> np.ndarray:
    """Expected messages per cycle on every link (id core*4 + direction) under XY routing when
    each core injects one message per cycle with destinations drawn from `p`.

    A message crosses the east link leaving (i, y) iff it starts in row y at x0 <= i and ends
    at x1 > i; after its turn it crosses the south link leaving (x, j) iff it ends in column x
    at y1 > j and started at y0 <= j. Prefix sums over those ranges give every link at once.
    """
    p4 = p.reshape(height, width, height, width)  # [y0, x0, y1, x1]
    q = p4.sum(axis=2)  # [y0, x0, x1]: rows travelled in x
    r = p4.sum(axis=1)  # [y0, y1, x1]: columns travelled in y
    i = np.arange(width)
    j = np.arange(height)
    above_x = i[None, :] > i[:, None]  # [i, x1]: x1 > i
    above_y = j[None, :] > j[:, None]  # [j, y1]: y1 > j
    east = (np.cumsum(q, axis=1) * above_x).sum(axis=2)  # x0 <= i < x1
    west = (np.cumsum(q[:, ::-1], axis=1)[:, ::-1] * above_x.T).sum(axis=2)  # x1 < i <= x0
    south = np.einsum("jyx,jy->jx", np.cumsum(r, axis=0), above_y)  # y0 <= j < y1
    north = np.einsum("jyx,jy->jx", np.cumsum(r[::-1], axis=0)[::-1], above_y.T)  # y1 < j <= y0
    load = np.zeros((height, width, 4))
    load[:, :, 0], load[:, :, 1] = east, west
    load[:, :, 2], load[:, :, 3] = north, south
    return load.reshape(-1)


def saturation_bound(spec: TrafficSpec, target: MeshTarget) -> float | None:
    """The channel-load bound: the offered rate (spec.unit per cycle per injecting core) at
    which the busiest link carries one flit per cycle. None above MAX_CORES_FOR_BOUND cores,
    except for uniform traffic, whose closed form `uniform_bound_flits` needs no matrix."""
    w, h = target.width, target.height
    if spec.pattern == "uniform":
        flits = uniform_bound_flits(w, h)
    elif w * h > MAX_CORES_FOR_BOUND:
        return None
    else:
        flits = 1.0 / channel_load(traffic_matrix(spec, w, h), w, h).max()
    return flits * spec_unit_per_flit(spec, target)


def uniform_bound_flits(width: int, height: int) -> float:
    """Uniform random traffic under XY routing: the east link leaving column i of a row carries
    (i+1)(W-1-i)H / (N-1) messages per unit injection rate, the south link leaving row j of a
    column (j+1)(H-1-j)W / (N-1); the busiest is the middle one, about max(W, H) / 4, so the
    network saturates near 4 / k flits per cycle per core on a k x k mesh."""
    n = width * height
    i, j = (width - 1) // 2, (height - 1) // 2
    worst = max((i + 1) * (width - 1 - i) * height, (j + 1) * (height - 1 - j) * width)
    return (n - 1) / worst


# ---------------------------------------------------------------------------------------------
# Injection and lowering to a MeshProgram.


def flits_per_message(spec: TrafficSpec, target: MeshTarget) -> int:
    return math.ceil(spec.msg_bytes / target.link_bytes_per_cycle)


def spec_unit_per_flit(spec: TrafficSpec, target: MeshTarget) -> float:
    """How many of spec.unit one flit of offered load is (1, or message bytes per flit)."""
    return 1.0 if spec.unit == "flits" else spec.msg_bytes / flits_per_message(spec, target)


def message_rate(spec: TrafficSpec, target: MeshTarget, rate: float) -> float:
    """Messages per cycle per injecting core for an offered `rate` in spec.unit."""
    if not isinstance(rate, (int, float, np.number)) or not math.isfinite(rate) or rate <= 0:
        raise TrafficError(f"rate {rate!r} must be a number > 0 ({spec.unit} per cycle per core)")
    per_msg = flits_per_message(spec, target) if spec.unit == "flits" else spec.msg_bytes
    msgs = rate / per_msg
    if spec.process == "bernoulli" and msgs > 1:
        raise TrafficError(f"rate {rate} {spec.unit}/cycle/core is more than one {per_msg}-"
                           f"{spec.unit[:-1]} message per cycle, the most Bernoulli injection "
                           "can offer; use the poisson process or larger messages")
    return msgs


def generation_times(process: str, msgs_per_cycle: float, sources: int, cycles: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Generation cycles in [0, cycles) of every message: (source index, cycle), sorted by
    source then cycle. Bernoulli: each cycle a message with probability p (geometric gaps);
    Poisson: exponential gaps, several messages may share a cycle."""
    mean = cycles * msgs_per_cycle
    draws = max(1, int(mean + 6 * math.sqrt(mean) + 8))
    parts, offset = [], np.zeros(sources)
    while True:
        if process == "bernoulli":
            gaps = rng.geometric(msgs_per_cycle, (sources, draws)).astype(np.float64)
            gaps[:, 0] -= 1 if not parts else 0  # the first success at cycle G-1
        else:
            gaps = rng.exponential(1.0 / msgs_per_cycle, (sources, draws))
        t = offset[:, None] + np.cumsum(gaps, axis=1)
        parts.append(t)
        offset = t[:, -1]
        if offset.min() >= cycles:
            break
    t = np.floor(np.concatenate(parts, axis=1))
    keep = t < cycles
    idx = np.broadcast_to(np.arange(sources)[:, None], t.shape)[keep]
    return idx.astype(np.int64), t[keep].astype(np.int64)


def _checked_message_rate(spec: TrafficSpec, target: MeshTarget, rate: float) -> float:
    """message_rate, refusing a point too large to simulate."""
    msgs = message_rate(spec, target, rate)
    w, h = target.width, target.height
    sources = len(injecting_cores(spec, w, h))
    est_hops = sources * spec.cycles * msgs * mean_hops(spec, w, h)
    if est_hops > MAX_HOPS_PER_POINT:
        raise TrafficError(f"rate {rate} makes about {est_hops:,.0f} message hops in "
                           f"{spec.cycles} cycles on {h}x{w} cores (at most "
                           f"{MAX_HOPS_PER_POINT:,}); lower the rate or the windows")
    return msgs


def _check_mesh(spec: TrafficSpec, target: MeshTarget) -> None:
    w, h = target.width, target.height
    if w * h < 2:
        raise TrafficError("synthetic traffic needs a mesh of at least 2 cores")
    if len(injecting_cores(spec, w, h)) == 0:
        raise TrafficError(f"pattern {spec.pattern!r} sends nothing on a {h}x{w} mesh")
    if spec.pattern == "hotspot":
        hotspot_cores(w, h, spec.hotspots)


def fabric_target(target: MeshTarget, with_overheads: bool = False) -> MeshTarget:
    """The target the traffic runs on: no compute overhead (the delays are the generator's),
    and no send or receive overhead unless `with_overheads`."""
    if with_overheads:
        return dataclasses.replace(target, compute_overhead_cycles=0)
    return dataclasses.replace(target, compute_overhead_cycles=0, send_overhead_cycles=0,
                               recv_overhead_cycles=0)


@dataclass(frozen=True, eq=False)
class Traffic:
    """A traffic program and what the program does not hold: each message's generation cycle
    (indexed by the program's message ids), and the target copy it must run on."""

    program: MeshProgram
    target: MeshTarget
    generated: np.ndarray  # int64 cycle per message
    sources: int  # injecting cores
    flits_per_message: int


def traffic_program(spec: TrafficSpec, target: MeshTarget, rate: float,
                    with_overheads: bool = False) -> Traffic:
    """Lower synthetic traffic at `rate` (spec.unit per cycle per injecting core) to a program.

    Messages are declared in send order (by source core, then generation cycle), which is the
    order `ProgramBuilder.build` numbers them in, so message ids need no remapping.
    """
    _check_mesh(spec, target)
    w, h = target.width, target.height
    tgt = fabric_target(target, with_overheads)
    msgs = _checked_message_rate(spec, tgt, rate)
    rng = np.random.default_rng(spec.seed)
    cores = injecting_cores(spec, w, h)
    idx, gen = generation_times(spec.process, msgs, len(cores), spec.cycles, rng)
    src = cores[idx]
    dst = PATTERNS[spec.pattern].fn(src, w, h, spec, rng)

    # Per-core rank of each message, and the cycle each SEND starts (send-overhead queue:
    # start_i = max(gen_i, end_{i-1}), end_i = start_i + s, a Lindley recursion solved by a
    # cumulative maximum: end_i = (i+1)s + max_{j<=i}(gen_j - j s), segment by segment).
    first = np.r_[0, np.flatnonzero(np.diff(idx)) + 1]
    seg = np.repeat(np.arange(len(first)), np.diff(np.r_[first, len(idx)]))
    rank = np.arange(len(idx)) - first[seg]
    s = tgt.send_overhead_cycles
    key = gen - rank * s
    span = int(key.max() - key.min()) + 1 if len(key) else 1
    end = (rank + 1) * s + np.maximum.accumulate(key + seg * span) - seg * span
    prev_end = np.where(rank > 0, np.r_[0, end[:-1]], 0)
    delay = np.maximum(gen - prev_end, 0)

    dtype, flop_rate = max(tgt.flops_per_cycle, key=lambda kv: kv[1])
    flops = np.floor(delay * flop_rate).astype(np.int64)
    if np.any(np.ceil(flops / flop_rate) != delay):
        raise TrafficError(f"target {tgt.name!r}: no dtype computes >= 1 FLOP per cycle, so "
                           "delay instructions cannot last an exact number of cycles")

    bld = ProgramBuilder(w, h, dtype)
    elems = max(1, math.ceil(spec.msg_bytes / DTYPE_BYTES[dtype]))
    buf = bld.buffers(np.arange(w * h), 1, elems)  # one message-sized buffer per core
    m = bld.messages(src, dst, spec.msg_bytes, 0)
    wait = delay > 0
    bld.compute(src[wait], 2 * rank[wait], OP_NONE, c=buf[src[wait]], flops=flops[wait],
                nbytes=0)
    bld.send(src, 2 * rank + 1, m, buf[src])
    # Receives after every send of the core, in generation order.
    by_dst = np.lexsort((m, gen, dst))
    d = dst[by_dst]
    d_first = np.r_[0, np.flatnonzero(np.diff(d)) + 1]
    d_rank = np.arange(len(d)) - np.repeat(d_first, np.diff(np.r_[d_first, len(d)]))
    base = 2 * (int(rank.max()) + 1) if len(rank) else 0
    bld.recv(d, base + d_rank, m[by_dst], buf[d])
    program = bld.build(kind="noc", pattern=spec.pattern, rate=float(rate), unit=spec.unit)
    return Traffic(program=program, target=tgt, generated=gen, sources=len(cores),
                   flits_per_message=flits_per_message(spec, tgt))


# ---------------------------------------------------------------------------------------------
# Measurement.


@dataclass(frozen=True)
class LoadPoint:
    """One point of a latency-load curve. Loads in the curve's unit per cycle per injecting
    core, latencies in cycles, over messages generated in the measurement window."""

    rate: float  # the offered rate asked for
    offered: float  # generated in the measurement window
    accepted: float  # delivered in the measurement window
    latency_avg: float
    latency_p99: float
    latency_max: float
    zero_load_latency: float  # hops x hop latency + serialisation (+ overheads), averaged
    hops_avg: float
    max_link_busy: float  # busiest link's busy fraction of the measurement window
    messages: int  # in the whole program
    measured: int  # generated in the measurement window
    events: int
    sim_wall_s: float


def run_traffic(traffic: Traffic) -> tuple[np.ndarray, int, float]:
    """Run the kernel: (arrival cycle of every route entry, events, kernel seconds).
    Message m is delivered at arrival[program.route_ptr[m + 1] - 1]."""
    args = kernel_args(traffic.program, traffic.target)
    t0 = time.perf_counter()
    status, events, *_, arrival, _free = run_kernel(*args)
    wall = time.perf_counter() - t0
    if status == WATCHDOG:
        raise SimulationError("watchdog: the traffic program did not terminate")
    if status == DEADLOCK:
        raise SimulationError("deadlock in a traffic program (a message was never delivered)")
    return arrival, int(events), wall


def _link_busy(traffic: Traffic, arrival: np.ndarray, w0: int, w1: int) -> np.ndarray:
    """Cycles of [w0, w1) each link spent carrying flits: an entry took its link at
    arrival - hop latency - serialisation, for serialisation cycles."""
    ser = traffic.flits_per_message
    start = arrival - traffic.target.hop_latency_cycles - ser
    overlap = np.clip(np.minimum(start + ser, w1) - np.maximum(start, w0), 0, None)
    return np.bincount(traffic.program.route_link, weights=overlap,
                       minlength=traffic.program.cores * 4)


def measure_point(spec: TrafficSpec, target: MeshTarget, rate: float,
                  with_overheads: bool = False) -> LoadPoint:
    """Generate, simulate and measure traffic at one offered `rate`."""
    traffic = traffic_program(spec, target, rate, with_overheads)
    tgt, prog = traffic.target, traffic.program
    arrival, events, wall = run_traffic(traffic)
    delivered = arrival[prog.route_ptr[1:] - 1]
    if with_overheads:
        delivered = delivered + tgt.recv_overhead_cycles
    gen = traffic.generated
    w0, w1 = spec.warmup_cycles, spec.warmup_cycles + spec.measure_cycles
    inside = (gen >= w0) & (gen < w1)
    latency = (delivered - gen)[inside]
    hops = np.diff(prog.route_ptr)[inside]
    per_msg = traffic.flits_per_message * spec_unit_per_flit(spec, tgt)
    norm = per_msg / (spec.measure_cycles * traffic.sources)
    arrived = (delivered >= w0) & (delivered < w1)
    fixed = traffic.flits_per_message + (
        tgt.send_overhead_cycles + tgt.recv_overhead_cycles if with_overheads else 0)
    n = int(inside.sum())
    return LoadPoint(
        rate=float(rate), offered=n * norm, accepted=int(arrived.sum()) * norm,
        latency_avg=float(latency.mean()) if n else math.nan,
        latency_p99=float(np.percentile(latency, 99)) if n else math.nan,
        latency_max=float(latency.max()) if n else math.nan,
        zero_load_latency=float(hops.mean() * tgt.hop_latency_cycles + fixed) if n else math.nan,
        hops_avg=float(hops.mean()) if n else math.nan,
        max_link_busy=float(_link_busy(traffic, arrival, w0, w1).max()) / spec.measure_cycles,
        messages=prog.n_messages, measured=n, events=events, sim_wall_s=wall)


@dataclass(frozen=True)
class LoadCurve:
    """Latency against offered load for one pattern on one target."""

    spec: TrafficSpec
    target: str
    width: int
    height: int
    flits_per_message: int
    with_overheads: bool
    points: tuple[LoadPoint, ...]
    saturation: int | None  # index of the first saturated point, None if none is
    bound: float | None  # channel-load bound, spec.unit per cycle per injecting core
    zero_load_latency: float  # closed form for this pattern, averaged over its messages

    @property
    def saturation_rate(self) -> float | None:
        """The offered load at saturation: where accepted / offered first drops below
        1 - SATURATION_THROUGHPUT_TOL, interpolated between the points either side."""
        if self.saturation is None:
            return None
        k = self.saturation
        if k == 0:
            return self.points[0].offered
        lo, hi = self.points[k - 1], self.points[k]
        short_lo, short_hi = 1 - lo.accepted / lo.offered, 1 - hi.accepted / hi.offered
        f = (SATURATION_THROUGHPUT_TOL - short_lo) / max(short_hi - short_lo, 1e-12)
        return lo.offered + min(max(f, 0.0), 1.0) * (hi.offered - lo.offered)

    @property
    def latency_knee(self) -> float | None:
        """The offered load where average latency first exceeds KNEE_LATENCY_FACTOR x the
        zero-load latency, interpolated; None if it never does."""
        limit = KNEE_LATENCY_FACTOR * self.zero_load_latency
        for k, hi in enumerate(self.points):
            if hi.latency_avg > limit:
                if k == 0:
                    return hi.offered
                lo = self.points[k - 1]
                f = (limit - lo.latency_avg) / (hi.latency_avg - lo.latency_avg)
                return lo.offered + f * (hi.offered - lo.offered)
        return None

    def to_dict(self) -> dict:
        return {
            "target": self.target, "mesh": f"{self.height}x{self.width}",
            "pattern": self.spec.pattern, "unit": self.spec.unit,
            "msg_bytes": self.spec.msg_bytes, "flits_per_message": self.flits_per_message,
            "process": self.spec.process, "seed": self.spec.seed,
            "windows_cycles": {"warmup": self.spec.warmup_cycles,
                               "measure": self.spec.measure_cycles,
                               "drain": self.spec.drain_cycles},
            "with_overheads": self.with_overheads,
            "zero_load_latency_cycles": self.zero_load_latency,
            "channel_load_bound": self.bound,
            "saturation_index": self.saturation,
            "saturation_rate": self.saturation_rate,
            "saturation_rule": f"accepted < (1 - {SATURATION_THROUGHPUT_TOL:g}) x offered",
            "latency_knee_rate": self.latency_knee,
            "latency_knee_rule": f"average latency > {KNEE_LATENCY_FACTOR:g} x zero-load",
            "points": [dataclasses.asdict(p) for p in self.points],
        }


def saturated(point: LoadPoint) -> bool:
    """Saturation rule: the network delivers less than it is offered, by more than
    SATURATION_THROUGHPUT_TOL of the offered load, during the measurement window.

    Accepted load rather than latency: past saturation the latency of a finite run grows with
    the length of its windows, while the shortfall of accepted load does not."""
    return point.accepted < (1 - SATURATION_THROUGHPUT_TOL) * point.offered


def zero_load_latency(spec: TrafficSpec, target: MeshTarget, with_overheads: bool = False
                      ) -> float:
    """Closed form: mean hops x hop latency + serialisation (+ send and receive overheads),
    the mean taken exactly over the pattern's destination distribution."""
    tgt = fabric_target(target, with_overheads)
    w, h = tgt.width, tgt.height
    fixed = flits_per_message(spec, tgt) + (
        tgt.send_overhead_cycles + tgt.recv_overhead_cycles if with_overheads else 0)
    return mean_hops(spec, w, h) * tgt.hop_latency_cycles + fixed


def mean_hops(spec: TrafficSpec, width: int, height: int) -> float:
    """Expected XY hop count of a message, exact over injecting cores and destinations."""
    n = width * height
    src = injecting_cores(spec, width, height)
    pattern = PATTERNS[spec.pattern]
    if not pattern.random:
        dst = pattern.fn(src, width, height, spec, None)
        return float(_distance(src, dst, width).mean())
    if spec.pattern == "neighbour":
        return 1.0
    # Uniform: mean distance from each source to every core (itself at distance 0).
    x0, y0 = _xy(src, width)
    to_any = (_sum_distance(x0, width) * height + _sum_distance(y0, height) * width) / (n - 1)
    if spec.pattern == "uniform":
        return float(to_any.mean())
    hot = hotspot_cores(width, height, spec.hotspots)
    dist = _distance(src[:, None], hot[None, :], width)
    others = len(hot) - np.isin(src, hot)
    to_hot = dist.sum(axis=1) / np.maximum(others, 1)
    f = np.where(others > 0, spec.hotspot_fraction, 0.0)
    return float(((1 - f) * to_any + f * to_hot).mean())


def _sum_distance(a, k):
    """Sum of |a - b| over b in 0..k-1."""
    return (a * (a + 1) + (k - 1 - a) * (k - a)) // 2


def _distance(a, b, width):
    (xa, ya), (xb, yb) = _xy(np.asarray(a), width), _xy(np.asarray(b), width)
    return np.abs(xa - xb) + np.abs(ya - yb)


def latency_curve(spec: TrafficSpec, target: MeshTarget, rates: Sequence[float],
                  with_overheads: bool = False, stop_after: int | None = None) -> LoadCurve:
    """Measure every rate, in ascending order, and mark saturation. `stop_after`: stop once that
    many points past saturation have been measured (None: measure them all)."""
    _check_mesh(spec, target)
    for r in rates:
        _checked_message_rate(spec, target, r)  # a one-line error for a bad rate, before any run
    rates = sorted({float(r) for r in rates})
    if not rates:
        raise TrafficError("no rates to measure")
    zll = zero_load_latency(spec, target, with_overheads)
    points: list[LoadPoint] = []
    sat = None
    for r in rates:
        points.append(measure_point(spec, target, r, with_overheads))
        if sat is None and saturated(points[-1]):
            sat = len(points) - 1
        if sat is not None and stop_after is not None and len(points) - 1 - sat >= stop_after:
            break
    return LoadCurve(spec=spec, target=target.name, width=target.width, height=target.height,
                     flits_per_message=flits_per_message(spec, target),
                     with_overheads=with_overheads, points=tuple(points), saturation=sat,
                     bound=saturation_bound(spec, target), zero_load_latency=zll)


def parse_rates(text: str) -> list[float]:
    """'0.02:0.5:0.02' (start:stop:step, stop included) or '0.1,0.2,0.3' -> rates."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise TrafficError(f"--rates {text!r}: need step > 0 and stop >= start")
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            if count > 1000:
                raise TrafficError(f"--rates {text!r}: {count} points; at most 1000")
            rates = [round(start + i * step, 12) for i in range(count)]
        else:
            rates = [float(v) for v in text.split(",")]
    except ValueError as exc:
        if isinstance(exc, TrafficError):
            raise
        raise TrafficError(f"--rates {text!r}: expected START:STOP:STEP, e.g. 0.02:0.5:0.02, "
                           "or a comma list") from None
    if any(not math.isfinite(r) or r <= 0 for r in rates):
        raise TrafficError(f"--rates {text!r}: every rate must be > 0")
    return rates


def plot_curves(curves: Sequence[LoadCurve], path, title: str | None = None,
                y: str = "latency") -> None:
    """One line per curve against offered load, saturation (dotted) and bound (dashed) marked:
    `y="latency"` plots average latency, `y="accepted"` the accepted load."""
    if y not in ("latency", "accepted"):
        raise TrafficError(f"plot y={y!r} is not one of latency, accepted")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    top = 0.0
    for i, c in enumerate(curves):
        colour = f"C{i}"
        x = [p.offered for p in c.points]
        if y == "latency":
            ax.plot(x, [p.latency_avg for p in c.points], "o-", ms=3, color=colour,
                    label=c.spec.pattern)
            top = max(top, 6 * c.zero_load_latency)
        else:
            ax.plot(x, [p.accepted for p in c.points], "o-", ms=3, color=colour,
                    label=c.spec.pattern)
            top = max(top, 1.1 * max(x))
        if c.saturation_rate is not None:
            ax.axvline(c.saturation_rate, color=colour, ls=":", lw=1)
        if c.bound is not None:
            ax.axvline(c.bound, color=colour, ls="--", lw=1, alpha=0.6)
    unit = curves[0].spec.unit if curves else "flits"
    if y == "accepted":
        ax.plot([0, top], [0, top], color="grey", lw=0.8, alpha=0.5)
        ax.set_ylabel(f"accepted load ({unit} / cycle / core)")
    else:
        ax.set_ylabel("average latency (cycles)")
    ax.set_ylim(0, top)
    ax.set_xlim(0, None)
    ax.set_xlabel(f"offered load ({unit} / cycle / core)")
    if curves:
        c = curves[0]
        ax.set_title(title or f"{c.height}x{c.width} mesh, {c.spec.msg_bytes}-byte messages "
                     f"({c.flits_per_message} flits); dotted: saturation, dashed: bound",
                     fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
