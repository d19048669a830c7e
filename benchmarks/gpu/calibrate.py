"""Fit the GPU baseline's achievable fractions and overheads to the microbenchmarks.

Reads a JSONL file written by measure_single.py and uses ONLY its microbenchmarks (copy,
GEMV, GEMM, eager launch, CUDA-graph launch); the end-to-end decode/prefill points are left
for validate.py.  The fits:

- GEMV: t = bytes / BW + c over every GEMV point, least squares on relative error.
  achievable_bw_frac = BW / datasheet bandwidth; c is the fixed cost of one cuBLAS call in a
  CUDA graph (its launch gap, ramp-up and tail, and the split-K reduction kernel it sometimes
  adds), so matmul_overhead_s = c - graph_kernel_overhead_s.
- GEMM: t = flops / R + c with c from the GEMV fit, over the compute-bound points (closed-form
  least squares on relative error); achievable_flops_frac = R / datasheet bf16 rate.
- graph_kernel_overhead_s: replay time per kernel of a CUDA graph of 2000 one-element adds.
- kernel_overhead_s: time per kernel of 2000 eager one-element adds issued back to back.

    python benchmarks/gpu/calibrate.py benchmarks/gpu/results/h100.jsonl --peak-bw 3.35e12

Kernel models (wafersim/baseline/kernels.py has the forms) are fitted by `calibrate_kernels`
to the kernel microbenchmarks of measure_kernels.py (results/<gpu>_kernels.jsonl) plus the
matmul microbenchmarks of both files, byte and FLOP counts taken from models.ops exactly as
the baseline counts them; least squares on relative error throughout:

- matmul eta(m, k, n) = measured time / roofline time (the global fractions above) at every
  microbenchmarked shape; where a shape is in both files the one measured in the same session
  as the end-to-end points (<gpu>.jsonl) is kept.
- decode attention bmm (score, value): fixed_s and unit_frac of
  t = fixed + bytes / (peak_bw * min(achievable_bw_frac, units * unit_frac)), units = batch x
  KV heads; unit_frac by a log grid, fixed_s in closed form for each.
- softmax on real scores = the score-softmax-value chain minus the score and value kernels
  timed alone (the chain computes its scores from q and K, as the model does; softmax alone
  on N(0,1) data runs faster, see attn_probe). Warp regime (cols <= 2048):
  t = fixed + cols * (s_col + s_col_lnrow * ln(rows)); block regime: t = fixed + bytes / bw.
- flash attention: t = fixed + flops / rate + qo_elems * s_qo over the attn_prefill points.
- streaming elementwise kinds: t = fixed + bytes / bw, fixed from the decode sizes (rows 1, 8,
  32: bytes are < 0.3 us there, taken at the GEMV bandwidth), bw from the 2048-row points
  (working set beyond the L2) given that fixed cost: an HBM roofline with a per-kernel cost.
  The 512-row points, L2-resident in the microbenchmark, are fitted by neither (their error
  is reported).
- sample (argmax): t = fixed + cols * s.

    PYTHONPATH=. python benchmarks/gpu/calibrate.py --kernels       # fits and their errors
    PYTHONPATH=. python benchmarks/gpu/calibrate.py --write-kernel-models

NVLink collectives (measure_multi.py's NCCL sweep, results/h200x2.jsonl): the CUDA-graph
all-reduce on 2 GPUs is t = graph gap + collective_s + 2 latency_s + bytes / (bw x frac)
(collectives.ring_allreduce, n = 2), least squares on relative error over 8 KB - 256 MB for
collective_s (NCCL's fixed cost per call) and frac (of the datasheet bandwidth), with the
per-step latency_s kept at the link's preset (2 GPUs cannot tell it from the fixed cost).
All-gather and send/recv on the same link are predicted, not fitted:

    PYTHONPATH=. python benchmarks/gpu/calibrate.py --nccl benchmarks/gpu/results/h200x2.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[2]
KERNEL_FILES = {"H100": ("h100.jsonl", "h100_kernels.jsonl"),
                "H200": ("h200.jsonl", "h200_kernels.jsonl")}
SOFTMAX_WARP_MAX_COLS = 2048  # PyTorch's warp-per-row softmax limit (bf16), seen in attn_profile
# Elementwise points with fewer rows fit the fixed cost; those with at least STREAM_HBM_ROWS
# (their two alternating buffer sets exceed the L2) fit the HBM bandwidth. The rows-512 points
# in between run largely from L2 in the microbenchmark and are fitted by neither.
STREAM_FIXED_MAX_ROWS = 32
STREAM_HBM_ROWS = 2048


def load(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _fit_line(x: list[float], t: list[float]) -> tuple[float, float]:
    """(a, c) minimising sum(((a*x + c) - t) / t)^2."""
    sxx = sum((xi / ti) ** 2 for xi, ti in zip(x, t, strict=True))
    sx1 = sum(xi / ti**2 for xi, ti in zip(x, t, strict=True))
    s11 = sum(1 / ti**2 for ti in t)
    sx = sum(xi / ti for xi, ti in zip(x, t, strict=True))
    s1 = sum(1 / ti for ti in t)
    det = sxx * s11 - sx1 * sx1
    return (sx * s11 - s1 * sx1) / det, (sxx * s1 - sx1 * sx) / det


def calibrate(records: list[dict], peak_bw_Bps: float, peak_flops: float) -> dict:
    gemv = [r for r in records if r["kind"] == "gemv"]
    a, c = _fit_line([r["bytes"] for r in gemv], [r["median_s"] for r in gemv])
    bw = 1.0 / a
    gemm = [r for r in records if r["kind"] == "gemm"]
    bound = [r for r in gemm if r["flops"] / (0.7 * peak_flops) > r["bytes"] / bw]
    num = sum(r["flops"] / r["median_s"] * (r["median_s"] - c) / r["median_s"] for r in bound)
    den = sum((r["flops"] / r["median_s"]) ** 2 for r in bound)
    rate = den / num
    graph = next(r for r in records if r["kind"] == "graph_launch"
                 and r["shape"]["kernel"].startswith("add_"))["median_s"]
    eager = next(r for r in records if r["kind"] == "launch")["median_s"]
    copy = max(r["bw_Bps"] for r in records if r["kind"] == "copy")
    gpu = records[0]["gpu"]
    return {
        "gpu": gpu,
        "gemv_bw_Bps": bw,
        "achievable_bw_frac": bw / peak_bw_Bps,
        "copy_bw_Bps": copy,
        "copy_bw_frac": copy / peak_bw_Bps,
        "gemm_flops": rate,
        "achievable_flops_frac": rate / peak_flops,
        "matmul_fixed_s": c,
        "graph_kernel_overhead_s": graph,
        "matmul_overhead_s": c - graph,
        "kernel_overhead_s": eager,
        "gemv_points": len(gemv),
        "gemm_points": len(bound),
        "gemv_fit_max_rel_err": max(abs(a * r["bytes"] + c - r["median_s"]) / r["median_s"]
                                    for r in gemv),
        "gemv_fit_median_rel_err": statistics.median(
            abs(a * r["bytes"] + c - r["median_s"]) / r["median_s"] for r in gemv),
        "gemm_fit_max_rel_err": max(abs(r["flops"] / rate + c - r["median_s"]) / r["median_s"]
                                    for r in bound),
    }


# --------------------------------------------------------------------------- kernel models
def _wls(cols: list[list[float]], t: list[float]) -> list[float]:
    """p minimising sum(((X p - t) / t)^2), X's columns given."""
    x = np.array(cols, dtype=float).T
    y = np.array(t, dtype=float)
    p, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    return [float(v) for v in p]


