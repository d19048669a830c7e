"""Figures of a simulated mesh: utilisation, traffic, placement, memory, core timelines,
and the ops' roofline.

Every function returns a matplotlib Figure (Agg backend, nothing is shown). Mesh maps are
drawn as one image: a [height, width] array is reduced to at most `max_side` pixels a side by
block means (or maxima) first, so a full wafer (hundreds of thousands of cores) renders in
seconds; never one patch per core. Cores with no instructions are drawn grey (NaN).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from compiler.program import COMPUTE, RECV, SEND, MeshProgram  # noqa: E402
from compiler.targets import MeshTarget  # noqa: E402
from wafersim.result import SimResult  # noqa: E402

MAX_SIDE = 1000
E, W, N, S = range(4)  # link directions (link id = core * 4 + direction)


def block_reduce(a: np.ndarray, max_side: int = MAX_SIDE, how: str = "mean"
                 ) -> tuple[np.ndarray, int]:
    """Reduce a 2-D array by square blocks of f x f cells so that neither side exceeds
    `max_side`; returns (reduced, f). Ragged edges are padded with NaN and NaNs are ignored
    (a block of only NaN stays NaN)."""
    a = np.asarray(a, dtype=np.float64)
    h, w = a.shape
    f = max(1, math.ceil(max(h, w) / max_side))
    if f == 1:
        return a, 1
    hp, wp = -(-h // f) * f, -(-w // f) * f
    padded = np.full((hp, wp), np.nan)
    padded[:h, :w] = a
    blocks = padded.reshape(hp // f, f, wp // f, f)
    valid = ~np.isnan(blocks)
    count = valid.sum(axis=(1, 3))
    with np.errstate(invalid="ignore"):
        if how == "mean":
            out = np.where(valid, blocks, 0.0).sum(axis=(1, 3)) / count
        elif how == "max":
            out = np.where(valid, blocks, -np.inf).max(axis=(1, 3))
        else:
            raise ValueError(f"block reduction {how!r} is not one of mean, max")
    out[count == 0] = np.nan
    return out, f


def _mesh_panel(fig: Figure, ax, grid: np.ndarray, title: str, label: str, max_side: int,
                how: str = "mean", vmax: float | None = 1.0, cmap: str = "viridis") -> None:
    img, f = block_reduce(grid, max_side, how)
    h, w = grid.shape
    cm = plt.get_cmap(cmap).with_extremes(bad="0.8")
    im = ax.imshow(np.ma.masked_invalid(img), cmap=cm, vmin=0, vmax=vmax, origin="upper",
                   extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
    ax.set_title(title + (f" ({how} of {f}x{f} blocks)" if f > 1 else ""), fontsize=9)
    ax.set_xlabel("x (core column)")
    ax.set_ylabel("y (core row)")
    fig.colorbar(im, ax=ax, label=label, shrink=0.8)


def _grid(result_or_shape, values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    w, h = result_or_shape
    g = np.asarray(values, dtype=np.float64).reshape(h, w).copy()
    if mask is not None:
        g[~mask.reshape(h, w)] = np.nan
    return g


def util_map(result: SimResult, max_side: int = MAX_SIDE) -> Figure:
    """Busy (compute) fraction and idle fraction of the makespan, per core."""
    span = max(result.makespan_cycles, 1)
    shape = (result.width, result.height)
    busy = _grid(shape, result.core_busy / span, result.core_active)
    idle = _grid(shape, result.core_idle / span, result.core_active)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    _mesh_panel(fig, axes[0], busy, "compute (busy) fraction", "busy / makespan", max_side)
    _mesh_panel(fig, axes[1], idle, "idle fraction (waiting or finished)", "idle / makespan",
                max_side, cmap="magma")
    fig.suptitle(f"{result.system}: {result.width}x{result.height} mesh, makespan "
                 f"{result.makespan_s * 1e6:.3g} us; grey = no instructions", fontsize=10)
    return fig


def link_fractions(result: SimResult, reduce: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """Per core: busy fraction of its outgoing horizontal (E, W) and vertical (N, S) links,
    reduced by max or sum; [height, width] arrays."""
    span = max(result.makespan_cycles, 1)
    lb = np.asarray(result.link_busy, dtype=np.float64).reshape(-1, 4) / span
    op = {"max": np.max, "sum": np.sum}.get(reduce)
    if op is None:
        raise ValueError(f"link reduction {reduce!r} is not one of max, sum")
    shape = (result.height, result.width)
    return op(lb[:, [E, W]], axis=1).reshape(shape), op(lb[:, [N, S]], axis=1).reshape(shape)


def traffic_map(result: SimResult, reduce: str = "max", split: bool = True,
                max_side: int = MAX_SIDE) -> Figure:
    """Link busy fraction per core (its outgoing links, `reduce`d), horizontal and vertical
    links side by side (`split`) or all four together."""
    hor, ver = link_fractions(result, reduce)
    vmax = 1.0 if reduce == "max" else None
    how = "max" if reduce == "max" else "mean"
    if split:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
        _mesh_panel(fig, axes[0], hor, f"E/W links ({reduce})", "busy / makespan", max_side,
                    how, vmax, "inferno")
        _mesh_panel(fig, axes[1], ver, f"N/S links ({reduce})", "busy / makespan", max_side,
                    how, vmax, "inferno")
    else:
        fig, ax = plt.subplots(figsize=(6.5, 5), constrained_layout=True)
        both = np.maximum(hor, ver) if reduce == "max" else hor + ver
        _mesh_panel(fig, ax, both, f"all links ({reduce})", "busy / makespan", max_side, how,
                    vmax, "inferno")
    fig.suptitle(f"{result.system}: link busy fraction, hottest link "
                 f"{result.link_utilisation():.1%}", fontsize=10)
    return fig


def placement_map(info: dict, width: int, height: int) -> Figure:
    """The layout's regions, coloured by their first layer, labelled with their layer range;
    regions holding the embedding or the LM head are marked."""
    places = info["placements"]
    n_layers = max([p["first"] + p["count"] for p in places] + [1])
    fig, ax = plt.subplots(figsize=(7, 7 * height / max(width, 1) + 0.8),
                           constrained_layout=True)
    ax.add_patch(Rectangle((0, 0), width, height, facecolor="0.92", edgecolor="0.5"))
    cmap = plt.get_cmap("viridis")
    for p in places:
        x0, y0, cols, rows = p["x0"], p["y0"], p["cols"], p["rows"]
        colour = cmap(p["first"] / max(n_layers - 1, 1)) if p["count"] else "0.6"
        ax.add_patch(Rectangle((x0, y0), cols, rows, facecolor=colour, edgecolor="k",
                               linewidth=0.6))
        text = (f"L{p['first']}" + (f"-{p['first'] + p['count'] - 1}" if p["count"] > 1 else "")
                if p["count"] else "no layers")
        marks = [m for m in ("embed", "head") if p.get(m)]
        if marks:
            text += "\n+" + "+".join(marks)
        ax.text(x0 + cols / 2, y0 + rows / 2, text, ha="center", va="center",
                fontsize=max(4, min(9, 600 / max(len(places), 1) ** 0.5 / 10)),
                color="w" if p["count"] else "k")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("x (core column)")
    ax.set_ylabel("y (core row)")
    ax.set_title(f"{info.get('model_name', '?')} {info.get('phase', '')}: "
                 f"{len(places)} regions, {n_layers} layers on {width}x{height}", fontsize=10)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, max(n_layers - 1, 1)))
    fig.colorbar(sm, ax=ax, label="first layer of the region", shrink=0.7)
    return fig


def memory_map(program: MeshProgram, target: MeshTarget, max_side: int = MAX_SIDE) -> Figure:
    """SRAM bytes per core as a fraction of the target's SRAM (block maxima when reduced).
    Needs a full program (load_layout(..., timing_only=False))."""
    sram = program.sram_per_core()
    active = np.diff(program.core_ptr) > 0
    frac = _grid((program.width, program.height), sram / target.sram_bytes,
                 active | (sram > 0))
    fig, ax = plt.subplots(figsize=(6.5, 5), constrained_layout=True)
    _mesh_panel(fig, ax, frac, "SRAM used / SRAM per core", "fraction", max_side, "max",
                max(1.0, float(np.nanmax(frac, initial=0))), "cividis")
    fig.suptitle(f"{target.name}: most {int(sram.max(initial=0)):,} B of "
                 f"{target.sram_bytes:,} B per core", fontsize=10)
    return fig


_COLOURS = {COMPUTE: "tab:green", SEND: "tab:blue", RECV: "tab:orange"}


def timeline(program: MeshProgram, target: MeshTarget, cores: list[int] | None = None,
             max_cores: int = 8) -> Figure:
    """A Gantt chart of chosen cores (default: the last to finish and evenly sampled active
    ones): every instruction at its simulated start time, receive waits hatched grey. Times
    come from wafersim.trace (exact replay; looped programs run each loop once)."""
    from wafersim.trace import core_timelines

    tl = core_timelines(program, target, cores, max_cores=max_cores)
    us = 1e6 / tl.clock_hz
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.45 * len(tl.cores)), constrained_layout=True)
    for row, ct in enumerate(tl.cores):
        waited = ct.wait > 0
        ax.broken_barh(list(zip((ct.start[waited] - ct.wait[waited]) * us, ct.wait[waited] * us)),
                       (row - 0.4, 0.8), facecolors="0.85", hatch="///", edgecolor="0.6",
                       linewidth=0)
        for kind, colour in _COLOURS.items():
            sel = ct.kind == kind
            ax.broken_barh(list(zip(ct.start[sel] * us, (ct.end[sel] - ct.start[sel]) * us)),
                           (row - 0.4, 0.8), facecolors=colour, linewidth=0)
    ax.set_yticks(range(len(tl.cores)),
                  [f"({c.core % tl.width},{c.core // tl.width})" for c in tl.cores])
    ax.invert_yaxis()
    ax.set_xlim(0, tl.makespan_cycles * us)
    ax.set_xlabel("simulated time (us)")
    ax.set_ylabel("core (x,y)")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in _COLOURS.values()]
    handles.append(Rectangle((0, 0), 1, 1, facecolor="0.85", hatch="///", edgecolor="0.6"))
    fig.legend(handles, ["compute", "send", "recv", "wait"], loc="outside lower center",
               fontsize=8, ncols=4)
    note = ", each region's layer loop run once" if tl.loop_capped else ""
    ax.set_title(f"core timelines on {target.name}{note}", fontsize=10)
    return fig


def compare_bars(summary_wafer: dict, summary_gpu: dict) -> Figure:
    """Wafer vs GPU: tokens/s, TPOT (or TTFT) and busy fraction, from `wafersim compare
    --json`'s "wafer" and "gpus" dicts (missing or null values are left out)."""
    metrics = [("tokens_per_s", "tokens / s", 1.0), ("tpot_ms", "TPOT (ms)", 1.0),
               ("ttft_ms", "TTFT (ms)", 1.0), ("busy_fraction", "busy fraction", 1.0)]
    shown = [(k, label) for k, label, _ in metrics
             if summary_wafer.get(k) is not None or summary_gpu.get(k) is not None]
    fig, axes = plt.subplots(1, max(len(shown), 1), figsize=(3.2 * max(len(shown), 1), 3.6),
                             constrained_layout=True, squeeze=False)
    names = [summary_wafer.get("system") or "wafer", summary_gpu.get("system") or "GPUs"]
    for ax, (key, label) in zip(axes[0], shown):
        vals = [summary_wafer.get(key) or 0.0, summary_gpu.get(key) or 0.0]
        bars = ax.bar(names, vals, color=["tab:purple", "tab:gray"])
        ax.bar_label(bars, [f"{v:.3g}" for v in vals], fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"{summary_wafer.get('model') or ''} {summary_wafer.get('phase') or ''}: "
                 "wafer vs GPU", fontsize=10)
    return fig


