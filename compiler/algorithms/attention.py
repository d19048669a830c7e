"""The attention block of a decoder layer in decode: norm, QKV, RoPE, GQA over a KV cache, O.

Layout (every op stays local to the region; only reductions move data):
- h arrives split over columns and copied down every column (like the MLP block's input).
- q, k and v are GEMVs with K over columns, so their outputs are split over rows. Row i owns a
  slice of the key/value heads: with R >= KV rows, each KV head gets a group of rows and each
  row a chunk of that head's dims; with R < KV, each row holds whole heads. q's columns are
  permuted at compile time so that row i holds, for its dims, the G = H / KV query heads that
  share its KV head; the dims of q and k are also permuted so RoPE's pairs (e, e + hd/2) sit
  side by side and a chunk never splits a pair.
- The KV cache of row i's dims sits on row i, tokens spread over its columns: core (i, j) holds
  K[T_j, D_i] and V[T_j, D_i] plus a ones column in V, so that P @ V also sums P (the softmax's
  denominator travels with the numerator). Empty slots are zero and so drop out.
- Scores: each core multiplies its q chunk with its K slots; partial dot products are
  all-reduced within the head's row group (along columns). Softmax maxima are all-reduced along
  each row; P @ V partials are all-reduced along each row, which leaves the attention output
  split over rows: exactly the O projection's input with K over rows. Its output is split over
  columns, like h, for the residual add.
- GPT-2 style layers (learned positions) skip RoPE (`rope=None`): q and k keep the same
  pair-adjacent permutation, which leaves every score unchanged; the norm may be a LayerNorm
  and the O projection may carry a bias.
- New tokens enter the cache with WaferLLM's shift scheme: k and v are already on every core of
  their row; the new entry is written at column 0 and, up to the column that is due to grow,
  each core passes one entry to its east neighbour, so every core holds floor(t / C) or
  ceil(t / C) entries (`kv_positions` replays it for packing a cache).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.algorithms.allreduce import ktree_reduce, line_broadcast
from compiler.algorithms.bias import add_bias
from compiler.algorithms.common import Region, split
from compiler.algorithms.meshgemv import gemv
from compiler.algorithms.norm import norm
from compiler.program import (
    INPUT,
    OP_ADD,
    OP_DIVLAST,
    OP_EXPSUB,
    OP_FILL,
    OP_MATMUL_ACC,
    OP_MATMUL_T,
    OP_MAX,
    OP_PUT,
    OP_ROPE,
    OP_ROWMAX,
    OP_TAKE,
    OP_ZERO,
    STATE,
    ProgramBuilder,
    ProgramError,
)
from compiler.targets import DTYPE_BYTES


@dataclass(frozen=True)
class HeadLayout:
    """Which KV heads and dims each row of a region owns (arrays over rows)."""

    h0: np.ndarray  # first KV head
    nh: np.ndarray  # KV heads (1 when a head is split over several rows)
    e0: np.ndarray  # first dim within the head (in pair-adjacent order)
    ne: np.ndarray  # dims per head
    group: np.ndarray  # first row of the row's head group (itself when R < KV)
    group_rows: np.ndarray  # rows in the row's head group
    heads: int  # KV heads
    g: int  # query heads per KV head
    hd: int

    @property
    def rows(self) -> int:
        return len(self.h0)

    def columns(self, g: int, extra: int = 0) -> np.ndarray:
        """Width of each row's chunk: nh * (g * ne + extra)."""
        return self.nh * (g * self.ne + extra)

    def order(self, g: int, pairs: bool) -> np.ndarray:
        """Column permutation of a projection's output (k, v: g=1; q: g=G), row chunks in order.

        Entry n is the model's column placed at position n; `pairs` puts RoPE pairs side by side.
        """
        dims = np.arange(self.hd)
        if pairs:
            half = self.hd // 2
            dims = np.stack([np.arange(half), np.arange(half) + half], axis=1).ravel()
        parts = []
        for h0, nh, e0, ne in zip(self.h0, self.nh, self.e0, self.ne):
            head = np.arange(h0, h0 + nh)[:, None, None]
            q = np.arange(g)[None, :, None]
            e = dims[e0:e0 + ne][None, None, :]
            parts.append(((head * g + q) * self.hd + e).ravel())
        return np.concatenate(parts)


