"""One step of a model on a wafer and on a GPU cluster, side by side (`wafersim compare`).

Both sides run the same op graph (models.build_graph): the wafer side compiles it with
compiler.model.compile_model and simulates the layout (wafersim.whole.simulate_layout), the
GPU side runs wafersim.baseline.simulate_cluster. Each side is a dict of the DESIGN.md summary
keys (plus its own extras and `reason`); a side that cannot run the step (the model does not fit,
or the wafer compiler does not lower it, e.g. a GPT-2) has fits=False, None for every figure
and the one-line reason. `speedup` is wafer tokens/s over GPU tokens/s, when both sides fit.

With an efficiency technique of issue #7 (quantised weights or KV caches, `options.quant`,
`kv_dtype`; pruning, `options.prune`; activation sparsity, `options.act_density`; a fast
feed-forward model, `cfg.fff_depth`), both sides run the step with it and without it (the
dense step), and the result adds each side's speed-up over its own dense step
(`wafer_speedup_vs_dense`, `gpus_speedup_vs_dense`; the dense summaries under `dense`). Both
sides store weights as the same compiler.quant scheme and draw the active neurons from the
same seeded spec (compiler.sparsity).

In decode `ctx` is the tokens already in the KV cache (the GPU summary's own `ctx` counts the
new token too, as the baseline does); in prefill it is the prompt length.

>>> from compiler.targets import load_target
>>> from models import load_model
>>> r = compare(load_model("tiny-llama"), load_target("test16x16"), "1xH100", ctx=64)
>>> r["wafer"]["fits"], r["gpus"]["fits"], r["speedup"] > 1
(True, True, True)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import models
from compiler import quant
from compiler.model import POLICIES, CompileOptions, compile_model
from compiler.multiwafer import WaferCluster, compile_multiwafer
from compiler.program import ProgramError
from compiler.quant import Scheme
from compiler.sparsity import ActSparsity
from compiler.targets import MeshTarget
from models.config import ModelConfig
from wafersim.baseline.cluster import ClusterSpec, parse_cluster
from wafersim.baseline.simulate import simulate_cluster
from wafersim.multiwafer import simulate_multiwafer
from wafersim.whole import LAYER_MODES, simulate_layout

# The DESIGN.md summary keys both sides carry, in this order.
SUMMARY_KEYS = ("system", "model", "phase", "batch", "ctx", "fits", "makespan_s",
                "tokens_per_s", "tpot_ms", "ttft_ms", "busy_fraction", "idle_fraction",
                "onchip_bytes", "offchip_bytes")
# (key, label) of the table rows; the latency row is tpot_ms or ttft_ms by phase.
ROWS = (("system", "system"), ("fits", "fits"), ("tokens_per_s", "throughput (tokens/s)"),
        ("latency", "latency"), ("makespan_s", "makespan"), ("busy_fraction", "busy"),
        ("idle_fraction", "idle"), ("onchip_bytes", "on-chip traffic"),
        ("offchip_bytes", "off-chip traffic"), ("energy_j", "energy per step"))


def not_run(system: str, model: str, phase: str, batch: int, ctx: int, reason: str) -> dict:
    """The summary of a side that could not run the step: fits=False and why."""
    out = dict.fromkeys(SUMMARY_KEYS)
    out.update(system=system, model=model, phase=phase, batch=batch, ctx=ctx, fits=False,
               reason=reason)
    return out


def step_graph(cfg: ModelConfig, phase: str, batch: int, ctx: int):
    """The op graph of one step: decode attends to `ctx` cached tokens, prefill reads `ctx`."""
    if phase == "prefill":
        return models.build_graph(cfg, phase, batch=batch, seq_len=ctx, ctx_len=0)
    return models.build_graph(cfg, phase, batch=batch, ctx_len=ctx)


# Compile options that select a technique; `dense_options` clears them.
TECHNIQUE_OPTIONS = ("quant", "kv_dtype", "prune", "act_density")


def techniques(cfg: ModelConfig, options: CompileOptions) -> list[str]:
    """The quantisation / pruning / sparsity / fast feed-forward techniques this step uses
    (none: a dense step)."""
    out = [f"{name}={getattr(options, name)}" for name in TECHNIQUE_OPTIONS
           if getattr(options, name) is not None]
    return out + ([] if cfg.fff_depth is None else [f"fff_depth={cfg.fff_depth}"])


def dense_options(options: CompileOptions) -> CompileOptions:
    """`options` without any technique: the dense step each side's speed-up is measured on."""
    return dataclasses.replace(options, **dict.fromkeys(TECHNIQUE_OPTIONS))


def sparse_graph(graph, options: CompileOptions):
    """The GPU side's graph: with activation sparsity, every layer's own seeded draw of the
    active neurons (models.graph.with_activation_sparsity)."""
    if options.act_density is None:
        return graph
    g, cfg = graph.graph, graph.graph["cfg"]
    sp, layers = ActSparsity(options.act_density, options.act_seed), cfg.num_hidden_layers
    rows = g["batch"] * g["seq_len"]
    return models.graph.with_activation_sparsity(
        graph, [sp.mask(l, rows, cfg.intermediate_size, layers) for l in range(layers)])


