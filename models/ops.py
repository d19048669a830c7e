"""Op: one node of a model's op graph, carrying its shape, FLOPs and bytes.

Every cost convention lives in this file, so the wafer compiler, the simulator and the GPU
baseline charge the same work for the same op:

- Matmul kinds (gemv, gemm, lm_head): [m, k] @ [k, n], `count` times; 2*m*k*n*count FLOPs,
  plus m*n*count for a bias. weight_bytes is the [k, n] matrix plus the bias.
- Attention, per (sequence, query head), `count` = batch*heads of them; kv_len = cached + new:
  attn_score is [m=q_rows, k=head_dim] @ [head_dim, n=kv_len],
  attn_value is [m=q_rows, k=kv_len] @ [kv_len, n=head_dim].
  Query head h uses KV head h // (heads // kv_heads) (grouped-query attention). Causal prefill
  is charged the full q_rows x kv_len rectangle: a dense mesh kernel computes the masked half
  too (halve it for a flash-attention estimate).
- KV cache: attn_score reads the cached K rows and appends the new tokens' K rows; attn_value
  does the same for V. Projections never touch the cache. The new rows arrive as activations.
- Elementwise and norm ops: an [m, n] output, `count` times, FLOPS_PER_ELEMENT[kind] each.
- Embedding lookups: [m] token ids (int32) select m rows of a [k, n] table; weight_bytes counts
  only the rows read (the table size is k*n*dtype bytes). sample: argmax over [m, n] logits.
- Bytes: weights once per execution; activations in and out at the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from models.config import DTYPE_BYTES

OP_KINDS = (
    "embedding",
    "gemv",
    "gemm",
    "attn_score",
    "softmax",
    "attn_value",
    "rmsnorm",
    "layernorm",
    "rope",
    "activation",
    "mul",
    "add",
    "lm_head",
    "sample",
)
MATMUL_KINDS = ("gemv", "gemm", "lm_head")
ATTENTION_KINDS = ("attn_score", "attn_value")
# FLOPs per output element. softmax: max, subtract, exp, sum, divide; norms: square or
# centre, reduce, scale, affine; rope: x*cos + rotate(x)*sin; sample: one compare per logit.
FLOPS_PER_ELEMENT = {
    "softmax": 5,
    "rmsnorm": 5,
    "layernorm": 5,
    "rope": 3,
    "activation": 1,
    "mul": 1,
    "add": 1,
    "sample": 1,
}
TOKEN_ID_BYTES = 4
_NON_NEGATIVE = (
    "m", "k", "n", "count", "heads", "kv_heads", "flops",
    "weight_bytes", "in_bytes", "out_bytes", "kv_read_bytes", "kv_write_bytes",
)


@dataclass(frozen=True)
class Op:
    """One op: dims, repetitions and costs; see the module docstring for the conventions.

    `weight` names the weight tensor the op reads (e.g. "L3.q_proj.weight"; its bias, if any,
    travels with it); a tied LM head names the token embedding's "embed.weight".
    """

    name: str
    kind: str
    layer: int
    m: int
    k: int
    n: int
    count: int = 1
    heads: int = 0
    kv_heads: int = 0
    dtype: str = "bf16"
    flops: int = 0
    weight_bytes: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    kv_read_bytes: int = 0
    kv_write_bytes: int = 0
    weight: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            choices = ", ".join(OP_KINDS)
            raise ValueError(f"op {self.name}: kind={self.kind!r} is not one of {choices}")
        if self.dtype not in DTYPE_BYTES:
            choices = ", ".join(DTYPE_BYTES)
            raise ValueError(f"op {self.name}: dtype={self.dtype!r} is not one of {choices}")
        for field in _NON_NEGATIVE:
            if getattr(self, field) < 0:
                raise ValueError(f"op {self.name}: {field}={getattr(self, field)} must be >= 0")

    @property
    def bytes(self) -> int:
        """All memory traffic of one execution: weights, activations and KV cache."""
        return (
            self.weight_bytes
            + self.in_bytes
            + self.out_bytes
            + self.kv_read_bytes
            + self.kv_write_bytes
        )


def matmul(
    name: str,
    kind: str,
    layer: int,
    m: int,
    k: int,
    n: int,
    dtype: str,
    bias: bool = False,
    weight: str | None = None,
) -> Op:
    """Activations [m, k] times a [k, n] weight (+ bias)."""
    b = DTYPE_BYTES[dtype]
    return Op(
        name, kind, layer, m, k, n, dtype=dtype,
        flops=2 * m * k * n + m * n * bias,
        weight_bytes=(k * n + n * bias) * b,
        in_bytes=m * k * b,
        out_bytes=m * n * b,
        weight=weight or f"{name}.weight",
    )


def attn_score(
    name: str, layer: int, batch: int, heads: int, kv_heads: int, q_rows: int, cached: int,
    head_dim: int, dtype: str,
) -> Op:
    """Q @ K^T for every (sequence, head): new queries against cached plus new keys."""
    b, kv_len, count = DTYPE_BYTES[dtype], cached + q_rows, batch * heads
    return Op(
        name, "attn_score", layer, q_rows, head_dim, kv_len,
        count=count, heads=heads, kv_heads=kv_heads, dtype=dtype,
        flops=2 * q_rows * head_dim * kv_len * count,
        in_bytes=(count + batch * kv_heads) * q_rows * head_dim * b,
        out_bytes=count * q_rows * kv_len * b,
        kv_read_bytes=batch * kv_heads * cached * head_dim * b,
        kv_write_bytes=batch * kv_heads * q_rows * head_dim * b,
    )


def attn_value(
    name: str, layer: int, batch: int, heads: int, kv_heads: int, q_rows: int, cached: int,
    head_dim: int, dtype: str,
) -> Op:
    """Probabilities @ V for every (sequence, head): cached plus new values."""
    b, kv_len, count = DTYPE_BYTES[dtype], cached + q_rows, batch * heads
    return Op(
        name, "attn_value", layer, q_rows, kv_len, head_dim,
        count=count, heads=heads, kv_heads=kv_heads, dtype=dtype,
        flops=2 * q_rows * kv_len * head_dim * count,
        in_bytes=(count * kv_len + batch * kv_heads * head_dim) * q_rows * b,
        out_bytes=count * q_rows * head_dim * b,
        kv_read_bytes=batch * kv_heads * cached * head_dim * b,
        kv_write_bytes=batch * kv_heads * q_rows * head_dim * b,
    )


def elementwise(
    name: str,
    kind: str,
    layer: int,
    rows: int,
    width: int,
    dtype: str,
    operands: int = 1,
    count: int = 1,
    heads: int = 0,
) -> Op:
    """An op over [rows, width] elements, `count` times, reading `operands` such tensors."""
    b, elements = DTYPE_BYTES[dtype], rows * width * count
    return Op(
        name, kind, layer, rows, 0, width, count=count, heads=heads, dtype=dtype,
        flops=FLOPS_PER_ELEMENT[kind] * elements,
        in_bytes=operands * elements * b,
        out_bytes=elements * b,
    )


def norm(name: str, kind: str, layer: int, rows: int, width: int, dtype: str) -> Op:
    """RMSNorm (a scale per channel) or LayerNorm (scale and shift)."""
    params = width * (2 if kind == "layernorm" else 1)
    op = elementwise(name, kind, layer, rows, width, dtype)
    return replace(op, weight_bytes=params * DTYPE_BYTES[dtype], weight=f"{name}.weight")


def embedding(name: str, rows: int, table_rows: int, width: int, dtype: str) -> Op:
    """Look up `rows` token ids in a [table_rows, width] table."""
    b = DTYPE_BYTES[dtype]
    return Op(
        name, "embedding", -1, rows, table_rows, width, dtype=dtype,
        weight_bytes=rows * width * b,
        in_bytes=rows * TOKEN_ID_BYTES,
        out_bytes=rows * width * b,
        weight=f"{name}.weight",
    )


def sample(name: str, rows: int, vocab: int, dtype: str) -> Op:
    """Greedy sampling: argmax over each row of logits, writing one token id per row."""
    op = elementwise(name, "sample", -1, rows, vocab, dtype)
    return replace(op, out_bytes=rows * TOKEN_ID_BYTES)
