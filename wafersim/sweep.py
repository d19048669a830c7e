"""Design-space sweeps: many compile + simulate runs on dask (`wafersim sweep`).

A sweep file (TOML) names a base point and the axes to vary::

    [base]
    model = "tiny-llama"          # zoo name or config.json path
    target = "wse2"               # preset name or target TOML/JSON file (relative to this file)
    mesh = "16x16"                # ROWSxCOLS, or width / height
    ctx = 64
    layers = "all"                # or "one" (one layer per region, extrapolated)

    [axes]
    mesh = ["16x16", "32x32"]
    sram_bytes = ["48KB", "96KB"]                   # sizes: an int, or "96KB" / "1MiB" (x1024)
    link_bytes_per_cycle = {start = 4, stop = 16, factor = 2}    # 4, 8, 16
    hop_latency_cycles = {start = 1, stop = 3, step = 1}         # 1, 2, 3

Every parameter (PARAMS) may be set once in [base] or varied in [axes]: the step (model, phase,
batch, ctx, dtype, layers), the compile options (policy, algo, levels, capacity, region) and
the target (target, mesh / width / height and every numeric MeshTarget field). Everything is
checked before anything runs; a bad file raises SweepError (a ValueError) in one line naming
the parameter and the rule.

The points are the cartesian product of the axes. Each is resolved to the model config, target
and compile options it runs (dataclasses.replace on the base), and keyed by a hash of those:
points that resolve to the same run are one point. Rows are appended to a CSV as points
finish (flushed per row); a sweep run again on the same file skips the keys already there, so
an interrupted sweep resumes where it stopped. A point that raises (the model does not fit:
ProgramError; anything else: with its type name) is a row with `error` set and the sweep goes
on.

Points run on dask: a LocalCluster of worker processes (one thread each) by default, or an
existing cluster (`scheduler="tcp://host:port"`). Worker processes live for the whole sweep
and the Numba kernels use `cache=True`, so each worker loads the compiled kernels from the
on-disk cache once; a worker plugin (WarmUp) runs one tiny compile + simulate on every worker,
including ones that join later, before its first point.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from compiler.algorithms.meshgemm import GEMM_ALGOS
from compiler.model import MODEL_GEMV_ALGOS, POLICIES, CompileOptions
from compiler.program import ProgramError
from compiler.targets import DTYPE_BYTES, MeshTarget, TargetError, load_target
from models import ConfigError, ModelConfig, load_model
from wafersim.whole import LAYER_MODES


class SweepError(ValueError):
    """A sweep file (or results file) that cannot be run; the message is one line."""


# ---- parameters ---------------------------------------------------------------------------

STEP_PARAMS = ("model", "phase", "batch", "ctx", "dtype", "layers")
OPTION_PARAMS = ("policy", "algo", "levels", "capacity", "region")
_TARGET_INTS = ("sram_bytes", "hop_latency_cycles", "send_overhead_cycles",
                "recv_overhead_cycles", "compute_overhead_cycles", "colours")
_TARGET_FLOATS = ("clock_hz", "sram_bytes_per_cycle", "link_bytes_per_cycle",
                  "io_bytes_per_cycle")
TARGET_PARAMS = ("target", "mesh", "width", "height", *_TARGET_INTS, *_TARGET_FLOATS)
PARAMS = STEP_PARAMS + OPTION_PARAMS + TARGET_PARAMS
DEFAULTS = {"phase": "decode", "batch": 1, "ctx": 4096, "layers": "all", "target": "wse2"}

# The summary figures every row carries (wafersim.whole.simulate_layout's keys), in order.
RESULT_COLUMNS = (
    "system", "model", "phase", "batch", "ctx", "fits", "makespan_s", "tokens_per_s",
    "tpot_ms", "ttft_ms", "busy_fraction", "idle_fraction", "overhead_fraction",
    "onchip_bytes", "offchip_bytes", "events", "sim_wall_s", "makespan_cycles", "messages",
    "hops", "flops", "achieved_flops_per_s", "max_link_utilisation", "active_cores",
    "layers_simulated", "extrapolated", "last_core", "last_core_compute", "last_core_overhead",
    "last_core_wait", "flops_utilisation", "sram_bw_utilisation", "regions",
    "layers_per_region", "sram_max_bytes", "max_ctx", "max_batch")
RUN_COLUMNS = ("error", "compile_wall_s", "point_wall_s", "worker")
MAX_POINTS = 1_000_000
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_size(value, where: str) -> int:
    """Bytes from an int or '96KB' / '96KiB' / '1MB' / '1MiB' (K = 1024, as 48 KB per core)."""
    if _is_int(value):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            scale = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[
                (m.group(2) or "")[:1].lower()]
            n = float(m.group(1)) * scale
            if n.is_integer():
                return int(n)
    raise SweepError(f"{where}: {value!r} is not a byte count (an int, or e.g. '96KB', '1MiB')")


def parse_mesh(value, where: str) -> tuple[int, int]:
    """'256x128' -> (rows, cols), as the CLI's --mesh and --region."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
            rows, cols = (int(p) for p in parts)
            if rows >= 1 and cols >= 1:
                return rows, cols
    raise SweepError(f"{where}: {value!r} is not ROWSxCOLS with both sides >= 1 (e.g. '256x256')")


