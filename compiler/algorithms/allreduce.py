"""Reductions and broadcasts along lines of cores (mesh rows or columns), vectorised over lines.

A *line* is a row of the `lines` array: `n` physically adjacent cores. All lines of one call
reduce at once. Buffers are given per core as arrays shaped like `lines`; `nbytes` is the
message size of each line (lines may differ by an element when a dimension splits unevenly).

- `ktree_reduce`: WaferLLM's K-tree. Level 1 splits the line into groups of g = ceil(n^(1/K))
  neighbouring cores, and every member sends its partial sum to the group's leader (the group's
  middle core), which adds them, nearest first. Level 2 does the same over the leaders, and so
  on; the last level gathers all remaining leaders into one root. Hops per message and routes
  per core stay bounded by about g, instead of growing with n. (FACTS.md: K = 2 gives the two
  phases `root_1st_phase`, `root_2nd_phase` of WaferLLM's runs.)
- `chain_reduce`: the ring reduction: whole partial sums flow from one end of the line to the
  other, each core receiving the whole vector, adding its own and sending it on; latency grows
  linearly with n, each step paying the whole vector's transfer.
- `pipeline_reduce`: the pipeline all-reduce's reduction, the Cerebras default (WaferLLM's GEMV
  baseline): the same chain, but the vector streams through it in chunks, so core i adds chunk
  k while core i + 1 adds chunk k - 1; a step pays one chunk's transfer, not the vector's.
- `line_broadcast`: the root multicasts the result along the line in both directions, each
  core taking it off the fabric as it passes (one colour per direction).
"""

from __future__ import annotations

import math

import numpy as np

from compiler.program import OP_ADD, OP_PUT, OP_TAKE, ProgramBuilder
from compiler.targets import DTYPE_BYTES, MeshTarget


def _per_msg(nbytes, shape) -> np.ndarray:
    """Per-line sizes broadcast over the messages of a [lines, k] batch, flattened."""
    return np.broadcast_to(np.reshape(nbytes, (-1, 1)), shape).ravel()


