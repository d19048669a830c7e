"""Quantisation and pruning: what storing weights and KV caches in fewer bytes, and skipping
pruned weights, costs and saves on a core.

A `Scheme` says how a compiled model stores its numbers: weights (every projection, the LM
head and the embedding tables) and KV caches in bf16/fp16, fp8, int8 or int4 with one fp16
scale per group of `group` elements (group-wise absmax scales, counted as bytes), and the
layers' projections pruned to a `density` (unstructured: a bitmask or 16-bit indices, whichever
is smaller, as index metadata) or to 2:4 (two values of every four along K, a 2-bit index each).
Activations, norms and biases stay in the model's compute dtype.

What it costs, per matmul instruction on a core (the same function serves the lowering's
program pass `apply` and compiler.estimate, so the two stay in step):
- SRAM bytes read: the operand's stored bytes (values, scales, index metadata) in place of
  elements x compute-dtype bytes;
- FLOPs: only the kept weights are multiplied (a dataflow core skips what is not stored,
  docs/efficiency.md). Where the target lists a rate for the stored dtype the matmul runs at
  that rate, charged as compute-dtype-equivalent FLOPs (the engine has one rate per program),
  plus quantising the activations (2 per element); where it has none, each stored element is
  dequantised to the compute dtype first (a conversion and a scale multiply: 2 FLOPs at the
  compute rate). WSE-2/WSE-3 list no fp8/int8/int4 rate (docs/hardware.md), so they dequantise.
- KV cache: the shift scheme moves and stores entries in the cache dtype (messages carry the
  stored bytes); the new token's entry is quantised once (2 FLOPs per element).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from compiler.program import (
    COMPUTE,
    OP_MATMUL_ACC,
    OP_MATMUL_T,
    OP_PUT,
    OP_TAKE,
    RECV,
    SEND,
    MeshProgram,
    ProgramError,
)
from compiler.targets import DTYPE_BYTES, MeshTarget

QUANT_DTYPES = ("bf16", "fp16", "fp8", "int8", "int4")
SCALED = ("fp8", "int8", "int4")  # stored with group-wise scales
SCALE_DTYPE = "fp16"
PRUNED = ("q", "k", "v", "o", "up", "down", "gate")  # a layer's projections
DEQUANT_FLOPS = 2  # per stored element: convert to the compute dtype, multiply by its scale
INDEX_BYTES = 2  # a 16-bit position of a kept weight within its tile (unstructured)
# Tensor kinds (`kinds`): not stored quantised, a pruned projection, an unpruned matrix (the
# LM head), a lookup table (embedding rows, grouped along d), a KV cache.
NONE, PROJ, HEAD, TABLE, CACHE = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Scheme:
    """How weights and KV caches are stored; `compute` is the model's dtype (activations)."""

    compute: str = "bf16"
    weights: str = "bf16"
    kv: str = "bf16"
    group: int = 128
    density: float = 1.0  # kept fraction of the layers' projection weights
    structured: bool = False  # 2:4 (density 0.5)

    @property
    def dense(self) -> bool:
        return (self.weights == self.compute and self.kv == self.compute
                and self.density == 1.0)

    @property
    def prune(self) -> str | None:
        return "2:4" if self.structured else None if self.density == 1.0 else str(self.density)

    def label(self) -> str:
        """e.g. "weights int8, kv int8 (group 128), 2:4"."""
        parts = [f"weights {self.weights}", f"kv {self.kv}"]
        if self.weights in SCALED or self.kv in SCALED:
            parts[-1] += f" (group {self.group})"
        if self.prune:
            parts.append(f"pruned {self.prune}")
        return ", ".join(parts)


