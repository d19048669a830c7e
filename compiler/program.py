"""MeshProgram: per-core instruction streams and a message table, as flat arrays.

The instruction set is small and closed (tinygrad's lesson): COMPUTE, SEND, RECV. Every mesh
algorithm lowers to it and the simulator has no per-algorithm cases. A COMPUTE names a
functional op (matmul-accumulate, add, copy, zero) on per-core buffers so the same program can
be run on numpy data (wafersim.functional) and timed (wafersim.engine).

Messages follow dimension-ordered (X then Y) routes over neighbour links. A link id is
`core * 4 + direction`: the link leaving `core` towards E, W, N or S. A route is the list of
link ids a message crosses; the message is delivered at the router at the end of its last link,
or, for a multicast, at the end of every link (a row/column broadcast on one colour).
A RECV names a *route entry* (one hop of one message): the delivery it waits for.

`ProgramBuilder` takes instructions, buffers and messages in numpy batches, so lowering a
600 x 600 region never loops in Python over cores.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np

from compiler.targets import DTYPE_BYTES, MeshTarget

# Instruction kinds.
COMPUTE, SEND, RECV = 0, 1, 2
KIND_NAMES = ("compute", "send", "recv")
# Functional ops of COMPUTE instructions (numpy semantics in wafersim.functional; `b` of an
# element-wise op may be a row [1, n] or a column [m, 1], broadcast):
#   matmul_acc c += a @ b         matmul_t c = a @ b.T       add c = a + b      mul c = a * b
#   max      c = maximum(a, b)    copy   c = a               zero c = 0         fill c = imm0
#   sqsum    c = sum(a * a, axis=1) as [m, 1]                rowmax c = max(a, axis=1) as [m, 1]
#   rsqrt    c = 1 / sqrt(a * imm0 + imm1)   silu c = a * sigmoid(a)   gelu c = gelu(a) (tanh)
#   gelu_erf c = a * Phi(a) = 0.5 a (1 + erf(a / sqrt 2))  (exact GELU, HF "gelu")
#   expsub   c = exp(imm0 * (a - b))  (softmax numerator, b the row maxima)
#   divlast  c = a[:, :-1] / a[:, -1:]  (softmax denominator carried as a's last column)
#   rope     rotate pairs (a[..., 2p], a[..., 2p+1]) by the angle whose cos, sin are b[0, p],
#            b[1, p]; a's rows are cut into chunks of 2 * b.cols
#   take     c = flat(a)[imm0 : imm0 + c.size] reshaped to c   (a row, or a reshape)
#   put      flat(c)[imm0 : imm0 + a.size] = flat(a)             (write a row into a cache)
#   lookup   c[s] = b[a[s, 0] - imm0] if that row is b's, else 0  (embedding rows by token id)
#   argmax   c[s] = (max a[s], imm0 + argmax a[s])                 as [b, 2]
#   argmax2  c[s] = the better of a[s] and b[s] (larger value, then smaller index)
OP_NONE, OP_MATMUL_ACC, OP_ADD, OP_COPY, OP_ZERO = 0, 1, 2, 3, 4
OP_MUL, OP_SQSUM, OP_RSQRT, OP_SILU, OP_GELU = 5, 6, 7, 8, 9
OP_MATMUL_T, OP_MAX, OP_ROWMAX, OP_EXPSUB, OP_DIVLAST = 10, 11, 12, 13, 14
OP_ROPE, OP_TAKE, OP_PUT, OP_FILL, OP_LOOKUP, OP_ARGMAX, OP_ARGMAX2 = 15, 16, 17, 18, 19, 20, 21
OP_GELU_ERF = 22
OP_NAMES = ("none", "matmul_acc", "add", "copy", "zero", "mul", "sqsum", "rsqrt", "silu",
            "gelu", "matmul_t", "max", "rowmax", "expsub", "divlast", "rope", "take", "put",
            "fill", "lookup", "argmax", "argmax2", "gelu_erf")
# Default cost of each op: (FLOPs per element of a, of c; SRAM elements read + written counted
# as multiples of a, b, c). exp/tanh/sqrt are taken as 4 FLOPs. Matmuls are special-cased.
_COSTS = {
    OP_MATMUL_ACC: (0, 0, 1, 1, 2), OP_MATMUL_T: (0, 0, 1, 1, 1),
    OP_ADD: (0, 1, 1, 1, 1), OP_MUL: (0, 1, 1, 1, 1), OP_MAX: (0, 1, 1, 1, 1),
    OP_COPY: (0, 0, 1, 0, 1), OP_ZERO: (0, 0, 0, 0, 1), OP_FILL: (0, 0, 0, 0, 1),
    OP_SQSUM: (2, 0, 1, 0, 1), OP_ROWMAX: (1, 0, 1, 0, 1), OP_RSQRT: (0, 6, 1, 0, 1),
    OP_SILU: (0, 6, 1, 0, 1), OP_GELU: (0, 8, 1, 0, 1), OP_EXPSUB: (0, 5, 1, 1, 1),
    OP_DIVLAST: (0, 1, 1, 0, 1), OP_ROPE: (0, 3, 1, 1, 1), OP_TAKE: (0, 0, 0, 0, 2),
    OP_PUT: (0, 0, 0, 0, 0), OP_LOOKUP: (0, 0, 1, 0, 2), OP_ARGMAX: (1, 0, 1, 0, 1),
    OP_ARGMAX2: (0, 2, 1, 1, 1), OP_GELU_ERF: (0, 8, 1, 0, 1),
}
# Link directions, in the order of link ids.
EAST, WEST, NORTH, SOUTH = 0, 1, 2, 3
DIRECTION_NAMES = ("E", "W", "N", "S")
# Largest program the builder makes: about 200 bytes per message on this 24 GB machine class.
MAX_MESSAGES = 40_000_000
_BUF_TYPES = (np.int32, np.int32, np.int32, np.int8, np.int16, np.int32, np.int32)
TOO_LARGE = ("an instruction of more than 2**31 FLOPs or SRAM bytes (a tile larger than any "
             "core's SRAM)")
# Buffer roles.
# STATE buffers are loaded from their tensor like INPUT and gathered like OUTPUT (a KV cache).
SCRATCH, INPUT, OUTPUT, STATE = 0, 1, 2, 3


class ProgramError(ValueError):
    """A program that breaks the target's limits or is inconsistent."""


