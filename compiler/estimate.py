"""Estimated decode-step time of a model on a region shape, in closed form, to choose the shape.

At batch 1 a decode layer is a chain of phases that every core of its region runs in turn:
local compute (GEMV tiles, norms, RoPE, attention over the core's cache slots) alternating
with reductions and broadcasts along the region's rows or columns. The estimate follows that
chain as `compiler.algorithms` lowers it, with every term taken from the target and the
algorithms' message patterns (no fitted constants), under wafersim.engine's timing model:
- COMPUTE: max(ceil(FLOPs / rate), ceil(SRAM bytes / SRAM bandwidth)) + compute overhead, the
  FLOPs and bytes counted as compiler.program's `_COSTS` counts them, per row on its largest tile;
- a message of S = ceil(bytes / link bandwidth) cycles over h hops arrives h * hop latency + S
  after its SEND's overhead, then costs the RECV's overhead; messages running toward one core
  queue for each link first come first served, each holding it S cycles;
- a K-tree level: every member sends once it is ready, the group's leader takes the messages
  nearest first, each a RECV and a combine; a broadcast: the root's multicast east, then west.
Where each core can go on is tracked as a row term plus a column term (`Ready`): a broadcast
along a line leaves its far cores later than its near ones, and the next reduction along the
same lines waits for them only where it must (its leaders take the far members last); rows
holding larger tiles or head slices start their messages later. The estimate is exact for a
lone GEMV and for a K-tree under any readiness unless messages of two levels meet on a link
(tests/test_estimate.py checks GEMVs against the simulator), and within half a per cent of
the simulated layers and steps of LLaMA-3-8B and LLaMA-2-13B (benchmarks/estimate.py). What
the partition policy needs is that it ranks shapes as the simulation does; it costs a few
milliseconds per layer shape. A fast feed-forward model's tree is followed along the default
seeded path (within 0.2% of the simulated steps in tests/test_fff.py); activation sparsity
is not modelled: such a model's placements are ranked by its dense MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np

from compiler.algorithms.attention import head_layout
from compiler.algorithms.common import split
from compiler.algorithms.fff import draw_paths
from compiler.quant import CACHE, HEAD, PROJ, Scheme, compute_bytes, matmul, stored_bytes
from compiler.targets import DTYPE_BYTES, MeshTarget
from models.config import ModelConfig


@dataclass(frozen=True)
class Ready:
    """When each core of a rows x cols region can go on: core (i, j) at row[i] + col[j]. A
    reduction along the region's rows (lines over columns) reads and rewrites `col`; one along
    its columns, `row`; local compute adds to `row` (per row where rows differ)."""

    row: np.ndarray
    col: np.ndarray

    @property
    def done(self) -> float:
        return float(self.row.max() + self.col.max())

    def after(self, cycles: float) -> Ready:
        return Ready(self.row + cycles, self.col)


def _start(rows: int, cols: int) -> Ready:
    return Ready(np.zeros(rows), np.zeros(cols))


# ---- primitives ------------------------------------------------------------------------------

def _op(t: MeshTarget, dtype: str, flops, elems):
    """One COMPUTE: its work (compute or SRAM bound, as wafersim.simulate.compute_cycles) plus
    the fixed overhead. `elems`: elements read + written. Numbers or arrays (per row)."""
    if isinstance(flops, np.ndarray) or isinstance(elems, np.ndarray):
        work = np.maximum(np.ceil(flops / t.rate(dtype)),
                          np.ceil(np.ceil(elems * DTYPE_BYTES[dtype]) / t.sram_bytes_per_cycle))
    else:
        work = max(math.ceil(flops / t.rate(dtype)),
                   math.ceil(math.ceil(elems * DTYPE_BYTES[dtype]) / t.sram_bytes_per_cycle))
    return work + t.compute_overhead_cycles


def _cost(t: MeshTarget, dtype: str, flops, nbytes):
    """_op from FLOPs and SRAM bytes (compiler.quant's costs)."""
    return np.maximum(np.ceil(flops / t.rate(dtype)), np.ceil(nbytes / t.sram_bytes_per_cycle)
                      ) + t.compute_overhead_cycles


def _quantised(q: Scheme | None, kind: int) -> bool:
    """Whether `q` stores tensors of `kind` other than in the compute dtype, dense."""
    if q is None:
        return False
    if kind == CACHE:
        return q.kv != q.compute
    return q.weights != q.compute or (kind == PROJ and q.density < 1)


def _ser(t: MeshTarget, nbytes):
    """Serialisation cycles of a message on one link (numbers or arrays)."""
    return np.ceil(np.ceil(nbytes) / t.link_bytes_per_cycle)


@lru_cache(maxsize=4096)
def _sizes(total: int, parts: int, lines: int) -> np.ndarray:
    """Chunk sizes of `total` split near-equally over min(parts, total) of `lines` lines (the
    rest hold nothing), as the lowerings split dimensions. Read-only (cached)."""
    out = np.zeros(lines, np.int64)
    out[:min(parts, total)] = split(total, min(parts, total))[1]
    out.flags.writeable = False
    return out


@numba.njit(cache=True, nogil=True)
def _side(time, pos, lead, first, step, ser, hop, so, arrive):
    """Deliveries at the leader `lead` of its members on one side, first, first + step, ...
    (nearest first): arrive[k] for the k-th. The members' messages run toward the leader over
    one line of links; walking from the farthest member in, each member's outgoing link takes
    the messages passing through and the member's own first come first served (the member's
    own first on a tie: it was queued first), each holding the link S cycles; between members
    the messages keep their spacing and advance a hop latency per link."""
    k = len(arrive)
    req = np.empty(k)  # request times at the current link, in service order
    who = np.empty(k, np.int64)
    m = 0
    for i in range(k - 1, -1, -1):
        j = first + i * step
        if m:
            gap = abs(pos[j + step] - pos[j])  # hops from the previous (farther) member
            for x in range(m):
                req[x] += gap * hop
        own = time[j] + so
        at = m
        while at > 0 and req[at - 1] >= own:  # before those requesting at the same time
            at -= 1
        for x in range(m, at, -1):
            req[x] = req[x - 1]
            who[x] = who[x - 1]
        req[at] = own
        who[at] = i
        m += 1
        start = -np.inf
        for x in range(m):
            start = max(req[x], start + ser)
            req[x] = start
    d0 = abs(pos[first] - pos[lead])
    for x in range(m):
        arrive[who[x]] = req[x] + d0 * hop + ser


@numba.njit(cache=True, nogil=True)
def _ktree_jit(ready, levels, ser, step, hop, so):
    """(time the root has the sum, root position) of compiler.algorithms.allreduce.ktree_reduce
    along a line whose cores hold their partials at `ready`; `step`: a RECV and a combine.

    Each level groups the remaining positions as `_level_groups` does; a member sends
    send_overhead after it is ready, the messages of each side queue on the links toward the
    leader (`_side`), and the leader takes them nearest first (left first on ties), each
    waiting for its delivery. The next level starts from the leaders' finishing times.
    """
    n = ready.shape[0]
    pos = np.arange(n)
    time = ready.copy()
    group = max(2, math.ceil(n ** (1.0 / levels))) if levels > 1 else n
    level = 0
    while len(pos) > 1:
        m = len(pos)
        size = m if level == levels - 1 else group
        ng = (m + size - 1) // size
        new_pos = np.empty(ng, np.int64)
        new_time = np.empty(ng)
        for gi in range(ng):
            a = gi * size
            e = min(a + size, m)
            lead = a + (e - a) // 2
            left = np.empty(lead - a)
            right = np.empty(e - lead - 1)
            _side(time, pos, lead, lead - 1, -1, ser, hop, so, left)
            _side(time, pos, lead, lead + 1, 1, ser, hop, so, right)
            t = time[lead]
            il, ir = 0, 0
            while il < len(left) or ir < len(right):  # nearest first, left first on ties
                if ir >= len(right) or (il < len(left)
                                        and pos[lead] - pos[lead - 1 - il]
                                        <= pos[lead + 1 + ir] - pos[lead]):
                    t = max(t, left[il]) + step
                    il += 1
                else:
                    t = max(t, right[ir]) + step
                    ir += 1
            new_pos[gi] = pos[lead]
            new_time[gi] = t
        pos, time = new_pos, new_time
        level += 1
    return time[0], pos[0]


@numba.njit(cache=True, nogil=True)
def _chain_jit(ready, ser, step, hop, so):
    """When the last core of chain_reduce has the sum: core i waits for core i - 1's partial,
    adds, passes it on, t_i = max(ready_i, t_{i-1} + send + hop + S) + recv + add, unrolled."""
    n = ready.shape[0]
    best = -np.inf
    for k in range(n):
        best = max(best, ready[k] + (n - 1 - k) * (so + hop + ser + step) + (step if k else 0.0))
    return best


def _broadcast(n: int, root: int, at: float, ser: int, t: MeshTarget) -> np.ndarray:
    """When each core of a line has the root's multicast (line_broadcast: east first, then
    west; a core d hops away receives d * hop + S after the send, then pays its RECV)."""
    out = np.empty(n)
    _broadcast_jit(out, root, float(at), float(ser), float(t.hop_latency_cycles),
                   float(t.send_overhead_cycles), float(t.recv_overhead_cycles))
    return out


@numba.njit(cache=True, nogil=True)
def _broadcast_jit(out, root, at, ser, hop, so, ro):
    n = out.shape[0]
    east = at + so
    west = at + so * (2.0 if root < n - 1 else 1.0)
    for p in range(n):
        if p > root:
            out[p] = east + (p - root) * hop + ser + ro
        elif p < root:
            out[p] = west + (root - p) * hop + ser + ro
    out[root] = at + so * ((root < n - 1) + (root > 0))


def _tree(ready: np.ndarray, ser: float, combine: float, t: MeshTarget, algo: str,
          levels: int) -> tuple[float, int]:
    """(time the root has the sum, root position) of a reduction along a line: chain_reduce
    for "ring", else the K-tree."""
    step = float(t.recv_overhead_cycles + combine)
    hop, so = float(t.hop_latency_cycles), float(t.send_overhead_cycles)
    if algo == "ring":
        return float(_chain_jit(ready, float(ser), step, hop, so)), len(ready) - 1
    at, root = _ktree_jit(ready, levels, float(ser), step, hop, so)
    return float(at), int(root)


def _along(s: Ready, lines: str, nbytes, combine, t: MeshTarget, algo: str = "meshgemv",
           levels: int = 2, broadcast: bool = True, n: int | None = None, on=None) -> Ready:
    """A reduction (and broadcast back) along every line of the region: `lines="rows"`
    reduces over each row's columns (reading and rewriting `col`), "cols" over each column's
    rows. `nbytes`, `combine`: the message and the combine's cycles, one for all lines or an
    array over them; `n`: only the first n cores of a line take part (fewer K chunks than
    cores); `on`: the lines that take part (the others wait for nothing).

    Line i ends with its root at R_i + T_i (T_i its tree over the positions' profile) and its
    other cores at that + the broadcast's hops and S_i: so the new profile is the broadcast's
    and line i's term grows by T_i + S_i - max S (exact but for a root, which is early)."""
    prof, other = (s.col, s.row) if lines == "rows" else (s.row, s.col)
    n = len(prof) if n is None else n
    if n < 2 or (on is not None and not on.any()):
        return s
    part = np.ascontiguousarray(prof[:n], np.float64)
    ser = _ser(t, nbytes)
    if on is None and np.ndim(ser) == 0 and np.ndim(combine) == 0:  # every line alike
        at, root = _tree(part, float(ser), float(combine), t, algo, levels)
        top = float(ser)
    else:
        on = np.ones(len(other), bool) if on is None else on
        ser = np.broadcast_to(ser, other.shape)
        combine = np.broadcast_to(combine, other.shape)
        kind = ser[on] * (combine[on].max() + 1) + combine[on]  # both whole cycles
        first, which = np.unique(kind, return_index=True, return_inverse=True)[1:]
        trees = [_tree(part, ser[on][i], combine[on][i], t, algo, levels) for i in first]
        root = trees[0][1]
        at = np.zeros(len(other))
        at[on] = np.array([a for a, _ in trees])[which]
        top = float(ser[on].max())
        at = at + (ser - top if broadcast else 0.0)
    new = np.empty(len(prof))
    if broadcast:
        _broadcast_jit(new[:n], root, 0.0, top, float(t.hop_latency_cycles),
                       float(t.send_overhead_cycles), float(t.recv_overhead_cycles))
    else:
        new[:n] = 0.0
    new[n:] = new[:n].min()
    other = other + at if on is None else np.where(on, other + at, other + np.max(prof - new))
    return Ready(other, new) if lines == "rows" else Ready(new, other)


# ---- ops as lowered --------------------------------------------------------------------------

def _line(ready: np.ndarray, nbytes: float, combine: float, t: MeshTarget, levels: int
          ) -> np.ndarray:
    """When each core of one line has the K-tree all-reduce of partials ready at `ready`."""
    ser = float(_ser(t, nbytes))
    at, root = _tree(np.ascontiguousarray(ready, np.float64), ser, combine, t, "meshgemv",
                     levels)
    out = np.empty(len(ready))
    _broadcast_jit(out, root, at, ser, float(t.hop_latency_cycles),
                   float(t.send_overhead_cycles), float(t.recv_overhead_cycles))
    return out


def _gemv(s: Ready, t: MeshTarget, dtype: str, b: int, k: int, n: int, k_axis: str,
          algo: str, levels: int, allreduce: bool = True, k_sizes=None, n_sizes=None,
          q: Scheme | None = None, kind: int = PROJ) -> Ready:
    """compiler.algorithms.meshgemv.gemv: zero and multiply each core's tile, reduce the
    b x N_j partial sums along K's cores and, for an all-reduce, multicast y back along them.
    K over rows (`k_axis="rows"`) reduces along the region's columns. `k_sizes`, `n_sizes`:
    the chunks of K and N over their lines where they follow attention's head layout
    (default: near-equal). A tile's time is taken per row, with the other dimension's largest
    chunk (they differ by an element)."""
    rows, cols = len(s.row), len(s.col)
    k_lines, n_lines = (rows, cols) if k_axis == "rows" else (cols, rows)
    kc = min(k_lines, k)
    ks = _sizes(k, k_lines, k_lines) if k_sizes is None else np.asarray(k_sizes)
    ns = _sizes(n, n_lines, n_lines) if n_sizes is None else np.asarray(n_sizes)
    def tile(kk, nn):  # zero the accumulator, multiply-accumulate the tile (stored as q says)
        if _quantised(q, kind):
            return _op(t, dtype, 0, b * nn) + _cost(t, dtype, *matmul(
                q, t, kind, b * kk, b * nn, kk, nn, 2 * b * kk * nn, True))
        return _op(t, dtype, 0, b * nn) + _op(t, dtype, 2 * b * kk * nn,
                                              b * kk + kk * nn + 2 * b * nn)

    # Rows' chunks (K's over rows, else N's) with the columns' largest, then what the
    # columns' smaller chunks save (a row term plus a column term).
    (kr, nr), (kc_, nc_) = ((ks, ns.max()), (ks.max(), ns)) if k_axis == "rows" else \
        ((ks.max(), ns), (ks, ns.max()))
    s = s.after(tile(kr, nr))
    s = Ready(s.row, s.col + tile(kc_, nc_) - tile(ks.max(), ns.max()))
    return _along(s, "cols" if k_axis == "rows" else "rows", b * ns * DTYPE_BYTES[dtype],
                  _op(t, dtype, b * ns, 3 * b * ns), t, algo, levels, allreduce and kc > 1,
                  kc)


def gemv_cycles(t: MeshTarget, dtype: str, b: int, k: int, n: int, rows: int, cols: int,
                k_axis: str = "rows", algo: str = "meshgemv", levels: int = 2,
                allreduce: bool = True) -> float:
    """Estimated cycles of a lone GEMV y[b, N] = x[b, K] @ W on a rows x cols region."""
    return _gemv(_start(rows, cols), t, dtype, b, k, n, k_axis, algo, levels, allreduce).done


def _rmsnorm(s: Ready, t: MeshTarget, dtype: str, b: int, d: int, levels: int) -> Ready:
    """compiler.algorithms.norm.rmsnorm: sum of squares of the chunk, an all-reduce of [b, 1]
    along each row (hops and overheads, hardly bandwidth), rsqrt, two scalings."""
    cs = math.ceil(d / len(s.col))
    s = s.after(_op(t, dtype, 2 * b * cs, b * cs + b))
    s = _along(s, "rows", b * DTYPE_BYTES[dtype], _op(t, dtype, b, 3 * b), t, levels=levels)
    return s.after(_op(t, dtype, 6 * b, 2 * b) + 2 * _op(t, dtype, b * cs, 2 * b * cs + cs))


def _shift_in(s: Ready, t: MeshTarget, dtype: str, ne: int, q: Scheme | None = None
              ) -> Ready:
    """attention._shift_in (k and v): column 0 builds the new rows (fill, takes, put); every
    column up to the growing one takes its slot 0 and sends it east; each receiver waits for
    its west neighbour's k and v, then puts both. Taken at its longest (every column shifts,
    the widest head slice). A quantised cache moves stored entries and quantises the new one
    (compiler.quant.apply)."""
    op = lambda elems: float(_op(t, dtype, 0, elems))  # noqa: E731
    first = op(ne + 1) + op(2 * ne) + op(2 * ne) + op(2 * ne)  # fill, take k, take v, put
    db = DTYPE_BYTES[dtype]
    if _quantised(q, CACHE):
        st = lambda w: float(stored_bytes(q, CACHE, 1, w))  # noqa: E731
        take = put = float(sum(_cost(t, dtype, 0, 2 * st(w)) for w in (ne, ne + 1)))
        put0 = float(sum(_cost(t, dtype, 2 * w, compute_bytes(q, 1, w) + st(w))
                         for w in (ne, ne + 1)))
        k_bytes, v_bytes = st(ne), st(ne + 1)
    else:
        take = put = put0 = op(2 * ne) + op(2 * (ne + 1))  # slot 0 of k and of v; the puts
        k_bytes, v_bytes = ne * db, (ne + 1) * db
    c = s.col
    if len(c) == 1:
        return Ready(s.row, c + first + put0)
    hop, so, ro = t.hop_latency_cycles, t.send_overhead_cycles, t.recv_overhead_cycles
    sent = c + take + np.where(np.arange(len(c)) == 0, first, 0.0)  # SENDs start
    k_in = sent[:-1] + so + hop + _ser(t, k_bytes)
    v_in = sent[:-1] + 2 * so + hop + _ser(t, v_bytes)
    recv = np.maximum(np.maximum(sent[1:] + 2 * so, k_in) + ro, v_in) + ro + put
    return Ready(s.row, np.concatenate([[sent[0] + 2 * so + put0], recv]))


@lru_cache(maxsize=1024)
def _heads(rows: int, kv_heads: int, g: int, hd: int):
    """attention.head_layout per row: dims per head, heads, q's and k's (v's) columns; and the
    head groups (first row, rows) spanning more than one row."""
    lay = head_layout(rows, kv_heads, g, hd)
    groups = tuple((int(f), int(n)) for f, n in np.unique(
        np.stack([lay.group, lay.group_rows], axis=1), axis=0) if n > 1)
    out = (lay.ne, lay.nh, lay.columns(g), lay.columns(1))
    for a in out:
        a.flags.writeable = False
    return (*out, groups)


def _attention(s: Ready, cfg: ModelConfig, t: MeshTarget, b: int, slots: int, algo: str,
               levels: int, q: Scheme | None = None) -> Ready:
    """compiler.algorithms.attention.attention_block, row by row of its head layout (rows
    may hold different head slices and numbers of heads); weights and caches stored as `q`."""
    dt, db = cfg.dtype, DTYPE_BYTES[cfg.dtype]
    rows, cols = len(s.row), len(s.col)
    d, hd, kvh = cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads
    g = cfg.num_attention_heads // kvh
    ne, nh, q_row, kv_row, groups = _heads(rows, kvh, g, hd)  # per row, and head groups
    op = lambda flops, elems: _op(t, dt, flops, elems)  # noqa: E731
    if _quantised(q, CACHE):  # scores over K, P @ V over V [slots, ne + 1]
        score = _cost(t, dt, *matmul(q, t, CACHE, g * ne, g * slots, slots, ne,
                                     2 * g * ne * slots, False))
        value = _cost(t, dt, *matmul(q, t, CACHE, g * slots, g * (ne + 1), slots, ne + 1,
                                     2 * g * slots * (ne + 1), True))
    else:
        score = op(2 * g * ne * slots, g * ne + slots * ne + g * slots)
        value = op(2 * g * slots * (ne + 1), g * slots + slots * (ne + 1) + 2 * g * (ne + 1))

    s = _rmsnorm(s, t, dt, b, d, levels)
    for n_row in (q_row, kv_row, kv_row):  # q, k, v: K over columns, each row its heads' dims
        s = _gemv(s, t, dt, b, d, int(n_row.sum()), "cols", algo, levels, n_sizes=n_row, q=q)
        if cfg.qkv_bias:
            s = s.after(op(b * n_row, 2 * b * n_row + n_row))
    s = s.after(op(3 * b * nh * g * ne, 2 * b * nh * g * ne + ne)  # RoPE on q
                + op(3 * b * nh * ne, 2 * b * nh * ne + ne))  # and k
    # Per sequence and KV head of a row (attention's all-reduces are K-trees whatever the GEMVs
    # use): shift k, v in; scores; their sum over the head's rows; softmax maxima over the row;
    # exp; P @ V with the denominator; its sum over the row; divide.
    for hh in range(int(nh.max())):
        on = nh > hh  # rows holding a head this far
        for _ in range(b):
            s = _shift_in(s, t, dt, int(ne.max()), q)
            s = s.after(on * (op(0, 2 * g * ne) + score))
            row = s.row.copy()
            for first, n in groups:
                row[first:first + n] = _line(s.row[first:first + n], g * slots * db,
                                             float(op(g * slots, 3 * g * slots)), t, levels)
            s = Ready(row, s.col).after(on * op(g * slots, g * slots + g))
            s = _along(s, "rows", g * db, op(g, 3 * g), t, levels=levels, on=on)
            s = s.after(on * (op(5 * g * slots, 2 * g * slots + g) + op(0, g * (ne + 1))
                              + value))
            s = _along(s, "rows", g * (ne + 1) * db, op(g * (ne + 1), 3 * g * (ne + 1)), t,
                       levels=levels, on=on)
            s = s.after(on * (op(g * ne, g * (ne + 1) + g * ne) + op(0, 2 * g * ne)))
    s = _gemv(s, t, dt, b, int(q_row.sum()), d, "rows", algo, levels, k_sizes=q_row, q=q)
    cs = b * math.ceil(d / cols)
    return s.after(op(cs, 3 * cs))  # residual


def _mlp(s: Ready, cfg: ModelConfig, t: MeshTarget, b: int, algo: str, levels: int,
         q: Scheme | None = None) -> Ready:
    """compiler.algorithms.mlp.mlp_block: norm, up (and gate) with K over columns, the
    activation, down with K over rows, residual."""
    if cfg.fff_depth is not None:
        return _fff(s, cfg, t, b, algo, levels)
    dt, d, f = cfg.dtype, cfg.hidden_size, cfg.intermediate_size
    s = _rmsnorm(s, t, dt, b, d, levels)
    for _ in range(2 if cfg.gated_mlp else 1):
        s = _gemv(s, t, dt, b, d, f, "cols", algo, levels, q=q)
    fs = b * _sizes(f, len(s.row), len(s.row))  # per row
    s = s.after(_op(t, dt, (6 if cfg.hidden_act in ("silu", "swish") else 8) * fs, 2 * fs))
    if cfg.gated_mlp:
        s = s.after(_op(t, dt, fs, 3 * fs))
    s = _gemv(s, t, dt, b, f, d, "rows", algo, levels, q=q)
    cs = b * math.ceil(d / len(s.col))
    return s.after(_op(t, dt, cs, 3 * cs))


def _fff(s: Ready, cfg: ModelConfig, t: MeshTarget, b: int, algo: str, levels: int) -> Ready:
    """compiler.algorithms.fff.fff_block along the default seeded path (draw_paths, seed 0):
    per level, on the node's row, the dot product, the scalar all-reduce along the row, the
    activation and the output update, then the running output down each column to the next
    row; at the end the output's multicast along every column and the residual. Each column
    is followed on its own (`T`); sequences are taken one after another (at batch > 1 an
    approximation: their chains overlap where they use different rows)."""
    dt, d = cfg.dtype, cfg.hidden_size
    rows, cols = len(s.row), len(s.col)
    db = DTYPE_BYTES[dt]
    s = _rmsnorm(s, t, dt, b, d, levels)
    cs = _sizes(d, cols, cols)
    paths = draw_paths(cfg.fff_depth, b, 0) % rows
    act = 6 if cfg.hidden_act in ("silu", "swish") else 8
    hop, so, ro = t.hop_latency_cycles, t.send_overhead_cycles, t.recv_overhead_cycles
    ser1 = float(_ser(t, db))
    T = None
    for seq in paths:
        T = s.row[seq[0]] + s.col if T is None else T
        for level, r in enumerate(seq):
            dot = _op(t, dt, 0, 1) + _op(t, dt, 2 * cs, 2 * cs + 2)
            if b > 1:
                dot = dot + _op(t, dt, 0, 2 * cs)
            at, root = _tree(np.ascontiguousarray(T + dot, np.float64), ser1,
                             float(_op(t, dt, 1, 3)), t, algo, levels)
            T = _broadcast(cols, root, at, ser1, t) if cols > 1 else np.full(1, at)
            T = T + _op(t, dt, act, 2) + _op(t, dt, cs, 2 * cs + 1)
            if level:
                T = T + _op(t, dt, cs, 3 * cs)
            if level < len(seq) - 1 and seq[level + 1] != r:
                T = T + so + abs(int(seq[level + 1]) - int(r)) * hop + _ser(t, (cs + 1) * db) + ro
        ser = _ser(t, cs * db)
        down = _broadcast(rows, int(seq[-1]), 0.0, float(ser.max()), t) if rows > 1 else \
            np.zeros(1)
        T = T + ser - ser.max() + (0 if b == 1 else _op(t, dt, 0, 2 * cs).max())
    s = Ready(down, T)
    out = b * cs.max()
    return s.after(_op(t, dt, out, 3 * out))


def _layer(s: Ready, cfg: ModelConfig, t: MeshTarget, b: int, slots: int, algo: str,
           levels: int, q: Scheme | None = None) -> Ready:
    """One layer of a region's loop: attention, MLP, and the copy carrying h to the next."""
    s = _mlp(_attention(s, cfg, t, b, slots, algo, levels, q), cfg, t, b, algo, levels, q)
    return s.after(_op(t, cfg.dtype, 0, 2 * b * math.ceil(cfg.hidden_size / len(s.col))))


def layer_cycles(cfg: ModelConfig, target: MeshTarget, rows: int, cols: int, batch: int,
                 slots: int, algo: str = "meshgemv", levels: int = 2,
                 q: Scheme | None = None) -> float:
    """Estimated cycles one decode layer adds on a rows x cols region with `slots` cache
    entries per core: the second of two layers, as the simulation measures a layer (the
    first starts with every core ready; the second inherits the first's stragglers)."""
    one = _layer(_start(rows, cols), cfg, target, batch, slots, algo, levels, q)
    return _layer(one, cfg, target, batch, slots, algo, levels, q).done - one.done


# ---- a step ----------------------------------------------------------------------------------

def _embed(cfg: ModelConfig, t: MeshTarget, rows: int, cols: int, b: int, algo: str,
           levels: int) -> Ready:
    """compiler.model._embed: the ids go along row 0 then down every column, each core looks
    up its rows of the table, and the lookup's reduction over rows gathers h."""
    ser = _ser(t, b * DTYPE_BYTES[cfg.dtype])
    s = Ready(_broadcast(rows, 0, 0.0, ser, t) if rows > 1 else np.zeros(1),
              _broadcast(cols, 0, 0.0, ser, t) if cols > 1 else np.zeros(cols))
    v, d = cfg.vocab_size, cfg.hidden_size
    ns = b * _sizes(d, cols, cols)  # per column
    s = s.after(_op(t, cfg.dtype, 0, b + 2 * ns.max()))  # lookup
    kc = min(rows, v)
    return _along(s, "cols", ns * DTYPE_BYTES[cfg.dtype], _op(t, cfg.dtype, ns, 3 * ns), t,
                  algo, levels, kc > 1, kc)


def _head(s: Ready, cfg: ModelConfig, t: MeshTarget, b: int, algo: str, levels: int,
          q: Scheme | None = None) -> float:
    """compiler.model._head and _argmax: final norm, LM head GEMV (logits split over rows, no
    broadcast), argmax on each row's root, then a K-tree of (value, id) pairs over the rows."""
    dt, v = cfg.dtype, cfg.vocab_size
    s = _rmsnorm(s, t, dt, b, cfg.hidden_size, levels)
    s = _gemv(s, t, dt, b, cfg.hidden_size, v, "cols", algo, levels, allreduce=False, q=q,
              kind=HEAD)
    ns = b * _sizes(v, len(s.row), len(s.row))  # per row
    s = s.after(_op(t, dt, ns, ns + 2 * b))
    roots = s.row[:min(len(s.row), v)] + s.col.max()
    if len(roots) < 2:
        return float(roots.max())
    return _tree(roots, float(_ser(t, b * (DTYPE_BYTES[dt] + 4))),
                 float(_op(t, dt, 4 * b, 6 * b)), t, "meshgemv", levels)[0]


def _handoff(at: float, cfg: ModelConfig, t: MeshTarget, rows: int, cols: int, b: int,
             stacked: bool) -> Ready:
    """compiler.model._receive: column j's h chunk crosses to the next region (side by side:
    `cols` hops along row j % rows, where columns sharing a row queue on its links; stacked:
    one hop down), then goes along the column from the receiving row."""
    hop, so, ro = t.hop_latency_cycles, t.send_overhead_cycles, t.recv_overhead_cycles
    ser = _ser(t, b * math.ceil(cfg.hidden_size / cols) * DTYPE_BYTES[cfg.dtype])
    if stacked:
        got = at + so + hop + ser + ro
        return Ready(_broadcast(rows, 0, got, ser, t) if rows > 1 else np.full(1, got),
                     np.zeros(cols))
    got = at + so + cols * hop + math.ceil(cols / rows) * ser + ro
    worst = max(((_broadcast(rows, r, got, ser, t) if rows > 1 else np.full(1, got))
                 for r in {0, min(rows, cols) - 1}), key=lambda a: a.max())
    return Ready(worst, np.zeros(cols))


def step_cycles(cfg: ModelConfig, target: MeshTarget, rows: int, cols: int, counts: list[int],
                batch: int, slots: int, algo: str = "meshgemv", levels: int = 2,
                q: Scheme | None = None, ends: tuple[bool, bool] = (True, True)) -> float:
    """Estimated cycles of a decode step: the embedding on the first region, sum(counts) layers
    one after another (at batch 1 each waits for the previous one's h), the hand-offs between
    consecutive regions (in compiler.model.place's serpentine order: side by side, or stacked
    where a row of regions turns), and the final norm, LM head and argmax on the last region.
    `ends` (CompileOptions.ends): a pipeline stage without the embedding starts from h on the
    first region's top row; one without the head ends with its last layer."""
    if ends[0]:
        s = _embed(cfg, target, rows, cols, batch, algo, levels)
    else:  # compiler.model._enter: the top row's chunks go down the columns
        ser = _ser(target, batch * math.ceil(cfg.hidden_size / cols) * DTYPE_BYTES[cfg.dtype])
        s = Ready(_broadcast(rows, 0, 0.0, ser, target) if rows > 1 else np.zeros(1),
                  np.zeros(cols))
    per_row = max(1, target.width // cols)
    per_layer = layer_cycles(cfg, target, rows, cols, batch, slots, algo, levels, q)
    first = {}  # stacked -> cycles from a hand-off's send to the end of the region's 1st layer
    for k, count in enumerate(counts):
        if k:
            stacked = k % per_row == 0
            if count and k < len(counts) - 1:  # (times shift; the head needs the profile)
                if stacked not in first:
                    first[stacked] = _layer(_handoff(0.0, cfg, target, rows, cols, batch,
                                                     stacked), cfg, target, batch, slots, algo,
                                            levels, q).done
                s = _start(rows, cols).after(s.done + first[stacked] + (count - 1) * per_layer)
                continue
            s = _handoff(s.done, cfg, target, rows, cols, batch, stacked)
        if count:  # the region's first layer, then each further one adds per_layer
            s = _layer(s, cfg, target, batch, slots, algo, levels, q).after(
                (count - 1) * per_layer)
    return _head(s, cfg, target, batch, algo, levels, q) if ends[1] else s.done
