"""RMSNorm and LayerNorm of a vector held split over a region's columns (and copied down every
column).

RMSNorm: each core squares and sums its chunk, the partial sums are all-reduced along each row
by the K-tree (a [b, 1] message per core, so this costs hops and overheads, not bandwidth), and
each core scales its chunk by 1 / sqrt(mean + eps) and by its slice of the norm's weight. Every
row does the same work on the same data, so the result is again split over columns and copied
down every column, as the next GEMV (K over columns) wants it.

LayerNorm (GPT-2) centres first: each core sums its chunk (a matmul with a column of -1/d, so
the all-reduced sum is minus the mean), all-reduced along each row the same way; the centred
chunk then goes through the RMSNorm steps (the variance is the mean square of the centred
vector, torch's biased variance), and the norm's bias is added. Two row all-reduces, no new op.
"""

from __future__ import annotations

import numpy as np

from compiler.algorithms.allreduce import ktree_reduce, line_broadcast
from compiler.algorithms.common import Region, split
from compiler.program import (
    INPUT,
    OP_ADD,
    OP_FILL,
    OP_MATMUL_ACC,
    OP_MUL,
    OP_RSQRT,
    OP_SQSUM,
    OP_ZERO,
    ProgramBuilder,
    ProgramError,
)
from compiler.targets import DTYPE_BYTES

NORMS = ("rmsnorm", "layernorm")


def rmsnorm(bld: ProgramBuilder, region: Region, h, b: int, d: int, weight: str,
            eps: float, *, levels: int = 2, step: int = 0):
    """Normalise `h` ([rows, cols] buffer ids, h[:, C_j] on every core of column j).

    Reads the norm's weight from tensor `weight` ([1, d]). Returns (buffer ids, next step).
    """
    return _norm(bld, region, h, b, d, weight, eps, False, levels, step)


def layernorm(bld: ProgramBuilder, region: Region, h, b: int, d: int, weight: str,
              eps: float, *, levels: int = 2, step: int = 0):
    """LayerNorm of `h` (laid out as for `rmsnorm`): (h - mean) / sqrt(var + eps) * w + bias.

    Reads the weight from tensor `weight` and the bias from `weight + "_bias"` ([1, d]).
    Returns (buffer ids, next step).
    """
    return _norm(bld, region, h, b, d, weight, eps, True, levels, step)


def norm(kind: str, bld: ProgramBuilder, region: Region, h, b: int, d: int, weight: str,
         eps: float, *, levels: int = 2, step: int = 0):
    """`rmsnorm` or `layernorm` by name (a model config's `norm`)."""
    if kind not in NORMS:
        raise ProgramError(f"norm {kind!r} is not one of {', '.join(NORMS)}")
    return _norm(bld, region, h, b, d, weight, eps, kind == "layernorm", levels, step)


def _row_allreduce(bld, grid, part, b, step, levels):
    """All-reduce [b, 1] partials (one per core) along each row; returns (totals, next step)."""
    rows, cols = grid.shape
    tmp, total = bld.like(part), bld.like(part)
    nbytes = np.full(rows, int(np.ceil(b * DTYPE_BYTES[bld.dtype])))
    root, step = ktree_reduce(bld, grid, part, tmp, step, levels, 0, nbytes)
    total[:, root] = part[:, root]
    if cols > 1:
        step = line_broadcast(bld, grid, root, part[:, root], total, step, levels, nbytes)
    return total, step


def _norm(bld, region, h, b, d, weight, eps, center, levels, step):
    grid = region.cores(bld.width)
    rows, cols = grid.shape
    c0, cs = split(d, cols)
    cj = np.broadcast_to(np.arange(cols)[None, :], grid.shape)
    tw = bld.tensor(weight, 1, d)
    g = bld.buffers(grid.ravel(), 1, cs[cj].ravel(), INPUT, tw, 0, c0[cj].ravel())
    h = np.asarray(h)
    x = h
    if center:
        tb = bld.tensor(weight + "_bias", 1, d)
        beta = bld.buffers(grid.ravel(), 1, cs[cj].ravel(), INPUT, tb, 0, c0[cj].ravel())
        # Minus the mean: partial sums of h * (-1 / d), all-reduced along each row.
        neg = bld.buffers(grid.ravel(), cs[cj].ravel(), 1)
        s = bld.buffers(grid.ravel(), b, 1).reshape(grid.shape)
        bld.compute(grid.ravel(), step, OP_FILL, c=neg, imm=(-1.0 / d, 0.0))
        bld.compute(grid.ravel(), step, OP_ZERO, c=s.ravel())
        bld.compute(grid.ravel(), step + 1, OP_MATMUL_ACC, c=s.ravel(), a=h.ravel(), b=neg)
        negmean, step = _row_allreduce(bld, grid, s, b, step + 2, levels)
        x = bld.like(h)
        bld.compute(grid.ravel(), step, OP_ADD, c=x.ravel(), a=h.ravel(), b=negmean.ravel())
        step += 1
    ss = bld.buffers(grid.ravel(), b, 1).reshape(grid.shape)
    bld.compute(grid.ravel(), step, OP_SQSUM, c=ss.ravel(), a=x.ravel())
    total, step = _row_allreduce(bld, grid, ss, b, step + 1, levels)
    scale = bld.like(ss)
    bld.compute(grid.ravel(), step, OP_RSQRT, c=scale.ravel(), a=total.ravel(),
                imm=(1.0 / d, eps))
    out = bld.like(h)
    bld.compute(grid.ravel(), step + 1, OP_MUL, c=out.ravel(), a=x.ravel(), b=scale.ravel())
    bld.compute(grid.ravel(), step + 2, OP_MUL, c=out.ravel(), a=out.ravel(), b=g)
    if center:
        bld.compute(grid.ravel(), step + 3, OP_ADD, c=out.ravel(), a=out.ravel(), b=beta)
        step += 1
    return out, step + 3
