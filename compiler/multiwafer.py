"""A model over several wafers: its layers pipelined over a chain of wafers.

A model that does not fit one wafer (LLaMA-3-70B or Qwen2-72B in bf16: about 140 GB of weights
against 40-44 GB of SRAM) is cut into consecutive layer ranges, one per wafer (a "stage"). The
first stage holds the embedding and the last the LM head; each is compiled by
compiler.model.compile_model as a model of its own layers, with CompileOptions(embed=...,
head=...), so every stage is placed, lowered and checked like a whole model. At each step the
hidden state h ([batch, d]) leaves wafer k from its last region's top row and enters wafer k + 1
on its first region's top row, over the wafers' edge I/O.

The cluster (`load_cluster("4xwse3")`): `count` copies of one wafer target in a chain. A
crossing costs `io_latency_s` plus h's bytes over the wafer's edge I/O (the target's
io_bytes_per_cycle x clock: 1.2 Tb/s, the 12 x 100 GbE of a CS-2 system; docs/hardware.md).
The latency is assumed (IO_LATENCY_S: no published figure), and the on-wafer route from a
region to the wafer's edge is not simulated; wafersim.multiwafer reports both terms apart.

Layers go to stages as evenly as each stage's SRAM allows (compiler.model.distribute over the
largest layer count each stage fits, the stages with tables lightened first): at batch 1 the
order does not change the step time, but an even split is what pipelining several batches
needs. The capacities count on the partition's tight fallback (tables spread over every
region of the wafer, compiler.model) only where the model does not fit without it. Stages of
equal layer count and ends compile to the same program, so each such program is compiled once.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np

from compiler.estimate import step_cycles
from compiler.model import (
    CompiledModel,
    CompileOptions,
    compile_model,
    distribute,
    grids,
    pack_inputs,
    region_caps,
    scheme_of,
)
from compiler.program import ProgramError
from compiler.targets import DTYPE_BYTES, MeshTarget, TargetError, load_target
from models.config import ModelConfig
from models.graph import build_graph

IO_LATENCY_S = 2e-6  # per crossing, NIC to NIC through one switch: assumed (see module doc)
MAX_WAFERS = 64


@dataclass(frozen=True)
class WaferCluster:
    """`count` wafers of one target in a chain, joined by their edge I/O."""

    wafer: MeshTarget
    count: int
    io_latency_s: float = IO_LATENCY_S

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_WAFERS:
            raise TargetError(f"wafer count {self.count} must be 1..{MAX_WAFERS}")
        if self.io_latency_s < 0:
            raise TargetError(f"io_latency_s={self.io_latency_s} must be >= 0")

    @property
    def name(self) -> str:
        return f"{self.count}x{self.wafer.name}"

    @property
    def io_bytes_per_s(self) -> float:
        return self.wafer.io_bytes_per_cycle * self.wafer.clock_hz

    def crossing_s(self, nbytes: float) -> float:
        """Seconds for `nbytes` to go from one wafer to the next."""
        return self.io_latency_s + nbytes / self.io_bytes_per_s


def is_cluster(name: str) -> bool:
    """Whether a --target names several wafers ("4xwse3"), not a preset or a file."""
    return re.fullmatch(r"\s*\d+\s*x\s*\S+", name) is not None and not Path(name).exists()


def load_cluster(name: str) -> WaferCluster:
    """"N x TARGET" ("4xwse3", "2xmy_wafer.toml"): N wafers of a preset or target file."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\S+)\s*", name)
    if m is None:
        raise TargetError(f"target {name!r}: a cluster of wafers is written COUNTxTARGET, e.g. "
                          "4xwse3")
    return WaferCluster(load_target(m.group(2)), int(m.group(1)))


@dataclass(frozen=True)
class Stage:
    """Layers first .. first + count - 1 of the model on one wafer, and their compiled step."""

    first: int
    count: int
    compiled: CompiledModel


@dataclass(frozen=True, eq=False)
class MultiWaferModel:
    """A decode step of a model pipelined over a cluster's wafers."""

    model: ModelConfig
    cluster: WaferCluster
    batch: int
    ctx: int
    stages: tuple[Stage, ...]

    @property
    def crossing_bytes(self) -> int:
        """Bytes of h crossing between two consecutive wafers per step."""
        return self.batch * self.model.hidden_size * DTYPE_BYTES[self.model.dtype]


def stage_model(cfg: ModelConfig, count: int) -> ModelConfig:
    """The model of one stage: `count` of cfg's layers."""
    return dataclasses.replace(cfg, name=f"{cfg.name}[{count} layers]", num_hidden_layers=count)


