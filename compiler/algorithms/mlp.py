"""The feed-forward block of a decoder layer in decode: norm, MLP, residual add.

Dataflow on one region, no data moved between ops (WaferLLM's alternating GEMV layouts):
h (split over columns) -> RMSNorm -> gate and up GEMVs with K over columns (results split over
rows) -> SiLU(gate) * up -> down GEMV with K over rows (result split over columns, like h) ->
h + down. A plain (GPT-2 style) MLP is LayerNorm -> up (+ bias) -> GELU -> down (+ bias).

With activation sparsity (TwELL, compiler.sparsity) the up and gate GEMVs stop at their
reduction roots: the root of row i applies the activation, drops the inactive neurons and
packs the rest (ELL: values and 16-bit indices, each sequence padded to the row's widest) as
TwELL's matmul epilogue does, and multicasts only the packed chunk along its row. Each core
then multiplies only the weight rows of active neurons (`ell_tile_cost`), so rows with more
active neurons finish later and the down projection's reduction waits for them. Which
neurons are active is the compile-time `mask` (the timing draw); functionally the root
multiplies by the tensor `{prefix}.act_mask` [b, f], so a test can feed any mask.
"""

from __future__ import annotations

import numpy as np

from compiler.algorithms.allreduce import chain_reduce, ktree_reduce, line_broadcast
from compiler.algorithms.bias import add_bias
from compiler.algorithms.common import Region, split
from compiler.algorithms.meshgemv import gemv
from compiler.algorithms.norm import norm
from compiler.program import (
    INPUT,
    OP_ADD,
    OP_GELU,
    OP_GELU_ERF,
    OP_MATMUL_ACC,
    OP_MUL,
    OP_SILU,
    OP_ZERO,
    SCRATCH,
    ProgramBuilder,
    ProgramError,
)
from compiler.sparsity import ELL_INDEX_BYTES, ell_tile_cost, ell_width
from compiler.targets import DTYPE_BYTES

# Block-level activation names. "gelu" here is the tanh form (as the block tests use it);
# `model_activation` maps a Hugging Face hidden_act, whose "gelu" is the exact erf form.
ACTIVATIONS = {"silu": OP_SILU, "swish": OP_SILU, "gelu": OP_GELU, "gelu_new": OP_GELU,
               "gelu_pytorch_tanh": OP_GELU, "gelu_erf": OP_GELU_ERF}


def model_activation(hidden_act: str) -> str:
    """The block activation computing a config's `hidden_act` as Hugging Face's ACT2FN does
    ("gelu" is the exact erf GELU there; gelu_new / gelu_pytorch_tanh the tanh form)."""
    return "gelu_erf" if hidden_act == "gelu" else hidden_act


def mlp_block(bld: ProgramBuilder, region: Region, h, b: int, d: int, f: int, prefix: str, *,
              gated: bool = True, act: str = "silu", eps: float = 1e-5, algo: str = "meshgemv",
              levels: int = 2, step: int = 0, norm_kind: str = "rmsnorm", bias: bool = False,
              mask=None):
    """h + MLP(Norm(h)). `h`: [rows, cols] buffer ids split over columns.

    Weights are read from tensors `{prefix}.mlp_norm` [1, d] (and `.mlp_norm_bias` for a
    LayerNorm), `{prefix}.gate` [d, f] (gated only), `{prefix}.up` [d, f] and `{prefix}.down`
    [f, d], with `bias`: `.gate_bias` (gated), `.up_bias` [1, f] and `.down_bias` [1, d].
    `mask`: bool [b, f], the active neurons (activation sparsity, module docstring).
    Returns (output buffer ids, next step).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not one of {', '.join(ACTIVATIONS)}")
    grid = region.cores(bld.width)
    if d < region.cols or f < region.rows:
        raise ProgramError(f"mlp block: a {region.cols}x{region.rows} region needs hidden size "
                           f">= {region.cols} and ffn size >= {region.rows} (got {d}, {f})")
    if mask is not None and np.shape(mask) != (b, f):
        raise ProgramError(f"mlp block: the activation mask is {np.shape(mask)}, not [{b}, {f}]")
    xn, step = norm(norm_kind, bld, region, h, b, d, f"{prefix}.mlp_norm", eps, levels=levels,
                    step=step)
    kw = dict(algo=algo, levels=levels, k_axis="cols", x=xn, allreduce=mask is None)
    up, step = gemv(bld, region, b, d, f, names=(None, f"{prefix}.up", None), step=step, **kw)
    if bias:
        step = add_bias(bld, region, up, f, f"{prefix}.up_bias", "rows", step=step)
    act_in = up
    if gated:
        act_in, step = gemv(bld, region, b, d, f, names=(None, f"{prefix}.gate", None),
                            step=step, **kw)
        if bias:
            step = add_bias(bld, region, act_in, f, f"{prefix}.gate_bias", "rows", step=step)
    held = act_in.ravel() >= 0
    cores, a = grid.ravel()[held], bld.like(act_in.ravel()[held])
    bld.compute(cores, step, ACTIVATIONS[act], c=a, a=act_in.ravel()[held])
    if gated:
        bld.compute(cores, step + 1, OP_MUL, c=a, a=a, b=up.ravel()[held])
    m = np.full(grid.size, -1, dtype=np.int64)
    m[held] = a
    if mask is None:
        down, step = gemv(bld, region, b, f, d, algo, k_axis="rows", x=m.reshape(grid.shape),
                          names=(None, f"{prefix}.down", None), levels=levels, step=step + 2)
    else:
        x, width, step = _pack(bld, grid, m.reshape(grid.shape), b, f, mask,
                               f"{prefix}.act_mask", algo, levels, step + 2)
        down, step = _ell_down(bld, grid, x, width, b, f, d, f"{prefix}.down", algo, levels,
                               step)
    if bias:
        step = add_bias(bld, region, down, d, f"{prefix}.down_bias", "cols", step=step)
    out = bld.like(h)
    bld.compute(grid.ravel(), step, OP_ADD, c=out.ravel(), a=np.asarray(h).ravel(),
                b=down.ravel())
    return out, step + 1


def _colour(algo: str, levels: int) -> int:
    """The first colour after a reduction's (as meshgemv.gemv numbers them)."""
    return levels if algo == "meshgemv" else 1


