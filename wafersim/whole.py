"""Simulating a compiled whole model (a layout from compiler.model) and summarising it.

`layers="all"` runs every core's layer loop as many times as its region holds layers: every
layer's events are simulated, with the overlap between consecutive layers. `layers="one"` runs
each region's loop once and once more, and extrapolates linearly: the layers of a region are
the same instructions on different weights (the compiler's loop is the proof), so each further
layer adds the measured difference. With at most two layers per region `one` runs the whole
step (the twice-run loop is all of it). The result says which was done (`extrapolated`).

A prefill with sampled steps (compiler.prefill_model: grids too large for a layer's exact
program) is run, in the chosen layer mode, with its two bodies, whose GEMM and attention loops
run T1 < T2 of the grid's s steps; the step is then extrapolated linearly to s steps: time, and
every total (FLOPs, messages, bytes). Every step of such a loop has the same shape (the same
messages on the same routes, the same tile multiply), which is why its time is affine in the
steps; its accuracy against exact simulation is measured in docs/validation.md. The result
says so (`steps_sampled`, `extrapolated`). With `one`, the layer a region adds is measured on
the last layer region alone (its loop run twice, the others once): growing every region at
once also shifts the hand-offs between them, an interplay that a few sampled steps misjudge
and the extrapolation to s steps magnifies (17% on 64x64 grids, against 2% this way).
"""

from __future__ import annotations

import time

import numpy as np

from compiler.program import MeshProgram
from compiler.stamp import Stamped
from compiler.targets import MeshTarget
from wafersim.simulate import simulate, simulate_loops, totals

LAYER_MODES = ("all", "one")


def _capped(program: MeshProgram | Stamped, cap: int, region: dict | None = None
            ) -> np.ndarray:
    """Loop counts capped at `cap` runs; with `region` (a placement), that region's at
    cap + 1."""
    count = np.minimum(program.loop_count, cap)
    if region is not None:
        y = np.arange(region["y0"], region["y0"] + region["rows"])
        cores = (y[:, None] * program.width + region["x0"] + np.arange(region["cols"])).ravel()
        count[cores] = np.minimum(program.loop_count[cores], cap + 1)
    return count


# Two sampled steps are not always steady (docs/validation.md, "Prefill grid sweeps"): on
# LLaMA-3-8B's 375 x 375 regions (512 tokens) a step adds 1,473 cycles from 2 to 3 steps and
# 1,950 once steady (7 to 8), so the layer is 31% longer than steps 2 and 3 say and the TTFT
# about 29% (at 2,048 tokens: 42% and 22%, still rising at 8 steps); more steps need more
# memory than the whole model's 9.7 GB here, so the result carries this warning.
SAMPLED_CAVEAT = ("steps {} and {} of {} simulated and extrapolated, not checked for steadiness: "
                  "on wide grids later steps run slower, so this time is likely short (about "
                  "29% for LLaMA-3-8B's 512-token prompt on 375 x 375 regions, docs/validation.md)")


def _run(program: MeshProgram | Stamped, target: MeshTarget, info: dict, layers: str,
         sampled: bool = False):
    """(SimResult of a run, the step's cycles, events, totals, layers extrapolated)."""
    if layers == "all" or not program.looped or program.loop_count.max() <= 2:
        # (with at most two layers per region, "one" would simulate the whole step anyway)
        res = simulate(program, target)
        tot = dict(flops=res.flops, sram_bytes=res.sram_bytes, messages=res.messages,
                   hops=res.hops, link_bytes=res.link_bytes)
        return res, res.makespan_cycles, res.events, tot, False
    counts = [p["count"] for p in info["placements"] if p["count"] > 0]
    if sampled:  # the last region's second layer alone (module docstring)
        grown = 1
        longer = _capped(program, 1, [p for p in info["placements"] if p["count"] >= 2][-1])
    else:
        grown = sum(c >= 2 for c in counts)  # the regions whose second layer the runs differ by
        longer = _capped(program, 2)
    res, two = simulate_loops(program, target, [_capped(program, 1), longer])
    per_layer = (two.makespan_cycles - res.makespan_cycles) / grown
    makespan = res.makespan_cycles + per_layer * sum(c - 1 for c in counts)
    return res, makespan, res.events + two.events, totals(program, target), True


