"""RMSNorm of a vector held split over a region's columns (and copied down every column).

Each core squares and sums its chunk, the partial sums are all-reduced along each row by the
K-tree (a [b, 1] message per core, so this costs hops and overheads, not bandwidth), and each
core scales its chunk by 1 / sqrt(mean + eps) and by its slice of the norm's weight. Every row
does the same work on the same data, so the result is again split over columns and copied down
every column, as the next GEMV (K over columns) wants it.
"""

from __future__ import annotations

import numpy as np

from compiler.algorithms.allreduce import ktree_reduce, line_broadcast
from compiler.algorithms.common import Region, split
from compiler.program import INPUT, OP_MUL, OP_RSQRT, OP_SQSUM, ProgramBuilder
from compiler.targets import DTYPE_BYTES


def rmsnorm(bld: ProgramBuilder, region: Region, h, b: int, d: int, weight: str,
            eps: float, *, levels: int = 2, step: int = 0):
    """Normalise `h` ([rows, cols] buffer ids, h[:, C_j] on every core of column j).

    Reads the norm's weight from tensor `weight` ([1, d]). Returns (buffer ids, next step).
    """
    grid = region.cores(bld.width)
    rows, cols = grid.shape
    c0, cs = split(d, cols)
    cj = np.broadcast_to(np.arange(cols)[None, :], grid.shape)
    tw = bld.tensor(weight, 1, d)
    g = bld.buffers(grid.ravel(), 1, cs[cj].ravel(), INPUT, tw, 0, c0[cj].ravel())
    ss = bld.buffers(grid.ravel(), b, 1).reshape(grid.shape)
    tmp, total = bld.like(ss), bld.like(ss)
    bld.compute(grid.ravel(), step, OP_SQSUM, c=ss.ravel(), a=np.asarray(h).ravel())
    nbytes = np.full(rows, int(np.ceil(b * DTYPE_BYTES[bld.dtype])))
    # All-reduce the partial sums along each row (lines are the region's rows).
    root, step = ktree_reduce(bld, grid, ss, tmp, step + 1, levels, 0, nbytes)
    total[:, root] = ss[:, root]
    if cols > 1:
        step = line_broadcast(bld, grid, root, ss[:, root], total, step, levels, nbytes)
    scale = bld.like(ss)
    bld.compute(grid.ravel(), step, OP_RSQRT, c=scale.ravel(), a=total.ravel(),
                imm=(1.0 / d, eps))
    out = bld.like(h)
    bld.compute(grid.ravel(), step + 1, OP_MUL, c=out.ravel(), a=np.asarray(h).ravel(),
                b=scale.ravel())
    bld.compute(grid.ravel(), step + 2, OP_MUL, c=out.ravel(), a=out.ravel(), b=g)
    return out, step + 3
