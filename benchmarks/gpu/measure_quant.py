"""What quantised and 2:4-pruned weights buy on one GPU: the figures behind the baseline's
quantisation and pruning (wafersim.baseline.quant, docs/efficiency.md).

One JSON object per measurement (a line each) to ``--out``, written as it goes; a section that
fails writes its error and the run goes on. Random data, nothing downloaded. Sections:

1. ``gemv``: y[1, N] = x[1, K] @ W at LLaMA shapes, W stored as bf16 (cuBLAS ``F.linear``, and
   the Triton kernel below on bf16 weights as its control), int8 and fp8 (e4m3) with one fp16
   scale per 128 rows of K per column (the Triton kernel: each program loads a [128, BLOCK_N]
   tile, converts it to fp32 in registers, dots it with x's 128 values and scales the partial
   sum by the group's scale; split over K with fp32 atomics). ``bytes`` counts the weights and
   scales as stored; the best of a few (BLOCK_N, split) choices is reported, with the others.
2. ``gemm``: fp8 (``torch._scaled_mm``, e4m3 with per-tensor scales, bf16 out), int8
   (``torch._int_mm``, int32 out) and bf16 (``F.linear``) products of 8192^3 and LLaMA-3-8B
   prefill shapes: FLOP/s.
3. ``sparse24``: 2:4 semi-structured weights (``torch.sparse.to_sparse_semi_structured``,
   cuSPARSELt or CUTLASS) against the same dense bf16 ``F.linear`` at m = 16, 128, 4096.

Times are triton.testing.do_bench means (it clears the L2 cache before each call; weights of
16 MB and more).  ``--smoke`` runs tiny shapes on the CPU (TRITON_INTERPRET=1 for the
kernel; sections 2-3 are skipped there) to check the logic and the kernel against a reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

GROUP = 128
GEMV_SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (8192, 28672)]  # (K, N)
GEMM_SHAPES = [(8192, 8192, 8192), (4096, 4096, 14336), (4096, 14336, 4096)]  # (M, K, N)


@triton.jit
def _gemv(x_ptr, w_ptr, s_ptr, y_ptr, K, N, BLOCK_N: tl.constexpr, GROUP_K: tl.constexpr,
          GROUPS_PER_SPLIT: tl.constexpr, SCALED: tl.constexpr):
    """y[n] += sum over this program's K-groups of s[g, n] * sum_k x[k] * W[k, n]."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, GROUP_K)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for j in range(GROUPS_PER_SPLIT):
        g = pid_k * GROUPS_PER_SPLIT + j
        k = g * GROUP_K + rows
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + k[:, None] * N + cols[None, :],
                    mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0).to(tl.float32)
        part = tl.sum(w * x[:, None], axis=0)
        if SCALED:
            s = tl.load(s_ptr + g * N + cols, mask=(cols < N) & (g * GROUP_K < K), other=0.0)
            part = part * s.to(tl.float32)
        acc += part
    tl.atomic_add(y_ptr + cols, acc, mask=cols < N)


