"""Step times for the serving model: an explicit cache of simulated steps, interpolated.

A serving simulation (wafersim.serving) asks, millions of times, how long one decode step of a
batch at some context takes, and how long a prefill of some prompts takes. Those answers come
from the real simulators, run once per bucket point and kept in a `StepTable`:

- decode: `batch` in powers of two up to the hardware's max batch, `ctx` (tokens already in
  the KV cache) in buckets such as 512 / 1024 / 2048; the time between points is bilinear in
  (batch, ctx); beyond the largest bucket it is extrapolated linearly from the last two;
  below the smallest ctx bucket it is the smallest bucket's time;
- prefill: `tokens` per prompt in buckets, and for GPUs `batch` prompts at once; on the wafer
  prefill runs one prompt at a time (compiler.prefill_model compiles batch 1 only), so a batch
  of prompts is prefilled one after the other. A full-wafer prefill is compiled with sampled
  steps and simulated with `prefill_layers="one"` by default (wafersim.whole; minutes and
  about 13 GB for LLaMA-3-8B, docs/performance.md), which is why points are cached on disk.

Two sources fill a table (`WaferSource`: compiler.model.compile_model + wafersim.whole's
simulate_layout, as `wafersim compare` runs them; `GpuSource`: wafersim.baseline's
simulate_cluster). The table records every simulated point and its wall time, saves and loads
as JSON, and `error_bound(table)` simulates off-bucket points exactly and reports the largest
relative error of the interpolation. A `WaferSource` with a `cache_dir` also keeps each
simulated point there (one JSON file per model, target, options, layer modes, phase, batch and
context), so tables with other buckets, and later runs, reuse them.

>>> from compiler.targets import load_target
>>> from models import load_model
>>> src = GpuSource(load_model("tiny-llama"), "1xH100")
>>> t = build_table(src, batches=[1, 2, 4], ctxs=[64, 128], prefill_tokens=[64])
>>> t.decode(3, 96) > 0, len(t.points)
(True, 10)
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compiler.model import CompileOptions
from compiler.targets import MeshTarget
from models.config import ModelConfig

TABLE_VERSION = 1
MAX_WAFER_BATCH = 64  # the largest decode batch a wafer table is built for


def code_digest() -> str:
    """A digest of the compiler's and the simulator's source: cached points are keyed by it,
    so a change to either simulates afresh rather than reuse stale figures."""
    import hashlib

    import compiler
    import wafersim

    h = hashlib.sha1()
    for pkg in (compiler, wafersim):
        for f in sorted(Path(pkg.__file__).parent.rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def powers_of_two(lo: int, hi: int) -> list[int]:
    """Powers of two from the largest <= lo up to the smallest >= hi (at least one)."""
    lo, hi = max(int(lo), 1), max(int(hi), 1)
    a = 1 << (lo.bit_length() - 1)
    out = [a]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return out


class WaferSource:
    """Exact step times of `cfg` on a wafer target (compile + simulate every point).

    `layers` / `prefill_layers`: wafersim.whole's layer mode for decode / prefill points.
    `prefill_util`: when given, prefill is not simulated but estimated as the prefill graph's
    FLOPs over this fraction of the target's peak (a roofline stand-in, recorded as such, for
    a quick what-if); when None, a prefill that cannot be compiled on the target raises
    ValueError saying so. `cache_dir`: keep every simulated point there (module docstring)."""

    kind = "wafer"

    def __init__(self, cfg: ModelConfig, target: MeshTarget, options: CompileOptions | None = None,
                 layers: str = "all", prefill_util: float | None = None,
                 prefill_layers: str = "one", cache_dir: str | Path = ""):
        if prefill_util is not None and not 0 < prefill_util <= 1:
            raise ValueError(f"prefill utilisation {prefill_util} must be in (0, 1]")
        self.cfg, self.target, self.layers = cfg, target, layers
        self.options = options or CompileOptions()
        self.prefill_util, self.prefill_layers = prefill_util, prefill_layers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.system = target.name
        self.prefill_how: set[str] = set()  # how the prefill points were simulated
        # The decode placement every decode point runs on, fixed by `capacity` (a server
        # cannot move its weights between steps): (rows, cols) of its regions.
        self.region: tuple[int, int] | None = self.options.region

    def source(self) -> dict:
        return {"kind": "wafer", "model": self.cfg.to_dict(), "model_name": self.cfg.name,
                "target": self.target.to_dict(), "options": vars(self.options),
                "layers": self.layers, "prefill_layers": self.prefill_layers,
                "prefill_util": self.prefill_util}

    def _run(self, phase: str, batch: int, ctx: int) -> dict:
        """compare.wafer_side's summary (what the table reads of it), from the cache when it
        holds this point."""
        import hashlib

        from wafersim.compare import step_graph, wafer_side

        options = self.options
        if phase == "decode" and self.region is not None:
            options = dataclasses.replace(options, region=tuple(self.region))
        path = None
        if self.cache_dir is not None:
            src = {k: v for k, v in self.source().items() if k != "prefill_util"}
            key = json.dumps([src, vars(options), phase, batch, ctx, code_digest()],
                             sort_keys=True, default=str)
            path = self.cache_dir / f"point_{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
            if path.is_file():
                return json.loads(path.read_text())
        layers = self.prefill_layers if phase == "prefill" else self.layers
        s = wafer_side(step_graph(self.cfg, phase, batch, ctx), self.target, layers, options)
        s = {k: s.get(k) for k in ("fits", "reason", "makespan_s", "max_ctx", "max_batch",
                                   "sim_wall_s", "compile_wall_s", "steps_sampled",
                                   "layers_simulated", "region")}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**s, "phase": phase, "batch": batch, "ctx": ctx}))
        return s

    def capacity(self, ctx: int) -> dict:
        """KV pool (tokens), longest sequence and max batch of the decode placement for the
        largest batch any placement holds at `ctx` (by the compiler's estimate, at most
        MAX_WAFER_BATCH; then checked exactly, halving until it compiles). Every decode point
        then runs on that placement's region shape (`self.region`)."""
        from compiler.model import largest_batch, scheme_of

        ctx_opts = dataclasses.replace(self.options, capacity=None)
        b = min(MAX_WAFER_BATCH, largest_batch(self.cfg, self.target, ctx + 1,
                                               scheme_of(self.cfg, "decode", ctx_opts)))
        while True:
            s = self._run("decode", max(b, 1), ctx)
            if s["fits"] or b <= 1:
                break
            b //= 2
        if not s["fits"]:
            raise ValueError(f"{self.cfg.name} decode does not fit {self.system}: {s['reason']}")
        b = max(b, 1)
        if self.region is None and s.get("region"):
            self.region = tuple(int(v) for v in s["region"].split("x"))
        per_seq = int(s["max_ctx"]) + 1
        return {"kv_capacity_tokens": b * per_seq, "max_seq_tokens": per_seq,
                "max_batch": max(b, int(s["max_batch"] or 1)), "region": s.get("region")}

    def decode_point(self, batch: int, ctx: int) -> float:
        s = self._run("decode", batch, ctx)
        if not s["fits"]:
            raise ValueError(f"{self.cfg.name} decode at batch {batch}, ctx {ctx} does not fit "
                             f"{self.system}: {s['reason']}")
        return float(s["makespan_s"])

    def prefill_point(self, batch: int, tokens: int) -> float:
        """One prompt of `tokens` (the wafer prefills batch 1; `batch` must be 1)."""
        if batch != 1:
            raise ValueError("the wafer prefills one prompt at a time (batch 1)")
        if self.prefill_util is not None:
            return self._roofline(tokens)
        s = self._run("prefill", 1, tokens)
        if s["fits"]:
            how = "one layer per region" if s["layers_simulated"] == "one" else "every layer"
            if s.get("steps_sampled"):
                t1, t2, full = s["steps_sampled"]
                how += f" and steps {t1} and {t2} of {full}"
            if s["layers_simulated"] == "one" or s.get("steps_sampled"):
                how += ", extrapolated"
            self.prefill_how.add(how)
        if not s["fits"]:
            raise ValueError(f"{self.cfg.name} prefill of {tokens} tokens cannot be compiled on "
                             f"{self.system}: {s['reason']}; pass --wafer-prefill-util for a "
                             "roofline estimate instead")
        return float(s["makespan_s"])

    def _roofline(self, tokens: int) -> float:
        from models.graph import total_flops
        from wafersim.compare import step_graph

        flops = total_flops(step_graph(self.cfg, "prefill", 1, tokens))
        peak = self.target.peak_flops(self.cfg.dtype)
        return flops / (peak * self.prefill_util)


