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

import numpy as np

from compiler import program as P
from compiler.program import COMPUTE, INPUT, OUTPUT, RECV, SEND, STATE, MeshProgram
from wafersim.result import SimulationError


def execute(program: MeshProgram, inputs: dict[str, np.ndarray], dtype=np.float32,
            atol: float = 1e-4) -> dict[str, np.ndarray]:
    """Run `program` on `inputs` (tensor name -> array); returns the output tensors."""
    shapes = {name: (rows, cols) for name, rows, cols in program.tensors}
    for name, arr in inputs.items():
        if name not in shapes:
            raise ValueError(f"input {name!r} is not a tensor of the program")
        if arr.shape != shapes[name]:
            raise ValueError(f"input {name!r} has shape {arr.shape}, program expects "
                             f"{shapes[name]}")
    names = [t[0] for t in program.tensors]
    data = []
    for i in range(len(program.buf_core)):
        rows, cols = int(program.buf_rows[i]), int(program.buf_cols[i])
        t = int(program.buf_tensor[i])
        buf = np.zeros((rows, cols), dtype=dtype)
        if program.buf_role[i] in (INPUT, STATE) and names[t] in inputs:  # zero-padded at edges
            r0, c0 = int(program.buf_r0[i]), int(program.buf_c0[i])
            part = inputs[names[t]][r0:r0 + rows, c0:c0 + cols]
            buf[:part.shape[0], :part.shape[1]] = part
        data.append(buf)

    entry_msg = program.entry_msg
    payload: dict[int, np.ndarray] = {}
    pc = program.core_ptr[:-1].copy()
    end = program.core_ptr[1:]
    pending = list(np.flatnonzero(pc < end))
    while pending:
        progressed = False
        still = []
        for c in pending:
            while pc[c] < end[c]:
                i = pc[c]
                kind = program.ins_kind[i]
                a, b, dst = program.ins_a[i], program.ins_b[i], program.ins_c[i]
                if kind == COMPUTE:
                    _compute(program.ins_op[i], data, a, b, dst, program.ins_imm[i])
                elif kind == SEND:
                    payload[int(program.ins_arg[i])] = data[a].copy()
                else:
                    assert kind == RECV
                    m = int(entry_msg[program.ins_arg[i]])
                    if m not in payload:
                        break
                    if payload[m].shape != data[dst].shape:
                        raise SimulationError(f"message {m} carries {payload[m].shape}, "
                                              f"receive buffer is {data[dst].shape}")
                    data[dst] = payload[m].copy()
                pc[c] += 1
                progressed = True
            if pc[c] < end[c]:
                still.append(c)
        if still and not progressed:
            raise SimulationError(f"deadlock in functional mode: {len(still)} cores blocked")
        pending = still

    outputs = {}
    for t, (name, rows, cols) in enumerate(program.tensors):
        bufs = np.flatnonzero((program.buf_tensor == t) & np.isin(program.buf_role,
                                                                   (OUTPUT, STATE)))
        if not len(bufs):
            continue
        out = np.full((rows, cols), np.nan, dtype=dtype)
        for i in bufs:
            r0, c0 = int(program.buf_r0[i]), int(program.buf_c0[i])
            block = out[r0:r0 + data[i].shape[0], c0:c0 + data[i].shape[1]]
            tile = data[i][:block.shape[0], :block.shape[1]]  # drop padding past the edge
            seen = ~np.isnan(block)
            if np.any(seen) and not np.allclose(block[seen], tile[seen], atol=atol, rtol=1e-4):
                raise SimulationError(f"output {name!r}: copies on different cores disagree")
            block[...] = tile
        if np.isnan(out).any():
            raise SimulationError(f"output {name!r}: some elements are held by no core")
        outputs[name] = out
    return outputs


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
