"""Serving simulation (SimPy): a stream of requests on a wafer or a GPU cluster.

Per-step numbers are half the story; users pick hardware by latency percentiles at a load.
This module runs an inference service over a request stream and reports throughput, TTFT /
TPOT / end-to-end percentiles, queueing delay, goodput under an SLO and KV-cache occupancy.

- Arrivals (`Workload`): Poisson, bursty (gamma inter-arrival times, coefficient of variation
  `cv`, 4 by default, same mean rate), or a CSV trace (`arrival_s, prompt_tokens,
  output_tokens`).
- Scheduler: continuous batching, one SimPy process per server. At every iteration boundary
  it admits waiting requests first come first served while the batch is below `max_batch`
  and the KV pool has room for the request's prompt + output (reserved whole at admission, as
  a paged cache with no preemption would); it prefills the admitted prompts (colocated), then
  runs decode steps of the whole batch, each step one token for every running request.
  A request that could never fit (prompt + output beyond the pool or the longest sequence)
  is refused at arrival and counted; one that does not fit now waits (head-of-line).
- Disaggregated (`prefill=` a second step table): a prefill server (its own hardware: a wafer
  region or a set of GPUs) prefills prompts in arrival order and hands each, with its first
  token, to the decode server, which admits them as above without prefilling. The KV transfer
  between them is not charged. The prefill server does not depend on the decode server (no
  back-pressure), so it is simulated first and its hand-offs are the decode server's arrivals.
- Step times come from `wafersim.steps.StepTable` (simulated bucket points, interpolated). A
  decode step of a batch is timed at the batch's mean cached context.

Speed: the scheduler does not step token by token. Between two events that change the batch
(an admission or a completion) the batch is fixed, so it takes all the decode steps up to the
next completion, or up to the step during which the next admissible request arrives, as one
SimPy timeout (their times are summed with numpy). A one-hour trace at 50 requests/s (180k
requests) takes a few hundred thousand timeouts (benchmarks/serving_speed.py).

A monitor process samples the queue, the batch and the KV pool at fixed intervals: the
occupancy time series, and the time-average queue length that Little's law checks.

>>> import numpy as np
>>> from wafersim.steps import StepTable
>>> t = constant_table(decode_s=0.01, prefill_s=0.05, max_batch=8, kv_tokens=10_000)
>>> w = poisson(rate=5, duration_s=60, prompt=100, output=20, seed=1)
>>> r = simulate(w, t)
>>> s = r.summary()
>>> s["completed"] == len(w), s["ttft_ms"]["p50"] >= 50
(True, True)
"""

from __future__ import annotations

import csv
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simpy

from wafersim.steps import StepTable

ARRIVALS = ("poisson", "bursty")  # or a path to a CSV trace
PERCENTILES = (50, 90, 99)


