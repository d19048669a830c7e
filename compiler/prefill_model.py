"""compile_model for phase "prefill": one prompt (batch 1) of S tokens, placed on the wafer.

The passes mirror the decode compiler (compiler.model), with prefill's 2D activation tiles:
- `partition_prefill`: square grids of s x s cores (prefill_plan's layout), the policy's choice
  among the sides that fit by estimate (the weights as in decode; the GEMMs' receive buffers,
  the [S/s x d/s]-sized activation tiles and the caches as scratch); `place` as in decode;
- `lower_prefill`: per region [embed | receive h] -> prefill_layer looped once per layer
  (tensors "layers.{l}.*") -> [send h on | final norm, LM head, argmax of the last token].
  As in decode (compiler.stamp), the layer is lowered once, on the first layer region (the
  body), and stamped onto the others; the rest (embedding, hand-offs, head) is the glue.
  * embed: the token ids [S, 1] enter at the grid's corner and are multicast along its first
    row, then down every column; core (r, c) holds embed rows v0[r]:+vs[r] (vocabulary split
    over physical rows), columns of its logical grid column. In rounds of `rows` row blocks
    (as many as a quarter of a core's SRAM holds, so long prompts fit), it looks the round's
    ids up (OP_LOOKUP: a [rows*mb, db] partial, zero where the id is not its row), the
    partials are K-tree reduced down each column, and the root takes each row block
    (OP_TAKE) and sends it to the core that holds it in the activation layout;
  * hand-off: every grid core sends its [mb, db] tile to the same logical core of the next
    region;
  * head: the last prompt token's row (row block (S-1) // mb) is taken from its tiles,
    RMS-normalised along its grid row, multicast down the columns (decode's GEMV layout on the
    grid), LM head GEMV over the grid, argmax along the roots: outputs "logits" [1, vocab]
    and "next" [1, 2] (value, token id) as in decode.
- the exact SRAM and colour check of the lowered program decides; it refuses with the bytes
  per core it needs.

A grid of more than SAMPLE_SIDE cores a side is compiled with sampled steps (timing only,
compiler.algorithms.prefill): the body is lowered twice, its GEMM and attention loops run
SAMPLED_STEPS[0] and SAMPLED_STEPS[1] steps (Stamped.short and .body), and wafersim.whole
extrapolates the time to the grid's s steps; `memory["steps"]` records it. Such a program is
refused for functional execution.

Outputs besides logits / next: "layers.{l}.k_cache" and "layers.{l}.v_cache", [S, KV*hd] per
layer (k after RoPE, each head's dims in RoPE pair order; v in model order). `unpack_caches`
turns them into the [1, S, KV*hd] model-order arrays models.reference caches (and that
compiler.model.pack_inputs takes for a decode step).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from compiler.algorithms.allreduce import ktree_reduce, line_broadcast
from compiler.algorithms.common import Region, split
from compiler.algorithms.meshgemm import GEMM_ALGOS
from compiler.algorithms.meshgemv import GEMV_ALGOS, gemv
from compiler.algorithms.mlp import model_activation
from compiler.algorithms.prefill import (
    _allreduce,
    causal_mask,
    pack_weights,
    prefill_layer,
    prefill_norm,
    prefill_plan,
    rope_table,
    unpack_k_cache,
)
from compiler.model import (
    EPI,
    LAYER,
    LOOP,
    CompiledModel,
    _argmax,
    _carry,
    _matrices,
    distribute,
    forced_regions,
    place,
    policy_key,
)
from compiler.program import (
    INPUT,
    OP_ADD,
    OP_FILL,
    OP_LOOKUP,
    OP_MATMUL_ACC,
    OP_MUL,
    OP_RSQRT,
    OP_SQSUM,
    OP_TAKE,
    OP_ZERO,
    MeshProgram,
    ProgramBuilder,
    ProgramError,
)
from compiler.stamp import Stamped
from compiler.targets import DTYPE_BYTES, MeshTarget
from models.config import ModelConfig

# Colours beyond the layer's 0-8 (prefill.py): the embedding's scatter reuses the K/V colour 4
# and the reductions / multicasts 5-8 (they run before the layers); the hand-off gets its own.
_SCATTER, _RED, _BCAST, _HANDOFF = 4, 5, 7, 9
# Grids wider than this are compiled with sampled steps (module docstring): at 64 a layer's
# exact program is about 6 M messages and 2.5 GB to build, growing as s^3.
SAMPLE_SIDE = 64
SAMPLED_STEPS = (2, 3)
EMBED_SHARE = 4  # the embedding's partial sums take at most 1/EMBED_SHARE of a core's SRAM
MARGINS = (0.97, 0.93, 0.89)  # shares of SRAM the estimate fills, tried in turn


def algos(options) -> tuple[str, str]:
    """(GEMM algorithm of the layers, GEMV algorithm of the LM head) for options.algo: a GEMV
    name keeps its GEMV for the head and uses MeshGEMM for the layers, a GEMM name the
    reverse (MeshGEMV for the head)."""
    if options.algo in GEMM_ALGOS:
        return options.algo, "meshgemv"
    return "meshgemm", options.algo


def compile_prefill(graph, target: MeshTarget, options):

    cfg: ModelConfig = graph.graph["cfg"]
    batch, seq, past = graph.graph["batch"], graph.graph["seq_len"], graph.graph["ctx_len"]
    if batch != 1:
        raise ProgramError(f"prefill of batch {batch}: the whole-model compiler prefills one "
                           "sequence at a time (batch 1)")
    if past:
        raise ProgramError(f"prefill after {past} cached tokens: the whole-model compiler "
                           "prefills a prompt from position 0 (ctx_len 0)")
    gemm_algo, gemv_algo = algos(options)
    # The estimate places; the exact check decides. A placement it refuses gives way to one
    # placed with a wider margin (as in decode, a few at most).
    error = None
    for margin in MARGINS:
        try:
            rows, cols, counts = partition_prefill(cfg, target, seq, options, gemm_algo, margin)
        except ProgramError:
            if error is None:
                raise
            raise error from None
        placements = place(target, rows, cols, counts)
        s = min(rows, cols)
        sample = SAMPLED_STEPS if s > SAMPLE_SIDE else None
        code = lower_prefill(cfg, target.width, target.height, placements, seq,
                             options.levels, gemm_algo, gemv_algo,
                             embed_rows(cfg, s, seq, target), sample)
        try:
            code.check(target, f"{cfg.name} prefill of {seq} tokens")
            break
        except ProgramError as e:
            error = error or e.with_traceback(None)  # (its frames would hold the code)
            code = None
    else:
        raise error
    sram = code.sram_per_core()
    memory = dict(sram_max_bytes=int(sram.max()), sram_limit_bytes=target.sram_bytes,
                  sram_mean_bytes=float(sram[sram > 0].mean()), max_ctx=seq, grid=f"{s}x{s}",
                  steps=dict(full=s, sampled=list(sample)) if sample else None)
    if sample:
        code = code.for_timing()
    return CompiledModel(code, cfg, target, options, "prefill", 1, seq, math.ceil(seq / s),
                         tuple(placements), memory)


# ---- partition ---------------------------------------------------------------------------

def _max_side(cfg: ModelConfig) -> int:
    return max(1, min(cfg.num_key_value_heads * cfg.head_dim // 2, cfg.hidden_size))


def prefill_layer_bytes(cfg: ModelConfig, s: int, seq: int) -> int:
    """Bytes one layer keeps on the busiest core of an s x s grid: weight tiles, norms and its
    K / V caches (the rows of its query block)."""

    mb = math.ceil(seq / s)
    kv = cfg.num_key_value_heads * cfg.head_dim
    elems = sum(math.ceil(k / s) * math.ceil(n / s) for k, n, _ in _matrices(cfg))
    elems += 2 * math.ceil(cfg.hidden_size / s) + 2 * mb * math.ceil(kv / s)
    return math.ceil(elems * DTYPE_BYTES[cfg.dtype])


def embed_rows(cfg: ModelConfig, s: int, seq: int, target: MeshTarget) -> int:
    """Row blocks the embedding looks up per round: its partial sums, their reduction buffer
    and the scatter's tiles ([rows*mb, db] each) within 1/EMBED_SHARE of a core's SRAM."""
    tile = 3 * math.ceil(seq / s) * math.ceil(cfg.hidden_size / s) * DTYPE_BYTES[cfg.dtype]
    return max(1, min(s, int(target.sram_bytes / EMBED_SHARE // tile)))


def prefill_scratch_bytes(cfg: ModelConfig, s: int, seq: int, algo: str, embed: bool,
                          head: bool, rows: int | None = None) -> int:
    """Estimated scratch on a core (shared by the layers of its region): the GEMMs' receive
    buffers (one more weight tile each, two for SUMMA), activation tiles, attention's blocks,
    plus the tables' tiles and the embedding's partial sums (`rows` row blocks a round, all s
    by default) where the region holds them."""

    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    mb, db, fb = math.ceil(seq / s), math.ceil(d / s), math.ceil(f / s)
    qkv = math.ceil((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd / s)
    weights = sum(math.ceil(k / s) * math.ceil(n / s) for k, n, _ in _matrices(cfg))
    elems = (2 if algo == "summa" else 1) * weights
    elems += mb * (10 * db + 4 * fb + 3 * qkv + hd)
    elems += 4 * mb * mb * max(1, math.ceil(cfg.num_attention_heads / s))
    vs = math.ceil(cfg.vocab_size / s)
    if embed:
        rows = s if rows is None else rows
        elems += vs * db + 3 * rows * mb * db + math.ceil(s / rows) * rows * mb
    if head:
        elems += db * vs + 2 * vs + 4 * db
    return math.ceil(elems * DTYPE_BYTES[cfg.dtype])


def _prefill_counts(cfg, target, s, n, seq, algo, margin=MARGINS[0]):

    limit = margin * target.sram_bytes
    per = prefill_layer_bytes(cfg, s, seq)
    rows = embed_rows(cfg, s, seq, target)
    extra = [prefill_scratch_bytes(cfg, s, seq, algo, k == 0, k == n - 1, rows)
             for k in range(n)]
    if max(extra) > limit:
        return None
    return distribute(cfg.num_hidden_layers, [int((limit - e) // per) for e in extra])


def partition_prefill(cfg: ModelConfig, target: MeshTarget, seq: int, options,
                      algo: str = "meshgemm", margin: float = MARGINS[0]
                      ) -> tuple[int, int, list[int]]:
    """(rows, cols, layers per region): regions of s x s cores (or options.region, whose
    top-left min(rows, cols) square the layers use), by policy as in decode, filling at most
    `margin` of each core's SRAM by estimate."""
    L, smax = cfg.num_hidden_layers, _max_side(cfg)
    if options.region is not None:
        rows, cols = options.region
        n = forced_regions(target, rows, cols, L)
        s = min(rows, cols)
        if s > smax:
            raise ProgramError(f"prefill: region {rows}x{cols} gives a {s}x{s} grid; "
                               f"{cfg.name} allows at most {smax}x{smax} (RoPE pairs of its "
                               "KV heads)")
        counts = _prefill_counts(cfg, target, s, n, seq, algo, margin)
        if counts is None:
            raise ProgramError(f"{cfg.name} prefill of {seq} tokens does not fit {n}"
                               f" regions of {rows}x{cols} cores: {target.sram_bytes:,} B of "
                               "SRAM per core")
        return rows, cols, counts
    # Prefill's GEMMs are compute-bound: waferllm takes the largest grids (as WaferLLM's
    # prefill runs on its largest P).
    policy = "largest" if options.policy == "waferllm" else options.policy
    best = None
    for s in range(1, min(target.height, target.width, smax) + 1):
        if cfg.norm == "layernorm" and cfg.hidden_size % s:
            continue  # LayerNorm's tiles must not be padded (prefill.prefill_norm)
        if cfg.architecture == "bert" and seq % s:
            continue  # an encoder's keys must not be padded (every token sees every key)
        n = min((target.height // s) * (target.width // s), L + 2)
        counts = _prefill_counts(cfg, target, s, n, seq, algo, margin)
        if counts:
            key = policy_key(policy, counts, s)
            if best is None or key > best[0]:
                best = (key, s, s, counts)
    if best:
        return best[1:]
    s = min(target.height, target.width, smax)
    need = L * prefill_layer_bytes(cfg, s, seq) / max(1, (target.height // s) * (
        target.width // s))
    raise ProgramError(
        f"{cfg.name} prefill of {seq} tokens does not fit {target.name} with policy "
        f"{options.policy}: it needs about {need / 1e3:.1f} KB per core for its layers on "
        f"{s}x{s} grids, cores have {target.sram_bytes / 1e3:.0f} KB")


# ---- lower -------------------------------------------------------------------------------

def lower_prefill(cfg: ModelConfig, width: int, height: int, placements, seq: int, levels: int,
                  gemm_algo: str = "meshgemm", gemv_algo: str = "meshgemv",
                  rows: int | None = None, sample: tuple[int, int] | None = None) -> Stamped:
    """The per-core program of one prefill (see the module docstring): the layer body lowered
    once on the first layer region and stamped onto the others. `rows`: the embedding's row
    blocks per round (default all); `sample`: (short, long) sampled steps, timing only."""
    shape = _shape(cfg, seq)
    plans = [prefill_plan(p.region, width, *shape, gemm_algo) for p in placements]
    home, hp = next((p.region, q) for p, q in zip(placements, plans) if p.count)
    grid = hp.core
    short, long_ = sample or (None, None)
    # the larger first: the builder's peak with least else held
    t = _layer_body(cfg, width, height, home, hp, gemm_algo, long_)
    t_short = None if sample is None else _layer_body(cfg, width, height, home, hp, gemm_algo,
                                                      short)
    glue = ProgramBuilder(width, height, cfg.dtype)
    count = np.ones(width * height, np.int64)
    base = np.zeros(width * height, np.int64)
    offsets, bind, prev = [], [], None
    for p, plan in zip(placements, plans):
        h = _embed(glue, plan, cfg, rows or plan.s) if p.embed else _handoff(glue, prev, plan,
                                                                               EPI)
        prev = (plan, h)
        if p.count:
            offsets.append(int(plan.core[0, 0] - grid[0, 0]))
            bind.append(np.asarray(h).ravel())
            count[plan.core.ravel()] = p.count
            base[plan.core.ravel()] = p.first
        if p.head:
            _head(glue, plan, cfg, h, EPI + 10, levels, gemv_algo)
    glue = glue.build(loop=(LOOP, EPI, count, base))
    glue.meta.update(op="prefill", seq=seq, algo=gemm_algo)
    return Stamped(glue, t, grid.size, np.array(offsets, np.int64), np.array(bind, np.int32),
                   glue.loop_count, glue.loop_base, short=t_short)


def _shape(cfg: ModelConfig, seq: int) -> tuple:
    return (seq, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size)


def _layer_body(cfg: ModelConfig, width: int, height: int, home: Region, hp, gemm_algo: str,
                steps: int | None) -> MeshProgram:
    """One layer on the grid `hp` (prefill_plan) of region `home`, its input tiles (the first
    buffers: the ports) carried back to its output; `steps`: sampled, for timing only."""
    grid = hp.core
    bld = ProgramBuilder(width, height, cfg.dtype)
    h_in = bld.buffers(grid.ravel(), hp.mb, hp.db).reshape(grid.shape)  # the ports
    out, step = prefill_layer(
        bld, home, h_in, *_shape(cfg, hp.seq), LAYER, eps=cfg.norm_eps,
        gated=cfg.gated_mlp, act=model_activation(cfg.hidden_act), qkv_bias=cfg.qkv_bias,
        algo=gemm_algo, step=LOOP, rope="rope" if cfg.position == "rope" else None,
        norm=cfg.norm, bias=cfg.o_proj_bias, post_norm=cfg.architecture == "bert",
        steps=steps)
    if step >= EPI:
        raise ProgramError("prefill layer body too long for the step ranges")
    _carry(bld, grid.ravel(), out, h_in, step)
    prog = bld.build()
    if steps is None:
        return prog
    # Timing only: drop the operands now (half the memory); the buffers go after the checks.
    return dataclasses.replace(prog, meta={**prog.meta, "sampled_steps": steps}, **{
        f: getattr(prog, f)[:0].copy() for f in ("ins_op", "ins_a", "ins_b", "ins_c",
                                                 "ins_imm")})


def layer_alone(cfg: ModelConfig, target: MeshTarget, seq: int, steps: int | None = None,
                gemm_algo: str = "meshgemm") -> MeshProgram:
    """One prefill layer of an S = `seq` token prompt alone on `target`'s whole mesh, a square
    grid (no embedding, hand-offs or LM head; its input tiles are ready at cycle 0), as the
    whole-model prefill lowers its layer body; for timing one layer (wafersim.layer). `steps`:
    sampled steps (timing only: no operands). Its SRAM per core is the layer's alone.

    >>> from compiler.targets import load_target
    >>> from models import load_model
    >>> layer_alone(load_model("tiny-llama"), load_target("test16x16").with_mesh(8, 8),
    ...             32).cores
    64
    """
    s = min(target.width, target.height)
    if s != target.width or s != target.height:
        raise ProgramError(f"prefill layer alone: the mesh must be square, not "
                           f"{target.height}x{target.width}")
    shape = _shape(cfg, seq)
    home = Region(s, s, 0, 0)
    plan = prefill_plan(home, s, *shape, gemm_algo, steps)
    return _layer_body(cfg, s, s, home, plan, gemm_algo, steps)


def _nbytes(bld, elems) -> np.ndarray:
    return np.ceil(np.asarray(elems) * DTYPE_BYTES[bld.dtype]).astype(np.int64)


def _embed(bld: ProgramBuilder, p, cfg: ModelConfig, rows: int) -> np.ndarray:
    """Token ids [S, 1] in at the grid's corner; returns the [s, s] activation tiles. The ids
    are looked up in rounds of `rows` row blocks (module docstring)."""
    s, mb, db = p.s, p.mb, p.db
    vocab = cfg.vocab_size
    if vocab < s:
        raise ProgramError(f"prefill: vocabulary {vocab} smaller than the {s}x{s} grid")
    rounds = math.ceil(s / rows)
    S = rounds * rows * mb  # the ids, padded to whole rounds (id 0 past the prompt)
    phys = np.argsort(p.pos)  # logical index at each physical position
    grid = p.core[phys][:, phys]  # [physical row, physical column]
    lj = np.broadcast_to(phys[None, :], (s, s))  # logical column of each physical core
    ids = np.full((s, s), -1, np.int64)
    ids[0, 0] = bld.buffers(grid[0, 0], S, 1, INPUT, bld.tensor("ids", p.seq, 1))[0]
    nb = _nbytes(bld, [S])
    step = 0
    if s > 1:
        ids[0, 1:] = bld.buffers(grid[0, 1:], S, 1)
        step = line_broadcast(bld, grid[:1], 0, ids[:1, 0], ids[:1], step, _BCAST, nb)
        ids[1:, :] = bld.buffers(grid[1:, :].ravel(), S, 1).reshape(s - 1, s)
        step = line_broadcast(bld, grid.T, 0, ids[0, :], ids.T, step, _BCAST, np.repeat(nb, s))
    v0, vs = split(vocab, s)
    vr = np.broadcast_to(np.arange(s)[:, None], (s, s))
    table = bld.buffers(grid.ravel(), vs[vr].ravel(), db, INPUT,
                        bld.tensor("embed", vocab, cfg.hidden_size), v0[vr].ravel(),
                        (lj * db).ravel()).reshape(s, s)
    n = rows * mb  # token rows a round
    extras = (bld.tensor("pos_embed", cfg.max_position_embeddings, cfg.hidden_size)
              if cfg.position == "learned" else None,
              bld.tensor("type_embed", cfg.type_vocab_size, cfg.hidden_size)
              if cfg.architecture == "bert" else None)
    chunk = bld.buffers(grid.ravel(), n, 1).reshape(s, s) if rounds > 1 else ids
    part = bld.buffers(grid.ravel(), n, db).reshape(s, s)
    tmp = bld.like(part)
    root = 0
    h = bld.buffers(p.core.ravel(), mb, db).reshape(s, s)
    at = None
    for r in range(rounds):
        if rounds > 1:
            bld.compute(grid.ravel(), step, OP_TAKE, c=chunk.ravel(), a=ids.ravel(),
                        imm=(r * n, 0.0))
            step += 1
        bld.compute(grid.ravel(), step, OP_LOOKUP, c=part.ravel(), a=chunk.ravel(),
                    b=table.ravel(), imm=(v0[vr].ravel(), 0.0))
        if s > 1:
            root, step = ktree_reduce(bld, grid.T, part.T, tmp.T, step + 1, 2, _RED,
                                      np.full(s, _nbytes(bld, n * db)))
        else:
            step += 1
        src = grid[root]  # [s] root core of every physical column
        if at is None:  # the scatter's tiles, reused by every round
            at = [bld.buffers(src, mb, db) for _ in range(rows)]
        step = _embed_extras(bld, extras, src, part[root], phys, db, r * n, n, step)
        # Scatter: the root of physical column c takes row block i and sends it to (i, j).
        ir = phys[root]  # logical row of the root
        for i in range(r * rows, min(s, (r + 1) * rows)):
            tile = h[i, phys] if i == ir else at[i - r * rows]
            bld.compute(src, step, OP_TAKE, c=tile, a=part[root],
                        imm=((i - r * rows) * mb * db, 0.0))
            if i != ir:
                dst = p.core[i, phys]
                msgs = bld.messages(src, dst, _nbytes(bld, mb * db), _SCATTER)
                bld.send(src, step + 1, msgs, tile)
                bld.recv(dst, step + 2, msgs, h[i, phys])
        step += 3
    if cfg.architecture == "bert":  # BERT normalises the embeddings
        h, _ = prefill_norm(bld, p, h, "embed_norm", cfg.norm_eps, step, cfg.norm)
    return h


def _embed_extras(bld, tensors, cores, part, phys, db: int, r0: int, n: int, step: int) -> int:
    """+ the rows of positions r0..r0+n-1 (learned positions) and token type 0's row (BERT),
    tensors (pos_embed, type_embed) or None, on each column's root; returns the next step."""
    pos, kind = tensors
    if pos is not None:
        table = bld.buffers(cores, n, db, INPUT, pos, r0, phys * db)
        bld.compute(cores, step, OP_ADD, c=part, a=part, b=table)
        step += 1
    if kind is not None:
        row = bld.buffers(cores, 1, db, INPUT, kind, 0, phys * db)
        bld.compute(cores, step, OP_ADD, c=part, a=part, b=row)
        step += 1
    return step


def _handoff(bld: ProgramBuilder, prev, p, send_step: int) -> np.ndarray:
    """h from the previous region: each grid core's tile to the same logical core here."""
    pp, ph = prev
    h = bld.buffers(p.core.ravel(), p.mb, p.db).reshape(p.s, p.s)
    msgs = bld.messages(pp.core.ravel(), p.core.ravel(), _nbytes(bld, p.mb * p.db), _HANDOFF)
    bld.send(pp.core.ravel(), send_step, msgs, np.asarray(ph).ravel())
    bld.recv(p.core.ravel(), 0, msgs, h.ravel())
    return h


def _head(bld: ProgramBuilder, p, cfg: ModelConfig, h, step: int, levels: int, algo: str):
    """Final norm, LM head and argmax of the last prompt token."""

    s, db, d = p.s, p.db, cfg.hidden_size
    ir, rr = divmod(p.seq - 1, p.mb)
    phys = np.argsort(p.pos)
    row = p.core[ir, phys]  # the token's grid row, in physical order
    x = bld.buffers(row, 1, db)
    bld.compute(row, step, OP_TAKE, c=x, a=h[ir, phys], imm=(rr * db, 0.0))
    bert = cfg.architecture == "bert"  # no final norm: the last layer ends with one
    if cfg.norm == "layernorm" and not bert:  # minus the mean, all-reduced along the row
        neg, mean = bld.buffers(row, db, 1), bld.buffers(row, 1, 1)
        bld.compute(row, step + 1, OP_FILL, c=neg, imm=(-1.0 / d, 0.0))
        bld.compute(row, step + 1, OP_ZERO, c=mean)
        bld.compute(row, step + 2, OP_MATMUL_ACC, c=mean, a=x, b=neg)
        step = _allreduce(bld, row[None, :], mean[None, :], bld.like(mean)[None, :], step + 3,
                          _nbytes(bld, [1]))
        bld.compute(row, step, OP_ADD, c=x, a=x, b=mean)
    xn, step = x, step + 1
    if not bert:
        ss = bld.buffers(row, 1, 1)
        bld.compute(row, step, OP_SQSUM, c=ss, a=x)
        step = _allreduce(bld, row[None, :], ss[None, :], bld.like(ss)[None, :], step + 1,
                          _nbytes(bld, [1]))
        gw = bld.buffers(row, 1, db, INPUT, bld.tensor("final_norm", 1, d), 0, phys * db)
        xn = bld.like(x)
        bld.compute(row, step, OP_RSQRT, c=ss, a=ss, imm=(1.0 / d, cfg.norm_eps))
        bld.compute(row, step + 1, OP_MUL, c=xn, a=x, b=ss)
        bld.compute(row, step + 2, OP_MUL, c=xn, a=xn, b=gw)
        step += 3
        if cfg.norm == "layernorm":
            beta = bld.buffers(row, 1, db, INPUT, bld.tensor("final_norm_bias", 1, d), 0,
                               phys * db)
            bld.compute(row, step, OP_ADD, c=xn, a=xn, b=beta)
            step += 1
    # Multicast the normalised row down every column: decode's GEMV layout on the grid.
    xb = np.full((s, s), -1, np.int64)  # [physical row, physical column]
    xb[p.pos[ir], :] = xn
    others = np.delete(np.arange(s), p.pos[ir])
    if len(others):
        xb[others, :] = bld.buffers(p.core[phys][:, phys][others].ravel(), 1, db).reshape(
            len(others), s)
        step = line_broadcast(bld, p.core[phys][:, phys].T, int(p.pos[ir]), xn, xb.T, step,
                              _BCAST, np.full(s, _nbytes(bld, db)))
    y0, x0 = divmod(int(p.core[phys[0], phys[0]]), bld.width)
    sub = Region(s, s, x0, y0)
    logits, step = gemv(bld, sub, 1, d, cfg.vocab_size, algo if algo in GEMV_ALGOS else
                        "meshgemv", k_axis="cols", x=xb, names=(None, "lm_head", "logits"),
                        allreduce=False, step=step, k_split=(phys * db, np.full(s, db)),
                        levels=levels)
    _argmax(bld, sub.cores(bld.width), logits, cfg.vocab_size, 1, step, levels)


# ---- inputs and outputs ------------------------------------------------------------------

def pack_prefill_inputs(compiled, weights: dict[str, np.ndarray], ids) -> dict[str, np.ndarray]:
    """The prefill program's inputs from models.reference weights and the prompt ids [S]
    (or [1, S])."""
    cfg = compiled.model
    ids = np.asarray(ids).reshape(-1)
    if len(ids) != compiled.ctx:
        raise ValueError(f"prompt of {len(ids)} tokens; the program prefills {compiled.ctx}")
    p = compiled.placements[0].region
    plan = prefill_plan(p, compiled.program.width, compiled.ctx, cfg.hidden_size,
                        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                        cfg.intermediate_size, algos(compiled.options)[0])
    mask = causal_mask(plan)
    if cfg.architecture == "bert":  # an encoder: every token sees every token
        mask = np.zeros_like(mask)
    out = {"ids": ids.astype(np.float32).reshape(-1, 1), "embed": weights["embed"],
           "lm_head": weights["lm_head"], "causal_mask": mask}
    if cfg.position == "rope":
        out["rope"] = rope_table(compiled.ctx, cfg.head_dim, cfg.rope_theta)
    for name in ("pos_embed", "final_norm", "final_norm_bias", "type_embed", "embed_norm",
                 "embed_norm_bias"):
        if name in weights:
            out[name] = weights[name]
    for layer in range(cfg.num_hidden_layers):
        out |= pack_weights(weights, f"layers.{layer}", cfg.num_attention_heads,
                            cfg.num_key_value_heads, cfg.head_dim)
    return out


def unpack_caches(compiled, outputs: dict[str, np.ndarray]) -> tuple[list, list]:
    """Per layer K (after RoPE) and V caches [1, S, KV*hd] in model order, from the program's
    outputs "layers.{l}.k_cache" / "v_cache" (as models.reference.forward caches them, and as
    compiler.model.pack_inputs takes them for the decode step that follows)."""
    cfg = compiled.model
    ks, vs = [], []
    for layer in range(cfg.num_hidden_layers):
        k = outputs[f"layers.{layer}.k_cache"]
        ks.append(unpack_k_cache(k, cfg.num_key_value_heads, cfg.head_dim)[None])
        vs.append(np.asarray(outputs[f"layers.{layer}.v_cache"])[None])
    return ks, vs
