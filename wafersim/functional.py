"""Functional mode: run a MeshProgram on numpy data, to check that a lowering is right.

Each core's buffers start from slices of the named input tensors (zero-padded where a tile
reaches past the tensor's edge); instructions execute in
each core's order, a RECV taking the payload its message carried when it was sent. Cores are
stepped round-robin until every stream is done; no progress means a deadlock. Output tensors
are gathered from OUTPUT buffers, and where several cores hold the same output element (an
all-reduce leaves the result everywhere) every copy must agree. This is a test oracle for small
meshes, not a hot path.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from compiler import program as P
from compiler.program import (
    COMPUTE,
    INPUT,
    OUTPUT,
    RECV,
    SEND,
    STATE,
    MeshProgram,
    ProgramError,
)
from wafersim.result import SimulationError


def execute(program: MeshProgram, inputs: dict[str, np.ndarray], dtype=np.float32,
            atol: float = 1e-4) -> dict[str, np.ndarray]:
    """Run `program` on `inputs` (tensor name -> array); returns the output tensors.

    Loops run as the engine runs them; a per-layer tensor "layers.{l}.q" is read (and, for a
    cache, written) as "layers.3.q" in iteration 3 - loop_base of a core. Scratch buffers are
    shared by the iterations, as on the wafer.
    """
    program.require_buffers("functional execution")
    if program.meta.get("sampled"):
        raise ProgramError("functional execution of a program lowered with sampled steps: it "
                           "runs part of its loop, for timing only")
    shapes = {}
    for name, rows, cols in program.tensors:
        shapes[name] = (rows, cols)
    per_layer = program.templated()
    base = program.loop_base if len(program.loop_base) else np.zeros(program.cores, np.int64)
    count = program.loop_count if len(program.loop_count) else np.ones(program.cores, np.int64)
    loops = np.unique(np.stack([base, count], axis=1), axis=0)  # (base, count) per region
    layer_names = {name.format(l=int(l)) for name in shapes if "{l}" in name
                   for b0, n in loops for l in range(b0, b0 + n)}
    for name, arr in inputs.items():
        pattern = _pattern(name, shapes)
        if name not in shapes and name not in layer_names:
            raise ValueError(f"input {name!r} is not a tensor of the program")
        if arr.shape != shapes[pattern]:
            raise ValueError(f"input {name!r} has shape {arr.shape}, program expects "
                             f"{shapes[pattern]}")
    names = [t[0] for t in program.tensors]

    def load(i: int, layer: int) -> np.ndarray:
        rows, cols = int(program.buf_rows[i]), int(program.buf_cols[i])
        buf = np.zeros((rows, cols), dtype=dtype)
        t = int(program.buf_tensor[i])
        name = names[t].format(l=layer) if t >= 0 else None
        if program.buf_role[i] in (INPUT, STATE) and name in inputs:  # zero-padded at edges
            r0, c0 = int(program.buf_r0[i]), int(program.buf_c0[i])
            part = inputs[name][r0:r0 + rows, c0:c0 + cols]
            buf[:part.shape[0], :part.shape[1]] = part
        return buf

    data = [None if per_layer[i] else load(i, 0) for i in range(len(program.buf_core))]
    layered: dict[tuple[int, int], np.ndarray] = {}  # (buffer, layer) -> data

    class View:  # buffer id -> array, resolving per-layer buffers for the running core
        layer = 0

        def __getitem__(self, i):
            if i < 0 or not per_layer[i]:
                return data[i]
            key = (i, self.layer)
            if key not in layered:
                layered[key] = load(i, self.layer)
            return layered[key]

        def __setitem__(self, i, value):
            if per_layer[i]:
                self[i]  # noqa: B018 (load first)
                layered[(i, self.layer)] = value
            else:
                data[i] = value

    view = View()
    # Every receiving route entry has a queue of payloads, so iterations may run ahead.
    entry_msg = program.entry_msg
    recv_entries = np.unique(program.ins_arg[program.ins_kind == RECV])
    by_msg: dict[int, list[int]] = {}
    for e in recv_entries:
        by_msg.setdefault(int(entry_msg[e]), []).append(int(e))
    queues: dict[int, deque] = {int(e): deque() for e in recv_entries}
    pc = program.core_ptr[:-1].copy()
    end = program.core_ptr[1:]
    it = np.zeros(program.cores, np.int64)
    lstart = program.loop_start if len(program.loop_start) else pc.copy()
    lend = program.loop_end if len(program.loop_end) else pc.copy()
    pending = [c for c in range(program.cores) if pc[c] < end[c]]
    while pending:
        progressed = False
        still = []
        for c in pending:
            while True:
                if pc[c] == lend[c] and it[c] + 1 < count[c]:
                    pc[c], it[c] = lstart[c], it[c] + 1
                if pc[c] >= end[c]:
                    break
                i = pc[c]
                view.layer = int(base[c] + it[c])
                kind = program.ins_kind[i]
                a, b, dst = program.ins_a[i], program.ins_b[i], program.ins_c[i]
                if kind == COMPUTE:
                    _compute(program.ins_op[i], view, a, b, dst, program.ins_imm[i])
                elif kind == SEND:
                    for e in by_msg.get(int(program.ins_arg[i]), ()):
                        queues[e].append(view[a].copy())
                else:
                    assert kind == RECV
                    q = queues[int(program.ins_arg[i])]
                    if not q:
                        break
                    payload = q.popleft()
                    if payload.shape != view[dst].shape:
                        raise SimulationError(f"message {entry_msg[program.ins_arg[i]]} "
                                              f"carries {payload.shape}, receive buffer is "
                                              f"{view[dst].shape}")
                    view[dst] = payload
                pc[c] += 1
                progressed = True
            if pc[c] < end[c]:
                still.append(c)
        if still and not progressed:
            raise SimulationError(f"deadlock in functional mode: {len(still)} cores blocked")
        pending = still

    # Gather outputs: (tensor name, buffer data) of every OUTPUT / STATE buffer.
    found: dict[str, list] = {}
    gathered = np.isin(program.buf_role, (OUTPUT, STATE))
    for i in np.flatnonzero(gathered & ~per_layer):
        found.setdefault(names[program.buf_tensor[i]], []).append((i, data[i]))
    for (i, layer), arr in layered.items():
        if gathered[i]:
            found.setdefault(names[program.buf_tensor[i]].format(l=layer), []).append((i, arr))
    outputs = {}
    for name, parts in found.items():
        rows, cols = shapes[_pattern(name, shapes)]
        out = np.full((rows, cols), np.nan, dtype=dtype)
        for i, arr in parts:
            r0, c0 = int(program.buf_r0[i]), int(program.buf_c0[i])
            block = out[r0:r0 + arr.shape[0], c0:c0 + arr.shape[1]]
            tile = arr[:block.shape[0], :block.shape[1]]  # drop padding past the edge
            seen = ~np.isnan(block)
            if np.any(seen) and not np.allclose(block[seen], tile[seen], atol=atol, rtol=1e-4):
                raise SimulationError(f"output {name!r}: copies on different cores disagree")
            block[...] = tile
        if np.isnan(out).any():
            raise SimulationError(f"output {name!r}: some elements are held by no core")
        outputs[name] = out
    return outputs


def _pattern(name: str, shapes: dict) -> str:
    """The program's tensor name for `name` ("layers.3.q" -> "layers.{l}.q")."""
    if name in shapes:
        return name
    parts = name.split(".")
    return ".".join("{l}" if p.isdigit() else p for p in parts)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _compute(op, data, a, b, c, imm):
    if op == P.OP_MATMUL_ACC:
        data[c] += data[a] @ data[b]
    elif op == P.OP_MATMUL_T:
        data[c] = data[a] @ data[b].T
    elif op == P.OP_ADD:
        data[c] = data[a] + data[b]
    elif op == P.OP_MUL:
        data[c] = data[a] * data[b]
    elif op == P.OP_MAX:
        data[c] = np.maximum(data[a], data[b])
    elif op == P.OP_SQSUM:
        data[c] = np.sum(data[a] * data[a], axis=1, keepdims=True)
    elif op == P.OP_ROWMAX:
        data[c] = np.max(data[a], axis=1, keepdims=True)
    elif op == P.OP_RSQRT:
        data[c] = 1.0 / np.sqrt(data[a] * imm[0] + imm[1])
    elif op == P.OP_SILU:
        data[c] = data[a] / (1.0 + np.exp(-data[a]))
    elif op == P.OP_GELU:
        x = data[a]
        data[c] = 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))
    elif op == P.OP_GELU_ERF:
        x = data[a]
        data[c] = (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype)
    elif op == P.OP_EXPSUB:
        data[c] = np.exp(imm[0] * (data[a] - data[b]))
    elif op == P.OP_DIVLAST:
        data[c] = data[a][:, :-1] / data[a][:, -1:]
    elif op == P.OP_ROPE:
        cos, sin = data[b][0], data[b][1]
        x = data[a].reshape(-1, len(cos), 2)
        x0, x1 = x[..., 0], x[..., 1]
        data[c] = np.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1).reshape(
            data[a].shape)
    elif op == P.OP_TAKE:
        o = int(imm[0])
        data[c] = data[a].reshape(-1)[o:o + data[c].size].reshape(data[c].shape)
    elif op == P.OP_PUT:
        o = int(imm[0])
        data[c].reshape(-1)[o:o + data[a].size] = data[a].reshape(-1)
    elif op == P.OP_FILL:
        data[c][...] = imm[0]
    elif op == P.OP_LOOKUP:
        rows = data[a][:, 0].astype(np.int64) - int(imm[0])
        hit = (rows >= 0) & (rows < data[b].shape[0])
        data[c] = np.where(hit[:, None], data[b][np.clip(rows, 0, data[b].shape[0] - 1)], 0)
    elif op == P.OP_ARGMAX:
        x = data[a]
        data[c] = np.stack([x.max(axis=1), imm[0] + x.argmax(axis=1)], axis=1)
    elif op == P.OP_ARGMAX2:
        x, y = data[a], data[b]
        better = (y[:, 0] > x[:, 0]) | ((y[:, 0] == x[:, 0]) & (y[:, 1] < x[:, 1]))
        data[c] = np.where(better[:, None], y, x)
    elif op == P.OP_COPY:
        data[c] = data[a].copy()
    elif op == P.OP_ZERO:
        data[c][...] = 0
    elif op != P.OP_NONE:
        raise SimulationError(f"unknown compute op {op}")
