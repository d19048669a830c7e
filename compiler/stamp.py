"""Stamped programs: one region's layer body, lowered once, copied onto identical regions.

A whole model's regions all run the same layer body on their own weights. Lowering and
ordering that body once per region is most of the compile time on a full wafer (tens of
millions of instructions sorted into per-core order), and storing every copy is most of a
layout file. A `Stamped` program keeps the parts instead:

- `glue`: everything that differs between regions (embedding, hand-offs between regions, the
  LM head), a whole-mesh program whose per-core loop marks where the body goes: each core
  runs its glue instructions before `glue.loop_start`, then the body, then the rest;
- `body`: the layer body lowered on the first layer region (no loop), whose first `ports`
  buffers are its input (the hidden state each copy reads and writes back);
- per copy k: the core offset of its region from the body's region, and the glue buffers
  bound to the ports (`bind[k]`).

`expand()` writes the whole program out in one linear pass (the body's instructions in
per-core order are copied, their buffers, messages and route entries renumbered and their
cores moved), so it is the same program the builder would have made, in a fraction of the
time; the layout file stores the parts, and the simulator runs them without expanding them
(wafersim.simulate encodes the glue and the body once each; `frame` and `messages` say where
the copies go).

A prefill body too large to build whole has sampled steps (compiler.algorithms.prefill): then
`body` runs more sampled steps than `short`, with the same buffers, and both expand, for
timing only (`expand(True, short=...)`); wafersim.whole simulates both and extrapolates.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np

from compiler.program import (
    RECV,
    SEND,
    MeshProgram,
    ProgramError,
    _deadlock,
    check_limits,
    report_deadlock,
)
from compiler.targets import MeshTarget

_MESSAGES = ("msg_bytes", "msg_colour", "msg_multicast", "msg_src", "msg_dst", "route_link",
             "route_ptr")


@dataclass(frozen=True, eq=False)
class Stamped:
    glue: MeshProgram
    body: MeshProgram
    ports: int
    offsets: np.ndarray  # int64[copies]: core offset of copy k's region from the body's
    bind: np.ndarray  # int32[copies, ports]: glue buffer bound to each port of copy k
    loop_count: np.ndarray  # int64[cores]
    loop_base: np.ndarray  # int64[cores]
    short: MeshProgram | None = None  # sampled steps: the body with fewer steps (docstring)

    @property
    def sampled(self) -> bool:
        return self.short is not None

    @property
    def copies(self) -> int:
        return len(self.offsets)

    @property
    def cores(self) -> int:
        return self.glue.cores

    @property
    def n_instructions(self) -> int:
        return self.glue.n_instructions + self.copies * self.body.n_instructions

    @property
    def n_messages(self) -> int:
        return self.glue.n_messages + self.copies * self.body.n_messages

    def _copy_of(self) -> tuple[np.ndarray, np.ndarray]:
        """Per core: the copy whose region holds it (-1: none) and the body core it copies."""
        copy_of = np.full(self.cores, -1, np.int64)
        body_cores = np.flatnonzero(np.diff(self.body.core_ptr))
        for k, off in enumerate(self.offsets):
            copy_of[body_cores + off] = k
        inside = copy_of >= 0
        tcore = np.arange(self.cores) - np.where(inside, self.offsets[np.maximum(copy_of, 0)],
                                                 0)
        return copy_of, tcore

    def sram_per_core(self) -> np.ndarray:
        """MeshProgram.sram_per_core of the expanded program, from the parts."""
        t, ports = self.body, self.ports
        once, each = (v.copy() for v in t.sram_split)
        # the ports are glue buffers, counted there
        size, layer = t.buffer_bytes(slice(ports)), t.templated(slice(ports))
        np.subtract.at(once, t.buf_core[:ports], np.where(layer, 0, size))
        np.subtract.at(each, t.buf_core[:ports], np.where(layer, size, 0))
        copy_of, tcore = self._copy_of()
        body = np.where(copy_of >= 0, once[tcore] + each[tcore] * self.loop_count, 0)
        return self.glue.sram_per_core() + body

    def colours_per_core(self) -> np.ndarray:
        """MeshProgram.colours_per_core of the expanded program, from the parts."""
        glue, body = self.glue.colours_used(), self.body.colours_used()
        used = np.zeros((self.cores, max(glue.shape[1], body.shape[1])), bool)
        used[:, :glue.shape[1]] = glue
        copy_of, tcore = self._copy_of()
        inside = np.flatnonzero(copy_of >= 0)
        used[inside, :body.shape[1]] |= body[tcore[inside]]
        return used.sum(axis=1)

    def check(self, target: MeshTarget, what: str = "program") -> None:
        """MeshProgram.check of the expanded program: limits from the parts, the order on
        the timing columns."""
        with ThreadPoolExecutor(1) as pool:  # the bodies' order beside the limits (Numba)
            bodies = pool.submit(self._check_bodies, what)
            check_limits(self.glue.width, self.glue.height, self.sram_per_core(),
                         self.colours_per_core(), target, what)
            bodies.result()
        self._check_glue(what)

    def check_order(self, what: str = "program") -> None:
        """MeshProgram.check_order of the expanded program, from the parts: the body alone,
        then the glue with each copy's body as one node that waits for all its cores'
        instructions before it and precedes all after it. A cycle through the expansion
        would show in one of the two (the second can only add dependencies)."""
        self._check_bodies(what)
        self._check_glue(what)

    def _check_bodies(self, what: str) -> None:
        self.body.check_order(what)
        if self.short is not None:
            self.short.check_order(what)

    def _check_glue(self, what: str) -> None:
        g = self.glue
        copy_of, _ = self._copy_of()
        core, at = _deadlock(g.core_ptr, g.ins_kind, g.ins_arg, g.route_ptr, g.n_messages,
                             g.loop_start, copy_of, self.copies)
        report_deadlock(g, core, at, what)

    @property
    def width(self) -> int:
        return self.glue.width

    @property
    def height(self) -> int:
        return self.glue.height

    @property
    def dtype(self) -> str:
        return self.glue.dtype

    @property
    def n_hops(self) -> int:
        return self.glue.n_hops + self.copies * self.body.n_hops

    @property
    def meta(self) -> dict:
        return {**self.glue.meta, **self.body.meta}

    @property
    def looped(self) -> bool:
        return bool(np.any(self.loop_count > 1))

    def with_body(self, short: bool) -> Stamped:
        """A sampled program as a plain stamped one with one of its two bodies."""
        return dataclasses.replace(self, body=self.short if short else self.body, short=None)

    def frame(self) -> Frame:
        """Where everything goes in the expanded program (after checking that the parts fit
        together)."""
        if self.sampled:
            raise ProgramError("a prefill with sampled steps is for timing only: simulate it "
                               "with wafersim.whole.simulate_layout, which runs both sampled "
                               "bodies and extrapolates")
        g, t = self.glue, self.body
        if (t.width, t.height, t.dtype) != (g.width, g.height, g.dtype) or self.copies == 0:
            raise ProgramError("stamped parts do not belong to one mesh")
        ports = self.ports
        want = (t.buf_rows[:ports], t.buf_cols[:ports], t.buf_core[:ports])
        got = (g.buf_rows[self.bind], g.buf_cols[self.bind],
               g.buf_core[self.bind] - self.offsets[:, None])
        if not all(np.array_equal(np.broadcast_to(w, v.shape), v) for w, v in zip(want, got)):
            raise ProgramError("a stamped copy binds its ports to buffers of another shape "
                               "or core")
        copy_of, tcore = self._copy_of()
        body_n = np.where(copy_of >= 0, np.diff(t.core_ptr)[tcore], 0)
        core_ptr = np.zeros(self.cores + 1, np.int64)
        np.cumsum(np.diff(g.core_ptr) + body_n, out=core_ptr[1:])
        loop_start = core_ptr[:-1] + (g.loop_start - g.core_ptr[:-1])
        return Frame(copy_of, tcore, core_ptr, loop_start, loop_start + body_n)

    def messages(self, names: tuple[str, ...] = _MESSAGES) -> dict[str, np.ndarray]:
        """The expanded program's message and route columns: the glue's, then each copy's
        (cores and links moved, route entries renumbered)."""
        g, t, k = self.glue, self.body, self.copies
        out = {}
        for name in names:
            if name == "route_ptr":
                out[name] = np.concatenate([g.route_ptr, g.n_hops + np.cumsum(
                    np.tile(np.diff(t.route_ptr), k))])
            else:
                out[name] = _stack(g, t, self.offsets, name,
                                   shift={"msg_src": 1, "msg_dst": 1, "route_link": 4}.get(name))
        return out

    def expand(self, timing_only: bool = False, short: bool | None = None) -> MeshProgram:
        """The whole program, every copy written out. `timing_only`: only what the simulator
        reads (instruction kinds, costs and messages; no ops, operands or buffers: about half
        the memory); such a program refuses functional execution and SRAM counts. A sampled
        program expands only for timing, and `short` says which of its two bodies.
        (wafersim.simulate runs the parts without expanding them.)"""
        if self.sampled and timing_only and short is not None:
            return self.with_body(short).expand(True)
        frame = self.frame()
        g, t, ports = self.glue, self.body, self.ports
        common = (g.core_ptr, g.loop_start, t.core_ptr, frame.copy_of, self.offsets,
                  frame.core_ptr, t.ins_kind)
        nbg, nbt = len(g.buf_core), len(t.buf_core) - ports

        def column(name, mode=COPY, first=0, stride=0, first_recv=0, stride_recv=0):
            gc, tc = getattr(g, name), getattr(t, name)
            if name == "ins_imm":  # two float32 per instruction, moved as one int64
                gc, tc = gc.view(np.int64).ravel(), tc.view(np.int64).ravel()
            out = np.empty(int(frame.core_ptr[-1]), gc.dtype)
            _stamp_column(*common, gc, tc, out, mode, self.bind, ports, first, stride,
                          first_recv, stride_recv)
            return out.view(np.float32).reshape(-1, 2) if name == "ins_imm" else out

        ins = dict(ins_kind=column("ins_kind"), ins_flops=column("ins_flops"),
                   ins_bytes=column("ins_bytes"),
                   ins_arg=column("ins_arg", ARG, g.n_messages, t.n_messages, g.n_hops,
                                  t.n_hops))
        if timing_only:
            ins.update({f: getattr(g, f)[:0] for f in _OPERANDS})
            bufs = {f: getattr(g, f)[:0] for f in _BUFFERS}
        else:
            ins.update(ins_op=column("ins_op"), ins_imm=column("ins_imm"),
                       **{f: column(f, BUFFER, nbg, nbt) for f in ("ins_a", "ins_b", "ins_c")})
            body_bufs = slice(ports, None)  # the ports are glue buffers
            bufs = {f: _stack(g, t, self.offsets, f, body_bufs, shift=f == "buf_core",
                              tensor=f == "buf_tensor") for f in _BUFFERS}
        return MeshProgram(
            width=g.width, height=g.height, dtype=g.dtype, core_ptr=frame.core_ptr, **ins,
            **bufs, **self.messages(), tensors=g.tensors + t.tensors, loop_start=frame.loop_start,
            loop_end=frame.loop_end, loop_count=self.loop_count, loop_base=self.loop_base,
            meta={**self.meta, **({"timing_only": True} if timing_only else {})})

    def for_timing(self) -> Stamped:
        """These parts with only what expand(timing_only=True) reads: no operands, and of the
        bodies' buffers only the ports (for a sampled prefill, which is timing only: a third
        of the memory and of the layout file goes)."""
        def strip(p: MeshProgram, keep: int | None) -> MeshProgram:
            cut = {f: getattr(p, f)[:0].copy() for f in _OPERANDS}
            if keep is not None:
                cut.update({f: getattr(p, f)[:keep].copy() for f in _BUFFERS})
            return dataclasses.replace(p, meta={**p.meta, "timing_only": True}, **cut)

        return dataclasses.replace(
            self, glue=strip(self.glue, None), body=strip(self.body, self.ports),
            short=None if self.short is None else strip(self.short, self.ports))

    def parts(self) -> dict:
        """The arrays besides the two programs, for the layout file."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("glue", "body", "ports", "short")}