def _level_groups(positions: np.ndarray, group: int):
    """Leaders, members, each member's leader and rank (receive order at the leader)."""
    leaders, members, member_leader, rank = [], [], [], []
    for start in range(0, len(positions), group):
        chunk = positions[start:start + group]
        leader = chunk[len(chunk) // 2]
        others = chunk[chunk != leader]
        order = np.lexsort((others > leader, np.abs(others - leader)))  # nearest first
        leaders.append(leader)
        members.append(others[order])
        member_leader.append(np.full(len(others), leader))
        rank.append(np.arange(len(others)))
    return (np.array(leaders), np.concatenate(members), np.concatenate(member_leader),
            np.concatenate(rank))


def ktree_reduce(bld: ProgramBuilder, lines, acc, tmp, step: int, levels: int, colour: int,
                 nbytes, op: int = OP_ADD) -> tuple[int, int]:
    """Reduce `acc` along each line into the root's `acc`. Returns (root position, next step).

    Uses colours `colour .. colour + levels - 1`, one per level. `op` combines two partials
    (add; max for a softmax's maxima; argmax2 for sampling).
    """
    n = lines.shape[1]
    positions = np.arange(n)
    group = max(2, math.ceil(n ** (1.0 / levels))) if levels > 1 else n
    level = 0
    while len(positions) > 1:
        last = level == levels - 1
        leaders, members, member_leader, rank = _level_groups(
            positions, len(positions) if last else group)
        src, dst = lines[:, members], lines[:, member_leader]
        msgs = bld.messages(src.ravel(), dst.ravel(), _per_msg(nbytes, src.shape),
                            colour + min(level, levels - 1))
        bld.send(src.ravel(), step, msgs, acc[:, members].ravel())
        recv_step = step + 1 + 2 * np.broadcast_to(rank, src.shape).ravel()
        bld.recv(dst.ravel(), recv_step, msgs, tmp[:, member_leader].ravel())
        bld.compute(dst.ravel(), recv_step + 1, op, c=acc[:, member_leader].ravel(),
                    a=acc[:, member_leader].ravel(), b=tmp[:, member_leader].ravel())
        step += 2 * (int(rank.max()) + 1) + 2
        positions = leaders
        level += 1
    return int(positions[0]), step


def chain_reduce(bld: ProgramBuilder, lines, acc, tmp, step: int, colour: int,
                 nbytes) -> tuple[int, int]:
    """Pipeline reduction from position 0 to n - 1. Returns (root position, next step)."""
    n = lines.shape[1]
    if n == 1:
        return 0, step
    src, dst = lines[:, :-1], lines[:, 1:]
    msgs = bld.messages(src.ravel(), dst.ravel(), _per_msg(nbytes, src.shape), colour)
    bld.recv(dst.ravel(), step + 1, msgs, tmp[:, 1:].ravel())
    bld.compute(dst.ravel(), step + 2, OP_ADD, c=acc[:, 1:].ravel(), a=acc[:, 1:].ravel(),
                b=tmp[:, 1:].ravel())
    bld.send(src.ravel(), step + 3, msgs, acc[:, :-1].ravel())
    return n - 1, step + 4


def pipeline_chunks(n: int, nbytes: int, target: MeshTarget, most: int = 8) -> int:
    """Chunks of an `nbytes` vector for `pipeline_reduce` on a line of n cores.

    The chain takes about (n - 2 + c) stages of (o + v / c) cycles, o being a chunk's fixed
    cost on a core (send, receive, add and take overheads, one hop) and v the vector's link
    cycles; c = sqrt((n - 2) v / o) minimises it. At most `most` chunks: the optimum is flat
    (WaferLLM's 16K GEMV at P = 360: 7,543 cycles in 8 chunks, 7,084 in the formula's 22) and
    every chunk adds n - 1 messages per line.
    """
    o = (target.send_overhead_cycles + target.recv_overhead_cycles
         + 2 * target.compute_overhead_cycles + target.hop_latency_cycles)
    v = nbytes / target.link_bytes_per_cycle
    return int(min(most, max(1, round(math.sqrt(max(n - 2, 0) * v / max(o, 1))))))


def pipeline_reduce(bld: ProgramBuilder, lines, acc, step: int, colour: int, length,
                    chunks: int) -> tuple[int, int]:
    """Streamed chain reduction from position 0 to n - 1. Returns (root position, next step).

    `length`: elements of each line's `acc` (per line). Each core takes chunk k of its partial
    sum out of `acc` (flat elements), receives chunk k of the running sum, adds and sends it
    on, then takes chunk k + 1 while chunk k moves downstream; the root puts every summed
    chunk back into its `acc`.
    """
    nl, n = lines.shape
    if n == 1:
        return 0, step
    length = np.broadcast_to(np.asarray(length, dtype=np.int64), nl)
    c = int(min(chunks, length.min()))
    base, extra = np.divmod(length, c)
    size = base[:, None] + (np.arange(c)[None, :] < extra[:, None])  # [lines, chunks]
    start = np.cumsum(size, axis=1) - size
    shape = (nl, n, c)
    cores = np.broadcast_to(lines[:, :, None], shape)
    sizes = np.broadcast_to(size[:, None, :], shape)
    part = bld.buffers(cores.ravel(), 1, sizes.ravel()).reshape(shape)
    recv = bld.buffers(cores[:, 1:].ravel(), 1, sizes[:, 1:].ravel()).reshape(nl, n - 1, c)
    nbytes = np.ceil(size * DTYPE_BYTES[bld.dtype]).astype(np.int64)
    msgs = bld.messages(cores[:, :-1].ravel(), cores[:, 1:].ravel(),
                        np.broadcast_to(nbytes[:, None, :], (nl, n - 1, c)).ravel(),
                        colour).reshape(nl, n - 1, c)
    k_step = step + 4 * np.arange(c)[None, None, :]  # chunk k: take, recv, add, send / put
    accs = np.broadcast_to(acc[:, :, None], shape)
    starts = np.broadcast_to(start[:, None, :], shape)
    bld.compute(cores.ravel(), np.broadcast_to(k_step, shape).ravel(), OP_TAKE, c=part.ravel(),
                a=accs.ravel(), imm=(starts.ravel(), 0.0))
    down = np.broadcast_to(k_step, (nl, n - 1, c)).ravel()
    bld.recv(cores[:, 1:].ravel(), down + 1, msgs.ravel(), recv.ravel())
    bld.compute(cores[:, 1:].ravel(), down + 2, OP_ADD, c=part[:, 1:].ravel(),
                a=part[:, 1:].ravel(), b=recv.ravel())
    bld.send(cores[:, :-1].ravel(), down + 3, msgs.ravel(), part[:, :-1].ravel())
    bld.compute(cores[:, -1].ravel(), np.broadcast_to(k_step[:, 0], (nl, c)).ravel() + 3,
                OP_PUT, c=accs[:, -1].ravel(), a=part[:, -1].ravel(),
                imm=(starts[:, -1].ravel(), 0.0))
    return n - 1, step + 4 * c


def line_broadcast(bld: ProgramBuilder, lines, root: int, src_buf, dst_buf, step: int,
                   colour: int, nbytes) -> int:
    """Multicast `src_buf` of the root to `dst_buf` of every other core. Returns next step.

    Uses colours `colour` (towards the line's end) and `colour + 1` (towards its start).
    """
    n = lines.shape[1]
    for end, hops, col in ((n - 1, np.arange(root + 1, n) - root - 1, colour),
                           (0, root - 1 - np.arange(0, root), colour + 1)):
        if end == root:
            continue
        receivers = np.arange(root + 1, n) if end > root else np.arange(0, root)
        msgs = bld.messages(lines[:, root], lines[:, end], nbytes, col, multicast=True)
        bld.send(lines[:, root], step, msgs, src_buf)
        for_each = np.repeat(msgs, len(receivers))
        bld.recv(lines[:, receivers].ravel(), step + 1, for_each, dst_buf[:, receivers].ravel(),
                 hop=np.tile(hops, len(msgs)))
    return step + 2
