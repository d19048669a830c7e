"""Engine speed: events/s of the Numba kernel on GEMV and GEMM programs and on whole decode
layers, and its speed-up over the plain-SimPy twin (wafersim.reference) on the same programs,
with identical results.

    python benchmarks/engine_speed.py            # 16x16 .. 600x600 and layers (a few minutes)
    python benchmarks/engine_speed.py --small    # CI: small meshes only
    python benchmarks/engine_speed.py --layers 124,256   # whole-layer regions to time

The whole-layer programs are LLaMA-3-8B's layer shape cut to 2 layers and an 8,192-token
vocabulary, decode at a 4,096-token context, one region per layer forced to the given size on
the WSE-2 mesh (as benchmarks/whole_model.py builds them).

The kernel is timed after one warm-up call (Numba compiles once and caches to disk); each time
is the best of three. "events" are hop events (one per message per link crossed) plus one start
event per active core. Ratios are printed; nothing here asserts a figure except that the two
engines agree exactly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from compiler.algorithms.meshgemm import lower_gemm
from compiler.algorithms.meshgemv import lower_gemv
from compiler.targets import WSE2
from wafersim.engine import run_kernel
from wafersim.reference import run_reference
from wafersim.simulate import kernel_args


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def layer_program(side):
    import dataclasses

    from compiler.model import CompileOptions, compile_model
    from models import build_graph, load_model

    cfg = dataclasses.replace(load_model("llama3-8b"), name="llama3-8b-2l", num_hidden_layers=2,
                              vocab_size=8192)
    return compile_model(build_graph(cfg, "decode", ctx_len=4096), WSE2,
                         CompileOptions(region=(side, side))).program


def bench_kernel(name, make):
    t0 = time.perf_counter()
    prog = make()
    build_s = time.perf_counter() - t0
    args = kernel_args(prog, WSE2, arrivals=False)
    run_kernel(*args)  # warm-up / JIT
    kernel_s, out = best_of(lambda: run_kernel(*args))
    events = int(out[1])
    return {"program": name, "messages": prog.n_messages, "hops": prog.n_hops,
            "events": events, "build_s": build_s, "kernel_s": kernel_s,
            "events_per_s": events / kernel_s, "makespan_cycles": int(out[2].max())}


def bench_simpy(name, make):
    prog = make()
    args = kernel_args(prog, WSE2, arrivals=False)
    run_kernel(*args)
    kernel_s, ker = best_of(lambda: run_kernel(*args))
    simpy_s, ref = best_of(lambda: run_reference(*args), repeat=1)
    same = ker[0] == ref[0] and all(np.array_equal(a, b) for a, b in zip(ker[2:6], ref[2:6]))
    return {"program": name, "events": int(ker[1]), "kernel_s": kernel_s, "simpy_s": simpy_s,
            "speedup": simpy_s / kernel_s, "identical": bool(same),
            "makespan_cycles": int(ker[2].max()), "simpy_makespan_cycles": int(ref[2].max())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small meshes only (CI)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--layers", default=None,
                        help="whole-layer region sides, comma separated (default 124; none "
                             "with --small)")
    opts = parser.parse_args(argv)

    gemv_sizes = (16, 64) if opts.small else (16, 64, 128, 256, 360, 480, 600)
    gemm_sizes = (8, 16) if opts.small else (16, 32, 64, 128)
    simpy_sizes = (16,) if opts.small else (64, 128)
    rows = []
    for p in gemv_sizes:
        rows.append(bench_kernel(f"meshgemv [1,8192]x[8192,8192] on {p}x{p}",
                                 lambda p=p: lower_gemv(1, 8192, 8192, p, p)))
    for p in gemm_sizes:
        rows.append(bench_kernel(f"meshgemm [2048]^3 on {p}x{p}",
                                 lambda p=p: lower_gemm(2048, 2048, 2048, p, p)))
    layers = opts.layers if opts.layers is not None else ("" if opts.small else "124")
    for side in (int(v) for v in layers.split(",") if v):
        rows.append(bench_kernel(f"llama3-8b 2 layers, regions {side}x{side}",
                                 lambda side=side: layer_program(side)))
    ratios = []
    for p in simpy_sizes:
        ratios.append(bench_simpy(f"meshgemv [1,8192]x[8192,8192] on {p}x{p}",
                                  lambda p=p: lower_gemv(1, 8192, 8192, p, p)))
        ratios.append(bench_simpy(f"meshgemm [2048]^3 on {p // 4}x{p // 4}",
                                  lambda p=p: lower_gemm(2048, 2048, 2048, p // 4, p // 4)))
    if opts.json:
        print(json.dumps({"kernel": rows, "simpy": ratios}))
    else:
        print(f"{'program':44} {'messages':>10} {'events':>11} {'build s':>8} {'kernel s':>9} "
              f"{'Mevents/s':>10}")
        for r in rows:
            print(f"{r['program']:44} {r['messages']:10,} {r['events']:11,} {r['build_s']:8.2f} "
                  f"{r['kernel_s']:9.3f} {r['events_per_s'] / 1e6:10.1f}")
        print(f"\n{'program (Numba vs SimPy twin)':44} {'events':>11} {'Numba s':>9} "
              f"{'SimPy s':>9} {'speed-up':>9} identical")
        for r in ratios:
            print(f"{r['program']:44} {r['events']:11,} {r['kernel_s']:9.4f} "
                  f"{r['simpy_s']:9.2f} {r['speedup']:8.0f}x {r['identical']}")
    if not all(r["identical"] for r in ratios):
        print("error: the Numba engine and the SimPy twin disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