def simulate_layout(code: MeshProgram | Stamped, target: MeshTarget, info: dict,
                    layers: str = "all") -> dict:
    """Simulate and return the DESIGN.md summary keys plus the whole-model figures. `code`: a
    program, or a stamped program's parts (simulated without expanding them)."""
    if layers not in LAYER_MODES:
        raise ValueError(f"--layers {layers!r} is not one of {', '.join(LAYER_MODES)}")
    t0 = time.perf_counter()
    sampled = isinstance(code, Stamped) and code.sampled
    if sampled:
        steps = info["memory"]["steps"]
        (t1, t2), full = steps["sampled"], steps["full"]
        _, short, ev_short, tot_short, _ = _run(code.with_body(True), target, info, layers,
                                                True)
        program = code.with_body(False)
        res, long_, events, tot, extrapolated = _run(program, target, info, layers, True)
        w = (full - t2) / (t2 - t1)  # the step, linear in the sampled steps
        makespan = long_ + w * (long_ - short)
        tot = {k: v + w * (v - tot_short[k]) for k, v in tot.items()}
        events += ev_short
    else:
        program = code
        res, makespan, events, tot, extrapolated = _run(program, target, info, layers)
    wall = time.perf_counter() - t0
    batch, phase = info["batch"], info["phase"]
    seconds = makespan / target.clock_hz
    tokens = batch * info["ctx"] if phase == "prefill" else batch  # prefill: ctx is the prompt
    summary = res.summary(model=info["model_name"], phase=phase, batch=batch, ctx=info["ctx"],
                          tokens=tokens)
    fr = res.fractions()
    last = int(np.argmax(res.core_busy + res.core_overhead + res.core_wait))
    span = max(res.makespan_cycles, 1)
    active = max(int(res.core_active.sum()), 1)
    flops, sram_bytes = float(tot["flops"]), float(tot["sram_bytes"])
    summary.update(
        flops=flops, messages=int(tot["messages"]), hops=int(tot["hops"]),
        onchip_bytes=int(tot["link_bytes"].sum()),
        achieved_flops_per_s=flops / seconds,
        makespan_s=seconds, makespan_cycles=int(makespan), tokens_per_s=tokens / seconds,
        tpot_ms=seconds * 1e3 if phase == "decode" else None,
        ttft_ms=seconds * 1e3 if phase == "prefill" else None,
        events=int(events), sim_wall_s=wall,
        layers_simulated="one" if extrapolated else "all",
        steps_sampled=[t1, t2, full] if sampled else None,
        steps_caveat=SAMPLED_CAVEAT.format(t1, t2, full) if sampled else None,
        extrapolated=extrapolated or sampled,
        busy_fraction=fr["busy"], idle_fraction=fr["idle"],
        # The last core to finish: how its time splits (a proxy for the critical path).
        last_core=f"({last % program.width},{last // program.width})",
        last_core_compute=int(res.core_busy[last]) / span,
        last_core_overhead=int(res.core_overhead[last]) / span,
        last_core_wait=int(res.core_wait[last]) / span,
        flops_utilisation=flops / (seconds * target.peak_flops(program.dtype)),
        sram_bw_utilisation=sram_bytes / (makespan * active * target.sram_bytes_per_cycle),
        regions=len(info["placements"]),
        region="{rows}x{cols}".format(**info["placements"][0]),
        layers_per_region=[p["count"] for p in info["placements"]],
        sram_max_bytes=info["memory"]["sram_max_bytes"], max_ctx=info["memory"]["max_ctx"],
        max_batch=info["memory"].get("max_batch"),
        active_cores=active,
    )
    return summary

