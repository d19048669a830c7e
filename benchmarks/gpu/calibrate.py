"""Fit the GPU baseline's achievable fractions and overheads to the microbenchmarks.

Reads a JSONL file written by measure_single.py and uses ONLY its microbenchmarks (copy,
GEMV, GEMM, eager launch, CUDA-graph launch); the end-to-end decode/prefill points are left
for validate.py.  The fits:

- GEMV: t = bytes / BW + c over every GEMV point, least squares on relative error.
  achievable_bw_frac = BW / datasheet bandwidth; c is the fixed cost of one cuBLAS call in a
  CUDA graph (its launch gap, ramp-up and tail, and the split-K reduction kernel it sometimes
  adds), so matmul_overhead_s = c - graph_kernel_overhead_s.
- GEMM: t = flops / R + c with c from the GEMV fit, over the compute-bound points (closed-form
  least squares on relative error); achievable_flops_frac = R / datasheet bf16 rate.
- graph_kernel_overhead_s: replay time per kernel of a CUDA graph of 2000 one-element adds.
- kernel_overhead_s: time per kernel of 2000 eager one-element adds issued back to back.

    python benchmarks/gpu/calibrate.py benchmarks/gpu/results/h100.jsonl --peak-bw 3.35e12
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _fit_line(x: list[float], t: list[float]) -> tuple[float, float]:
    """(a, c) minimising sum(((a*x + c) - t) / t)^2."""
    sxx = sum((xi / ti) ** 2 for xi, ti in zip(x, t, strict=True))
    sx1 = sum(xi / ti**2 for xi, ti in zip(x, t, strict=True))
    s11 = sum(1 / ti**2 for ti in t)
    sx = sum(xi / ti for xi, ti in zip(x, t, strict=True))
    s1 = sum(1 / ti for ti in t)
    det = sxx * s11 - sx1 * sx1
    return (sx * s11 - s1 * sx1) / det, (sxx * s1 - sx1 * sx) / det


def calibrate(records: list[dict], peak_bw_Bps: float, peak_flops: float) -> dict:
    gemv = [r for r in records if r["kind"] == "gemv"]
    a, c = _fit_line([r["bytes"] for r in gemv], [r["median_s"] for r in gemv])
    bw = 1.0 / a
    gemm = [r for r in records if r["kind"] == "gemm"]
    bound = [r for r in gemm if r["flops"] / (0.7 * peak_flops) > r["bytes"] / bw]
    num = sum(r["flops"] / r["median_s"] * (r["median_s"] - c) / r["median_s"] for r in bound)
    den = sum((r["flops"] / r["median_s"]) ** 2 for r in bound)
    rate = den / num
    graph = next(r for r in records if r["kind"] == "graph_launch"
                 and r["shape"]["kernel"].startswith("add_"))["median_s"]
    eager = next(r for r in records if r["kind"] == "launch")["median_s"]
    copy = max(r["bw_Bps"] for r in records if r["kind"] == "copy")
    gpu = records[0]["gpu"]
    return {
        "gpu": gpu,
        "gemv_bw_Bps": bw,
        "achievable_bw_frac": bw / peak_bw_Bps,
        "copy_bw_Bps": copy,
        "copy_bw_frac": copy / peak_bw_Bps,
        "gemm_flops": rate,
        "achievable_flops_frac": rate / peak_flops,
        "matmul_fixed_s": c,
        "graph_kernel_overhead_s": graph,
        "matmul_overhead_s": c - graph,
        "kernel_overhead_s": eager,
        "gemv_points": len(gemv),
        "gemm_points": len(bound),
        "gemv_fit_max_rel_err": max(abs(a * r["bytes"] + c - r["median_s"]) / r["median_s"]
                                    for r in gemv),
        "gemv_fit_median_rel_err": statistics.median(
            abs(a * r["bytes"] + c - r["median_s"]) / r["median_s"] for r in gemv),
        "gemm_fit_max_rel_err": max(abs(r["flops"] / rate + c - r["median_s"]) / r["median_s"]
                                    for r in bound),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl")
    ap.add_argument("--peak-bw", type=float, required=True, help="datasheet HBM bytes/s")
    ap.add_argument("--peak-flops", type=float, default=989e12, help="datasheet bf16 FLOP/s")
    args = ap.parse_args()
    out = calibrate(load(args.jsonl), args.peak_bw, args.peak_flops)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