def _choice(value, choices, where: str) -> str:
    if value not in choices:
        raise SweepError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def _int(value, where: str, low: int) -> int:
    if not _is_int(value) or value < low:
        raise SweepError(f"{where}: {value!r} must be an integer >= {low}")
    return value


_MODELS: dict[str, ModelConfig] = {}
_TARGETS: dict[str, MeshTarget] = {}


def _file_key(name: str, root: Path):
    """(what to load, cache key): a file relative to the sweep file (keyed by its path and
    modification time), else the name as given (a preset or zoo name)."""
    path = root / name
    if path.is_file():
        return str(path), (str(path.resolve()), path.stat().st_mtime_ns)
    return name, name


def _load_model(name: str, root: Path, where: str) -> ModelConfig:
    what, key = _file_key(name, root)
    if key not in _MODELS:
        try:
            _MODELS[key] = load_model(what)
        except (ConfigError, OSError, ValueError) as exc:
            raise SweepError(f"{where}: {' '.join(str(exc).split())}") from None
    return _MODELS[key]


def _load_target(name: str, root: Path, where: str) -> MeshTarget:
    what, key = _file_key(name, root)
    if key not in _TARGETS:
        try:
            _TARGETS[key] = load_target(what)
        except (TargetError, OSError) as exc:
            raise SweepError(f"{where}: {' '.join(str(exc).split())}") from None
    return _TARGETS[key]


def check_value(name: str, value, where: str, root: Path = Path(".")):
    """The normalised value of parameter `name`, or SweepError naming `where` and the rule."""
    if name == "model":
        if not isinstance(value, str) or not value:
            raise SweepError(f"{where}: {value!r} must be a zoo model name or config.json path")
        _load_model(value, root, where)
        return value
    if name == "target":
        if not isinstance(value, str) or not value:
            raise SweepError(f"{where}: {value!r} must be a target preset name or file")
        _load_target(value, root, where)
        return value
    if name == "phase":
        return _choice(value, ("decode", "prefill"), where)
    if name == "layers":
        return _choice(value, LAYER_MODES, where)
    if name == "dtype":
        return _choice(value, tuple(DTYPE_BYTES), where)
    if name == "policy":
        return _choice(value, POLICIES, where)
    if name == "algo":
        return _choice(value, MODEL_GEMV_ALGOS + GEMM_ALGOS, where)
    if name in ("batch", "ctx", "levels", "capacity", "width", "height"):
        return _int(value, where, 1)
    if name in ("mesh", "region"):
        rows, cols = parse_mesh(value, where)
        return f"{rows}x{cols}"
    if name == "sram_bytes":
        value = parse_size(value, where)
    if name in _TARGET_INTS and not _is_int(value):
        raise SweepError(f"{where}: {value!r} must be an integer")
    if name in _TARGET_FLOATS:
        if not _is_num(value):
            raise SweepError(f"{where}: {value!r} must be a number")
        value = float(value)
    try:  # the target's own rules (> 0, >= 0)
        dataclasses.replace(load_target("test4x4"), **{name: value})
    except TargetError as exc:
        rule = str(exc).split(": ", 1)[-1]
        raise SweepError(f"{where}: {rule}") from None
    return value


# ---- the sweep file -----------------------------------------------------------------------

