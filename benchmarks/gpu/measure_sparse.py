"""What sparse activations (TwELL-style) and fast feed-forward trees cost on one GPU: the
measurements docs/efficiency.md sets beside the baseline's sparse down projection and FFF ops.

One JSON object per measurement (a line each) to ``--out``, written as it goes; a section that
fails writes its error and the run goes on. Random data, nothing downloaded. Sections:

1. ``ell_down``: LLaMA-3-8B's down projection at batch 1 on packed activations, y[4096] =
   sum over the active neurons e of a[e] * W[e, :], W [14336, 4096] bf16, the active neurons a
   seeded draw at density rho. A Triton kernel reads (int32 index, bf16 value) pairs and
   gathers the active weight rows (each program a BLOCK_N slice of y over a run of entries,
   fp32 atomics across runs); the best of a few configurations is reported, with the others.
   The dense product x @ W (cuBLAS) is the reference, and the same kernel at rho = 1 its
   control. ``row_bytes`` counts the weight rows read.
2. ``fff``: fast feed-forward trees of depth 11 and 7 over d = 4096 (UltraFastBERT-1x11's
   4,095 neurons at LLaMA-3-8B's width): one Triton program per token descends the tree, level
   after level (load a node's input row, dot, SiLU, add its output row, pick the child by the
   sign), against LLaMA-3-8B's dense SwiGLU MLP at the same batch (three cuBLAS GEMVs, SiLU,
   multiply).

Times are triton.testing.do_bench means (L2 cleared before each call). Every kernel is
checked against a torch reference first.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from measure_quant import bench, emit  # the same timing and JSON lines as the quant run

D, FFN = 4096, 14336


@triton.jit
def _ell(idx_ptr, val_ptr, w_ptr, y_ptr, nnz, N, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
         E_PER_SPLIT: tl.constexpr):
    """y[cols] += sum over this program's entries e of val[e] * W[idx[e], cols]."""
    pid_n, pid_e = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for j in range(0, E_PER_SPLIT, BLOCK_E):
        e = pid_e * E_PER_SPLIT + j + tl.arange(0, BLOCK_E)
        m = e < nnz
        r = tl.load(idx_ptr + e, mask=m, other=0).to(tl.int64)
        v = tl.load(val_ptr + e, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + r[:, None] * N + cols[None, :],
                    mask=m[:, None] & (cols[None, :] < N), other=0.0).to(tl.float32)
        acc += tl.sum(w * v[:, None], axis=0)
    tl.atomic_add(y_ptr + cols, acc, mask=cols < N)


def ell_down(idx, val, w, y, cfg):
    block_n, block_e, per = cfg
    nnz, n = idx.numel(), w.shape[1]
    y.zero_()
    grid = (triton.cdiv(n, block_n), triton.cdiv(nnz, per))
    _ell[grid](idx, val, w, y, nnz, n, BLOCK_N=block_n, BLOCK_E=block_e, E_PER_SPLIT=per)
    return y


@triton.jit
def _fff(x_ptr, win_ptr, wout_ptr, y_ptr, D: tl.constexpr, DEPTH: tl.constexpr):
    """Token t's descent: z = x . w_in[node], y += silu(z) * w_out[node], node -> child."""
    t = tl.program_id(0)
    cols = tl.arange(0, D)
    x = tl.load(x_ptr + t * D + cols).to(tl.float32)
    y = tl.zeros((D,), tl.float32)
    node = t * 0
    for _ in range(DEPTH + 1):
        w = tl.load(win_ptr + node * D + cols).to(tl.float32)
        z = tl.sum(x * w, axis=0)
        g = z / (1.0 + tl.exp(-z))
        y += g * tl.load(wout_ptr + node * D + cols).to(tl.float32)
        node = 2 * node + 1 + (z >= 0).to(tl.int32)
    tl.store(y_ptr + t * D + cols, y)


def fff(x, w_in, w_out, y, depth, warps):
    _fff[(x.shape[0],)](x, w_in, w_out, y, D=x.shape[1], DEPTH=depth, num_warps=warps)
    return y