def _ops():
    import models.ops as ops
    return ops


def _cfg(heads: int, kv_heads: int) -> SimpleNamespace:
    return SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads,
                           dtype_bytes=2)


def decode_attention_works(batch: int, ctx: int, heads: int, kv_heads: int, d: int):
    """The baseline's (score, softmax, value) Work items of one layer's decode attention over
    `ctx` tokens attended (ctx - 1 cached plus the new one)."""
    from wafersim.baseline import costs
    ops, cfg = _ops(), _cfg(heads, kv_heads)
    shape = dict(layer=0, batch=batch, heads=heads, kv_heads=kv_heads, q_rows=1,
                 cached=ctx - 1, head_dim=d, dtype="bf16")
    score = ops.attn_score("L0.attn_score", **shape)
    value = ops.attn_value("L0.attn_value", **shape)
    soft = ops.elementwise("L0.softmax", "softmax", 0, 1, ctx, "bf16", count=batch * heads,
                           heads=heads)
    return tuple(costs._work(op, cfg) for op in (score, soft, value))


def flash_work(seq: int, heads: int, kv_heads: int, d: int):
    from wafersim.baseline import costs
    ops, cfg = _ops(), _cfg(heads, kv_heads)
    shape = dict(layer=0, batch=1, heads=heads, kv_heads=kv_heads, q_rows=seq, cached=0,
                 head_dim=d, dtype="bf16")
    soft = ops.elementwise("L0.softmax", "softmax", 0, seq, seq, "bf16", count=heads,
                           heads=heads)
    return costs._flash(ops.attn_score("L0.attn_score", **shape), soft,
                        ops.attn_value("L0.attn_value", **shape), cfg, seq)


