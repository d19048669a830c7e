"""GEMM C[M, N] = A[M, K] @ B[K, N] on a region of cores (prefill's matmuls).

- `cannon`: on an s x s grid, core (i, j) starts with A(i, i+j) and B(i+j, j) (the skew is
  done by placement); each of s steps multiplies the local tiles, shifts A one core left and B
  one core up, with wrap-around. Without wrap links, the wrap message crosses the whole row.
- `meshgemm`: WaferLLM's MeshGEMM, Cannon on an *interleaved* ring: logical position l sits at
  physical position ring[l] = 0, 2, 4, ..., 5, 3, 1, so every logical neighbour (the wrap
  included) is at most two hops away.
- `summa`: on a P x Q grid, K is cut into max(P, Q) panels; for each panel, its owners
  multicast the A tile along their row and the B tile along their column, and every core
  accumulates.
Tiles are ceil(M/s) x ceil(K/s) etc.; tiles reaching past a matrix's edge are zero padding, and
their FLOPs are counted (padding costs time on a real mesh too). Cannon and MeshGEMM need a
square grid: on a rows x cols region they use the largest s x s square, s = min(rows, cols),
and record it in the program's meta. Shifts are double-buffered, so a tile travels while the
previous one is multiplied.

Sampled steps (`steps` = T, timing only): every step of the three loops has the same shape (the
same messages on the same routes, the same tile multiply), so only the first T steps are
lowered, the last ending the loop as the last step does (SUMMA: the last panel, owned at the
far edges), and the time of all s steps is
extrapolated from two values of T (wafersim.result.extrapolate). A Cannon-family GEMM has
2 s^2 (s - 1) messages, too many to hold at WaferLLM's 360 and 720 grids; T steps have
2 s^2 (T - 1). Such a program is marked `sampled`: it computes a partial product, so
functional execution refuses it.
"""

from __future__ import annotations

import math

import numpy as np

from compiler.algorithms.allreduce import line_broadcast
from compiler.algorithms.common import Region, check_dims, finish
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

GEMM_ALGOS = ("meshgemm", "cannon", "summa")
# `wafersim op gemm` samples grids wider than this (the exact 180 x 180 program holds 11.6 M
# messages and takes about 4.4 GB to simulate for the three algorithms), with these steps.
EXACT_MAX_SIDE = 180
SAMPLED_STEPS = (4, 8)


def interleaved_ring(s: int) -> np.ndarray:
    """Physical positions of logical ring positions 0..s-1: evens up, then odds down."""
    evens = np.arange(0, s, 2)
    odds = np.arange(1, s, 2)[::-1]
    return np.concatenate([evens, odds])


def gemm(bld: ProgramBuilder, region: Region, m: int, k: int, n: int, algo: str = "meshgemm",
         *, step: int = 0, steps: int | None = None) -> int:
    """Add a GEMM on `region` to `bld` (tensors "A", "B", "C"). Returns the next free step.
    `steps`: lower only that many of the loop's steps (timing only, module docstring)."""
    check_dims(m=m, k=k, n=n)
    if algo not in GEMM_ALGOS:
        raise ProgramError(f"gemm algorithm {algo!r} is not one of {', '.join(GEMM_ALGOS)}")
    full = max(region.rows, region.cols) if algo == "summa" else min(region.rows, region.cols)
    if steps is not None and not 1 <= steps <= full:
        raise ProgramError(f"gemm: steps={steps} sampled of the {algo} loop's {full} (1..{full})")
    bld.meta.update(steps=full if steps is None else steps, full_steps=full)
    if algo == "summa":
        return _summa(bld, region, m, k, n, step, steps or full)
    return _cannon(bld, region, m, k, n, algo == "meshgemm", step, steps or full)


def _tensors(bld: ProgramBuilder, m: int, k: int, n: int):
    return bld.tensor("A", m, k), bld.tensor("B", k, n), bld.tensor("C", m, n)


