"""GEMV y[b, N] = x[b, K] @ W[K, N] on a region of cores (decode's matmuls).

Placement (WaferLLM's MeshGEMV): W is cut into a 2D grid of tiles, K over the region's rows and
N over its columns, so core (row i, column j) holds W[K_i, N_j] and x[:, K_i]. Each core
multiplies its tile; the partial sums of column j are then reduced along the column, by the
K-tree (`meshgemv`), by a chain passing whole partial sums (`ring`) or by the same chain
streaming them in chunks (`pipeline`, the Cerebras default pipeline all-reduce that WaferLLM
compares with), and, for an all-reduce, multicast back so every core of column j holds
y[:, N_j] for the next op.
Dimensions that do not divide evenly give tiles that differ by one row or column.
"""

from __future__ import annotations

import math

import numpy as np

from compiler.algorithms.allreduce import (
    chain_reduce,
    ktree_reduce,
    line_broadcast,
    pipeline_chunks,
    pipeline_reduce,
)
from compiler.algorithms.common import Region, check_dims, finish, split
from compiler.program import (
    INPUT,
    OP_LOOKUP,
    OP_MATMUL_ACC,
    OP_ZERO,
    OUTPUT,
    SCRATCH,
    MeshProgram,
    ProgramBuilder,
    ProgramError,
)
from compiler.targets import DTYPE_BYTES, WSE2, MeshTarget

GEMV_ALGOS = ("meshgemv", "ring", "pipeline")