def eltwise_works(rec: dict) -> list:
    """The baseline's Work items for one eltwise microbenchmark (RoPE: the q and k ops)."""
    from wafersim.baseline import costs
    ops, s = _ops(), rec["shape"]
    h, rows, op = s["heads"], s["rows"], s["op"]
    cfg = _cfg(h, s["kv_heads"])
    d = s["head_dim"]
    if op == "rmsnorm":
        got = [ops.norm("L0.attn_norm", "rmsnorm", 0, rows, s["cols"], "bf16")]
    elif op == "rope":
        got = [ops.elementwise("L0.q_rope", "rope", 0, rows, h * d, "bf16"),
               ops.elementwise("L0.k_rope", "rope", 0, rows, s["kv_heads"] * d, "bf16")]
    elif op == "silu":
        got = [ops.elementwise("L0.act", "activation", 0, rows, s["cols"], "bf16")]
    elif op in ("mul", "add"):
        got = [ops.elementwise("L0.x", op, 0, rows, s["cols"], "bf16", operands=2)]
    elif op == "embedding":
        got = [ops.embedding("embed", rows, 32000, s["cols"], "bf16")]
    else:  # argmax
        got = [ops.sample("sample", rows, s["cols"], "bf16")]
    return [costs._work(o, cfg) for o in got]


def model_time_s(works, gpu) -> float:
    """The baseline's time for these Work items on one GPU (tp = 1, CUDA graphs)."""
    from wafersim.baseline import costs
    return sum(costs.work_kernel_time_s(w, *costs.shard(w, 1), gpu) for w in works)


def _by_shape(recs: list[dict], kind: str) -> dict:
    out = {}
    for r in recs:
        if r["kind"] == kind and "median_s" in r:
            out[tuple(sorted((k, v) for k, v in r["shape"].items() if k != "kn"))] = r
    return out


def _decode_points(kernel_recs: list[dict]) -> list[dict]:
    """One row per (heads, batch, ctx): times of score, softmax alone, value, chain."""
    rows: dict = {}
    for r in kernel_recs:
        if r["kind"] != "attn_decode":
            continue
        s = r["shape"]
        key = (s["model"], s["batch"], s["ctx"])
        rows.setdefault(key, {**{k: s[k] for k in ("model", "batch", "ctx", "heads",
                                                    "kv_heads", "head_dim")}})
        rows[key][s["kernel"]] = r["median_s"]
    out = [r for r in rows.values() if all(k in r for k in ("score", "value", "chain"))]
    for r in out:
        r["softmax_real"] = r["chain"] - r["score"] - r["value"]
    return out


def _fit_bmm(points: list[tuple[float, int, float]], peak_bw: float, bw_frac: float):
    """(fixed_s, unit_frac) for t = fixed + bytes / (peak_bw * min(bw_frac, units * u))."""
    t = np.array([p[2] for p in points])
    best = None
    for u in np.logspace(-4, 0, 4001):
        x = np.array([p[0] / (peak_bw * min(bw_frac, p[1] * u)) for p in points])
        fixed = float(np.sum((t - x) / t**2) / np.sum(1 / t**2))
        sse = float(np.sum(((fixed + x) / t - 1) ** 2))
        if best is None or sse < best[0]:
            best = (sse, fixed, float(u))
    return best[1], best[2]