@dataclass(frozen=True, eq=False)
class MeshProgram:
    """A dataflow program for a `width` x `height` mesh, struct-of-arrays.

    Core `c` sits at x = c % width, y = c // width. Its instructions are
    `core_ptr[c]:core_ptr[c+1]` of the `ins_*` arrays, executed in order.
    """

    width: int
    height: int
    dtype: str
    # instructions, grouped by core
    core_ptr: np.ndarray  # int64[cores + 1]
    ins_kind: np.ndarray  # int8: COMPUTE / SEND / RECV
    ins_op: np.ndarray  # int8: OP_* for COMPUTE
    ins_a: np.ndarray  # int32 buffer id: COMPUTE operand a; SEND source
    ins_b: np.ndarray  # int32 buffer id: COMPUTE operand b
    ins_c: np.ndarray  # int32 buffer id: COMPUTE result; RECV destination
    ins_flops: np.ndarray  # int32
    ins_bytes: np.ndarray  # int32 SRAM bytes read + written
    ins_arg: np.ndarray  # int64: SEND message id; RECV route entry
    ins_imm: np.ndarray  # float64[n, 2]: immediates of COMPUTE ops (rsqrt's scale and eps)
    # messages
    msg_src: np.ndarray  # int32 core
    msg_dst: np.ndarray  # int32 core (last router of the route)
    msg_bytes: np.ndarray  # int64
    msg_colour: np.ndarray  # int16
    msg_multicast: np.ndarray  # bool: delivered at every router of the route
    route_ptr: np.ndarray  # int64[messages + 1]
    route_link: np.ndarray  # int32 link ids
    # buffers
    buf_core: np.ndarray  # int32
    buf_rows: np.ndarray  # int32
    buf_cols: np.ndarray  # int32
    buf_role: np.ndarray  # int8 SCRATCH / INPUT / OUTPUT
    buf_tensor: np.ndarray  # int16 index into `tensors`, -1 for scratch
    buf_r0: np.ndarray  # int32 row offset in the tensor
    buf_c0: np.ndarray  # int32 column offset in the tensor
    tensors: tuple[tuple[str, int, int], ...]  # (name, rows, cols)
    # Per-core loop: instructions loop_start[c]:loop_end[c] run loop_count[c] times (a region's
    # stack of identical layers). Tensor names containing "{l}" are per iteration: iteration r
    # of core c reads layer loop_base[c] + r. Empty arrays: no loops.
    loop_start: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    loop_end: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    loop_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    loop_base: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    meta: dict = field(default_factory=dict)

    @property
    def cores(self) -> int:
        return self.width * self.height

    @property
    def n_instructions(self) -> int:
        return len(self.ins_kind)

    @property
    def n_messages(self) -> int:
        return len(self.msg_src)

    @property
    def n_hops(self) -> int:
        return len(self.route_link)

    @property
    def looped(self) -> bool:
        return bool(len(self.loop_count)) and bool(np.any(self.loop_count > 1))

    def require_buffers(self, what: str) -> None:
        if self.meta.get("timing_only"):
            raise ProgramError(f"{what} needs the program's buffers; this program was loaded "
                               "for timing only")

    def templated(self, which=slice(None)) -> np.ndarray:
        """Per buffer (of `which`): its tensor is per loop iteration (a layer's weight or
        cache)."""
        return self._per_layer()[self.buf_tensor[which]]

    def _per_layer(self) -> np.ndarray:
        """Per tensor: per loop iteration; then a False for tensor -1 (scratch)."""
        return np.array([("{l}" in name) for name, _, _ in self.tensors] + [False])

    @property
    def entry_msg(self) -> np.ndarray:
        """Message id of every route entry."""
        return np.repeat(np.arange(self.n_messages, dtype=np.int64), np.diff(self.route_ptr))

    @property
    def dtype_bytes(self) -> float:
        return DTYPE_BYTES[self.dtype]

    def buffer_bytes(self, which=slice(None)) -> np.ndarray:
        """Bytes of every buffer (of `which`)."""
        return np.ceil(self.buf_rows[which].astype(np.int64) * self.buf_cols[which]
                       * self.dtype_bytes).astype(np.int64)

    def sram_per_core(self) -> np.ndarray:
        """Bytes each core holds: every buffer lives for the whole program; a per-layer buffer
        (weights, cache) once per layer of its core's loop, scratch once (reused)."""
        once, each = self.sram_split
        return once + each * self.loop_count if len(self.loop_count) else once + each

    @functools.cached_property
    def sram_split(self) -> tuple[np.ndarray, np.ndarray]:
        """Per core: bytes of the buffers held once, and of the per-layer buffers of one loop
        iteration (computed once per program: a full wafer's program has tens of millions)."""
        self.require_buffers("SRAM per core")
        return _sram_split(self.buf_core, self.buf_rows, self.buf_cols, self.buf_tensor,
                           self._per_layer(), float(self.dtype_bytes), self.cores)

    def colours_per_core(self) -> np.ndarray:
        """Distinct routing colours each router carries (source, transit or destination)."""
        return self.colours_used().sum(axis=1)

    def colours_used(self) -> np.ndarray:
        """bool[cores, colours]: which colours each router carries."""
        n = int(self.msg_colour.max()) + 1 if self.n_messages else 0
        return _colours_used(self.msg_src, self.msg_colour, self.route_ptr, self.route_link,
                             self.width, self.cores, n)

    def check(self, target: MeshTarget, what: str = "program") -> None:
        """Refuse a program that breaks the target's per-core SRAM or colour limits, or whose
        instruction order can deadlock."""
        check_limits(self.width, self.height, self.sram_per_core(), self.colours_per_core(),
                     target, what)
        self.check_order(what)

    def check_order(self, what: str = "program") -> None:
        """Refuse a program that can deadlock: one whose dependencies (each core's order, each
        message's SEND before its RECVs) form a cycle, or that receives a message nobody
        sends. A loop body counts once: its iterations repeat the same dependencies. Linear
        in the program (Kahn's algorithm, in Numba)."""
        none = np.full(self.cores, -1, np.int64)
        core, at = _deadlock(self.core_ptr, self.ins_kind, self.ins_arg, self.route_ptr,
                             self.n_messages, none, none, 0)
        report_deadlock(self, core, at, what)


