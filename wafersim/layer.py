"""One transformer layer on a P x P grid, measured and extrapolated (WaferLLM's method).

WaferLLM reports decode (and prefill) throughput from ONE layer run on a P x P grid of cores,
multiplied by the layer count (../shared/FACTS.md, "How WaferLLM measured"). `layer_run` does
the same with the whole-model compiler and the simulator:

- the model, cut to 2 layers, is compiled onto a target whose mesh is exactly P x P with
  `CompileOptions(region=(P, P))`: one region holding both layers, the embedding and the LM
  head (prefill: the compiler's square grid);
- the step is simulated twice, its layer loop capped at 1 and at 2 iterations (as
  `wafersim.whole`'s `one` mode does); the layer is the difference, so the embedding and
  the LM head are not counted in it. The whole 1-layer step is reported too;
- when the vocabulary tables do not fit the region next to the layers (by the compiler's
  estimate), vocab_size is shrunk to P for the measurement: the tables are outside the loop
  and do not enter the layer's time (`vocab_shrunk` says so);
- `attention="paper"`: WaferLLM's simplified decode configuration: one full-width head
  (n_heads = n_kv_heads = 1, head_dim = hidden), hidden, ffn and ctx rounded up to multiples
  of P. `attention="model"`: the model's real (GQA) shapes.

KV capacity (decode; compiler.kvcache): the cache slots one layer's busiest core can hold on
the P x P grid (the layer body's SRAM as compiled, the tables outside it), and from them the
longest decode after the ctx-token prompt with the shift-based cache and with a concatenation
cache (`kv` picks the one printed as `max_decode`; JSON has both). The simulated step is the
shift-based layout's either way: `kv` changes the capacity, not the timing.

Extrapolation (labelled `extrapolated: True`):
    step_s        = L * layer_s                      (WaferLLM: one layer x layer count)
    tokens_per_s  = tokens / step_s                  (tokens: batch, or the prompt length)
    rest_s        = one_layer_step_s - layer_s       (embedding, LM head, fill / drain)
    tokens_per_s_with_rest = tokens / (L * layer_s + rest_s)
rest_s is measured with the vocabulary actually compiled (shrunk or not; see vocab_shrunk).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from compiler import kvcache
from compiler.estimate import layer_cycles
from compiler.model import CompileOptions, _counts, compile_model, slot_bytes
from compiler.prefill_model import SAMPLE_SIDE
from compiler.program import ProgramError
from compiler.targets import MeshTarget
from models import build_graph
from models.config import ModelConfig
from wafersim.simulate import simulate

ATTENTION = ("paper", "model")
PHASES = ("decode", "prefill")


def _up(x: int, p: int) -> int:
    return -(-x // p) * p


def paper_config(cfg: ModelConfig, p: int) -> ModelConfig:
    """WaferLLM's simplification: one full-width head; hidden and ffn rounded up to P."""
    d = _up(cfg.hidden_size, p)
    return dataclasses.replace(cfg, hidden_size=d, intermediate_size=_up(cfg.intermediate_size,
                                                                         p),
                               num_attention_heads=1, num_key_value_heads=1,
                               head_dim_override=d)


def parse_grids(text: str) -> list[int]:
    """'240,300,360' -> [240, 300, 360]."""
    try:
        grids = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--grid {text!r}: expected P or P1,P2,... (integers)") from None
    if not grids or min(grids) < 1:
        raise ValueError(f"--grid {text!r}: every P must be >= 1")
    return grids


def _tables_fit(cfg: ModelConfig, target: MeshTarget, p: int, phase: str, ctx: int) -> bool:
    if phase == "decode":
        return _counts(cfg, target, p, p, 1, 1, ctx + 1) is not None
    from compiler.prefill_model import _prefill_counts, algos

    return _prefill_counts(cfg, target, p, 1, ctx, algos(CompileOptions())[0]) is not None