def matmul_eta_table(single: list[dict], kernel_recs: list[dict], gpu) -> dict:
    """{(k, n): ((m, eta), ...)}: measured / roofline time at every matmul microbenchmark."""
    from wafersim.baseline import costs
    ops = _ops()
    times: dict = {}
    for recs in (kernel_recs, single):  # the same-session file (single) wins on a tie
        for r in recs:
            if r["kind"] in ("gemv", "gemm") and "median_s" in r:
                s = r["shape"]
                times[(s["m"], s["k"], s["n"])] = r["median_s"]
    table: dict = {}
    for (m, k, n), t in sorted(times.items()):
        op = ops.matmul("x", "gemm", 0, m, k, n, "bf16")
        roof = costs.kernel_time_s(op.flops, op.bytes, "gemm", "bf16", gpu)
        table.setdefault((k, n), []).append((m, t / roof))
    return {kn: tuple(v) for kn, v in table.items()}


def calibrate_kernels(single: list[dict], kernel_recs: list[dict], gpu) -> dict:
    """Fit the KernelModels of `gpu` (a GPUSpec holding its global fractions); returns the
    KernelModels fields plus 'fit' (errors per family over the points fitted)."""
    from wafersim.baseline.kernels import KernelModels
    peak_bw, frac = gpu.hbm_bw_Bps, gpu.achievable_bw_frac
    dec = _decode_points(kernel_recs)
    fields: dict = {}
    for kind, idx in (("score", 0), ("value", 2)):
        pts = []
        for r in dec:
            w = decode_attention_works(r["batch"], r["ctx"], r["heads"], r["kv_heads"],
                                       r["head_dim"])[idx]
            pts.append((w.weight_bytes + w.act_bytes + w.kv_bytes,
                        r["batch"] * r["kv_heads"], r[kind]))
        fields[f"{kind}_fixed_s"], fields[f"{kind}_unit_frac"] = _fit_bmm(pts, peak_bw, frac)
    warp = [r for r in dec if r["ctx"] <= SOFTMAX_WARP_MAX_COLS]
    block = [r for r in dec if r["ctx"] > SOFTMAX_WARP_MAX_COLS]
    c, s0, s1 = _wls([[1.0] * len(warp), [r["ctx"] for r in warp],
                      [r["ctx"] * math.log(r["batch"] * r["heads"]) for r in warp]],
                     [r["softmax_real"] for r in warp])
    fields.update(softmax_warp_max_cols=SOFTMAX_WARP_MAX_COLS, softmax_warp_fixed_s=c,
                  softmax_warp_s_per_col=s0, softmax_warp_s_per_col_lnrow=s1)
    sm_bytes = [decode_attention_works(r["batch"], r["ctx"], r["heads"], r["kv_heads"],
                                       r["head_dim"])[1].act_bytes for r in block]
    c, a = _wls([[1.0] * len(block), sm_bytes], [r["softmax_real"] for r in block])
    fields.update(softmax_block_fixed_s=c, softmax_block_bw_frac=1.0 / (a * peak_bw))
    fa = [r for r in kernel_recs if r["kind"] == "attn_prefill" and "median_s" in r]
    fws = [flash_work(r["shape"]["seq"], r["shape"]["heads"], r["shape"]["kv_heads"],
                      r["shape"]["head_dim"]) for r in fa]
    c, a, sq = _wls([[1.0] * len(fa), [w.flops for w in fws], [w.m * w.k * w.heads
                                                                 for w in fws]],
                    [r["median_s"] for r in fa])
    fields.update(flash_fixed_s=c, flash_flops_frac=1.0 / (a * gpu.peak_flops["bf16"]),
                  flash_s_per_qo_elem=sq)
    el = [r for r in kernel_recs if r["kind"] == "eltwise" and "median_s" in r]
    stream = {}
    for op, kind in (("rmsnorm", "rmsnorm"), ("rope", "rope"), ("silu", "activation"),
                     ("mul", "mul"), ("add", "add"), ("embedding", "embedding")):
        pts = [(sum(w.weight_bytes + w.act_bytes for w in eltwise_works(r)), r["median_s"],
                r["shape"]["rows"]) for r in el if r["shape"]["op"] == op]
        small = [(b, t) for b, t, rows in pts if rows <= STREAM_FIXED_MAX_ROWS]
        big = [(b, t) for b, t, rows in pts if rows >= STREAM_HBM_ROWS]
        # the fixed cost from the decode sizes (bytes at the GEMV bandwidth: < 0.3 us there),
        # then the bandwidth from the prefill sizes given it
        c = _wls([[1.0] * len(small)], [t - b / (peak_bw * frac) for b, t in small])[0]
        a = _wls([[b for b, _ in big]], [t - c for _, t in big])[0]
        stream[kind] = (c, 1.0 / (a * peak_bw))
    am = [r for r in el if r["shape"]["op"] == "argmax"]
    c, a = _wls([[1.0] * len(am), [r["shape"]["cols"] for r in am]],
                [r["median_s"] for r in am])
    fields.update(sample_fixed_s=c, sample_s_per_col=a, stream=stream)
    fields["matmul_eta"] = matmul_eta_table(single, kernel_recs, gpu)
    km = KernelModels(source="", **fields)
    fields["fit"] = kernel_fit_errors(single, kernel_recs, replace(gpu, kernels=km))
    return fields