class GpuSource:
    """Exact step times of `cfg` on a GPU cluster (wafersim.baseline.simulate_cluster).

    `batch_cap` bounds the scheduler's batch (vLLM's max_num_seqs); the KV pool is what the
    cluster's memory holds beside the weights at batch 1."""

    kind = "gpus"

    def __init__(self, cfg: ModelConfig, cluster: str, batch_cap: int = 256):
        from wafersim.baseline.cluster import parse_cluster

        self.cfg, self.spec = cfg, cluster
        self.cluster = parse_cluster(cluster)
        self.system = self.cluster.name
        self.batch_cap = batch_cap

    def source(self) -> dict:
        return {"kind": "gpus", "model": self.cfg.to_dict(), "model_name": self.cfg.name,
                "cluster": self.spec, "batch_cap": self.batch_cap}

    def _run(self, phase: str, batch: int, ctx: int):
        from wafersim.baseline.simulate import simulate_cluster
        from wafersim.compare import step_graph

        return simulate_cluster(step_graph(self.cfg, phase, batch, ctx), self.cluster)

    def capacity(self, ctx: int) -> dict:
        r = self._run("decode", 1, ctx)
        if not r.fits:
            raise ValueError(f"{self.cfg.name} does not fit {self.system}: {r.reason}")
        return {"kv_capacity_tokens": int(r.max_ctx), "max_seq_tokens": int(r.max_ctx),
                "max_batch": int(min(r.max_batch, self.batch_cap))}

    def decode_point(self, batch: int, ctx: int) -> float:
        return self._run("decode", batch, ctx).makespan_s

    def prefill_point(self, batch: int, tokens: int) -> float:
        return self._run("prefill", batch, tokens).makespan_s


