"""Figures of a simulated mesh: utilisation, traffic, placement, memory, core timelines.

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
    cm = plt.get_cmap(cmap).copy()
    cm.set_bad("0.8")
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


def save(fig: Figure, path: str, dpi: int = 120) -> None:
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