def _range(name: str, spec: dict) -> list:
    where = f"axis {name}"
    keys = set(spec)
    if keys not in ({"start", "stop", "step"}, {"start", "stop", "factor"}):
        raise SweepError(f"{where}: a range table has start, stop and step (arithmetic) or "
                         f"start, stop and factor (geometric), not {', '.join(sorted(keys))}")
    start, stop = spec["start"], spec["stop"]
    if name == "sram_bytes":
        start, stop = parse_size(start, where), parse_size(stop, where)
    for k, v in (("start", start), ("stop", stop), *((k, spec[k]) for k in ("step", "factor")
                                                       if k in spec)):
        if not _is_num(v):
            raise SweepError(f"{where}: range {k}={v!r} must be a number")
    if stop < start:
        raise SweepError(f"{where}: range stop={stop!r} is below start={start!r}")
    values, v = [], start
    tol = 1e-9 * max(abs(stop), 1)
    if "step" in spec:
        step = spec["step"]
        if step <= 0:
            raise SweepError(f"{where}: range step={step!r} must be > 0")
        n = int((stop - start + tol) // step) + 1
        if n > MAX_POINTS:
            raise SweepError(f"{where}: range gives {n:,} values (at most {MAX_POINTS:,})")
        return [start + i * step for i in range(n)]  # ints stay ints
    factor = spec["factor"]
    if factor <= 1:
        raise SweepError(f"{where}: range factor={factor!r} must be > 1")
    if start <= 0:
        raise SweepError(f"{where}: geometric range start={start!r} must be > 0")
    while v <= stop + tol:
        values.append(v)
        if len(values) > MAX_POINTS:
            raise SweepError(f"{where}: range gives over {MAX_POINTS:,} values")
        v = v * factor
    return values


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its axis values, key, and what it compiles and simulates."""

    key: str
    axes: dict
    cfg: ModelConfig
    target: MeshTarget
    options: CompileOptions
    phase: str
    batch: int
    ctx: int
    layers: str


@dataclass
class Sweep:
    """A checked sweep file: the base parameters and the axes (name -> values, file order)."""

    base: dict
    axes: dict[str, list]
    root: Path = Path(".")
    source: str = "sweep"

    @property
    def size(self) -> int:
        return math.prod(len(v) for v in self.axes.values())

    def columns(self) -> list[str]:
        """The results table's header: key, axes, cores, summary figures, run columns."""
        return (["key", *self.axes, "cores"]
                + [c for c in RESULT_COLUMNS if c not in self.axes] + list(RUN_COLUMNS))

    def points(self) -> tuple[list[Point], int]:
        """The unique points in product order and how many duplicates were dropped."""
        seen, out = set(), []
        names = list(self.axes)
        for values in itertools.product(*self.axes.values()):
            p = resolve({**self.base, **dict(zip(names, values))}, dict(zip(names, values)),
                        self.root)
            if p.key not in seen:
                seen.add(p.key)
                out.append(p)
        return out, self.size - len(out)


def parse_sweep(data: dict, source: str = "sweep", root: Path = Path(".")) -> Sweep:
    """Check a parsed sweep file (tables `base` and `axes`) and return the Sweep."""
    unknown = sorted(set(data) - {"base", "axes"})
    if unknown:
        raise SweepError(f"{source}: unknown table [{unknown[0]}] (a sweep file has [base] and "
                         "[axes])")
    base_in, axes_in = data.get("base", {}), data.get("axes", {})
    for name, t in (("base", base_in), ("axes", axes_in)):
        if not isinstance(t, dict):
            raise SweepError(f"{source}: [{name}] must be a table")
    base_in = dict(base_in)
    opts = base_in.pop("options", {})
    if not isinstance(opts, dict) or set(opts) - set(OPTION_PARAMS):
        raise SweepError(f"{source}: [base.options] may hold {', '.join(OPTION_PARAMS)}")
    clash = sorted(set(opts) & set(base_in))
    if clash:
        raise SweepError(f"base {clash[0]}: set both in [base] and [base.options]")
    base_in.update(opts)
    for table, names in (("base", base_in), ("axis", axes_in)):
        for name in names:
            if name not in PARAMS:
                raise SweepError(f"{table} {name}: unknown parameter (known: "
                                 f"{', '.join(PARAMS)})")
    both = sorted(set(base_in) & set(axes_in))
    if both:
        raise SweepError(f"axis {both[0]}: also set in [base]; set it in one place")
    given = set(base_in) | set(axes_in)
    if "mesh" in given and given & {"width", "height"}:
        raise SweepError("mesh: set mesh or width/height, not both")
    if "model" not in given:
        raise SweepError(f"{source}: [base] names no model (model = \"llama3-8b\", a zoo name "
                         "or config.json path)")
    base = dict(DEFAULTS)
    for name, value in base_in.items():
        base[name] = check_value(name, value, f"base {name}", root)
    for name in axes_in:  # (the base target must load before field checks: order by PARAMS)
        base.pop(name, None)
    axes = {}
    for name, spec in axes_in.items():
        where = f"axis {name}"
        if isinstance(spec, dict):
            values = _range(name, spec)
        elif isinstance(spec, list):
            values = spec
        else:
            raise SweepError(f"{where}: {spec!r} must be a list of values or a range table "
                             "{start, stop, step} / {start, stop, factor}")
        if not values:
            raise SweepError(f"{where}: no values (an axis needs at least one)")
        # (repeated values stay: the points they make are deduplicated, and counted, later)
        axes[name] = [check_value(name, v, where, root) for v in values]
    sweep = Sweep(base, axes, root, source)
    if sweep.size > MAX_POINTS:
        raise SweepError(f"{source}: {sweep.size:,} points (at most {MAX_POINTS:,})")
    return sweep


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep TOML file; paths in it are relative to the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"sweep file {path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SweepError(f"sweep file {path}: cannot parse ({exc})") from None
    return parse_sweep(data, str(path), path.parent)


def resolve(params: dict, axes: dict, root: Path = Path(".")) -> Point:
    """The run a full parameter set describes, keyed by a hash of what it compiles."""
    cfg = _load_model(params["model"], root, "model")
    if "dtype" in params:
        cfg = dataclasses.replace(cfg, dtype=params["dtype"])
    tgt = _load_target(params["target"], root, "target")
    if "mesh" in params:
        rows, cols = parse_mesh(params["mesh"], "mesh")
        tgt = tgt.with_mesh(cols, rows)
    elif "width" in params or "height" in params:
        tgt = tgt.with_mesh(params.get("width", tgt.width), params.get("height", tgt.height))
    fields = {k: params[k] for k in _TARGET_INTS + _TARGET_FLOATS if k in params}
    if fields:
        tgt = dataclasses.replace(tgt, **fields)
    region = parse_mesh(params["region"], "region") if "region" in params else None
    options = CompileOptions(**{k: params[k] for k in ("policy", "algo", "levels", "capacity")
                                if k in params}, region=region)
    what = dict(model=cfg.to_dict(), target={k: v for k, v in tgt.to_dict().items()
                                             if k not in ("name", "notes")},
                options=dataclasses.asdict(options), phase=params["phase"],
                batch=params["batch"], ctx=params["ctx"], layers=params["layers"])
    key = hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Point(key, dict(axes), cfg, tgt, options, params["phase"], params["batch"],
                 params["ctx"], params["layers"])


# ---- one point (runs on a worker) ----------------------------------------------------------

KNOWN_ERRORS = (ProgramError, TargetError, ConfigError, ValueError)


def _plain(v):
    """numpy scalars -> Python numbers (for pickling small rows and writing CSV)."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        return v.item()
    return v


def error_message(exc: BaseException) -> str:
    """One line: the message of a known error (does not fit, bad value), else Type: message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, KNOWN_ERRORS) else f"{type(exc).__name__}: {text}"


