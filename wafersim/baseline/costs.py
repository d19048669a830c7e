"""Per-op costs on one GPU of a tensor-parallel group: sharding, roofline time and memory.

An op graph (models.build_graph) is read once into `Work` items grouped as the ops before the
layers (embeddings), one list per layer, and the ops after them (final norm, LM head, sample).
In prefill with `flash_prefill=True` the three attention ops of a layer become one fused
causal kernel (FlashAttention, as serving engines run prefill): its FLOPs are the causal part
of the score rectangle and it never writes the score matrix. Decode keeps the three kernels
(score, softmax, value) over the cache, as benchmarks/gpu/measure_single.py runs them.

Tensor parallelism is Megatron's: q/k/v and gate/up split their output columns (by heads for
attention), o_proj and down_proj split their input rows and end in an all-reduce of their full
output; attention, RoPE and softmax split by heads (KV heads by ceil(kv_heads / tp), so KV heads
are replicated when tp > kv_heads); the MLP's activation and gate multiply split by columns;
the LM head splits the vocabulary and samples locally, then all-gathers (value, index) pairs;
norms, residual adds and embedding lookups are replicated on every GPU of the group, and so
is a fast feed-forward tree (fff_in, fff_out: each GPU descends the whole, small tree, so no
all-reduce follows it).

Time of one kernel: max(FLOPs / (peak x flops frac), bytes / (HBM bw x bw frac)) plus the
per-kernel gap inside a CUDA graph, plus the matmul fixed cost for cuBLAS calls and fused
attention (kernel_time_s). On a GPU whose spec carries fitted kernel models (kernels.py:
matmul efficiency per shape, decode attention, softmax, flash attention, elementwise kernels)
work_kernel_time_s charges those instead, except for a down projection on sparse activations
(models.graph.with_activation_sparsity: a gather of active weight rows, not a cuBLAS shape),
which keeps the roofline. Without CUDA graphs a kernel takes at least the host's launch time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from wafersim.baseline import kernels
from wafersim.baseline.collectives import allgather, allreduce
from wafersim.baseline.gpus import GPUSpec
from wafersim.baseline.links import LinkSpec

MATMUL_LIKE = ("gemv", "gemm", "lm_head", "attn_score", "attn_value", "flash_attention")
ROW_PARALLEL = ("o_proj", "down_proj")  # split input rows; all-reduce their output
SAMPLE_GATHER_BYTES_PER_ROW = 8  # (max logit, token id) per row


@dataclass(frozen=True)
class Work:
    """One kernel's worth of work, unsharded, with what it shares with the TP group."""

    name: str
    kind: str
    layer: int
    dtype: str
    flops: float
    weight_bytes: float
    act_bytes: float  # activations in + out
    kv_bytes: float  # KV cache read + written
    split: str  # how TP divides it: "q", "kv", "cols", "replicated"
    heads: int = 0
    kv_heads: int = 0
    allreduce_bytes: float = 0.0  # full output all-reduced across the TP group after it
    allgather_bytes: float = 0.0
    kv_store_bytes: float = 0.0  # KV cache bytes this op's layer keeps resident
    weight_store_bytes: float = 0.0  # bytes of the weight tensor it reads (whole table)
    weight_id: str | None = None
    # The op's dims (models.ops conventions), unsharded, for the fitted kernel models:
    # matmuls [m, k] x [k, n]; attention per (sequence, head), count = batch x heads;
    # elementwise [m rows, n wide] x count; flash: m query rows, k head_dim, n kv_len.
    m: int = 0
    k: int = 0
    n: int = 0
    count: int = 1
    # An MLP down projection on packed sparse activations (TwELL): a gather of the active
    # weight rows, not a cuBLAS shape, so no fitted matmul efficiency applies to it.
    sparse: bool = False
    # Weights stored in another dtype than `dtype` (compiler.quant; baseline.quant), and
    # weights pruned 2:4 for sparse tensor cores (`flops` then counts the kept half).
    wdtype: str = ""
    prune24: bool = False


