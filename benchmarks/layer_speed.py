"""`wafersim layer` speed: issue 16's targets, one decode run at P = 720 in <= 2 s and the
nine-point sweep (P = 240, 300, ..., 720) in <= 20 s, for LLaMA-3-8B with paper attention
(WaferLLM's method), batch 1, ctx 4096, on a WSE-2.

Each point runs `wafersim.layer.layer_run` in this process, one after the other, after a
warm-up point (Numba loads its compiled kernels once per process). Per point it prints the
wall time, its compile and simulate parts, the events and the events per second of the
simulation; then the sweep's total and each target's ratio (measured / target).

    python benchmarks/layer_speed.py                      # the nine points (about 75 s)
    python benchmarks/layer_speed.py --grids 720          # the P = 720 target alone
    python benchmarks/layer_speed.py --model llama2-13b --attention model --grids 360
"""

from __future__ import annotations

import argparse
import os
import time

from compiler.targets import load_target
from models import load_model
from wafersim.layer import layer_run, parse_grids

NINE = "240,300,360,420,480,540,600,660,720"
TARGET_720_S = 2.0
TARGET_NINE_S = 20.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--grids", default=NINE, help="P1,P2,... (default the nine points)")
    ap.add_argument("--attention", default="paper", choices=("paper", "model"))
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    cfg, target = load_model(args.model), load_target("wse2")
    grids = parse_grids(args.grids)
    load = os.getloadavg()
    print(f"{cfg.name} decode, {args.attention} attention, ctx {args.ctx}, WSE-2; load average "
          f"{load[0]:.2f} ({os.cpu_count()} cores)", flush=True)
    layer_run(cfg, target, min(grids), "decode", args.ctx, args.attention)  # warm-up
    print(f"{'P':>4} {'wall s':>7} {'compile s':>9} {'simulate s':>10} {'events':>12} "
          f"{'Mevents/s':>9} {'layer cycles':>12}", flush=True)
    total = 0.0
    for p in grids:
        t0 = time.perf_counter()
        r = layer_run(cfg, target, p, "decode", args.ctx, args.attention)
        wall = time.perf_counter() - t0
        total += wall
        print(f"{p:>4} {wall:>7.2f} {r['compile_wall_s']:>9.2f} {r['sim_wall_s']:>10.2f} "
              f"{r['events']:>12,} {r['events'] / r['sim_wall_s'] / 1e6:>9.1f} "
              f"{r['layer_cycles']:>12,}", flush=True)
        if p == 720:
            print(f"     P = 720: {wall:.2f} s against the {TARGET_720_S:g} s target: "
                  f"{wall / TARGET_720_S:.1f}x", flush=True)
    print(f"{len(grids)} points in {total:.1f} s", end="")
    if args.grids == NINE:
        print(f" against the {TARGET_NINE_S:g} s target: {total / TARGET_NINE_S:.1f}x", end="")
    print()


if __name__ == "__main__":
    main()