def _ratio(fast: dict, slow: dict) -> float | None:
    if fast["fits"] and slow["fits"] and fast["tokens_per_s"] and slow["tokens_per_s"]:
        return fast["tokens_per_s"] / slow["tokens_per_s"]
    return None


def gpu_side(graph, cluster: ClusterSpec, scheme: Scheme | None = None) -> dict:
    """simulate_cluster's summary, weights and KV caches stored as `scheme` says; a cluster
    that cannot run the step reports why (the cluster and the graph are valid by now, so a
    ValueError here is about this pairing)."""
    g = graph.graph
    try:
        return simulate_cluster(graph, cluster, scheme=scheme).summary()
    except ValueError as exc:  # e.g. more pipeline stages than layers, a dtype a GPU lacks
        return not_run(cluster.name, g["cfg"].name, g["phase"], g["batch"],
                       g["ctx_len"] + g["seq_len"], str(exc))


def wafer_side(graph, target: MeshTarget | WaferCluster, layers: str,
               options: CompileOptions) -> dict:
    """Compile and simulate on the wafer, or pipelined over a cluster of wafers
    (compiler.multiwafer); a model that does not fit (or is not lowered yet) reports the
    compiler's one-line reason."""
    g = graph.graph
    name, phase, batch, ctx = g["cfg"].name, g["phase"], g["batch"], g["ctx_len"]
    if phase == "prefill":
        ctx = g["seq_len"]
    t0 = time.perf_counter()
    try:
        if isinstance(target, WaferCluster):
            mw = compile_multiwafer(graph, target, options)
        else:
            compiled = compile_model(graph, target, options)
    except ProgramError as exc:
        return not_run(target.name, name, phase, batch, ctx, str(exc))
    except MemoryError:
        return not_run(target.name, name, phase, batch, ctx,
                       "the compiler ran out of host memory building the layout")
    compile_wall = time.perf_counter() - t0
    if isinstance(target, WaferCluster):
        summary = simulate_multiwafer(mw, layers)
    else:
        summary = simulate_layout(compiled.code, target, compiled.info(), layers)
    summary.update(reason=None, compile_wall_s=compile_wall)
    return summary


def compare(cfg: ModelConfig, target: MeshTarget | WaferCluster, cluster: ClusterSpec | str,
            phase: str = "decode", batch: int = 1, ctx: int = 4096, layers: str = "all",
            options: CompileOptions | None = None,
            status: Callable[[str], contextlib.AbstractContextManager] | None = None) -> dict:
    """Both sides of one step and the speedup (wafer tokens/s over GPU tokens/s).

    `cluster` is a ClusterSpec or a spec string (wafersim.baseline.cluster grammar). Bad input
    (cluster spec, phase, batch, ctx, layers, policy) raises ValueError before anything runs.
    `status(message)` is entered around the wafer's compile + simulate (a progress display)."""
    options = options or CompileOptions()
    if isinstance(cluster, str):
        cluster = parse_cluster(cluster)
    if layers not in LAYER_MODES:
        raise ValueError(f"--layers {layers!r} is not one of {', '.join(LAYER_MODES)}")
    if options.policy not in POLICIES:
        raise ValueError(f"--policy {options.policy!r} is not one of {', '.join(POLICIES)}")
    used = techniques(cfg, options)
    if options.act_density is not None:  # bad specs fail before anything runs
        if cfg.fff_depth is not None:
            raise ValueError("--act-density with --fff-depth: a fast feed-forward tree has no "
                             "down projection to sparsify; give one of them")
        ActSparsity(options.act_density, options.act_seed).densities(cfg.num_hidden_layers)
    scheme = quant.of(options, cfg.dtype)  # bad --quant / --kv-dtype / --prune fail here
    graph = step_graph(cfg, phase, batch, ctx)
    gpus = gpu_side(sparse_graph(graph, options), cluster, scheme)
    with status(f"compiling and simulating {cfg.name} on {target.name}") if status else (
            contextlib.nullcontext()):
        wafer = wafer_side(graph, target, layers, options)
    dense = None
    if used:
        dense_cfg = dataclasses.replace(cfg, fff_depth=None)
        dense_graph = step_graph(dense_cfg, phase, batch, ctx)
        with status(f"the dense step on {target.name}") if status else (
                contextlib.nullcontext()):
            dense = {"wafer": wafer_side(dense_graph, target, layers, dense_options(options)),
                     "gpus": gpu_side(dense_graph, cluster)}
    speedup, why = None, None
    if not wafer["fits"] or not gpus["fits"]:
        why = "; ".join(f"{side} side does not fit or cannot run the step"
                        for side, r in (("wafer", wafer), ("GPU", gpus)) if not r["fits"])
    elif not wafer["tokens_per_s"] or not gpus["tokens_per_s"]:
        why = "no throughput on one side"
    else:
        speedup = wafer["tokens_per_s"] / gpus["tokens_per_s"]
    out = {"model": cfg.name, "phase": phase, "batch": batch, "ctx": ctx, "layers": layers,
           "wafer": wafer, "gpus": gpus, "speedup": speedup, "speedup_reason": why}
    if dense is not None:
        out.update(techniques=used, dense=dense,
                   wafer_speedup_vs_dense=_ratio(wafer, dense["wafer"]),
                   gpus_speedup_vs_dense=_ratio(gpus, dense["gpus"]))
    return out


