"""Simulating a decode step pipelined over several wafers (compiler.multiwafer).

Each distinct stage program is simulated once with wafersim.whole.simulate_layout (stages of
equal layer count and ends are the same program). One step runs the stages one after another,
each waiting for h from the one before:

    step_s = sum(stage makespans) + (wafers - 1) * crossing_s
    crossing_s = io_latency_s + batch * d * dtype bytes / (edge I/O bytes/s)

With one step in flight (a batch of sequences decoding together), a wafer works only while its
stage runs: `bubble_fraction` = 1 - sum(stage makespans) / (wafers * step_s) of the wafers' time
is idle, the pipeline bubble. Filling it takes as many batches in flight as there are wafers,
each with its own KV caches on every wafer; that is not simulated here.
"""

from __future__ import annotations

from compiler.multiwafer import MultiWaferModel, tables_spread
from wafersim.whole import simulate_layout


def simulate_multiwafer(mw: MultiWaferModel, layers: str = "all") -> dict:
    """The DESIGN.md summary keys of one decode step over the cluster, plus per-stage rows,
    the inter-wafer traffic and the pipeline bubble."""
    cl, n = mw.cluster, len(mw.stages)
    runs: dict[int, dict] = {}
    for st in mw.stages:
        key = id(st.compiled)
        if key not in runs:
            runs[key] = simulate_layout(st.compiled.code, cl.wafer, st.compiled.info(), layers)
    per = [runs[id(st.compiled)] for st in mw.stages]
    crossing = cl.crossing_s(mw.crossing_bytes)
    compute_s = sum(r["makespan_s"] for r in per)
    step = compute_s + (n - 1) * crossing
    busy = sum(r["busy_fraction"] * r["makespan_s"] for r in per) / (n * step)
    stages = [dict(wafer=k, layers=f"{st.first}-{st.first + st.count - 1}", count=st.count,
                   embed=st.compiled.options.embed, head=st.compiled.options.head,
                   tables_spread=tables_spread(st.compiled),
                   regions=r["regions"], region=f"{st.compiled.placements[0].region.rows}x"
                                                f"{st.compiled.placements[0].region.cols}",
                   makespan_s=r["makespan_s"], busy_fraction=r["busy_fraction"],
                   sram_max_bytes=r["sram_max_bytes"], max_ctx=r["max_ctx"],
                   events=r["events"], extrapolated=r["extrapolated"])
              for k, (st, r) in enumerate(zip(mw.stages, per))]
    return {
        "system": cl.name, "model": mw.model.name, "phase": "decode", "batch": mw.batch,
        "ctx": mw.ctx, "fits": True, "makespan_s": step, "tokens_per_s": mw.batch / step,
        "tpot_ms": step * 1e3, "ttft_ms": None, "busy_fraction": busy,
        "idle_fraction": 1 - busy,
        "onchip_bytes": sum(r["onchip_bytes"] for r in per),
        "offchip_bytes": (n - 1) * mw.crossing_bytes,
        "wafers": n, "stages": stages, "interwafer_bytes": (n - 1) * mw.crossing_bytes,
        "crossing_s": crossing, "interwafer_s": (n - 1) * crossing,
        "io_latency_s": cl.io_latency_s, "io_bytes_per_s": cl.io_bytes_per_s,
        "bubble_fraction": 1 - compute_s / (n * step),
        "events": sum(runs[k]["events"] for k in runs),
        "sim_wall_s": sum(runs[k]["sim_wall_s"] for k in runs),
        "extrapolated": any(r["extrapolated"] for r in per),
        "layers_simulated": "one" if any(r["extrapolated"] for r in per) else "all",
        "max_ctx": min(r["max_ctx"] for r in per),
    }