class Frame(NamedTuple):
    """Per core of a stamped program's expansion: the copy holding it (-1: none), the body
    core it copies, and its instructions (core_ptr) and layer loop (loop_start, loop_end)."""
    copy_of: np.ndarray
    tcore: np.ndarray
    core_ptr: np.ndarray
    loop_start: np.ndarray
    loop_end: np.ndarray


def _stack(g: MeshProgram, t: MeshProgram, offsets: np.ndarray, name: str,
           part: slice = slice(None), shift: int = 0, tensor: bool = False) -> np.ndarray:
    """Glue's column, then each copy's body column (cores, links or tensor ids moved)."""
    gc, tc = getattr(g, name), getattr(t, name)[part]
    k = len(offsets)
    out = np.empty(len(gc) + k * len(tc), gc.dtype)
    out[:len(gc)] = gc
    copies = out[len(gc):].reshape(k, len(tc))
    copies[:] = tc
    if shift:
        copies += (shift * offsets[:, None]).astype(gc.dtype)
    if tensor:
        copies[copies >= 0] += len(g.tensors)
    return out


_BUFFERS = ("buf_core", "buf_rows", "buf_cols", "buf_role", "buf_tensor", "buf_r0", "buf_c0")
_OPERANDS = ("ins_op", "ins_a", "ins_b", "ins_c", "ins_imm")
COPY, BUFFER, ARG = 0, 1, 2  # how _stamp_column renumbers a body column per copy