def tables_spread(c: CompiledModel) -> bool:
    """Whether a stage's vocabulary tables are spread over its regions (the tight fallback)."""
    return sum(p.embed + p.head for p in c.placements) > sum(c.options.ends)


def _ends(k: int, n: int) -> tuple[bool, bool]:
    return k == 0, k == n - 1


def stage_capacity(cfg: ModelConfig, target: MeshTarget, batch: int, capacity: int,
                   options: CompileOptions, ends: tuple[bool, bool], tight: bool = False) -> int:
    """The most of cfg's layers one wafer holds with these ends, by the partition's estimate
    over the same grids of regions (0: not even one); `tight`: as the partition's fallback
    places them (compiler.model.region_caps: tables spread over every region, no reserve)."""
    s, L = scheme_of(cfg, "decode", options), cfg.num_hidden_layers
    most: dict[tuple[int, int], int] = {}  # region shape -> the most regions of it
    for rows, cols, n in grids(cfg, target):
        most[rows, cols] = max(most.get((rows, cols), 0), n)
    best = 0
    for (rows, cols), n in most.items():
        caps = region_caps(cfg, target, rows, cols, n, batch, capacity, s, ends, tight)
        if caps is not None and sum(caps) >= n - 2:  # (no more regions than layers + 2)
            best = max(best, min(sum(caps), L))
    return best


def stage_counts(cfg: ModelConfig, cluster: WaferCluster, batch: int, capacity: int,
                 options: CompileOptions) -> list[int]:
    """Layers per wafer: as even as the wafers' capacities (`stage_capacity`) allow, counting
    on the partition's tight fallback only where the model does not fit without it; refused
    with the capacities where it does not fit."""
    n, L = cluster.count, cfg.num_hidden_layers
    if n > L:
        raise ProgramError(f"{cluster.name}: {n} wafers for {cfg.name}'s {L} layers; use at "
                           f"most {L}")
    held: dict[tuple, int] = {}  # (ends, tight) -> the most layers a wafer holds

    def cap(ends: tuple[bool, bool], tight: bool) -> int:
        if (ends, tight) not in held:
            held[ends, tight] = stage_capacity(cfg, cluster.wafer, batch, capacity, options,
                                               ends, tight)
        return held[ends, tight]

    def most(ends: tuple[bool, bool], tight: bool) -> int:
        return max(cap(ends, False), cap(ends, True)) if tight else cap(ends, False)

    for tight in (False, True):
        caps = [most(_ends(k, n), tight) for k in range(n)]
        counts = distribute(L, caps)
        if counts is not None and 0 not in counts:
            return counts
    first, middle, last = (most(e, True) for e in ((True, False), (False, False), (False, True)))
    hint = ("no number of these wafers holds it (a stage does not fit one wafer)"
            if 0 in (first, middle, last) else
            f"{2 + max(0, -(-(L - first - last) // middle))} of these wafers would hold it")
    raise ProgramError(f"{cfg.name} does not fit {cluster.name}: its wafers hold at most "
                       f"{'+'.join(map(str, caps))} = {sum(caps)} of its {L} layers "
                       f"(first and last wafer also hold the embedding and the LM head); "
                       + hint)


def compile_multiwafer(graph: nx.DiGraph, cluster: WaferCluster,
                       options: CompileOptions | None = None) -> MultiWaferModel:
    """Split the decode step `graph` into one stage per wafer of `cluster` and compile each."""
    options = options or CompileOptions()
    cfg: ModelConfig = graph.graph["cfg"]
    phase, batch, ctx = graph.graph["phase"], graph.graph["batch"], graph.graph["ctx_len"]
    if phase != "decode":
        raise ProgramError(f"a cluster of wafers ({cluster.name}) runs decode steps; compile "
                           f"{phase} on one wafer")
    if options.region is not None:
        raise ProgramError("--region applies to one wafer; a cluster's stages choose their own")
    capacity = ctx + 1 if options.capacity is None else options.capacity
    counts = stage_counts(cfg, cluster, batch, capacity, options)
    n = len(counts)
    built: dict[tuple, CompiledModel] = {}
    stages, first = [], 0
    for k, count in enumerate(counts):
        ends = _ends(k, n)
        if (count, ends) not in built:
            built[count, ends] = compile_model(
                build_graph(stage_model(cfg, count), "decode", batch=batch, ctx_len=ctx),
                cluster.wafer, dataclasses.replace(options, embed=ends[0], head=ends[1]))
        stages.append(Stage(first, count, built[count, ends]))
        first += count
    return MultiWaferModel(cfg, cluster, batch, ctx, tuple(stages))