def source_from_dict(d: dict, cache_dir: str | Path = ""):
    """Rebuild the source a saved table came from (to simulate more points exactly)."""
    from compiler.targets import MeshTarget as Target

    cfg = ModelConfig.from_dict(d["model"], name=d["model_name"])
    if d["kind"] == "wafer":
        opts = dict(d["options"])
        if opts.get("region") is not None:
            opts["region"] = tuple(opts["region"])
        return WaferSource(cfg, Target.from_dict(d["target"]), CompileOptions(**opts),
                           d["layers"], d["prefill_util"], d.get("prefill_layers", "one"),
                           cache_dir)
    return GpuSource(cfg, d["cluster"], d["batch_cap"])


def _axis_weights(grid: list[int], x: float) -> tuple[int, float]:
    """(i, w): x sits w of the way from grid[i] to grid[i+1]; w < 0 or > 1 extrapolates."""
    if len(grid) == 1:
        return 0, 0.0
    i = min(max(bisect.bisect_right(grid, x) - 1, 0), len(grid) - 2)
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])


@dataclass
class StepTable:
    """Simulated step times at bucket points, interpolated between them (module docstring)."""

    system: str
    kind: str  # "wafer" or "gpus"
    model: str
    batches: list[int]
    ctxs: list[int]
    decode_s: np.ndarray  # [len(batches), len(ctxs)]
    prefill_batches: list[int]
    prefill_tokens: list[int]
    prefill_s: np.ndarray  # [len(prefill_batches), len(prefill_tokens)]
    kv_capacity_tokens: int
    max_seq_tokens: int
    max_batch: int
    sequential_prefill: bool  # the wafer: a batch of prompts is prefilled one after another
    prefill_note: str = ""
    points: list[dict] = field(default_factory=list)  # every simulated point, with its wall time
    source: dict = field(default_factory=dict)
    error: dict | None = None  # error_bound's report, once run
    _rows: dict = field(default_factory=dict, repr=False)

    def _row(self, batch: int) -> np.ndarray:
        """decode_s interpolated (or extrapolated) to this batch, one value per ctx bucket."""
        row = self._rows.get(batch)
        if row is None:
            i, w = _axis_weights(self.batches, batch)
            row = self.decode_s[i] if len(self.batches) == 1 else (
                (1 - w) * self.decode_s[i] + w * self.decode_s[i + 1])
            row = np.maximum(row, self.decode_s[0] if w > 1 else 0.0)
            self._rows[batch] = row
        return row

    def decode(self, batch: int, ctx: float) -> float:
        """Seconds of one decode step of `batch` sequences with `ctx` tokens cached (mean)."""
        return float(self.decode_many(batch, np.array([ctx], dtype=float))[0])

    def decode_many(self, batch: int, ctx: np.ndarray) -> np.ndarray:
        """decode(batch, c) for every c of `ctx` (vectorised: the scheduler's fast path)."""
        row, grid = self._row(int(batch)), self.ctxs
        out = np.interp(ctx, grid, row)
        if len(grid) > 1:
            slope = (row[-1] - row[-2]) / (grid[-1] - grid[-2])
            far = ctx > grid[-1]
            if far.any():
                out[far] = row[-1] + np.maximum(slope, 0.0) * (ctx[far] - grid[-1])
        return out

    def prefill(self, batch: int, tokens: float) -> float:
        """Seconds to prefill `batch` prompts of `tokens` each (one after another on the wafer)."""
        if self.sequential_prefill:
            return batch * self._prefill1(0, tokens)
        i, w = _axis_weights(self.prefill_batches, batch)
        if len(self.prefill_batches) == 1:
            return self._prefill1(0, tokens) * batch / self.prefill_batches[0]
        a, b = self._prefill1(i, tokens), self._prefill1(i + 1, tokens)
        return max((1 - w) * a + w * b, a if w > 1 else 0.0)

    def _prefill1(self, i: int, tokens: float) -> float:
        grid, row = self.prefill_tokens, self.prefill_s[i]
        if len(grid) == 1:  # one bucket: proportional to the prompt length
            return float(row[0] * tokens / grid[0])
        if tokens > grid[-1]:
            slope = (row[-1] - row[-2]) / (grid[-1] - grid[-2])
            return float(row[-1] + max(slope, 0.0) * (tokens - grid[-1]))
        if tokens < grid[0]:
            return float(row[0] * tokens / grid[0])
        return float(np.interp(tokens, grid, row))

    def prefill_lengths(self, lengths: np.ndarray) -> float:
        """Seconds to prefill prompts of these lengths together (the scheduler's call)."""
        if len(lengths) == 0:
            return 0.0
        if self.sequential_prefill:
            return float(sum(self._prefill1(0, float(s)) for s in lengths))
        return self.prefill(len(lengths), float(np.mean(lengths)))

    # ---- persistence -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": TABLE_VERSION, "system": self.system, "kind": self.kind,
                "model": self.model, "batches": self.batches, "ctxs": self.ctxs,
                "decode_s": self.decode_s.tolist(), "prefill_batches": self.prefill_batches,
                "prefill_tokens": self.prefill_tokens, "prefill_s": self.prefill_s.tolist(),
                "kv_capacity_tokens": self.kv_capacity_tokens,
                "max_seq_tokens": self.max_seq_tokens, "max_batch": self.max_batch,
                "sequential_prefill": self.sequential_prefill,
                "prefill_note": self.prefill_note, "points": self.points,
                "source": self.source, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> StepTable:
        if d.get("version") != TABLE_VERSION:
            raise ValueError(f"step table version {d.get('version')!r} is not {TABLE_VERSION}")
        d = {k: v for k, v in d.items() if k != "version"}
        d["decode_s"] = np.asarray(d["decode_s"], dtype=float)
        d["prefill_s"] = np.asarray(d["prefill_s"], dtype=float)
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> StepTable:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"step table {path}: cannot read it ({exc})") from None

    def summary(self) -> dict:
        """What a report says about the cache (no arrays)."""
        return {"system": self.system, "batches": self.batches, "ctxs": self.ctxs,
                "prefill_batches": self.prefill_batches, "prefill_tokens": self.prefill_tokens,
                "points_simulated": len(self.points),
                "sim_wall_s": sum(p["wall_s"] for p in self.points),
                "kv_capacity_tokens": self.kv_capacity_tokens,
                "max_seq_tokens": self.max_seq_tokens, "max_batch": self.max_batch,
                "sequential_prefill": self.sequential_prefill, "prefill_note": self.prefill_note,
                "error": self.error}


