"""A fast feed-forward (FFF) block in decode: norm, a token's descent through a tree of
neurons, residual add (Belcak and Wattenhofer; UltraFastBERT; models.reference.fff).

Placement: the tree's 2^(depth+1) - 1 neurons are spread over the region's rows, node n on
row n mod rows; each node's input vector (a column of fff_in [d, nodes]) and output vector
(a row of fff_out [nodes, d]) are split over the row's columns as the hidden state is, so
core (r, j) holds chunk j of every node of row r.

Conditional routing: a token at node n (row r) needs only row r. Every core of row r takes
the dot product of its chunk of the normalised token with its chunk of the node's input
vector; a K-tree all-reduce along the row gives each of them z; each adds act(z) times its
chunk of the node's output vector to the running output. The sign of z picks the child, and
row r sends the running output, with the decision, down each column to the child's row,
which goes on from there. After the last level the output's row multicasts it along every
column and every core adds it to h. Only the rows on the path work, one after another: the
load imbalance is the point, and the simulator charges it.

The mesh program is static (the engine has no data-dependent branches), so a block is lowered
for one path per sequence: the path the functional data takes (models.reference.fff gives
it) or, for timing, a seeded draw (`draw_paths`); a wrong path computes a different output.
"""

from __future__ import annotations

import numpy as np

from compiler.algorithms.allreduce import chain_reduce, ktree_reduce, line_broadcast
from compiler.algorithms.common import Region, split
from compiler.algorithms.mlp import ACTIVATIONS
from compiler.algorithms.norm import norm
from compiler.program import (
    INPUT,
    OP_ADD,
    OP_MATMUL_ACC,
    OP_MUL,
    OP_PUT,
    OP_TAKE,
    OP_ZERO,
    ProgramBuilder,
    ProgramError,
)
from compiler.targets import DTYPE_BYTES


def draw_paths(depth: int, batch: int, seed: int = 0) -> np.ndarray:
    """int [batch, depth + 1]: the nodes a seeded random descent visits, per sequence (node
    n's children are 2n + 1 and 2n + 2)."""
    bits = np.random.default_rng([seed, 3]).integers(0, 2, (batch, depth))
    nodes = np.zeros((batch, depth + 1), np.int64)
    for level in range(depth):
        nodes[:, level + 1] = 2 * nodes[:, level] + 1 + bits[:, level]
    return nodes