def layer_run(cfg: ModelConfig, target: MeshTarget, p: int, phase: str = "decode",
              ctx: int = 4096, attention: str = "model", batch: int = 1,
              kv: str = "shift") -> dict:
    """Compile and simulate one layer of `cfg` on a P x P grid of `target`'s cores."""
    if phase not in PHASES:
        raise ValueError(f"--phase {phase!r} is not one of {', '.join(PHASES)}")
    if kv not in kvcache.KV_KINDS:
        raise ValueError(f"--kv {kv!r} is not one of {', '.join(kvcache.KV_KINDS)}")
    if attention not in ATTENTION:
        raise ValueError(f"--attention {attention!r} is not one of {', '.join(ATTENTION)}")
    if p < 1 or p > target.width or p > target.height:
        raise ValueError(f"--grid {p}: P must be between 1 and {target.name}'s "
                         f"{min(target.width, target.height)} (its mesh is "
                         f"{target.height}x{target.width})")
    if ctx < 1:
        raise ValueError(f"--ctx {ctx} must be >= 1")
    if phase == "prefill" and p > SAMPLE_SIDE:
        raise ProgramError(f"--phase prefill --grid {p}: grids wider than {SAMPLE_SIDE} cores a "
                           "side are compiled with sampled steps, whose two stacked layers "
                           "this version cannot run in one region; for a whole-model prefill "
                           "use `wafersim compile --phase prefill` and `wafersim simulate "
                           "--layers one`")
    layers = cfg.num_hidden_layers
    lcfg = dataclasses.replace(cfg, num_hidden_layers=2)
    if attention == "paper":
        lcfg = paper_config(lcfg, p)
        ctx = _up(ctx, p)
        limit = lcfg.hidden_size // 2  # RoPE pairs of the one head: rows (or prefill's side)
        if lcfg.position == "rope" and p > limit:
            raise ProgramError(f"--attention paper on a {p}x{p} grid: the lowering splits a "
                               f"head's RoPE pairs over at most head_dim/2 = {limit} rows")
    tgt = target.with_mesh(p, p)
    vocab_shrunk = not _tables_fit(lcfg, tgt, p, phase, ctx)
    if vocab_shrunk:
        lcfg = dataclasses.replace(lcfg, vocab_size=p, tie_word_embeddings=False)
    t0 = time.perf_counter()
    graph = (build_graph(lcfg, phase, batch=batch, seq_len=ctx) if phase == "prefill"
             else build_graph(lcfg, phase, batch=batch, ctx_len=ctx))
    compiled = compile_model(graph, tgt, CompileOptions(region=(p, p)))
    program = compiled.timing_program()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = simulate(dataclasses.replace(program, loop_count=np.minimum(program.loop_count, 1)),
                   tgt)
    two = simulate(dataclasses.replace(program, loop_count=np.minimum(program.loop_count, 2)),
                   tgt)
    sim_s = time.perf_counter() - t0
    code = compiled.code
    sram2 = code.sram_per_core()
    sram1 = dataclasses.replace(code, loop_count=np.minimum(code.loop_count, 1)).sram_per_core()
    layer_sram = sram2 - sram1

    cyc = two.makespan_cycles - one.makespan_cycles
    hz = target.clock_hz
    layer_s, one_s = cyc / hz, one.makespan_cycles / hz
    rest_s = one_s - layer_s
    tokens = batch * ctx if phase == "prefill" else batch
    step_s = layers * layer_s
    # the breakdown of the layer: per-core differences of the two runs, at the last core
    busy = two.core_busy - one.core_busy
    over = two.core_overhead - one.core_overhead
    wait = two.core_wait - one.core_wait
    active = two.core_active
    last = int(np.argmax(np.where(active, busy + over + wait, -1)))
    span = max(cyc, 1)
    n_act = max(int(active.sum()), 1)
    busy_frac = float(busy[active].sum()) / (span * n_act)
    out = dict(
        model=cfg.name, system=target.name, phase=phase, grid=p, cores=p * p, ctx=ctx,
        batch=batch, attention=attention, layers=layers, extrapolated=True,
        hidden_size=lcfg.hidden_size, intermediate_size=lcfg.intermediate_size,
        num_attention_heads=lcfg.num_attention_heads,
        num_key_value_heads=lcfg.num_key_value_heads, head_dim=lcfg.head_dim,
        vocab_size=lcfg.vocab_size, vocab_shrunk=vocab_shrunk,
        layer_cycles=int(cyc), layer_s=layer_s,
        estimate_layer_cycles=None,
        one_layer_step_cycles=int(one.makespan_cycles), one_layer_step_s=one_s,
        two_layer_step_cycles=int(two.makespan_cycles), rest_s=rest_s,
        step_s=step_s, tokens_per_s=tokens / step_s if step_s > 0 else None,
        tokens_per_s_with_rest=tokens / (step_s + rest_s) if step_s + rest_s > 0 else None,
        last_core=f"({last % p},{last // p})",
        last_core_compute=float(busy[last]) / span, last_core_overhead=float(over[last]) / span,
        last_core_wait=float(wait[last]) / span,
        busy_fraction=busy_frac, idle_fraction=1.0 - busy_frac
        - float(over[active].sum()) / (span * n_act),
        layer_flops=int(two.flops - one.flops),
        layer_link_bytes=int(two.link_bytes.sum() - one.link_bytes.sum()),
        layer_messages=int(two.messages - one.messages), layer_hops=int(two.hops - one.hops),
        layer_max_link_utilisation=float((two.link_busy - one.link_busy).max()) / span
        if len(two.link_busy) else 0.0,
        layer_sram_max_bytes=int(layer_sram.max()),
        one_layer_step_sram_max_bytes=int(sram1.max()),
        sram_limit_bytes=target.sram_bytes,
        fits=bool(sram1.max() <= target.sram_bytes),
        compile_wall_s=compile_s, sim_wall_s=sim_s, events=int(one.events + two.events),
    )
    out.update(kv=kv, max_decode=None)
    if phase == "decode":
        free = target.sram_bytes - int(code.body.sram_per_core().max())  # decode is stamped
        per_core = compiled.slots + free // slot_bytes(lcfg, p, 1, batch)
        out.update(kvcache.report(p, per_core, ctx))
        out["max_decode"] = out[f"max_decode_{kv}"]
        try:
            slots = math.ceil((ctx + 1) / p)
            out["estimate_layer_cycles"] = float(layer_cycles(lcfg, tgt, p, p, batch, slots))
        except (ValueError, ProgramError):
            pass
    return out


def plot_sweep(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    r0 = rows[0]
    ax.plot([r["grid"] for r in rows], [r["tokens_per_s"] for r in rows], "o-")
    ax.set_xlabel("P (grid P x P)")
    ax.set_ylabel("tokens/s (one layer x layer count)")
    ax.set_title(f"{r0['model']} {r0['phase']}, {r0['attention']} attention, extrapolated")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