def head_layout(rows: int, kv_heads: int, g: int, hd: int) -> HeadLayout:
    """Share `kv_heads` heads of `hd` dims among `rows` rows (see the module docstring)."""
    if hd % 2:
        raise ProgramError(f"head_dim {hd} must be even for RoPE")
    if rows >= kv_heads:
        if rows > kv_heads * hd // 2:
            raise ProgramError(f"attention: {rows} rows cannot share {kv_heads} KV heads of "
                               f"{hd} dims (at most {kv_heads * hd // 2} rows, a RoPE pair each)")
        r0, rs = split(rows, kv_heads)
        head = np.repeat(np.arange(kv_heads), rs)
        p0 = np.concatenate([split(hd // 2, n)[0] for n in rs])
        pn = np.concatenate([split(hd // 2, n)[1] for n in rs])
        return HeadLayout(head, np.ones(rows, np.int64), 2 * p0, 2 * pn, r0[head], rs[head],
                          kv_heads, g, hd)
    h0, nh = split(kv_heads, rows)
    return HeadLayout(h0, nh, np.zeros(rows, np.int64), np.full(rows, hd), np.arange(rows),
                      np.ones(rows, np.int64), kv_heads, g, hd)


def pack_cache(lay: HeadLayout, k: np.ndarray, v: np.ndarray, cols: int, slots: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The k_cache and v_cache tensors holding k, v ([b, t, KV * hd], model order, k after
    RoPE) where the shift scheme has put them after t steps."""
    b, t, _ = k.shape
    col, slot = kv_positions(t, cols)
    rows = (np.arange(b)[:, None] * cols + col[None, :]) * slots + slot[None, :]
    kc = np.zeros((b * cols * slots, lay.hd * lay.heads), k.dtype)
    kc[rows.ravel()] = k.reshape(b * t, -1)[:, lay.order(1, pairs=True)]
    # v: each row's chunk is, per head it holds, its dims then a ones column.
    src, ones = [], []
    order, at = lay.order(1, pairs=False), 0
    for nh, ne in zip(lay.nh, lay.ne):
        for _ in range(nh):
            src.extend(order[at:at + ne])
            ones.append(len(src))
            src.append(-1)
            at += ne
    src = np.array(src)
    vc = np.zeros((b * cols * slots, len(src)), v.dtype)
    vv = v.reshape(b * t, -1)
    vc[rows.ravel()[:, None], np.flatnonzero(src >= 0)[None, :]] = vv[:, src[src >= 0]]
    vc[rows.ravel()[:, None], np.array(ones)[None, :]] = 1.0
    return kc, vc


def kv_step(t: int, cols: int) -> tuple[int, int]:
    """The shift scheme's step adding token t: (column that grows, its new slot)."""
    return t % cols, t // cols


def kv_positions(t: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(column, slot) of tokens 0..t-1 after t steps of the shift scheme."""
    col, slot = np.zeros(t, np.int64), np.zeros(t, np.int64)
    at = {}  # (column, slot) -> token
    for tok in range(t):
        grow, new = kv_step(tok, cols)
        moving = [at[(j, 0)] for j in range(grow)]
        for j, old in enumerate(moving):  # slot 0 of column j moves east
            dest = (j + 1, 0) if j + 1 < grow else (grow, new)
            at[dest] = old
        at[(0, 0) if grow > 0 else (0, new)] = tok
    for (j, s), tok in at.items():
        col[tok], slot[tok] = j, s
    return col, slot


def attention_block(bld: ProgramBuilder, region: Region, h, b: int, d: int, heads: int,
                    kv_heads: int, hd: int, prefix: str, *, ctx: int, slots: int,
                    rope: str | None = "rope", qkv_bias: bool = False, o_bias: bool = False,
                    eps: float = 1e-5, norm_kind: str = "rmsnorm", algo: str = "meshgemv",
                    levels: int = 2, step: int = 0):
    """h + Attention(Norm(h)) for one decode step with `ctx` tokens already cached.

    `h`: [rows, cols] buffer ids split over columns. Weights: `{prefix}.attn_norm` (and
    `.attn_norm_bias` for `norm_kind="layernorm"`), `.q`, `.k`, `.v`, `.o` (and `.q_bias` etc.,
    `.o_bias` [1, d]), their columns (o: rows) in `head_layout` order; caches
    `{prefix}.k_cache` [b * cols * slots, kv columns] and `.v_cache` (STATE); RoPE's cos and
    sin at position `ctx` in tensor `rope` [2, hd / 2] (None: no RoPE, as with learned
    positions). Returns (output buffer ids, next step).
    """
    grid = region.cores(bld.width)
    rows, cols = grid.shape
    g = heads // kv_heads
    lay = head_layout(rows, kv_heads, g, hd)
    if ctx + 1 > cols * slots:
        raise ProgramError(f"{prefix}: a cache of {slots} slots on {cols} columns holds "
                           f"{cols * slots} tokens, the step needs {ctx + 1}")
    db = DTYPE_BYTES[bld.dtype]
    ri = np.broadcast_to(np.arange(rows)[:, None], grid.shape)
    cj = np.broadcast_to(np.arange(cols)[None, :], grid.shape)
    all_cores = grid.ravel()

    xn, step = norm(norm_kind, bld, region, h, b, d, f"{prefix}.attn_norm", eps, levels=levels,
                    step=step)
    proj = {}
    for name, gg in (("q", g), ("k", 1), ("v", 1)):
        n_i = lay.columns(gg)
        starts = np.concatenate([[0], np.cumsum(n_i)[:-1]])
        y, step = gemv(bld, region, b, d, int(n_i.sum()), algo, k_axis="cols", x=xn,
                       names=(None, f"{prefix}.{name}", None), levels=levels, step=step,
                       n_split=(starts, n_i))
        if qkv_bias:
            tb = bld.tensor(f"{prefix}.{name}_bias", 1, int(n_i.sum()))
            bias = bld.buffers(all_cores, 1, n_i[ri].ravel(), INPUT, tb, 0, starts[ri].ravel())
            bld.compute(all_cores, step, OP_ADD, c=y.ravel(), a=y.ravel(), b=bias)
            step += 1
        proj[name] = y.ravel()
    # RoPE on q and k: each row's chunk covers pairs p0 .. p0 + ne/2 of its heads.
    if rope is not None:
        tr = bld.tensor(rope, 2, hd // 2)
        cs = bld.buffers(all_cores, 2, (lay.ne // 2)[ri].ravel(), INPUT, tr, 0,
                         (lay.e0 // 2)[ri].ravel())
        for name in ("q", "k"):
            bld.compute(all_cores, step, OP_ROPE, c=proj[name], a=proj[name], b=cs)
        step += 1

    # Caches and the shift step that adds this token.
    kcols, vcols = lay.columns(1), lay.columns(1, extra=1)
    koff = np.concatenate([[0], np.cumsum(kcols)[:-1]])
    voff = np.concatenate([[0], np.cumsum(vcols)[:-1]])
    tk = bld.tensor(f"{prefix}.k_cache", b * cols * slots, int(kcols.sum()))
    tv = bld.tensor(f"{prefix}.v_cache", b * cols * slots, int(vcols.sum()))
    grow, new_slot = kv_step(ctx, cols)
    o_cols = lay.columns(g)
    o_in = bld.buffers(all_cores, b, o_cols[ri].ravel()).reshape(grid.shape)
    scale = 1.0 / float(np.sqrt(hd))
    for s in range(b):
        for hh in range(int(lay.nh.max())):
            on = lay.nh[ri] > hh  # rows holding a head this far
            cores, rr, cc = grid[on], ri[on], cj[on]
            ne = lay.ne[rr]
            trow = (s * cols + cc) * slots
            K = bld.buffers(cores, slots, ne, STATE, tk, trow, koff[rr] + hh * ne)
            V = bld.buffers(cores, slots, ne + 1, STATE, tv, trow, voff[rr] + hh * (ne + 1))
            kin = proj["k"].reshape(grid.shape)[on]
            vin = proj["v"].reshape(grid.shape)[on]
            qin = proj["q"].reshape(grid.shape)[on]
            off = s * lay.nh[rr] * ne + hh * ne
            step = _shift_in(bld, cores, cc, K, V, kin, vin, off, ne, grow, new_slot, db, step,
                             colour=levels + 2)
            # Scores of this core's slots for the G query heads of the KV head.
            qh = bld.buffers(cores, g, ne)
            bld.compute(cores, step, OP_TAKE, c=qh, a=qin, imm=(off * g, 0.0))
            sc = bld.buffers(cores, g, slots)
            bld.compute(cores, step + 1, OP_MATMUL_T, c=sc, a=qh, b=K)
            step += 2
            full = np.full(grid.shape, -1, np.int64)
            full[on] = sc
            step = _group_allreduce(bld, grid, lay, full, g * slots, levels, step)
            m = bld.buffers(cores, g, 1)
            bld.compute(cores, step, OP_ROWMAX, c=m, a=sc)
            step = _row_allreduce(bld, grid, on, m, np.full(rows, g), levels, step + 1,
                                  OP_MAX)
            bld.compute(cores, step, OP_EXPSUB, c=sc, a=sc, b=m, imm=(scale, 0.0))
            acc = bld.buffers(cores, g, ne + 1)
            bld.compute(cores, step + 1, OP_ZERO, c=acc)
            bld.compute(cores, step + 2, OP_MATMUL_ACC, c=acc, a=sc, b=V)
            step = _row_allreduce(bld, grid, on, acc, g * (lay.ne + 1), levels, step + 3)
            out = bld.buffers(cores, g, ne)
            bld.compute(cores, step, OP_DIVLAST, c=out, a=acc)
            bld.compute(cores, step + 1, OP_PUT, c=o_in[on], a=out, imm=(off * g, 0.0))
            step += 2
    starts = np.concatenate([[0], np.cumsum(o_cols)[:-1]])
    o, step = gemv(bld, region, b, int(o_cols.sum()), d, algo, k_axis="rows", x=o_in,
                   names=(None, f"{prefix}.o", None), levels=levels, step=step,
                   k_split=(starts, o_cols))
    if o_bias:
        step = add_bias(bld, region, o, d, f"{prefix}.o_bias", "cols", step=step)
    res = bld.like(h)
    bld.compute(all_cores, step, OP_ADD, c=res.ravel(), a=np.asarray(h).ravel(), b=o.ravel())
    return res, step + 1


def _shift_in(bld, cores, cc, K, V, kin, vin, off, ne, grow, new_slot, db, step, colour):
    """Add this step's k and v rows to the caches of one head slice (see `kv_positions`)."""
    col0 = cc == 0
    sends, recvs = cc < grow, (cc >= 1) & (cc <= grow)
    for cache, src, width in ((K, kin, ne), (V, vin, ne + 1)):
        row = bld.buffers(cores[col0], 1, width[col0])
        if cache is V:  # [v, 1]: the ones column accumulates the softmax denominator
            part = bld.buffers(cores[col0], 1, ne[col0])
            bld.compute(cores[col0], step, OP_FILL, c=row, imm=(1.0, 0.0))
            bld.compute(cores[col0], step + 1, OP_TAKE, c=part, a=src[col0],
                        imm=(off[col0], 0.0))
            bld.compute(cores[col0], step + 2, OP_PUT, c=row, a=part)
        else:
            bld.compute(cores[col0], step + 1, OP_TAKE, c=row, a=src[col0],
                        imm=(off[col0], 0.0))
        if grow > 0:  # columns 0 .. grow-1 pass their slot 0 east
            old = bld.buffers(cores[sends], 1, width[sends])
            bld.compute(cores[sends], step + 3, OP_TAKE, c=old, a=cache[sends])
            dst = cores[sends] + 1
            msgs = bld.messages(cores[sends], dst, np.ceil(width[sends] * db).astype(np.int64),
                                colour)
            bld.send(cores[sends], step + 4, msgs, old)
            inbox = bld.buffers(cores[recvs], 1, width[recvs])
            by_dst = np.empty(len(msgs), np.int64)  # receivers are the senders' east neighbours
            by_dst[np.argsort(cores[recvs])] = msgs[np.argsort(dst)]
            bld.recv(cores[recvs], step + 5, by_dst, inbox)
            slot = np.where(cc[recvs] < grow, 0, new_slot)
            bld.compute(cores[recvs], step + 6, OP_PUT, c=cache[recvs], a=inbox,
                        imm=(slot * width[recvs], 0.0))
        slot0 = 0 if grow > 0 else new_slot
        bld.compute(cores[col0], step + 7, OP_PUT, c=cache[col0], a=row,
                    imm=(slot0 * width[col0], 0.0))
    return step + 8


def _group_allreduce(bld, grid, lay: HeadLayout, bufs, elems, levels, step):
    """Sum score partials over each head's row group, leaving the sums on every member."""
    db = DTYPE_BYTES[bld.dtype]
    start = step
    for size in np.unique(lay.group_rows):
        if size < 2:
            continue
        firsts = np.unique(lay.group[lay.group_rows == size])
        rows = firsts[:, None] + np.arange(size)[None, :]  # [groups, size]
        # Lines: (group, column) -> the group's cores in that column.
        lines = grid[rows].transpose(0, 2, 1).reshape(-1, size)
        acc = bufs[rows].transpose(0, 2, 1).reshape(-1, size)
        tmp = bld.like(acc)
        nbytes = np.full(len(lines), int(np.ceil(elems * db)))
        root, s = ktree_reduce(bld, lines, acc, tmp, start, levels, 0, nbytes)
        s = line_broadcast(bld, lines, root, acc[:, root], acc, s, levels, nbytes)
        step = max(step, s)
    return step


def _row_allreduce(bld, grid, on, bufs, elems_per_row, levels, step, op=OP_ADD):
    """All-reduce `bufs` (one per core where `on`) along each active row."""
    rows = np.flatnonzero(on.all(axis=1))
    cols = grid.shape[1]
    if cols < 2:
        return step
    full = np.full(grid.shape, -1, np.int64)
    full[on] = bufs
    lines, acc = grid[rows], full[rows]
    tmp = bld.like(acc)
    nbytes = np.ceil(np.asarray(elems_per_row)[rows] * DTYPE_BYTES[bld.dtype]).astype(np.int64)
    root, step = ktree_reduce(bld, lines, acc, tmp, step, levels, 0, nbytes, op=op)
    return line_broadcast(bld, lines, root, acc[:, root], acc, step, levels, nbytes)
