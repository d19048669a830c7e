"""Simulated WSE-2 GEMV and GEMM times at LLaMA-3-8B and LLaMA-2-13B weight shapes, per
algorithm, beside the A100 time the same shapes take at its achievable memory bandwidth or
matrix rate (wafersim.baseline's A100 spec), and WaferLLM's microbenchmark shapes.

    python benchmarks/validation_ops.py            # the tables in docs/validation.md
    python benchmarks/validation_ops.py --small    # a quick run on small grids

Nothing is tuned: the wafer side uses the WSE2 preset as cited in docs/hardware.md, the GPU side
the baseline's calibrated A100 spec.
"""

from __future__ import annotations

import argparse
import json

from compiler.algorithms.meshgemm import GEMM_ALGOS, lower_gemm
from compiler.algorithms.meshgemv import GEMV_ALGOS, lower_gemv
from compiler.targets import WSE2
from models import load_model
from wafersim.baseline.gpus import get_gpu
from wafersim.simulate import simulate


def weight_shapes(name: str) -> list[tuple[str, int, int]]:
    """(label, K, N) of the distinct matmul weights of one layer, plus the LM head."""
    cfg = load_model(name)
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    return [("q/o proj", h, h), ("k/v proj", h, kv), ("gate/up proj", h, f),
            ("down proj", f, h), ("lm head", h, cfg.vocab_size)]


def gemv_rows(grid: int, shapes, a100) -> list[dict]:
    rows = []
    for model, label, k, n in shapes:
        a100_s = k * n * 2 / a100.bw_rate
        row = {"model": model, "op": label, "k": k, "n": n, "grid": f"{grid}x{grid}",
               "a100_us": a100_s * 1e6}
        for algo in GEMV_ALGOS:
            res = simulate(lower_gemv(1, k, n, grid, grid, algo, target=WSE2), WSE2)
            row[f"{algo}_us"] = res.makespan_s * 1e6
            row[f"{algo}_busy"] = res.fractions()["busy"]
        row["speedup_vs_a100"] = a100_s * 1e6 / row["meshgemv_us"]
        rows.append(row)
    return rows


def gemm_rows(grid: int, m: int, shapes, a100) -> list[dict]:
    rows = []
    for model, label, k, n in shapes:
        a100_s = max(2 * m * k * n / a100.flops_rate("bf16"),
                     (m * k + k * n + m * n) * 2 / a100.bw_rate)
        row = {"model": model, "op": label, "m": m, "k": k, "n": n, "grid": f"{grid}x{grid}",
               "a100_us": a100_s * 1e6}
        for algo in GEMM_ALGOS:
            res = simulate(lower_gemm(m, k, n, grid, grid, algo, target=WSE2), WSE2)
            row[f"{algo}_us"] = res.makespan_s * 1e6
            row[f"{algo}_busy"] = res.fractions()["busy"]
        row["speedup_vs_a100"] = a100_s * 1e6 / row["meshgemm_us"]
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--json", action="store_true")
    opts = parser.parse_args(argv)
    a100 = get_gpu("a100")
    models = ("llama3-8b", "llama2-13b")
    shapes = [(m, *s) for m in models for s in weight_shapes(m)]
    gemv_grid, gemm_grid, m = (128, 64, 256) if opts.small else (360, 128, 2048)
    if opts.small:
        shapes = shapes[:2]
    out = {
        "a100": {"bw_Bps": a100.bw_rate, "bf16_flops": a100.flops_rate("bf16")},
        "gemv": gemv_rows(gemv_grid, shapes, a100),
        "gemv_waferllm": gemv_rows(128 if opts.small else 360,
                                   [("waferllm", "16K", 16384, 16384),
                                               ("waferllm", "32K", 32768, 32768)]
                                   [: 1 if opts.small else 2], a100),
        "gemm": gemm_rows(gemm_grid, m, [s for s in shapes if s[1] != "lm head"], a100),
    }
    if not opts.small:
        out["gemv_waferllm_720"] = gemv_rows(720, [("waferllm", "16K", 16384, 16384),
                                                   ("waferllm", "32K", 32768, 32768)], a100)
    if opts.json:
        print(json.dumps(out))
        return
    for key in [k for k in out if k.startswith("gemv")]:
        print(f"\n{key}: time in us (busy fraction of cores); A100 = weights / achievable BW")
        print("| model | op | K x N | grid | MeshGEMV | ring | A100 | A100 / MeshGEMV |")
        print("|---|---|---|---|---|---|---|---|")
        for r in out[key]:
            print(f"| {r['model']} | {r['op']} | {r['k']} x {r['n']} | {r['grid']} | "
                  f"{r['meshgemv_us']:.2f} ({r['meshgemv_busy']:.0%}) | "
                  f"{r['ring_us']:.2f} ({r['ring_busy']:.0%}) | {r['a100_us']:.1f} | "
                  f"{r['speedup_vs_a100']:.0f}x |")
    print(f"\ngemm: [{m}, K] x [K, N], time in us (busy); A100 = roofline at achievable rates")
    print("| model | op | K x N | grid | MeshGEMM | Cannon | SUMMA | A100 | A100 / MeshGEMM |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out["gemm"]:
        print(f"| {r['model']} | {r['op']} | {r['k']} x {r['n']} | {r['grid']} | "
              f"{r['meshgemm_us']:.1f} ({r['meshgemm_busy']:.0%}) | "
              f"{r['cannon_us']:.1f} ({r['cannon_busy']:.0%}) | "
              f"{r['summa_us']:.1f} ({r['summa_busy']:.0%}) | {r['a100_us']:.1f} | "
              f"{r['speedup_vs_a100']:.1f}x |")


if __name__ == "__main__":
    main()