def _base_row(point: Point) -> dict:
    row = dict.fromkeys(RESULT_COLUMNS)
    row.update(system=point.target.name, model=point.cfg.name, phase=point.phase,
               batch=point.batch, ctx=point.ctx)
    row.update(point.axes)
    row.update(key=point.key, cores=point.target.cores)
    return row


def run_point(point: Point) -> dict:
    """Compile and simulate one point; return its row. Never raises for a point's own error:
    the row's `error` holds the one-line message (fits=False for a model that does not fit)."""
    from compiler.model import compile_model
    from wafersim.compare import step_graph
    from wafersim.whole import simulate_layout

    t0 = time.perf_counter()
    row = _base_row(point)
    row.update(worker=f"{socket.gethostname()}:{os.getpid()}", error=None)
    try:
        graph = step_graph(point.cfg, point.phase, point.batch, point.ctx)
        compiled = compile_model(graph, point.target, point.options)
        row["compile_wall_s"] = time.perf_counter() - t0
        summary = simulate_layout(compiled.code, point.target, compiled.info(),
                                  point.layers)
        row.update({k: _plain(summary.get(k)) for k in RESULT_COLUMNS if k not in point.axes})
    except MemoryError:
        row.update(fits=False, error="MemoryError: the host ran out of memory on this point")
    except Exception as exc:  # noqa: BLE001 - recorded in the row, the sweep goes on
        row.update(fits=False if isinstance(exc, ProgramError) else None,
                   error=error_message(exc))
    row["point_wall_s"] = time.perf_counter() - t0
    return row


