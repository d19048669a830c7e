"""One LLaMA-family decoder layer in prefill, on a square grid of cores.

Prefill is matmul-bound, so (as in WaferLLM) the [seq, d] activations live in 2D tiles and every
projection is a GEMM on the grid: MeshGEMM (interleaved Cannon), or Cannon / SUMMA to compare.
The layout is chosen so that nothing is reshuffled between ops:
- the grid is the largest s x s square at the region's top-left; logical core (i, j) sits at
  physical (pos[i], pos[j]), pos the interleaved ring for meshgemm, the identity otherwise.
- activations: core (i, j) holds rows [i*mb, (i+1)*mb) and columns [j*w, (j+1)*w) (w = db or fb,
  ceil(dim / s)); tiles past an edge are zero padding.
- heads are shared by grid columns as decode shares them by rows (`head_layout`), and the QKV
  GEMM leaves one tile per (head, dims chunk), so attention finds Q, K, V for the same heads
  and dims on one core. RoPE needs pairs side by side: q and k weights (and biases) hold each
  head's dims in pair order 0, hd/2, 1, hd/2 + 1, ... (`pack_weights`).
- causal attention by query blocks: core (i, j) keeps its Q tile and K/V blocks i, i-1, .., 0
  flow down its column (no wrap-around: no block above i is needed), with an online softmax;
  score partials of a head split over several columns are all-reduced within those columns.
Outputs `{prefix}.k_cache` [seq, KV*hd] (k after RoPE, pair order within each head;
`unpack_k_cache` gives model order) and `{prefix}.v_cache` [seq, KV*hd] (model order).

Sampled steps (`steps`, for timing only): each GEMM and the attention run s steps of the same
shape (shift, multiply; forward a K/V block, fold it in), so a layer's program grows as s^3 and
a full wafer's (s = 248: about 350 M messages a layer) cannot be held in memory. With `steps`
= T < s every such loop runs its first T steps, the last one ending the loop as step s - 1
would; the layer's time is then affine in T, and wafersim.whole simulates two values of T and
extrapolates to s. Such a program computes nothing useful: it is for the simulator alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compiler.algorithms.allreduce import ktree_reduce, line_broadcast
from compiler.algorithms.attention import HeadLayout, head_layout
from compiler.algorithms.common import Region, check_dims, finish
from compiler.algorithms.meshgemm import GEMM_ALGOS, interleaved_ring
from compiler.algorithms.mlp import ACTIVATIONS
from compiler.program import (
    INPUT,
    OP_ADD,
    OP_COPY,
    OP_EXPSUB,
    OP_FILL,
    OP_MATMUL_ACC,
    OP_MATMUL_T,
    OP_MAX,
    OP_MUL,
    OP_PUT,
    OP_ROPE,
    OP_ROWMAX,
    OP_RSQRT,
    OP_SQSUM,
    OP_ZERO,
    OUTPUT,
    SCRATCH,
    MeshProgram,
    ProgramBuilder,
    ProgramError,
)
from compiler.targets import DTYPE_BYTES, MeshTarget

MASKED = -1e30  # added to scores of keys after the query (exp of it is 0, no inf arithmetic)
# Colours: GEMM shifts or broadcasts 0-3, the skew 2, the K/V pipeline 4, all-reduces 5-8.
_A, _B, _SKEW, _KV, _REDUCE = 0, 1, 2, 4, 5


@dataclass(frozen=True, eq=False)
class PrefillPlan:
    """Shapes and placement of one prefill layer (see the module docstring)."""

    seq: int
    d: int
    heads: int
    kv_heads: int
    hd: int
    f: int
    s: int  # grid side
    mb: int  # sequence rows per tile
    db: int  # hidden columns per tile
    fb: int  # ffn columns per tile
    core: np.ndarray  # [s, s] physical core id of logical (i, j)
    pos: np.ndarray  # [s] physical offset of logical row / column index
    lay: HeadLayout  # heads over logical grid columns (`lay.group` counts physical columns)
    phys_lay: HeadLayout  # heads over physical columns, so a head's columns are adjacent
    algo: str
    steps: int  # steps each GEMM / attention loop runs: s, or fewer when sampled (see above)

    @property
    def g(self) -> int:
        return self.heads // self.kv_heads

    @property
    def ij(self) -> tuple[np.ndarray, np.ndarray]:
        return np.meshgrid(np.arange(self.s), np.arange(self.s), indexing="ij")


def prefill_plan(region: Region, width: int, seq: int, d: int, heads: int, kv_heads: int,
                 hd: int, f: int, algo: str = "meshgemm", steps: int | None = None
                 ) -> PrefillPlan:
    """The layout of a prefill layer on `region` of a mesh `width` cores wide; `steps`: run
    only that many steps of each loop (timing only, module docstring)."""
    check_dims(seq=seq, d=d, heads=heads, kv_heads=kv_heads, hd=hd, f=f)
    if algo not in GEMM_ALGOS:
        raise ProgramError(f"prefill gemm algorithm {algo!r} is not one of "
                           f"{', '.join(GEMM_ALGOS)}")
    if heads % kv_heads:
        raise ProgramError(f"prefill: heads={heads} is not a multiple of kv_heads={kv_heads}")
    s = min(region.rows, region.cols)
    if hd % 2 == 0 and s > kv_heads * hd // 2:
        raise ProgramError(f"prefill: a {s}x{s} grid has more columns than the {kv_heads} KV "
                           f"heads have RoPE pairs ({kv_heads * hd // 2}); use a grid of at "
                           f"most {kv_heads * hd // 2} x {kv_heads * hd // 2} cores")
    phys = head_layout(s, kv_heads, heads // kv_heads, hd)  # refuses an odd head_dim
    pos = interleaved_ring(s) if algo == "meshgemm" else np.arange(s)
    lay = HeadLayout(phys.h0[pos], phys.nh[pos], phys.e0[pos], phys.ne[pos], phys.group[pos],
                     phys.group_rows[pos], phys.heads, phys.g, phys.hd)
    core = (region.y0 + pos[:, None]) * width + region.x0 + pos[None, :]
    if steps is not None and not 1 <= steps <= s:
        raise ProgramError(f"prefill: {steps} sampled steps on a {s}x{s} grid (1..{s})")
    return PrefillPlan(seq, d, heads, kv_heads, hd, f, s, math.ceil(seq / s), math.ceil(d / s),
                       math.ceil(f / s), core, pos, lay, phys, algo, s if steps is None else steps)


# ---- host-side helpers: weights, constants, caches -------------------------------------------

def pair_order(n_heads: int, hd: int) -> np.ndarray:
    """Column permutation putting each head's RoPE pairs side by side: entry n is the model's
    column at position n (dims 0, hd/2, 1, hd/2 + 1, ... of head 0, then head 1, ...)."""
    half = hd // 2
    within = np.stack([np.arange(half), np.arange(half) + half], axis=1).ravel()
    return (np.arange(n_heads)[:, None] * hd + within[None, :]).ravel()


def pack_weights(weights: dict[str, np.ndarray], prefix: str, heads: int, kv_heads: int,
                 hd: int) -> dict[str, np.ndarray]:
    """The layer's input tensors from models.reference weights (`{prefix}.q` etc., [in, out]):
    q, k and their biases with columns in `pair_order`, everything else as is."""
    out = {k: v for k, v in weights.items() if k.startswith(prefix + ".")}
    for name, n in (("q", heads), ("k", kv_heads)):
        for key in (f"{prefix}.{name}", f"{prefix}.{name}_bias"):
            if key in out:
                out[key] = out[key][:, pair_order(n, hd)]
    return out


def unpack_k_cache(k_cache: np.ndarray, kv_heads: int, hd: int) -> np.ndarray:
    """k_cache [seq, KV*hd] in pair order -> model order (as models.reference caches k)."""
    out = np.empty_like(k_cache)
    out[:, pair_order(kv_heads, hd)] = k_cache
    return out


def rope_table(seq: int, hd: int, theta: float = 10000.0) -> np.ndarray:
    """Tensor `rope` [2 * seq, hd/2]: cos then sin of position * theta^(-2i/hd), positions
    0..seq-1 (models.reference.rope_angles(cfg, arange(seq)).reshape(-1, hd // 2))."""
    angle = np.multiply.outer(np.arange(seq, dtype=np.float64),
                              theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd))
    return np.concatenate([np.cos(angle), np.sin(angle)]).astype(np.float32)


def causal_mask(plan: PrefillPlan) -> np.ndarray:
    """Tensor `causal_mask` [mb, mb] added to the scores of a diagonal block."""
    r = np.arange(plan.mb)
    return np.where(r[None, :] > r[:, None], MASKED, 0.0).astype(np.float32)


def prefill_input(bld: ProgramBuilder, plan: PrefillPlan, name: str) -> np.ndarray:
    """Buffers [s, s] holding tensor `name` [seq, d] in the activation layout."""
    i, j = plan.ij
    return _alloc(bld, plan, True, plan.mb, plan.db, INPUT, bld.tensor(name, plan.seq, plan.d),
                  i * plan.mb, j * plan.db)


def prefill_output(bld: ProgramBuilder, plan: PrefillPlan, bufs: np.ndarray, name: str) -> None:
    """Gather activation-layout buffers into output tensor `name` [seq, d]."""
    i, j = plan.ij
    bld.mark(bufs.ravel(), OUTPUT, bld.tensor(name, plan.seq, plan.d), (i * plan.mb).ravel(),
             (j * plan.db).ravel())


# ---- the layer -------------------------------------------------------------------------------

def prefill_layer(bld: ProgramBuilder, region: Region, h, seq: int, d: int, heads: int,
                  kv_heads: int, hd: int, f: int, prefix: str, rope: str | None = "rope",
                  eps: float = 1e-5, gated: bool = True, act: str = "silu",
                  qkv_bias: bool = False, algo: str = "meshgemm", step: int = 0,
                  mask: str = "causal_mask", norm: str = "rmsnorm", bias: bool = False,
                  post_norm: bool = False, steps: int | None = None):
    """h + Attention(Norm(h)), then + MLP(Norm(.)), for `seq` tokens at positions 0..

    `h`: [s, s] buffer ids in the layout of `prefill_plan(region, bld.width, ...)` (see
    `prefill_input`). Weights `{prefix}.attn_norm`, `.q`, `.k`, `.v`, `.o` (`.q_bias`, ...),
    `.mlp_norm`, `.gate`, `.up`, `.down` as `pack_weights` gives them; constants `rope`
    (`rope_table`; None: no RoPE, as with learned positions) and `mask` (`causal_mask`).
    `norm`: "rmsnorm" or "layernorm" (its biases `.attn_norm_bias`, `.mlp_norm_bias`); `bias`:
    the o and MLP projections have biases (`.o_bias`, `.up_bias`, ...), as GPT-2's do;
    `post_norm`: BERT's order, Norm(h + Attention(h)) then Norm(. + MLP(.)), and attention
    over every token (an encoder's; `mask` then holds zeros). `steps`: sampled steps (timing
    only, module docstring).
    Returns (output buffer ids, next step).
    """
    plan = prefill_plan(region, bld.width, seq, d, heads, kv_heads, hd, f, algo, steps)
    h, step = prefill_attention_block(bld, plan, h, prefix, rope=rope, mask=mask, eps=eps,
                                      qkv_bias=qkv_bias, step=step, norm=norm, o_bias=bias,
                                      post_norm=post_norm)
    return prefill_mlp_block(bld, plan, h, prefix, gated=gated, act=act, eps=eps, step=step,
                             norm=norm, bias=bias, post_norm=post_norm)


def prefill_attention_block(bld: ProgramBuilder, plan: PrefillPlan, h, prefix: str, *,
                            rope: str | None = "rope", mask: str = "causal_mask",
                            eps: float = 1e-5, qkv_bias: bool = False, step: int = 0,
                            norm: str = "rmsnorm", o_bias: bool = False,
                            post_norm: bool = False):
    """h + O(causal GQA(RoPE(Q), RoPE(K), V)) of Norm(h) (+ o's bias), or with `post_norm`
    Norm(h + O(...) of h); writes `{prefix}.k_cache`, `{prefix}.v_cache`. Returns (output
    buffer ids, next step)."""
    p, lay, g, hd, s = plan, plan.lay, plan.g, plan.hd, plan.s
    i, j = p.ij
    if post_norm:  # the GEMMs shift their A tiles through it: keep h for the residual
        xn, step = _copy(bld, p, h, step)
    else:
        xn, step = prefill_norm(bld, p, h, f"{prefix}.attn_norm", eps, step, norm)
    # One N-part per (head held, query head of the group) for q, per head held for k and v.
    heads_held = range(int(lay.nh.max()))
    width = [np.where(lay.nh > hh, lay.ne, 0) for hh in heads_held]
    kcol = [(lay.h0 + hh) * hd + lay.e0 for hh in heads_held]
    qcol = {(hh, qq): ((lay.h0 + hh) * g + qq) * hd + lay.e0 for hh in heads_held
            for qq in range(g)}
    names = {n: bld.tensor(f"{prefix}.{n}", p.d, cols) for n, cols in (
        ("q", p.heads * hd), ("k", p.kv_heads * hd), ("v", p.kv_heads * hd))}
    parts = ([("q", qcol[hq], width[hq[0]]) for hq in qcol]
             + [(n, kcol[hh], width[hh]) for n in ("k", "v") for hh in heads_held])
    xa = [(xn, np.full(s, p.db), np.arange(s) * p.db)]
    out, step = _gemm(bld, p, xa, [(names[n], c0, w) for n, c0, w in parts], step)
    if qkv_bias:
        tb = {n: bld.tensor(f"{prefix}.{n}_bias", 1, names_cols) for n, names_cols in (
            ("q", p.heads * hd), ("k", p.kv_heads * hd), ("v", p.kv_heads * hd))}
        for (n, c0, w), y in zip(parts, out):
            _add_bias(bld, p, y, tb[n], c0, w, step)
        step += 1
    q = dict(zip(qcol, out[:len(qcol)]))
    k = out[len(qcol):len(qcol) + len(width)]
    v = out[len(qcol) + len(width):]

    every = p.core.ravel()
    if rope is not None:  # a [2, mb * ne/2] table per core of cos then sin, rows and pairs
        tr = bld.tensor(rope, 2 * p.seq, hd // 2)
        ne = lay.ne[j]
        cos = _alloc(bld, p, True, p.mb, ne // 2, INPUT, tr, i * p.mb, lay.e0[j] // 2)
        sin = _alloc(bld, p, True, p.mb, ne // 2, INPUT, tr, p.seq + i * p.mb, lay.e0[j] // 2)
        table = _alloc(bld, p, True, 2, p.mb * ne // 2)
        bld.compute(every, step, OP_PUT, c=table.ravel(), a=cos.ravel())
        bld.compute(every, step, OP_PUT, c=table.ravel(), a=sin.ravel(),
                    imm=((p.mb * ne // 2).ravel(), 0.0))
        for y in list(q.values()) + k:
            on = y >= 0
            bld.compute(p.core[on], step + 1, OP_ROPE, c=y[on], a=y[on], b=table[on])
        step += 2
    for cache, ys in (("k_cache", k), ("v_cache", v)):
        tc = bld.tensor(f"{prefix}.{cache}", p.seq, p.kv_heads * hd)
        for hh, y in enumerate(ys):
            on = y >= 0
            bld.mark(y[on], OUTPUT, tc, (i * p.mb)[on], kcol[hh][j][on])

    if post_norm and p.seq % p.s:
        raise ProgramError(f"encoder prefill: {p.seq} tokens must be a multiple of the grid "
                           f"side {p.s} (padded keys would be attended to)")
    o, step = _attention(bld, p, q, k, v, mask, step, causal=not post_norm)
    oa = [(o[hq], width[hq[0]], qcol[hq]) for hq in qcol]  # V's dims are in model order
    to = bld.tensor(f"{prefix}.o", p.heads * hd, p.d)
    (proj,), step = _gemm(bld, p, oa, [(to, np.arange(s) * p.db, np.full(s, p.db))], step)
    return _residual(bld, p, h, proj, f"{prefix}.o_bias" if o_bias else None,
                     f"{prefix}.attn_norm" if post_norm else None, eps, norm, step)


def prefill_mlp_block(bld: ProgramBuilder, plan: PrefillPlan, h, prefix: str, *,
                      gated: bool = True, act: str = "silu", eps: float = 1e-5, step: int = 0,
                      norm: str = "rmsnorm", bias: bool = False, post_norm: bool = False):
    """h + down(act(gate(x)) * up(x)), x = Norm(h) (no gate: down(act(up(x)))); `bias`: each
    projection adds its bias; `post_norm`: Norm(h + down(...) of h). Returns (output buffer
    ids, next step)."""
    if act not in ACTIVATIONS:
        raise ProgramError(f"activation {act!r} is not one of {', '.join(ACTIVATIONS)}")
    p, s = plan, plan.s
    if post_norm:
        xn, step = _copy(bld, p, h, step)
    else:
        xn, step = prefill_norm(bld, p, h, f"{prefix}.mlp_norm", eps, step, norm)
    fcols = (np.arange(s) * p.fb, np.full(s, p.fb))
    names = ("gate", "up") if gated else ("up",)
    outs = [(bld.tensor(f"{prefix}.{n}", p.d, p.f), *fcols) for n in names]
    ys, step = _gemm(bld, p, [(xn, np.full(s, p.db), np.arange(s) * p.db)], outs, step)
    if bias:
        for n, y in zip(names, ys):
            _add_bias(bld, p, y, bld.tensor(f"{prefix}.{n}_bias", 1, p.f), *fcols, step)
        step += 1
    every = p.core.ravel()
    m = bld.like(ys[0])
    bld.compute(every, step, ACTIVATIONS[act], c=m.ravel(), a=ys[0].ravel())
    if gated:
        bld.compute(every, step + 1, OP_MUL, c=m.ravel(), a=m.ravel(), b=ys[1].ravel())
    td = bld.tensor(f"{prefix}.down", p.f, p.d)
    (down,), step = _gemm(bld, p, [(m, np.full(s, p.fb), np.arange(s) * p.fb)],
                          [(td, np.arange(s) * p.db, np.full(s, p.db))], step + 2)
    return _residual(bld, p, h, down, f"{prefix}.down_bias" if bias else None,
                     f"{prefix}.mlp_norm" if post_norm else None, eps, norm, step)


def lower_prefill_layer(seq: int, d: int, heads: int, kv_heads: int, hd: int, f: int,
                        rows: int, cols: int, algo: str = "meshgemm", *, gated: bool = True,
                        act: str = "silu", qkv_bias: bool = False, eps: float = 1e-5,
                        prefix: str = "L", dtype: str = "bf16",
                        target: MeshTarget | None = None) -> MeshProgram:
    """A program for one prefill layer on a rows x cols mesh: tensor "h" [seq, d] in, "out"
    [seq, d] and the caches out, checked against `target`.

    >>> lower_prefill_layer(8, 16, 2, 1, 8, 32, 2, 2).meta["grid"]
    '2x2'
    """
    check_dims(rows=rows, cols=cols)
    bld = ProgramBuilder(cols, rows, dtype)
    region = Region(rows, cols)
    plan = prefill_plan(region, cols, seq, d, heads, kv_heads, hd, f, algo)
    h = prefill_input(bld, plan, "h")
    out, _ = prefill_layer(bld, region, h, seq, d, heads, kv_heads, hd, f, prefix, eps=eps,
                           gated=gated, act=act, qkv_bias=qkv_bias, algo=algo)
    prefill_output(bld, plan, out, "out")
    bld.meta.update(op="prefill_layer", algo=algo, seq=seq, d=d, heads=heads,
                    kv_heads=kv_heads, hd=hd, f=f, rows=plan.s, cols=plan.s,
                    grid=f"{plan.s}x{plan.s}", mb=plan.mb)
    return finish(bld.build(), target, f"prefill layer seq={seq} d={d} on {cols}x{rows} cores")


# ---- pieces ----------------------------------------------------------------------------------

def _alloc(bld, p: PrefillPlan, on, rows, cols, role=SCRATCH, tensor=-1, r0=0, c0=0):
    """One buffer per logical core where `on` ([s, s] or scalar); [s, s] ids, -1 elsewhere."""
    shape = (p.s, p.s)
    on = np.broadcast_to(on, shape)
    out = np.full(shape, -1, dtype=np.int64)
    if on.any():
        args = [np.broadcast_to(v, shape)[on] for v in (rows, cols, r0, c0)]
        out[on] = bld.buffers(p.core[on], args[0], args[1], role, tensor, args[2], args[3])
    return out


def _nbytes(bld, elems) -> np.ndarray:
    return np.ceil(np.asarray(elems) * DTYPE_BYTES[bld.dtype]).astype(np.int64)


def _allreduce(bld, lines, acc, tmp, step, nbytes, op=OP_ADD) -> int:
    """All-reduce `acc` ([lines, n] buffer ids) along each line: K-tree, then multicast."""
    if lines.shape[1] < 2 or not len(lines):
        return step
    root, step = ktree_reduce(bld, lines, acc, tmp, step, 2, _REDUCE, nbytes, op=op)
    return line_broadcast(bld, lines, root, acc[:, root], acc, step, _REDUCE + 2, nbytes)


def prefill_norm(bld, p: PrefillPlan, h, weight: str, eps: float, step: int,
                 kind: str = "rmsnorm"):
    """RMSNorm (or LayerNorm: centred first, bias `weight + "_bias"` added last) of every row
    of the [seq, d] tiles; row sums are all-reduced along grid rows."""
    if kind not in ("rmsnorm", "layernorm"):
        raise ProgramError(f"norm {kind!r} is not one of rmsnorm, layernorm")
    if kind == "layernorm" and p.d % p.s:
        raise ProgramError(f"prefill LayerNorm: d={p.d} must be a multiple of the grid side "
                           f"{p.s} (padded columns would enter the variance)")
    i, j = p.ij
    every = p.core.ravel()
    phys = np.argsort(p.pos)  # reduce along physically adjacent cores
    nbytes = np.full(p.s, _nbytes(bld, p.mb))
    x = np.asarray(h)
    if kind == "layernorm":  # minus the mean: row sums of h @ (-1/d), all-reduced
        neg = _alloc(bld, p, True, p.db, 1)
        total = _alloc(bld, p, True, p.mb, 1)
        bld.compute(every, step, OP_FILL, c=neg.ravel(), imm=(-1.0 / p.d, 0.0))
        bld.compute(every, step, OP_ZERO, c=total.ravel())
        bld.compute(every, step + 1, OP_MATMUL_ACC, c=total.ravel(), a=x.ravel(), b=neg.ravel())
        step = _allreduce(bld, p.core[:, phys], total[:, phys], bld.like(total)[:, phys],
                          step + 2, nbytes)
        x = bld.like(h)
        bld.compute(every, step, OP_ADD, c=x.ravel(), a=np.asarray(h).ravel(), b=total.ravel())
        step += 1
    gw = _alloc(bld, p, True, 1, p.db, INPUT, bld.tensor(weight, 1, p.d), 0, j * p.db)
    ss = _alloc(bld, p, True, p.mb, 1)
    bld.compute(every, step, OP_SQSUM, c=ss.ravel(), a=x.ravel())
    step = _allreduce(bld, p.core[:, phys], ss[:, phys], bld.like(ss)[:, phys], step + 1,
                      nbytes)
    out = bld.like(h)
    bld.compute(every, step, OP_RSQRT, c=ss.ravel(), a=ss.ravel(), imm=(1.0 / p.d, eps))
    bld.compute(every, step + 1, OP_MUL, c=out.ravel(), a=x.ravel(), b=ss.ravel())
    bld.compute(every, step + 2, OP_MUL, c=out.ravel(), a=out.ravel(), b=gw.ravel())
    step += 3
    if kind == "layernorm":
        _add_bias(bld, p, out, bld.tensor(weight + "_bias", 1, p.d), np.arange(p.s) * p.db,
                  np.full(p.s, p.db), step)
        step += 1
    return out, step


def _residual(bld, p: PrefillPlan, h, y, bias: str | None, post_norm: str | None, eps: float,
              norm: str, step: int):
    """h + (y + bias), then the post-norm `post_norm` (BERT) when given; y is a projection's
    [seq, d] tiles. Returns (buffer ids, next step)."""
    if bias:
        _add_bias(bld, p, y, bld.tensor(bias, 1, p.d), np.arange(p.s) * p.db,
                  np.full(p.s, p.db), step)
        step += 1
    out = bld.like(h)
    bld.compute(p.core.ravel(), step, OP_ADD, c=out.ravel(), a=np.asarray(h).ravel(),
                b=np.asarray(y).ravel())
    if post_norm:
        return prefill_norm(bld, p, out, post_norm, eps, step + 1, norm)
    return out, step + 1


def _copy(bld, p: PrefillPlan, h, step: int):
    """A copy of the tiles `h`; returns (buffer ids, next step)."""
    out = bld.like(h)
    bld.compute(p.core.ravel(), step, OP_COPY, c=out.ravel(), a=np.asarray(h).ravel())
    return out, step + 1


def _add_bias(bld, p: PrefillPlan, y, tensor: int, c0, w, step: int) -> None:
    """y += bias on every core holding a tile of y ([s, s] ids, -1: none): the tile's columns
    c0[j]:+w[j] of the bias tensor [1, n], added to each of its rows."""
    _, j = p.ij
    on = np.asarray(y) >= 0
    c0, w = np.asarray(c0)[j], np.asarray(w)[j]
    bias = bld.buffers(p.core[on], 1, w[on], INPUT, tensor, 0, c0[on])
    bld.compute(p.core[on], step, OP_ADD, c=np.asarray(y)[on], a=np.asarray(y)[on], b=bias)


def _gemm(bld, p: PrefillPlan, a_parts, n_parts, step):
    """C_q = sum_p A_p @ B_pq on the grid, for N-parts q and K-parts p.

    a_parts: (buffers [s, s], width [s], row0 [s]): core (i, k) holds rows block i of A_p's
    K-block k, `width[k]` columns wide (0: absent), whose B rows start at `row0[k]`.
    n_parts: (tensor, col0 [s], width [s]): B_pq of K-block k and grid column j is
    tensor[row0[k]:+width[k], col0[j]:+width[j]]. Returns ([C_q buffers [s, s]], next step);
    C_q on core (i, j) holds rows block i, the N-part's columns of grid column j.
    """
    i, j = p.ij
    out = []
    for _, _, wq in n_parts:
        c = _alloc(bld, p, wq[j] > 0, p.mb, wq[j])
        on = c >= 0
        bld.compute(p.core[on], step, OP_ZERO, c=c[on])
        out.append(c)
    if p.algo == "summa":
        pool_a = [_pool(bld, p, wa, True, lambda w: (p.mb, w)) for _, wa, _ in a_parts]
        pool_b = [[_pool(bld, p, wa, wq[j] > 0, lambda w, wq=wq: (w, wq[j])) for _, _, wq in
                   n_parts] for _, wa, _ in a_parts]
        return out, _summa(bld, p, a_parts, n_parts, out, pool_a, pool_b, step + 1)
    return out, _cannon(bld, p, a_parts, n_parts, out, step + 1)


def _pool(bld, p: PrefillPlan, widths, on, shape, given=None):
    """Receive buffers by tile width class and parity, [classes, 2, s, s] (-1: none), so a
    tile lands in a buffer of its shape (`shape(width)` -> rows, cols per core). `given`:
    (buffers, K-block held, parity) of tiles already on the cores, which serve as that slot."""
    i, j = p.ij
    cls = np.unique(widths[widths > 0])
    bufs = np.full((len(cls), 2, p.s, p.s), -1, dtype=np.int64)
    if given is not None:
        ids, k, par = given
        have = ids >= 0
        c = np.searchsorted(cls, widths[k])
        bufs[c[have], par[have], i[have], j[have]] = ids[have]
    for n, w in enumerate(cls):
        for par in (0, 1):
            need = np.broadcast_to(on, (p.s, p.s)) & (bufs[n, par] < 0)
            bufs[n, par] = np.where(need, _alloc(bld, p, need, *shape(w)), bufs[n, par])
    return cls, bufs


def _cannon(bld, p, a_parts, n_parts, out, step):
    """Double-buffered: a core's own A and B tiles are one of its two buffers per operand."""
    s, i, j = p.s, *p.ij
    k0 = (i + j) % s  # skewed placement: core (i, j) starts with K-block i + j
    # A arrives unskewed: core (i, k) sends A(i, k) to (i, k - i). Row 0 keeps its tiles as
    # its first buffer; elsewhere the tile left, and its buffer becomes the second one.
    row0 = np.where(i == 0, 0, 1)
    pool_a = [_pool(bld, p, wa, True, lambda w: (p.mb, w), (bufs, j, row0))
              for bufs, wa, _ in a_parts]
    cur_b = [[_alloc(bld, p, (wa[k0] > 0) & (wq[j] > 0), wa[k0], wq[j], INPUT, tq, r0[k0],
                     c0[j]) for tq, c0, wq in n_parts] for _, wa, r0 in a_parts]
    pool_b = [[_pool(bld, p, wa, wq[j] > 0, lambda w, wq=wq: (w, wq[j]), (b, k0, 0 * k0))
               for b, (_, _, wq) in zip(cb, n_parts)] for cb, (_, wa, _) in zip(cur_b, a_parts)]
    cur_a = []
    for (bufs, wa, _), pool in zip(a_parts, pool_a):
        here = wa[k0] > 0
        move = here & (k0 != j)
        dest = _slot(pool, wa, k0, 0)
        if move.any():
            src = p.core[i, k0][move]
            msgs = bld.messages(src, p.core[move], _nbytes(bld, p.mb * wa[k0][move]), _SKEW)
            bld.send(src, step, msgs, bufs[i, k0][move])
            bld.recv(p.core[move], step + 1, msgs, dest[move])
        cur_a.append(np.where(move, dest, np.where(here, bufs[i, k0], -1)))
    step += 2
    left, up = p.core[i, (j - 1) % s], p.core[(i - 1) % s, j]
    for t in range(p.steps):
        base = step + 3 * t
        kt, kn = (i + j + t) % s, (i + j + t + 1) % s
        if t < p.steps - 1:
            nxt_a, nxt_b = [], []
            for pa, ((_, wa, _), pool) in enumerate(zip(a_parts, pool_a)):
                nxt_a.append(_shift(bld, p, cur_a[pa], left, (i, (j + 1) % s),
                                    _slot(pool, wa, kn, (t + 1) % 2), p.mb * wa[kt], _A, base))
                nxt_b.append([_shift(bld, p, cb, up, ((i + 1) % s, j),
                                     _slot(pb, wa, kn, (t + 1) % 2, wq[j] > 0),
                                     wa[kt] * wq[j], _B, base)
                              for cb, pb, (_, _, wq) in zip(cur_b[pa], pool_b[pa], n_parts)])
        for pa in range(len(a_parts)):
            for q in range(len(n_parts)):
                on = (cur_a[pa] >= 0) & (cur_b[pa][q] >= 0)
                bld.compute(p.core[on], base + 1, OP_MATMUL_ACC, c=out[q][on], a=cur_a[pa][on],
                            b=cur_b[pa][q][on])
        if t < p.steps - 1:
            cur_a, cur_b = nxt_a, nxt_b
    return step + 3 * p.steps


def _slot(pool, widths, k, parity, on=True):
    """Per core, the receive buffer of `pool` for a tile of K-block k[i, j] (-1: none)."""
    cls, bufs = pool
    i, j = np.indices(k.shape)
    w = widths[k]
    c = np.clip(np.searchsorted(cls, w), 0, len(cls) - 1)
    got = bufs[c, parity, i, j]
    return np.where((w > 0) & on & (got >= 0), got, -1)


def _shift(bld, p, cur, dst_core, from_, nxt, elems, colour, step):
    """Every core holding a tile sends it to `dst_core`; receivers take the tile of the core
    at logical index `from_` into `nxt`. Returns the receive buffers ([s, s], -1: none)."""
    here = cur >= 0
    ids = np.full(cur.shape, -1, dtype=np.int64)
    if here.any():
        ids[here] = bld.messages(p.core[here], dst_core[here], _nbytes(bld, elems[here]),
                                 colour)
        bld.send(p.core[here], step, ids[here], cur[here])
    incoming = ids[from_]
    got = incoming >= 0
    if np.any(got & (nxt < 0)):
        raise ProgramError("prefill gemm: a tile arrives where no buffer waits for it")
    bld.recv(p.core[got], step + 2, incoming[got], nxt[got])
    return np.where(got, nxt, -1)


def _summa(bld, p, a_parts, n_parts, out, pool_a, pool_b, step):
    s = p.s
    # Row k's B tiles, every k (so that a sampled loop's weights take their whole SRAM).
    own = {(pa, q, k): bld.buffers(p.core[k, np.flatnonzero(wq > 0)], wa[k], wq[wq > 0], INPUT,
                                   tq, r0[k], c0[wq > 0])
           for pa, (_, wa, r0) in enumerate(a_parts) for q, (tq, c0, wq) in enumerate(n_parts)
           for k in range(s) if wa[k]}
    for k in range(p.steps):
        base = step + 3 * k
        for pa, ((bufs, wa, _), pool) in enumerate(zip(a_parts, pool_a)):
            if wa[k] == 0:
                continue
            a = _slot(pool, wa, np.full((s, s), k), k % 2)
            if s > 1:
                line_broadcast(bld, p.core, k, bufs[:, k], a, base, _A,
                               np.full(s, _nbytes(bld, p.mb * wa[k])))
            a[:, k] = bufs[:, k]
            for q, ((_, _, wq), pb) in enumerate(zip(n_parts, pool_b[pa])):
                cols = np.flatnonzero(wq > 0)
                b = _slot(pb, wa, np.full((s, s), k), k % 2)
                if s > 1:
                    line_broadcast(bld, p.core.T[cols], k, own[pa, q, k], b.T[cols], base,
                                   _B + 1, _nbytes(bld, wa[k] * wq[cols]))
                b[k, cols] = own[pa, q, k]
                on = np.zeros((s, s), bool)
                on[:, cols] = True
                bld.compute(p.core[on], base + 2, OP_MATMUL_ACC, c=out[q][on], a=a[on], b=b[on])
    return step + 3 * p.steps


def _attention(bld, p: PrefillPlan, q, k, v, mask, step, causal: bool = True):
    """Causal GQA by query blocks; returns ({(head held, query head): o buffers}, next step).

    At step t core (i, j) (i >= t) holds K/V block i - t: it forwards it south and folds it
    into its online softmax (running max m, denominator l, numerator acc). Not `causal` (an
    encoder): every row holds block (i - t) mod s at step t, the blocks going round the
    grid's columns (the interleaved ring keeps the wrap short), s steps in all.
    """
    lay, s, mb = p.lay, p.s, p.mb
    i, j = p.ij
    scale = 1.0 / math.sqrt(p.hd)
    ne = lay.ne[j]
    ones = _alloc(bld, p, True, mb, 1)
    maskb = _alloc(bld, p, True, mb, mb, INPUT, bld.tensor(mask, mb, mb))
    bld.compute(p.core.ravel(), step, OP_FILL, c=ones.ravel(), imm=(1.0, 0.0))
    step += 1
    held = [lay.nh[j] > hh for hh in range(len(k))]
    kr = [[_alloc(bld, p, on, mb, ne) for _ in (0, 1)] for on in held]
    vr = [[_alloc(bld, p, on, mb, ne) for _ in (0, 1)] for on in held]
    st = {hq: dict(sc=_alloc(bld, p, held[hq[0]], mb, mb), tmp=_alloc(bld, p, held[hq[0]], mb, mb),
                   m=_alloc(bld, p, held[hq[0]], mb, 1), mn=_alloc(bld, p, held[hq[0]], mb, 1),
                   l=_alloc(bld, p, held[hq[0]], mb, 1), acc=_alloc(bld, p, held[hq[0]], mb, ne))
          for hq in q}
    south = p.core[(i + 1) % s, j]
    kcur, vcur = list(k), list(v)
    for t in range(p.steps):
        live = i >= t if causal else np.ones_like(i, dtype=bool)
        send = live & (i < s - 1) if causal else live & (t < s - 1)
        nxt_k, nxt_v = [], []
        for hh in range(len(k)):  # forward the block south (row i + 1 needs it next)
            for cur, pool, nxt in ((kcur, kr, nxt_k), (vcur, vr, nxt_v)):
                on = send & held[hh]
                ids = np.full((s, s), -1, dtype=np.int64)
                if on.any():
                    ids[on] = bld.messages(p.core[on], south[on], _nbytes(bld, mb * ne[on]), _KV)
                    bld.send(p.core[on], step, ids[on], cur[hh][on])
                nxt.append((ids[(i - 1) % s, j], pool[hh][t % 2]))
        step += 1
        for (hh, qq), b in st.items():
            on = live & held[hh]
            c, sc = p.core[on], b["sc"][on]
            bld.compute(c, step, OP_MATMUL_T, c=sc, a=q[(hh, qq)][on], b=kcur[hh][on])
            step = _group_allreduce(bld, p, b["sc"], b["tmp"], on, step + 1)
            m, mn, l_, acc = b["m"][on], b["mn"][on], b["l"][on], b["acc"][on]
            if t == 0:
                ops = [(OP_ADD, sc, sc, maskb[on], 0.0), (OP_ROWMAX, m, sc, -1, 0.0),
                       (OP_EXPSUB, sc, sc, m, scale), (OP_ZERO, l_, -1, -1, 0.0),
                       (OP_ZERO, acc, -1, -1, 0.0)]
            else:
                ops = [(OP_ROWMAX, mn, sc, -1, 0.0), (OP_MAX, mn, mn, m, 0.0),
                       (OP_EXPSUB, m, m, mn, scale), (OP_EXPSUB, sc, sc, mn, scale),
                       (OP_MUL, l_, l_, m, 0.0), (OP_MUL, acc, acc, m, 0.0),
                       (OP_COPY, m, mn, -1, 0.0)]
            ops += [(OP_MATMUL_ACC, l_, sc, ones[on], 0.0),
                    (OP_MATMUL_ACC, acc, sc, vcur[hh][on], 0.0)]
            for n, (op, cc, a, bb, imm) in enumerate(ops):
                bld.compute(c, step + n, op, c=cc, a=a, b=bb, imm=(imm, 0.0))
            step += len(ops)
        for hh in range(len(k)):  # receive block i - t - 1 from the north
            for cur, (ids, pool) in ((kcur, nxt_k[hh]), (vcur, nxt_v[hh])):
                got = ids >= 0
                bld.recv(p.core[got], step, ids[got], pool[got])
                cur[hh] = np.where(got, pool, cur[hh])
        step += 1
    o = {}
    for hq, b in st.items():
        on = held[hq[0]]
        c, l_, acc = p.core[on], b["l"][on], b["acc"][on]
        bld.compute(c, step, OP_MUL, c=l_, a=l_, b=l_)
        bld.compute(c, step + 1, OP_RSQRT, c=l_, a=l_, imm=(1.0, 0.0))
        bld.compute(c, step + 2, OP_MUL, c=acc, a=acc, b=l_)
        o[hq] = np.where(on, b["acc"], -1)
    return o, step + 3


def _group_allreduce(bld, p: PrefillPlan, sc, tmp, on, step) -> int:
    """Sum score partials over the columns of each head group, rows where `on`."""
    lay, end = p.phys_lay, step
    rows = np.flatnonzero(on.any(axis=1))
    logical = np.argsort(p.pos)  # logical column at each physical column
    for size in np.unique(lay.group_rows):
        if size < 2:
            continue
        firsts = np.unique(lay.group[lay.group_rows == size])
        cols = logical[firsts[:, None] + np.arange(size)[None, :]]  # [groups, size]
        lines = p.core[rows][:, cols].reshape(-1, size)
        nbytes = np.full(len(lines), _nbytes(bld, p.mb * p.mb))
        end = max(end, _allreduce(bld, lines, sc[rows][:, cols].reshape(-1, size),
                                  tmp[rows][:, cols].reshape(-1, size), step, nbytes))
    return end