def gemv(bld: ProgramBuilder, region: Region, b: int, k: int, n: int, algo: str = "meshgemv",
         *, k_axis: str = "rows", x=None, names=("x", "W", "y"), levels: int = 2,
         allreduce: bool = True, step: int = 0, k_split=None, n_split=None,
         lookup: bool = False, chunks: int = 1):
    """Add a GEMV on `region` to `bld`. Returns (y buffers, next free step).

    `k_axis="rows"`: K is split over the region's rows and N over its columns; the partial sums
    are reduced along each column, so y ends split over columns (and, with `allreduce`, held by
    every core of its column). `k_axis="cols"` is the transpose. Chaining GEMVs with alternating
    `k_axis` needs no data movement between them: the output layout of one is the input layout
    of the next (WaferLLM's decode dataflow).

    `x`: None to read x from the tensor `names[0]`, or a [rows, cols] array of buffer ids
    holding x's K-chunks in the layout `k_axis` expects. W is read from tensor `names[1]`; y is
    an output tensor `names[2]` unless that name is None. The returned array of y buffers is
    [rows, cols] over the region's active cores (-1 where a core holds no y).

    `k_split`, `n_split`: (starts, sizes) of K's and N's chunks when they must line up with
    another op's layout (attention's heads); by default near-equal chunks. `lookup`: x holds
    token ids [b, 1] and W is an embedding table [vocab, N]: each core looks its rows up
    instead of multiplying, and the reduction gathers the one non-zero partial row.
    `chunks`: pieces the `pipeline` reduction streams each partial sum in.
    """
    check_dims(b=b, k=k, n=n, levels=levels)
    if algo not in GEMV_ALGOS:
        raise ProgramError(f"gemv algorithm {algo!r} is not one of {', '.join(GEMV_ALGOS)}")
    if k_axis not in ("rows", "cols"):
        raise ProgramError(f"gemv k_axis {k_axis!r} is not one of rows, cols")
    grid = region.cores(bld.width)
    flip = k_axis == "cols"
    if flip:  # work in the frame where K runs down axis 0
        grid = grid.T
        x = None if x is None else np.asarray(x).T
    k0, ks = split(k, min(grid.shape[0], k)) if k_split is None else k_split  # no empty tiles
    n0, ns = split(n, min(grid.shape[1], n)) if n_split is None else n_split
    rows, cols = len(ks), len(ns)
    if rows > grid.shape[0] or cols > grid.shape[1]:
        raise ProgramError(f"gemv: {rows}x{cols} tiles do not fit the region")
    cores = grid[:rows, :cols]
    ki, nj = np.broadcast_arrays(np.arange(rows)[:, None], np.arange(cols)[None, :])

    tw = bld.tensor(names[1], k, n)
    ty = bld.tensor(names[2], b, n) if names[2] else -1
    w = bld.buffers(cores.ravel(), ks[ki].ravel(), ns[nj].ravel(), INPUT, tw,
                    k0[ki].ravel(), n0[nj].ravel()).reshape(rows, cols)
    if x is None:
        tx = bld.tensor(names[0], b, 1 if lookup else k)
        x = bld.buffers(cores.ravel(), b, 1 if lookup else ks[ki].ravel(), INPUT, tx, 0,
                        0 if lookup else k0[ki].ravel()).reshape(rows, cols)
    else:
        x = x[:rows, :cols]
    acc = bld.buffers(cores.ravel(), b, ns[nj].ravel(), SCRATCH).reshape(rows, cols)
    if algo != "pipeline":  # its chunks have their own buffers
        tmp = bld.buffers(cores.ravel(), b, ns[nj].ravel(), SCRATCH).reshape(rows, cols)
    if lookup:
        bld.compute(cores.ravel(), step + 1, OP_LOOKUP, c=acc.ravel(), a=x.ravel(),
                    b=w.ravel(), imm=(k0[ki].ravel(), 0.0))
    else:
        bld.compute(cores.ravel(), step, OP_ZERO, c=acc.ravel())
        bld.compute(cores.ravel(), step + 1, OP_MATMUL_ACC, c=acc.ravel(), a=x.ravel(),
                    b=w.ravel())

    # Reduce along axis 0: line j is column j of this frame, position i is row i.
    lines, acc_l = cores.T, acc.T
    nbytes = np.ceil(b * ns * DTYPE_BYTES[bld.dtype]).astype(np.int64)
    if algo == "meshgemv":
        root, step = ktree_reduce(bld, lines, acc_l, tmp.T, step + 2, levels, 0, nbytes)
        colour = levels
    elif algo == "ring":
        root, step = chain_reduce(bld, lines, acc_l, tmp.T, step + 2, 0, nbytes)
        colour = 1
    else:
        root, step = pipeline_reduce(bld, lines, acc_l, step + 2, 0, b * ns, chunks)
        colour = 1
    # The root's accumulator is its copy of y[:, N_j]; an all-reduce multicasts it down the line.
    out = np.full(cores.shape, -1, dtype=np.int64)
    out[root, :] = acc_l[:, root]
    if ty >= 0:
        bld.mark(acc_l[:, root], OUTPUT, ty, 0, n0)
    if allreduce and rows > 1:
        others = np.delete(np.arange(rows), root)
        role = OUTPUT if ty >= 0 else SCRATCH
        copies = bld.buffers(lines[:, others].ravel(), b, np.repeat(ns, rows - 1), role, ty, 0,
                             np.repeat(n0, rows - 1)).reshape(cols, rows - 1)
        out[others, :] = copies.T
        step = line_broadcast(bld, lines, root, acc_l[:, root], out.T, step, colour, nbytes)
    bld.meta.update(op="gemv", algo=algo, b=b, k=k, n=n, rows=rows, cols=cols,
                    levels=levels if algo == "meshgemv" else None, allreduce=allreduce,
                    chunks=chunks if algo == "pipeline" else None)
    full = np.full(grid.shape, -1, dtype=np.int64)
    full[:rows, :cols] = out
    return (full.T if flip else full), step


def lower_gemv(b: int, k: int, n: int, rows: int, cols: int, algo: str = "meshgemv", *,
               k_axis: str = "rows", levels: int = 2, allreduce: bool = True, dtype: str = "bf16",
               target: MeshTarget | None = None) -> MeshProgram:
    """A program computing y = x @ W on a rows x cols mesh, checked against `target`.
    `pipeline` streams in the chunks `pipeline_chunks` picks for `target` (default WSE2).

    >>> prog = lower_gemv(1, 64, 48, 4, 4)
    >>> prog.n_messages > 0
    True
    """
    check_dims(b=b, k=k, n=n, rows=rows, cols=cols)
    bld = ProgramBuilder(cols, rows, dtype)
    line, across = (rows, cols) if k_axis == "rows" else (cols, rows)
    tile_bytes = math.ceil(b * math.ceil(n / min(across, n)) * DTYPE_BYTES[dtype])
    chunks = pipeline_chunks(min(line, k), tile_bytes, target or WSE2)
    gemv(bld, Region(rows, cols), b, k, n, algo, k_axis=k_axis, levels=levels,
         allreduce=allreduce, chunks=chunks)
    return finish(bld.build(), target, f"gemv [{b},{k}]x[{k},{n}] on {cols}x{rows} cores")