def fff_reference(x, w_in, w_out, depth):
    node = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    y = torch.zeros_like(x, dtype=torch.float32)
    for _ in range(depth + 1):
        z = (x.float() * w_in[node].float()).sum(-1)
        y += F.silu(z)[:, None] * w_out[node].float()
        node = 2 * node + 1 + (z >= 0).long()
    return y


def ell_section(out) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(FFN, D, device="cuda", dtype=torch.bfloat16, generator=g) / FFN ** 0.5
    a = torch.randn(FFN, device="cuda", dtype=torch.bfloat16, generator=g)
    dense = bench(lambda: torch.matmul(a[None], w))
    emit(out, dict(section="ell_down", kernel="cublas_dense", k=FFN, n=D, s=dense,
                   bytes=FFN * D * 2, tb_s=FFN * D * 2 / dense / 1e12))
    configs = [(64, 16, 64), (128, 16, 64), (256, 16, 64), (128, 16, 128), (64, 8, 32),
               (128, 32, 256), (64, 16, 16), (128, 8, 16)]
    for rho in (1.0, 0.5, 0.1, 0.01):
        active = torch.rand(FFN, device="cuda", generator=g) < rho
        idx = torch.nonzero(active).flatten().to(torch.int32)
        val = a[idx.long()]
        y = torch.empty(D, device="cuda", dtype=torch.float32)
        want = (a.float() * active)[None] @ w.float()
        got = ell_down(idx, val, w, y, configs[0])
        err = float((got - want[0]).abs().max() / want.abs().max())
        times = {}
        for cfg in configs:
            times[str(cfg)] = bench(partial(ell_down, idx, val, w, y, cfg))
        best = min(times, key=times.get)
        nnz = idx.numel()
        emit(out, dict(section="ell_down", kernel="triton_ell", rho=rho, nnz=nnz, k=FFN, n=D,
                       s=times[best], config=best, all=times, rel_err=err,
                       row_bytes=nnz * D * 2, tb_s=nnz * D * 2 / times[best] / 1e12,
                       over_dense=times[best] / dense))


def fff_section(out) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    mats = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=g) / k ** 0.5
            for k, n in ((D, FFN), (D, FFN), (FFN, D))]

    def mlp(x):
        return torch.matmul(F.silu(torch.matmul(x, mats[0])) * torch.matmul(x, mats[1]), mats[2])

    for batch in (1, 8):
        x = torch.randn(batch, D, device="cuda", dtype=torch.bfloat16, generator=g)
        dense = bench(lambda x=x: mlp(x))
        emit(out, dict(section="fff", kernel="dense_swiglu_mlp", batch=batch, s=dense,
                       bytes=3 * D * FFN * 2))
        for depth in (11, 7):
            nodes = 2 ** (depth + 1) - 1
            w_in, w_out = (torch.randn(nodes, D, device="cuda", dtype=torch.bfloat16,
                                       generator=g) / s for s in (D ** 0.5, 8))
            y = torch.empty(batch, D, device="cuda", dtype=torch.float32)
            want = fff_reference(x, w_in, w_out, depth)
            times = {}
            for warps in (4, 8, 16):
                got = fff(x, w_in, w_out, y, depth, warps)
                err = float((got - want).abs().max() / want.abs().max())
                times[warps] = bench(partial(fff, x, w_in, w_out, y, depth, warps))
            best = min(times, key=times.get)
            emit(out, dict(section="fff", kernel="triton_fff", batch=batch, depth=depth,
                           nodes=nodes, s=times[best], warps=best, all=times, rel_err=err,
                           row_bytes=batch * (depth + 1) * 2 * D * 2,
                           over_dense=times[best] / dense))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="h100_sparse.jsonl")
    args = p.parse_args()
    with open(args.out, "w") as out:
        emit(out, dict(section="env", torch=torch.__version__, triton=triton.__version__,
                       device=torch.cuda.get_device_name(), time=time.time()))
        for section in (ell_section, fff_section):
            try:
                section(out)
            except Exception as exc:  # record it and go on with the next section
                emit(out, dict(section=section.__name__, error=repr(exc),
                               trace=traceback.format_exc()[-2000:]))
                print(traceback.format_exc(), file=sys.stderr)


if __name__ == "__main__":
    main()