def report_deadlock(program: MeshProgram, core: int, at: int, what: str) -> None:
    """Raise the order check's finding, naming the core and instruction (core -1: none)."""
    if core >= 0:
        x, y = core % program.width, core // program.width
        i = at - int(program.core_ptr[core])
        raise ProgramError(f"{what} can deadlock: core ({x},{y}) waits forever at its "
                           f"instruction {i} ({KIND_NAMES[program.ins_kind[at]]})")


def check_limits(width: int, height: int, sram: np.ndarray, colours: np.ndarray,
                 target: MeshTarget, what: str) -> None:
    """Refuse per-core SRAM bytes or colour counts above the target's limits, naming the core."""
    if width > target.width or height > target.height:
        raise ProgramError(f"{what} needs a {width}x{height} mesh, target "
                           f"{target.name} has {target.width}x{target.height}")
    worst = int(np.argmax(sram)) if len(sram) else 0
    if len(sram) and sram[worst] > target.sram_bytes:
        x, y = worst % width, worst // width
        raise ProgramError(
            f"{what} needs {sram[worst]:,} B of SRAM on core ({x},{y}), "
            f"{target.name} cores have {target.sram_bytes:,} B")
    worst = int(np.argmax(colours)) if len(colours) else 0
    if len(colours) and colours[worst] > target.colours:
        x, y = worst % width, worst // width
        raise ProgramError(f"{what} routes {colours[worst]} colours through core ({x},{y}), "
                           f"{target.name} routers have {target.colours}")


