"""Kernel microbenchmarks at the shapes of the end-to-end runs, for the GPU baseline's kernel
models (benchmarks/gpu/calibrate.py fits them; nothing here runs a whole model).

Every kernel is the one ``measure_single.py``'s LLaMA launches, called the same way, and timed
inside a CUDA graph of many calls (per-call time = replay time / calls; the graph gap is
therefore inside every figure, as it is inside every end-to-end CUDA-graph step). Inputs that
the end-to-end step reads from HBM (weights, the KV cache) rotate over >= 256 MB of copies so
the L2 never holds them; activations alternate over two buffers, as fresh as in the step.
JSON lines to ``--out``, sections in order:

1. ``attn_decode``: the decode attention of ``Llama.attn_decode`` (score bmm, softmax, value
   bmm; grouped-query heads through a view) for LLaMA-3-8B / LLaMA-2-7B / LLaMA-2-13B heads,
   batch 1/8/32, ctx (tokens attended) 512/2048/4096: each kernel alone and the three chained.
2. ``attn_prefill``: ``Llama._sdpa`` (SDPA flash, causal, GQA where kv < heads) on the
   step's q/k/v layout, seq 512/1024/2048/4096.
3. ``eltwise``: the Triton RMSNorm, the Triton RoPE + KV-write kernel, SiLU, the gate multiply,
   the residual add, the embedding lookup and the argmax, at rows 1/8/32 (decode) and
   512/2048 (prefill) for the three models.
4. ``gemm``/``gemv``: ``F.linear`` at the prefill weight shapes for m = 128/512/1024/2048/4096
   and the vocab-32000 LM head for m = 1/8/32 (``measure_single.bench_linear``).
5. ``gemm_chain``: the seven GEMMs of every layer of each model at m = 512 and 2048, distinct
   weights per layer, one graph: the sustained rate of the prefill GEMMs back to back.
6. ``attn_probe`` (added after the H100 run, so on the H200 only): the decode softmax alone
   (on N(0,1) scores and on N(0,128) scores, the spread of real q.k scores) and the
   score-softmax-value chain over more contexts (256 to 8192) at batch 1 and 8 for the
   LLaMA-3-8B and LLaMA-2-7B heads, and a torch-profiler split of the eager chain into its
   kernels (GPU durations), to see which kernel a chain spends its time in.

    cd benchmarks/gpu && PYTHONUNBUFFERED=1 python3 measure_kernels.py --out $OUT/h100_kernels.jsonl
    TRITON_INTERPRET=1 python benchmarks/gpu/measure_kernels.py --smoke --out /tmp/k.jsonl
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure_single as ms  # noqa: E402

ROTATE = ms.L2_ROTATE_BYTES
DECODE_BATCHES, DECODE_CTX = (1, 8, 32), (512, 2048, 4096)
PREFILL_SEQ = (512, 1024, 2048, 4096)
ELTWISE_ROWS = (1, 8, 32, 512, 2048)
GEMM_M = (128, 512, 1024, 2048, 4096)
LM_HEAD_KN = [(4096, 32000), (5120, 32000)]


def graph_time(fn_i, calls: int, device, reps: int) -> dict:
    """Per-call stats of a CUDA graph of ``calls`` calls fn_i(0), fn_i(1), ..."""
    def body():
        for i in range(calls):
            fn_i(i)

    replay = ms.as_graph(body, device)
    st = ms.stats([t / calls for t in ms.timed(replay, device, reps=reps, warmup=2)])
    return {**st, "calls_per_graph": calls}


def n_calls(est_s: float, copies: int, smoke: bool, target_s: float = 2e-3,
            cap: int = 400) -> int:
    if smoke:
        return 3
    return int(min(cap, max(copies, 10, math.ceil(target_s / max(est_s, 2e-6)))))


def n_copies(nbytes: float, smoke: bool) -> int:
    return 1 if smoke else max(2, math.ceil(ROTATE / max(nbytes, 1)))


# --------------------------------------------------------------------------- 1. decode attention
def bench_attn_decode(cfg, device, emit, smoke):
    batches, ctxs = ((1, 2), (8, 16)) if smoke else (DECODE_BATCHES, DECODE_CTX)
    for ctx in ctxs:
        for b in batches:
            _attn_decode_one(cfg, b, ctx, device, emit, smoke)


def _attn_decode_one(cfg, b, ctx, device, emit, smoke):
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = nh // nkv
    kv_bytes = b * nkv * ctx * d * 2  # K (or V) of one layer
    copies = n_copies(2 * kv_bytes, smoke)
    cache = ms.rand((copies, 2, b, nkv, ctx, d), device)
    qs = [ms.rand((b, nh * d), device) for _ in range(2)]
    ss = [ms.rand((b * nkv, g, ctx), device) for _ in range(2)]
    ps = [torch.softmax(s.float(), -1).to(ms.DTYPE) for s in ss]

    def K(i):
        return cache[i % copies, 0].view(b * nkv, ctx, d)

    def V(i):
        return cache[i % copies, 1].view(b * nkv, ctx, d)

    def score(i):
        return torch.bmm(qs[i % 2].view(b * nkv, g, d), K(i).transpose(1, 2))

    def softmax(i):
        return torch.softmax(ss[i % 2], dim=-1)

    def value(i):
        return torch.bmm(ps[i % 2], V(i)).view(b, nh * d)

    def chain(i):
        s = torch.bmm(qs[i % 2].view(b * nkv, g, d), K(i).transpose(1, 2))
        return torch.bmm(torch.softmax(s, dim=-1), V(i)).view(b, nh * d)

    if smoke:  # the chain is Llama.attn_decode
        ref = torch.softmax(torch.einsum(
            "bhd,bhsd->bhs", qs[0].view(b, nh, d).float(),
            cache[0, 0].float().repeat_interleave(g, 1)), -1)
        ref = torch.einsum("bhs,bhsd->bhd", ref, cache[0, 1].float().repeat_interleave(
            g, 1)).reshape(b, nh * d)
        err = float((chain(0).float() - ref).norm() / ref.norm())
        assert err < 2e-2, err
    sbytes = b * nh * ctx * 2
    parts = {"score": (score, kv_bytes + sbytes), "softmax": (softmax, 2 * sbytes),
             "value": (value, kv_bytes + sbytes), "chain": (chain, 2 * kv_bytes)}
    for kernel, (fn, nbytes) in parts.items():
        calls = n_calls(nbytes / 2.5e12 + 4e-6, copies, smoke)
        st = graph_time(fn, calls, device, 5 if smoke else 20)
        emit("attn_decode", shape={"model": cfg.name, "batch": b, "ctx": ctx,
                                   "heads": nh, "kv_heads": nkv, "head_dim": d,
                                   "kernel": kernel},
             kv_bytes=kv_bytes * (2 if kernel == "chain" else
                                  0 if kernel == "softmax" else 1),
             bytes=nbytes, copies=copies, **st)
    cache = qs = ss = ps = None
    ms.free(device)


# --------------------------------------------------------------------------- 2. prefill attention
def bench_attn_prefill(cfg, device, emit, smoke):
    model = ms.Llama.__new__(ms.Llama)  # only cfg is needed by attn_prefill
    model.cfg = cfg
    for seq in ((8, 16) if smoke else PREFILL_SEQ):
        _attn_prefill_one(model, seq, device, emit, smoke)


def _attn_prefill_one(model, seq, device, emit, smoke):
    cfg = model.cfg
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per = seq * (nh + 2 * nkv) * d * 2
    copies = n_copies(per, smoke)
    qs = [ms.rand((seq, nh * d), device) for _ in range(copies)]
    kvs = [(ms.rand((1, nkv, seq, d), device), ms.rand((1, nkv, seq, d), device))
           for _ in range(copies)]

    def fa(i):
        kc, vc = kvs[i % copies]
        return model.attn_prefill(qs[i % copies], kc, vc)

    try:
        fa(0)
    except RuntimeError as exc:  # as measure_single does: repeat K/V instead
        ms.Llama.sdpa_mode = "repeat_kv"
        emit("note", text=f"flash+gqa SDPA failed ({str(exc)[:160]}); repeat_kv")
    flops = 4.0 * nh * d * seq * (seq + 1) / 2  # causal: score + value, attended half
    calls = n_calls(flops / 3e14 + 5e-6, copies, smoke, target_s=4e-3, cap=200)
    st = graph_time(fa, calls, device, 5 if smoke else 20)
    emit("attn_prefill", shape={"model": cfg.name, "seq": seq, "heads": nh,
                                "kv_heads": nkv, "head_dim": d},
         sdpa_mode=ms.Llama.sdpa_mode, flops=flops, bytes=2 * per, copies=copies,
         rate_flops=flops / st["median_s"], **st)
    qs = kvs = None
    ms.free(device)


# --------------------------------------------------------------------------- 3. elementwise
def bench_eltwise(cfg, device, emit, smoke):
    emb = ms.rand((cfg.vocab_size, cfg.hidden_size), device)
    wn = 1.0 + ms.rand((cfg.hidden_size,), device, 0.1)
    for rows in ((1, 8) if smoke else ELTWISE_ROWS):
        _eltwise_one(cfg, rows, emb, wn, device, emit, smoke)
    emb = None
    ms.free(device)


def _eltwise_one(cfg, rows, emb, wn, device, emit, smoke):
    h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    prefill = rows >= 512
    two = range(2)
    xs = [ms.rand((rows, h), device) for _ in two]
    ys = [ms.rand((rows, h), device) for _ in two]
    gs = [ms.rand((rows, f), device) for _ in two]
    us = [ms.rand((rows, f), device) for _ in two]
    qs = [ms.rand((rows, nh * d), device) for _ in two]
    ks = [ms.rand((rows, nkv * d), device) for _ in two]
    vs = [ms.rand((rows, nkv * d), device) for _ in two]
    bsz, ctx = (1, rows) if prefill else (rows, 512)
    kc, vc = ms.rand((bsz, nkv, ctx, d), device), ms.rand((bsz, nkv, ctx, d), device)
    pos = (torch.arange(rows, device=device) if prefill
           else torch.full((rows,), ctx - 1, device=device)).to(torch.int32)
    bidx = (torch.zeros(rows, device=device) if prefill
            else torch.arange(rows, device=device)).to(torch.int32)
    ang = pos.float()[:, None] * torch.rand((1, d // 2), device=device)
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    tok = [torch.randint(0, cfg.vocab_size, (rows,), device=device) for _ in two]
    out_rows = 1 if prefill else rows
    logits = [ms.rand((out_rows, cfg.vocab_size), device) for _ in two]
    b2 = 2
    cases = {
        "rmsnorm": (lambda i: ms.rmsnorm(xs[i % 2], wn), 2 * rows * h * b2 + h * b2),
        "rope": (lambda i: ms.rope_cache(qs[i % 2], ks[i % 2], vs[i % 2], cos, sin, bidx,
                                         pos, kc, vc, nh, nkv),
                 rows * (2 * nh * d + 4 * nkv * d) * b2 + rows * d * 4),
        "silu": (lambda i: F.silu(gs[i % 2]), 2 * rows * f * b2),
        "mul": (lambda i: gs[i % 2] * us[i % 2], 3 * rows * f * b2),
        "add": (lambda i: xs[i % 2] + ys[i % 2], 3 * rows * h * b2),
        "embedding": (lambda i: F.embedding(tok[i % 2], emb), 2 * rows * h * b2 + 8 * rows),
        "argmax": (lambda i: torch.argmax(logits[i % 2], dim=-1),
                   out_rows * logits[0].shape[1] * b2 + 8 * out_rows),
    }
    for op, (fn, nbytes) in cases.items():
        cols = {"rmsnorm": h, "rope": nh + nkv, "silu": f, "mul": f, "add": h,
                "embedding": h, "argmax": logits[0].shape[1]}[op]
        r = out_rows if op == "argmax" else rows
        calls = n_calls(nbytes / 2.5e12 + 3e-6, 2, smoke, target_s=1e-3, cap=300)
        st = graph_time(fn, calls, device, 5 if smoke else 15)
        emit("eltwise", shape={"model": cfg.name, "op": op, "rows": r, "cols": cols,
                               "heads": nh, "kv_heads": nkv, "head_dim": d},
             bytes=nbytes, bw_Bps=nbytes / st["median_s"], **st)
    xs = ys = gs = us = qs = ks = vs = kc = vc = logits = None
    ms.free(device)


# --------------------------------------------------------------------------- 6. probes
PROBE_CTX = (256, 512, 1024, 1536, 2048, 3072, 4096, 8192)


def bench_attn_probe(device, emit, smoke):
    cfgs = [ms.SMOKE_MODEL] if smoke else ms.MODELS[:2]
    for cfg in cfgs:
        for b in ((1,) if smoke else (1, 8)):
            for ctx in ((8, 16) if smoke else PROBE_CTX):
                _probe_one(cfg, b, ctx, device, emit, smoke)


def _probe_one(cfg, b, ctx, device, emit, smoke):
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = nh // nkv
    kv_bytes = b * nkv * ctx * d * 2
    copies = n_copies(2 * kv_bytes, smoke)
    cache = ms.rand((copies, 2, b, nkv, ctx, d), device)
    qs = [ms.rand((b, nh * d), device) for _ in range(2)]
    ss = {"randn": [ms.rand((b * nkv, g, ctx), device) for _ in range(2)],
          "randn_x11.3": [ms.rand((b * nkv, g, ctx), device, d**0.5) for _ in range(2)]}

    def chain(i):
        s = torch.bmm(qs[i % 2].view(b * nkv, g, d),
                      cache[i % copies, 0].view(b * nkv, ctx, d).transpose(1, 2))
        return torch.bmm(torch.softmax(s, dim=-1),
                         cache[i % copies, 1].view(b * nkv, ctx, d)).view(b, nh * d)

    shape = {"model": cfg.name, "batch": b, "ctx": ctx, "heads": nh, "kv_heads": nkv,
             "head_dim": d}
    for name, bufs in ss.items():
        st = graph_time(lambda i, bufs=bufs: torch.softmax(bufs[i % 2], dim=-1),
                        n_calls(5e-6, 2, smoke), device, 5 if smoke else 15)
        emit("attn_probe", shape={**shape, "kernel": "softmax", "input": name}, **st)
    st = graph_time(chain, n_calls(2 * kv_bytes / 2e12 + 1e-5, copies, smoke), device,
                    5 if smoke else 15)
    emit("attn_probe", shape={**shape, "kernel": "chain"}, kv_bytes=2 * kv_bytes, **st)
    if device.type == "cuda" and b == 1 and ctx in (512, 2048, 4096):
        emit("attn_profile", shape={**shape, "kernel": "chain (eager)"},
             **profile_kernels(lambda: [chain(i) for i in range(min(copies, 64))], device))


def profile_kernels(fn, device) -> dict:
    """Mean GPU duration per kernel name over one profiled call of ``fn`` (after a warm-up)."""
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        per: dict[str, list[float]] = {}
        for e in prof.events():
            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
                per.setdefault(e.name[:90], []).append(e.time_range.elapsed_us())
        return {"kernels_us": {k: [len(v), sum(v) / len(v)] for k, v in per.items()}}
    except Exception as exc:  # profiler trouble must not lose the timings
        return {"profile_error": repr(exc)[:300]}


# --------------------------------------------------------------------------- 4./5. GEMMs
def prefill_kn(cfg) -> list[tuple[int, int]]:
    h, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    return [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # q k v o gate up down


def bench_gemm(device, emit, smoke):
    if smoke:
        for m, k, n in [(64, 64, 96), (1, 64, 256)]:
            ms.bench_linear("gemm" if m > 32 else "gemv", m, k, n, device, emit, smoke, 1e-3)
        return
    for m in GEMM_M:
        for k, n in ms.GEMM_PREFILL_KN:
            ms.bench_linear("gemm", m, k, n, device, emit, smoke, target_s=3e-3)
    for k, n in LM_HEAD_KN:
        for b in (1, 8, 32):
            ms.bench_linear("gemv", b, k, n, device, emit, smoke, target_s=2e-3)


def bench_gemm_chain(cfg, device, emit, smoke):
    layers = cfg.num_hidden_layers
    shapes = prefill_kn(cfg)
    ws = [[ms.rand((n, k), device, k**-0.5) for k, n in shapes] for _ in range(layers)]
    for m in ((16,) if smoke else (512, 2048)):
        xs = {k: ms.rand((m, k), device) for k, _ in shapes}

        def body(ws=ws, xs=xs):
            for L in ws:
                for w in L:
                    F.linear(xs[w.shape[1]], w)

        replay = ms.as_graph(body, device)
        st = ms.stats(ms.timed(replay, device, reps=3 if smoke else 7, warmup=2))
        flops = 2.0 * m * layers * sum(k * n for k, n in shapes)
        emit("gemm_chain", shape={"model": cfg.name, "m": m, "layers": layers,
                                  "kn": shapes}, flops=flops,
             rate_flops=flops / st["median_s"], **st)
        replay = xs = None
        ms.free(device)
    ws = None
    ms.free(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--sections",
                    default="attn_decode,attn_prefill,eltwise,gemm,gemm_chain,attn_probe")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    emit = ms.Writer(args.out, gpu)
    torch.manual_seed(0)
    emit("env", torch=torch.__version__, triton=getattr(ms.triton, "__version__", None),
         device=str(device), smoke=args.smoke, script="measure_kernels.py",
         sm_count=(torch.cuda.get_device_properties(0).multi_processor_count
                   if device.type == "cuda" else None))
    ms.check_kernels(device, emit)
    models = [ms.SMOKE_MODEL] if args.smoke else ms.MODELS
    sections = args.sections.split(",")
    steps = []
    for name, fn in (("attn_decode", bench_attn_decode), ("attn_prefill", bench_attn_prefill),
                     ("eltwise", bench_eltwise)):
        steps += [(name, lambda d, e, s, fn=fn, c=c: fn(c, d, e, s)) for c in models]
    steps.append(("gemm", bench_gemm))
    steps += [("gemm_chain", lambda d, e, s, c=c: bench_gemm_chain(c, d, e, s)) for c in models]
    steps.append(("attn_probe", bench_attn_probe))
    t0 = time.perf_counter()
    ms.run_steps(steps, sections, device, emit, args.smoke)
    emit("done", wall_s=time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