def quantise(w: torch.Tensor, kind: str):
    """(stored W [K, N], fp16 scales [K / GROUP, N] or None) with absmax group scales."""
    if kind == "bf16":
        return w.to(torch.bfloat16), None
    top = {"int8": 127.0, "fp8": 448.0}[kind]
    k, n = w.shape
    g = w.float().reshape(k // GROUP, GROUP, n)
    scale = (g.abs().amax(dim=1) / top).clamp(min=1e-8)
    q = g / scale[:, None, :]
    q = q.round().clamp(-top, top).to(torch.int8) if kind == "int8" else \
        q.clamp(-top, top).to(torch.float8_e4m3fn)
    return q.reshape(k, n), scale.to(torch.float16)


def dequantise(q: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    if s is None:
        return q.float()
    k, n = q.shape
    return (q.float().reshape(k // GROUP, GROUP, n) * s.float()[:, None, :]).reshape(k, n)


def triton_gemv(x, q, s, block_n, split):
    k, n = q.shape
    groups = triton.cdiv(k, GROUP)
    y = torch.zeros(n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, block_n), split)
    _gemv[grid](x, q, s if s is not None else q, y, k, n, BLOCK_N=block_n, GROUP_K=GROUP,
                GROUPS_PER_SPLIT=triton.cdiv(groups, split), SCALED=s is not None)
    return y


def bench(fn) -> float:
    """Seconds per call (do_bench's mean, L2 cleared before each call)."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="mean") * 1e-3


def emit(out, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()


def gemv_section(out, dev: str, smoke: bool) -> None:
    shapes = [(256, 192)] if smoke else GEMV_SHAPES
    configs = [(64, 2)] if smoke else [(64, 8), (128, 8), (64, 16), (128, 16), (256, 8)]
    for k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(k, n, device=dev) / k ** 0.5
        x = torch.randn(k, device=dev).to(torch.bfloat16)
        ref = x.float() @ w
        if not smoke:
            wt = w.t().contiguous().to(torch.bfloat16)  # F.linear's [N, K]
            t = bench(partial(F.linear, x[None], wt))
            emit(out, dict(section="gemv", impl="cublas", dtype="bf16", k=k, n=n,
                           bytes=k * n * 2, seconds=t, bytes_per_s=k * n * 2 / t))
            del wt
        for kind in ("bf16", "int8", "fp8"):
            try:
                q, s = quantise(w, kind)
                nbytes = q.numel() * q.element_size() + (0 if s is None else s.numel() * 2)
                err = (triton_gemv(x, q, s, *configs[0]) - x.float() @ dequantise(q, s)).abs()
                rows = []
                for block_n, split in configs:
                    t = bench(partial(triton_gemv, x, q, s, block_n, split)) if not smoke \
                        else 0
                    rows.append((t, block_n, split))
                t, block_n, split = min(rows)
                emit(out, dict(section="gemv", impl="triton", dtype=kind, k=k, n=n,
                               bytes=nbytes, seconds=t, bytes_per_s=nbytes / t if t else None,
                               block_n=block_n, split=split,
                               max_err_vs_dequantised=float(err.max()),
                               quant_err_rel=float((x.float() @ dequantise(q, s) - ref).norm()
                                                   / ref.norm()),
                               tried=[dict(seconds=a, block_n=b, split=c) for a, b, c in rows]))
            except Exception as exc:  # noqa: BLE001 - record it and go on
                emit(out, dict(section="gemv", impl="triton", dtype=kind, k=k, n=n,
                               error=repr(exc)[:300]))


def gemm_section(out, dev: str) -> None:
    for m, k, n in GEMM_SHAPES:
        flops = 2 * m * k * n
        a = torch.randn(m, k, device=dev)
        b = torch.randn(n, k, device=dev)
        one = torch.ones((), device=dev)
        runs = {
            "bf16": partial(F.linear, a.to(torch.bfloat16), b.to(torch.bfloat16)),
            "fp8": partial(torch._scaled_mm, a.to(torch.float8_e4m3fn),
                           b.to(torch.float8_e4m3fn).t(), scale_a=one, scale_b=one,
                           out_dtype=torch.bfloat16),
            "int8": partial(torch._int_mm, a.clamp(-127, 127).to(torch.int8),
                            b.clamp(-127, 127).to(torch.int8).t()),
        }
        for kind, fn in runs.items():
            try:
                fn()
                t = bench(fn)
                emit(out, dict(section="gemm", dtype=kind, m=m, k=k, n=n, flops=flops,
                               seconds=t, flops_per_s=flops / t))
            except Exception as exc:  # noqa: BLE001
                emit(out, dict(section="gemm", dtype=kind, m=m, k=k, n=n, error=repr(exc)[:300]))
        del a, b, runs
        torch.cuda.empty_cache()


def sparse_section(out, dev: str) -> None:
    from torch.sparse import to_sparse_semi_structured

    for m in (16, 128, 4096):
        for k, n in ((4096, 14336), (14336, 4096)):
            try:
                w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
                mask = torch.tensor([1, 1, 0, 0], device=dev, dtype=torch.bool).repeat(n, k // 4)
                w = w * mask
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
                dense = bench(partial(F.linear, x, w))
                ws = to_sparse_semi_structured(w)
                err = (F.linear(x, ws) - F.linear(x, w)).abs().max()
                sparse = bench(partial(F.linear, x, ws))
                emit(out, dict(section="sparse24", m=m, k=k, n=n, dense_seconds=dense,
                               sparse_seconds=sparse, speedup=dense / sparse,
                               flops=2 * m * k * n, max_abs_err=float(err)))
            except Exception as exc:  # noqa: BLE001
                emit(out, dict(section="sparse24", m=m, k=k, n=n, error=repr(exc)[:300]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    t0 = time.time()
    with open(args.out, "w") as out:
        info = dict(section="device", torch=torch.__version__, triton=triton.__version__,
                    interpret=os.environ.get("TRITON_INTERPRET"))
        if dev == "cuda":
            info.update(name=torch.cuda.get_device_name(), sms=torch.cuda.get_device_properties(
                0).multi_processor_count)
        emit(out, info)
        gemv_section(out, dev, args.smoke)
        if not args.smoke:
            for section in (gemm_section, sparse_section):
                try:
                    section(out, dev)
                except Exception as exc:  # noqa: BLE001
                    emit(out, dict(section=section.__name__, error=repr(exc)[:300]))
        emit(out, dict(section="done", wall_s=time.time() - t0))


if __name__ == "__main__":
    sys.exit(main())