def scheme(compute: str, quant: str | None = None, kv_dtype: str | None = None,
           group: int = 128, prune: str | float | None = None) -> Scheme:
    """A checked Scheme; None keeps the compute dtype (weights, KV) or dense (prune). `prune`:
    "2:4", or the density of kept weights in (0, 1] (e.g. 0.5)."""
    for field, value in (("--quant", quant), ("--kv-dtype", kv_dtype)):
        if value is not None and value not in QUANT_DTYPES:
            raise ValueError(f"{field} {value!r} is not one of {', '.join(QUANT_DTYPES)}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"--quant-group {group!r} must be an integer >= 1")
    density, structured = 1.0, False
    if prune not in (None, "", "dense"):
        if prune == "2:4":
            density, structured = 0.5, True
        else:
            try:
                density = float(prune)
            except (TypeError, ValueError):
                raise ValueError(f"--prune {prune!r} must be 2:4 or a density in (0, 1]"
                                 ) from None
            if not 0 < density <= 1:
                raise ValueError(f"--prune {prune!r}: the density of kept weights must be in "
                                 "(0, 1]")
    return Scheme(compute, quant or compute, kv_dtype or compute, group, density, structured)


def of(options, compute: str) -> Scheme:
    """The Scheme of compile options (compiler.model.CompileOptions' quant fields)."""
    return scheme(compute, options.quant, options.kv_dtype, options.quant_group, options.prune)


# ---- bytes -----------------------------------------------------------------------------------

def _kept(s: Scheme, kind: int):
    return s.density if kind == PROJ else 1.0


def stored_bytes(s: Scheme, kind: int, rows, cols):
    """Bytes of a [rows, cols] buffer of tensor `kind` as stored: values, group scales (along
    rows for matrices, whose K runs down the rows; along cols for tables and caches, whose rows
    are tokens) and, pruned, index metadata. Numbers or arrays."""
    rows, cols = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
    dtype = s.kv if kind == CACHE else s.weights
    elems = rows * cols
    kept = elems * _kept(s, kind)
    out = kept * DTYPE_BYTES[dtype]
    if dtype in SCALED:
        groups = np.ceil(rows / s.group) * cols if kind in (PROJ, HEAD) else \
            rows * np.ceil(cols / s.group)
        out = out + groups * DTYPE_BYTES[SCALE_DTYPE]
    if kind == PROJ and s.structured:
        out = out + kept / 4  # 2 bits per kept value
    elif kind == PROJ and s.density < 1:
        out = out + np.minimum(elems / 8, kept * INDEX_BYTES)
    return np.ceil(out)


def compute_bytes(s: Scheme, rows, cols):
    """Bytes of a [rows, cols] buffer in the compute dtype."""
    return np.ceil(np.asarray(rows, np.float64) * cols * DTYPE_BYTES[s.compute])


def saved_fraction(s: Scheme, kind: int, rows: int, cols: int) -> float:
    """Stored bytes over compute-dtype bytes of a [rows, cols] buffer."""
    return float(stored_bytes(s, kind, rows, cols) / compute_bytes(s, rows, cols))


# ---- time ------------------------------------------------------------------------------------

def _rate(t: MeshTarget, dtype: str) -> float | None:
    return dict(t.flops_per_cycle).get(dtype)


def matmul(s: Scheme, t: MeshTarget, kind: int, a_elems, c_elems, b_rows, b_cols,
           flops, acc: bool, read=1.0):
    """(FLOPs, SRAM bytes) of one matmul instruction whose operand b ([b_rows, b_cols]) is
    stored as `kind`, `flops` its count on dense b; a and c in the compute dtype (c read and
    written when `acc`); `read`: the fraction of b it reads (1: all; less where it skips rows,
    as a sparse-activation down projection does). The FLOPs are compute-dtype equivalents
    (module docstring)."""
    dtype = s.kv if kind == CACHE else s.weights
    db = DTYPE_BYTES[s.compute]
    nbytes = np.ceil((np.asarray(a_elems) + (2 if acc else 1) * np.asarray(c_elems)) * db) \
        + np.ceil(stored_bytes(s, kind, b_rows, b_cols) * read)
    work = np.asarray(flops, np.float64) * _kept(s, kind)
    if dtype != s.compute:
        native, rc = _rate(t, dtype), t.rate(s.compute)
        if native:
            work = np.ceil(work * rc / native) + 2 * np.asarray(a_elems)
        else:
            stored = np.asarray(b_rows, np.float64) * b_cols * _kept(s, kind) * read
            work = work + DEQUANT_FLOPS * np.ceil(stored)
    return np.ceil(work), nbytes


# ---- the program pass ------------------------------------------------------------------------

def kinds(tensors) -> np.ndarray:
    """Per tensor (and a trailing NONE for scratch buffers, tensor -1): its kind."""
    out = np.zeros(len(tensors) + 1, np.int8)
    for i, (name, _, _) in enumerate(tensors):
        short = name.rsplit(".", 1)[-1]
        if short in ("k_cache", "v_cache"):
            out[i] = CACHE
        elif name.startswith("layers.") and short in PRUNED:
            out[i] = PROJ
        elif name == "lm_head":
            out[i] = HEAD
        elif name in ("embed", "pos_embed"):
            out[i] = TABLE
    return out


def apply(program: MeshProgram, s: Scheme, t: MeshTarget) -> MeshProgram:
    """`program` with the costs of scheme `s`: FLOPs and SRAM bytes of the matmuls reading
    stored weights or caches, of the takes and puts moving cache entries, and the bytes of the
    messages carrying them (module docstring). The numbers it computes on are unchanged, so
    wafersim.functional runs it as before; `storage_view` counts the SRAM it needs."""
    if s.dense:
        return program
    if program.dtype != s.compute:
        raise ProgramError(f"scheme for {s.compute} applied to a {program.dtype} program")
    kind = kinds(program.tensors)[program.buf_tensor]  # per buffer
    rows, cols = program.buf_rows.astype(np.int64), program.buf_cols.astype(np.int64)
    flops, nbytes = program.ins_flops.astype(np.int64), program.ins_bytes.astype(np.int64)
    msg_bytes = program.msg_bytes.copy()
    op, a, b, c = program.ins_op, program.ins_a, program.ins_b, program.ins_c
    comp = program.ins_kind == COMPUTE
    size, db = rows * cols, DTYPE_BYTES[s.compute]
    for code, acc in ((OP_MATMUL_ACC, True), (OP_MATMUL_T, False)):
        i = np.flatnonzero(comp & (op == code))
        i = i[kind[b[i]] != NONE]
        if len(i):
            bb = b[i]
            for k in np.unique(kind[bb]):
                j, bk = i[kind[bb] == k], bb[kind[bb] == k]
                # The share of b an instruction reads, from its SRAM bytes (all of it unless
                # the lowering set fewer, e.g. only the active rows of sparse activations).
                base = np.ceil((size[a[j]] + (2 if acc else 1) * size[c[j]]) * db)
                read = np.clip((nbytes[j] - base) / (size[bk] * db), 0.0, 1.0)
                f, n = matmul(s, t, int(k), size[a[j]], size[c[j]], rows[bk], cols[bk],
                              flops[j], acc, read)
                flops[j], nbytes[j] = f, n
    if s.kv != s.compute:
        # Entries leave a cache by a take into a buffer that is sent; they arrive by a receive
        # into a buffer that is put: those buffers hold stored bytes.
        stored = np.zeros(len(kind), bool)
        takes = np.flatnonzero(comp & (op == OP_TAKE))
        takes = takes[kind[a[takes]] == CACHE]
        stored[c[takes]] = True
        sends = np.flatnonzero(program.ins_kind == SEND)
        sends = sends[stored[a[sends]]]
        moved = np.zeros(program.n_messages, bool)
        moved[program.ins_arg[sends]] = True
        msg_bytes[program.ins_arg[sends]] = stored_bytes(s, CACHE, rows[a[sends]],
                                                         cols[a[sends]])
        recvs = np.flatnonzero(program.ins_kind == RECV)
        recvs = recvs[moved[program.entry_msg[program.ins_arg[recvs]]]]
        stored[c[recvs]] = True
        nbytes[takes] = 2 * stored_bytes(s, CACHE, rows[c[takes]], cols[c[takes]])
        puts = np.flatnonzero(comp & (op == OP_PUT))
        puts = puts[kind[c[puts]] == CACHE]
        moved_in = stored[a[puts]]
        entry = stored_bytes(s, CACHE, rows[a[puts]], cols[a[puts]])
        nbytes[puts] = np.where(moved_in, 2 * entry, compute_bytes(s, rows[a[puts]],
                                                                   cols[a[puts]]) + entry)
        flops[puts] += np.where(moved_in, 0, 2 * size[a[puts]])
    if max(flops.max(initial=0), nbytes.max(initial=0)) >= 2**31:
        raise ProgramError("an instruction of more than 2**31 FLOPs or SRAM bytes")
    return dataclasses.replace(program, ins_flops=flops.astype(np.int32),
                               ins_bytes=nbytes.astype(np.int32), msg_bytes=msg_bytes,
                               meta={**program.meta, "quant": dataclasses.asdict(s)})


def storage_view(program: MeshProgram, s: Scheme) -> MeshProgram:
    """`program` with every weight and cache buffer resized to its stored bytes (one row of
    compute-dtype elements), for counting SRAM only: MeshProgram.sram_per_core and check of
    the view are those of the quantised program."""
    if s.dense:
        return program
    kind = kinds(program.tensors)[program.buf_tensor]
    rows, cols = program.buf_rows.astype(np.int64), program.buf_cols.astype(np.int64)
    new_rows, new_cols = rows.copy(), cols.copy()
    db = DTYPE_BYTES[s.compute]
    for k in (PROJ, HEAD, TABLE, CACHE):
        i = np.flatnonzero(kind == k)
        new_rows[i] = 1
        new_cols[i] = np.ceil(stored_bytes(s, k, rows[i], cols[i]) / db)
    return dataclasses.replace(program, buf_rows=new_rows.astype(np.int32),
                               buf_cols=new_cols.astype(np.int32))


def stored_layout(program: MeshProgram, info: dict) -> MeshProgram:
    """A loaded layout's program viewed at its stored bytes (`storage_view`), by the compile
    options the layout records, so its SRAM per core is what the compiler checked."""
    o = info.get("options", {})
    s = scheme(program.dtype, o.get("quant"), o.get("kv_dtype"), o.get("quant_group", 128),
               o.get("prune"))
    return storage_view(program, s)


# ---- numbers: what the stored weights hold ---------------------------------------------------

def fake_quant(x: np.ndarray, dtype: str, group: int, axis: int = 0) -> np.ndarray:
    """x quantised to `dtype` and back (float32), with an absmax scale per group of `group`
    elements along `axis` (int8/int4 symmetric integers; fp8 as e4m3: 3 mantissa bits, max 448;
    bf16/fp16: rounded to their mantissas)."""
    x = np.asarray(x, np.float32)
    if dtype in ("bf16", "fp16"):
        return _round_mantissa(x, 7 if dtype == "bf16" else 10)
    xm = np.moveaxis(x, axis, 0)
    n = xm.shape[0]
    pad = (-n) % group
    g = np.concatenate([xm, np.zeros((pad, *xm.shape[1:]), np.float32)]).reshape(
        -1, group, *xm.shape[1:])
    top = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}[dtype]
    scale = np.abs(g).max(axis=1, keepdims=True) / top
    scale = _round_mantissa(scale, 10)  # the fp16 scale
    scale = np.where(scale > 0, scale, 1.0)
    y = g / scale
    y = np.clip(np.round(y), -top, top) if dtype != "fp8" else _round_mantissa(
        np.clip(y, -top, top), 3)
    out = (y * scale).reshape(-1, *xm.shape[1:])[:n]
    return np.moveaxis(out, 0, axis).astype(np.float32)