# ---- workloads ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """Requests in arrival order: arrival time (s), prompt tokens, output tokens (>= 1, the
    first of which the prefill produces)."""

    arrival_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    name: str
    duration_s: float

    def __len__(self) -> int:
        return len(self.arrival_s)

    def __post_init__(self):
        n = len(self.arrival_s)
        if len(self.prompt) != n or len(self.output) != n:
            raise ValueError("workload: arrival, prompt and output columns differ in length")
        if n and (np.any(np.diff(self.arrival_s) < 0) or self.arrival_s[0] < 0):
            raise ValueError("workload: arrival times must be >= 0 and in order")
        if n and (self.prompt.min() < 1 or self.output.min() < 1):
            raise ValueError("workload: prompt and output tokens must be >= 1")


def _fixed(n: int, prompt: int, output: int, arrivals, name, duration_s) -> Workload:
    if prompt < 1 or output < 1:
        raise ValueError(f"--prompt {prompt} and --output {output} must be >= 1")
    return Workload(arrivals, np.full(n, prompt, np.int64), np.full(n, output, np.int64), name,
                    float(duration_s))


def _check_rate(rate: float, duration_s: float) -> None:
    if not rate > 0 or not duration_s > 0:
        raise ValueError(f"rate {rate} and duration {duration_s} must be > 0")


def poisson(rate: float, duration_s: float, prompt: int, output: int, seed: int = 0) -> Workload:
    """Poisson arrivals at `rate` per second over [0, duration_s)."""
    _check_rate(rate, duration_s)
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, int(rate * duration_s * 1.2 + 50))
    t = np.cumsum(gaps)
    while t[-1] < duration_s:
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1 / rate, len(t)))])
    t = t[t < duration_s]
    return _fixed(len(t), prompt, output, t, f"poisson {rate:g}/s", duration_s)


def bursty(rate: float, duration_s: float, prompt: int, output: int, seed: int = 0,
           cv: float = 4.0) -> Workload:
    """Gamma inter-arrival times with mean 1/rate and coefficient of variation `cv` (> 1 is
    burstier than Poisson: clusters of arrivals with long gaps between them)."""
    _check_rate(rate, duration_s)
    if not cv > 0:
        raise ValueError(f"burst cv {cv} must be > 0")
    rng = np.random.default_rng(seed)
    shape = 1 / cv**2
    n = int(rate * duration_s * 1.5 + 100)
    t = np.cumsum(rng.gamma(shape, 1 / (rate * shape), n))
    while t[-1] < duration_s:
        t = np.concatenate([t, t[-1] + np.cumsum(rng.gamma(shape, 1 / (rate * shape), n))])
    t = t[t < duration_s]
    return _fixed(len(t), prompt, output, t, f"bursty {rate:g}/s cv {cv:g}", duration_s)


def load_trace(path: str | Path) -> Workload:
    """A CSV with a header naming arrival_s, prompt_tokens, output_tokens (any order; other
    columns ignored); rows are sorted by arrival."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ValueError(f"trace {path}: {exc.strerror}") from None
    need = ("arrival_s", "prompt_tokens", "output_tokens")
    if not rows or any(k not in rows[0] for k in need):
        raise ValueError(f"trace {path}: needs a header with columns {', '.join(need)}")
    try:
        a = np.array([float(r["arrival_s"]) for r in rows])
        p = np.array([int(r["prompt_tokens"]) for r in rows], np.int64)
        o = np.array([int(r["output_tokens"]) for r in rows], np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"trace {path}: {exc}") from None
    order = np.argsort(a, kind="stable")
    return Workload(a[order], p[order], o[order], f"trace {Path(path).name}",
                    float(a.max()) if len(a) else 0.0)


def make_workload(arrivals: str, rate: float, duration_s: float, prompt: int, output: int,
                  seed: int = 0) -> Workload:
    """`arrivals`: poisson, bursty, or the path of a CSV trace."""
    if arrivals == "poisson":
        return poisson(rate, duration_s, prompt, output, seed)
    if arrivals == "bursty":
        return bursty(rate, duration_s, prompt, output, seed)
    if arrivals.endswith(".csv") or Path(arrivals).is_file():
        return load_trace(arrivals)
    raise ValueError(f"--arrivals {arrivals!r}: expected poisson, bursty or a trace .csv")


# ---- the service -------------------------------------------------------------------------
@dataclass(frozen=True)
class SLO:
    ttft_s: float = 1.0
    tpot_s: float = 0.020


