"""Sampled prefill steps against exact simulation: how far the extrapolation lands.

A full-wafer prefill is compiled with sampled steps (compiler.prefill_model: each GEMM and the
attention run 2 and 3 of their s steps, and wafersim.whole extrapolates to s). Here the same
model is compiled both ways on grids where the exact program can still be built: LLaMA-3-8B's
layer shape (d 4096, 32 heads, 8 KV heads, ffn 14336, a 512-token prompt, its real
vocabulary), on one region of s x s cores or on four (a 2s x 2s mesh), with SRAM raised to
64 MiB per core so that a few regions hold many layers (SRAM size does not enter the timing).
Every layer is simulated (`all`), and `one` as well where a region holds more than two.

    python benchmarks/prefill_sampling.py            # the table in docs/validation.md
"""

from __future__ import annotations

import dataclasses
import time

from compiler import prefill_model
from compiler.model import CompileOptions, compile_model
from compiler.targets import load_target
from models import build_graph, load_model
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


def main() -> None:
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