def build_table(src, batches: list[int] | None = None, ctxs: list[int] | None = None,
                prefill_tokens: list[int] | None = None,
                prefill_batches: list[int] | None = None, max_batch_bucket: int | None = None,
                progress=None) -> StepTable:
    """Simulate `src` (WaferSource or GpuSource) at every bucket point.

    Defaults: ctx buckets 512, 1024 (powers of two); batch buckets powers of two up to the
    hardware's max batch and `max_batch_bucket` (default 64 on a wafer, where every point is a
    compile and a simulation; none on GPUs); prefill tokens 512; GPU prefill batches 1, 4, 16
    (the wafer's is 1). The KV capacity comes from a batch-1 step at the largest ctx bucket."""
    ctxs = sorted(set(ctxs or [512, 1024]))
    prefill_tokens = sorted(set(prefill_tokens or [512]))
    if min(ctxs) < 1 or min(prefill_tokens) < 1:
        raise ValueError("ctx and prefill token buckets must be >= 1")
    points: list[dict] = []

    def timed(phase, batch, ctx, fn):
        if progress:
            progress(f"{src.system}: {phase} batch {batch} ctx {ctx}")
        t0 = time.perf_counter()
        s = fn(batch, ctx)
        points.append({"phase": phase, "batch": batch, "ctx": ctx, "seconds": s,
                       "wall_s": time.perf_counter() - t0})
        return s

    t0 = time.perf_counter()
    cap = src.capacity(max(ctxs))
    points.append({"phase": "capacity", "batch": 1, "ctx": max(ctxs), "seconds": None,
                   "wall_s": time.perf_counter() - t0, **cap})
    hw_batch = max(cap["max_batch"], 1)
    if batches is None:
        if max_batch_bucket is None:
            max_batch_bucket = 64 if src.kind == "wafer" else hw_batch
        batches = powers_of_two(1, min(hw_batch, max_batch_bucket))
        batches = [b for b in batches if b <= hw_batch] or [1]
    batches = sorted(set(batches))
    if min(batches) < 1:
        raise ValueError("batch buckets must be >= 1")
    decode = np.array([[timed("decode", b, c, src.decode_point) for c in ctxs] for b in batches])
    sequential = src.kind == "wafer"
    pbatches = [1] if sequential else sorted(set(prefill_batches or [1, 4, 16]))
    prefill = np.array([[timed("prefill", b, s, src.prefill_point) for s in prefill_tokens]
                        for b in pbatches])
    note = ""
    if sequential:
        note = ("roofline: prefill FLOPs at "
                f"{src.prefill_util:.0%} of peak (not simulated)" if src.prefill_util
                else f"simulated ({'; '.join(sorted(src.prefill_how))}), batch 1 (prompts "
                     "prefilled one after another)")
    return StepTable(system=src.system, kind=src.kind, model=src.cfg.name, batches=batches,
                     ctxs=ctxs, decode_s=decode, prefill_batches=pbatches,
                     prefill_tokens=prefill_tokens, prefill_s=prefill,
                     kv_capacity_tokens=cap["kv_capacity_tokens"],
                     max_seq_tokens=cap["max_seq_tokens"], max_batch=hw_batch,
                     sequential_prefill=sequential, prefill_note=note, points=points,
                     source=src.source())


