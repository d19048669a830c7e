"""build_graph: one forward step of a transformer as a DAG of Ops, laid out like a block diagram.

Nodes are keyed by op name ("embed", "L3.q_proj", "lm_head") and carry the Op as attribute `op`;
an edge carries `bytes`, the activation tensor that flows along it, so for every op with inputs
in_bytes equals the sum of its in-edges' bytes. Graph attributes: cfg, phase, batch, seq_len
(new tokens per sequence: 1 in decode), ctx_len (tokens already in the KV cache: 0 in prefill
unless given) and dtype.

The step, per sequence: embed the new tokens -> layers -> final norm -> LM head on the last
position -> sample. A layer is pre-norm (llama, GPT-2) or post-norm (BERT); see the two block
functions below; a fast feed-forward model (`fff_depth`) has a tree instead of the MLP, and
`with_activation_sparsity` rewrites a step's MLPs for sparse activations. Cost conventions
are in models/ops.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import networkx as nx
import numpy as np

from models.config import ModelConfig
from models.ops import Op, attn_score, attn_value, elementwise, embedding, matmul, norm, sample

PHASES = ("prefill", "decode")
DEFAULT_SEQ_LEN = 512
DEFAULT_CTX_LEN = 4096
ELL_INDEX_BYTES = 2  # a 16-bit neuron index per packed (ELL) activation


def build_graph(
    cfg: ModelConfig,
    phase: str = "decode",
    batch: int = 1,
    seq_len: int | None = None,
    ctx_len: int | None = None,
) -> nx.DiGraph:
    """The op graph of one prefill or decode step of `batch` sequences.

    prefill: seq_len new tokens per sequence (default 512), attending causally to each other
    and to ctx_len cached tokens (default 0); matmuls are "gemm" with m = batch*seq_len.
    decode: one new token per sequence attending to ctx_len cached tokens (default 4096) and
    itself; matmuls are "gemv" with m = batch. Learned position tables cap the defaults.

    >>> from models.config import load_model
    >>> g = build_graph(load_model("tiny-llama"), "decode", batch=2, ctx_len=10)
    >>> g.nodes["L0.k_proj"]["op"].n, g.nodes["L1.attn_score"]["op"].n
    (32, 11)
    """
    seq, ctx = _step_shape(cfg, phase, batch, seq_len, ctx_len)
    g = nx.DiGraph(cfg=cfg, phase=phase, batch=batch, seq_len=seq, ctx_len=ctx, dtype=cfg.dtype)
    b = _Builder(g, cfg, "gemv" if phase == "decode" else "gemm", batch, seq, ctx)
    block = _post_norm_block if cfg.architecture == "bert" else _pre_norm_block
    x = _embeddings(b)
    for layer in range(cfg.num_hidden_layers):
        x = block(b, layer, x)
    _head(b, x)
    return g


def total_flops(g: nx.DiGraph) -> int:
    """FLOPs of one step, all ops."""
    return sum(op.flops for _, op in g.nodes(data="op"))


def total_weight_bytes(g: nx.DiGraph) -> int:
    """Weight bytes read by one step (a tied table counts for its lookup rows and its LM head)."""
    return sum(op.weight_bytes for _, op in g.nodes(data="op"))


def layer_ops(g: nx.DiGraph, layer: int) -> list[Op]:
    """The ops of one transformer layer (-1: those outside the layers), in topological order."""
    return [op for op in (g.nodes[n]["op"] for n in nx.topological_sort(g)) if op.layer == layer]


def kv_cache_bytes(cfg: ModelConfig, batch: int, ctx_len: int) -> int:
    """K and V of every layer for `batch` sequences of `ctx_len` tokens."""
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    return per_token * cfg.dtype_bytes * batch * ctx_len


@dataclass(frozen=True)
class _Builder:
    """The graph under construction and the step's shape, shared by the block functions.

    Methods take the layer and the op's short name ("q_proj" in layer 3 becomes "L3.q_proj").
    """

    g: nx.DiGraph
    cfg: ModelConfig
    matmul_kind: str
    batch: int
    seq: int
    ctx: int

    @property
    def rows(self) -> int:
        return self.batch * self.seq

    def add(self, op: Op, *inputs: str, edge_bytes: int | None = None) -> str:
        """Add `op` fed by `inputs` (whole output tensors unless edge_bytes says otherwise)."""
        self.g.add_node(op.name, op=op)
        for src in inputs:
            flowing = self.g.nodes[src]["op"].out_bytes if edge_bytes is None else edge_bytes
            self.g.add_edge(src, op.name, bytes=flowing)
        return op.name

    def linear(self, layer: int, name: str, x: str, k: int, n: int, bias: bool) -> str:
        op = matmul(_full_name(layer, name), self.matmul_kind, layer, self.rows, k, n,
                    self.cfg.dtype, bias)
        return self.add(op, x)

    def norm(self, layer: int, name: str, x: str) -> str:
        cfg = self.cfg
        op = norm(_full_name(layer, name), cfg.norm, layer, self.rows, cfg.hidden_size, cfg.dtype)
        return self.add(op, x)

    def pointwise(self, layer: int, name: str, kind: str, width: int, *inputs: str) -> str:
        """An elementwise op over [rows, width], reading each of `inputs`."""
        name = _full_name(layer, name)
        return self.add(elementwise(name, kind, layer, self.rows, width, self.cfg.dtype,
                                    operands=len(inputs)), *inputs)

    def residual(self, layer: int, name: str, branch: str, x: str) -> str:
        return self.pointwise(layer, name, "add", self.cfg.hidden_size, branch, x)


def _full_name(layer: int, name: str) -> str:
    return f"L{layer}.{name}" if layer >= 0 else name


def _pre_norm_block(b: _Builder, i: int, x: str) -> str:
    """llama, GPT-2: x = x + attn(norm(x)); x = x + mlp(norm(x))."""
    h = b.norm(i, "attn_norm", x)
    x = b.residual(i, "attn_residual", _attention(b, i, h), x)
    h = b.norm(i, "mlp_norm", x)
    return b.residual(i, "mlp_residual", _mlp(b, i, h), x)


def _post_norm_block(b: _Builder, i: int, x: str) -> str:
    """BERT: x = norm(x + attn(x)); x = norm(x + mlp(x))."""
    x = b.residual(i, "attn_residual", _attention(b, i, x), x)
    x = b.norm(i, "attn_norm", x)
    x = b.residual(i, "mlp_residual", _mlp(b, i, x), x)
    return b.norm(i, "mlp_norm", x)


def _attention(b: _Builder, i: int, x: str) -> str:
    """q/k/v projections -> rope (llama) -> scores -> softmax -> weighted values -> o_proj."""
    cfg, h = b.cfg, b.cfg.hidden_size
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    q = b.linear(i, "q_proj", x, h, q_width, cfg.qkv_bias)
    k = b.linear(i, "k_proj", x, h, kv_width, cfg.qkv_bias)
    v = b.linear(i, "v_proj", x, h, kv_width, cfg.qkv_bias)
    if cfg.position == "rope":
        q = b.pointwise(i, "q_rope", "rope", q_width, q)
        k = b.pointwise(i, "k_rope", "rope", kv_width, k)
    shape = dict(layer=i, batch=b.batch, heads=heads, kv_heads=kv_heads, q_rows=b.seq,
                 cached=b.ctx, head_dim=head_dim, dtype=cfg.dtype)
    scores = b.add(attn_score(f"L{i}.attn_score", **shape), q, k)
    softmax = elementwise(f"L{i}.softmax", "softmax", i, b.seq, b.ctx + b.seq, cfg.dtype,
                          count=b.batch * heads, heads=heads)
    values = b.add(attn_value(f"L{i}.attn_value", **shape), b.add(softmax, scores), v)
    return b.linear(i, "o_proj", values, q_width, h, cfg.o_proj_bias)


def _mlp(b: _Builder, i: int, x: str) -> str:
    """Gated (SwiGLU): down(act(gate(x)) * up(x)); plain (GPT-2, BERT): down(act(up(x)))."""
    if b.cfg.fff_depth is not None:
        return _fff(b, i, x)
    h, f, bias = b.cfg.hidden_size, b.cfg.intermediate_size, b.cfg.mlp_bias
    if b.cfg.gated_mlp:
        gate = b.linear(i, "gate_proj", x, h, f, bias)
        up = b.linear(i, "up_proj", x, h, f, bias)
        y = b.pointwise(i, "gate_mul", "mul", f, b.pointwise(i, "act", "activation", f, gate), up)
    else:
        y = b.pointwise(i, "act", "activation", f, b.linear(i, "up_proj", x, h, f, bias))
    return b.linear(i, "down_proj", y, f, h, bias)


def _fff(b: _Builder, i: int, x: str) -> str:
    """Fast feed-forward (models.reference.fff): each token's depth + 1 dot products with the
    input vectors of the nodes on its path (fff_in), their activations, and the sum of as
    many output vectors (fff_out). The rows read are the distinct nodes the step's tokens can
    visit, sum over levels of min(tokens, 2^level); the whole tree stays resident
    (node attribute `weight_store_bytes`)."""
    cfg, rows = b.cfg, b.rows
    d, levels, db = cfg.hidden_size, cfg.fff_depth + 1, cfg.dtype_bytes
    read = sum(min(rows, 2 ** level) for level in range(levels)) * d * db
    kind = b.matmul_kind
    z = b.add(Op(f"L{i}.fff_in", kind, i, rows, d, levels, dtype=cfg.dtype,
                 flops=2 * rows * d * levels, weight_bytes=read, in_bytes=rows * d * db,
                 out_bytes=rows * levels * db, weight=f"L{i}.fff_in.weight"), x)
    a = b.pointwise(i, "act", "activation", levels, z)
    y = b.add(Op(f"L{i}.fff_out", kind, i, rows, levels, d, dtype=cfg.dtype,
                 flops=2 * rows * levels * d, weight_bytes=read, in_bytes=rows * levels * db,
                 out_bytes=rows * d * db, weight=f"L{i}.fff_out.weight"), a)
    for name in (z, y):
        b.g.nodes[name]["weight_store_bytes"] = cfg.fff_nodes * d * db
    return y


def with_activation_sparsity(g: nx.DiGraph, masks) -> nx.DiGraph:
    """A copy of step graph `g` whose MLPs run on sparse activations (TwELL): `masks[l]` is
    layer l's bool [tokens, f], the neurons that fire. The activation (or gate multiply)
    writes them packed, ELL_INDEX_BYTES of index with each value; the down projection
    multiplies one weight row per entry and reads each active row once (the union over the
    step's tokens). Its dense weight bytes stay resident (`weight_store_bytes`) and
    `act_density` records the fraction of rows it reads."""
    cfg = g.graph["cfg"]
    if cfg.fff_depth is not None:
        raise ValueError(f"{cfg.name}: a fast feed-forward tree (fff_depth) has no down "
                         "projection to run on sparse activations")
    g = g.copy()
    db = cfg.dtype_bytes
    for layer, mask in enumerate(masks):
        mask = np.asarray(mask, bool)
        down = g.nodes[f"L{layer}.down_proj"]["op"]
        entries = int(mask.sum())
        union = int(mask.any(axis=0).sum())
        packed = math.ceil(entries * (db + ELL_INDEX_BYTES))
        bias = cfg.mlp_bias
        g.nodes[down.name].update(
            op=replace(down, flops=2 * entries * down.n + down.m * down.n * bias,
                       weight_bytes=(union + bias) * down.n * db, in_bytes=packed),
            weight_store_bytes=down.weight_bytes, act_density=union / down.k)
        act = f"L{layer}.gate_mul" if cfg.gated_mlp else f"L{layer}.act"
        g.nodes[act]["op"] = replace(g.nodes[act]["op"], out_bytes=packed)
        for _, _, data in g.out_edges(act, data=True):
            data["bytes"] = packed
    return g


def _embeddings(b: _Builder) -> str:
    """Token (+ learned position, + BERT token-type) lookups, summed; BERT normalises them."""
    cfg = b.cfg
    tables = [("embed", cfg.vocab_size)]
    if cfg.position == "learned":
        tables.append(("pos_embed", cfg.max_position_embeddings))
    if cfg.type_vocab_size:
        tables.append(("type_embed", cfg.type_vocab_size))
    parts = [b.add(embedding(name, b.rows, size, cfg.hidden_size, cfg.dtype))
             for name, size in tables]
    if len(parts) > 1:
        x = b.pointwise(-1, "embed_sum", "add", cfg.hidden_size, *parts)
    else:
        x = parts[0]
    return b.norm(-1, "embed_norm", x) if cfg.architecture == "bert" else x


def _head(b: _Builder, x: str) -> None:
    """Final norm (pre-norm models), LM head and greedy sample on each sequence's last token."""
    cfg, last = b.cfg, b.batch  # one row per sequence goes on
    last_bytes = last * cfg.hidden_size * cfg.dtype_bytes
    if cfg.architecture != "bert":
        op = norm("final_norm", cfg.norm, -1, last, cfg.hidden_size, cfg.dtype)
        x = b.add(op, x, edge_bytes=last_bytes)
    tied = "embed.weight" if cfg.tie_word_embeddings else None
    head = matmul("lm_head", "lm_head", -1, last, cfg.hidden_size, cfg.vocab_size, cfg.dtype,
                  weight=tied)
    logits = b.add(head, x, edge_bytes=last_bytes)
    b.add(sample("sample", last, cfg.vocab_size, cfg.dtype), logits)


def _step_shape(
    cfg: ModelConfig, phase: str, batch: int, seq_len: int | None, ctx_len: int | None
) -> tuple[int, int]:
    """(new tokens, cached tokens) per sequence, after defaults and checks."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is not one of {', '.join(PHASES)}")
    if phase == "decode" and seq_len not in (None, 1):
        raise ValueError(f"seq_len={seq_len!r}: decode adds one token per sequence")
    _check_count("batch", batch, 1)
    if seq_len is not None:
        _check_count("seq_len", seq_len, 1)
    if ctx_len is not None:
        _check_count("ctx_len", ctx_len, 0)
    # Learned positions have no row past the table: defaults shrink to fit it.
    room = cfg.max_position_embeddings if cfg.position == "learned" else None
    if phase == "decode":
        seq = 1
        ctx = DEFAULT_CTX_LEN if ctx_len is None else ctx_len
        if room is not None and ctx_len is None:
            ctx = min(ctx, room - 1)
    else:
        ctx = ctx_len or 0
        seq = DEFAULT_SEQ_LEN if seq_len is None else seq_len
        if room is not None and seq_len is None:
            seq = min(seq, max(room - ctx, 1))
    if room is not None and ctx + seq > room:
        raise ValueError(
            f"ctx_len + seq_len = {ctx + seq} exceeds max_position_embeddings={room} of {cfg.name}"
        )
    return seq, ctx


def _check_count(label: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{label}={value!r} must be an integer >= {low}")