def _pack(bld, grid, a, b: int, f: int, mask, name: str, algo: str, levels: int, step: int):
    """At each row's root: drop the inactive neurons of its chunk of f and pack the rest (ELL),
    then multicast the packed chunk along the row. Returns (per-core buffers of the masked
    activations, ELL width per row, next step)."""
    rows, cols = grid.shape
    root_r, root_c = np.nonzero(a >= 0)
    root = int(root_c[0])
    k0, ks = split(f, rows)
    width = ell_width(mask, k0)
    db = DTYPE_BYTES[bld.dtype]
    packed = np.ceil(b * width * (db + ELL_INDEX_BYTES)).astype(np.int64)  # bytes per row
    t = bld.tensor(name, b, f)
    m = bld.buffers(grid[root_r, root_c], b, ks[root_r], INPUT, t, 0, k0[root_r])
    # The pack reads the chunk and writes the packed entries (one compare per element).
    bld.compute(grid[root_r, root_c], step, OP_MUL, c=a[root_r, root_c], a=a[root_r, root_c],
                b=m, flops=b * ks[root_r], nbytes=np.ceil(b * ks[root_r] * db) + packed[root_r])
    x = np.full(grid.shape, -1, np.int64)
    x[:, root] = a[:, root]
    others = np.delete(np.arange(cols), root)
    if len(others):
        x[:, others] = bld.buffers(grid[:, others].ravel(), b, np.repeat(ks, len(others))
                                   ).reshape(rows, len(others))
        step = line_broadcast(bld, grid, root, a[:, root], x, step + 1,
                              _colour(algo, levels), packed)
    return x, width, step + 1


def _ell_down(bld, grid, x, width, b: int, f: int, d: int, name: str, algo: str, levels: int,
              step: int):
    """The down GEMV [b, f] x [f, d] on packed activations (K over rows, N over columns, as
    meshgemv.gemv with k_axis="rows"): each core's multiply is charged for its row's ELL
    entries only; then the column all-reduce. Returns (y buffers [rows, cols], next step)."""
    rows, cols = grid.shape
    k0, ks = split(f, rows)
    n0, ns = split(d, cols)
    ki, nj = np.broadcast_arrays(np.arange(rows)[:, None], np.arange(cols)[None, :])
    w = bld.buffers(grid.ravel(), ks[ki].ravel(), ns[nj].ravel(), INPUT, bld.tensor(name, f, d),
                    k0[ki].ravel(), n0[nj].ravel())
    acc = bld.buffers(grid.ravel(), b, ns[nj].ravel(), SCRATCH).reshape(rows, cols)
    tmp = bld.buffers(grid.ravel(), b, ns[nj].ravel(), SCRATCH).reshape(rows, cols)
    db = DTYPE_BYTES[bld.dtype]
    flops, elems = ell_tile_cost(b * width[ki], ns[nj], b, db)
    bld.compute(grid.ravel(), step, OP_ZERO, c=acc.ravel())
    bld.compute(grid.ravel(), step + 1, OP_MATMUL_ACC, c=acc.ravel(), a=x.ravel(), b=w,
                flops=flops.ravel(), nbytes=np.ceil(elems * db).astype(np.int64).ravel())
    nbytes = np.ceil(b * ns * db).astype(np.int64)
    lines, acc_l, tmp_l = grid.T, acc.T, tmp.T
    if algo == "meshgemv":
        root, step = ktree_reduce(bld, lines, acc_l, tmp_l, step + 2, levels, 0, nbytes)
    else:
        root, step = chain_reduce(bld, lines, acc_l, tmp_l, step + 2, 0, nbytes)
    out = np.full(grid.shape, -1, np.int64)
    out[root, :] = acc[root, :]
    if rows > 1:
        others = np.delete(np.arange(rows), root)
        out[others, :] = bld.buffers(grid[others, :].T.ravel(), b, np.repeat(ns, rows - 1)
                                     ).reshape(cols, rows - 1).T
        step = line_broadcast(bld, lines, root, acc[root, :], out.T, step,
                              _colour(algo, levels), nbytes)
    return out, step
