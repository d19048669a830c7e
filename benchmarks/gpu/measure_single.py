"""Single-GPU measurements that calibrate and validate the wafersim GPU baseline.

Writes one JSON object per measurement (a line each) to ``--out`` as it goes, so that a run
stopped early still leaves its results.  Everything is bf16 on random data; nothing is
downloaded.  Sections, in order:

1. ``copy``: device-to-device copy; ``bytes`` counts bytes read plus bytes written.
2. ``gemv``: ``F.linear(x[b, k], W[n, k])`` at LLaMA weight shapes and WaferLLM's 16K/32K,
   for b in 1/8/32, timed as a CUDA graph of many calls rotating over enough weight copies to
   exceed the L2 cache; the time is per call (graph replay time / calls).
3. ``gemm``: square and prefill-shaped ``F.linear``, timed the same way.
4. ``launch`` (eager tiny kernels, back to back) and ``graph_launch`` (a CUDA graph of N tiny
   kernels, replay time / N).
5. ``decode`` / ``prefill``: a minimal LLaMA (below) for LLaMA-3-8B, LLaMA-2-7B, LLaMA-2-13B.

The LLaMA is written so that each op of the wafersim op graph is one kernel: RMSNorm and
RoPE (+ KV-cache write) are small Triton kernels, q/k/v/o and gate/up/down are separate
``F.linear`` calls, SiLU and the gate multiply and each residual add are one elementwise
kernel each.  Decode attention is a plain matmul-softmax-matmul over a preallocated KV cache
(bmm, softmax, bmm; grouped-query heads share K/V through a view, no copy; the 1/sqrt(d)
scale is taken as folded into the random W_q).  Prefill attention is torch SDPA with
``is_causal=True`` (flash attention where available).  The LM head runs on the last token
only, followed by argmax.  Decode is one step for ``batch`` sequences whose cache holds
``ctx`` tokens (the new token's K/V written at position ctx-1), replayed as a CUDA graph.

``--smoke`` runs every section on the CPU with tiny shapes to check the logic (Triton
kernels then run in Triton's interpreter when TRITON_INTERPRET=1, else a torch fallback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without triton
    triton = None

DTYPE = torch.bfloat16
L2_ROTATE_BYTES = 256 * 2**20  # rotate over at least this much weight data per measurement


# --------------------------------------------------------------------------- model configs
@dataclass(frozen=True)
class LlamaShape:
    """The HF config fields that set a LLaMA's shapes (copied from each model's config.json;
    the same numbers as the repo's models/zoo when that exists)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


MODELS = [
    # meta-llama/Meta-Llama-3-8B config.json
    LlamaShape("llama-3-8b", 4096, 14336, 32, 32, 8, 128256),
    # meta-llama/Llama-2-7b-hf config.json
    LlamaShape("llama-2-7b", 4096, 11008, 32, 32, 32, 32000),
    # meta-llama/Llama-2-13b-hf config.json
    LlamaShape("llama-2-13b", 5120, 13824, 40, 40, 40, 32000),
    # meta-llama/Meta-Llama-3-70B config.json, 40 of its 80 layers: the whole model's 141 GB
    # of bf16 weights fit no single GPU; half of it (71 GB) fits one H200 with its caches.
    LlamaShape("llama-3-70b-40l", 8192, 28672, 40, 64, 8, 128256),
]
DEFAULT_MODELS = ("llama-3-8b", "llama-2-7b", "llama-2-13b")
SMOKE_MODEL = LlamaShape("tiny", 64, 160, 2, 4, 2, 256)