def roofline(ops, target: MeshTarget, dtype: str, gpu=None, achieved: tuple | None = None,
             title: str = "") -> Figure:
    """Each op (models.ops.Op with FLOPs: one layer's and the model's ends) at its arithmetic
    intensity, FLOPs per byte of the data it reads and writes, on the wafer's roofline (peak
    FLOP/s; SRAM bandwidth of all cores, where a core's weights live) and, with `gpu` (a
    baseline GPUSpec), on that GPU's (datasheet peak; HBM bandwidth). A point sits at the
    op's bound, min(peak, intensity x bandwidth). `achieved`: (intensity, FLOP/s) of a
    simulated wafer step, drawn as a star: how far the step falls below its ops' bounds."""
    ops = [op for op in ops if op.flops > 0 and op.bytes > 0]
    ai = np.array([op.flops / op.bytes for op in ops])
    roofs = [("wafer " + target.name, target.peak_flops(dtype),
              target.sram_bytes_per_cycle * target.cores * target.clock_hz, "tab:purple", "o")]
    if gpu is not None:
        rate = gpu.peak_flops.get(dtype, gpu.peak_flops.get("bf16"))
        roofs.append((gpu.name, rate, gpu.hbm_bw_Bps, "tab:gray", "s"))
    lo = min(float(ai.min(initial=1.0)), achieved[0] if achieved else 1.0) / 4
    hi = max(float(ai.max(initial=1.0)), max(p / b for _, p, b, _, _ in roofs)) * 4
    x = np.geomspace(lo, hi, 200)
    fig, ax = plt.subplots(figsize=(7.5, 5), constrained_layout=True)
    for name, peak, bw, colour, marker in roofs:
        ax.plot(x, np.minimum(peak, x * bw), color=colour, label=f"{name} roof")
        ax.scatter(ai, np.minimum(peak, ai * bw), color=colour, marker=marker, s=24, zorder=3)
    groups: dict[float, list[str]] = {}  # ops of (nearly) equal intensity share one label
    for op, a in zip(ops, ai):
        names = groups.setdefault(round(math.log10(a), 1), [])
        if op.name.split(".")[-1] not in names:
            names.append(op.name.split(".")[-1])
    for k, (lg, names) in enumerate(sorted(groups.items())):
        a = 10 ** lg
        ax.annotate(", ".join(names), (a, min(roofs[0][1], a * roofs[0][2])), fontsize=6,
                    rotation=30, xytext=(3, 4 + 10 * (k % 2)), textcoords="offset points")
    if achieved:
        ax.scatter([achieved[0]], [achieved[1]], marker="*", s=150, color="tab:red", zorder=4,
                   label="simulated wafer step")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(top=max(peak for _, peak, _, _, _ in roofs) * 60)  # room for the labels
    ax.set_xlabel("arithmetic intensity (FLOP / byte read or written)")
    ax.set_ylabel("FLOP/s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or f"ops on {target.name}, {dtype}", fontsize=10)
    return fig


def save(fig: Figure, path: str, dpi: int = 120) -> None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
