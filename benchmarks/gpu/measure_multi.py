"""Multi-GPU measurements: NCCL collectives and tensor- / pipeline-parallel LLaMA steps.

One process per GPU (torch.multiprocessing), NCCL between them; ``--smoke`` runs the same code
on the CPU with gloo and tiny shapes, and checks every parallel forward against measure_single's
float32 reference.  Rank 0 writes one JSON object per measurement to ``--out``.  Sections:

1. ``nccl``: ``all_reduce`` (sum), ``all_gather_into_tensor`` and a send/recv ping-pong (rank 0
   to rank 1 and back; the time is half the round trip) in bf16, 8 KB to 256 MB (the full
   tensor on one GPU: the all-gather's output), on groups of 2, 4 and 8 GPUs where the machine
   has them.  ``eager``: ``iters`` calls back to back, time / iters; ``graph``: the same calls
   captured in one CUDA graph, replay time / iters.
2. ``tp``: tensor-parallel (Megatron) steps of measure_single's LLaMA at each TP degree of
   2, 4, 8 that the machine has: q/k/v and gate/up split by output columns (heads), o_proj and
   down_proj by input rows, each followed by an all-reduce; norms, residuals and the embedding
   replicated; the LM head split by vocabulary with a local argmax and an all-gather of
   (value, index) pairs.  Decode at batch 1/8/32 and context 512/2048, prefill of 512 and 2048
   tokens, every step one CUDA graph (collectives inside), plus one eager decode.
3. ``pp``: a pipeline of 2 stages of TP = world / 2 GPUs each: stage s holds half the layers,
   the first also the embedding, the last the head.  Each stage's compute is one CUDA graph;
   between stages GPU i of one sends its 1/TP slice of the residual stream to GPU i of the next,
   which all-gathers it; the sampled ids go back to the first stage, whose next step embeds
   them, so consecutive steps are truly sequential.  Time per step on rank 0 (CUDA events).

Every model is random bf16 (nothing downloaded).  On the device machine:
``cd benchmarks/gpu && PYTHONUNBUFFERED=1 python3 measure_multi.py --out $OUT/h200x2.jsonl``;
on a CPU: ``python3 measure_multi.py --smoke --out /tmp/m.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

# NVLink multicast (NVLS) must stay off on the shared machines (device KINDS.md).
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import measure_single as ms  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DTYPE = ms.DTYPE
MODELS = {m.name: m for m in ms.MODELS}
MODELS["llama-3-70b"] = ms.LlamaShape("llama-3-70b", 8192, 28672, 80, 64, 8, 128256)
DEFAULT_MODELS = ("llama-3-8b", "llama-2-13b", "llama-3-70b")
NCCL_SIZES = [8192 * 2**i for i in range(16)]  # 8 KB .. 256 MB


# --------------------------------------------------------------------------- plumbing
class Ctx:
    """This process's rank, device, writer and the process groups it belongs to."""

    def __init__(self, rank: int, world: int, device: torch.device, out: str | None,
                 smoke: bool):
        self.rank, self.world, self.device, self.smoke = rank, world, device, smoke
        self.cuda = device.type == "cuda"
        writer = ms.Writer(out, gpu_name(device)) if rank == 0 and out else None
        # Wall-clock stamps line the records up with an nvidia-smi clock/power trace.
        self.emit = (lambda kind, **f: writer(kind, unix_s=time.time(), **f)) if writer \
            else _quiet
        self._groups: dict[tuple[int, ...], object] = {}
        self.active = None  # the group whose ranks time a measurement together (None: all)

    def group(self, ranks) -> object:
        """A process group of these ranks (created collectively by every rank)."""
        key = tuple(ranks)
        if key not in self._groups:
            self._groups[key] = dist.new_group(list(key))
        return self._groups[key]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        dist.barrier(group=self.active)

    def among(self, ranks) -> bool:
        """Make the group of `ranks` the active one; False for a rank outside it (which then
        sits the measurement out)."""
        group = self.group(ranks)
        self.active = group if self.rank in ranks else None
        return self.rank in ranks


def _quiet(*args, **kwargs) -> None:
    pass


def gpu_name(device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


def gather_rows(t: torch.Tensor, group, n: int) -> torch.Tensor:
    """[rows, c] on each of n ranks -> [n * rows, c], rank-major (NCCL: one kernel)."""
    if n == 1:
        return t
    if dist.get_backend(group) == "nccl":
        out = torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        dist.all_gather_into_tensor(out, t, group=group)
        return out
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t, group=group)
    return torch.cat(parts)