def off_bucket_points(table: StepTable, n: int = 2) -> list[tuple[str, int, int]]:
    """Up to n decode points between buckets (batch and ctx midpoints), then one prefill."""
    def mids(grid):
        m = [int(round(math.sqrt(a * b))) for a, b in zip(grid, grid[1:])]
        return [x for x in m if x not in grid] or [grid[-1]]

    bm, cm = mids(table.batches), mids(table.ctxs)
    out = [("decode", bm[i % len(bm)], cm[i % len(cm)]) for i in range(n)]
    if len(table.prefill_tokens) > 1 and n > 0:
        out.append(("prefill", 1, mids(table.prefill_tokens)[0]))
    return list(dict.fromkeys(out))


def error_bound(table: StepTable, src=None, points: list[tuple[str, int, int]] | None = None,
                n: int = 2) -> dict:
    """Simulate off-bucket points exactly and compare with the interpolation; the report
    (also kept in table.error) has every point and the largest relative error."""
    src = src or source_from_dict(table.source)
    points = off_bucket_points(table, n) if points is None else points
    rows = []
    for phase, batch, ctx in points:
        t0 = time.perf_counter()
        exact = (src.decode_point(batch, ctx) if phase == "decode"
                 else src.prefill_point(batch, ctx))
        wall = time.perf_counter() - t0
        approx = table.decode(batch, ctx) if phase == "decode" else table.prefill(batch, ctx)
        rows.append({"phase": phase, "batch": batch, "ctx": ctx, "exact_s": exact,
                     "interpolated_s": approx, "rel_error": abs(approx - exact) / exact,
                     "wall_s": wall})
    table.error = {"points": rows,
                   "max_rel_error": max((r["rel_error"] for r in rows), default=None)}
    return table.error