GEMV_SHAPES = [  # (in_features k, out_features n): x[b, k] @ W[k, n]
    (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (5120, 5120), (5120, 13824),
    (13824, 5120), (4096, 11008), (11008, 4096), (4096, 128256), (16384, 16384),
    (32768, 32768),
]
GEMM_SQUARE = [2048, 4096, 8192]
GEMM_PREFILL_KN = [
    (4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (5120, 5120), (5120, 13824),
    (13824, 5120), (4096, 11008), (11008, 4096), (4096, 128256),
]


# --------------------------------------------------------------------------- output
class Writer:
    def __init__(self, path: str, gpu: str):
        self.f = open(path, "a")
        self.gpu = gpu

    def __call__(self, kind: str, **fields) -> None:
        rec = {"gpu": self.gpu, "kind": kind, **fields}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        med = fields.get("median_s")
        rate = {k: v for k, v in fields.items() if k.endswith(("_Bps", "_flops", "per_s"))}
        shape = fields.get("shape", fields.get("config", ""))
        med_txt = f"{med * 1e6:12.2f} us" if isinstance(med, float) else ""
        print(f"{kind:14s} {json.dumps(shape):60s} {med_txt} {rate}", flush=True)


# --------------------------------------------------------------------------- timing
def timed(fn, device: torch.device, reps: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn``: CUDA events on a GPU (synchronised before each repeat, so
    the time includes launching), a host clock on the CPU."""
    for _ in range(warmup):
        fn()
    out = []
    if device.type == "cuda":
        for _ in range(reps):
            torch.cuda.synchronize()
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) * 1e-3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def stats(ts: list[float]) -> dict:
    s = sorted(ts)
    return {
        "median_s": statistics.median(s),
        "p10_s": s[int(0.1 * (len(s) - 1))],
        "p90_s": s[int(0.9 * (len(s) - 1))],
        "reps": len(s),
    }


def as_graph(fn, device: torch.device):
    """Capture ``fn`` in a CUDA graph and return a replay function (``fn`` itself on CPU)."""
    if device.type != "cuda":
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


def rand(shape, device, scale=1.0):
    """Random bf16 data (never zeros: they can run faster than real data)."""
    x = torch.randn(shape, device=device, dtype=DTYPE)
    return x.mul_(scale) if scale != 1.0 else x


def free(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- kernels
USE_TRITON = triton is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)

if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        x = tl.load(x_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n_cols + offs, (x * rstd * w).to(tl.bfloat16), mask=mask)

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, bidx_ptr, pos_ptr,
                           kc_ptr, vc_ptr, n_heads, n_kv, c_sb, c_sh, c_sp,
                           HALF: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs = tl.arange(0, HALF)
        c = tl.load(cos_ptr + t * HALF + offs)
        s = tl.load(sin_ptr + t * HALF + offs)
        if h < n_heads:
            base = q_ptr + (t * n_heads + h) * (2 * HALF)
            x1 = tl.load(base + offs).to(tl.float32)
            x2 = tl.load(base + HALF + offs).to(tl.float32)
            tl.store(base + offs, (x1 * c - x2 * s).to(tl.bfloat16))
            tl.store(base + HALF + offs, (x2 * c + x1 * s).to(tl.bfloat16))
        else:
            hk = h - n_heads
            b = tl.load(bidx_ptr + t).to(tl.int64)
            p = tl.load(pos_ptr + t).to(tl.int64)
            dst = b * c_sb + hk * c_sh + p * c_sp
            src = (t * n_kv + hk) * (2 * HALF)
            x1 = tl.load(k_ptr + src + offs).to(tl.float32)
            x2 = tl.load(k_ptr + src + HALF + offs).to(tl.float32)
            tl.store(kc_ptr + dst + offs, (x1 * c - x2 * s).to(tl.bfloat16))
            tl.store(kc_ptr + dst + HALF + offs, (x2 * c + x1 * s).to(tl.bfloat16))
            full = tl.arange(0, 2 * HALF)
            tl.store(vc_ptr + dst + full, tl.load(v_ptr + src + full))


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    if not USE_TRITON:
        return rmsnorm_ref(x, w, eps)
    y = torch.empty_like(x)
    n = x.shape[-1]
    block = triton.next_power_of_2(n)
    _rmsnorm_kernel[(x.numel() // n,)](x, w, y, n, eps, BLOCK=block, num_warps=8)
    return y


def rmsnorm_ref(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rope_cache(q, k, v, cos, sin, bidx, pos, kc, vc, n_heads, n_kv):
    """Rotate q in place; rotate k and write it with v into the caches kc/vc [B, kv, ctx, d]
    at (bidx[t], :, pos[t]) for every token t.  cos/sin are [T, d/2] float32."""
    half = cos.shape[-1]
    if not USE_TRITON:
        return rope_cache_ref(q, k, v, cos, sin, bidx, pos, kc, vc, n_heads, n_kv)
    t = q.shape[0]
    _rope_cache_kernel[(t, n_heads + n_kv)](
        q, k, v, cos, sin, bidx, pos, kc, vc, n_heads, n_kv,
        kc.stride(0), kc.stride(1), kc.stride(2), HALF=half, num_warps=1,
    )


def _rotate(x, cos, sin):
    half = cos.shape[-1]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope_cache_ref(q, k, v, cos, sin, bidx, pos, kc, vc, n_heads, n_kv):
    t = q.shape[0]
    d = 2 * cos.shape[-1]
    q3 = q.view(t, n_heads, d)
    q3.copy_(_rotate(q3, cos, sin))
    kr = _rotate(k.view(t, n_kv, d), cos, sin)
    b, p = bidx.long(), pos.long()
    kc[b, :, p] = kr
    vc[b, :, p] = v.view(t, n_kv, d)


def check_kernels(device, emit) -> None:
    """Triton kernels against their torch references, on fresh random data."""
    if not USE_TRITON:
        emit("kernel_check", skipped="no triton")
        return
    x, w = rand((7, 320), device), rand((320,), device)
    e_norm = (rmsnorm(x, w).float() - rmsnorm_ref(x, w).float()).norm() / rmsnorm_ref(
        x, w).float().norm()
    t, nh, nkv, d, bsz, ctx = 5, 4, 2, 16, 3, 9
    q, k, v = rand((t, nh * d), device), rand((t, nkv * d), device), rand((t, nkv * d), device)
    ang = torch.rand((t, d // 2), device=device) * 6.0
    cos, sin = ang.cos(), ang.sin()
    bidx = torch.tensor([0, 2, 1, 2, 0], device=device, dtype=torch.int32)
    pos = torch.tensor([3, 8, 0, 1, 5], device=device, dtype=torch.int32)
    kc1, vc1 = rand((bsz, nkv, ctx, d), device), rand((bsz, nkv, ctx, d), device)
    kc2, vc2, q2 = kc1.clone(), vc1.clone(), q.clone()
    rope_cache(q, k, v, cos, sin, bidx, pos, kc1, vc1, nh, nkv)
    rope_cache_ref(q2, k, v, cos, sin, bidx, pos, kc2, vc2, nh, nkv)
    errs = [float((a.float() - b.float()).norm() / b.float().norm())
            for a, b in ((q, q2), (kc1, kc2), (vc1, vc2))]
    emit("kernel_check", rmsnorm_rel_err=float(e_norm), rope_q_rel_err=errs[0],
         rope_k_rel_err=errs[1], cache_v_rel_err=errs[2])
    if max([float(e_norm), *errs]) > 1e-2:
        raise RuntimeError(f"Triton kernels disagree with references: {e_norm}, {errs}")


# --------------------------------------------------------------------------- the LLaMA
class Llama:
    """Random-weight LLaMA in bf16; weights in nn.Linear layout [out, in]."""

    def __init__(self, cfg: LlamaShape, device):
        self.cfg, self.device = cfg, device
        h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.emb = rand((cfg.vocab_size, h), device)
        self.layers = []
        for _ in range(cfg.num_hidden_layers):
            self.layers.append({
                "ln1": 1.0 + rand((h,), device, 0.1), "ln2": 1.0 + rand((h,), device, 0.1),
                "wq": rand((nh * d, h), device, h**-0.5),
                "wk": rand((nkv * d, h), device, h**-0.5),
                "wv": rand((nkv * d, h), device, h**-0.5),
                "wo": rand((h, nh * d), device, (nh * d) ** -0.5),
                "wg": rand((f, h), device, h**-0.5), "wu": rand((f, h), device, h**-0.5),
                "wd": rand((h, f), device, f**-0.5),
            })
        self.ln_f = 1.0 + rand((h,), device, 0.1)
        self.lm_head = rand((cfg.vocab_size, h), device, h**-0.5)
        self.cache = None

    def alloc_cache(self, batch: int, ctx: int) -> None:
        c = self.cfg
        self.cache = rand((c.num_hidden_layers, 2, batch, c.num_key_value_heads, ctx,
                           c.head_dim), self.device, 1.0)

    def step_inputs(self, batch: int, ctx: int, prefill: bool):
        """Static inputs for a decode step (batch tokens at position ctx-1) or a batch-1
        prefill of ctx tokens."""
        dev, d = self.device, self.cfg.head_dim
        t = ctx if prefill else batch
        pos = torch.arange(ctx, device=dev) if prefill else torch.full((batch,), ctx - 1,
                                                                        device=dev)
        bidx = torch.zeros(t, device=dev) if prefill else torch.arange(batch, device=dev)
        inv = 500000.0 ** (-torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)
        ang = pos.float()[:, None] * inv[None, :]
        tokens = torch.randint(0, self.cfg.vocab_size, (t,), device=dev)
        return {"tokens": tokens, "cos": ang.cos().contiguous(), "sin": ang.sin().contiguous(),
                "bidx": bidx.to(torch.int32), "pos": pos.to(torch.int32)}

    def forward(self, inp: dict, prefill: bool) -> torch.Tensor:
        c = self.cfg
        nh, nkv = c.num_attention_heads, c.num_key_value_heads
        h = F.embedding(inp["tokens"], self.emb)
        t = h.shape[0]
        for i, L in enumerate(self.layers):
            kc, vc = self.cache[i, 0], self.cache[i, 1]
            x = rmsnorm(h, L["ln1"])
            q, k, v = F.linear(x, L["wq"]), F.linear(x, L["wk"]), F.linear(x, L["wv"])
            rope_cache(q, k, v, inp["cos"], inp["sin"], inp["bidx"], inp["pos"], kc, vc,
                       nh, nkv)
            a = self.attn_prefill(q, kc, vc) if prefill else self.attn_decode(q, kc, vc)
            h = h + F.linear(a, L["wo"])
            x = rmsnorm(h, L["ln2"])
            m = F.silu(F.linear(x, L["wg"])) * F.linear(x, L["wu"])
            h = h + F.linear(m, L["wd"])
        if prefill:
            h = h[t - 1:]
        logits = F.linear(rmsnorm(h, self.ln_f), self.lm_head)
        return torch.argmax(logits, dim=-1)

    def attn_decode(self, q, kc, vc):
        """Matmul-softmax-matmul over the whole cache (kc, vc: [B, kv, ctx, d])."""
        c = self.cfg
        b, nkv, ctx, d = kc.shape
        g = c.num_attention_heads // nkv
        q3 = q.view(b * nkv, g, d)
        s = torch.bmm(q3, kc.view(b * nkv, ctx, d).transpose(1, 2))
        p = torch.softmax(s, dim=-1)
        return torch.bmm(p, vc.view(b * nkv, ctx, d)).view(b, nkv * g * d)

    sdpa_mode = "flash+gqa"

    def attn_prefill(self, q, kc, vc):
        """Causal SDPA for one sequence of t tokens over kc/vc [1, kv, t, d]."""
        c = self.cfg
        t, d = q.shape[0], c.head_dim
        q4 = q.view(1, t, c.num_attention_heads, d).transpose(1, 2)
        o = self._sdpa(q4, kc, vc)
        return o.transpose(1, 2).reshape(t, c.num_attention_heads * d)

    def _sdpa(self, q4, kc, vc):
        g = q4.shape[1] // kc.shape[1]
        if Llama.sdpa_mode == "flash+gqa":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            backends = [SDPBackend.FLASH_ATTENTION] if q4.is_cuda else [SDPBackend.MATH]
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q4, kc, vc, is_causal=True,
                                                      enable_gqa=g > 1)
        if g > 1:
            kc, vc = kc.repeat_interleave(g, dim=1), vc.repeat_interleave(g, dim=1)
        return F.scaled_dot_product_attention(q4, kc, vc, is_causal=True)


def reference_forward(model: Llama, inp: dict, prefill: bool) -> torch.Tensor:
    """Plain float32 LLaMA (HF formulas) on the same weights and cache, for the smoke check."""
    c = model.cfg
    nh, nkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    h = model.emb[inp["tokens"].long()].float()
    t = h.shape[0]
    pos = inp["pos"].long()
    for i, L in enumerate(model.layers):
        kc, vc = model.cache[i, 0].float(), model.cache[i, 1].float()
        x = rmsnorm_ref(h, L["ln1"].float())
        q = (x @ L["wq"].float().T).view(t, nh, d)
        k = (x @ L["wk"].float().T).view(t, nkv, d)
        v = (x @ L["wv"].float().T).view(t, nkv, d)
        q, k = _rotate(q, inp["cos"], inp["sin"]), _rotate(k, inp["cos"], inp["sin"])
        b = inp["bidx"].long()
        kc[b, :, pos], vc[b, :, pos] = k, v
        kr = kc.repeat_interleave(nh // nkv, dim=1)
        vr = vc.repeat_interleave(nh // nkv, dim=1)
        if prefill:
            s = torch.einsum("thd,hsd->hts", q, kr[0]) / math.sqrt(d)
            s = s.masked_fill(torch.ones(t, t).triu(1).bool()[None], float("-inf"))
            a = torch.einsum("hts,hsd->thd", s.softmax(-1), vr[0])
        else:
            s = torch.einsum("bhd,bhsd->bhs", q, kr)
            a = torch.einsum("bhs,bhsd->bhd", s.softmax(-1), vr)
        h = h + a.reshape(t, nh * d) @ L["wo"].float().T
        x = rmsnorm_ref(h, L["ln2"].float())
        m = F.silu(x @ L["wg"].float().T) * (x @ L["wu"].float().T)
        h = h + m @ L["wd"].float().T
    if prefill:
        h = h[t - 1:]
    return (rmsnorm_ref(h, model.ln_f.float()) @ model.lm_head.float().T)


# --------------------------------------------------------------------------- sections
def bench_copy(device, emit, smoke):
    sizes = [2**20] if smoke else [256 * 2**20, 2**30, 4 * 2**30]
    for n in sizes:
        src = torch.empty(n // 2, dtype=DTYPE, device=device).normal_()
        dst = torch.empty_like(src)
        ts = timed(lambda src=src, dst=dst: dst.copy_(src), device, reps=5 if smoke else 30,
                   warmup=3)
        st = stats(ts)
        emit("copy", shape={"src_bytes": n}, bytes=2 * n, bytes_note="read + write",
             bw_Bps=2 * n / st["median_s"], **st)
        src = dst = None
        free(device)


def _rotating(make, nbytes_each, device, smoke):
    copies = 1 if smoke else max(1, math.ceil(L2_ROTATE_BYTES / nbytes_each))
    return [make() for _ in range(copies)]


def bench_linear(kind, m, k, n, device, emit, smoke, target_s):
    """F.linear(x[m, k], W[n, k]) timed per call inside a CUDA graph of many calls."""
    w_bytes = n * k * 2
    ws = _rotating(lambda: rand((n, k), device, k**-0.5), w_bytes, device, smoke)
    xs = [rand((m, k), device) for _ in range(2)]
    flops = 2.0 * m * n * k
    est = max(flops / 7e14, (w_bytes + 2 * m * (n + k)) / 3e12, 4e-6)
    calls = 3 if smoke else int(min(200, max(len(ws), 10, math.ceil(target_s / est))))

    def body():
        for i in range(calls):
            F.linear(xs[i % 2], ws[i % len(ws)])

    replay = as_graph(body, device)
    ts = [t / calls for t in timed(replay, device, reps=5 if smoke else 20, warmup=2)]
    st = stats(ts)
    nbytes = w_bytes + 2 * m * k + 2 * m * n
    emit(kind, shape={"m": m, "k": k, "n": n}, calls_per_graph=calls, weight_copies=len(ws),
         flops=flops, bytes=nbytes, bw_Bps=nbytes / st["median_s"],
         rate_flops=flops / st["median_s"], **st)
    ws = xs = replay = None
    free(device)


def bench_gemv(device, emit, smoke):
    shapes = [(64, 32), (32, 96)] if smoke else GEMV_SHAPES
    for k, n in shapes:
        for b in (1, 8, 32):
            bench_linear("gemv", b, k, n, device, emit, smoke, target_s=2e-3)


def bench_gemm(device, emit, smoke):
    if smoke:
        cases = [(64, 64, 64), (32, 64, 96)]
    else:
        cases = [(s, s, s) for s in GEMM_SQUARE]
        cases += [(m, k, n) for m in (512, 2048) for k, n in GEMM_PREFILL_KN]
    for m, k, n in cases:
        bench_linear("gemm", m, k, n, device, emit, smoke, target_s=3e-3)


def bench_launch(device, emit, smoke):
    n = 50 if smoke else 2000
    x = torch.zeros(1, device=device, dtype=torch.float32).normal_()

    def body():
        for _ in range(n):
            x.add_(1.0)

    st = stats([t / n for t in timed(body, device, reps=5 if smoke else 11, warmup=1)])
    emit("launch", shape={"kernel": "add_ 1 element", "kernels": n}, note="eager, back to back",
         kernels_per_s=1.0 / st["median_s"], **st)
    replay = as_graph(body, device)
    st = stats([t / n for t in timed(replay, device, reps=5 if smoke else 11, warmup=2)])
    emit("graph_launch", shape={"kernel": "add_ 1 element", "kernels": n},
         note="CUDA graph of N kernels, replay time / N", kernels_per_s=1.0 / st["median_s"],
         **st)
    xs, w = rand((1, 64), device), rand((64, 64), device)

    def body2():
        for _ in range(n):
            F.linear(xs, w)

    replay = as_graph(body2, device)
    st = stats([t / n for t in timed(replay, device, reps=5 if smoke else 11, warmup=2)])
    emit("graph_launch", shape={"kernel": "linear [1,64]x[64,64]", "kernels": n},
         note="CUDA graph of N tiny GEMVs, replay time / N",
         kernels_per_s=1.0 / st["median_s"], **st)
    replay = None
    free(device)


def count_kernels(fn, device) -> dict:
    """Kernels launched by one eager call of ``fn``, through the profiler."""
    if device.type != "cuda":
        return {}
    try:
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()
                 if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        top = Counter(n[:80] for n in names).most_common(25)
        return {"kernels": len(names), "top_kernels": top}
    except Exception as exc:  # profiler trouble must not lose the timings
        return {"kernel_count_error": repr(exc)[:200]}


def bench_model(cfg, device, emit, smoke, ctxs=(512, 2048), seqs=(512, 2048)):
    t0 = time.perf_counter()
    model = Llama(cfg, device)
    wbytes = sum(t.numel() * 2 for L in model.layers for t in L.values())
    wbytes += (model.emb.numel() + model.lm_head.numel() + model.ln_f.numel()) * 2
    emit("model_init", config=asdict(cfg), weight_bytes=wbytes,
         init_s=time.perf_counter() - t0)
    dec_reps, pre_reps = (3, 2) if smoke else (30, 10)
    batches, ctxs = ((1, 2), (8, 16)) if smoke else ((1, 8, 32), ctxs)
    for ctx in ctxs:
        for b in batches:
            conf = {"model": cfg.name, "batch": b, "ctx": ctx, "attention": "bmm-softmax-bmm",
                    "cuda_graph": device.type == "cuda"}
            try:
                model.alloc_cache(b, ctx)
                inp = model.step_inputs(b, ctx, prefill=False)
                if smoke:
                    ref = reference_forward(model, inp, prefill=False)
                replay = as_graph(lambda inp=inp: model.forward(inp, False), device)
                st = stats(timed(replay, device, reps=dec_reps, warmup=5))
                extra = {}
                if smoke:
                    got = model.forward(inp, False)
                    extra["argmax_matches_fp32_ref"] = bool((got == ref.argmax(-1)).all())
                emit("decode", config=conf, kv_cache_bytes=model.cache.numel() * 2,
                     tokens_per_s=b / st["median_s"], **extra, **st)
                if b == 1 and ctx == ctxs[0]:
                    eager = stats(timed(lambda inp=inp: model.forward(inp, False), device,
                                        reps=dec_reps, warmup=3))
                    kc = count_kernels(lambda inp=inp: model.forward(inp, False), device)
                    emit("decode_eager", config={**conf, "cuda_graph": False},
                         tokens_per_s=b / eager["median_s"], **kc, **eager)
                replay = None
            except Exception as exc:  # record and go on: OOM is itself a finding
                emit("decode", config=conf, oom=isinstance(exc, torch.OutOfMemoryError),
                     error=str(exc)[:300])
            model.cache = None
            free(device)
    for seq in ((8, 16) if smoke else seqs):
        conf = {"model": cfg.name, "batch": 1, "seq_len": seq, "attention": "sdpa causal",
                "lm_head": "last token", "cuda_graph": device.type == "cuda"}
        try:
            model.alloc_cache(1, seq)
            inp = model.step_inputs(1, seq, prefill=True)
            def fwd(inp=inp):
                return model.forward(inp, True)

            try:
                fwd()
            except RuntimeError as exc:  # flash without GQA support: repeat K/V instead
                Llama.sdpa_mode = "repeat_kv"
                emit("note", text=f"flash+gqa SDPA failed ({str(exc)[:160]}); repeat_kv")
                fwd()
            conf["sdpa_mode"] = Llama.sdpa_mode
            extra = {}
            if smoke:
                ref = reference_forward(model, inp, prefill=True)
                extra["argmax_matches_fp32_ref"] = bool((fwd() == ref.argmax(-1)).all())
            replay = as_graph(fwd, device)
            st = stats(timed(replay, device, reps=pre_reps, warmup=2))
            emit("prefill", config=conf, tokens_per_s=seq / st["median_s"], **extra, **st)
            replay = None
            eager = stats(timed(fwd, device, reps=pre_reps, warmup=2))
            kc = count_kernels(fwd, device) if seq == 512 else {}
            emit("prefill_eager", config={**conf, "cuda_graph": False},
                 tokens_per_s=seq / eager["median_s"], **kc, **eager)
        except Exception as exc:
            emit("prefill", config=conf, oom=isinstance(exc, torch.OutOfMemoryError),
                 error=str(exc)[:300])
        model.cache = None
        free(device)
    model.layers = model.emb = model.lm_head = None
    free(device)


def run_steps(steps, sections, device, emit, smoke) -> None:
    """Run the named measurement sections asked for; one broken section must not lose the rest."""
    for name, step in steps:
        if name not in sections:
            continue
        try:
            step(device, emit, smoke)
        except Exception as exc:
            emit("error", section=name, error=repr(exc)[:500])
            free(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSONL file to append results to")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--sections", default="copy,launch,gemv,gemm,models",
                    help="comma-separated subset of copy,launch,gemv,gemm,models")
    ap.add_argument("--ctxs", default="512,2048", help="decode contexts (tokens attended)")
    ap.add_argument("--seqs", default="512,2048", help="prefill prompt lengths")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help=f"comma-separated, of {','.join(m.name for m in MODELS)}")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    emit = Writer(args.out, gpu)
    torch.manual_seed(0)
    emit("env", torch=torch.__version__, triton=getattr(triton, "__version__", None),
         device=str(device), smoke=args.smoke,
         sm_count=(torch.cuda.get_device_properties(0).multi_processor_count
                   if device.type == "cuda" else None),
         hbm_bytes=(torch.cuda.get_device_properties(0).total_memory
                    if device.type == "cuda" else None))
    check_kernels(device, emit)
    sections = args.sections.split(",")
    chosen = [SMOKE_MODEL] if args.smoke else [
        m for m in MODELS if m.name in args.models.split(",")]
    steps = [("copy", bench_copy), ("launch", bench_launch), ("gemv", bench_gemv),
             ("gemm", bench_gemm)]
    ctxs, seqs = (tuple(int(x) for x in v.split(",")) for v in (args.ctxs, args.seqs))
    steps += [("models", lambda d, e, s, cfg=cfg: bench_model(cfg, d, e, s, ctxs, seqs))
              for cfg in chosen]
    run_steps(steps, sections, device, emit, args.smoke)
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