def check_paths(paths, depth: int, batch: int) -> np.ndarray:
    """`paths` as int [batch, depth + 1] if it is a descent from the root, else ProgramError."""
    p = np.asarray(paths, dtype=np.int64)
    ok = p.shape == (batch, depth + 1) and not np.any(p[:, 0])
    if not ok or np.any((p[:, 1:] - 2 * p[:, :-1] - 1) // 2 != 0):  # child - (2n + 1) in {0, 1}
        raise ProgramError(f"fff paths: need [batch={batch}, depth+1={depth + 1}] node ids, "
                           "each a child (2n+1 or 2n+2) of the one before, from the root 0")
    return p


def fff_block(bld: ProgramBuilder, region: Region, h, b: int, d: int, depth: int,
              prefix: str, paths, *, act: str = "gelu", eps: float = 1e-5,
              algo: str = "meshgemv", levels: int = 2, step: int = 0,
              norm_kind: str = "rmsnorm"):
    """h + FFF(Norm(h)) along `paths` (int [b, depth + 1], node ids per level). `h`: [rows,
    cols] buffer ids split over columns. Weights: tensors `{prefix}.mlp_norm` [1, d] (and
    `.mlp_norm_bias` for a LayerNorm), `{prefix}.fff_in` [d, nodes], `{prefix}.fff_out`
    [nodes, d]. Returns (output buffer ids, next step)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not one of {', '.join(ACTIVATIONS)}")
    if d < region.cols:
        raise ProgramError(f"fff block: a {region.cols}-column region needs hidden size >= "
                           f"{region.cols} (got {d})")
    paths = check_paths(paths, depth, b)
    grid = region.cores(bld.width)
    rows, cols = grid.shape
    nodes = 2 ** (depth + 1) - 1
    c0, cs = split(d, cols)
    db = DTYPE_BYTES[bld.dtype]
    xn, step = norm(norm_kind, bld, region, h, b, d, f"{prefix}.mlp_norm", eps, levels=levels,
                    step=step)
    # Every node's chunks on its row: w_in[n, j] [cs_j, 1] and w_out[n, j] [1, cs_j].
    n_of, j_of = np.divmod(np.arange(nodes * cols), cols)
    where = grid[n_of % rows, j_of]
    t_in, t_out = bld.tensor(f"{prefix}.fff_in", d, nodes), bld.tensor(f"{prefix}.fff_out",
                                                                        nodes, d)
    w_in = bld.buffers(where, cs[j_of], 1, INPUT, t_in, c0[j_of], n_of).reshape(nodes, cols)
    w_out = bld.buffers(where, 1, cs[j_of], INPUT, t_out, n_of, c0[j_of]).reshape(nodes, cols)
    out = np.asarray(h)
    y_all = bld.like(out) if b > 1 else None  # every sequence's output, row s its own
    reduce_colour, bcast_colour = 0, levels if algo == "meshgemv" else 1
    ones = np.ones(cols, np.int64)
    for s in range(b):
        y = None
        for level, n in enumerate(paths[s]):
            r = int(n % rows)
            cores = grid[r]
            x = xn[r]
            if b > 1:  # the sequence's row of the normalised h
                x = bld.buffers(cores, 1, cs)
                bld.compute(cores, step, OP_TAKE, c=x, a=xn[r], imm=(s * cs, 0.0))
            zp, tmp, g = (bld.buffers(cores, 1, ones) for _ in range(3))
            bld.compute(cores, step + 1, OP_ZERO, c=zp)
            bld.compute(cores, step + 2, OP_MATMUL_ACC, c=zp, a=x, b=w_in[n])
            line = cores[None, :]
            nb = np.array([int(np.ceil(db))])
            if algo == "meshgemv":
                root, step = ktree_reduce(bld, line, zp[None], tmp[None], step + 3, levels,
                                          reduce_colour, nb)
            else:
                root, step = chain_reduce(bld, line, zp[None], tmp[None], step + 3,
                                          reduce_colour, nb)
            z = zp.copy()  # the root's sum; the others receive it
            if cols > 1:
                z[np.arange(cols) != root] = bld.buffers(cores[np.arange(cols) != root], 1, 1)
                step = line_broadcast(bld, line, root, zp[root:root + 1], z[None], step,
                                      bcast_colour, nb)
            bld.compute(cores, step, ACTIVATIONS[act], c=g, a=z)
            part = bld.buffers(cores, 1, cs)
            bld.compute(cores, step + 1, OP_MUL, c=part, a=w_out[n], b=g)
            if y is None:
                y = part
            else:
                bld.compute(cores, step + 2, OP_ADD, c=part, a=part, b=y)
                y = part
            step += 3
            if level < depth and int(paths[s, level + 1] % rows) != r:  # on to the child
                nxt = grid[int(paths[s, level + 1] % rows)]
                msgs = bld.messages(cores, nxt, np.ceil((cs + 1) * db).astype(np.int64),
                                    bcast_colour + 2)  # the running output and the decision
                bld.send(cores, step, msgs, y)
                y = bld.buffers(nxt, 1, cs)
                bld.recv(nxt, step + 1, msgs, y)
                step += 2
        # The output's row multicasts it down (and up) every column.
        r = int(paths[s, -1] % rows)
        ys = np.full(grid.shape, -1, np.int64)
        ys[r] = y
        if rows > 1:
            others = np.delete(np.arange(rows), r)
            ys[others] = bld.buffers(grid[others].ravel(), 1, np.tile(cs, rows - 1)
                                     ).reshape(rows - 1, cols)
            step = line_broadcast(bld, grid.T, r, y, ys.T, step, bcast_colour,
                                  np.ceil(cs * db).astype(np.int64))
        if y_all is None:
            y_all = ys
        else:
            bld.compute(grid.ravel(), step, OP_PUT, c=y_all.ravel(), a=ys.ravel(),
                        imm=(np.tile(s * cs, rows), 0.0))
            step += 1
    res = bld.like(out)
    bld.compute(grid.ravel(), step, OP_ADD, c=res.ravel(), a=out.ravel(), b=y_all.ravel())
    return res, step + 1
