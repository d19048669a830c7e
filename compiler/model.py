"""compile_model: a whole decoder-only model's decode step, placed on a wafer.

Decode covers the LLaMA family (RMSNorm, RoPE, GQA, SwiGLU, optional q/k/v bias) and GPT-2
style models (LayerNorm with bias, learned absolute positions whose row for position ctx is
looked up from a table split like the embedding's and added to the token's row, no RoPE,
biases on every projection, a plain GELU MLP, tied or separate LM head: a tied head is stored
as its own copy, embed.T, on the last region). Prefill lowers the LLaMA family only; BERT, an
encoder, is refused.

(A prefill graph, one prompt of batch 1, goes to compiler.prefill_model: the same placement
with prefill's 2D activation tiles and GEMMs; see its docstring.)

Passes (pure functions; the data flows top to bottom):
- `partition`: the region shape every layer runs on and how many regions the layers are
  spread over, by policy (below), checked against SRAM with `memory_per_core`;
- `place`: regions tiled over the wafer in serpentine order (consecutive regions touch),
  layers split over them, the embedding table on the first and the LM head on the last (or,
  in the tight fallback below, a slice of each on every region);
- `lower`: per-core instruction streams. Each region's cores run [receive h | embed] ->
  one layer, looped once per layer the region holds -> [send h on | norm, LM head, argmax].
  Every layer of a region runs the same instructions on its own weights (tensor names
  "layers.{l}.*"), so the layers are identical by construction and the loop is the proof;
- `check`: SRAM per core (weights and caches once per layer of the loop), colours per router.

Policies (each searches the grids of equal regions that tile the wafer and fit its SRAM):
- "waferllm" (default): the shape with the least estimated step time (compiler.estimate, in
  closed form from the target's constants and the lowering's message pattern), as WaferLLM
  sweeps its grid size P for the fastest. At batch 1 a larger region gives each GEMV more
  cores but longer reductions, so the best shape lies in between (LLaMA-3-8B on WSE-2:
  8 regions of 497x187 with 4 layers each).
- "pipeline": as many regions as fit (at most one per layer, plus one for each vocabulary table
  where a table needs a region of its own), so layers are stacked as little as possible.
- "largest": the largest regions that fit (fewest regions, most stacking).

Where no grid fits, the partition falls back to "tight" placements (`region_caps`): each
vocabulary table is spread over all the regions, a slice of its rows each, so it no longer
costs one region a whole layer or more, and the estimate keeps no reserve (the exact check
after lowering decides). A spread embedding looks each id up in every slice and sums the
partial rows region to region into the first; a spread head sends the normalised h back
region to region, each region computes its slice's logits and argmax, and the (value, id)
pairs are reduced along the same chain (`_embed_spread`, `_head_spread`). Qwen2-72B over four
WSE-3s needs it on its first and last wafer (docs/multiwafer.md). A model that fits without it
keeps its placement.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import networkx as nx
import numpy as np

from compiler import kvcache, quant
from compiler.algorithms.allreduce import ktree_reduce, line_broadcast
from compiler.algorithms.attention import attention_block, head_layout, pack_cache
from compiler.algorithms.common import Region, split
from compiler.algorithms.fff import draw_paths, fff_block
from compiler.algorithms.meshgemm import GEMM_ALGOS
from compiler.algorithms.meshgemv import gemv
from compiler.algorithms.mlp import ACTIVATIONS, mlp_block, model_activation
from compiler.algorithms.norm import norm
from compiler.estimate import step_cycles
from compiler.program import (
    INPUT,
    OP_ADD,
    OP_ARGMAX,
    OP_ARGMAX2,
    OP_COPY,
    OP_FILL,
    OUTPUT,
    MeshProgram,
    ProgramBuilder,
    ProgramError,
)
from compiler.quant import CACHE, HEAD, TABLE, Scheme, stored_bytes
from compiler.sparsity import ActSparsity
from compiler.stamp import Stamped
from compiler.targets import DTYPE_BYTES, MeshTarget
from models.config import ModelConfig
from models.reference import rope_angles

POLICIES = ("waferllm", "pipeline", "largest")
# The GEMV reductions compiler.estimate models (meshgemv's "pipeline" runs in `wafersim op`).
MODEL_GEMV_ALGOS = ("meshgemv", "ring")
LAYER = "layers.{l}"
# Steps: TABLES <= spread tables' lookups < 0 <= prologue < LOOP <= layer loop < EPI <= epilogue.
TABLES, LOOP, EPI = -1_000_000, 1_000_000, 2_000_000
RETRIES = 4  # placements tried when the exact SRAM check refuses the estimate's choice
RESERVE = 0.97  # share of SRAM the partition's estimate fills (the rest covers its error)


@dataclass(frozen=True)
class CompileOptions:
    """What to compile. `capacity`: KV tokens per sequence the caches hold (default ctx + 1).
    `quant`, `kv_dtype`: how weights and KV caches are stored (None: the model's dtype), with
    a scale per `quant_group` elements; `prune`: "2:4" or a density (compiler.quant)."""

    policy: str = "waferllm"
    algo: str = "meshgemv"
    levels: int = 2
    capacity: int | None = None
    region: tuple[int, int] | None = None  # (rows, cols) of every region, overriding the policy
    quant: str | None = None
    kv_dtype: str | None = None
    quant_group: int = 128
    prune: str | None = None
    # Activation sparsity: a density spec and the seed of the active neurons' draw
    # (compiler.sparsity); the MLP's down projection skips the inactive ones.
    act_density: str | None = None
    act_seed: int = 0
    # A fast feed-forward model's path through each tree (compiler.algorithms.fff): per
    # sequence, the node visited at each level (the data's path); None: a draw with fff_seed.
    fff_paths: tuple[tuple[int, ...], ...] | None = None
    fff_seed: int = 0
    # A pipeline stage of a model split over several wafers (compiler.multiwafer): without the
    # embedding, h enters as input "h" on the first region's top row; without the head, the
    # last region's h leaves as output "h" from its top row.
    embed: bool = True
    head: bool = True

    @property
    def ends(self) -> tuple[bool, bool]:
        """(embedding, head): which ends of the model this step holds."""
        return self.embed, self.head


@dataclass(frozen=True)
class Placement:
    """A region and the consecutive layers it holds."""

    region: Region
    first: int
    count: int
    embed: bool
    head: bool


@dataclass(frozen=True, eq=False)
class CompiledModel:
    """A compiled step. `code` is what the layout file stores: the program, or (decode) its
    stamped parts, expanded into `program` when first asked for."""

    code: MeshProgram | Stamped
    model: ModelConfig
    target: MeshTarget
    options: CompileOptions
    phase: str
    batch: int
    ctx: int
    slots: int
    placements: tuple[Placement, ...]
    memory: dict = field(default_factory=dict)

    @cached_property
    def program(self) -> MeshProgram:
        return self.code.expand() if isinstance(self.code, Stamped) else self.code

    def info(self) -> dict:
        """What a layout file records next to the program."""
        return dict(model=self.model.to_dict(), model_name=self.model.name,
                    target=self.target.to_dict(), phase=self.phase, batch=self.batch,
                    ctx=self.ctx, slots=self.slots, options=vars(self.options),
                    placements=[dict(rows=p.region.rows, cols=p.region.cols, x0=p.region.x0,
                                     y0=p.region.y0, first=p.first, count=p.count,
                                     embed=p.embed, head=p.head) for p in self.placements],
                    memory=self.memory)


def compile_model(graph: nx.DiGraph, target: MeshTarget,
                  options: CompileOptions = CompileOptions()) -> CompiledModel:
    """Place and lower the step `graph` (models.build_graph) on `target`."""
    cfg: ModelConfig = graph.graph["cfg"]
    phase, batch, ctx = graph.graph["phase"], graph.graph["batch"], graph.graph["ctx_len"]
    _check_supported(cfg, phase, options)
    s = scheme_of(cfg, phase, options)
    if cfg.position == "learned" and ctx + 1 > cfg.max_position_embeddings:
        raise ProgramError(f"{cfg.name}: position {ctx} is past the learned position table's "
                           f"{cfg.max_position_embeddings} rows (max_position_embeddings)")
    if phase == "prefill":
        from compiler.prefill_model import compile_prefill

        return compile_prefill(graph, target, options)
    capacity = ctx + 1 if options.capacity is None else options.capacity
    if capacity < ctx + 1:
        raise ProgramError(f"capacity {capacity} must hold the cached {ctx} tokens and the new "
                           "one")
    # The partition's memory estimate ranks the placements; the exact check after lowering
    # decides. A placement the estimate let through but the check refuses gives way to the
    # next one (a few at most).
    error = None
    for rows, cols, counts, tight in partition(cfg, target, batch, capacity, options,
                                               s)[:RETRIES]:
        placements = place(target, rows, cols, counts, options.ends, tight)
        slots = math.ceil(capacity / cols)
        code = lower(cfg, target.width, target.height, placements, batch, ctx, slots, options)
        if not s.dense:  # the same numbers, stored and moved in fewer bytes
            code = dataclasses.replace(code, glue=quant.apply(code.glue, s, target),
                                       body=quant.apply(code.body, s, target))
        stored = dataclasses.replace(code, glue=quant.storage_view(code.glue, s),
                                     body=quant.storage_view(code.body, s))
        try:
            stored.check(target, f"{cfg.name} {phase}")
            break
        except ProgramError as e:
            error = error or e
    else:
        raise error
    sram = stored.sram_per_core()
    free = target.sram_bytes - int(sram.max())
    per_token = slot_bytes(cfg, rows, max(p.count for p in placements), batch, s)
    per_core = slots + free // per_token  # cache slots (tokens) the busiest core can hold
    memory = dict(sram_max_bytes=int(sram.max()), sram_limit_bytes=target.sram_bytes,
                  sram_mean_bytes=float(sram[sram > 0].mean()),
                  max_ctx=int(per_core * cols) - 1,
                  max_batch=max_batch(cfg, target, rows, cols, len(counts), capacity, batch, s,
                                      options.ends, tight),
                  **kvcache.report(cols, per_core, ctx))
    if not s.dense:  # the same placement, stored dense: the program's own buffer sizes
        memory["quant"] = dict(scheme=s.label(), **capacity_gain(
            cfg, target, rows, cols, placements, batch, capacity, slots, options,
            {"dense": int(code.sram_per_core().max()), "quant": int(sram.max())}, s, tight))
    return CompiledModel(code, cfg, target, options, phase, batch, ctx, slots,
                         tuple(placements), memory)


def scheme_of(cfg: ModelConfig, phase: str, options: CompileOptions) -> Scheme:
    """The options' storage scheme (compiler.quant), refused where it is not lowered."""
    try:
        s = quant.of(options, cfg.dtype)
    except ValueError as e:
        raise ProgramError(str(e)) from None
    if not s.dense and phase != "decode":
        raise ProgramError("--quant, --kv-dtype and --prune are lowered for decode only "
                           "(prefill keeps the model's dtype, dense)")
    return s


def capacity_gain(cfg: ModelConfig, target: MeshTarget, rows: int, cols: int, placements,
                  batch: int, capacity: int, slots: int, options: CompileOptions,
                  sram_max: dict, s: Scheme, tight: bool = False) -> dict:
    """What scheme `s` buys on this placement, stored in the model's dtype ("dense") and as `s`
    ("quant"), from the busiest core's SRAM of each (`sram_max`): whether it fits (dense and not
    here: on any placement, by the partition's estimate), the largest context (as
    compile_model's max_ctx) and the largest batch (by the partition's estimate, at least the
    step's); None where it does not fit this placement."""
    out, n = {}, len(placements)
    layers = max(p.count for p in placements)
    for key, sch in (("dense", quant.scheme(cfg.dtype, group=s.group)), ("quant", s)):
        free = target.sram_bytes - sram_max[key]
        here = free >= 0
        out[key] = dict(
            fits=here or any(True for _ in _candidates(cfg, target, batch, capacity, sch,
                                                       options.ends)),
            max_ctx=(slots + free // slot_bytes(cfg, rows, layers, batch, sch)) * cols - 1
            if here else None,
            max_batch=max_batch(cfg, target, rows, cols, n, capacity, batch, sch, options.ends,
                                tight) if here else None)
    return out


def _check_supported(cfg: ModelConfig, phase: str, options: CompileOptions) -> None:
    if phase not in ("decode", "prefill"):
        raise ProgramError(f"phase {phase!r}: the whole-model compiler lowers decode and "
                           "prefill")
    if cfg.architecture == "bert" and phase == "decode":
        raise ProgramError(f"{cfg.name}: BERT is an encoder (bidirectional, no token-by-token "
                           "decode); compile its prefill (--phase prefill): one pass over the "
                           "whole input")
    if phase == "prefill" and cfg.o_proj_bias != cfg.mlp_bias:
        raise ProgramError(f"{cfg.name}: o_proj_bias={cfg.o_proj_bias}, mlp_bias="
                           f"{cfg.mlp_bias}; prefill lowers both biases or neither")
    if cfg.norm not in ("rmsnorm", "layernorm") or cfg.position not in ("rope", "learned"):
        raise ProgramError(f"{cfg.name}: norm={cfg.norm!r}, position={cfg.position!r}; the "
                           "compiler lowers rmsnorm or layernorm with rope or learned positions")
    if model_activation(cfg.hidden_act) not in ACTIVATIONS:
        raise ProgramError(f"{cfg.name}: hidden_act {cfg.hidden_act!r} is not one of "
                           f"{', '.join(ACTIVATIONS)}")
    algos = MODEL_GEMV_ALGOS + (GEMM_ALGOS if phase == "prefill" else ())
    if options.algo not in algos:
        raise ProgramError(f"algo {options.algo!r} is not one of {', '.join(algos)} (the "
                           "whole-model compiler's placement estimate models these)")
    if options.policy not in POLICIES:
        raise ProgramError(f"policy {options.policy!r} is not one of {', '.join(POLICIES)}")
    if cfg.fff_depth is not None and (phase != "decode" or options.act_density is not None):
        raise ProgramError(f"{cfg.name}: fff_depth={cfg.fff_depth}: the compiler lowers fast "
                           "feed-forward layers in decode, without --act-density")
    if options.act_density is not None:
        if phase != "decode":
            raise ProgramError("--act-density: the compiler lowers activation sparsity in "
                               "decode only")
        try:
            ActSparsity(options.act_density, options.act_seed).densities(cfg.num_hidden_layers)
        except ValueError as e:
            raise ProgramError(str(e)) from None


# ---- partition ---------------------------------------------------------------------------

def _matrices(cfg: ModelConfig) -> list[tuple[int, int, str]]:
    """A layer's weight matrices as (K, N, which region axis K runs over)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    mats = [(d, q, "cols"), (d, kv, "cols"), (d, kv, "cols"), (q, d, "rows")]
    if cfg.fff_depth is not None:  # each row holds its nodes' chunks of fff_in and fff_out
        return mats + [(d, cfg.fff_nodes, "cols"), (cfg.fff_nodes, d, "rows")]
    mats += [(d, f, "cols"), (f, d, "rows")]
    return mats + ([(d, f, "cols")] if cfg.gated_mlp else [])


def _tile(k: int, n: int, axis: str, rows: int, cols: int) -> tuple[int, int]:
    """[K, N] of the largest tile of a [k, n] matrix on a rows x cols region."""
    kr, nr = (rows, cols) if axis == "rows" else (cols, rows)
    return math.ceil(k / min(kr, k)), math.ceil(n / min(nr, n))


def _scheme(cfg: ModelConfig, s: Scheme | None) -> Scheme:
    return quant.scheme(cfg.dtype) if s is None else s


def _kv_bytes_per_slot(cfg: ModelConfig, rows: int, layers: int, batch: int,
                       s: Scheme | None = None) -> int:
    """SRAM one more cache slot (per column) costs the busiest core: K and V rows, all layers."""
    lay = head_layout(rows, cfg.num_key_value_heads,
                      cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim)
    s, n = _scheme(cfg, s), lay.nh * layers * batch
    per_row = stored_bytes(s, CACHE, n, lay.ne) + stored_bytes(s, CACHE, n, lay.ne + 1)
    return max(1, int(per_row.max()))


def slot_bytes(cfg: ModelConfig, rows: int, layers: int, batch: int,
               s: Scheme | None = None) -> int:
    """SRAM one more cache slot costs the busiest core of a lowered step: the K/V rows of
    every layer, and the attention scores over the slots with their reduction's receive
    buffer (scratch, once: G query heads per KV head a row holds, per sequence)."""
    lay = head_layout(rows, cfg.num_key_value_heads,
                      cfg.num_attention_heads // cfg.num_key_value_heads, cfg.head_dim)
    scores = 2 * lay.g * int(lay.nh.max()) * batch * DTYPE_BYTES[cfg.dtype]
    return _kv_bytes_per_slot(cfg, rows, layers, batch, s) + math.ceil(scores)


def _vectors(cfg: ModelConfig, rows: int, cols: int) -> int:
    """Elements of a layer's norm weights (and LayerNorm biases) and projection biases on the
    busiest core: vectors over d are split over columns, those over q / kv / f over rows."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    dc = math.ceil(d / cols)
    elems = (4 if cfg.norm == "layernorm" else 2) * dc
    if cfg.qkv_bias:  # each row holds its heads' slices of q, k and v
        g = cfg.num_attention_heads // cfg.num_key_value_heads
        lay = head_layout(rows, cfg.num_key_value_heads, g, hd)
        elems += int((lay.columns(g) + 2 * lay.columns(1)).max())
    if cfg.o_proj_bias:
        elems += dc
    if cfg.mlp_bias and cfg.fff_depth is None:  # (a fast feed-forward tree has none)
        elems += (2 if cfg.gated_mlp else 1) * math.ceil(f / min(rows, f)) + dc
    return elems


@lru_cache(maxsize=8192)
def layer_bytes(cfg: ModelConfig, rows: int, cols: int, batch: int, slots: int,
                s: Scheme | None = None) -> int:
    """Bytes one layer puts on the busiest core of a region: weight tiles (as `s` stores them),
    norms, biases, its caches. (Cached: the partitions of a model over several wafers ask for
    every region shape several times.)"""
    s = _scheme(cfg, s)
    tiles = [_tile(k, n, axis, rows, cols) for k, n, axis in _matrices(cfg)[4:]]
    # q, k, v and o follow the head layout: a row may hold more of them than an even share.
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    lay = head_layout(rows, cfg.num_key_value_heads, g, cfg.head_dim)
    dc = math.ceil(cfg.hidden_size / min(cols, cfg.hidden_size))
    q, kv = int(lay.columns(g).max()), int(lay.columns(1).max())
    tiles += [(dc, q), (dc, kv), (dc, kv), (q, dc)]
    weights = sum(int(stored_bytes(s, quant.PROJ, k, n)) for k, n in tiles)
    return (weights + math.ceil(_vectors(cfg, rows, cols) * DTYPE_BYTES[cfg.dtype])
            + slots * _kv_bytes_per_slot(cfg, rows, 1, batch, s))


def _gemv_scratch(k: int, n: int, axis: str, rows: int, cols: int) -> int:
    """Elements of a GEMV's activation buffers on a core: input slice, partial sum, receive
    buffer."""
    kr, nr = (rows, cols) if axis == "rows" else (cols, rows)
    return math.ceil(k / min(kr, k)) + 2 * math.ceil(n / min(nr, n))


def scratch_bytes(cfg: ModelConfig, rows: int, cols: int, batch: int, head: bool,
                  parts: int = 1) -> int:
    """Estimated activation (scratch) bytes on a core of a layer region, reused by every layer:
    twice the GEMVs' buffers (norms, attention and residuals add about as much again, as
    measured on LLaMA shapes); plus the LM head's logits when the region holds the head (or,
    spread over `parts` regions, its slice). The exact figure is checked after lowering."""
    elems = 2 * sum(_gemv_scratch(k, n, axis, rows, cols) for k, n, axis in _matrices(cfg))
    if head:
        elems += _gemv_scratch(cfg.hidden_size, math.ceil(cfg.vocab_size / parts), "cols",
                               rows, cols)
    return math.ceil(elems * batch * DTYPE_BYTES[cfg.dtype])


def table_bytes(cfg: ModelConfig, rows: int, cols: int, head: bool = False,
                s: Scheme | None = None, parts: int = 1) -> int:
    """Bytes of the first region's tables (the embedding, and a learned position table) or,
    with `head`, of the last region's (the LM head, a tied one stored as its own copy, and
    the final norm) on the busiest core of a region, as `s` stores them; with `parts`, of
    one region's slice where the tables are spread over that many regions (`spread_tables`)."""
    s, d = _scheme(cfg, s), cfg.hidden_size
    if head:
        return int(stored_bytes(s, HEAD, *_tile(d, math.ceil(cfg.vocab_size / parts), "cols",
                                                rows, cols))) + \
            math.ceil((2 if cfg.norm == "layernorm" else 1) * math.ceil(d / cols)
                      * DTYPE_BYTES[cfg.dtype])
    out = int(stored_bytes(s, TABLE, *_tile(math.ceil(cfg.vocab_size / parts), d, "rows", rows,
                                            cols)))
    if cfg.position == "learned":
        out += int(stored_bytes(s, TABLE, *_tile(math.ceil(cfg.max_position_embeddings / parts),
                                                 d, "rows", rows, cols)))
    return out


def distribute(layers: int, caps: list[int]) -> list[int] | None:
    """Consecutive layer counts per region within each region's capacity, the largest count
    as small as possible; None if the capacities cannot hold every layer."""
    if sum(caps) < layers:
        return None
    m = next(m for m in range(1, layers + 1) if sum(min(c, m) for c in caps) >= layers)
    counts = [min(c, m) for c in caps]
    surplus = sum(counts) - layers
    n = len(counts)
    for k in dict.fromkeys([0, n - 1, *range(n - 2, 0, -1)]):  # lighten the table regions first
        take = min(surplus, counts[k])
        counts[k] -= take
        surplus -= take
    return counts


def _max_rows(cfg: ModelConfig) -> int:
    return cfg.num_key_value_heads * cfg.head_dim // 2


def spread_tables(cfg: ModelConfig, rows: int, n: int) -> bool:
    """Whether n regions of `rows` rows can share the vocabulary tables, each region holding
    a slice of at least a row per core row (of the position table too, where it has one)."""
    vocab = min(cfg.vocab_size, cfg.max_position_embeddings if cfg.position == "learned"
                else cfg.vocab_size)
    return n > 1 and vocab // n >= rows


def region_caps(cfg, target, rows, cols, n, batch, capacity, s=None, ends=(True, True),
                tight=False):
    """The most layers each of n regions of rows x cols holds by estimate (None: the tables
    and activations alone do not fit). `ends`: whether the step holds the embedding and the
    head (CompileOptions.ends). `tight`: the partition's fallback where nothing fits
    otherwise: the tables spread over all n regions (a slice of the vocabulary each) and no
    reserve kept for the estimate's error (the exact check after lowering decides)."""
    if tight and not spread_tables(cfg, rows, n):
        return None
    limit = (1.0 if tight else RESERVE) * target.sram_bytes
    parts = n if tight else 1
    per = layer_bytes(cfg, rows, cols, batch, math.ceil(capacity / cols), s)
    embed = table_bytes(cfg, rows, cols, s=s, parts=parts) if ends[0] else 0
    scratch = scratch_bytes(cfg, rows, cols, batch, False)
    head = (table_bytes(cfg, rows, cols, True, s, parts)
            + scratch_bytes(cfg, rows, cols, batch, True, parts) - scratch) if ends[1] else 0
    extra = [scratch + embed * (tight or k == 0) + head * (tight or k == n - 1)
             for k in range(n)]
    if max(extra) > limit:
        return None
    return [int((limit - e) // per) for e in extra]


def _counts(cfg, target, rows, cols, n, batch, capacity, s=None, ends=(True, True),
            tight=False):
    """Layer counts for n regions of rows x cols, or None when they do not fit."""
    caps = region_caps(cfg, target, rows, cols, n, batch, capacity, s, ends, tight)
    return None if caps is None else distribute(cfg.num_hidden_layers, caps)


def max_batch(cfg: ModelConfig, target: MeshTarget, rows: int, cols: int, n: int,
              capacity: int, batch: int, s: Scheme | None = None, ends=(True, True),
              tight: bool = False) -> int:
    """The largest batch whose KV caches and activations fit n regions of rows x cols at this
    capacity, by the partition's estimate (at least `batch`, which was checked exactly)."""
    return _largest(lambda b: _counts(cfg, target, rows, cols, n, b, capacity, s, ends, tight)
                    is not None, batch)


def _largest(fits, lo: int, most: int | None = None) -> int:
    """The largest b >= lo (at most `most`) with fits(b), for a monotone `fits` that holds at
    lo: doubling, then bisection."""
    hi = 2 * lo
    while (most is None or hi <= most) and fits(hi):
        lo, hi = hi, 2 * hi
    if most is not None:
        hi = min(hi, most + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def largest_batch(cfg: ModelConfig, target: MeshTarget, capacity: int,
                  s: Scheme | None = None, most: int = 1024) -> int:
    """The largest decode batch (at most `most`) whose caches of `capacity` tokens a sequence
    fit some placement on `target`, by the partition's estimate (0: not even one). As in the
    partition, the tight placements count only where no other holds one sequence."""
    for tight in (False, True):
        def fits(b: int, tight=tight) -> bool:
            return next(_candidates(cfg, target, b, capacity, s, tight=tight), None) is not None

        if fits(1):
            return _largest(fits, 1, most)
    return 0


def forced_regions(target: MeshTarget, rows: int, cols: int, layers: int) -> int:
    """How many regions of rows x cols `--region` gives (at most one per layer and table)."""
    n = (target.height // rows) * (target.width // cols)
    if n < 1:
        raise ProgramError(f"region {rows}x{cols} (rows x cols) does not fit "
                           f"{target.name}'s {target.height}x{target.width} mesh")
    return min(n, layers + 2)


def policy_key(policy: str, counts: list[int], size: int) -> tuple:
    """Larger is better. largest: the largest regions; pipeline: the least stacking, then
    the largest. (waferllm ranks by estimated time; see `partition`.)"""
    return (size,) if policy == "largest" else (-max(counts), size)


def _candidates(cfg: ModelConfig, target: MeshTarget, batch: int, capacity: int,
                s: Scheme | None = None, ends=(True, True), tight: bool = False):
    """(rows, cols, layers per region) of the grids of equal regions that tile the wafer and
    fit its SRAM by estimate (`tight`: as region_caps says), one by one."""
    for rows, cols, n in grids(cfg, target):
        counts = _counts(cfg, target, rows, cols, n, batch, capacity, s, ends, tight)
        if counts:
            yield rows, cols, tuple(counts)


def grids(cfg: ModelConfig, target: MeshTarget):
    """(rows, cols, regions) of each grid of equal regions that tiles the wafer: gr x gc of
    them, at most one per layer and table, rows within the head layout's and d's limits."""
    L = cfg.num_hidden_layers
    for gr in range(1, L + 3):
        for gc in range(1, L + 3):
            rows = min(target.height // gr, _max_rows(cfg), cfg.hidden_size)
            cols = min(target.width // gc, cfg.hidden_size)
            if rows >= 1 and cols >= 1:
                yield rows, cols, min(gr * gc, L + 2)


def partition(cfg: ModelConfig, target: MeshTarget, batch: int, capacity: int,
              options: CompileOptions, s: Scheme | None = None
              ) -> list[tuple[int, int, list[int], bool]]:
    """(rows, cols, layers per region, tight) of the placements the policy allows, best first,
    among the grids of regions that tile the wafer and fit its SRAM by estimate (weights and
    caches stored as `s` stores them). waferllm: by least estimated step time
    (compiler.estimate, in closed form from the target and the lowering, as WaferLLM sweeps
    its grid size P). Only where no placement fits are the `tight` ones tried (region_caps:
    the vocabulary tables spread over every region, no reserve), so a model that fits keeps
    its placement."""
    L, ends = cfg.num_hidden_layers, options.ends
    if options.region is not None:
        rows, cols = options.region
        n = forced_regions(target, rows, cols, L)
        for tight in (False, True):
            counts = _counts(cfg, target, rows, cols, n, batch, capacity, s, ends, tight)
            if counts is not None:
                return [(rows, cols, counts, tight)]
        raise ProgramError(f"{cfg.name} does not fit {n} regions of {rows}x{cols} (rows x "
                           f"cols) cores: {target.sram_bytes:,} B of SRAM per core")
    tight = False
    candidates = dict.fromkeys(_candidates(cfg, target, batch, capacity, s, ends))
    if not candidates:
        tight = True
        candidates = dict.fromkeys(_candidates(cfg, target, batch, capacity, s, ends, True))
    if not candidates:
        need = (L * layer_bytes(cfg, 1, 1, batch, capacity, s)
                + table_bytes(cfg, 1, 1, s=s) * ends[0] + table_bytes(cfg, 1, 1, True, s) * ends[1])
        raise ProgramError(
            f"{cfg.name} does not fit {target.name} with policy {options.policy}: it needs "
            f"about {need / (target.width * target.height * 1e3):.1f} KB per core over all "
            f"{target.width * target.height:,} cores, which have {target.sram_bytes / 1e3:.0f} KB")

    def key(c):
        rows, cols, counts = c
        if options.policy != "waferllm":
            return policy_key(options.policy, list(counts), rows * cols)
        slots = math.ceil(capacity / cols)
        return (-step_cycles(cfg, target, rows, cols, list(counts), batch, slots, options.algo,
                             options.levels, s, ends), -len(counts))

    return [(rows, cols, list(counts), tight) for rows, cols, counts in
            sorted(candidates, key=key, reverse=True)]


# ---- place -------------------------------------------------------------------------------

def place(target: MeshTarget, rows: int, cols: int, counts: list[int],
          ends: tuple[bool, bool] = (True, True), spread: bool = False) -> list[Placement]:
    """Regions in serpentine order over the wafer's grid of rows x cols blocks; the embedding
    on the first and the head on the last, where the step holds them (`ends`), or, `spread`,
    a slice of each on every region."""
    per_row = target.width // cols
    n = len(counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = []
    for k in range(n):
        by, bx = divmod(k, per_row)
        if by % 2:
            bx = per_row - 1 - bx
        out.append(Placement(Region(rows, cols, bx * cols, by * rows), int(first[k]),
                             int(counts[k]), ends[0] and (spread or k == 0),
                             ends[1] and (spread or k == n - 1)))
    return out


# ---- lower -------------------------------------------------------------------------------

def lower(cfg: ModelConfig, width: int, height: int, placements, batch: int, ctx: int,
          slots: int, options: CompileOptions) -> Stamped:
    """The per-core program of one decode step (see the module docstring): the layer body
    lowered once, on the first layer region, and stamped onto the others."""
    d, lv = cfg.hidden_size, options.levels
    kw = dict(algo=options.algo, levels=lv)
    home = next(p.region for p in placements if p.count)
    body = ProgramBuilder(width, height, cfg.dtype)
    grid = home.cores(width)
    h_in = _hidden(body, grid, d, batch)  # the ports: buffers 0.. of the body
    h, s = attention_block(
        body, home, h_in, batch, d, cfg.num_attention_heads, cfg.num_key_value_heads,
        cfg.head_dim, LAYER, ctx=ctx, slots=slots,
        rope="rope" if cfg.position == "rope" else None, qkv_bias=cfg.qkv_bias,
        o_bias=cfg.o_proj_bias, eps=cfg.norm_eps, norm_kind=cfg.norm, step=LOOP, **kw)
    if cfg.fff_depth is not None:
        paths = options.fff_paths
        if paths is None:
            paths = draw_paths(cfg.fff_depth, batch, options.fff_seed)
        h, s = fff_block(body, home, h, batch, d, cfg.fff_depth, LAYER, paths,
                         act=model_activation(cfg.hidden_act), eps=cfg.norm_eps,
                         norm_kind=cfg.norm, step=s, **kw)
    else:
        mask = None if options.act_density is None else ActSparsity(
            options.act_density, options.act_seed).body_mask(cfg.num_hidden_layers, batch,
                                                             cfg.intermediate_size)
        h, s = mlp_block(body, home, h, batch, d, cfg.intermediate_size, LAYER,
                         gated=cfg.gated_mlp, act=model_activation(cfg.hidden_act),
                         eps=cfg.norm_eps, norm_kind=cfg.norm, bias=cfg.mlp_bias, step=s,
                         mask=mask, **kw)
    _carry(body, grid, h, h_in, s)  # the next iteration reads h where this one wrote it
    if s >= EPI:
        raise ProgramError("layer body too long for the step ranges")

    glue = ProgramBuilder(width, height, cfg.dtype)
    count = np.ones(width * height, np.int64)
    base = np.zeros(width * height, np.int64)
    offsets, bind = [], []
    prev = None
    regions = [p.region for p in placements]
    spread = [sum(p.embed for p in placements) > 1, sum(p.head for p in placements) > 1]
    for k, p in enumerate(placements):
        reg = p.region
        if prev is not None:
            h = _receive(glue, prev, reg, d, batch, lv, k)
        elif spread[0]:
            h = _embed_spread(glue, regions, cfg, batch, ctx, lv, kw)
        elif p.embed:
            h, _ = _embed(glue, reg, cfg, batch, ctx, lv, kw)
        else:  # a pipeline stage's first region: h comes from the last wafer
            h = _enter(glue, reg, d, batch, lv)
        prev = (reg, h)
        if p.count:
            cores = reg.cores(width)
            offsets.append(int(cores[0, 0] - grid[0, 0]))
            bind.append(np.asarray(h).ravel())
            count[cores.ravel()], base[cores.ravel()] = p.count, p.first
        if p.head and not spread[1]:
            _head(glue, reg, cfg, h, batch, lv, kw)
    if spread[1]:
        _head_spread(glue, regions, cfg, h, batch, lv, kw)
    if not placements[-1].head:  # a pipeline stage: h leaves for the next wafer
        _leave(glue, placements[-1].region, h, d, batch)
    glue = glue.build(loop=(LOOP, EPI, count, base))
    return Stamped(glue, body.build(), h_in.size, np.array(offsets, np.int64),
                   np.array(bind, np.int32), glue.loop_count, glue.loop_base)


def _hidden(bld, grid, d: int, batch: int) -> np.ndarray:
    """The hidden state's buffers on a region: [rows, cols], columns split over d."""
    rows, cols = grid.shape
    return bld.buffers(grid.ravel(), batch, np.tile(split(d, cols)[1], rows)).reshape(grid.shape)


def _carry(bld, grid, h_out, h_in, step):
    bld.compute(grid.ravel(), step, OP_COPY, c=np.asarray(h_in).ravel(),
                a=np.asarray(h_out).ravel())


def _part(total: int, lines: int, part: tuple[int, int]):
    """(starts, sizes) over `lines` lines of slice part[0] of `total` cut into part[1] slices."""
    v0, vs = split(total, part[1])
    v0, vs = int(v0[part[0]]), int(vs[part[0]])
    starts, sizes = split(vs, min(lines, vs))
    return v0 + starts, sizes


def _embed(bld, reg: Region, cfg: ModelConfig, batch: int, ctx: int, levels: int, kw,
           part: tuple[int, int] = (0, 1), step: int = 0):
    """Token ids enter at the region's corner, are broadcast, and look up their rows. With
    learned positions, every core also looks up row `ctx` (a compile-time constant, so no ids
    move) of the position table, split like the embedding, and the two rows are added.
    `part` = (k, n): the region holds slice k of n of each table's rows, and h is its partial
    sum (zero unless the slice holds the row)."""
    grid = reg.cores(bld.width)
    rows, cols = grid.shape
    tid = bld.tensor("ids", batch, 1)
    ids = np.full(grid.shape, -1, np.int64)
    ids[0, 0] = bld.buffers(grid[0, 0], batch, 1, INPUT, tid)[0]
    nb = np.array([int(math.ceil(batch * DTYPE_BYTES[bld.dtype]))])
    if cols > 1:
        ids[0, 1:] = bld.buffers(grid[0, 1:], batch, 1)
        step = line_broadcast(bld, grid[:1], 0, ids[:1, 0], ids[:1], step, levels, nb)
    if rows > 1:
        ids[1:, :] = bld.buffers(grid[1:, :].ravel(), batch, 1).reshape(rows - 1, cols)
        step = line_broadcast(bld, grid.T, 0, ids[0, :], ids.T, step, levels,
                              np.repeat(nb, cols))
    h, step = gemv(bld, reg, batch, cfg.vocab_size, cfg.hidden_size, k_axis="rows", x=ids,
                   names=(None, "embed", None), lookup=True, step=step,
                   k_split=_part(cfg.vocab_size, rows, part), **kw)
    if cfg.position != "learned":
        return h, step
    pos = bld.buffers(grid.ravel(), batch, 1).reshape(grid.shape)
    bld.compute(grid.ravel(), step, OP_FILL, c=pos.ravel(), imm=(float(ctx), 0.0))
    p, step = gemv(bld, reg, batch, cfg.max_position_embeddings, cfg.hidden_size,
                   k_axis="rows", x=pos, names=(None, "pos_embed", None), lookup=True,
                   step=step + 1, k_split=_part(cfg.max_position_embeddings, rows, part), **kw)
    held = np.asarray(h) >= 0
    out = np.full(grid.shape, -1, np.int64)
    out[held] = bld.like(np.asarray(h)[held])
    bld.compute(grid[held], step, OP_ADD, c=out[held], a=np.asarray(h)[held],
                b=np.asarray(p)[held])
    return out, step + 1


def _crossings(reg: Region):
    """(rows, columns) of the cores where column j's chunk of h crosses between two
    neighbouring regions of a chain: row j % rows, as side-by-side hand-offs cross."""
    cols = np.arange(reg.cols)
    return cols % reg.rows, cols


def _chain(bld, regions, bufs, step: int, levels: int, nbytes, op: int = -1):
    """Pass column chunks from region to region, last to first, over the crossing cores
    (`_crossings`; bufs[k]: region k's buffers there). Region k receives into bufs[k] at
    `step` or, with `op`, combines what it receives with bufs[k] into new buffers at
    step + 1; it sends on at step + 2. Returns each region's buffers after the pass (region
    0's: the chain's result)."""
    r, c = _crossings(regions[0])
    out = list(bufs)
    for k in range(len(regions) - 2, -1, -1):
        src, dst = regions[k + 1].cores(bld.width)[r, c], regions[k].cores(bld.width)[r, c]
        msgs = bld.messages(src, dst, nbytes, levels + 3)
        bld.send(src, step + 2, msgs, out[k + 1])
        got = bufs[k] if op < 0 else bld.like(bufs[k])
        bld.recv(dst, step, msgs, got)
        if op >= 0:
            out[k] = bld.like(got)
            bld.compute(dst, step + 1, op, c=out[k], a=bufs[k], b=got)
    return out


def _down_columns(bld, reg: Region, h, step: int, levels: int, nbytes) -> int:
    """Broadcast h's crossing-row chunks (`_crossings`) down (and up) their columns."""
    grid = reg.cores(bld.width)
    r, _ = _crossings(reg)
    for rr in np.unique(r):
        which = np.flatnonzero(r == rr)
        step = max(step, line_broadcast(bld, grid.T[which], int(rr), h[rr, which], h.T[which],
                                        step, levels, nbytes[which]))
    return step


def _embed_spread(bld, regions, cfg: ModelConfig, batch: int, ctx: int, levels: int, kw):
    """The embedding (and a learned position table) spread over every region, a slice of
    the rows each: every region looks its ids up in its slice (`_embed` with `part`), the
    partial sums go from region to region to the first (`_chain`), which broadcasts h down
    its columns. Runs before every region's own steps (TABLES <= step < 0)."""
    n, d = len(regions), cfg.hidden_size
    parts = [_embed(bld, reg, cfg, batch, ctx, levels, kw, (k, n), TABLES)
             for k, reg in enumerate(regions)]
    step = max(s for _, s in parts)
    r, c = _crossings(regions[0])
    nbytes = np.ceil(batch * split(d, len(c))[1] * DTYPE_BYTES[bld.dtype]).astype(np.int64)
    sums = _chain(bld, regions, [np.asarray(h)[r, c] for h, _ in parts], step, levels, nbytes,
                  OP_ADD)
    h = np.array(parts[0][0])
    h[r, c] = sums[0]
    if _down_columns(bld, regions[0], h, step + 3, levels, nbytes) >= 0:
        raise ProgramError("spread embedding too long for the step ranges")
    return h


def _receive(bld, prev, reg: Region, d: int, batch: int, levels: int, k: int):
    """h from the previous region: column j's chunk crosses over, then runs down column j."""
    preg, h_prev = prev
    grid, pgrid = reg.cores(bld.width), preg.cores(bld.width)
    rows, cols = grid.shape
    c0, cs = split(d, cols)
    if preg.y0 == reg.y0:  # side by side: each column crosses on its own row
        rs = rd = np.arange(cols) % rows
    else:  # stacked: bottom row to top row, or top to bottom
        down = reg.y0 > preg.y0
        rs = np.full(cols, rows - 1 if down else 0)
        rd = np.full(cols, 0 if down else rows - 1)
    src, dst = pgrid[rs, np.arange(cols)], grid[rd, np.arange(cols)]
    nbytes = np.ceil(batch * cs * DTYPE_BYTES[bld.dtype]).astype(np.int64)
    msgs = bld.messages(src, dst, nbytes, levels + 3)
    bld.send(src, EPI, msgs, np.asarray(h_prev)[rs, np.arange(cols)])
    h = _hidden(bld, grid, d, batch)
    bld.recv(dst, 0, msgs, h[rd, np.arange(cols)])
    # Broadcast down (and up) each column from the receiving row.
    for r in np.unique(rd):
        which = np.flatnonzero(rd == r)
        line_broadcast(bld, grid.T[which], int(r), h[r, which], h.T[which], 1, levels,
                       nbytes[which])
    return h


def _enter(bld, reg: Region, d: int, batch: int, levels: int):
    """A pipeline stage's input: column j's chunk of h ("h", [batch, d]) arrives on the
    region's top row (from the previous wafer, over its I/O; compiler.multiwafer) and is
    broadcast down the column."""
    grid = reg.cores(bld.width)
    rows, cols = grid.shape
    c0, cs = split(d, cols)
    h = np.empty(grid.shape, np.int32)
    h[0] = bld.buffers(grid[0], batch, cs, INPUT, bld.tensor("h", batch, d), c0=c0)
    if rows > 1:
        h[1:] = bld.buffers(grid[1:].ravel(), batch, np.tile(cs, rows - 1)).reshape(rows - 1,
                                                                                    cols)
        nbytes = np.ceil(batch * cs * DTYPE_BYTES[bld.dtype]).astype(np.int64)
        line_broadcast(bld, grid.T, 0, h[0], h.T, 0, levels, nbytes)
    return h


def _leave(bld, reg: Region, h, d: int, batch: int) -> None:
    """A pipeline stage's output: the top row's chunks of h, as tensor "h" [batch, d]."""
    grid = reg.cores(bld.width)
    c0, cs = split(d, grid.shape[1])
    out = bld.buffers(grid[0], batch, cs, OUTPUT, bld.tensor("h", batch, d), c0=c0)
    bld.compute(grid[0], EPI + 10, OP_COPY, c=out, a=np.asarray(h)[0])


def _head(bld, reg: Region, cfg: ModelConfig, h, batch: int, levels: int, kw):
    """Final norm, LM head (logits split over rows) and greedy sampling (argmax)."""
    grid = reg.cores(bld.width)
    xn, step = norm(cfg.norm, bld, reg, h, batch, cfg.hidden_size, "final_norm", cfg.norm_eps,
                    levels=levels, step=EPI + 10)
    logits, step = gemv(bld, reg, batch, cfg.hidden_size, cfg.vocab_size, k_axis="cols", x=xn,
                        names=(None, "lm_head", "logits"), allreduce=False, step=step, **kw)
    _argmax(bld, grid, logits, cfg.vocab_size, batch, step, levels)


def _head_spread(bld, regions, cfg: ModelConfig, h, batch: int, levels: int, kw) -> None:
    """The LM head spread over every region, a slice of the vocabulary each: the last region
    normalises h, the normalised h goes from region to region back to the first (`_chain`, each
    broadcasting it down its columns), every region computes its slice's logits and their
    argmax, and the (value, id) pairs go the same way, the better one kept at each region."""
    n, d = len(regions), cfg.hidden_size
    xn, step = norm(cfg.norm, bld, regions[-1], h, batch, d, "final_norm", cfg.norm_eps,
                    levels=levels, step=EPI + 10)
    r, c = _crossings(regions[0])
    nbytes = np.ceil(batch * split(d, len(c))[1] * DTYPE_BYTES[bld.dtype]).astype(np.int64)
    xs = [_hidden(bld, reg.cores(bld.width), d, batch) for reg in regions[:-1]] + [xn]
    _chain(bld, regions, [np.asarray(x)[r, c] for x in xs], step, levels, nbytes)
    step = max(_down_columns(bld, reg, np.asarray(x), step + 3, levels, nbytes)
               for reg, x in zip(regions[:-1], xs[:-1]))
    best, cores, s = [], [], step
    for k, (reg, x) in enumerate(zip(regions, xs)):
        starts, sizes = _part(cfg.vocab_size, reg.rows, (k, n))
        logits, at = gemv(bld, reg, batch, d, cfg.vocab_size, k_axis="cols", x=x,
                          names=(None, "lm_head", "logits"), allreduce=False, step=step,
                          n_split=(starts, sizes), **kw)
        core, buf, at = _best(bld, reg.cores(bld.width), logits, starts, batch, at, levels)
        best.append(buf)
        cores.append(core)
        s = max(s, at)
    # The pairs meet at each region's own argmax root, not at the crossing cores.
    run = best[-1]
    nb = math.ceil(batch * (DTYPE_BYTES[bld.dtype] + 4))
    for k in range(n - 2, -1, -1):
        msg = bld.messages(cores[k + 1], cores[k], nb, levels + 3)
        bld.send(cores[k + 1], s + 2, msg, run)
        got = bld.like(best[k])
        bld.recv(cores[k], s, msg, got)
        run = bld.like(best[k])
        bld.compute(cores[k], s + 1, OP_ARGMAX2, c=run, a=best[k], b=got)
    bld.mark(run, OUTPUT, bld.tensor("next", batch, 2))


def _best(bld, grid, logits, starts, batch: int, step: int, levels: int):
    """Argmax of logits split over the rows of `grid` (a k_axis="cols" GEMV's output; row i's
    chunk starts at token starts[i]): (core, its [batch, 2] buffer (value, token id), next
    step)."""
    # Each row's reduction root holds its logits chunk; argmax there, then along the roots.
    held = np.asarray(logits) >= 0
    roots_r, roots_c = np.nonzero(held)
    cores = grid[roots_r, roots_c]
    best = bld.buffers(cores, batch, 2)
    bld.compute(cores, step, OP_ARGMAX, c=best, a=logits[held], imm=(starts[roots_r], 0.0))
    tmp = bld.like(best)
    if len(cores) > 1:
        root, step = ktree_reduce(bld, cores[None, :], best[None, :], tmp[None, :], step + 1,
                                  levels, 0,
                                  np.array([math.ceil(batch * (DTYPE_BYTES[bld.dtype] + 4))]),
                                  op=OP_ARGMAX2)
    else:
        root = 0
    return cores[root:root + 1], best[root:root + 1], step


def _argmax(bld, grid, logits, vocab: int, batch: int, step: int, levels: int) -> None:
    """Greedy sampling of logits split over the rows of `grid` (a k_axis="cols" GEMV's output):
    output "next" [batch, 2] (value, token id)."""
    n0, _ = split(vocab, min(grid.shape[0], vocab))
    _, best, _ = _best(bld, grid, logits, n0, batch, step, levels)
    bld.mark(best, OUTPUT, bld.tensor("next", batch, 2))


# ---- weights -----------------------------------------------------------------------------

def pack_inputs(compiled: CompiledModel, weights: dict[str, np.ndarray], ids: np.ndarray,
                k_cache: list | None = None, v_cache: list | None = None
                ) -> dict[str, np.ndarray]:
    """The program's input tensors from model weights (models.reference names), the new
    token ids [b] and the caches (per layer [b, ctx, KV * hd], k after RoPE). For a prefill
    program: the prompt ids [S] and no caches (compiler.prefill_model.pack_prefill_inputs)."""
    if compiled.phase == "prefill":
        from compiler.prefill_model import pack_prefill_inputs

        if k_cache is not None or v_cache is not None:
            raise ValueError("a prefill program takes no caches")
        return pack_prefill_inputs(compiled, weights, ids)
    cfg = compiled.model
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    out = {"ids": np.asarray(ids, np.float32).reshape(-1, 1)}
    for name in ("embed", "pos_embed", "final_norm", "final_norm_bias"):
        if name in weights:
            out[name] = weights[name]
    # A tied LM head is the embedding transposed, stored on the last region as its own copy.
    lm_head = weights.get("lm_head")
    out["lm_head"] = weights["embed"].T.copy() if lm_head is None else lm_head
    if cfg.position == "rope":
        out["rope"] = rope_angles(cfg, compiled.ctx)
    for p in compiled.placements:
        lay = head_layout(p.region.rows, cfg.num_key_value_heads, g, cfg.head_dim)
        for layer in range(p.first, p.first + p.count):
            pre = f"layers.{layer}."
            for name in ("attn_norm", "attn_norm_bias", "mlp_norm", "mlp_norm_bias", "up",
                         "down", "gate", "o_bias", "up_bias", "down_bias", "gate_bias",
                         "fff_in", "fff_out"):
                if pre + name in weights:
                    out[pre + name] = weights[pre + name]
            if compiled.options.act_density is not None:  # this layer's active neurons
                out[pre + "act_mask"] = ActSparsity(
                    compiled.options.act_density, compiled.options.act_seed).mask(
                    layer, compiled.batch, cfg.intermediate_size, cfg.num_hidden_layers
                ).astype(np.float32)
            for name, gg, pairs in (("q", g, True), ("k", 1, True), ("v", 1, False)):
                order = lay.order(gg, pairs)
                out[pre + name] = weights[pre + name][:, order]
                if cfg.qkv_bias:
                    out[pre + name + "_bias"] = weights[pre + name + "_bias"][:, order]
            out[pre + "o"] = weights[pre + "o"][lay.order(g, False)]
            kv = cfg.num_key_value_heads * cfg.head_dim
            k = np.zeros((compiled.batch, 0, kv), np.float32) if k_cache is None else \
                k_cache[layer]
            v = np.zeros((compiled.batch, 0, kv), np.float32) if v_cache is None else \
                v_cache[layer]
            out[pre + "k_cache"], out[pre + "v_cache"] = pack_cache(
                lay, np.asarray(k, np.float32), np.asarray(v, np.float32), p.region.cols,
                compiled.slots)
    return out