@numba.njit(cache=True, nogil=True)
def _deadlock(core_ptr, ins_kind, ins_arg, route_ptr, n_messages, split, copy_of, n_copies):
    """(core, instruction) of the first core that can never finish, or (-1, -1).

    Kahn's algorithm over the instructions; an instruction waits for its predecessor on the
    core and, a RECV, for its message's SEND (a message nobody sends never comes). Cores with
    copy_of[c] = k >= 0 have a stamped body between their instructions before split[c] and the
    rest: one node B_k stands for copy k's whole body (after every core's instructions before
    it, before every core's instructions after it), which can only add dependencies. Narrow
    arrays: about 11 bytes per instruction."""
    n, cores = ins_kind.shape[0], core_ptr.shape[0] - 1
    entry_msg = np.empty(route_ptr[-1], np.int32)
    for m in range(n_messages):
        entry_msg[route_ptr[m]:route_ptr[m + 1]] = m
    ptr = np.zeros(n_messages + 1, np.int64)  # the RECVs of each message (CSR)
    sent = np.zeros(n_messages, np.bool_)
    for i in range(n):
        if ins_kind[i] == RECV:
            ptr[entry_msg[ins_arg[i]] + 1] += 1
        elif ins_kind[i] == SEND:
            sent[ins_arg[i]] = True
    for m in range(n_messages):
        ptr[m + 1] += ptr[m]
    fill = ptr[:-1].copy()
    recvs = np.empty(ptr[-1], np.int32)
    need = np.zeros(n + n_copies, np.int32)
    to_body = np.zeros(n, np.bool_)  # the last instruction before a body: B_k comes next
    last = np.zeros(n, np.bool_)
    for c in range(cores):
        lo, hi, k = core_ptr[c], core_ptr[c + 1], copy_of[c]
        for i in range(lo + 1, hi):
            need[i] = 1
        if hi > lo:
            last[hi - 1] = True
        if k >= 0:
            if split[c] > lo:
                to_body[split[c] - 1] = True
                need[n + k] += 1
            if split[c] < hi:
                need[split[c]] = 1  # after B_k only
    for i in range(n):
        if ins_kind[i] == RECV:
            m = entry_msg[ins_arg[i]]
            recvs[fill[m]] = i
            fill[m] += 1
            need[i] += 1 if sent[m] else 2
    # The cores of each copy that have instructions after its body (B_k's successors).
    after_ptr = np.zeros(n_copies + 1, np.int64)
    for c in range(cores):
        if copy_of[c] >= 0 and split[c] < core_ptr[c + 1]:
            after_ptr[copy_of[c] + 1] += 1
    for k in range(n_copies):
        after_ptr[k + 1] += after_ptr[k]
    after = np.empty(after_ptr[-1], np.int32)
    at = after_ptr[:-1].copy()
    for c in range(cores):
        if copy_of[c] >= 0 and split[c] < core_ptr[c + 1]:
            after[at[copy_of[c]]] = split[c]
            at[copy_of[c]] += 1
    stack = np.empty(n + n_copies, np.int32)
    top = 0
    for i in range(n + n_copies):
        if need[i] == 0:
            stack[top] = i
            top += 1
    done = 0
    while top:
        top -= 1
        i = stack[top]
        done += 1
        if i >= n:  # a body: the instructions after it
            for j in range(after_ptr[i - n], after_ptr[i - n + 1]):
                r = after[j]
                need[r] -= 1
                if need[r] == 0:
                    stack[top] = r
                    top += 1
            continue
        nxt = -1
        if to_body[i]:
            nxt = n + copy_of[np.searchsorted(core_ptr, i, side="right") - 1]
        elif not last[i]:
            nxt = i + 1
        if nxt >= 0:
            need[nxt] -= 1
            if need[nxt] == 0:
                stack[top] = nxt
                top += 1
        if ins_kind[i] == SEND:
            m = ins_arg[i]
            for j in range(ptr[m], ptr[m + 1]):
                r = recvs[j]
                need[r] -= 1
                if need[r] == 0:
                    stack[top] = r
                    top += 1
    if done == n + n_copies:
        return -1, -1
    for c in range(cores):
        for i in range(core_ptr[c], core_ptr[c + 1]):
            if need[i] > 0:
                return c, i
    return -1, -1


@numba.njit(cache=True, nogil=True, inline="always")
def far_core(link, width):
    """The core at the far end of one link (in Numba loops; link_dst for arrays)."""
    d = link & 3
    return (link >> 2) + (1 if d == 0 else (-1 if d == 1 else (-width if d == 2 else width)))


def link_dst(links: np.ndarray, width: int) -> np.ndarray:
    """The core at the far end of each link."""
    links = np.asarray(links, dtype=np.int64)
    core, direction = links // 4, links % 4
    step = np.array([1, -1, -width, width], dtype=np.int64)
    return core + step[direction]


@numba.njit(cache=True, nogil=True)
def _colours_used(msg_src, msg_colour, route_ptr, route_link, width, cores, n_colours):
    used = np.zeros((cores, n_colours), np.bool_)
    for m in range(msg_src.shape[0]):
        col = msg_colour[m]
        used[msg_src[m], col] = True
        for e in range(route_ptr[m], route_ptr[m + 1]):
            used[far_core(np.int64(route_link[e]), width), col] = True
    return used


