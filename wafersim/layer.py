"""One transformer layer on a P x P grid, measured and extrapolated (WaferLLM's method).

WaferLLM reports decode (and prefill) throughput from ONE layer run on a P x P grid of cores,
multiplied by the layer count (../shared/FACTS.md, "How WaferLLM measured"). `layer_run` does
the same with the whole-model compiler and the simulator, on a target whose mesh is exactly
P x P:

- decode: the model, cut to 2 layers, is compiled with `CompileOptions(region=(P, P))` as one
  region holding both layers, the embedding and the LM head; the step is simulated with its
  layer loop capped at 1 and at 2 iterations (as `wafersim.whole`'s `one` mode does), and the
  layer is the difference, so the embedding and the LM head are not counted in it. The whole
  1-layer step is reported too;
- prefill: the layer's program alone (compiler.prefill_model.layer_alone: the body the
  whole-model prefill stamps on its square grid, its input tiles ready at cycle 0) is
  simulated. A prefill layer ends in a grid-wide dependency, so this is what the 2- minus
  1-layer step measures (within 63 cycles on 16-64 cores a side, docs/validation.md). No
  embedding or LM head is compiled, so there is no 1-layer step (rest_s is None); `fits` is
  the layer alone (weights, caches, scratch, input tiles) against a core's SRAM, and a layer
  that does not fit is timed and said not to. Grids wider than
  compiler.prefill_model.SAMPLE_SIDE run sampled steps (each GEMM and the attention run T of
  their P steps; a P-step program is out of reach): T = 2, 3, ... until the cycles one more
  step adds are steady (STEADY), and every quantity the layer adds is extrapolated linearly
  from the last two to P (`sampled`, `steps_sampled`, `sampled_cycles_per_step`,
  `sampled_steady`). Not steady within MAX_SAMPLED_STEPS steps or MAX_LAYER_MESSAGES
  messages, the layer is at least its busiest core's extrapolated work, and that lower bound
  is reported (`sampled_work_bound`);
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
    rest_s        = one_layer_step_s - layer_s       (decode: embedding, LM head, fill / drain)
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
from compiler.prefill_model import SAMPLE_SIDE, SAMPLED_STEPS, layer_alone
from compiler.program import ProgramError
from compiler.targets import MeshTarget
from models import build_graph
from models.config import ModelConfig
from wafersim.simulate import simulate, simulate_loops

ATTENTION = ("paper", "model")
PHASES = ("decode", "prefill")
# Sampled prefill: steps are added, from SAMPLED_STEPS[0], until the cycles a step adds agree
# with the previous step's within STEADY and cover every core's work per step (the steps, not
# the grid-crossing skews, set the pace), or MAX_SAMPLED_STEPS (memory grows with the steps).
STEADY = 0.005
MAX_SAMPLED_STEPS = 8
# Nor past this many messages in one sampled program (memory follows them: LLaMA-3-8B's
# P = 420 layer at 8 steps holds about 20 M and peaked at 8.1 GB here); where even two
# sampled programs would not fit it, the grid is refused in one line.
MAX_LAYER_MESSAGES = 24_000_000


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


def _tables_fit(cfg: ModelConfig, target: MeshTarget, p: int, ctx: int) -> bool:
    return _counts(cfg, target, p, p, 1, 1, ctx + 1) is not None


def layer_run(cfg: ModelConfig, target: MeshTarget, p: int, phase: str = "decode",
              ctx: int = 4096, attention: str = "model", batch: int = 1,
              kv: str = "shift", sample: bool | None = None) -> dict:
    """Compile and simulate one layer of `cfg` on a P x P grid of `target`'s cores. `sample`
    (prefill): sampled steps, by default where P > SAMPLE_SIDE."""
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
    layers = cfg.num_hidden_layers
    # decode: two layers, their difference; prefill: one layer, its body alone (docstring)
    lcfg = dataclasses.replace(cfg, num_hidden_layers=2 if phase == "decode" else 1)
    if attention == "paper":
        lcfg = paper_config(lcfg, p)
        ctx = _up(ctx, p)
        limit = lcfg.hidden_size // 2  # RoPE pairs of the one head: rows (or prefill's side)
        if lcfg.position == "rope" and p > limit:
            raise ProgramError(f"--attention paper on a {p}x{p} grid: the lowering splits a "
                               f"head's RoPE pairs over at most head_dim/2 = {limit} rows")
    tgt = target.with_mesh(p, p)
    vocab_shrunk = phase == "decode" and not _tables_fit(lcfg, tgt, p, ctx)
    if vocab_shrunk:
        lcfg = dataclasses.replace(lcfg, vocab_size=p, tie_word_embeddings=False)
    if phase == "decode":
        t0 = time.perf_counter()
        compiled = compile_model(build_graph(lcfg, phase, batch=batch, ctx_len=ctx), tgt,
                                 CompileOptions(region=(p, p)))
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lay, one_cycles, runs = _decode_layer(compiled, tgt)
        sim_s = time.perf_counter() - t0
        code, record, alone = compiled.code, None, None
        one_sram = dataclasses.replace(code, loop_count=np.minimum(code.loop_count, 1)
                                       ).sram_per_core()
        layer_sram = int((code.sram_per_core() - one_sram).max())
        sram1 = int(one_sram.max())
        fits = sram1 <= target.sram_bytes
    else:
        if batch != 1:
            raise ProgramError(f"prefill of batch {batch}: a prompt is prefilled alone")
        if sample is None:
            sample = p > SAMPLE_SIDE
        lay, record, runs, layer_sram, alone, compile_s, sim_s = _prefill_layer(lcfg, tgt, ctx,
                                                                                sample)
        one_cycles = sram1 = None
        fits = alone <= target.sram_bytes

    cyc = float(lay["makespan_cycles"])
    hz = target.clock_hz
    layer_s = cyc / hz
    one_s = None if one_cycles is None else one_cycles / hz
    rest_s = None if one_s is None else one_s - layer_s
    tokens = batch * ctx if phase == "prefill" else batch
    step_s = layers * layer_s
    # the breakdown of the layer, at its last core (sampled: the last of the longer sample,
    # whose cores' times are in step; others may still be filling their pipelines)
    busy, over, wait = lay["core_busy"], lay["core_overhead"], lay["core_wait"]
    active = runs[-1].core_active
    last = int(np.argmax(np.where(active, busy + over + wait, -1) if record is None else
                         runs[-1].core_busy + runs[-1].core_overhead + runs[-1].core_wait))
    span = max(cyc, 1)
    n_act = max(int(active.sum()), 1)
    busy_frac = float(busy[active].sum()) / (span * n_act)
    out = dict(
        model=cfg.name, system=target.name, phase=phase, grid=p, cores=p * p, ctx=ctx,
        batch=batch, attention=attention, layers=layers, extrapolated=True,
        layer_measured=("2-layer step minus 1-layer step" if phase == "decode"
                        else "the layer's program alone"),
        sampled=record is not None, steps_sampled=record and record["steps"],
        sampled_cycles_per_step=record and record["cycles_per_step"],
        sampled_steady=record and record["steady"],
        sampled_work_bound=record and record["work_bound"],
        hidden_size=lcfg.hidden_size, intermediate_size=lcfg.intermediate_size,
        num_attention_heads=lcfg.num_attention_heads,
        num_key_value_heads=lcfg.num_key_value_heads, head_dim=lcfg.head_dim,
        vocab_size=lcfg.vocab_size, vocab_shrunk=vocab_shrunk,
        layer_cycles=int(round(cyc)), layer_s=layer_s,
        estimate_layer_cycles=None,
        one_layer_step_cycles=None if one_cycles is None else int(one_cycles),
        one_layer_step_s=one_s,
        two_layer_step_cycles=int(runs[1].makespan_cycles) if phase == "decode" else None,
        rest_s=rest_s,
        step_s=step_s, tokens_per_s=tokens / step_s if step_s > 0 else None,
        tokens_per_s_with_rest=None if rest_s is None else tokens / (step_s + rest_s),
        last_core=f"({last % p},{last // p})",
        last_core_compute=float(busy[last]) / span, last_core_overhead=float(over[last]) / span,
        last_core_wait=float(wait[last]) / span,
        busy_fraction=busy_frac, idle_fraction=1.0 - busy_frac
        - float(over[active].sum()) / (span * n_act),
        layer_flops=int(round(lay["flops"])),
        layer_link_bytes=int(round(lay["link_bytes"].sum())),
        layer_messages=int(round(lay["messages"])), layer_hops=int(round(lay["hops"])),
        layer_max_link_utilisation=float(lay["link_busy"].max()) / span
        if len(lay["link_busy"]) else 0.0,
        layer_sram_max_bytes=layer_sram, layer_alone_sram_max_bytes=alone,
        one_layer_step_sram_max_bytes=sram1, sram_limit_bytes=target.sram_bytes,
        fits=bool(fits),
        compile_wall_s=compile_s, sim_wall_s=sim_s, events=sum(r.events for r in runs),
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


_SUMMED = ("makespan_cycles", "core_busy", "core_overhead", "core_wait", "link_bytes",
           "link_busy", "flops", "messages", "hops")


def _mix(*terms) -> dict:
    """sum of weight x run over (weight, SimResult) terms, for every quantity a layer adds."""
    return {k: sum(w * np.asarray(getattr(r, k), np.float64) for w, r in terms)
            for k in _SUMMED}


def _decode_layer(compiled, tgt: MeshTarget):
    """The 2-layer step minus the 1-layer step: (layer, 1-layer step cycles, runs)."""
    count = compiled.code.loop_count
    one, two = simulate_loops(compiled.code, tgt, [np.minimum(count, 1), np.minimum(count, 2)])
    return _mix((1, two), (-1, one)), one.makespan_cycles, [one, two]


def _prefill_layer(cfg: ModelConfig, tgt: MeshTarget, seq: int, sample: bool):
    """The layer's program alone, exact or sampled (module docstring), each program built,
    simulated and dropped in turn, the steps capped by MAX_LAYER_MESSAGES: (layer, the sampling's
    record or None, runs with the longest last, the layer's weights and caches and its whole
    program on the busiest core (bytes), compile seconds, simulate seconds)."""
    runs, build_s, sim_s = [], 0.0, 0.0
    steps, p = SAMPLED_STEPS[0], tgt.width
    sample = sample and p > steps
    while True:
        t0 = time.perf_counter()
        program = layer_alone(cfg, tgt, seq, steps if sample else None)
        if not runs:  # the sampled programs hold the same buffers
            size = program.buffer_bytes()
            alone = int(np.bincount(program.buf_core, size).max())
            layer_sram = int(np.bincount(program.buf_core,
                                         np.where(program.templated(), size, 0)).max())
        t1 = time.perf_counter()
        runs.append(simulate(program, tgt))
        del program
        build_s, sim_s = build_s + t1 - t0, sim_s + time.perf_counter() - t1
        if not sample:
            return _mix((1, runs[0])), None, runs, layer_sram, alone, build_s, sim_s
        added = np.diff([r.makespan_cycles for r in runs])  # cycles per step, in turn
        work = max(_work(runs[-1]) - _work(runs[-2])) if len(runs) > 1 else 0
        steady = (len(added) > 1 and abs(added[-1] - added[-2]) <= STEADY * added[-1]
                  and added[-1] >= work)
        if steady or (len(runs) > 1 and steps >= min(MAX_SAMPLED_STEPS, p)):
            break
        # the messages of the next program: affine in the steps (at most proportional)
        m = [r.messages for r in runs]
        nxt = 2 * m[-1] - m[-2] if len(m) > 1 else m[-1] * (steps + 1) / steps
        if nxt > MAX_LAYER_MESSAGES:
            if len(runs) > 1:
                break  # not steady: the extrapolation, or the work bound below
            raise ProgramError(
                f"--phase prefill --grid {p}: a second sampled step would need about "
                f"{nxt / 1e6:.0f} M messages, over the {MAX_LAYER_MESSAGES / 1e6:.0f} M this "
                "version simulates in one program (wafersim.layer.MAX_LAYER_MESSAGES); use a "
                "smaller grid or a shorter prompt")
        steps += 1
    w = p - steps  # the step is affine in the steps once steady: extrapolate from the last
    lay = _mix((1 + w, runs[-1]), (-w, runs[-2]))
    # No core finishes before its own work (exactly affine in the steps): a lower bound on
    # the layer, which the extrapolation can undershoot where it is not steady.
    bound = float(max(lay["core_busy"] + lay["core_overhead"]))
    record = dict(steps=[steps - 1, steps, p], cycles_per_step=[int(a) for a in added],
                  steady=bool(steady), work_bound=bool(bound > lay["makespan_cycles"]))
    lay["makespan_cycles"] = max(lay["makespan_cycles"], bound)
    return lay, record, runs, layer_sram, alone, build_s, sim_s


def _work(run) -> np.ndarray:
    return run.core_busy + run.core_overhead


def plot_sweep(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    r0 = rows[0]
    ax.plot([r["grid"] for r in rows], [r["tokens_per_s"] for r in rows], "o-")
    over = [r for r in rows if not r["fits"]]
    if over:
        ax.plot([r["grid"] for r in over], [r["tokens_per_s"] for r in over], "o", mfc="white",
                label="the layer does not fit a core's SRAM")
        ax.legend()
    ax.set_xlabel("P (grid P x P)")
    ax.set_ylabel("tokens/s (one layer x layer count)")
    sampled = ", sampled steps" if any(r["sampled"] for r in rows) else ""
    ax.set_title(f"{r0['model']} {r0['phase']}, {r0['attention']} attention, "
                 f"extrapolated{sampled}", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