@dataclass(frozen=True)
class Plan:
    """The step's work: before the layers, per layer, after the layers."""

    pre: tuple[Work, ...]
    layers: tuple[tuple[Work, ...], ...]
    post: tuple[Work, ...]
    rows: int  # token rows in the step (batch x new tokens)
    hidden_bytes: float  # one row of the residual stream, in bytes, times rows
    dtype_bytes: int


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _split_of(op) -> str:
    """How tensor parallelism divides an op: by query heads, by KV heads, by columns, or not."""
    short = _short(op.name)
    if op.kind in ("attn_score", "attn_value", "softmax") or short in ("q_proj", "o_proj",
                                                                        "q_rope"):
        return "q"
    if short in ("k_proj", "v_proj", "k_rope"):
        return "kv"
    if short in ("gate_proj", "up_proj", "down_proj") or op.kind in (
            "activation", "mul", "lm_head", "sample"):
        return "cols"
    return "replicated"


def _work(op, cfg, attrs=None) -> Work:
    short = _short(op.name)
    attrs = attrs or {}  # the op's node attributes in its graph
    # What stays resident where the op reads less (sparse activations, a fast feed-forward
    # tree's path: models.graph), else the weights it reads.
    weight_store = attrs.get("weight_store_bytes", op.weight_bytes)
    if op.kind == "embedding":
        weight_store = op.k * op.n * cfg.dtype_bytes  # the whole table stays resident
    return Work(
        op.name, op.kind, op.layer, op.dtype, float(op.flops), float(op.weight_bytes),
        float(op.in_bytes + op.out_bytes), float(op.kv_read_bytes + op.kv_write_bytes),
        _split_of(op), cfg.num_attention_heads, cfg.num_key_value_heads,
        allreduce_bytes=float(op.out_bytes) if short in ROW_PARALLEL else 0.0,
        allgather_bytes=float(op.m * SAMPLE_GATHER_BYTES_PER_ROW) if op.kind == "sample" else 0.0,
        kv_store_bytes=float(op.kv_read_bytes + op.kv_write_bytes)
        if op.kind in ("attn_score", "attn_value") else 0.0,
        weight_store_bytes=float(weight_store),
        weight_id=op.weight,
        m=op.m, k=op.k, n=op.n, count=op.count, sparse="act_density" in attrs,
    )


def _flash(score, softmax, value, cfg, rows_per_seq: int) -> Work:
    """One fused causal attention kernel standing for score -> softmax -> value."""
    cached = score.n - score.m  # kv_len - new rows
    causal = (cached + (rows_per_seq + 1) / 2) / (cached + rows_per_seq)
    kv = score.kv_read_bytes + score.kv_write_bytes + value.kv_read_bytes + value.kv_write_bytes
    qo = 2 * value.out_bytes  # queries in, outputs out: the same shape
    return Work(
        score.name.replace("attn_score", "flash_attention"), "flash_attention", score.layer,
        score.dtype, float((score.flops + value.flops) * causal), 0.0, float(qo), float(kv),
        "q", cfg.num_attention_heads, cfg.num_key_value_heads, kv_store_bytes=float(kv),
        m=score.m, k=score.k, n=score.n, count=score.count,
    )


def plan(graph: nx.DiGraph, flash_prefill: bool = True) -> Plan:
    """Read an op graph into Work items, in execution order."""
    cfg = graph.graph["cfg"]
    ops = [graph.nodes[n]["op"] for n in nx.topological_sort(graph)]
    nlayers = cfg.num_hidden_layers
    pre, post, layers = [], [], [[] for _ in range(nlayers)]
    seen_layer = False
    fuse = flash_prefill and graph.graph["phase"] == "prefill"
    by_name = {op.name: op for op in ops}
    for op in ops:
        attrs = graph.nodes[op.name]
        if op.layer < 0:
            (post if seen_layer else pre).append(_work(op, cfg, attrs))
            continue
        seen_layer = True
        if fuse and op.kind in ("softmax", "attn_value"):
            continue
        if fuse and op.kind == "attn_score":
            i = op.layer
            layers[i].append(_flash(op, by_name[f"L{i}.softmax"], by_name[f"L{i}.attn_value"],
                                    cfg, graph.graph["seq_len"]))
            continue
        layers[op.layer].append(_work(op, cfg, attrs))
    rows = graph.graph["batch"] * graph.graph["seq_len"]
    return Plan(tuple(pre), tuple(tuple(x) for x in layers), tuple(post), rows,
                float(rows * cfg.hidden_size * cfg.dtype_bytes), cfg.dtype_bytes)