@dataclass
class ServeResult:
    """Per-request times (NaN where not reached) and the monitor's samples."""

    system: str
    workload: Workload
    admit_s: np.ndarray
    first_s: np.ndarray
    done_s: np.ndarray
    refused: np.ndarray
    end_s: float
    samples: dict  # t, waiting, running, reserved_tokens, used_tokens (monitor, fixed dt)
    kv_capacity_tokens: int
    max_batch: int
    disaggregated: bool
    iterations: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self, slo: SLO = SLO(), series_points: int = 200) -> dict:
        w = self.workload
        n = len(w)
        done = ~np.isnan(self.done_s)
        ttft = (self.first_s - w.arrival_s)[done]
        multi = done & (w.output > 1)
        tpot = ((self.done_s - self.first_s) / np.maximum(w.output - 1, 1))[multi]
        e2e = (self.done_s - w.arrival_s)[done]
        admitted = ~np.isnan(self.admit_s)
        queue = (self.admit_s - w.arrival_s)[admitted]
        span = max(self.end_s, 1e-12)
        ok_ttft = (self.first_s - w.arrival_s) <= slo.ttft_s
        ok_tpot = (w.output == 1) | ((self.done_s - self.first_s) / np.maximum(w.output - 1, 1)
                                     <= slo.tpot_s)
        good = done & ok_ttft & ok_tpot
        s = self.samples
        cap = max(self.kv_capacity_tokens, 1)
        lam = n / (len(s["t"]) * s["dt"]) if len(s["t"]) else 0.0
        L = float(np.mean(s["waiting"])) if len(s["t"]) else 0.0
        W = float(queue.mean()) if len(queue) else 0.0
        out = {
            "system": self.system, "workload": w.name, "requests": n,
            "completed": int(done.sum()), "refused": int(self.refused.sum()),
            "duration_s": w.duration_s, "end_s": self.end_s,
            "drain_s": max(self.end_s - w.duration_s, 0.0),
            "offered_rate": n / w.duration_s if w.duration_s else None,
            "output_tokens_per_s": float(w.output[done].sum() / span),
            "requests_per_s": float(done.sum() / span),
            "ttft_ms": _stats(ttft * 1e3), "tpot_ms": _stats(tpot * 1e3),
            "e2e_s": _stats(e2e), "queue_ms": _stats(queue * 1e3),
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
            "goodput_fraction": float(good.sum() / n) if n else None,
            "goodput_rps": float(good.sum() / span),
            "kv_capacity_tokens": self.kv_capacity_tokens, "max_batch": self.max_batch,
            "kv_reserved_mean": float(np.mean(s["reserved"]) / cap) if len(s["t"]) else 0.0,
            "kv_reserved_max": float(np.max(s["reserved"]) / cap) if len(s["t"]) else 0.0,
            "kv_used_mean": float(np.mean(s["used"]) / cap) if len(s["t"]) else 0.0,
            "batch_mean": float(np.mean(s["running"])) if len(s["t"]) else 0.0,
            "little": {"L_queue": L, "lambda": lam, "W_queue_s": W,
                       "rel_error": abs(L - lam * W) / (lam * W) if lam * W > 0 else None},
            "disaggregated": self.disaggregated, "iterations": self.iterations,
            "kv_series": _series(s, cap, series_points),
        }
        out.update(self.extra)
        return out