def kernel_fit_errors(single: list[dict], kernel_recs: list[dict], gpu) -> dict:
    """Per family: (points, max |error|, median |error|) of the model (gpu.kernels) against
    the microbenchmarks; 'chain' is score + softmax + value against the timed chain,
    'probe_chain' the same at the attn_probe contexts (not fitted: held out)."""
    fams: dict[str, list[float]] = {}

    def add(name, pred, meas):
        fams.setdefault(name, []).append(pred / meas - 1.0)

    for r in _decode_points(kernel_recs):
        ws = decode_attention_works(r["batch"], r["ctx"], r["heads"], r["kv_heads"],
                                    r["head_dim"])
        for name, w in zip(("score", "softmax", "value"), ws, strict=True):
            add(name, model_time_s([w], gpu), r[name if name != "softmax" else
                                                "softmax_real"])
        add("chain", model_time_s(ws, gpu), r["chain"])
    for r in kernel_recs:
        if r["kind"] == "attn_probe" and r["shape"]["kernel"] == "chain":
            s = r["shape"]
            ws = decode_attention_works(s["batch"], s["ctx"], s["heads"], s["kv_heads"],
                                        s["head_dim"])
            add("probe_chain", model_time_s(ws, gpu), r["median_s"])
        elif r["kind"] == "attn_prefill" and "median_s" in r:
            s = r["shape"]
            w = flash_work(s["seq"], s["heads"], s["kv_heads"], s["head_dim"])
            add("flash", model_time_s([w], gpu), r["median_s"])
        elif r["kind"] == "eltwise" and "median_s" in r:
            add(r["shape"]["op"], model_time_s(eltwise_works(r), gpu), r["median_s"])
    return {k: (len(v), max(abs(e) for e in v), statistics.median(abs(e) for e in v))
            for k, v in fams.items()}


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def kernel_models_source(fits: dict[str, dict]) -> str:
    """Python source of wafersim/baseline/kernel_models.py for {gpu name: fields}."""
    lines = [
        '"""Kernel models of the measured GPUs: GENERATED by',
        "`PYTHONPATH=. python benchmarks/gpu/calibrate.py --write-kernel-models` from the",
        "kernel microbenchmarks in benchmarks/gpu/results (docs/gpu_baseline.md explains each",
        'constant and the data it was fitted on). Do not edit by hand."""',
        "",
        "from wafersim.baseline.kernels import KernelModels",
        "",
    ]
    for name, f in fits.items():
        single, kern = KERNEL_FILES[name]
        lines.append(f"{name}_KERNELS = KernelModels(")
        lines.append(f'    source="benchmarks/gpu/results/{kern} (+ {single} matmuls)",')
        for key in ("score_fixed_s", "score_unit_frac", "value_fixed_s", "value_unit_frac",
                    "softmax_warp_max_cols", "softmax_warp_fixed_s", "softmax_warp_s_per_col",
                    "softmax_warp_s_per_col_lnrow", "softmax_block_fixed_s",
                    "softmax_block_bw_frac", "flash_fixed_s", "flash_flops_frac",
                    "flash_s_per_qo_elem", "sample_fixed_s", "sample_s_per_col"):
            lines.append(f"    {key}={_fmt(f[key])},")
        lines.append("    stream={")
        for kind, (c, b) in f["stream"].items():
            lines.append(f'        "{kind}": ({_fmt(c)}, {_fmt(b)}),')
        lines.append("    },")
        lines.append("    matmul_eta={")
        for (k, n), pts in f["matmul_eta"].items():
            cells = [f"({m}, {e:.4f})" for m, e in pts]
            lines.append(f"        ({k}, {n}): (")
            for i in range(0, len(cells), 5):
                lines.append("            " + ", ".join(cells[i:i + 5]) + ",")
            lines.append("        ),")
        lines.append("    },")
        lines.append(")")
    return "\n".join(lines) + "\n"


