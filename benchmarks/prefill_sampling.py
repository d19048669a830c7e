"""Sampled prefill steps against exact simulation: how far the extrapolation lands.

A full-wafer prefill is compiled with sampled steps (compiler.prefill_model: each GEMM and the
attention run 2 and 3 of their s steps, and wafersim.whole extrapolates to s). Here the same
model is compiled both ways on grids where the exact program can still be built: LLaMA-3-8B's
layer shape (d 4096, 32 heads, 8 KV heads, ffn 14336, a 512-token prompt, its real
vocabulary), on one region of s x s cores or on four (a 2s x 2s mesh), with SRAM raised to
64 MiB per core so that a few regions hold many layers (SRAM size does not enter the timing).
Every layer is simulated (`all`), and `one` as well where a region holds more than two.

    python benchmarks/prefill_sampling.py            # the table in docs/validation.md

`--layer` measures what `wafersim layer --phase prefill` does instead: one layer's program
alone (compiler.prefill_model.layer_alone) exact and with sampled steps, against the exact
2- minus 1-layer whole step, for LLaMA-3-8B with a 4,096-token prompt (model and paper
attention, SRAM raised as above), on grids up to 96 a side (7.6 GB at 96; the 2-layer step up
to 64). `non-causal` times the exact layer with the causal attention's early finishing rows
kept at work (every row runs every step, as the sampled steps do):

    python benchmarks/prefill_sampling.py --layer   # the layer table in docs/validation.md
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from compiler import prefill_model
from compiler.algorithms import prefill
from compiler.model import CompileOptions, compile_model
from compiler.targets import load_target
from models import build_graph, load_model
from wafersim.layer import _up, layer_run, paper_config
from wafersim.simulate import simulate
from wafersim.whole import simulate_layout

CASES = [  # (grid side, mesh side, layers)
    (32, 32, 2), (64, 64, 2), (32, 64, 12), (32, 64, 10), (64, 128, 12)]


def run(side: int, mesh_side: int, layers: int, sampled: bool, mode: str) -> dict:
    cfg = dataclasses.replace(load_model("llama3-8b"), num_hidden_layers=layers)
    mesh = dataclasses.replace(load_target("wse2").with_mesh(mesh_side, mesh_side),
                               sram_bytes=1 << 26)
    prefill_model.SAMPLE_SIDE = 0 if sampled else 10**9
    c = compile_model(build_graph(cfg, "prefill", seq_len=512), mesh,
                      CompileOptions(region=(side, side)))
    t0 = time.perf_counter()
    s = simulate_layout(c.code, mesh, c.info(), mode)
    return dict(s, wall=time.perf_counter() - t0, counts=[p.count for p in c.placements])


LAYER_GRIDS = {"model": (16, 32, 48, 64, 80, 96), "paper": (16, 32, 48, 64, 80)}
NON_CAUSAL = (32, 64)
TARGET = dataclasses.replace(load_target("wse2"), sram_bytes=1 << 26)


def added_by_second_layer(cfg, p: int, ctx: int) -> int:
    """The exact 2-layer whole step minus the 1-layer step (one region, SRAM raised)."""
    mesh = TARGET.with_mesh(p, p)
    side, prefill_model.SAMPLE_SIDE = prefill_model.SAMPLE_SIDE, 10**9
    c = compile_model(build_graph(dataclasses.replace(cfg, num_hidden_layers=2), "prefill",
                                  seq_len=ctx), mesh, CompileOptions(region=(p, p)))
    prefill_model.SAMPLE_SIDE = side
    prog = c.code
    one, two = (simulate(dataclasses.replace(prog, loop_count=np.minimum(prog.loop_count, n)),
                         mesh).makespan_cycles for n in (1, 2))
    return two - one


def non_causal(cfg, p: int, ctx: int) -> int:
    """The exact layer alone with every row running every attention step."""
    causal = prefill._attention

    def every_row(*args, **kw):
        return causal(*args, **{**kw, "causal": False})

    prefill._attention = every_row
    try:
        return layer_run(cfg, TARGET, p, "prefill", ctx, sample=False)["layer_cycles"]
    finally:
        prefill._attention = causal



def layer_table(ctx: int = 4096) -> None:
    print("| attention | P | 2- minus 1-layer step | layer alone, exact | alone - step | "
          "sampled | steps | sampled error | non-causal, exact | wall: exact, sampled |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = load_model("llama3-8b")
    for attention, grids in LAYER_GRIDS.items():
        for p in grids:
            cfg, n = (paper_config(base, p), _up(ctx, p)) if attention == "paper" else (base, ctx)
            step = added_by_second_layer(cfg, p, n) if p <= 64 else None
            exact = layer_run(cfg, TARGET, p, "prefill", n, sample=False)
            sampled = layer_run(cfg, TARGET, p, "prefill", n, sample=True)
            e, s = exact["layer_cycles"], sampled["layer_cycles"]
            nc = non_causal(cfg, p, n) if p in NON_CAUSAL and attention == "model" else None
            wall = [r["compile_wall_s"] + r["sim_wall_s"] for r in (exact, sampled)]
            print(f"| {attention} | {p} | {'-' if step is None else f'{step:,}'} | {e:,} | "
                  f"{'-' if step is None else f'{e - step:+,}'} | {s:,} | "
                  f"{','.join(map(str, sampled['steps_sampled'][:2]))} | {s / e - 1:+.2%} | "
                  f"{'-' if nc is None else f'{nc:,}'} | {wall[0]:.1f} s, {wall[1]:.1f} s |",
                  flush=True)


def main() -> None:
    if "--layer" in sys.argv[1:]:
        layer_table()
        return
    print("| grid | regions x layers | layers mode | exact cycles | sampled cycles | error | "
          "FLOPs | messages | exact: events, wall | sampled: events, wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side, mesh_side, layers in CASES:
        modes = ("all", "one") if layers > 2 * (mesh_side // side) ** 2 else ("all",)
        for mode in modes:
            e, s = run(side, mesh_side, layers, False, mode), run(side, mesh_side, layers, True,
                                                                    mode)
            err = {k: s[k] / e[k] - 1 for k in ("makespan_cycles", "flops", "messages")}
            print(f"| {side}x{side} | {len(e['counts'])} x {e['counts']} | {mode} | "
                  f"{e['makespan_cycles']:,} | {s['makespan_cycles']:,} | "
                  f"{err['makespan_cycles']:+.2%} | {err['flops']:+.1%} | "
                  f"{err['messages']:+.0%} | {e['events'] / 1e6:.1f} M, {e['wall']:.1f} s | "
                  f"{s['events'] / 1e6:.1f} M, {s['wall']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
