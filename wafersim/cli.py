"""The `wafersim` command line.

Every command that prints results also takes `--json` and then prints exactly one JSON object
on stdout. Bad input (a model, target, shape or algorithm the tool cannot use) ends with a
one-line `error: ...` on stderr and exit status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from compiler.algorithms.meshgemm import EXACT_MAX_SIDE, GEMM_ALGOS, SAMPLED_STEPS, lower_gemm
from compiler.algorithms.meshgemv import GEMV_ALGOS, lower_gemv
from compiler.layout import LayoutError
from compiler.program import ProgramError
from compiler.targets import PRESETS, TargetError, load_target
from wafersim.result import SimulationError
from wafersim.simulate import simulate, simulate_sampled

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Wafer-scale chip compiler and simulator for transformer inference.")
console = Console(width=None if sys.stdout.isatty() else 160)
_state = {"debug": False}
# OSError: a path the user gave that cannot be read or written.
USER_ERRORS = (ValueError, ProgramError, TargetError, SimulationError, LayoutError, OSError)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


def user_errors(fn):
    """Turn bad-input exceptions into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            if _state["debug"]:
                raise
            what = exc
            if isinstance(exc, OSError) and exc.filename:
                what = f"{exc.filename}: {exc.strerror or exc}"
            print(f"error: {what}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


def parse_mesh(text: str, option: str = "--mesh") -> tuple[int, int]:
    """'360x360' or '4x6' -> (rows, cols); the first number is rows (P), the second cols (Q)."""
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected ROWSxCOLS, e.g. 360x360") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"{option} {text!r}: both sides must be >= 1")
    return rows, cols


def working(message: str):
    """A spinner with the elapsed time on stderr while one long call runs; nothing when stderr
    is not a terminal (rich draws live displays on terminals only)."""
    return Console(stderr=True).status(message)


def emit(obj: dict) -> None:
    print(json.dumps(obj, default=float))


# The placement and efficiency options that `compile` and `compare` share (docs/efficiency.md).
POLICY = typer.Option("waferllm", "--policy",
                      help="Wafer placement: waferllm (fastest estimated), pipeline or largest.")
REGION = typer.Option("", "--region", help="Force every wafer region to ROWSxCOLS cores.")
ACT_DENSITY = typer.Option("", "--act-density", help=(
    "Activation sparsity (TwELL): the FFN neurons' density, 0.1, one per layer 0.1,0.2,..., or "
    "beta:MEAN:CONC."))
ACT_SEED = typer.Option(0, "--act-seed", help="Seed of the active neurons' draw.")
FFF_DEPTH = typer.Option(-1, "--fff-depth", help=(
    "Replace every MLP with a fast feed-forward tree of this depth (2^(d+1)-1 neurons, d+1 per "
    "token; -1: the model's MLP)."))
QUANT = typer.Option("", "--quant", help="Store the weights in bf16, fp16, fp8, int8 or int4 "
                                         "(default: the model's dtype).")
KV_DTYPE = typer.Option("", "--kv-dtype", help="Store the KV cache in bf16, fp16, fp8, int8 or "
                                               "int4 (default: the model's).")
QUANT_GROUP = typer.Option(128, "--quant-group",
                           help="Elements per fp16 scale of fp8/int8/int4 weights and KV entries.")
PRUNE = typer.Option("", "--prune", help="Prune the layers' projections: 2:4, or the density of "
                                         "kept weights (0.5).")


def compile_options(policy: str, region: str, act_density: str, act_seed: int, quant: str,
                    kv_dtype: str, quant_group: int, prune: str, **more):
    """CompileOptions from the shared CLI options above (the compiler checks their values)."""
    from compiler.model import CompileOptions

    return CompileOptions(policy=policy, region=parse_mesh(region, "--region") if region else None,
                          act_density=act_density or None, act_seed=act_seed, quant=quant or None,
                          kv_dtype=kv_dtype or None, quant_group=quant_group,
                          prune=prune or None, **more)


def with_fff(cfg, depth: int):
    """The model with fast feed-forward layers of `depth` (-1: unchanged)."""
    import dataclasses

    return cfg if depth == -1 else dataclasses.replace(cfg, fff_depth=depth)


@app.command()
@user_errors
def info(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """List the wafer targets and the model zoo."""
    targets = [{"name": name, "mesh": f"{t.width}x{t.height}", "cores": t.cores,
                "sram_bytes_per_core": t.sram_bytes, "clock_hz": t.clock_hz,
                "peak_fp16_flops": t.peak_flops("fp16")} for name, t in PRESETS.items()]
    models = _zoo_rows()
    if as_json:
        emit({"targets": targets, "models": models})
        return
    table = Table("target", "mesh", "cores", "SRAM/core", "peak fp16", title="Wafer targets")
    for t in targets:
        table.add_row(t["name"], t["mesh"], f"{t['cores']:,}", f"{t['sram_bytes_per_core']:,} B",
                      f"{t['peak_fp16_flops'] / 1e15:.2f} PFLOP/s")
    console.print(table)
    console.print("Several wafers: COUNTxTARGET, e.g. --target 5xwse2 (docs/multiwafer.md)",
                  highlight=False)
    table = Table("model", "params", "layers", "hidden", "heads / kv", title="Model zoo")
    for m in models:
        table.add_row(m["name"], f"{m['params'] / 1e9:.2f} B", str(m["layers"]),
                      str(m["hidden"]), f"{m['heads']} / {m['kv_heads']}")
    console.print(table)


def _zoo_rows() -> list[dict]:
    from models import load_model, zoo_names

    rows = []
    for name in zoo_names():
        cfg = load_model(name)
        rows.append({"name": name, "params": cfg.param_count(), "layers": cfg.num_hidden_layers,
                     "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                     "kv_heads": cfg.num_key_value_heads})
    return rows


@app.command()
@user_errors
def op(
    kind: str = typer.Argument(..., help="gemv or gemm"),
    m: int = typer.Option(1, "--m", help="Rows of x / A (the batch, for gemv)."),
    k: int = typer.Option(4096, "--k", help="Inner dimension."),
    n: int = typer.Option(14336, "--n", help="Output columns."),
    mesh: str = typer.Option("360x360", "--mesh", help="Region of cores, ROWSxCOLS."),
    algo: str = typer.Option("all", "--algo", help="Algorithm name, or 'all' to compare."),
    target: str = typer.Option("wse2", "--target", help="Preset name or target TOML/JSON file."),
    levels: int = typer.Option(2, "--levels", help="K-tree levels (meshgemv)."),
    dtype: str = typer.Option("bf16", "--dtype"),
    steps: str = typer.Option(
        "auto", "--steps", help="GEMM loop: 'all' steps, 'T1,T2' sampled steps extrapolated to "
        "all, or 'auto' (sampled above compiler.algorithms.meshgemm.EXACT_MAX_SIDE cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Lower one GEMV or GEMM onto a region and simulate it, per algorithm."""
    tgt = load_target(target)
    rows, cols = parse_mesh(mesh)
    if kind not in ("gemv", "gemm"):
        raise ValueError(f"op kind {kind!r} is not one of gemv, gemm")
    if kind == "gemv" and steps != "auto":
        raise ValueError(f"--steps {steps!r}: only a GEMM's loop is sampled (op gemm)")
    algos = GEMV_ALGOS if kind == "gemv" else GEMM_ALGOS
    chosen = algos if algo == "all" else (algo,)
    results = []
    for name in chosen:
        if kind == "gemv":
            prog = lower_gemv(m, k, n, rows, cols, name, levels=levels, dtype=dtype, target=tgt)
            res = simulate(prog, tgt)
        else:
            prog, res = _gemm_run(m, k, n, rows, cols, name, dtype, tgt, steps)
        fr = res.fractions()
        results.append({
            "algo": name, "grid": f"{prog.meta['rows']}x{prog.meta['cols']}",
            "makespan_s": res.makespan_s, "makespan_cycles": res.makespan_cycles,
            "achieved_flops_per_s": res.achieved_flops(),
            "busy_fraction": fr["busy"], "overhead_fraction": fr["overhead"],
            "idle_fraction": fr["idle"], "onchip_bytes": res.onchip_bytes, "offchip_bytes": 0,
            "fits": True, "max_link_utilisation": res.link_utilisation(),
            "sram_bytes_max": int(prog.sram_per_core().max()), "messages": res.messages,
            "hops": res.hops, "events": res.events, "sim_wall_s": res.sim_wall_s,
            "steps_sampled": res.meta.get("steps_sampled"),
            "extrapolated": bool(res.meta.get("extrapolated")),
        })
    best = min(results, key=lambda r: r["makespan_cycles"])
    summary = {"system": tgt.name, "op": kind, "m": m, "k": k, "n": n, "mesh": mesh,
               "dtype": dtype, "results": results, "best": best["algo"]}
    if as_json:
        emit(summary)
        return
    shape = f"[{m},{k}] x [{k},{n}]"
    table = Table("algorithm", "grid", "time", "vs best", "TFLOP/s", "busy", "overhead", "idle",
                  "on-chip traffic", "hottest link", "SRAM/core", "events",
                  title=f"{kind.upper()} {shape} on {mesh} cores of {tgt.name}")
    for r in results:
        sampled = r["steps_sampled"]
        table.add_row(r["algo"] + (f" (steps {sampled[0]},{sampled[1]} extrapolated)"
                                   if sampled else ""), r["grid"],
                      f"{r['makespan_s'] * 1e6:.2f} us",
                      f"{r['makespan_cycles'] / best['makespan_cycles']:.2f}x",
                      f"{r['achieved_flops_per_s'] / 1e12:.2f}", f"{r['busy_fraction']:.1%}",
                      f"{r['overhead_fraction']:.1%}", f"{r['idle_fraction']:.1%}",
                      f"{r['onchip_bytes'] / 1e6:.2f} MB", f"{r['max_link_utilisation']:.1%}",
                      f"{r['sram_bytes_max']:,} B", f"{r['events']:,}")
    console.print(table)


def _gemm_run(m, k, n, rows, cols, algo, dtype, tgt, steps: str):
    """(a program of the GEMM, its SimResult): exact, or from sampled steps (--steps)."""
    last = {}

    def lower(t=None):  # keeps the last program lowered: its meta and SRAM go in the row
        last["prog"] = lower_gemm(m, k, n, rows, cols, algo, dtype=dtype, target=tgt, steps=t)
        return last["prog"]

    full = (max if algo == "summa" else min)(rows, cols)
    if steps == "auto":
        sample = None if full <= EXACT_MAX_SIDE else SAMPLED_STEPS
    elif steps == "all":
        sample = None
    else:
        try:
            sample = tuple(int(x) for x in steps.split(","))
        except ValueError:
            sample = ()
        if len(sample) != 2 or not 1 <= sample[0] < sample[1] <= full:
            raise ValueError(f"--steps {steps!r}: give 'all', 'auto' or T1,T2 with "
                             f"1 <= T1 < T2 <= {full} (the {algo} loop's steps on {rows}x{cols})")
    if sample is None:
        prog = lower()
        return prog, simulate(prog, tgt)
    res = simulate_sampled(lower, tgt, full, sample)
    return last["prog"], res


@app.command("compile")
@user_errors
def compile_cmd(
    model: str = typer.Argument(..., help="Zoo model name or a config.json path."),
    target: str = typer.Option("wse2", "--target",
                               help="Preset name or target TOML/JSON file; COUNTxTARGET (e.g. "
                                    "4xwse3) pipelines the layers over several wafers."),
    phase: str = typer.Option("decode", "--phase",
                              help="decode, or prefill (one prompt of --ctx tokens, batch 1)."),
    batch: int = typer.Option(1, "--batch"),
    ctx: int = typer.Option(4096, "--ctx",
                            help="Tokens already in the KV cache (prefill: the prompt length)."),
    capacity: int = typer.Option(0, "--capacity", help="KV tokens the cache holds (0: ctx+1)."),
    policy: str = POLICY,
    region: str = REGION,
    algo: str = typer.Option("meshgemv", "--algo",
                             help="GEMV reductions: meshgemv (K-tree) or ring (chain)."),
    act_density: str = ACT_DENSITY,
    act_seed: int = ACT_SEED,
    fff_depth: int = FFF_DEPTH,
    quant: str = QUANT,
    kv_dtype: str = KV_DTYPE,
    quant_group: int = QUANT_GROUP,
    prune: str = PRUNE,
    output: str = typer.Option("", "-o", "--output", help="Write the layout file here."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Place a whole model on the wafer and lower it to per-core programs (a layout file)."""
    import time

    from compiler import multiwafer
    from compiler.layout import save_layout
    from compiler.model import compile_model
    from compiler.multiwafer import WaferCluster, compile_multiwafer, is_cluster, load_cluster
    from compiler.prefill_model import algos as prefill_algos
    from models import build_graph, load_model

    tgt = load_cluster(target) if is_cluster(target) else load_target(target)
    cfg = with_fff(load_model(model), fff_depth)
    t0 = time.perf_counter()
    graph = (build_graph(cfg, phase, batch=batch, seq_len=ctx) if phase == "prefill"
             else build_graph(cfg, phase, batch=batch, ctx_len=ctx))
    options = compile_options(policy, region, act_density, act_seed, quant, kv_dtype,
                              quant_group, prune, capacity=capacity or None, algo=algo)
    if isinstance(tgt, WaferCluster):
        with working(f"compiling {cfg.name} over {tgt.name}"):
            mw = compile_multiwafer(graph, tgt, options)
        summary = {**multiwafer.report(mw), "compile_wall_s": time.perf_counter() - t0,
                   "layouts": multiwafer.save_stages(mw, output) if output else None}
        if as_json:
            emit(summary)
            return
        _print_stages(summary, f"{cfg.name} decode over {tgt.name} ({policy})")
        return
    with working(f"compiling {cfg.name} {phase} for {tgt.name}"):
        compiled = compile_model(graph, tgt, options)
    wall = time.perf_counter() - t0
    if output:
        save_layout(compiled.code, output, **compiled.info())
    prog, mem = compiled.code, compiled.memory
    summary = {"system": tgt.name, "model": cfg.name, "phase": phase, "batch": batch,
               "ctx": ctx, "fits": True, "policy": policy,
               "algo": algo if phase == "decode" else "{} (layers), {} (LM head)".format(
                   *prefill_algos(options)),
               **({"act_density": act_density, "act_seed": act_seed} if act_density else {}),
               **({"fff_depth": fff_depth} if fff_depth >= 0 else {}),
               "regions": len(compiled.placements),
               "region": f"{compiled.placements[0].region.rows}x"
                         f"{compiled.placements[0].region.cols}",
               "layers_per_region": [p.count for p in compiled.placements],
               "sram_max_bytes": mem["sram_max_bytes"], "sram_limit_bytes": tgt.sram_bytes,
               "max_ctx": mem["max_ctx"], "max_batch": mem.get("max_batch"),
               **{key: mem[key] for key in mem if key.startswith(("kv_", "max_tokens_",
                                                                  "max_decode_"))},
               **quant_summary(mem.get("quant")),
               "instructions": prog.n_instructions,
               "messages": prog.n_messages, "compile_wall_s": wall, "layout": output or None}
    if as_json:
        emit(summary)
        return
    table = Table("", "", title=f"{cfg.name} {phase} on {tgt.name} ({policy})")
    _print_pairs(table, summary)


def quant_summary(gain: dict | None) -> dict:
    """The compile report's storage keys (compiler.model.capacity_gain): the scheme, and
    whether the model fits, the largest context and batch, stored dense vs as the scheme."""
    if gain is None:
        return {}
    out = {"storage": gain["scheme"]}
    for key in ("fits", "max_ctx", "max_batch"):
        out[f"dense_{key}"], out[f"quant_{key}"] = gain["dense"][key], gain["quant"][key]
    return out


def _print_stages(summary: dict, title: str) -> None:
    """A cluster's compile report: a row per wafer, then the step's figures."""
    table = Table("wafer", "layers", "embed", "head", "regions", "SRAM/core", "max ctx",
                  "estimated time", title=title)
    for st in summary["stages"]:
        table.add_row(str(st["wafer"]), st["layers"], "yes" if st["embed"] else "",
                      "yes" if st["head"] else "", f"{st['regions']} x {st['region']}",
                      f"{st['sram_max_bytes']:,} B", f"{st['max_ctx']:,}",
                      f"{st['estimated_s'] * 1e6:,.1f} us")
    console.print(table)
    rest = {k: v for k, v in summary.items() if k != "stages"}
    _print_pairs(Table("", "", title="the step (estimated: compiler.estimate)"), rest)


def multiwafer_note(summary: dict) -> str:
    """One line on a model pipelined over several wafers (wafersim.multiwafer)."""
    layers = " | ".join(st["layers"] for st in summary["stages"])
    return (f"wafers: {summary['wafers']} stages, layers {layers}; h crosses between wafers "
            f"in {summary['crossing_s'] * 1e6:.3g} us ({summary['io_latency_s'] * 1e6:.3g} us "
            f"assumed latency + {summary['offchip_bytes'] // max(summary['wafers'] - 1, 1):,} B "
            f"over {summary['io_bytes_per_s'] / 1e9:.0f} GB/s); pipeline bubble "
            f"{summary['bubble_fraction']:.0%} with one step in flight")


def _print_pairs(table: Table, summary: dict) -> None:
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        table.add_row(key, str(value))
    console.print(table)


@app.command("simulate")
@user_errors
def simulate_cmd(
    layout: str = typer.Argument(..., help="A layout file from `wafersim compile`."),
    layers: str = typer.Option("all", "--layers",
                               help="all: simulate every layer; one: one layer per region, "
                                    "extrapolated (the layers are identical by construction)."),
    trace: str = typer.Option("", "--trace", help="Also write a Chrome/Perfetto trace "
                                                  "(JSON) of up to 64 sampled cores."),
    report: str = typer.Option("", "--report", help="Also write a self-contained HTML report "
                                                    "(summary, maps)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Simulate a compiled layout: throughput, latency, utilisation, traffic."""
    from compiler.layout import load_code
    from compiler.stamp import Stamped
    from compiler.targets import MeshTarget
    from wafersim.whole import simulate_layout

    code, info = load_code(layout)
    if "target" not in info:
        raise ValueError(f"{layout}: not a whole-model layout (no target recorded)")
    tgt = MeshTarget.from_dict(info["target"])
    stamped = isinstance(code, Stamped)
    if (trace or report) and stamped and code.sampled:
        raise ValueError(f"{layout}: a prefill with sampled steps has no single program to "
                         "trace or map (--trace, --report)")
    with working(f"simulating {layout} ({layers} layers)"):
        summary = simulate_layout(code, tgt, info, layers)
    program = code.expand(True) if stamped and (trace or report) else code
    if trace:
        from wafersim.trace import write_trace

        meta = write_trace(program, tgt, trace)
        summary.update(trace=trace, trace_cores=len(meta["cores"]),
                       trace_loop_capped=meta["loop_capped"])
    if report:
        from wafersim.report import write_report

        write_report(report, program, tgt, info, summary, layers)
        summary["report"] = report
    if as_json:
        emit(summary)
        return
    _print_pairs(Table("", "", title=f"{summary['model']} {summary['phase']} on {tgt.name}"),
                 summary)


PLOT_KINDS = ("util", "traffic", "placement", "memory", "time", "roofline")


@app.command()
@user_errors
def plot(
    layout: str = typer.Argument(..., help="A layout file from `wafersim compile`."),
    kind: str = typer.Option("util", "--kind",
                             help="util, traffic, placement, memory, time or roofline."),
    output: str = typer.Option("plot.png", "-o", "--output", help="The PNG to write."),
    layers: str = typer.Option("all", "--layers",
                               help="all: every layer simulated; one: each region's layer loop "
                                    "run once (util, traffic)."),
    cores: int = typer.Option(8, "--cores", help="Cores in the timeline (kind time)."),
    gpu: str = typer.Option("A100", "--gpu", help="The GPU whose roofline is drawn beside the "
                                                  "wafer's (kind roofline)."),
):
    """Draw a map of a compiled layout: utilisation, link traffic, placement, SRAM, timelines,
    or the roofline of its model's ops."""
    import dataclasses

    import numpy as np

    from compiler import quant
    from compiler.layout import load_layout
    from compiler.targets import MeshTarget
    from wafersim import viz

    if kind not in PLOT_KINDS:
        raise ValueError(f"--kind {kind!r} is not one of {', '.join(PLOT_KINDS)}")
    if layers not in ("all", "one"):
        raise ValueError(f"--layers {layers!r} is not one of all, one")
    program, info = load_layout(layout, timing_only=kind != "memory")
    if "target" not in info:
        raise ValueError(f"{layout}: not a whole-model layout (no target recorded)")
    tgt = MeshTarget.from_dict(info["target"])
    if kind == "placement":
        fig = viz.placement_map(info, program.width, program.height)
    elif kind == "memory":  # weights and caches at their stored bytes (compiler.quant)
        fig = viz.memory_map(quant.stored_layout(program, info), tgt)
    elif kind == "time":
        fig = viz.timeline(program, tgt, max_cores=max(cores, 1))
    elif kind == "roofline":
        fig = _roofline(program, tgt, info, layers, gpu)
    else:
        if layers == "one" and program.looped:
            program = dataclasses.replace(program, loop_count=np.minimum(program.loop_count, 1))
        res = simulate(program, tgt)
        fig = viz.util_map(res) if kind == "util" else viz.traffic_map(res)
    viz.save(fig, output)
    print(f"plot: {output}")


def _roofline(program, tgt, info: dict, layers: str, gpu: str):
    """The roofline of the layout's model ops (one layer's, and the ends), with the simulated
    step as one point: its FLOPs over the SRAM bytes its compute moves, and its FLOP/s."""
    import dataclasses

    import numpy as np

    from models import ModelConfig, build_graph
    from wafersim import viz
    from wafersim.baseline.gpus import GPUS

    if gpu.lower() not in GPUS:
        raise ValueError(f"--gpu {gpu!r} is not one of {', '.join(g.name for g in GPUS.values())}")
    cfg = ModelConfig.from_dict(info["model"], info["model_name"])
    graph = (build_graph(cfg, "prefill", seq_len=info["ctx"]) if info["phase"] == "prefill"
             else build_graph(cfg, "decode", batch=info["batch"], ctx_len=info["ctx"]))
    ops = [d["op"] for _, d in graph.nodes(data=True) if d["op"].layer in (-1, 0)]
    if layers == "one" and program.looped:
        program = dataclasses.replace(program, loop_count=np.minimum(program.loop_count, 1))
    res = simulate(program, tgt)
    achieved = (res.flops / max(res.sram_bytes, 1), res.flops / res.makespan_s)
    return viz.roofline(ops, tgt, program.dtype, GPUS[gpu.lower()], achieved,
                        f"{cfg.name} {info['phase']}: one layer's ops and the ends")


@app.command()
@user_errors
def compare(
    model: str = typer.Argument(..., help="Zoo model name or a config.json path."),
    wafer: str = typer.Option("wse2", "--wafer",
                              help="Preset name or target TOML/JSON file; COUNTxTARGET (e.g. "
                                   "5xwse2) pipelines the layers over several wafers."),
    gpus: str = typer.Option("8xA100", "--gpus",
                             help="GPU cluster, e.g. 8xA100, 4xA100+4xH20, "
                                  "2x(8xH100)@dc1+1x(8x910B)@dc2;dc1-dc2=1000km."),
    phase: str = typer.Option("decode", "--phase",
                              help="decode or prefill (batch 1 on the wafer)."),
    batch: int = typer.Option(1, "--batch"),
    ctx: int = typer.Option(4096, "--ctx",
                            help="Tokens in the KV cache (decode) or the prompt (prefill)."),
    layers: str = typer.Option("all", "--layers",
                               help="Wafer: all layers simulated, or one per region "
                                    "extrapolated."),
    policy: str = POLICY,
    region: str = REGION,
    act_density: str = ACT_DENSITY,
    act_seed: int = ACT_SEED,
    fff_depth: int = FFF_DEPTH,
    quant: str = QUANT,
    kv_dtype: str = KV_DTYPE,
    quant_group: int = QUANT_GROUP,
    prune: str = PRUNE,
    csv_path: str = typer.Option("", "--csv", help="Also write the table rows to this CSV."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """One step on the wafer and on a GPU cluster side by side: throughput, latency, traffic."""
    from compiler.multiwafer import is_cluster, load_cluster
    from models import load_model
    from wafersim import compare as cmp

    tgt = load_cluster(wafer) if is_cluster(wafer) else load_target(wafer)
    cfg = with_fff(load_model(model), fff_depth)
    options = compile_options(policy, region, act_density, act_seed, quant, kv_dtype,
                              quant_group, prune)
    status = Console(stderr=True).status
    result = cmp.compare(cfg, tgt, gpus, phase=phase, batch=batch, ctx=ctx, layers=layers,
                         options=options, status=status)
    if csv_path:
        cmp.write_csv(result, csv_path)
    if as_json:
        emit(result)
        return
    w, g = result["wafer"], result["gpus"]
    what = f"ctx {ctx}" if phase == "decode" else f"prompt {ctx}"
    table = Table("", "wafer", "GPUs", "wafer / GPU",
                  title=f"{cfg.name} {phase}, batch {batch}, {what}")
    for row in cmp.table_rows(result):
        table.add_row(*row)
    notes = [f"{side}: {result[key]['reason']}" for side, key in (("wafer", "wafer"),
                                                                  ("GPUs", "gpus"))
             if result[key].get("reason")]
    if w["fits"]:
        notes.append(f"wafer: layers {w['layers_simulated']}"
                     + (" (extrapolated)" if w["extrapolated"] else "")
                     + f", {w['events']:,} events in {w['sim_wall_s']:.3g} s")
    if w["fits"] and w.get("steps_caveat"):
        notes.append(f"wafer: {w['steps_caveat']}")
    if w["fits"] and "stages" in w:
        notes.append(multiwafer_note(w))
    if "energy_j" not in w and g.get("energy_j") is not None:
        notes.append("energy: GPU board power x makespan; the wafer target has no power figure")
    console.print(table)
    if "dense" in result:
        more = Table("dense -> with it", "wafer", "GPUs",
                     title=", ".join(result["techniques"]) + ": each side against its dense step")
        for row in cmp.technique_rows(result):
            more.add_row(*row)
        console.print(more)
    for note in notes:
        console.print(note, highlight=False, soft_wrap=True)
    if csv_path:
        console.print(f"csv: {csv_path}")


@app.command()
@user_errors
def serve(
    model: str = typer.Argument(..., help="Zoo model name or a config.json path."),
    wafer: str = typer.Option("", "--wafer", help="Wafer preset or target file (default wse2 "
                                                  "when no --gpus)."),
    gpus: str = typer.Option("", "--gpus", help="GPU cluster spec, e.g. 8xA100."),
    rate: float = typer.Option(20.0, "--rate", help="Requests per second."),
    duration: float = typer.Option(600.0, "--duration", help="Seconds of arrivals."),
    prompt: int = typer.Option(512, "--prompt", help="Prompt tokens per request."),
    output: int = typer.Option(256, "--output", help="Output tokens per request."),
    arrivals: str = typer.Option("poisson", "--arrivals",
                                 help="poisson, bursty, or a CSV trace (arrival_s, "
                                      "prompt_tokens, output_tokens)."),
    disaggregate: bool = typer.Option(False, "--disaggregate",
                                      help="Prefill on its own wafer region / GPUs."),
    prefill_fraction: float = typer.Option(0.5, "--prefill-fraction",
                                           help="Wafer columns given to prefill."),
    prefill_gpus: str = typer.Option("", "--prefill-gpus",
                                     help="Prefill cluster (default: half of --gpus)."),
    slo_ttft: float = typer.Option(1.0, "--slo-ttft", help="SLO on TTFT, seconds."),
    slo_tpot: float = typer.Option(0.02, "--slo-tpot", help="SLO on TPOT, seconds."),
    seed: int = typer.Option(0, "--seed"),
    rates: str = typer.Option("", "--rates", help="Latency vs load: rates, e.g. 5,10,20,40."),
    batches: str = typer.Option("", "--batches", help="Decode batch buckets, e.g. 1,2,4."),
    ctxs: str = typer.Option("", "--ctxs", help="Decode context buckets, e.g. 1024,4096."),
    prefill_tokens: str = typer.Option("", "--prefill-tokens", help="Prefill buckets."),
    max_batch: int = typer.Option(0, "--max-batch", help="Cap on the decode batch (0: the "
                                                         "hardware's)."),
    error_points: int = typer.Option(2, "--error-points",
                                     help="Off-bucket points simulated exactly to bound the "
                                          "interpolation error (0: none)."),
    cache_dir: str = typer.Option("~/.cache/wafersim", "--cache-dir",
                                  help="Keep simulated step points and tables here (JSON, keyed "
                                       "by the simulator's source too); '' for none."),
    wafer_prefill_util: float = typer.Option(0.0, "--wafer-prefill-util",
                                             help="Estimate wafer prefill as FLOPs at this "
                                                  "fraction of peak instead of simulating it "
                                                  "(a quick what-if: a full-wafer prefill "
                                                  "takes minutes to simulate)."),
    plot_path: str = typer.Option("", "--plot", help="Write KV occupancy (and latency vs "
                                                     "load) to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Serve a request stream on a wafer and/or a GPU cluster: latency percentiles, goodput."""
    from wafersim import serving

    if max_batch < 0 or wafer_prefill_util < 0:
        raise ValueError("--max-batch and --wafer-prefill-util must be >= 0")
    status = Console(stderr=True).status("building step tables")
    with status:
        result = serving.run_serve(
            model, wafer, gpus, rate, duration, prompt, output, arrivals, disaggregate,
            prefill_fraction, prefill_gpus, serving.SLO(slo_ttft, slo_tpot), seed,
            serving.parse_rates(rates) if rates else None, batches, ctxs, prefill_tokens,
            max_batch or None, error_points, cache_dir, wafer_prefill_util or None,
            progress=status.update)
    if plot_path:
        serving.plot(plot_path, result["systems"], result["curves"])
    if as_json:
        emit(result)
        return
    names = {"wafer": "wafer", "gpus": "GPUs"}
    table = Table("", *[names[k] for k in result["systems"]],
                  title=f"{result['model']} serving, {result['workload']}, {duration:g} s, "
                        f"prompt {prompt}, output {output}")
    for row in serving.table_rows(result):
        table.add_row(*row)
    console.print(table)
    for s in result["systems"].values():
        note = s["steps"]["prefill_note"] or ""
        console.print(f"{s['system']}: decode buckets batch {s['steps']['batches']} x ctx "
                      f"{s['steps']['ctxs']}" + (f"; prefill {note}" if note else ""),
                      highlight=False, soft_wrap=True)
    if result["curves"]:
        curve = Table("rate", *[f"{names[k]} {m}" for k in result["curves"]
                                for m in ("TTFT p50/p99", "TPOT p50/p99")],
                      title="latency vs load")
        rows = list(zip(*result["curves"].values()))
        for per_rate in rows:
            cells = [f"{per_rate[0]['rate']:g}"]
            for r in per_rate:
                cells += [f"{serving._ms(r['ttft_p50_ms'])} / {serving._ms(r['ttft_p99_ms'])}",
                          f"{serving._ms(r['tpot_p50_ms'])} / {serving._ms(r['tpot_p99_ms'])}"]
            curve.add_row(*cells)
        console.print(curve)
    if plot_path:
        console.print(f"plot: {plot_path}")


@app.command()
@user_errors
def noc(
    target: str = typer.Option("wse2", "--target", help="Preset name or target TOML/JSON file."),
    mesh: str = typer.Option("16x16", "--mesh", help="Cores to load, ROWSxCOLS."),
    pattern: str = typer.Option("uniform", "--pattern",
                                help="uniform, transpose, bitcomp, hotspot, neighbour, tornado."),
    rates: str = typer.Option("0.02:0.5:0.02", "--rates",
                              help="Offered loads per core per cycle: START:STOP:STEP or a,b,c."),
    msg_bytes: int = typer.Option(32, "--msg-bytes", help="Bytes per message."),
    unit: str = typer.Option("flits", "--unit", help="Unit of --rates: flits or bytes."),
    process: str = typer.Option("bernoulli", "--process", help="bernoulli or poisson."),
    warmup: int = typer.Option(1000, "--warmup", help="Warm-up cycles."),
    measure: int = typer.Option(1000, "--measure", help="Measurement cycles."),
    drain: int = typer.Option(500, "--drain", help="Cycles of traffic after the window."),
    seed: int = typer.Option(0, "--seed"),
    hotspot_fraction: float = typer.Option(0.2, "--hotspot-fraction",
                                           help="Share of hotspot traffic to the hot cores."),
    hotspots: int = typer.Option(4, "--hotspots", help="Hot cores, nearest the centre."),
    with_overheads: bool = typer.Option(False, "--with-overheads",
                                        help="Keep the target's send/receive overheads."),
    stop_after: int = typer.Option(0, "--stop-after",
                                   help="Stop this many points past saturation (0: run all)."),
    output: str = typer.Option("", "-o", "--output", help="Plot latency vs load to this PNG."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Latency against offered load under synthetic traffic: the fabric's standard curves."""
    from wafersim.noc import TrafficSpec, latency_curve, parse_rates, plot_curves

    tgt = load_target(target)
    rows, cols = parse_mesh(mesh)
    if rows > tgt.height or cols > tgt.width:
        raise ValueError(f"--mesh {mesh} does not fit target {tgt.name} "
                         f"({tgt.height}x{tgt.width} cores)")
    if stop_after < 0:
        raise ValueError(f"--stop-after {stop_after} must be >= 0")
    spec = TrafficSpec(pattern=pattern, msg_bytes=msg_bytes, unit=unit, process=process,
                       warmup_cycles=warmup, measure_cycles=measure, drain_cycles=drain,
                       seed=seed, hotspot_fraction=hotspot_fraction, hotspots=hotspots)
    curve = latency_curve(spec, tgt.with_mesh(cols, rows), parse_rates(rates),
                          with_overheads=with_overheads, stop_after=stop_after or None)
    if output:
        plot_curves([curve], output)
    summary = {"system": tgt.name, **curve.to_dict(),
               "events": sum(p.events for p in curve.points),
               "sim_wall_s": sum(p.sim_wall_s for p in curve.points), "plot": output or None}
    if as_json:
        emit(summary)
        return
    u = f"{unit}/cycle/core"
    table = Table("rate", "offered", "accepted", "avg latency", "p99 latency", "avg hops",
                  "busiest link", "",
                  title=f"{pattern} traffic on {mesh} cores of {tgt.name}: {msg_bytes}-byte "
                        f"messages ({curve.flits_per_message} flits), {process} injection, "
                        f"loads in {u}")
    for i, p in enumerate(curve.points):
        table.add_row(f"{p.rate:g}", f"{p.offered:.4f}", f"{p.accepted:.4f}",
                      f"{p.latency_avg:.1f}", f"{p.latency_p99:.0f}", f"{p.hops_avg:.2f}",
                      f"{p.max_link_busy:.0%}", "<- saturation" if i == curve.saturation else "")

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    table.caption = (
        f"zero-load latency {curve.zero_load_latency:.2f} cycles; channel-load bound "
        f"{fmt(curve.bound)}; saturation {fmt(curve.saturation_rate)} "
        f"({summary['saturation_rule']}); latency knee {fmt(curve.latency_knee)} "
        f"({summary['latency_knee_rule']})"
        + ("" if with_overheads else "; fabric only, no core overheads"))
    console.print(table)
    if output:
        console.print(f"plot: {output}")


@app.command()
@user_errors
def sweep(
    sweep_file: str = typer.Argument(..., help="A sweep TOML file (tables base and axes; "
                                                "docs/sweep.md)."),
    out: str = typer.Option("", "-o", "--out",
                            help="Results CSV, appended per point (default: the sweep file's "
                                 "name with .csv); a sweep run again skips points already in "
                                 "it."),
    scheduler: str = typer.Option("", "--scheduler",
                                  help="An existing dask scheduler, tcp://HOST:PORT (default: a "
                                       "local cluster of --workers processes)."),
    workers: int = typer.Option(2, "--workers", help="Worker processes of the local cluster."),
    limit: int = typer.Option(-1, "--limit", help="Run at most this many new points (-1: all)."),
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="Run again the points recorded with an error."),
    plot: str = typer.Option("", "--plot", help="Write a Pareto plot to this PNG."),
    pareto_x: str = typer.Option("cores", "--pareto-x",
                                 help="Cost axis of the Pareto front (minimised): a numeric "
                                      "column, e.g. cores, sram_bytes."),
    pareto_y: str = typer.Option("tokens_per_s", "--pareto-y",
                                 help="Benefit of the Pareto front (maximised)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Compile and simulate every point of a design-space sweep on dask; a results table and
    its Pareto front (docs/sweep.md)."""
    from pathlib import Path

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from wafersim import sweep as sw

    spec = sw.load_sweep(sweep_file)
    out_path = Path(out) if out else Path(sweep_file).with_suffix(".csv")
    columns = spec.columns()
    for option, name in (("--pareto-x", pareto_x), ("--pareto-y", pareto_y)):
        sw.check_column(columns, name, option)
    progress = Progress("[progress.description]{task.description}", BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=as_json)
    task = None

    def tick(done: int, total: int, row):
        nonlocal task
        if task is None:
            task = progress.add_task(f"sweep {Path(sweep_file).name}", total=total)
        progress.update(task, completed=done)

    with progress:
        report = sw.run_sweep(spec, out_path, scheduler=scheduler or None, workers=workers,
                              limit=None if limit < 0 else limit, retry_failed=retry_failed,
                              progress=tick)
    _, rows = sw.read_results(out_path)
    keys = {p.key for p in spec.points()[0]}
    rows = [r for r in rows if r["key"] in keys]
    front = sw.pareto_front(rows, pareto_x, pareto_y)
    if plot:
        sw.plot_pareto(rows, plot, pareto_x, pareto_y, title=f"{Path(sweep_file).stem}: "
                                                             f"{pareto_y} vs {pareto_x}")
    shown = list(spec.axes) + [c for c in (pareto_x, pareto_y) if c not in spec.axes]
    result = {**report.to_dict(), "sweep": sweep_file, "rows": len(rows),
              "failed_total": sum(bool(r.get("error")) for r in rows), "plot": plot or None,
              "pareto_x": pareto_x, "pareto_y": pareto_y,
              "pareto": [{"key": r["key"], **{c: r.get(c) for c in shown}} for r in front]}
    if as_json:
        emit(result)
        return
    console.print(f"{report.computed} points run ({report.failed} failed), {report.skipped} "
                  f"already in {out_path}, {report.duplicates} duplicates, {report.remaining} "
                  f"left; {report.wall_s:.1f} s on {report.workers or '-'} workers",
                  highlight=False)
    table = Table("key", *shown, title=f"Pareto front: {pareto_y} (max) vs {pareto_x} (min)")
    for r in result["pareto"]:
        table.add_row(*(str(r[c]) if not isinstance(r[c], float) else f"{r[c]:.4g}"
                        for c in ("key", *shown)))
    console.print(table)
    if plot:
        console.print(f"plot: {plot}")


@app.command()
@user_errors
def layer(
    model: str = typer.Argument(..., help="Zoo model name or a config.json path."),
    phase: str = typer.Option("decode", "--phase", help="decode or prefill."),
    grid: str = typer.Option("360", "--grid", help="P of the P x P grid, or P1,P2,... to "
                                                   "sweep."),
    ctx: int = typer.Option(4096, "--ctx",
                            help="Tokens in the KV cache (prefill: the prompt length)."),
    target: str = typer.Option("wse2", "--target", help="Preset name or target TOML/JSON file."),
    attention: str = typer.Option("model", "--attention",
                                  help="paper: one full-width head, shapes rounded up to P "
                                       "(WaferLLM); model: the real GQA shapes."),
    kv: str = typer.Option("shift", "--kv",
                           help="KV cache whose decode capacity is reported as max_decode: "
                                "shift (WaferLLM) or concat (appended on the tail core)."),
    output: str = typer.Option("", "-o", "--output", help="Plot tokens/s against P (PNG)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """One layer on a P x P grid, tokens/s extrapolated as one layer x layer count
    (WaferLLM's method)."""
    from models import load_model
    from wafersim.layer import layer_run, parse_grids, plot_sweep

    grids = parse_grids(grid)
    tgt = load_target(target)
    cfg = load_model(model)
    from rich.progress import track

    err = Console(stderr=True)
    rows = [layer_run(cfg, tgt, p, phase, ctx, attention, kv=kv) for p in track(
        grids, description=f"{cfg.name} {phase}, P = {grid}", console=err, transient=True,
        disable=not err.is_terminal)]
    if output:
        plot_sweep(rows, output)
    if as_json:
        emit(rows[0] if len(rows) == 1 else {"extrapolated": True, "rows": rows,
                                             "plot": output or None})
        return
    if len(rows) == 1:
        r = rows[0]
        _print_pairs(Table("", "", title=f"{cfg.name} {phase}: one layer on {r['grid']}x"
                                         f"{r['grid']} cores of {tgt.name} ({attention} "
                                         "attention)"), r)
    else:
        table = Table("P", "layer cycles", "steps", "estimate", "1-layer step",
                      "layer SRAM/core", "fits", "busy", "tokens/s", f"max decode ({kv} KV)",
                      "vocab",
                      title=f"{cfg.name} {phase}, {attention} attention, on {tgt.name}: "
                            f"one layer x {cfg.num_hidden_layers} (extrapolated)")

        def num(v):
            return "-" if v is None else f"{v:,.0f}"

        for r in rows:
            t = r["steps_sampled"]
            table.add_row(str(r["grid"]), f"{r['layer_cycles']:,}",
                          "all" if t is None else f"{t[0]},{t[1]} of {t[2]}"
                          + (" (bound)" if r["sampled_work_bound"] else
                             "" if r["sampled_steady"] else " (not steady)"),
                          num(r["estimate_layer_cycles"]), num(r["one_layer_step_cycles"]),
                          f"{r['layer_sram_max_bytes']:,} B", "yes" if r["fits"] else "no",
                          f"{r['busy_fraction']:.1%}", f"{r['tokens_per_s']:,.0f}",
                          num(r["max_decode"]), "shrunk to P" if r["vocab_shrunk"] else "real")
        console.print(table)
    console.print(f"extrapolated: true (tokens/s = tokens / (layers x layer s); "
                  f"{cfg.num_hidden_layers} layers)", highlight=False)
    if any(r["sampled"] for r in rows):
        console.print("sampled: true where steps are 'T1,T2 of P': each GEMM and the attention "
                      "ran T1 and T2 of their P steps, and the layer is extrapolated linearly "
                      "to P (docs/validation.md gives its error)", highlight=False)
    if any(r["sampled"] and not r["sampled_steady"] for r in rows):
        console.print("(not steady): the cycles a step adds still changed at the last steps "
                      "sampled; (bound): the layer cycles are then the busiest core's own "
                      "work, a lower bound (tokens/s: an upper bound)", highlight=False)
    if phase == "prefill":
        console.print("prefill: the layer's program alone (no embedding or LM head); fits: "
                      "the layer alone against a core's SRAM", highlight=False)
    if any(r["vocab_shrunk"] for r in rows):
        console.print("vocab_size shrunk to P for the measurement: the tables do not fit one "
                      "P x P region with the layers (they are outside the layer's time)",
                      highlight=False)
    if output:
        console.print(f"plot: {output}")
