"""A projection's bias added to a GEMV's output where it lies (no data moves).

A GEMV's output is split over the region's rows (K over columns) or columns (K over rows) and,
after its all-reduce, held by every core of its row or column; each holding core reads its
slice of the bias [1, n] and adds it.
"""

from __future__ import annotations

import numpy as np

from compiler.algorithms.common import Region, split
from compiler.program import INPUT, OP_ADD, ProgramBuilder


def add_bias(bld: ProgramBuilder, region: Region, y, n: int, name: str, split_over: str, *,
             step: int, n_split=None) -> int:
    """y[:, chunk] += bias[:, chunk] in place on every core holding a chunk of y.

    `y`: [rows, cols] buffer ids (-1 where a core holds none), split over the region's
    `split_over` axis ("rows" or "cols") in chunks `n_split` = (starts, sizes) (default
    near-equal); the bias is read from tensor `name` [1, n]. Returns the next step.
    """
    grid = region.cores(bld.width)
    y = np.asarray(y)
    axis = 0 if split_over == "rows" else 1
    starts, sizes = split(n, min(grid.shape[axis], n)) if n_split is None else n_split
    idx = np.broadcast_to(np.arange(grid.shape[0])[:, None] if axis == 0 else
                          np.arange(grid.shape[1])[None, :], grid.shape)
    held = y >= 0
    tb = bld.tensor(name, 1, n)
    bias = bld.buffers(grid[held], 1, sizes[idx[held]], INPUT, tb, 0, starts[idx[held]])
    bld.compute(grid[held], step, OP_ADD, c=y[held], a=y[held], b=bias)
    return step + 1