def stage_weights(weights: dict, first: int, count: int) -> dict:
    """A stage's weights from the whole model's (models.reference names): its layers renamed
    to start at 0, plus the tables (the stage's program takes what it needs)."""
    out = {}
    for name, w in weights.items():
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:
            out[name] = w
        elif first <= int(m.group(1)) < first + count:
            out[f"layers.{int(m.group(1)) - first}.{m.group(2)}"] = w
    return out


def pack_stage_inputs(stage: Stage, weights: dict, x: np.ndarray, k_cache: list | None = None,
                      v_cache: list | None = None) -> dict[str, np.ndarray]:
    """A stage program's inputs (compiler.model.pack_inputs): `x` is the token ids [b] for the
    first stage and h [b, d] (the previous stage's output "h") for the others; the caches are
    the whole model's, per layer."""
    c = stage.compiled
    rng = slice(stage.first, stage.first + stage.count)
    embed, head = c.options.ends
    ids = x if embed else np.zeros(c.batch)
    out = pack_inputs(c, stage_weights(weights, stage.first, stage.count), ids,
                      None if k_cache is None else list(k_cache)[rng],
                      None if v_cache is None else list(v_cache)[rng])
    drop = (() if embed else ("ids", "embed", "pos_embed")) + (
        () if head else ("lm_head", "final_norm", "final_norm_bias"))
    out = {k: v for k, v in out.items() if k not in drop}
    if not embed:
        out["h"] = np.asarray(x, np.float32)
    return out


def report(mw: MultiWaferModel) -> dict:
    """The compile report of a cluster: per stage its layers, placement and SRAM, and the
    step's time by compiler.estimate (closed form, labelled estimated: the simulator's figure
    comes from wafersim.multiwafer), the inter-wafer traffic and the pipeline bubble."""
    cl, n = mw.cluster, len(mw.stages)
    stages, total = [], 0.0
    for k, st in enumerate(mw.stages):
        c, p = st.compiled, st.compiled.placements
        seconds = step_cycles(c.model, cl.wafer, p[0].region.rows, p[0].region.cols,
                              [q.count for q in p], c.batch, c.slots, c.options.algo,
                              c.options.levels, scheme_of(c.model, "decode", c.options),
                              c.options.ends) / cl.wafer.clock_hz
        total += seconds
        stages.append(dict(wafer=k, layers=f"{st.first}-{st.first + st.count - 1}",
                           embed=c.options.embed, head=c.options.head,
                           tables_spread=tables_spread(c), regions=len(p),
                           region=f"{p[0].region.rows}x{p[0].region.cols}",
                           sram_max_bytes=c.memory["sram_max_bytes"],
                           max_ctx=c.memory["max_ctx"], estimated_s=seconds))
    crossing = cl.crossing_s(mw.crossing_bytes)
    step = total + (n - 1) * crossing
    return {"system": cl.name, "model": mw.model.name, "phase": "decode", "batch": mw.batch,
            "ctx": mw.ctx, "fits": True, "wafers": n, "stages": stages,
            "interwafer_bytes": (n - 1) * mw.crossing_bytes, "crossing_s": crossing,
            "io_latency_s": cl.io_latency_s, "io_bytes_per_s": cl.io_bytes_per_s,
            "estimated_step_s": step, "estimated_tokens_per_s": mw.batch / step,
            "estimated_bubble_fraction": 1 - total / (n * step),
            "max_ctx": min(st["max_ctx"] for st in stages)}


def save_stages(mw: MultiWaferModel, path: str) -> list[str]:
    """One layout file per wafer (PATH -> PATH's stem + ".wafer{k}" + its suffix), each the
    layout of its stage (compiler.layout; its layers numbered from 0), which `wafersim
    simulate` runs as one wafer; wafers with the same program get hard links to one file
    where the file system allows."""
    import os

    from compiler.layout import save_layout

    base = Path(path)
    paths, written = [], {}
    for k, st in enumerate(mw.stages):
        out = str(base.with_name(f"{base.stem}.wafer{k}{base.suffix or '.wsl'}"))
        key = id(st.compiled)
        if key in written:
            try:
                if os.path.exists(out):
                    os.unlink(out)
                os.link(written[key], out)
                paths.append(out)
                continue
            except OSError:
                pass
        save_layout(st.compiled.code, out, **st.compiled.info())
        written.setdefault(key, out)
        paths.append(out)
    return paths