def _energy_present(result: dict) -> bool:
    return any(result[s].get("energy_j") is not None for s in ("wafer", "gpus"))


def rows(result: dict) -> list[dict]:
    """The table as rows of raw values: metric, unit, wafer, gpus, wafer_over_gpus.

    Energy appears only where a side's specs give a power figure (the GPUs' board power; the
    wafer targets have none, so its cell is empty)."""
    latency = "tpot_ms" if result["phase"] == "decode" else "ttft_ms"
    units = {"tokens_per_s": "tokens/s", latency: "ms", "makespan_s": "s",
             "busy_fraction": "fraction", "idle_fraction": "fraction", "onchip_bytes": "bytes",
             "offchip_bytes": "bytes", "energy_j": "J"}
    out = []
    for key, _ in ROWS:
        key = latency if key == "latency" else key
        if key == "energy_j" and not _energy_present(result):
            continue
        w, g = result["wafer"].get(key), result["gpus"].get(key)
        ratio = result["speedup"] if key == "tokens_per_s" else None
        out.append({"metric": key, "unit": units.get(key, ""), "wafer": w, "gpus": g,
                    "wafer_over_gpus": ratio})
    if "dense" in result:
        out.append({"metric": "speedup_vs_dense", "unit": "x",
                    "wafer": result["wafer_speedup_vs_dense"],
                    "gpus": result["gpus_speedup_vs_dense"], "wafer_over_gpus": None})
    for side in ("wafer", "gpus"):
        if result[side].get("reason"):
            out.append({"metric": f"{side}_reason", "unit": "", "wafer": None, "gpus": None,
                        "wafer_over_gpus": None, side: result[side]["reason"]})
    return out


def write_csv(result: dict, path: str | Path) -> None:
    """The table rows as CSV (raw values, one metric a row; empty where not applicable)."""
    fields = ("metric", "unit", "wafer", "gpus", "wafer_over_gpus")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows(result):
            w.writerow({k: "" if row[k] is None else row[k] for k in fields})


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _seconds(s: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if s >= scale:
            return f"{s / scale:.4g} {unit}"
    return f"{s / 1e-9:.4g} ns"


def fmt(key: str, value) -> str:
    """A cell of the printed table."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "tokens_per_s":
        return f"{value:,.0f}" if value >= 1000 else f"{value:.4g}"
    if key.endswith("_ms"):
        return f"{value:.4g} ms"
    if key == "makespan_s":
        return _seconds(value)
    if key.endswith("_fraction"):
        return f"{value:.1%}"
    if key.endswith("_bytes"):
        return _si(value, "B")
    if key == "energy_j":
        return _si(value, "J")
    return str(value)


def technique_rows(result: dict) -> list[tuple[str, str, str]]:
    """(label, wafer, gpus) cells of the dense-vs-technique table: each side against its own
    dense step (empty without a technique)."""
    if "dense" not in result:
        return []
    sides = [(result["dense"][k], result[k]) for k in ("wafer", "gpus")]

    def pair(key, form):
        return tuple("-" if d.get(key) is None and t.get(key) is None else
                     f"{form(d.get(key))} -> {form(t.get(key))}" for d, t in sides)

    def count(v):
        return "-" if v is None else f"{v:,}"

    speed = tuple("-" if r is None else f"{r:.3g}x" for r in (
        result["wafer_speedup_vs_dense"], result["gpus_speedup_vs_dense"]))
    return [("throughput (tokens/s)", *pair("tokens_per_s", lambda v: fmt("tokens_per_s", v))),
            ("speed-up vs dense", *speed),
            ("fits", *pair("fits", lambda v: fmt("fits", v))),
            ("max ctx", *pair("max_ctx", count)),
            ("max batch", *pair("max_batch", count))]


def table_rows(result: dict) -> list[tuple[str, str, str, str]]:
    """(label, wafer, gpus, wafer/GPU) cells of the printed table (reasons not included)."""
    labels = dict(ROWS)
    latency = "tpot_ms" if result["phase"] == "decode" else "ttft_ms"
    labels[latency] = f"latency ({'TPOT' if latency == 'tpot_ms' else 'TTFT'})"
    out = []
    for row in rows(result):
        key = row["metric"]
        if key.endswith("_reason") or key == "speedup_vs_dense":  # (technique_rows shows it)
            continue
        ratio = "" if row["wafer_over_gpus"] is None else f"{row['wafer_over_gpus']:.3g}x"
        if key == "tokens_per_s" and result["speedup"] is None:
            ratio = "-"
        out.append((labels[key], fmt(key, row["wafer"]), fmt(key, row["gpus"]), ratio))
    return out