def _stats(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    p = np.percentile(x, PERCENTILES)
    return {"mean": float(x.mean()), **{f"p{q}": float(v) for q, v in zip(PERCENTILES, p)}}


def _series(s: dict, cap: int, points: int) -> dict:
    """The monitor's samples averaged into at most `points` bins (occupancy as fractions)."""
    t = np.asarray(s["t"])
    if len(t) == 0 or points <= 0:
        return {"t_s": [], "kv_reserved": [], "kv_used": [], "running": [], "waiting": []}
    bins = np.array_split(np.arange(len(t)), min(points, len(t)))

    def avg(v):
        v = np.asarray(v, dtype=float)
        return [float(v[b].mean()) for b in bins]

    return {"t_s": avg(t), "kv_reserved": [x / cap for x in avg(s["reserved"])],
            "kv_used": [x / cap for x in avg(s["used"])], "running": avg(s["running"]),
            "waiting": avg(s["waiting"])}


class _Server:
    """One continuous-batching server: its state and its SimPy process (`run`)."""

    def __init__(self, env, table: StepTable, stream: np.ndarray, w: Workload,
                 prefill_inline: bool, max_batch: int | None, fit_limit: int):
        self.env, self.table, self.stream, self.w = env, table, stream, w
        self.prefill_inline = prefill_inline
        self.max_batch = max(1, min(max_batch or table.max_batch, table.max_batch))
        self.cap = table.kv_capacity_tokens
        self.need = (w.prompt + w.output).astype(np.int64)
        self.fit_limit = fit_limit
        n = len(w)
        self.admit = np.full(n, np.nan)
        self.first = np.full(n, np.nan)
        self.done = np.full(n, np.nan)
        self.refused = np.zeros(n, bool)
        self.waiting: deque[int] = deque()
        self.idx = np.zeros(0, np.int64)
        self.ctx = np.zeros(0)
        self.left = np.zeros(0, np.int64)
        self.reserved = 0
        self.arrived = 0  # stream entries looked at
        self.admitted = 0
        self.n_refused = 0
        self.iterations = 0
        self.finished = False

    def _take_arrivals(self, now: float) -> None:
        hi = int(np.searchsorted(self.stream, now, side="right"))
        for i in range(self.arrived, hi):
            if self.need[i] > self.cap or self.need[i] > self.fit_limit:
                self.refused[i] = True
                self.n_refused += 1
            else:
                self.waiting.append(i)
        self.arrived = hi

    def _admit(self, now: float) -> list[int]:
        new, nrun = [], len(self.idx)
        while (self.waiting and nrun + len(new) < self.max_batch
               and self.reserved + self.need[self.waiting[0]] <= self.cap):
            i = self.waiting.popleft()
            self.reserved += int(self.need[i])
            new.append(i)
        if new:
            self.admit[new] = now
            self.admitted += len(new)
        return new

    def _retire(self, now: float) -> None:
        fin = self.left == 0
        if fin.any():
            gone = self.idx[fin]
            self.done[gone] = now
            self.reserved -= int(self.need[gone].sum())
            keep = ~fin
            self.idx, self.ctx, self.left = self.idx[keep], self.ctx[keep], self.left[keep]

    def run(self):
        env, w, n = self.env, self.w, len(self.stream)
        while True:
            self.iterations += 1
            now = env.now
            self._take_arrivals(now)
            new = self._admit(now)
            if new:
                new = np.asarray(new, np.int64)
                if self.prefill_inline:
                    yield env.timeout(self.table.prefill_lengths(w.prompt[new]))
                    self.first[new] = env.now
                self.idx = np.concatenate([self.idx, new])
                self.ctx = np.concatenate([self.ctx, w.prompt[new].astype(float)])
                self.left = np.concatenate([self.left, w.output[new] - 1])
                self._retire(env.now)
                continue
            nrun = len(self.idx)
            if nrun == 0:
                if self.waiting:  # cannot happen: an idle server fits any unrefused request
                    raise RuntimeError("serving: an idle server could not admit a request")
                if self.arrived >= n:
                    break
                yield env.timeout(max(self.stream[self.arrived] - now, 0.0))
                continue
            k = int(self.left.min())
            steps = self.table.decode_many(nrun, self.ctx.mean() + np.arange(k))
            cum = np.cumsum(steps)
            if not self.waiting and nrun < self.max_batch and self.arrived < n:
                ahead = self.stream[self.arrived] - now
                if ahead < cum[-1]:
                    k = int(np.searchsorted(cum, ahead, side="left")) + 1
            yield env.timeout(float(cum[k - 1]))
            self.ctx += k
            self.left -= k
            self._retire(env.now)
        self.finished = True


def _monitor(env, server: _Server, dt: float, out: dict):
    """Samples at dt/2, 3dt/2, ... until the server is done."""
    yield env.timeout(dt / 2)
    while not server.finished:
        arrived = int(np.searchsorted(server.stream, env.now, side="right"))
        out["t"].append(env.now)
        out["waiting"].append(arrived - server.admitted - server.n_refused)
        out["running"].append(len(server.idx))
        out["reserved"].append(server.reserved)
        out["used"].append(float(server.ctx.sum()))
        yield env.timeout(dt)


def _prefill_server(env, table: StepTable, w: Workload, batch: int, out: np.ndarray,
                    start: np.ndarray):
    """FIFO prefill of up to `batch` arrived prompts at a time; out[i] = hand-off time."""
    n, i = len(w), 0
    while i < n:
        if w.arrival_s[i] > env.now:
            yield env.timeout(w.arrival_s[i] - env.now)
        hi = min(int(np.searchsorted(w.arrival_s, env.now, side="right")), i + batch)
        start[i:hi] = env.now
        yield env.timeout(table.prefill_lengths(w.prompt[i:hi]))
        out[i:hi] = env.now
        i = hi


def simulate(workload: Workload, table: StepTable, prefill: StepTable | None = None,
             max_batch: int | None = None, prefill_batch: int | None = None,
             samples: int = 2000) -> ServeResult:
    """Run the service over `workload`; `prefill` (a second table) disaggregates prefill onto
    its own hardware. `max_batch` caps the decode batch (default: the hardware's). The
    monitor samples `samples` times over the arrival window (and on through the drain)."""
    w = workload
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max batch {max_batch} must be >= 1")
    dt = max(w.duration_s, 1e-9) / max(samples, 1)
    fit = table.max_seq_tokens
    if prefill is None:
        env = simpy.Environment()
        srv = _Server(env, table, w.arrival_s, w, True, max_batch, fit)
        extra = {}
    else:
        fit = min(fit, prefill.max_seq_tokens)
        handoff, pstart = np.full(len(w), np.nan), np.full(len(w), np.nan)
        pb = 1 if prefill.sequential_prefill else (prefill_batch or max(prefill.prefill_batches))
        penv = simpy.Environment()
        penv.process(_prefill_server(penv, prefill, w, pb, handoff, pstart))
        penv.run()
        # requests that cannot fit the decode server are refused there, but were prefilled:
        # keep the hand-off order (FIFO, so already sorted)
        env = simpy.Environment()
        srv = _Server(env, table, handoff, w, False, max_batch, fit)
        srv.first[:] = handoff
        extra = {"prefill_system": prefill.system,
                 "prefill_queue_ms": _stats((pstart - w.arrival_s) * 1e3)}
    out = {"t": [], "waiting": [], "running": [], "reserved": [], "used": []}
    proc = env.process(srv.run())
    env.process(_monitor(env, srv, dt, out))
    env.run(until=proc)
    out = {k: np.asarray(v) for k, v in out.items()}
    out["dt"] = dt
    if prefill is not None:
        # queueing delay counts from the request's arrival; the decode admission is the end
        srv.first[srv.refused] = np.nan
    return ServeResult(system=table.system if prefill is None else
                       f"{prefill.system} -> {table.system}", workload=w, admit_s=srv.admit,
                       first_s=srv.first, done_s=srv.done, refused=srv.refused,
                       end_s=float(env.now), samples=out,
                       kv_capacity_tokens=table.kv_capacity_tokens,
                       max_batch=srv.max_batch, disaggregated=prefill is not None,
                       iterations=srv.iterations, extra=extra)


def constant_table(decode_s: float, prefill_s: float, max_batch: int, kv_tokens: int,
                   system: str = "constant", prefill_tokens: int = 100) -> StepTable:
    """A synthetic step table: every decode step `decode_s`, a prompt of `prefill_tokens`
    `prefill_s` (proportional to its length), one prompt at a time (for tests and theory)."""
    return StepTable(system=system, kind="synthetic", model="-", batches=[1], ctxs=[1],
                     decode_s=np.array([[decode_s]]), prefill_batches=[1],
                     prefill_tokens=[prefill_tokens], prefill_s=np.array([[prefill_s]]),
                     kv_capacity_tokens=kv_tokens, max_seq_tokens=kv_tokens,
                     max_batch=max_batch, sequential_prefill=True)


def sweep_rates(make, rates: list[float], tables: dict[str, tuple], slo: SLO = SLO(),
                **kw) -> dict[str, list[dict]]:
    """Latency vs load: for each system name -> (table, prefill table or None), one run per
    rate with `make(rate)` as the workload; rows of rate and the key percentiles."""
    out: dict[str, list[dict]] = {name: [] for name in tables}
    for rate in rates:
        w = make(rate)
        for name, (table, pre) in tables.items():
            s = simulate(w, table, pre, **kw).summary(slo, series_points=0)
            out[name].append({"rate": rate, "ttft_p50_ms": s["ttft_ms"]["p50"],
                              "ttft_p99_ms": s["ttft_ms"]["p99"],
                              "tpot_p50_ms": s["tpot_ms"]["p50"],
                              "tpot_p99_ms": s["tpot_ms"]["p99"],
                              "output_tokens_per_s": s["output_tokens_per_s"],
                              "goodput_fraction": s["goodput_fraction"],
                              "refused": s["refused"]})
    return out


def plot(path: str | Path, results: dict[str, dict], curves: dict | None = None) -> None:
    """KV-cache occupancy over time for each system, and latency-vs-load curves if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 3 if curves else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 3.8), squeeze=False)
    ax = axes[0][0]
    for name, s in results.items():
        ser = s["kv_series"]
        ax.plot(ser["t_s"], ser["kv_reserved"], label=f"{name} reserved")
        ax.plot(ser["t_s"], ser["kv_used"], "--", label=f"{name} used")
    ax.set(xlabel="time (s)", ylabel="KV cache occupancy (fraction)", title="KV cache")
    ax.legend(fontsize=7)
    if curves:
        for ax, (metric, label) in zip(axes[0][1:], (("ttft", "TTFT (ms)"),
                                                     ("tpot", "TPOT (ms)"))):
            for name, rows in curves.items():
                r = [row["rate"] for row in rows]
                for q, style in (("p50", "-o"), ("p99", "--s")):
                    ys = [row[f"{metric}_{q}_ms"] for row in rows]
                    ys = [np.nan if y is None else y for y in ys]
                    ax.plot(r, ys, style, label=f"{name} {q}")
            ax.set(xlabel="arrival rate (requests/s)", ylabel=label, yscale="log",
                   title=f"{label.split()[0]} vs load")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the `wafersim serve` command's work -------------------------------------------------
def _ints(text: str, option: str) -> list[int] | None:
    if not text:
        return None
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected integers separated by commas") from None
    if not out or min(out) < 1:
        raise ValueError(f"{option} {text!r}: every value must be >= 1")
    return out


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--rates {text!r}: expected numbers separated by commas") from None
    if not rates or min(rates) <= 0:
        raise ValueError(f"--rates {text!r}: every rate must be > 0")
    return rates


def split_gpus(spec: str) -> tuple[str, str]:
    """'8xA100' -> ('4xA100', '4xA100'): half the GPUs prefill, half decode."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*x\s*([A-Za-z0-9_.-]+)\s*", spec)
    if not m or int(m.group(1)) < 2 or int(m.group(1)) % 2:
        raise ValueError(f"--disaggregate with --gpus {spec!r}: give --prefill-gpus too (only "
                         "an even NxGPU spec is halved by default)")
    half = f"{int(m.group(1)) // 2}x{m.group(2)}"
    return half, half