def _cannon(bld, region, m, k, n, interleave, step, steps):
    s = min(region.rows, region.cols)
    mb, kb, nb = (math.ceil(v / s) for v in (m, k, n))
    pos = interleaved_ring(s) if interleave else np.arange(s)
    li, lj = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")  # logical row, column
    core = (region.y0 + pos[li]) * bld.width + region.x0 + pos[lj]
    ta, tb, tc = _tensors(bld, m, k, n)
    kk = (li + lj) % s  # skewed placement
    flat = core.ravel()
    a = [bld.buffers(flat, mb, kb, INPUT if buf == 0 else SCRATCH, ta, (li * mb).ravel(),
                     (kk * kb).ravel()).reshape(s, s) for buf in (0, 1)]
    b = [bld.buffers(flat, kb, nb, INPUT if buf == 0 else SCRATCH, tb, (kk * kb).ravel(),
                     (lj * nb).ravel()).reshape(s, s) for buf in (0, 1)]
    c = bld.buffers(flat, mb, nb, OUTPUT, tc, (li * mb).ravel(), (lj * nb).ravel())
    bld.compute(flat, step, OP_ZERO, c=c)
    db = DTYPE_BYTES[bld.dtype]
    left = core[:, (np.arange(s) - 1) % s]  # logical left neighbour of each core
    up = core[(np.arange(s) - 1) % s, :]
    for t in range(steps):
        cur, nxt = t % 2, (t + 1) % 2
        base = step + 1 + 3 * t
        if t < steps - 1:
            ma = bld.messages(flat, left.ravel(), math.ceil(mb * kb * db), 0)
            mbm = bld.messages(flat, up.ravel(), math.ceil(kb * nb * db), 1)
            bld.send(flat, base, ma, a[cur].ravel())
            bld.send(flat, base, mbm, b[cur].ravel())
        bld.compute(flat, base + 1, OP_MATMUL_ACC, c=c, a=a[cur].ravel(), b=b[cur].ravel())
        if t < steps - 1:
            # Core (i, j) receives A from its logical right neighbour, B from the one below;
            # those messages are indexed by the sender, i.e. by (i, j + 1) and (i + 1, j).
            from_right = ma.reshape(s, s)[:, (np.arange(s) + 1) % s]
            from_below = mbm.reshape(s, s)[(np.arange(s) + 1) % s, :]
            bld.recv(flat, base + 2, from_right.ravel(), a[nxt].ravel())
            bld.recv(flat, base + 2, from_below.ravel(), b[nxt].ravel())
    bld.meta.update(op="gemm", algo="meshgemm" if interleave else "cannon", m=m, k=k, n=n,
                    rows=s, cols=s, grid=f"{s}x{s}")
    return step + 1 + 3 * steps


def _summa(bld, region, m, k, n, step, steps):
    rows, cols = region.rows, region.cols
    panels = max(rows, cols)
    mb, kb, nb = math.ceil(m / rows), math.ceil(k / panels), math.ceil(n / cols)
    core = region.cores(bld.width)
    ta, tb, tc = _tensors(bld, m, k, n)
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    db = DTYPE_BYTES[bld.dtype]
    c = bld.buffers(core.ravel(), mb, nb, OUTPUT, tc, (i * mb).ravel(), (j * nb).ravel())
    bld.compute(core.ravel(), step, OP_ZERO, c=c)
    ra = [bld.buffers(core.ravel(), mb, kb).reshape(rows, cols) for _ in (0, 1)]
    rb = [bld.buffers(core.ravel(), kb, nb).reshape(rows, cols) for _ in (0, 1)]
    # Sampled: the first steps - 1 panels, then the last (whose owners sit at the far edges,
    # as in the whole loop's drain).
    order = list(range(steps - 1)) + [panels - 1]
    for t, p in enumerate(order):
        oc, orow = p % cols, p % rows  # owner column of A's panel, owner row of B's panel
        own_a = bld.buffers(core[:, oc], mb, kb, INPUT, ta, np.arange(rows) * mb, p * kb)
        own_b = bld.buffers(core[orow, :], kb, nb, INPUT, tb, p * kb, np.arange(cols) * nb)
        base = step + 1 + 3 * t
        recv_a, recv_b = ra[t % 2].copy(), rb[t % 2].copy()
        if cols > 1:
            line_broadcast(bld, core, oc, own_a, recv_a, base, 0, math.ceil(mb * kb * db))
        if rows > 1:
            line_broadcast(bld, core.T, orow, own_b, recv_b.T, base, 2, math.ceil(kb * nb * db))
        recv_a[:, oc], recv_b[orow, :] = own_a, own_b  # owners multiply their own tiles
        bld.compute(core.ravel(), base + 2, OP_MATMUL_ACC, c=c, a=recv_a.ravel(),
                    b=recv_b.ravel())
    bld.meta.update(op="gemm", algo="summa", m=m, k=k, n=n, rows=rows, cols=cols,
                    grid=f"{cols}x{rows}")
    return step + 1 + 3 * steps


def lower_gemm(m: int, k: int, n: int, rows: int, cols: int, algo: str = "meshgemm", *,
               dtype: str = "bf16", target: MeshTarget | None = None,
               steps: int | None = None) -> MeshProgram:
    """A program computing C = A @ B on a rows x cols mesh, checked against `target`; with
    `steps`, the first steps of its loop only, for timing (module docstring).

    >>> lower_gemm(16, 16, 16, 4, 4, "cannon").meta["grid"]
    '4x4'
    """
    check_dims(rows=rows, cols=cols)
    bld = ProgramBuilder(cols, rows, dtype)
    gemm(bld, Region(rows, cols), m, k, n, algo, steps=steps)
    prog = bld.build()
    if steps is not None:
        prog.meta["sampled"] = True  # wafersim.functional refuses it
    return finish(prog, target, f"gemm [{m},{k}]x[{k},{n}] on {cols}x{rows} cores")
