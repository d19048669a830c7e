"""GEMV y[b, N] = x[b, K] @ W[K, N] on a region of cores (decode's matmuls).

Placement (WaferLLM's MeshGEMV): W is cut into a 2D grid of tiles, K over the region's rows and
N over its columns, so core (row i, column j) holds W[K_i, N_j] and x[:, K_i]. Each core
multiplies its tile; the partial sums of column j are then reduced along the column, by the
K-tree (`meshgemv`) or by the pipeline chain (`ring`, the Cerebras default), and, for an
all-reduce, multicast back so every core of column j holds y[:, N_j] for the next op.
Dimensions that do not divide evenly give tiles that differ by one row or column.
"""

from __future__ import annotations

import numpy as np

from compiler.algorithms.allreduce import chain_reduce, ktree_reduce, line_broadcast
from compiler.algorithms.common import Region, check_dims, finish, split
from compiler.program import (
    INPUT,
    OP_MATMUL_ACC,
    OP_ZERO,
    OUTPUT,
    SCRATCH,
    MeshProgram,
    ProgramBuilder,
    ProgramError,
)
from compiler.targets import DTYPE_BYTES, MeshTarget

GEMV_ALGOS = ("meshgemv", "ring")


def gemv(bld: ProgramBuilder, region: Region, b: int, k: int, n: int, algo: str = "meshgemv",
         *, levels: int = 2, allreduce: bool = True, step: int = 0) -> int:
    """Add a GEMV on `region` to `bld` (tensors "x", "W", "y"). Returns the next free step."""
    check_dims(b=b, k=k, n=n, levels=levels)
    if algo not in GEMV_ALGOS:
        raise ProgramError(f"gemv algorithm {algo!r} is not one of {', '.join(GEMV_ALGOS)}")
    rows, cols = min(region.rows, k), min(region.cols, n)  # no empty tiles
    cores = Region(rows, cols, region.x0, region.y0).cores(bld.width)
    k0, ks = split(k, rows)
    n0, ns = split(n, cols)
    ki, nj = np.broadcast_arrays(np.arange(rows)[:, None], np.arange(cols)[None, :])

    tx, tw, ty = bld.tensor("x", b, k), bld.tensor("W", k, n), bld.tensor("y", b, n)
    w = bld.buffers(cores.ravel(), ks[ki].ravel(), ns[nj].ravel(), INPUT, tw,
                    k0[ki].ravel(), n0[nj].ravel()).reshape(rows, cols)
    x = bld.buffers(cores.ravel(), b, ks[ki].ravel(), INPUT, tx, 0,
                    k0[ki].ravel()).reshape(rows, cols)
    acc = bld.buffers(cores.ravel(), b, ns[nj].ravel(), SCRATCH).reshape(rows, cols)
    tmp = bld.buffers(cores.ravel(), b, ns[nj].ravel(), SCRATCH).reshape(rows, cols)
    bld.compute(cores.ravel(), step, OP_ZERO, c=acc.ravel())
    bld.compute(cores.ravel(), step + 1, OP_MATMUL_ACC, c=acc.ravel(), a=x.ravel(), b=w.ravel())

    # Reduce along columns: line j is column j, position i is row i.
    lines, acc_l, tmp_l = cores.T, acc.T, tmp.T
    nbytes = np.ceil(b * ns * DTYPE_BYTES[bld.dtype]).astype(np.int64)
    if algo == "meshgemv":
        root, step = ktree_reduce(bld, lines, acc_l, tmp_l, step + 2, levels, 0, nbytes)
        colour = levels
    else:
        root, step = chain_reduce(bld, lines, acc_l, tmp_l, step + 2, 0, nbytes)
        colour = 1
    # The root's accumulator is its copy of y[:, N_j]; an all-reduce multicasts it down the column.
    bld.mark(acc_l[:, root], OUTPUT, ty, 0, n0)
    if allreduce and rows > 1:
        others = np.delete(np.arange(rows), root)
        out = bld.buffers(lines[:, others].ravel(), b, np.repeat(ns, rows - 1), OUTPUT, ty, 0,
                          np.repeat(n0, rows - 1))
        out_l = np.full(lines.shape, -1, dtype=np.int64)
        out_l[:, others] = out.reshape(cols, rows - 1)
        step = line_broadcast(bld, lines, root, acc_l[:, root], out_l, step, colour, nbytes)
    bld.meta.update(op="gemv", algo=algo, b=b, k=k, n=n, rows=rows, cols=cols,
                    levels=levels if algo == "meshgemv" else None, allreduce=allreduce)
    return step


def lower_gemv(b: int, k: int, n: int, rows: int, cols: int, algo: str = "meshgemv", *,
               levels: int = 2, allreduce: bool = True, dtype: str = "bf16",
               target: MeshTarget | None = None) -> MeshProgram:
    """A program computing y = x @ W on a rows x cols mesh, checked against `target`.

    >>> prog = lower_gemv(1, 64, 48, 4, 4)
    >>> prog.n_messages > 0
    True
    """
    check_dims(rows=rows, cols=cols)
    bld = ProgramBuilder(cols, rows, dtype)
    gemv(bld, Region(rows, cols), b, k, n, algo, levels=levels, allreduce=allreduce)
    return finish(bld.build(), target, f"gemv [{b},{k}]x[{k},{n}] on {cols}x{rows} cores")