def split_wafer(target, fraction: float):
    """Prefill and decode regions: the mesh's columns split `fraction` : 1 - fraction."""
    if not 0 < fraction < 1:
        raise ValueError(f"--prefill-fraction {fraction} must be between 0 and 1")
    w = int(round(target.width * fraction))
    if w < 1 or w >= target.width:
        raise ValueError(f"--prefill-fraction {fraction} leaves no columns for one side of "
                         f"{target.name}'s {target.width} columns")
    return target.with_mesh(w, target.height), target.with_mesh(target.width - w, target.height)


def _table(src, buckets: dict, cache_dir: str, error_points: int, progress) -> StepTable:
    import hashlib
    import json

    from wafersim.steps import build_table, code_digest, error_bound

    path = None
    if cache_dir:
        key = json.dumps([src.source(), buckets, code_digest()], sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        safe = "".join(c if c.isalnum() else "_" for c in src.system)
        path = Path(cache_dir).expanduser() / f"steps_{src.cfg.name}_{safe}_{digest}.json"
        if path.is_file():
            table = StepTable.load(path)
            if error_points and table.error is None:
                error_bound(table, src, n=error_points)
                table.save(path)
            return table
    table = build_table(src, progress=progress, **buckets)
    if error_points:
        if progress:
            progress(f"{src.system}: checking the interpolation at {error_points} points")
        error_bound(table, src, n=error_points)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    return table


def run_serve(model: str, wafer: str = "", gpus: str = "", rate: float = 20.0,
              duration_s: float = 600.0, prompt: int = 512, output: int = 256,
              arrivals: str = "poisson", disaggregate: bool = False,
              prefill_fraction: float = 0.5, prefill_gpus: str = "", slo: SLO = SLO(),
              seed: int = 0, rates: list[float] | None = None, batches: str = "",
              ctxs: str = "", prefill_tokens: str = "", max_batch: int | None = None,
              error_points: int = 2, cache_dir: str = "", wafer_prefill_util: float | None = None,
              layers: str = "one", samples: int = 2000, progress=None) -> dict:
    """Build the step tables of each system, run the service, summarise (`wafersim serve`).

    `layers`: wafersim.whole's layer mode for the wafer's decode points. The default, `one`,
    runs each region's loop once and twice and extrapolates; on decode that gives the same
    cycles as simulating every layer (tests/test_stamp.py), in a fraction of the time."""
    from compiler.targets import load_target
    from models import load_model
    from wafersim.steps import GpuSource, WaferSource, powers_of_two

    cfg = load_model(model)
    if not wafer and not gpus:
        wafer = "wse2"
    if error_points < 0:
        raise ValueError(f"--error-points {error_points} must be >= 0")
    w = make_workload(arrivals, rate, duration_s, prompt, output, seed)
    if len(w) == 0:
        raise ValueError(f"the workload ({w.name}) has no requests; raise --rate or --duration")

    def make(r):
        return make_workload(arrivals, r, duration_s, prompt, output, seed)

    lo_p, hi_p = int(w.prompt.min()), int(w.prompt.max())
    buckets = {"batches": _ints(batches, "--batches"),
               "ctxs": _ints(ctxs, "--ctxs") or powers_of_two(lo_p, int((w.prompt
                                                                         + w.output).max())),
               "prefill_tokens": _ints(prefill_tokens, "--prefill-tokens")
               or sorted({lo_p, hi_p} if hi_p > lo_p else {lo_p})}
    systems: dict[str, tuple] = {}
    if wafer:
        tgt = load_target(wafer)
        if disaggregate:
            pre_t, dec_t = split_wafer(tgt, prefill_fraction)
            pre = _table(WaferSource(cfg, pre_t, layers=layers, prefill_util=wafer_prefill_util,
                                     cache_dir=cache_dir),
                         {**buckets, "batches": [1], "ctxs": buckets["ctxs"][:1]}, cache_dir, 0,
                         progress)
            dec = _table(WaferSource(cfg, dec_t, layers=layers, cache_dir=cache_dir,
                                     prefill_util=wafer_prefill_util or 1.0),
                         {**buckets, "prefill_tokens": buckets["prefill_tokens"][:1]},
                         cache_dir, error_points, progress)
            systems["wafer"] = (dec, pre)
        else:
            systems["wafer"] = (_table(WaferSource(cfg, tgt, layers=layers,
                                                   prefill_util=wafer_prefill_util,
                                                   cache_dir=cache_dir),
                                       buckets, cache_dir, error_points, progress), None)
    if gpus:
        if disaggregate:
            pg, dg = (prefill_gpus, gpus) if prefill_gpus else split_gpus(gpus)
            pre = _table(GpuSource(cfg, pg), {**buckets, "batches": [1],
                                              "ctxs": buckets["ctxs"][:1]}, cache_dir, 0,
                         progress)
            dec = _table(GpuSource(cfg, dg), buckets, cache_dir, error_points, progress)
            systems["gpus"] = (dec, pre)
        else:
            systems["gpus"] = (_table(GpuSource(cfg, gpus), buckets, cache_dir, error_points,
                                      progress), None)
    results = {}
    for name, (table, pre) in systems.items():
        if progress:
            progress(f"serving {len(w):,} requests on {table.system}")
        r = simulate(w, table, pre, max_batch=max_batch, samples=samples)
        s = r.summary(slo)
        s["steps"] = table.summary()
        if pre is not None:
            s["prefill_steps"] = pre.summary()
        results[name] = s
    curves = None
    if rates:
        curves = sweep_rates(make, rates, systems, slo, max_batch=max_batch, samples=200)
    return {"model": cfg.name, "arrivals": arrivals, "workload": w.name, "rate": rate,
            "duration_s": duration_s, "prompt": prompt, "output": output, "seed": seed,
            "disaggregated": disaggregate, "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
            "systems": results, "curves": curves}


def _ms(v) -> str:
    return "-" if v is None else (f"{v:.4g} ms" if v < 1000 else f"{v / 1e3:.4g} s")


def table_rows(result: dict) -> list[tuple]:
    """(label, one cell per system) rows of the printed table."""
    sys_ = list(result["systems"].values())

    def row(label, fn):
        return (label, *[fn(s) for s in sys_])

    rows = [row("system", lambda s: s["system"]),
            row("requests (done / refused)", lambda s: f"{s['completed']:,} / {s['refused']:,}"),
            row("throughput (output tokens/s)", lambda s: f"{s['output_tokens_per_s']:,.1f}"),
            row("requests/s", lambda s: f"{s['requests_per_s']:.3g}")]
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("queue_ms", "queueing")):
        rows.append(row(f"{label} p50 / p90 / p99", lambda s, k=key: " / ".join(
            _ms(s[k][f"p{q}"]) for q in PERCENTILES)))
    rows += [
        row("end-to-end p50 / p99", lambda s: f"{s['e2e_s']['p50'] or 0:.3g} s / "
                                              f"{s['e2e_s']['p99'] or 0:.3g} s"),
        row("goodput (SLO met)", lambda s: f"{s['goodput_fraction']:.1%} "
                                           f"({s['goodput_rps']:.3g} req/s)"),
        row("KV cache reserved mean / max", lambda s: f"{s['kv_reserved_mean']:.1%} / "
                                                      f"{s['kv_reserved_max']:.1%}"),
        row("KV capacity (tokens)", lambda s: f"{s['kv_capacity_tokens']:,}"),
        row("batch mean / limit", lambda s: f"{s['batch_mean']:.3g} / {s['max_batch']}"),
        row("drain after arrivals stop", lambda s: f"{s['drain_s']:.3g} s"),
        row("step points simulated", lambda s: str(s["steps"]["points_simulated"])),
        row("interpolation error (max)", lambda s: "-" if not s["steps"]["error"] else
            f"{s['steps']['error']['max_rel_error']:.2%}"),
    ]
    return rows
