"""Simulating a compiled whole model (a layout from compiler.model) and summarising it.

`layers="all"` runs every core's layer loop as many times as its region holds layers: every
layer's events are simulated, with the overlap between consecutive layers. `layers="one"` runs
each region's loop once and once more, and extrapolates linearly: the layers of a region are
the same instructions on different weights (the compiler's loop is the proof), so each further
layer adds the measured difference. With at most two layers per region `one` runs the whole
step (the twice-run loop is all of it). The result says which was done (`extrapolated`).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from compiler.program import MeshProgram
from compiler.targets import MeshTarget
from wafersim.simulate import simulate, totals

LAYER_MODES = ("all", "one")


def _with_counts(program: MeshProgram, cap: int) -> MeshProgram:
    return dataclasses.replace(program, loop_count=np.minimum(program.loop_count, cap))


def simulate_layout(program: MeshProgram, target: MeshTarget, info: dict,
                    layers: str = "all") -> dict:
    """Simulate and return the DESIGN.md summary keys plus the whole-model figures."""
    if layers not in LAYER_MODES:
        raise ValueError(f"--layers {layers!r} is not one of {', '.join(LAYER_MODES)}")
    t0 = time.perf_counter()
    if layers == "all" or not program.looped or program.loop_count.max() <= 2:
        # (with at most two layers per region, "one" would simulate the whole step anyway)
        res = simulate(program, target)
        makespan, events, extrapolated = res.makespan_cycles, res.events, False
    else:
        res = simulate(_with_counts(program, 1), target)
        two = simulate(_with_counts(program, 2), target)
        counts = [p["count"] for p in info["placements"] if p["count"] > 0]
        per_layer = (two.makespan_cycles - res.makespan_cycles) / len(counts)
        makespan = res.makespan_cycles + per_layer * sum(c - 1 for c in counts)
        events, extrapolated = res.events + two.events, True
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
    tot = totals(program, target) if extrapolated else dict(  # the whole step, every layer
        flops=res.flops, sram_bytes=res.sram_bytes, messages=res.messages, hops=res.hops,
        link_bytes=res.link_bytes)
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
        extrapolated=extrapolated,
        busy_fraction=fr["busy"], idle_fraction=fr["idle"],
        # The last core to finish: how its time splits (a proxy for the critical path).
        last_core=f"({last % program.width},{last // program.width})",
        last_core_compute=int(res.core_busy[last]) / span,
        last_core_overhead=int(res.core_overhead[last]) / span,
        last_core_wait=int(res.core_wait[last]) / span,
        flops_utilisation=flops / (seconds * target.peak_flops(program.dtype)),
        sram_bw_utilisation=sram_bytes / (makespan * active * target.sram_bytes_per_cycle),
        regions=len(info["placements"]),
        layers_per_region=[p["count"] for p in info["placements"]],
        sram_max_bytes=info["memory"]["sram_max_bytes"], max_ctx=info["memory"]["max_ctx"],
        max_batch=info["memory"].get("max_batch"),
        active_cores=active,
    )
    return summary