def fit_all_kernels(results: Path = RESULTS) -> dict[str, dict]:
    from wafersim.baseline.gpus import get_gpu
    out = {}
    for name, (single, kern) in KERNEL_FILES.items():
        gpu = replace(get_gpu(name), kernels=None)
        out[name] = calibrate_kernels(load(results / single), load(results / kern), gpu)
    return out


def fit_nccl(records: list[dict], gpu_name: str = "h200", link_name: str = "nvlink4"):
    """(collective_s, achievable_frac, rows): the fit above and, for every graph-captured
    point on 2 GPUs, (op, bytes, measured s, predicted s) with the fitted link."""
    from wafersim.baseline.collectives import allgather, allreduce, send_recv
    from wafersim.baseline.gpus import get_gpu
    from wafersim.baseline.links import LINKS

    gap = get_gpu(gpu_name).graph_kernel_overhead_s
    link = LINKS[link_name]
    pts = [r for r in records if r["kind"] == "nccl" and "median_s" in r
           and r["shape"]["gpus"] == 2 and r["shape"]["mode"] == "graph"]
    ar = [r for r in pts if r["shape"]["op"] == "all_reduce"]
    x = [r["shape"]["bytes"] / link.bw_Bps for r in ar]
    t = [r["median_s"] - gap - 2 * link.latency_s for r in ar]
    inv_frac, fixed = _fit_line(x, t)
    fitted = replace(link, achievable_frac=1 / inv_frac, collective_s=fixed)
    model = {"all_reduce": lambda b: allreduce(b, 2, fitted).time_s,
             "all_gather": lambda b: allgather(b, 2, fitted).time_s,
             "send_recv": lambda b: send_recv(b, fitted).time_s}
    rows = [(r["shape"]["op"], r["shape"]["bytes"], r["median_s"],
             gap + model[r["shape"]["op"]](r["shape"]["bytes"])) for r in pts]
    return fixed, 1 / inv_frac, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl", nargs="?")
    ap.add_argument("--peak-bw", type=float, help="datasheet HBM bytes/s")
    ap.add_argument("--peak-flops", type=float, default=989e12, help="datasheet bf16 FLOP/s")
    ap.add_argument("--kernels", action="store_true", help="fit the kernel models, print")
    ap.add_argument("--nccl", help="fit the NVLink collective figures to this NCCL sweep")
    ap.add_argument("--write-kernel-models", action="store_true",
                    help="fit and write wafersim/baseline/kernel_models.py")
    args = ap.parse_args()
    if args.nccl:
        fixed, frac, rows = fit_nccl(load(args.nccl))
        print(f"collective_s = {fixed * 1e6:.3g} us, achievable_frac = {frac:.3f}")
        for op, nbytes, meas, pred in rows:
            print(f"  {op:10s} {nbytes:>10d} B  measured {meas * 1e6:8.2f} us  predicted "
                  f"{pred * 1e6:8.2f} us  {100 * (pred / meas - 1):+6.1f}%")
        for op in ("all_reduce", "all_gather", "send_recv"):
            errs = [abs(p / m - 1) for o, _, m, p in rows if o == op]
            print(f"{op}: max {100 * max(errs):.1f}%, median {100 * statistics.median(errs):.1f}%")
        return
    if args.kernels or args.write_kernel_models:
        fits = fit_all_kernels()
        for name, f in fits.items():
            print(name)
            for k, v in f.items():
                if k == "fit":
                    for fam, (n, mx, md) in v.items():
                        print(f"  fit {fam:12s} n={n:3d} max {100 * mx:5.1f}% "
                              f"median {100 * md:5.1f}%")
                elif k != "matmul_eta":
                    print(f"  {k} = {v}")
        if args.write_kernel_models:
            path = ROOT / "wafersim/baseline/kernel_models.py"
            path.write_text(kernel_models_source(fits))
            print("wrote", path)
        return
    if not args.jsonl or args.peak_bw is None:
        ap.error("give a JSONL file and --peak-bw, or --kernels")
    out = calibrate(load(args.jsonl), args.peak_bw, args.peak_flops)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
