"""How steady sampled prefill steps are: LLaMA-3-8B's prefill layer alone on a P x P grid of a
WSE-2 (compiler.prefill_model.layer_alone, model attention), simulated at several step counts T
and extrapolated to P from each pair of neighbouring counts, as `wafersim layer --phase
prefill` does. It prints the cycles a step adds between the pair, the layer extrapolated from
them and the busiest core's work per step. The first and the last pair are then compared: how
short the whole-model prefill (sampled at steps 2 and 3) is per layer and over the model's
layers.

    python benchmarks/prefill_steps.py                      # 512 tokens on 375 x 375: validation.md
    python benchmarks/prefill_steps.py --prompt 2048 --steps 2,3,6,7,8

Each program is built, simulated and dropped in turn; steps 7 and 8 on 375 x 375 peak at about
11 GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from compiler.prefill_model import layer_alone
from compiler.targets import load_target
from models import load_model
from wafersim.simulate import simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--grid", type=int, default=375)
    ap.add_argument("--steps", default="2,3,7,8", help="step counts T, ascending")
    args = ap.parse_args()
    full = load_model(args.model)
    cfg = dataclasses.replace(full, num_hidden_layers=1)
    target = load_target("wse2").with_mesh(args.grid, args.grid)
    steps = sorted(int(s) for s in args.steps.split(","))
    runs = {}
    print(f"{cfg.name} prefill layer alone, {args.prompt} tokens, {args.grid}x{args.grid} "
          "cores of wse2", flush=True)
    for t in steps:
        t0 = time.perf_counter()
        program = layer_alone(cfg, target, args.prompt, t)
        r = simulate(program, target)
        del program
        runs[t] = (r.makespan_cycles, int((r.core_busy + r.core_overhead).max()))
        print(f"  T = {t}: {r.makespan_cycles:,} cycles, busiest core's work {runs[t][1]:,}, "
              f"{r.events:,} events, {time.perf_counter() - t0:.1f} s", flush=True)
    layer = {}
    for a, b in zip(steps, steps[1:]):
        per_step = (runs[b][0] - runs[a][0]) / (b - a)  # affine in the steps from here on
        layer[a, b] = round(runs[b][0] + (args.grid - b) * per_step)
        print(f"  T = {a},{b}: a step adds {per_step:,.0f} cycles, work "
              f"{(runs[b][1] - runs[a][1]) / (b - a):,.0f}; the layer {layer[a, b]:,} cycles",
              flush=True)
    pairs = [p for p in layer if p[1] == p[0] + 1]
    if len(pairs) > 1:
        first, last = pairs[0], pairs[-1]
        short = layer[last] - layer[first]
        ms = short / target.clock_hz * 1e3
        print(f"from T = {first} the layer is {short:,} cycles ({ms:.3f} ms) short of T = {last}: "
              f"{ms * full.num_hidden_layers:.2f} ms over {full.num_hidden_layers} layers "
              f"({layer[last] / layer[first] - 1:.0%} longer)")


if __name__ == "__main__":
    main()
