"""Per-kernel time models fitted to kernel microbenchmarks (benchmarks/gpu/measure_kernels.py).

The plain roofline in costs.kernel_time_s charges every kernel its FLOPs or bytes at one
achievable rate. The microbenchmarks show where that is wrong for the kernels the measured
LLaMA runs, so a GPU whose `GPUSpec.kernels` holds a `KernelModels` is charged by these forms
instead (each time is per kernel inside a CUDA graph, the graph gap included):

- matmuls (gemv/gemm/lm_head): the roofline time times eta(m, k, n), the measured time over
  the roofline time at the microbenchmarked shapes, interpolated linearly in log2(m) between
  the measured m of the same [k, n] and held at the end values outside them; eta = 1 for a
  [k, n] that was not measured (a tensor-parallel shard, another model).
- decode attention bmm (attn_score / attn_value with one query row per sequence): cuBLAS runs
  one small matrix per (sequence, KV head); with few of them the chip is not filled, so
  t = fixed + bytes / (peak_bw * min(bw_frac, units * unit_frac)), units = batch x KV heads
  on this GPU: each matrix streams at most unit_frac of the peak bandwidth.
- softmax over cols (the scores of one query row): PyTorch runs a warp-per-row kernel for
  cols <= softmax_warp_max_cols, whose time grows with cols, slowly with the rows:
  t = fixed + max(cols * (s_col + s_col_lnrow * ln(rows)), bytes / (peak_bw * bw_frac)),
  and a block-per-row kernel above: t = fixed + bytes / (peak_bw * frac).
- flash attention (prefill): t = fixed + flops / (peak_flops * frac) + qo_elems * s_qo,
  qo_elems = query rows x heads x head_dim (the per-row work: Q in, O out, rescaling).
- streaming elementwise kernels (rmsnorm, rope, activation, mul, add, embedding):
  t = fixed + bytes / (peak_bw * frac) per kind. The measured RoPE is one kernel for q and k
  (and the KV-cache write); the graph's two rope ops share its fixed cost half and half.
- sample (argmax over the vocabulary): one block per row, t = fixed + cols * s_col.

Kinds with no model here (layernorm, prefill attention without flash) keep the roofline.
GPUs that were not measured borrow the H100's KernelModels (fractions of their own peaks,
the fixed costs in seconds), as they borrow its achievable fractions.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

STREAM_KINDS = ("rmsnorm", "rope", "activation", "mul", "add", "embedding")


@dataclass(frozen=True)
class KernelModels:
    """Fitted constants of one GPU's kernel models (module docstring for the forms).

    `matmul_eta` maps (k, n) to ((m, eta), ...) sorted by m; `stream` maps a kind to
    (fixed_s, bw_frac). Every number is fitted by benchmarks/gpu/calibrate.py from the kernel
    microbenchmarks named in `source`; none from an end-to-end step.
    """

    source: str
    score_fixed_s: float
    score_unit_frac: float
    value_fixed_s: float
    value_unit_frac: float
    softmax_warp_max_cols: int
    softmax_warp_fixed_s: float
    softmax_warp_s_per_col: float
    softmax_warp_s_per_col_lnrow: float
    softmax_block_fixed_s: float
    softmax_block_bw_frac: float
    flash_fixed_s: float
    flash_flops_frac: float
    flash_s_per_qo_elem: float
    sample_fixed_s: float
    sample_s_per_col: float
    stream: dict = field(hash=False, default_factory=dict)
    matmul_eta: dict = field(hash=False, default_factory=dict)


# --------------------------------------------------------------------------- the forms
def decode_bmm_s(nbytes: float, units: int, peak_bw: float, bw_frac: float, fixed_s: float,
                 unit_frac: float) -> float:
    """A batched matmul over `units` small matrices, streaming `nbytes`."""
    return fixed_s + nbytes / (peak_bw * min(bw_frac, units * unit_frac))


def softmax_s(rows: int, cols: int, nbytes: float, peak_bw: float, bw_frac: float,
              km: KernelModels) -> float:
    """Softmax of `rows` rows of `cols` scores (one kernel)."""
    if cols <= km.softmax_warp_max_cols:
        per_col = km.softmax_warp_s_per_col + km.softmax_warp_s_per_col_lnrow * math.log(
            max(rows, 1))
        return km.softmax_warp_fixed_s + max(cols * per_col, nbytes / (peak_bw * bw_frac))
    return km.softmax_block_fixed_s + nbytes / (peak_bw * km.softmax_block_bw_frac)


def flash_s(flops: float, qo_elems: float, peak_flops: float, km: KernelModels) -> float:
    return (km.flash_fixed_s + flops / (peak_flops * km.flash_flops_frac)
            + qo_elems * km.flash_s_per_qo_elem)


def stream_s(nbytes: float, peak_bw: float, fixed_s: float, bw_frac: float) -> float:
    return fixed_s + nbytes / (peak_bw * bw_frac)


def sample_s(cols: int, km: KernelModels) -> float:
    return km.sample_fixed_s + cols * km.sample_s_per_col


def matmul_eta(km: KernelModels, m: int, k: int, n: int) -> float:
    """Measured over roofline time at [m, k] x [k, n], interpolated in log2(m)."""
    pts = km.matmul_eta.get((k, n))
    if not pts:
        return 1.0
    ms = [p[0] for p in pts]
    i = bisect.bisect_left(ms, m)
    if i < len(ms) and ms[i] == m:
        return pts[i][1]
    if i == 0:
        return pts[0][1]
    if i == len(ms):
        return pts[-1][1]
    (m0, e0), (m1, e1) = pts[i - 1], pts[i]
    w = (math.log2(m) - math.log2(m0)) / (math.log2(m1) - math.log2(m0))
    return e0 + w * (e1 - e0)