def shard_fractions(w: Work, tp: int) -> tuple[float, float]:
    """(fraction of FLOPs/weights/activations, fraction of KV bytes) one GPU of `tp` takes:
    the largest shard when the split is uneven."""
    if tp <= 1:
        return 1.0, 1.0
    q = math.ceil(w.heads / tp) / w.heads if w.heads else 1.0 / tp
    kv = math.ceil(w.kv_heads / tp) / w.kv_heads if w.kv_heads else 1.0 / tp
    if w.split == "q":
        return q, kv
    if w.split == "kv":
        return kv, kv
    if w.split == "cols":
        return 1.0 / tp, kv
    return 1.0, kv


def shard(w: Work, tp: int) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of `w` on one GPU of a TP group of `tp`."""
    f, fkv = shard_fractions(w, tp)
    if w.split == "replicated":
        return w.flops, w.weight_bytes + w.act_bytes + w.kv_bytes
    return w.flops * f, (w.weight_bytes + w.act_bytes) * f + w.kv_bytes * fkv


def kernel_time_s(flops: float, nbytes: float, kind: str, dtype: str, gpu: GPUSpec,
                  cuda_graphs: bool = True) -> float:
    """Roofline time plus per-kernel overheads (module docstring)."""
    t = max(flops / gpu.flops_rate(dtype), nbytes / gpu.bw_rate)
    t += gpu.graph_kernel_overhead_s
    if kind in MATMUL_LIKE:
        t += gpu.matmul_overhead_s
    return t if cuda_graphs else max(t, gpu.kernel_overhead_s)


def _heads_on_gpu(w: Work, tp: int) -> tuple[int, int, int]:
    """(sequences, query heads, KV heads) of an attention-type op on one GPU of `tp`."""
    heads = w.heads or 1
    batch = max(w.count // heads, 1)
    return batch, math.ceil(heads / tp), math.ceil((w.kv_heads or heads) / tp)


def work_kernel_time_s(w: Work, flops: float, nbytes: float, gpu: GPUSpec, tp: int = 1,
                       cuda_graphs: bool = True) -> float:
    """Time of `w`'s kernel on one GPU of a TP group of `tp`, given its shard's FLOPs and
    bytes: the fitted kernel models where the GPU has them (kernels.py), else the roofline."""
    km = gpu.kernels
    base = kernel_time_s(flops, nbytes, w.kind, w.dtype, gpu, cuda_graphs)
    if km is None:
        return base
    peak_bw, frac = gpu.hbm_bw_Bps, gpu.achievable_bw_frac
    t = None
    if w.kind in ("gemv", "gemm", "lm_head") and not w.sparse:
        f = 1.0 if w.split == "replicated" else shard_fractions(w, tp)[0]
        k, n = (round(w.k * f), w.n) if _short(w.name) in ROW_PARALLEL else (w.k, round(w.n * f))
        t = kernels.matmul_eta(km, w.m, k, n) * kernel_time_s(flops, nbytes, w.kind, w.dtype,
                                                              gpu)
    elif w.kind in ("attn_score", "attn_value") and w.m == 1:
        batch, _, kv = _heads_on_gpu(w, tp)
        fixed, unit = ((km.score_fixed_s, km.score_unit_frac) if w.kind == "attn_score"
                       else (km.value_fixed_s, km.value_unit_frac))
        t = kernels.decode_bmm_s(nbytes, batch * kv, peak_bw, frac, fixed, unit)
    elif w.kind == "softmax":
        batch, heads, _ = _heads_on_gpu(w, tp)
        t = kernels.softmax_s(batch * heads * w.m, w.n, nbytes, peak_bw, frac, km)
    elif w.kind == "flash_attention":
        batch, heads, _ = _heads_on_gpu(w, tp)
        t = kernels.flash_s(flops, batch * heads * w.m * w.k, gpu.peak_flops[w.dtype], km)
    elif w.kind == "sample":
        t = kernels.sample_s(w.n, km)
    elif w.kind in km.stream:
        fixed, bw_frac = km.stream[w.kind]
        if w.kind == "rope":  # one fused kernel for q and k: each op takes half its fixed cost
            fixed /= 2
        t = kernels.stream_s(nbytes, peak_bw, fixed, bw_frac)
    if t is None:
        return base
    return t if cuda_graphs else max(t, gpu.kernel_overhead_s)


@dataclass(frozen=True)
class Cost:
    """One Work item on one GPU of a TP group: kernel time, the TP collective after it, and
    the FLOPs, HBM bytes and scale-up bytes it costs that GPU."""

    kernel_s: float
    comm_s: float
    flops: float
    hbm_bytes: float
    link_sent_bytes: float


def timed_flops(w: Work, flops: float, gpu: GPUSpec) -> float:
    """`flops` in the compute dtype's time: weights stored in a dtype the GPU has a tensor-core
    rate for run at that rate (activations quantised on the fly); other stored dtypes are
    dequantised in registers and run at the compute dtype's rate. 2:4 weights need sparse
    tensor cores (`flops` already counts the kept half)."""
    if w.prune24 and not gpu.sparse_24:
        raise ValueError(f"{gpu.name} has no 2:4 sparse tensor-core rate in its spec")
    if w.wdtype and w.wdtype in gpu.peak_flops:
        return flops * gpu.peak_flops[w.dtype] / gpu.peak_flops[w.wdtype]
    return flops


def collective_overhead_s(gpu: GPUSpec, cuda_graphs: bool) -> float:
    """A collective is one more kernel to launch (NCCL's)."""
    return gpu.graph_kernel_overhead_s if cuda_graphs else gpu.kernel_overhead_s


def work_cost(w: Work, gpu: GPUSpec, tp: int, link: LinkSpec, cuda_graphs: bool = True,
              algorithm: str = "auto") -> Cost:
    flops, nbytes = shard(w, tp)
    kernel = work_kernel_time_s(w, timed_flops(w, flops, gpu), nbytes, gpu, tp, cuda_graphs)
    comm, sent = 0.0, 0.0
    if tp > 1 and w.allreduce_bytes:
        c = allreduce(w.allreduce_bytes, tp, link, algorithm)
        comm += c.time_s + collective_overhead_s(gpu, cuda_graphs)
        sent += c.total_bytes / tp
    if tp > 1 and w.allgather_bytes:
        c = allgather(w.allgather_bytes, tp, link)
        comm += c.time_s + collective_overhead_s(gpu, cuda_graphs)
        sent += c.total_bytes / tp
    return Cost(kernel, comm, flops, nbytes, sent)


def weight_store_bytes(works, tp: int) -> float:
    """Weight bytes resident on one GPU for these ops (each weight tensor counted once)."""
    seen: dict[str, float] = {}
    for w in works:
        if w.weight_id and w.weight_store_bytes:
            f = 1.0 if w.split == "replicated" else shard_fractions(w, tp)[0]
            seen[w.weight_id] = max(seen.get(w.weight_id, 0.0), w.weight_store_bytes * f)
    return sum(seen.values())


def kv_store_bytes(works, tp: int) -> float:
    return sum(w.kv_store_bytes * shard_fractions(w, tp)[1] for w in works)


def activation_bytes(works, tp: int, hidden_bytes: float) -> float:
    """Peak live activations on one GPU: the residual stream plus the largest op's in + out."""
    peak = 0.0
    for w in works:
        f = 1.0 if w.split == "replicated" else shard_fractions(w, tp)[0]
        peak = max(peak, w.act_bytes * f)
    return hidden_bytes + peak