@numba.njit(cache=True, nogil=True)
def _stamp_column(g_ptr, g_split, t_ptr, copy_of, offsets, out_ptr, t_kind, g_col, t_col, out,
                  mode, bind, ports, first, stride, first_recv, stride_recv):
    """One instruction column of the expanded program. Each core: its glue entries before the
    split, its copy's body entries (BUFFER: ports bound, other buffers renumbered per copy;
    ARG: SEND message ids and RECV route entries renumbered per copy), the rest of its glue."""
    for c in range(out_ptr.shape[0] - 1):
        o = out_ptr[c]
        for i in range(g_ptr[c], g_split[c]):
            out[o] = g_col[i]
            o += 1
        k = copy_of[c]
        if k >= 0:
            tc = c - offsets[k]
            for i in range(t_ptr[tc], t_ptr[tc + 1]):
                v = t_col[i]
                if mode == BUFFER and v >= 0:
                    v = bind[k, v] if v < ports else first + k * stride + (v - ports)
                elif mode == ARG:
                    if t_kind[i] == SEND:
                        v += first + k * stride
                    elif t_kind[i] == RECV:
                        v += first_recv + k * stride_recv
                out[o] = v
                o += 1
        for i in range(g_split[c], g_ptr[c + 1]):
            out[o] = g_col[i]
            o += 1