def all_reduce(t: torch.Tensor, group, n: int) -> torch.Tensor:
    if n > 1:
        dist.all_reduce(t, group=group)
    return t


def timed_loop(fn, ctx: Ctx, reps: int, warmup: int, iters: int = 1) -> list[float]:
    """Seconds per call of fn on this rank (CUDA events; host clock on the CPU), all ranks
    synchronised before each repeat; each repeat times `iters` calls back to back."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        ctx.sync()
        if ctx.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) * 1e-3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            out.append((time.perf_counter() - t0) / iters)
    return out


def slowest(ctx: Ctx, seconds: float) -> float:
    """The largest of the active group's figures (every rank of it must call)."""
    t = torch.tensor([seconds], dtype=torch.float64,
                     device=ctx.device if ctx.cuda else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.active)
    return float(t.item())


def capture(fn, ctx: Ctx):
    """fn captured in a CUDA graph (replay function); fn itself on the CPU."""
    return ms.as_graph(fn, ctx.device) if ctx.cuda else fn


# --------------------------------------------------------------------------- NCCL sweeps
def bench_nccl(ctx: Ctx, which: tuple[tuple[str, str], ...]) -> None:
    """The (op, mode) pairs in `which`, at every size and group size."""
    sizes = [64, 1024] if ctx.smoke else NCCL_SIZES
    for n in (2, 4, 8):
        if n > ctx.world:
            continue
        ranks = list(range(n))
        if not ctx.among(ranks):
            continue
        group = ctx.active
        for nbytes in sizes:
            numel = nbytes // 2
            x = torch.ones(numel, dtype=DTYPE, device=ctx.device)
            part = torch.ones(numel // n, dtype=DTYPE, device=ctx.device)
            out = torch.empty(numel, dtype=DTYPE, device=ctx.device)
            peer = 1 - ctx.rank if ctx.rank < 2 else None

            def ar(x=x, group=group):
                dist.all_reduce(x, group=group)

            def ag(part=part, out=out, group=group, n=n):
                if dist.get_backend(group) == "nccl":
                    dist.all_gather_into_tensor(out, part, group=group)
                else:
                    dist.all_gather(list(out.chunk(n)), part, group=group)

            def pingpong(x=x, peer=peer, group=group):
                if ctx.rank == 0:
                    dist.send(x, peer, group=group)
                    dist.recv(x, peer, group=group)
                elif ctx.rank == 1:
                    dist.recv(x, peer, group=group)
                    dist.send(x, peer, group=group)

            ops = [("all_reduce", ar, 1.0), ("all_gather", ag, 1.0)]
            if n == 2:
                ops.append(("send_recv", pingpong, 0.5))  # half a round trip
            iters = 3 if ctx.smoke else (50 if nbytes <= 2**20 else 20 if nbytes <= 2**25 else 5)
            for name, fn, scale in ops:
                for mode in ("eager", "graph"):
                    if (name, mode) not in which:
                        continue
                    shape = {"op": name, "gpus": n, "bytes": nbytes, "mode": mode,
                             "iters": iters}
                    try:
                        call = fn
                        if mode == "graph":
                            if not ctx.cuda:
                                continue

                            def many(fn=fn, iters=iters):
                                for _ in range(iters):
                                    fn()

                            replay = capture(many, ctx)
                            ts = timed_loop(replay, ctx, reps=10, warmup=2)
                            ts = [t / iters for t in ts]
                        else:
                            ts = timed_loop(call, ctx, reps=10 if not ctx.smoke else 2,
                                            warmup=3, iters=iters)
                        ts = [t * scale for t in ts]
                        st = ms.stats(ts)
                        worst = slowest(ctx, st["median_s"])
                        ctx.emit("nccl", shape=shape, max_rank_median_s=worst,
                                 algbw_Bps=nbytes / st["median_s"], **st)
                    except Exception as exc:  # a mode that cannot run is itself a finding
                        ctx.emit("nccl", shape=shape, error=repr(exc)[:300])
                        ctx.sync()
            x = part = out = None
            ms.free(ctx.device)


# --------------------------------------------------------------------------- the models
@dataclass(frozen=True)
class Local:
    """One GPU's share of a LLaMA under TP: the shapes measure_single.Llama's attention reads."""

    hidden_size: int
    num_attention_heads: int  # on this GPU
    num_key_value_heads: int  # on this GPU
    head_dim: int
    num_hidden_layers: int  # on this GPU (its pipeline stage)
    vocab_size: int  # the whole vocabulary (token ids index the replicated embedding)


class ParallelLlama(ms.Llama):
    """Rank `i` of a TP group of `tp` GPUs, holding layers [first, first + count) of `cfg`,
    the embedding if `embed` and the head if `head`. Weights are random, or sliced from
    `full` (an ms.Llama on the CPU) for the smoke check."""

    def __init__(self, cfg: ms.LlamaShape, device, tp: int, i: int, first: int, count: int,
                 embed: bool, head: bool, group, full: ms.Llama | None = None):
        h, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        if nh % tp or f % tp or cfg.vocab_size % tp:
            raise ValueError(f"{cfg.name}: heads {nh}, intermediate {f} and vocab "
                             f"{cfg.vocab_size} must divide by tp={tp}")
        lh, lkv = nh // tp, math.ceil(nkv / tp)
        self.full_cfg, self.tp, self.i, self.group = cfg, tp, i, group
        self.cfg = Local(h, lh, lkv, d, count, cfg.vocab_size)
        self.device, self.embed, self.head, self.first = device, embed, head, first
        kv0 = (i * lh) // (nh // nkv)  # first KV head this GPU's query heads use

        def w(key, shape, scale, rows=None, cols=None, layer=None):
            if full is None:
                return ms.rand(shape, device, scale) if scale else 1.0 + ms.rand(shape, device,
                                                                                  0.1)
            src = full.layers[layer][key] if layer is not None else getattr(full, key)
            if rows is not None:
                src = src[rows[0]:rows[1]]
            if cols is not None:
                src = src[:, cols[0]:cols[1]]
            return src.clone().to(device)

        qr, kvr = (i * lh * d, (i + 1) * lh * d), (kv0 * d, (kv0 + lkv) * d)
        fr, vr = (i * f // tp, (i + 1) * f // tp), (i * cfg.vocab_size // tp,
                                                     (i + 1) * cfg.vocab_size // tp)
        self.layers = []
        for j in range(first, first + count):
            self.layers.append({
                "ln1": w("ln1", (h,), 0, layer=j), "ln2": w("ln2", (h,), 0, layer=j),
                "wq": w("wq", (lh * d, h), h**-0.5, rows=qr, layer=j),
                "wk": w("wk", (lkv * d, h), h**-0.5, rows=kvr, layer=j),
                "wv": w("wv", (lkv * d, h), h**-0.5, rows=kvr, layer=j),
                "wo": w("wo", (h, lh * d), (nh * d) ** -0.5, cols=qr, layer=j),
                "wg": w("wg", (f // tp, h), h**-0.5, rows=fr, layer=j),
                "wu": w("wu", (f // tp, h), h**-0.5, rows=fr, layer=j),
                "wd": w("wd", (h, f // tp), f**-0.5, cols=fr, layer=j),
            })
        self.emb = w("emb", (cfg.vocab_size, h), 1.0) if embed else None
        self.ln_f = w("ln_f", (h,), 0) if head else None
        self.lm_head = w("lm_head", (cfg.vocab_size // tp, h), h**-0.5, rows=vr) \
            if head else None
        self.vocab0 = vr[0]
        self.cache = None
        if full is not None:
            self.full_cache_slice = (first, count, kv0, lkv)

    def alloc_cache(self, batch: int, ctx: int, full: ms.Llama | None = None) -> None:
        c = self.cfg
        if full is None:
            super().alloc_cache(batch, ctx)
            return
        first, count, kv0, lkv = self.full_cache_slice
        self.cache = full.cache[first:first + count, :, :, kv0:kv0 + lkv].clone().to(
            self.device).contiguous()
        assert self.cache.shape[3] == c.num_key_value_heads

    def layers_forward(self, h: torch.Tensor, inp: dict, prefill: bool) -> torch.Tensor:
        c, tp, g = self.cfg, self.tp, self.group
        for n, L in enumerate(self.layers):
            kc, vc = self.cache[n, 0], self.cache[n, 1]
            x = ms.rmsnorm(h, L["ln1"])
            q, k, v = F.linear(x, L["wq"]), F.linear(x, L["wk"]), F.linear(x, L["wv"])
            ms.rope_cache(q, k, v, inp["cos"], inp["sin"], inp["bidx"], inp["pos"], kc, vc,
                          c.num_attention_heads, c.num_key_value_heads)
            a = self.attn_prefill(q, kc, vc) if prefill else self.attn_decode(q, kc, vc)
            h = h + all_reduce(F.linear(a, L["wo"]), g, tp)
            x = ms.rmsnorm(h, L["ln2"])
            m = F.silu(F.linear(x, L["wg"])) * F.linear(x, L["wu"])
            h = h + all_reduce(F.linear(m, L["wd"]), g, tp)
        return h

    def head_forward(self, h: torch.Tensor, prefill: bool) -> torch.Tensor:
        """Token ids [rows] (int64): local argmax over this GPU's vocabulary slice, then an
        all-gather of (value, index) pairs and the best of them."""
        if prefill:
            h = h[h.shape[0] - 1:]
        logits = F.linear(ms.rmsnorm(h, self.ln_f), self.lm_head)
        val, idx = logits.float().max(dim=-1)
        pairs = torch.stack([val, (idx + self.vocab0).float()], dim=-1)  # exact below 2^24
        every = gather_rows(pairs, self.group, self.tp).view(self.tp, -1, 2)
        best = every[..., 0].argmax(dim=0)
        return every[best, torch.arange(best.numel(), device=h.device), 1].long()


def _steps(ctx: Ctx):
    """(decode (batch, ctx) points, prefill lengths, repeats) for a real or a smoke run."""
    if ctx.smoke:
        return [(b, c) for c in (8, 16) for b in (1, 2)], (8, 16), (3, 2)
    return [(b, c) for c in (512, 2048) for b in (1, 8, 32)], (512, 2048), (30, 10)


def _points(decode_points, prefill_lens):
    """(prefill, batch, ctx or prompt length) of every step measured."""
    return [(False, b, c) for b, c in decode_points] + [(True, 1, s) for s in prefill_lens]


def _conf(cfg, tp: int, pp: int, gpus: int, b: int, c: int, prefill: bool, ctx: Ctx) -> dict:
    return {"model": cfg.name, "tp": tp, "pp": pp, "gpus": gpus, "batch": b,
            **({"seq_len": c} if prefill else {"ctx": c}), "cuda_graph": ctx.cuda}


def _setup(model, full, b: int, c: int, prefill: bool, ctx: Ctx) -> dict:
    """The caches (and the fp32 reference's, for the smoke check) and static inputs of a step."""
    if full is not None:
        full.alloc_cache(b, c)
        torch.manual_seed(7)
        full.cache = ms.rand(full.cache.shape, torch.device("cpu"))
    model.alloc_cache(b, c, full)
    torch.manual_seed(11)
    return {k: v.to(ctx.device) for k, v in model.step_inputs(b, c, prefill).items()}


def _drop(model, ctx: Ctx, cache_only: bool = False) -> None:
    """Free a point's KV cache (or the whole model) before the next."""
    model.cache = None
    if not cache_only:
        model.layers = model.emb = model.lm_head = None
    ms.free(ctx.device)


def _full_reference(cfg, seed: int = 0) -> ms.Llama:
    torch.manual_seed(seed)
    return ms.Llama(cfg, torch.device("cpu"))


def bench_tp(ctx: Ctx, cfg: ms.LlamaShape, tp: int) -> None:
    if not ctx.among(range(tp)):
        return
    group = ctx.active
    t0 = time.perf_counter()
    full = _full_reference(cfg) if ctx.smoke else None
    torch.manual_seed(1 + ctx.rank)
    model = ParallelLlama(cfg, ctx.device, tp, ctx.rank, 0, cfg.num_hidden_layers, True, True,
                          group, full)
    ctx.emit("model_init", config=asdict(cfg), tp=tp, pp=1, init_s=time.perf_counter() - t0)
    decode_points, prefill_lens, (dec_reps, pre_reps) = _steps(ctx)

    def forward(inp, prefill):
        h = F.embedding(inp["tokens"], model.emb)
        return model.head_forward(model.layers_forward(h, inp, prefill), prefill)

    for prefill, b, c in _points(decode_points, prefill_lens):
        phase = "prefill" if prefill else "decode"
        conf = _conf(cfg, tp, 1, tp, b, c, prefill, ctx)
        try:
            inp = _setup(model, full, b, c, prefill, ctx)
            extra = {}
            if full is not None:
                ref = ms.reference_forward(full, {k: v.cpu() for k, v in inp.items()}, prefill)
                got = forward(inp, prefill)
                extra["argmax_matches_fp32_ref"] = bool((got.cpu() == ref.argmax(-1)).all())
                model.alloc_cache(b, c, full)  # the reference check wrote into it
            replay = capture(lambda inp=inp, prefill=prefill: forward(inp, prefill), ctx)
            st = ms.stats(timed_loop(replay, ctx, reps=pre_reps if prefill else dec_reps,
                                     warmup=2 if prefill else 5))
            tokens = b * (c if prefill else 1)
            ctx.emit(phase, config=conf, max_rank_median_s=slowest(ctx, st["median_s"]),
                     tokens_per_s=tokens / st["median_s"], **extra, **st)
            replay = None
            if not prefill and (b, c) == decode_points[0]:
                eager = ms.stats(timed_loop(lambda inp=inp: forward(inp, False), ctx,
                                            reps=dec_reps, warmup=3))
                ctx.emit("decode_eager", config={**conf, "cuda_graph": False},
                         max_rank_median_s=slowest(ctx, eager["median_s"]),
                         tokens_per_s=b / eager["median_s"], **eager)
        except Exception as exc:  # record and go on: OOM is itself a finding
            ctx.emit(phase, config=conf, oom=isinstance(exc, torch.OutOfMemoryError),
                     error=repr(exc)[:300])
        _drop(model, ctx, cache_only=True)
    _drop(model, ctx)


def bench_pp(ctx: Ctx, cfg: ms.LlamaShape, pp: int) -> None:
    """pp stages of tp = world / pp GPUs; rank = stage * tp + i."""
    tp = ctx.world // pp
    stage, i = divmod(ctx.rank, tp)
    tp_groups = [ctx.group(range(s * tp, (s + 1) * tp)) for s in range(pp)]
    group = tp_groups[stage]
    ctx.among(range(ctx.world))
    per = [cfg.num_hidden_layers // pp + (s < cfg.num_hidden_layers % pp) for s in range(pp)]
    first = sum(per[:stage])
    t0 = time.perf_counter()
    full = _full_reference(cfg) if ctx.smoke else None
    torch.manual_seed(1 + ctx.rank)
    model = ParallelLlama(cfg, ctx.device, tp, i, first, per[stage], stage == 0,
                          stage == pp - 1, group, full)
    ctx.emit("model_init", config=asdict(cfg), tp=tp, pp=pp, stage_layers=per,
             init_s=time.perf_counter() - t0)
    decode_points, prefill_lens, (dec_reps, pre_reps) = _steps(ctx)
    nxt, prv = ctx.rank + tp, ctx.rank - tp  # same i, next / previous stage
    last = (pp - 1) * tp + i
    for prefill, b, c in _points(decode_points, prefill_lens):
        phase = "prefill" if prefill else "decode"
        rows = c if prefill else b
        conf = _conf(cfg, tp, pp, ctx.world, b, c, prefill, ctx)
        try:
            inp = _setup(model, full, b, c, prefill, ctx)
            h_in = torch.zeros((rows, cfg.hidden_size), dtype=DTYPE, device=ctx.device)
            piece = torch.zeros((rows, cfg.hidden_size // tp), dtype=DTYPE, device=ctx.device)
            ids = torch.zeros(1 if prefill else b, dtype=torch.int64, device=ctx.device)
            out = {}

            def body(inp=inp, h_in=h_in, out=out, prefill=prefill):
                h = F.embedding(inp["tokens"], model.emb) if stage == 0 else h_in
                h = model.layers_forward(h, inp, prefill)
                if stage == pp - 1:
                    out["ids"] = model.head_forward(h, prefill)
                else:
                    out["h"] = h

            def step(replay=None, inp=inp, h_in=h_in, piece=piece, ids=ids, out=out,
                     prefill=prefill, body=body):
                if stage > 0:
                    dist.recv(piece, prv)
                    h_in.copy_(gather_rows(piece.t().contiguous(), group, tp).t())
                (replay or body)()
                if stage < pp - 1:
                    dist.send(out["h"].chunk(tp, dim=-1)[i].contiguous(), nxt)
                    if stage == 0:  # the sampled ids come back to the first stage
                        dist.recv(ids, last)
                        if not prefill:
                            inp["tokens"].copy_(ids)
                else:
                    ids.copy_(out["ids"])
                    dist.send(ids, i)

            if pp == 1:
                raise ValueError("pp must be >= 2")
            extra = {}
            if full is not None:
                ref = ms.reference_forward(full, {k: v.cpu() for k, v in inp.items()}, prefill)
                saved = inp["tokens"].clone()
                step()
                extra["argmax_matches_fp32_ref"] = bool((ids.cpu() == ref.argmax(-1)).all())
                inp["tokens"].copy_(saved)
                model.alloc_cache(b, c, full)
            replay = capture(body, ctx)
            ctx.sync()
            st = ms.stats(timed_loop(lambda replay=replay: step(replay), ctx,
                                     reps=pre_reps if prefill else dec_reps,
                                     warmup=2 if prefill else 5, iters=1 if prefill else 4))
            tokens = b * (c if prefill else 1)
            ctx.emit(phase, config=conf, stage_layers=per,
                     max_rank_median_s=slowest(ctx, st["median_s"]),
                     tokens_per_s=tokens / st["median_s"], **extra, **st)
            replay = None
        except Exception as exc:  # record and go on: OOM is itself a finding
            ctx.emit(phase, config=conf, oom=isinstance(exc, torch.OutOfMemoryError),
                     error=repr(exc)[:300])
        _drop(model, ctx, cache_only=True)
    _drop(model, ctx)


# --------------------------------------------------------------------------- driver
def worker(rank: int, world: int, args) -> None:
    smoke = args.smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", rank)
    if not smoke:
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    # A collective that never completes (a rank stuck in a failed capture) aborts after this,
    # rather than hanging the machine's run.
    dist.init_process_group("gloo" if smoke else "nccl", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.timeout),
                            **({} if smoke else {"device_id": device}))
    ctx = Ctx(rank, world, device, args.out, smoke)
    ctx.emit("env", torch=torch.__version__, world=world, device=str(device), smoke=smoke,
             nccl=".".join(map(str, torch.cuda.nccl.version())) if not smoke else None,
             env={k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "NCCL_ALGO",
                                                 "NCCL_PROTO", "TORCH_SYMM_MEM_DISABLE_MULTICAST")})
    if not smoke:
        ms.check_kernels(device, ctx.emit)
    sections = args.sections.split(",")
    chosen = [ms.SMOKE_MODEL] if smoke else [MODELS[m] for m in args.models.split(",")]
    steps = []
    if "nccl" in sections:  # send/recv inside a CUDA graph, the riskiest capture, goes last
        first = tuple((op, m) for op in ("all_reduce", "all_gather", "send_recv")
                      for m in ("eager", "graph") if (op, m) != ("send_recv", "graph"))
        steps.append(("nccl", lambda: bench_nccl(ctx, first)))
    for cfg in chosen:
        if "tp" in sections:
            for tp in (2, 4, 8):
                if tp <= world:
                    steps.append((f"tp{tp}:{cfg.name}", lambda cfg=cfg, tp=tp: bench_tp(
                        ctx, cfg, tp)))
        if "pp" in sections and world >= 2 and world % 2 == 0:
            steps.append((f"pp2:{cfg.name}", lambda cfg=cfg: bench_pp(ctx, cfg, 2)))
    if "nccl" in sections:
        steps.append(("nccl_p2p_graph", lambda: bench_nccl(ctx, (("send_recv", "graph"),))))
    for name, fn in steps:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # one broken section must not lose the rest
            ctx.emit("error", section=name, error=repr(exc)[:500])
        ctx.active = None
        ms.free(device)
        ctx.sync()
        ctx.emit("section_done", section=name, wall_s=time.perf_counter() - t0)
    ctx.emit("done")
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSONL file to append results to")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (gloo)")
    ap.add_argument("--sections", default="nccl,tp,pp", help="subset of nccl,tp,pp")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help=f"comma-separated, of {','.join(MODELS)}")
    ap.add_argument("--gpus", type=int, default=0,
                    help="GPUs to use (default: all; with --smoke, processes, default 2)")
    ap.add_argument("--port", type=int, default=29517)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds a collective may wait before the run aborts")
    args = ap.parse_args(argv)
    world = args.gpus or (2 if args.smoke else torch.cuda.device_count())
    if world < 2:
        print("measure_multi needs at least 2 GPUs (or --smoke)", file=sys.stderr)
        return 2
    mp.spawn(worker, args=(world, args), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
