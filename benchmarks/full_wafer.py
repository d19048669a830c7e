"""Whole-model steps on the full WSE-2 mesh: compile, layout file, simulate, memory, tokens/s.

For each model and placement policy, one process compiles the step and writes the layout file;
then one process per layer mode loads it and simulates: `one` (each region's loop run once and
twice, the rest extrapolated, as the loop proves the layers identical) and `all` (every layer
simulated). Each step runs in its own process so its peak memory (ru_maxrss) is its own.

Decode: batch 1, `--ctx` tokens cached (default 4096). Prefill (`--phase prefill`): one prompt
of `--ctx` tokens; its grids are too large for a layer's exact program, so it is compiled with
sampled steps and simulated at two step counts, extrapolated (compiler.prefill_model).

    python benchmarks/full_wafer.py                                   # the docs' decode table
    python benchmarks/full_wafer.py --models llama3-8b --policies pipeline --layers one
    python benchmarks/full_wafer.py --phase prefill --ctx 512 --models llama3-8b \\
        --policies waferllm --layers one                              # the prefill table
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def compile_step(model: str, policy: str, path: str, phase: str, ctx: str) -> dict:
    from compiler.layout import save_layout
    from compiler.model import CompileOptions, compile_model
    from compiler.targets import load_target
    from models import build_graph, load_model

    target = load_target("wse2")
    cfg, ctx = load_model(model), int(ctx)
    graph = (build_graph(cfg, "prefill", seq_len=ctx) if phase == "prefill"
             else build_graph(cfg, "decode", ctx_len=ctx))
    t0 = time.perf_counter()
    compiled = compile_model(graph, target, CompileOptions(policy=policy))
    compile_s = time.perf_counter() - t0
    rss = _rss_gb()
    code = compiled.code
    t0 = time.perf_counter()
    save_layout(code, path, **compiled.info())
    p = compiled.placements[0].region
    return dict(compile_s=compile_s, compile_rss_gb=rss, save_s=time.perf_counter() - t0,
                layout_gb=os.path.getsize(path) / 1e9, instructions=code.n_instructions,
                messages=code.n_messages,
                regions=f"{len(compiled.placements)}x {p.rows}x{p.cols}",
                layers_per_region=max(q.count for q in compiled.placements))


def simulate_step(path: str, layers: str) -> dict:
    from compiler.layout import load_code
    from compiler.targets import MeshTarget
    from wafersim.whole import simulate_layout

    t0 = time.perf_counter()
    code, info = load_code(path)
    load_s = time.perf_counter() - t0
    s = simulate_layout(code, MeshTarget.from_dict(info["target"]), info, layers)
    hops = code.glue.n_hops + code.copies * code.body.n_hops  # the program's (stamped) routes
    return dict(load_s=load_s, hops=hops, sim_wall_s=s["sim_wall_s"], events=s["events"],
                events_per_s=s["events"] / s["sim_wall_s"], tokens_per_s=s["tokens_per_s"],
                latency_ms=s["tpot_ms"] or s["ttft_ms"], extrapolated=s["extrapolated"],
                sim_rss_gb=_rss_gb())


def _run(*args: str) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(args[:3])} failed:\n{p.stderr.strip().splitlines()[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama3-8b,llama2-13b")
    ap.add_argument("--policies", default="waferllm,pipeline")
    ap.add_argument("--layers", default="one,all", help="layer modes to simulate")
    ap.add_argument("--phase", default="decode", choices=("decode", "prefill"))
    ap.add_argument("--ctx", type=int, default=None,
                    help="decode: tokens cached (4096); prefill: prompt tokens (512)")
    ap.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        kind, *rest = args.step
        print(json.dumps(compile_step(*rest) if kind == "compile" else simulate_step(*rest)))
        return
    ctx = args.ctx or (512 if args.phase == "prefill" else 4096)
    latency = "TTFT" if args.phase == "prefill" else "TPOT"
    print(f"{args.phase}, ctx {ctx}")
    print(f"{'model':>10} {'policy':>8} {'regions':>15} {'L/reg':>5} {'instr':>6} {'hops':>6} "
          f"{'compile':>7} {'RSS':>5} {'layout':>6} {'layers':>6} {'load':>5} {'sim':>6} "
          f"{'events':>6} {'ev/s':>6} {'RSS':>5} {'tok/s':>7} {latency:>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for policy in args.policies.split(","):
                path = os.path.join(tmp, f"{model}-{policy}.wsl")
                c = _run("--step", "compile", model, policy, path, args.phase, str(ctx))
                for layers in args.layers.split(","):
                    s = _run("--step", "simulate", path, layers)
                    print(f"{model:>10} {policy:>8} {c['regions']:>15} "
                          f"{c['layers_per_region']:>5} {c['instructions'] / 1e6:5.1f}M "
                          f"{s['hops'] / 1e6:5.0f}M {c['compile_s']:6.1f}s "
                          f"{c['compile_rss_gb']:4.1f}G {c['layout_gb']:5.2f}G {layers:>6} "
                          f"{s['load_s']:4.1f}s {s['sim_wall_s']:5.1f}s "
                          f"{s['events'] / 1e6:5.0f}M {s['events_per_s'] / 1e6:5.1f}M "
                          f"{s['sim_rss_gb']:4.1f}G {s['tokens_per_s']:7.0f} "
                          f"{s['latency_ms']:6.3f}ms", flush=True)
                os.unlink(path)


if __name__ == "__main__":
    main()