def _round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    m, e = np.frexp(np.asarray(x, np.float64))
    return np.ldexp(np.round(m * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), e).astype(np.float32)


def prune(w: np.ndarray, s: Scheme) -> np.ndarray:
    """w [K, N] with the smallest weights zeroed: 2:4 keeps the 2 largest of every 4 along K;
    unstructured keeps the largest `density` fraction of the whole matrix."""
    w = np.asarray(w, np.float32)
    if s.structured:
        k = w.shape[0]
        if k % 4:
            raise ValueError(f"2:4 pruning needs K a multiple of 4, got {k}")
        g = np.abs(w).reshape(k // 4, 4, -1)
        drop = np.argsort(g, axis=1, kind="stable")[:, :2]
        mask = np.ones_like(g, bool)
        np.put_along_axis(mask, drop, False, axis=1)
        return np.where(mask.reshape(w.shape), w, 0).astype(np.float32)
    if s.density >= 1:
        return w
    keep = max(1, math.ceil(s.density * w.size))
    cut = np.partition(np.abs(w).ravel(), w.size - keep)[w.size - keep]
    return np.where(np.abs(w) >= cut, w, 0).astype(np.float32)


def stored_weights(weights: dict[str, np.ndarray], s: Scheme) -> dict[str, np.ndarray]:
    """The weights as the scheme stores them (models.reference names): projections pruned then
    quantised along K, the LM head along K, embedding tables along d; the rest unchanged."""
    out = dict(weights)
    for name, w in weights.items():
        k = kinds([(name, 0, 0)])[0]
        if k == PROJ and s.prune:
            w = prune(w, s)
        if k in (PROJ, HEAD, TABLE) and s.weights != s.compute:
            w = fake_quant(w, s.weights, s.group, axis=0 if k != TABLE else 1)
        out[name] = w.astype(np.float32)
    return out


def stored_cache(x: np.ndarray, s: Scheme, head_dim: int) -> np.ndarray:
    """A cache [b, t, KV * hd] as stored: groups along each token's head dims."""
    if s.kv == s.compute:
        return x
    heads = np.asarray(x, np.float32).reshape(*x.shape[:-1], -1, head_dim)
    return fake_quant(heads, s.kv, s.group, axis=-1).reshape(x.shape)