def warm_up() -> float:
    """One tiny compile + simulate, so that this process has the Numba kernels loaded (from
    the on-disk cache, or compiled once); returns the seconds it took."""
    from models import build_graph

    t0 = time.perf_counter()
    cfg = load_model("tiny-llama")
    from compiler.model import compile_model
    from wafersim.whole import simulate_layout

    tgt = load_target("test16x16")
    compiled = compile_model(build_graph(cfg, "decode", ctx_len=16), tgt)
    simulate_layout(compiled.code, tgt, compiled.info(), "one")
    return time.perf_counter() - t0


try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - dask[distributed] is a dependency
    WorkerPlugin = object


class WarmUp(WorkerPlugin):
    """Runs warm_up() on every worker of the cluster, those that join later included (off the
    worker's event loop, so that heartbeats go on); `worker.wafersim_warm_s` records the time."""

    name = "wafersim-warm-up"

    async def setup(self, worker):
        seconds = await asyncio.get_running_loop().run_in_executor(None, warm_up)
        worker.wafersim_warm_s = seconds


# ---- the results file ----------------------------------------------------------------------

def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def _value(text: str):
    if text == "":
        return None
    if text in ("true", "false"):
        return text == "true"
    if text[0] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def read_results(path: str | Path) -> tuple[list[str], list[dict]]:
    """(header, rows) of a results CSV, values typed back (numbers, booleans, lists, None);
    a key written more than once (a retried point) keeps its last row; a torn last line (a
    sweep killed mid-write) is ignored."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        rows = {}
        for cells in reader:
            if len(cells) != len(header):
                continue
            row = {k: _value(v) for k, v in zip(header, cells)}
            rows.pop(row.get("key"), None)
            rows[row.get("key")] = row
    return header, list(rows.values())


class _Writer:
    """Appends rows to the results CSV, one flushed line each."""

    def __init__(self, path: Path, columns: list[str]):
        self.columns = columns
        fresh = not path.exists() or path.stat().st_size == 0
        if not fresh:
            with open(path, "rb+") as f:  # drop a torn last line (killed mid-write)
                data = f.read()
                if not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", newline="")  # noqa: SIM115 - closed by close()
        if fresh:
            self.write_cells(columns)

    def write_cells(self, cells) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        self.f.write(buf.getvalue())
        self.f.flush()

    def write(self, row: dict) -> None:
        self.write_cells([_cell(row.get(c)) for c in self.columns])

    def close(self) -> None:
        self.f.close()


# ---- running -------------------------------------------------------------------------------

@dataclass
class Report:
    """What a sweep run did."""

    out: str
    points: int  # the cartesian product
    unique: int  # after deduplication
    duplicates: int
    skipped: int  # already in the results file
    computed: int  # run now
    failed: int  # of those computed, with an error
    remaining: int  # left for a later run (--limit)
    wall_s: float
    scheduler: str | None = None
    workers: int = 0
    warm_s: list = field(default_factory=list)
    foreign_rows: int = 0  # rows of the results file that are no point of this sweep

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _cluster(scheduler: str | None, workers: int):
    """(client, closer) for an existing scheduler or a local cluster of processes."""
    from distributed import Client, LocalCluster

    if scheduler:
        client = Client(scheduler, timeout="20s")
        return client, client.close
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)

    def close():
        client.close()
        cluster.close()

    return client, close


def run_sweep(sweep: Sweep, out: str | Path, scheduler: str | None = None, workers: int = 2,
              limit: int | None = None, retry_failed: bool = False, warm: bool = True,
              progress: Callable[[int, int, dict | None], None] | None = None) -> Report:
    """Run the points of `sweep` not yet in `out` (a CSV, appended per finished point).

    `scheduler`: a dask scheduler address; None starts a LocalCluster of `workers` processes.
    `limit`: run at most this many new points. `retry_failed`: run again the points whose row
    has an error. `progress(done, total, row)` is called once with row None before the first
    point and after each point."""
    if workers < 1:
        raise SweepError(f"workers={workers}: must be >= 1")
    if limit is not None and limit < 0:
        raise SweepError(f"limit={limit}: must be >= 0")
    t0 = time.perf_counter()
    out = Path(out)
    columns = sweep.columns()
    header, rows = read_results(out)
    if header and header != columns:
        raise SweepError(f"results file {out}: its columns are another sweep's; write to "
                         "another file or remove it")
    points, duplicates = sweep.points()
    keys = {p.key for p in points}
    done = {r["key"] for r in rows if not (retry_failed and r.get("error"))}
    todo = [p for p in points if p.key not in done]
    remaining = 0
    if limit is not None and len(todo) > limit:
        remaining, todo = len(todo) - limit, todo[:limit]
    report = Report(str(out), sweep.size, len(points), duplicates,
                    len(points) - len(todo) - remaining, 0, 0, remaining, 0.0,
                    foreign_rows=sum(r["key"] not in keys for r in rows))
    writer = _Writer(out, columns)
    try:
        if progress:
            progress(0, len(todo), None)
        if todo:
            _run(todo, writer, report, scheduler, workers, warm, progress)
    finally:
        writer.close()
        report.wall_s = time.perf_counter() - t0
    return report


def _run(todo, writer, report, scheduler, workers, warm, progress) -> None:
    from distributed import as_completed

    client, close = _cluster(scheduler, workers)
    futures = []
    try:
        report.scheduler = client.scheduler.address
        if warm:
            client.register_plugin(WarmUp(), name=WarmUp.name)
            report.warm_s = [v for v in client.run(
                lambda dask_worker: getattr(dask_worker, "wafersim_warm_s", None)).values()]
        report.workers = len(client.scheduler_info(n_workers=-1)["workers"])
        futures = [client.submit(run_point, p, key=f"wafersim-point-{p.key}", pure=False)
                   for p in todo]
        by_future = dict(zip(futures, todo))
        for n, fut in enumerate(as_completed(futures), 1):
            if fut.status == "finished":
                row = fut.result()
            else:  # the task itself failed: a lost worker (KilledWorker), a cancellation
                try:
                    exc = fut.exception()
                except BaseException as e:  # noqa: BLE001 - e.g. CancelledError
                    exc = e
                row = _base_row(by_future[fut])
                row.update(fits=None, error=f"{type(exc).__name__}: "
                                            f"{' '.join(str(exc).split())}")
            writer.write(row)
            report.computed += 1
            report.failed += bool(row.get("error"))
            fut.release()
            if progress:
                progress(n, len(todo), row)
    finally:
        for fut in futures:
            if fut.status == "pending":
                fut.cancel()
        close()


# ---- the Pareto front ----------------------------------------------------------------------

def pareto_front(rows: list[dict], x: str = "cores", y: str = "tokens_per_s") -> list[dict]:
    """The rows no other row beats: none with x as small (or smaller) and y larger (x is a cost,
    y a benefit). Rows without both figures (failed points) are left out; sorted by x."""
    if not rows:
        return []
    ok = [r for r in rows if _is_num(r.get(x)) and _is_num(r.get(y)) and not r.get("error")]
    ok.sort(key=lambda r: (r[x], -r[y]))
    front, best = [], -math.inf
    for r in ok:
        if r[y] > best:
            front.append(r)
            best = r[y]
    return front


def check_column(header: list[str], name: str, option: str) -> None:
    if name not in header:
        raise SweepError(f"{option} {name!r}: not a column of the results (numeric ones: the "
                         "axes, cores, and the summary figures such as tokens_per_s)")


def plot_pareto(rows: list[dict], path: str | Path, x: str = "cores",
                y: str = "tokens_per_s", title: str = "") -> list[dict]:
    """Scatter y against x for every point that ran, the Pareto front marked; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if _is_num(r.get(x)) and _is_num(r.get(y)) and not r.get("error")]
    front = pareto_front(ok, x, y)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r[x] for r in ok], [r[y] for r in ok], s=18, alpha=0.5, color="tab:blue",
               label=f"points ({len(ok)} ran, {len(rows) - len(ok)} failed)")
    ax.step([r[x] for r in front], [r[y] for r in front], where="post", color="tab:red")
    ax.scatter([r[x] for r in front], [r[y] for r in front], s=40, color="tab:red",
               label=f"Pareto front ({len(front)})", zorder=3)
    xs, ys = [r[x] for r in ok], [r[y] for r in ok]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title or f"{y} vs {x}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return front
