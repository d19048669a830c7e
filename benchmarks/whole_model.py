"""Whole-model steps for every mesh algorithm: decode (MeshGEMV vs ring) and prefill (MeshGEMM
vs Cannon vs SUMMA), with compile and simulate time, events/s and memory.

The model is LLaMA-3-8B's layer shape (d, f, heads, KV heads) cut to 2 layers and an 8,192-token
vocabulary, on `region` x `region` regions of a WSE-2 whose SRAM is raised to 1 MiB per core so
that small regions hold a layer (SRAM size does not enter the timing). Decode: batch 1, 4,096
cached tokens; prefill: one prompt of `--prompt` tokens. Each run is its own process, so peak
memory (ru_maxrss) is that run's. The margin is the step time over the WaferLLM algorithm's.

    python benchmarks/whole_model.py                        # the docs' table
    python benchmarks/whole_model.py --decode 128 --prefill 32 --prompt 64   # a quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

ALGOS = {"decode": ("meshgemv", "ring"), "prefill": ("meshgemm", "cannon", "summa")}


def one(phase: str, side: int, algo: str, prompt: int) -> dict:
    from compiler.model import CompileOptions, compile_model
    from compiler.targets import load_target
    from models import build_graph, load_model
    from wafersim.simulate import simulate

    cfg = dataclasses.replace(load_model("llama3-8b"), name="llama3-8b-2l", num_hidden_layers=2,
                              vocab_size=8192)
    target = dataclasses.replace(load_target("wse2"), sram_bytes=1 << 20)
    graph = (build_graph(cfg, "decode", ctx_len=4096) if phase == "decode"
             else build_graph(cfg, "prefill", seq_len=prompt))
    t0 = time.perf_counter()
    compiled = compile_model(graph, target, CompileOptions(region=(side, side), algo=algo))
    compile_s = time.perf_counter() - t0
    compile_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    res = simulate(compiled.code, target)
    return dict(phase=phase, region=f"{side}x{side}", algo=algo, cycles=res.makespan_cycles,
                instructions=compiled.code.n_instructions, compile_s=compile_s,
                compile_rss_gb=compile_rss, events=res.events, simulate_s=res.sim_wall_s,
                events_per_s=res.events / res.sim_wall_s,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode", default="128,256", help="decode region sides, comma separated")
    ap.add_argument("--prefill", default="64", help="prefill region sides, comma separated")
    ap.add_argument("--prompt", type=int, default=256, help="prefill prompt tokens")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        phase, side, algo, prompt = args.one
        print(json.dumps(one(phase, int(side), algo, int(prompt))))
        return
    print(f"{'phase':>7} {'region':>9} {'algo':>8} {'cycles':>10} {'margin':>7} {'instr':>8} "
          f"{'compile':>8} {'RSS':>6} {'events':>8} {'simulate':>9} {'events/s':>9} {'RSS':>6}")
    for phase, sides in (("decode", args.decode), ("prefill", args.prefill)):
        for side in (int(s) for s in sides.split(",") if s):
            first = None
            for algo in ALGOS[phase]:
                out = subprocess.run([sys.executable, __file__, "--one", phase, str(side), algo,
                                      str(args.prompt)], check=True, capture_output=True,
                                     text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                first = first or r["cycles"]
                print(f"{phase:>7} {r['region']:>9} {algo:>8} {r['cycles']:>10,} "
                      f"{r['cycles'] / first:6.3f}x {r['instructions'] / 1e6:7.2f}M "
                      f"{r['compile_s']:7.1f}s {r['compile_rss_gb']:5.1f}G "
                      f"{r['events'] / 1e6:7.1f}M {r['simulate_s']:8.1f}s "
                      f"{r['events_per_s'] / 1e6:8.1f}M {r['peak_rss_gb']:5.1f}G", flush=True)


if __name__ == "__main__":
    main()
