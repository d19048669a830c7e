"""Whole-model decode at growing region sizes: compile and simulate time, events/s, memory.

The model is LLaMA-3-8B's layer shape (d, f, heads, KV heads) cut to 2 layers and an 8,192-token
vocabulary, so the layer regions can grow to sizes that build on this machine; each region size
runs in its own process so peak memory (ru_maxrss) is that run's.

    python benchmarks/whole_model.py                  # regions 128x128 and 256x256 (docs)
    python benchmarks/whole_model.py --regions 128    # a quick check (smaller regions do not fit)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time


def one(side: int) -> dict:
    from compiler.model import CompileOptions, compile_model
    from compiler.targets import load_target
    from models import build_graph, load_model
    from wafersim.simulate import simulate

    cfg = dataclasses.replace(load_model("llama3-8b"), name="llama3-8b-2l", num_hidden_layers=2,
                              vocab_size=8192)
    target = load_target("wse2")
    t0 = time.perf_counter()
    compiled = compile_model(build_graph(cfg, "decode", ctx_len=4096), target,
                             CompileOptions(region=(side, side)))
    compile_s = time.perf_counter() - t0
    compile_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    res = simulate(compiled.program, target)
    prog = compiled.program
    return dict(region=f"{side}x{side}", regions=len(compiled.placements),
                instructions=prog.n_instructions, messages=prog.n_messages, compile_s=compile_s,
                compile_rss_gb=compile_rss, events=res.events, simulate_s=res.sim_wall_s,
                events_per_s=res.events / res.sim_wall_s,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regions", default="128,256", help="region sides, comma separated")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    print(f"{'region':>9} {'instr':>8} {'msgs':>7} {'compile':>8} {'RSS':>6} {'events':>8} "
          f"{'simulate':>9} {'events/s':>9} {'RSS':>6}")
    for side in (int(s) for s in args.regions.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(side)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['region']:>9} {r['instructions'] / 1e6:7.2f}M {r['messages'] / 1e6:6.2f}M "
              f"{r['compile_s']:7.1f}s {r['compile_rss_gb']:5.1f}G {r['events'] / 1e6:7.1f}M "
              f"{r['simulate_s']:8.1f}s {r['events_per_s'] / 1e6:8.1f}M "
              f"{r['peak_rss_gb']:5.1f}G")


if __name__ == "__main__":
    main()