def xy_routes(src: np.ndarray, dst: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Dimension-ordered routes (X first, then Y) for many messages at once.

    Returns (route_ptr, route_link).
    """
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    hops = np.abs(dst % width - src % width) + np.abs(dst // width - src // width)
    ptr = np.zeros(len(src) + 1, dtype=np.int64)
    np.cumsum(hops, out=ptr[1:])
    links = np.empty(ptr[-1], dtype=np.int32)
    _fill_routes(src, dst, width, ptr, links)
    return ptr, links


@numba.njit(cache=True, nogil=True)
def _fill_routes(src, dst, width, ptr, links):
    for m in range(src.shape[0]):
        x, y = src[m] % width, src[m] // width
        x1, y1 = dst[m] % width, dst[m] // width
        e = ptr[m]
        while x != x1:
            step = 1 if x1 > x else -1
            links[e] = (y * width + x) * 4 + (EAST if step > 0 else WEST)
            x += step
            e += 1
        while y != y1:
            step = 1 if y1 > y else -1
            links[e] = (y * width + x) * 4 + (SOUTH if step > 0 else NORTH)
            y += step
            e += 1


class ProgramBuilder:
    """Collects buffers, messages and instructions in numpy batches; `build()` orders them.

    Each instruction carries a `step` key; a core executes its instructions sorted by step,
    ties kept in the order they were added. Algorithms therefore describe phases
    ("step 3: every core in column j sends its partial sum"), not per-core loops.
    """

    def __init__(self, width: int, height: int, dtype: str = "bf16"):
        if dtype not in DTYPE_BYTES:
            raise ProgramError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        self.width, self.height, self.dtype = width, height, dtype
        # Buffer columns (core, rows, cols, role, tensor, r0, c0) in arrays grown by doubling.
        self._buf = [np.zeros(1024, dtype=t) for t in _BUF_TYPES]
        self._msgs: list[tuple] = []
        self._ins: list[tuple] = []
        self._marks: list[tuple] = []
        self._n_bufs = 0
        self._n_msgs = 0
        self._n_ins = 0
        self.tensors: list[tuple[str, int, int]] = []
        self.meta: dict = {}

    def core(self, x, y) -> np.ndarray:
        return np.asarray(y, dtype=np.int64) * self.width + np.asarray(x, dtype=np.int64)

    def tensor(self, name: str, rows: int, cols: int) -> int:
        self.tensors.append((name, int(rows), int(cols)))
        return len(self.tensors) - 1

    def buffers(self, core, rows, cols, role=SCRATCH, tensor=-1, r0=0, c0=0) -> np.ndarray:
        """Allocate one buffer per entry of `core`; returns their ids."""
        core = np.atleast_1d(np.asarray(core))
        start, n = self._n_bufs, len(core)
        if start + n > len(self._buf[0]):
            size = max(2 * len(self._buf[0]), start + n)
            for a in self._buf:  # in place (realloc): no view of them is ever handed out
                a.resize(size, refcheck=False)
        for a, v in zip(self._buf, (core, rows, cols, role, tensor, r0, c0)):
            a[start:start + n] = v
        self._n_bufs += n
        return np.arange(start, start + n, dtype=np.int32)

    def mark(self, bufs, role, tensor, r0=0, c0=0) -> None:
        """Give existing buffers a role and tensor slice (e.g. a reduction's root result)."""
        bufs = np.atleast_1d(np.asarray(bufs, dtype=np.int64))
        self._marks.append(tuple(np.broadcast_to(np.asarray(v), len(bufs)) for v in (
            bufs, role, tensor, r0, c0)))

    def messages(self, src, dst, nbytes, colour, multicast=False) -> np.ndarray:
        """Declare messages (src core -> dst core over an XY route); returns their ids."""
        src = np.atleast_1d(np.asarray(src, dtype=np.int32))
        n = len(src)
        dst = np.broadcast_to(np.asarray(dst, dtype=np.int32), n)
        if np.any(src == dst):
            raise ProgramError("a message must leave its core (src == dst)")
        self._msgs.append((src, dst.copy(), np.broadcast_to(np.asarray(nbytes), n).astype(np.int64),
                           np.broadcast_to(np.asarray(colour), n).astype(np.int16),
                           np.broadcast_to(np.asarray(multicast), n).astype(bool)))
        ids = np.arange(self._n_msgs, self._n_msgs + n, dtype=np.int64)
        self._n_msgs += n
        if self._n_msgs > MAX_MESSAGES:
            raise ProgramError(f"program too large: more than {MAX_MESSAGES:,} messages; use a "
                               "smaller region or a larger tile per core")
        return ids

    def _add(self, core, step, kind, op=OP_NONE, a=-1, b=-1, c=-1, flops=-1, nbytes=-1, arg=-1,
             hop=-1, imm=(0.0, 0.0)):
        """Record a batch; scalars stay scalars until build() writes them out."""
        core = np.atleast_1d(np.asarray(core)).astype(np.int32, copy=False)
        n = len(core)

        def col(v):
            v = np.asarray(v)
            if v.ndim and v.size != n:
                v = np.broadcast_to(v, n)
            return v

        self._ins.append((core, *(col(v) for v in (step, kind, op, a, b, c, flops, nbytes, arg,
                                                   hop, imm[0], imm[1]))))
        self._n_ins += n

    def compute(self, core, step, op, c, a=-1, b=-1, flops=-1, nbytes=-1, imm=(0.0, 0.0)):
        """COMPUTE on buffers. flops/bytes default to those of the op on the buffers' shapes."""
        self._add(core, step, COMPUTE, op=op, a=a, b=b, c=c, flops=flops, nbytes=nbytes, imm=imm)

    def like(self, bufs, cols=None) -> np.ndarray:
        """New scratch buffers on the same cores as `bufs`, of the same shape (or `cols` wide)."""
        flat = np.asarray(bufs).ravel()
        core, rows, width = (a[flat] for a in self._buf[:3])
        new = self.buffers(core, rows, width if cols is None else cols)
        return new.reshape(np.shape(bufs))

    def send(self, core, step, msg, buf):
        self._add(core, step, SEND, a=buf, arg=msg)

    def recv(self, core, step, msg, buf, hop=-1):
        """RECV message `msg` into `buf`; `hop` is the route position delivering it (-1: last)."""
        self._add(core, step, RECV, c=buf, arg=msg, hop=hop)

    def build(self, loop=None, **meta) -> MeshProgram:
        """Order everything into a MeshProgram. `loop` = (first step, end step, count per core,
        base per core): each core's instructions with steps in [first, end) form its loop.

        Linear in the program's size, so a full wafer's tens of millions of instructions build
        in seconds: a counting sort gives every instruction its place; a column whose value is
        one scalar per batch (the kind, the op, most costs and hops) is then written from a
        per-batch table in that order, and only the batches that carry arrays are scattered.
        """
        cores = self.width * self.height
        n = self._n_ins
        batches = self._ins
        sizes = np.array([len(batch[0]) for batch in batches], np.int64)

        def column(i, dtype):  # in the order added
            out = np.empty(n, dtype=dtype)
            at = 0
            for batch, size in zip(batches, sizes):
                out[at:at + size] = batch[i]
                at += size
            return out

        buf = [a[:self._n_bufs].copy() for a in self._buf]
        for ids, role, tensor, r0, c0 in self._marks:
            buf[3][ids], buf[4][ids], buf[5][ids], buf[6][ids] = role, tensor, r0, c0
        msg = [np.concatenate([p[i] for p in self._msgs]).astype(t, copy=False) if self._msgs
               else np.zeros(0, t) for i, t in enumerate((np.int32, np.int32, np.int64,
                                                          np.int16, bool))]
        if n >= 2**31:
            raise ProgramError(f"program too large: {n:,} instructions")
        core = column(0, np.int32)
        if n and (core.min() < 0 or core.max() >= cores):
            raise ProgramError(f"instruction on a core outside the {self.width}x{self.height} mesh")
        step = column(1, np.int64)
        pos, batch_at, core_ptr = _order_by_core(core, step, sizes, cores)
        placed = functools.partial(_placed, batches, sizes, pos, batch_at)  # program order
        loops = {}
        if loop is not None:
            first, end, count, base = loop
            loops = dict(
                loop_start=core_ptr[:-1] + np.bincount(core[step < first], minlength=cores),
                loop_end=core_ptr[:-1] + np.bincount(core[step < end], minlength=cores),
                loop_count=np.broadcast_to(count, cores).astype(np.int64).copy(),
                loop_base=np.broadcast_to(base, cores).astype(np.int64).copy())
            if np.any(loops["loop_count"] < 1):
                raise ProgramError("a loop count must be >= 1")
        del core, step
        kind, op = placed(2, np.int8), placed(3, np.int8)
        arg, hop = placed(9, np.int32), placed(10, np.int32)
        n_msgs = len(msg[0])
        # Number messages in the order they are sent (core by core): the simulator then walks
        # its per-hop arrays nearly in order, which is what makes it fast on a full wafer.
        perm = _first_sent(kind, arg, n_msgs)
        if perm is None:
            raise ProgramError("SEND or RECV of an undeclared message")
        new_id = np.empty(n_msgs, dtype=np.int64)
        new_id[perm] = np.arange(n_msgs)
        msg = [v[perm] for v in msg]
        with ThreadPoolExecutor(1) as pool:  # the operands beside the routes (Numba, no GIL)
            operands = pool.submit(_operands, placed, kind, op, buf[1], buf[2], self.dtype)
            route_ptr, route_link = xy_routes(msg[0], msg[1], self.width)
            if len(route_link) and route_link.size >= 2**31:
                raise ProgramError(f"program too large: {route_link.size:,} message hops")
            # SEND: the new message id; RECV: (message, hop) -> route entry, checked to end at
            # the receiving core.
            err, i, at = _link_messages(core_ptr, kind, arg, hop, new_id, route_ptr,
                                        route_link, msg[4], self.width)
            if err:
                where = int(np.searchsorted(core_ptr, i, side="right")) - 1
                raise ProgramError(
                    "RECV at a hop beyond the message's route" if err == 1 else
                    f"RECV on core {where} of message {new_id[arg[i]]}, which is not "
                    f"delivered there (its route passes core {at})" if err == 2 else
                    "RECV at an intermediate hop of a message that is not multicast")
            del hop
            a, b, c, imm, flops, nbytes = operands.result()
        del placed, pos, batch_at
        return MeshProgram(
            width=self.width, height=self.height, dtype=self.dtype, core_ptr=core_ptr,
            ins_kind=kind, ins_op=op, ins_a=a, ins_b=b, ins_c=c, ins_flops=flops,
            ins_bytes=nbytes, ins_arg=arg, ins_imm=imm,
            msg_src=msg[0], msg_dst=msg[1], msg_bytes=msg[2], msg_colour=msg[3],
            msg_multicast=msg[4], route_ptr=route_ptr, route_link=route_link,
            buf_core=buf[0], buf_rows=buf[1], buf_cols=buf[2], buf_role=buf[3],
            buf_tensor=buf[4], buf_r0=buf[5], buf_c0=buf[6], tensors=tuple(self.tensors),
            meta={**self.meta, **meta}, **loops,
        )


@numba.njit(cache=True, nogil=True)
def _sram_split(buf_core, buf_rows, buf_cols, buf_tensor, per_layer, dtype_bytes, cores):
    """MeshProgram.sram_split in one pass over the buffers."""
    once = np.zeros(cores, np.int64)
    each = np.zeros(cores, np.int64)
    for i in range(buf_core.shape[0]):
        size = np.int64(np.ceil(np.int64(buf_rows[i]) * buf_cols[i] * dtype_bytes))
        if per_layer[buf_tensor[i]]:
            each[buf_core[i]] += size
        else:
            once[buf_core[i]] += size
    return once, each


@numba.njit(cache=True, nogil=True)
def _order_by_core(core, step, sizes, n_cores):
    """Each instruction's place in the program, grouping each core's instructions sorted by
    step, ties in insertion order (two stable counting sorts: by step, then by core). Returns
    (place of each instruction added, batch of each place, core_ptr)."""
    n = core.shape[0]
    lo, hi = 0, 0
    if n:
        lo, hi = step.min(), step.max()
    span = hi - lo + 1
    if span > 4 * n + 1024:  # sparse steps: rank them first
        values = np.unique(step)
        rank = np.searchsorted(values, step)
        lo, span = 0, len(values)
    else:
        rank = step
    count = np.zeros(span + 1, np.int64)
    for i in range(n):
        count[rank[i] - lo + 1] += 1
    for k in range(span):
        count[k + 1] += count[k]
    by_step = np.empty(n, np.int32)
    for i in range(n):
        k = rank[i] - lo
        by_step[count[k]] = i
        count[k] += 1
    ptr = np.zeros(n_cores + 1, np.int64)
    for i in range(n):
        ptr[core[i] + 1] += 1
    for k in range(n_cores):
        ptr[k + 1] += ptr[k]
    fill = ptr[:-1].copy()
    pos = np.empty(n, np.int32)
    for j in range(n):
        i = by_step[j]
        pos[i] = fill[core[i]]
        fill[core[i]] += 1
    batch_at = np.empty(n, np.int32)
    at = 0
    for k in range(sizes.shape[0]):
        for i in range(at, at + sizes[k]):
            batch_at[pos[i]] = k
        at += sizes[k]
    return pos, batch_at, ptr


def _operands(placed, kind, op, rows, cols, dtype):
    """Buffer operands, immediates, FLOPs and SRAM bytes of every instruction in program order;
    compute ops left at -1 get the op's default costs from the buffers' shapes."""
    a, b, c = (placed(i, np.int32) for i in (4, 5, 6))
    imm = np.empty((len(kind), 2), np.float32)
    placed(11, np.float32, imm[:, 0])
    placed(12, np.float32, imm[:, 1])
    flops, nbytes = (placed(i, np.int32, limit=2**31) for i in (7, 8))
    coef = np.zeros((len(OP_NAMES), 5), dtype=np.int64)
    for code, row in _COSTS.items():
        coef[code] = row
    if not _default_costs(kind, op, a, b, c, rows, cols, coef, float(DTYPE_BYTES[dtype]),
                          flops, nbytes):
        raise ProgramError(TOO_LARGE)
    return a, b, c, imm, flops, nbytes


SMALL_BATCH = 4096  # array batches up to this size are concatenated, larger ones scattered


def _placed(batches, sizes, pos, batch_at, i, dtype, out=None, limit=None) -> np.ndarray:
    """Column `i` of the builder's batches in the program's order; a value at or above `limit`
    raises ProgramError(TOO_LARGE). Scalar and small batches are placed in one Numba call
    (`_place`), each large batch's array by its own (`_scatter`)."""
    out = np.empty(len(pos), dtype=dtype) if out is None else out
    table = np.zeros(len(batches), dtype=np.float64 if limit is None else np.int64)
    at = np.full(len(batches), -1, np.int64)  # a small batch's values: small[at[k]:]
    small, large, n_small, first, scalars = [], [], 0, 0, False
    for k, batch in enumerate(batches):
        v = batch[i]
        if np.ndim(v) == 0 or (v.strides == (0,) and len(v)):
            table[k] = v if np.ndim(v) == 0 else v[0]
            scalars = True
        elif limit is not None and v.max() >= limit:
            raise ProgramError(TOO_LARGE)
        elif len(v) <= SMALL_BATCH:
            small.append(v)
            at[k], n_small = n_small, n_small + len(v)
        else:
            large.append((first, v))
        first += sizes[k]
    if limit is not None and len(table) and table.max() >= limit:
        raise ProgramError(TOO_LARGE)
    small = np.concatenate(small).astype(dtype, copy=False) if small else np.zeros(0, dtype)
    _place(small, at, table.astype(dtype) if scalars else table[:0].astype(dtype), sizes, pos,
           batch_at, out)
    for first, v in large:
        _scatter(out, pos, first, v)
    return out


@numba.njit(cache=True, nogil=True)
def _place(small, at, table, sizes, pos, batch_at, out):
    """Write one column in program order: table[batch] everywhere if a batch gave a scalar
    (else the table is empty), then each small batch's values (small[at[batch]:]) at its
    places."""
    if table.shape[0]:
        for j in range(out.shape[0]):
            out[j] = table[batch_at[j]]
    first = 0
    for k in range(sizes.shape[0]):
        if at[k] >= 0:
            for j in range(sizes[k]):
                out[pos[first + j]] = small[at[k] + j]
        first += sizes[k]


@numba.njit(cache=True, nogil=True)
def _scatter(out, pos, first, values):
    """out[pos[first + j]] = values[j]: one large batch's column at its places."""
    for j in range(values.shape[0]):
        out[pos[first + j]] = values[j]


@numba.njit(cache=True, nogil=True)
def _first_sent(kind, arg, n_msgs):
    """Message ids in the order of their first SEND, then the ones never sent; None if a SEND
    or RECV names an undeclared message."""
    seen = np.zeros(n_msgs, np.bool_)
    perm = np.empty(n_msgs, np.int64)
    k = 0
    for i in range(kind.shape[0]):
        if kind[i] == COMPUTE:
            continue
        m = arg[i]
        if m < 0 or m >= n_msgs:
            return None
        if kind[i] == SEND and not seen[m]:
            seen[m] = True
            perm[k] = m
            k += 1
    for m in range(n_msgs):
        if not seen[m]:
            perm[k] = m
            k += 1
    return perm


@numba.njit(cache=True, nogil=True)
def _link_messages(core_ptr, kind, arg, hop, new_id, route_ptr, route_link, multicast, width):
    """In place: a SEND's message renumbered, a RECV's (message, hop) made its route entry.
    Returns (fault, instruction, the core its route entry reaches) of the first bad RECV (fault
    1: hop beyond the route, 2: not delivered at its core, 3: an intermediate hop of a
    unicast), or (0, -1, -1)."""
    for c in range(core_ptr.shape[0] - 1):
        for i in range(core_ptr[c], core_ptr[c + 1]):
            if kind[i] == COMPUTE:
                continue
            m = new_id[arg[i]]
            if kind[i] == SEND:
                arg[i] = m
                continue
            h, hops = np.int64(hop[i]), route_ptr[m + 1] - route_ptr[m]
            if h >= hops:
                return 1, i, -1
            e = route_ptr[m + 1] - 1 if h < 0 else route_ptr[m] + h
            at = far_core(np.int64(route_link[e]), width)
            if at != c:
                return 2, i, at
            if not multicast[m] and h >= 0 and h != hops - 1:
                return 3, i, at
            arg[i] = e
    return 0, -1, -1


@numba.njit(cache=True, nogil=True)
def _default_costs(kind, op, a, b, c, rows, cols, coef, dtype_bytes, flops, nbytes):
    """Fill FLOPs and SRAM bytes left at -1 with the op's defaults (`_COSTS`) in place; False
    if one does not fit the (int32) columns."""
    for i in range(kind.shape[0]):
        if kind[i] != COMPUTE:
            flops[i] = max(flops[i], 0)
            nbytes[i] = max(nbytes[i], 0)
            continue
        o = op[i]
        sa = np.int64(rows[a[i]]) * cols[a[i]] if a[i] >= 0 else np.int64(0)
        sb = np.int64(rows[b[i]]) * cols[b[i]] if b[i] >= 0 else np.int64(0)
        sc = np.int64(rows[c[i]]) * cols[c[i]] if c[i] >= 0 else np.int64(0)
        if flops[i] < 0:
            if o == OP_MATMUL_ACC:
                f = 2 * sa * cols[b[i]]
            elif o == OP_MATMUL_T:
                f = 2 * sa * rows[b[i]]
            else:
                f = coef[o, 0] * sa + coef[o, 1] * sc
            if f >= 2**31:
                return False
            flops[i] = f
        if nbytes[i] < 0:
            elems = 2 * sa if o == OP_PUT else coef[o, 2] * sa + coef[o, 3] * sb + coef[o, 4] * sc
            nb = np.int64(np.ceil(elems * dtype_bytes))
            if nb >= 2**31:
                return False
            nbytes[i] = nb
    return True
