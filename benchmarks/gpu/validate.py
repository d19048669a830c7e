"""Predict every measured end-to-end point with the GPU baseline and print the error.

The baseline's constants were calibrated (benchmarks/gpu/calibrate.py) from the
microbenchmarks alone; nothing here is fitted to the decode/prefill points it compares with.
Measured decode "ctx" is the tokens attended after the step (the cache holds ctx-1 old tokens
plus the new one), so the graph is built with ctx_len = ctx - 1. Prefill is batch 1,
seq_len tokens, ctx_len 0, with flash attention (as measured). Multi-GPU points run on
"<tp>xH200" (tensor parallel) or "pp<pp>:<pp x tp>xH200" (pipeline stages of one node).

    PYTHONPATH=. python benchmarks/gpu/validate.py            # table on stdout
    PYTHONPATH=. python benchmarks/gpu/validate.py --markdown # the table for docs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import models
from wafersim.baseline import costs
from wafersim.baseline.cluster import parse_cluster
from wafersim.baseline.simulate import simulate_cluster

RESULTS = Path(__file__).parent / "results"
# measure_single.py's files hold one GPU's points; measure_multi.py's (system None) name each
# point's tensor- and pipeline-parallel degrees in its config.
FILES = {"h100.jsonl": "1xH100", "h100_long.jsonl": "1xH100", "h200.jsonl": "1xH200",
         "h200_70b.jsonl": "1xH200", "h200x2_single.jsonl": "1xH200", "h200x2.jsonl": None}
ZOO = {"llama-3-8b": "llama3-8b", "llama-2-7b": "llama2-7b", "llama-2-13b": "llama2-13b",
       "llama-3-70b-40l": "llama3-70b", "llama-3-70b": "llama3-70b"}
LAYERS = {"llama-3-70b-40l": 40}  # a measured slice of the zoo model's layers
END_TO_END = ("decode", "prefill", "decode_eager", "prefill_eager")


def _matmul_split(graph, cluster, micro: dict) -> tuple[float, float] | None:
    """(measured, predicted) seconds of the step's matmuls (gemv/gemm/lm_head), the measured
    side summed from the microbenchmarks at the same [m, k, n]. An LM head whose shape was not
    microbenchmarked is left out of both sides; None if another shape is."""
    node = cluster.nodes[0]
    measured = predicted = 0.0
    plan = costs.plan(graph)
    for w in (*plan.pre, *(w for layer in plan.layers for w in layer), *plan.post):
        if w.kind not in ("gemv", "gemm", "lm_head"):
            continue
        t = micro.get((w.m, w.k, w.n))
        if t is None and w.kind == "lm_head":
            continue
        if t is None:
            return None
        measured += t
        predicted += costs.work_kernel_time_s(w, *costs.shard(w, 1), node.gpu)
    return measured, predicted


ELTWISE_OP = {"rmsnorm": "rmsnorm", "rope": "rope", "activation": "silu", "mul": "mul",
              "add": "add", "embedding": "embedding", "sample": "argmax"}


def _micro_step(graph, model: str, krecs: list[dict], micro: dict) -> float | None:
    """The step as the sum of its kernels' microbenchmarks at the same shapes (seconds): the
    matmuls, one decode-attention chain or flash call per layer, the elementwise kernels (one
    RoPE kernel for q_rope + k_rope). None where a kernel was not microbenchmarked."""
    chain = {(r["shape"]["model"], r["shape"]["batch"], r["shape"]["ctx"]): r["median_s"]
             for r in krecs if r["kind"] == "attn_decode" and r["shape"]["kernel"] == "chain"}
    flash = {(r["shape"]["model"], r["shape"]["seq"]): r["median_s"]
             for r in krecs if r["kind"] == "attn_prefill" and "median_s" in r}
    elt = {(r["shape"]["model"], r["shape"]["op"], r["shape"]["rows"]): r["median_s"]
           for r in krecs if r["kind"] == "eltwise"}
    batch, kv_len = graph.graph["batch"], graph.graph["ctx_len"] + graph.graph["seq_len"]
    total = 0.0
    plan = costs.plan(graph)
    for w in (*plan.pre, *(w for layer in plan.layers for w in layer), *plan.post):
        if w.kind in ("gemv", "gemm", "lm_head"):
            t = micro.get((w.m, w.k, w.n))
        elif w.kind == "attn_score":
            t = chain.get((model, batch, kv_len))
        elif w.kind in ("softmax", "attn_value") or w.name.endswith("k_rope"):
            continue
        elif w.kind == "flash_attention":
            t = flash.get((model, graph.graph["seq_len"]))
        else:
            t = elt.get((model, ELTWISE_OP.get(w.kind), w.m))
        if t is None:
            return None
        total += t
    return total


def _system(gpu: str, conf: dict) -> str:
    short = gpu.split()[-1]  # "NVIDIA H200" -> "H200"
    tp, pp = conf["tp"], conf["pp"]
    return f"{tp}x{short}" if pp == 1 else f"pp{pp}:{pp * tp}x{short}"


def points(results_dir: Path = RESULTS) -> list[dict]:
    """Every end-to-end measurement with its prediction and signed relative error, and the
    split of the absolute gap into matmuls (checked against the microbenchmarks at the same
    shapes) and everything else."""
    out = []
    for fname, system in FILES.items():
        path = results_dir / fname
        if not path.exists():
            continue
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        kpath = results_dir / fname.replace(".jsonl", "_kernels.jsonl")
        krecs = ([json.loads(line) for line in kpath.read_text().splitlines()]
                 if kpath.exists() else [])
        micro = {(r["shape"]["m"], r["shape"]["k"], r["shape"]["n"]): r["median_s"]
                 for r in krecs + recs if r["kind"] in ("gemv", "gemm")}
        for rec in recs:
            if rec["kind"] not in END_TO_END or "median_s" not in rec:
                continue
            conf = rec["config"]
            name = system or _system(rec["gpu"], conf)
            cluster = parse_cluster(name)
            cfg = models.load_model(ZOO[conf["model"]])
            if conf["model"] in LAYERS:
                n = LAYERS[conf["model"]]
                cfg = dataclasses.replace(cfg, name=f"{cfg.name}[{n} layers]",
                                          num_hidden_layers=n)
            if rec["kind"].startswith("decode"):
                graph = models.build_graph(cfg, "decode", batch=conf["batch"],
                                           ctx_len=conf["ctx"] - 1)
                shape = f"b={conf['batch']} ctx={conf['ctx']}"
            else:
                graph = models.build_graph(cfg, "prefill", batch=1, seq_len=conf["seq_len"])
                shape = f"seq={conf['seq_len']}"
            res = simulate_cluster(graph, cluster, cuda_graphs=conf["cuda_graph"])
            mm = _matmul_split(graph, cluster, micro)
            ms = _micro_step(graph, conf["model"], krecs, micro)
            out.append({
                "system": name, "model": cfg.name, "kind": rec["kind"], "shape": shape,
                "measured_ms": rec["median_s"] * 1e3, "predicted_ms": res.makespan_s * 1e3,
                "error": res.makespan_s / rec["median_s"] - 1.0,
                "p10_ms": rec["p10_s"] * 1e3, "p90_ms": rec["p90_s"] * 1e3,
                "fits": res.fits,
                "matmul_measured_ms": mm[0] * 1e3 if mm else None,
                "matmul_predicted_ms": mm[1] * 1e3 if mm else None,
                "attention_predicted_ms": 1e3 * sum(
                    v for k, v in res.time_by_kind_s.items()
                    if k in ("attn_score", "softmax", "attn_value", "flash_attention")),
                "by_kind_ms": {k: 1e3 * v for k, v in res.time_by_kind_s.items()},
                "micro_sum_ms": ms * 1e3 if ms else None,
            })
    return out


def table(rows: list[dict], markdown: bool) -> str:
    head = ["system", "model", "step", "shape", "measured ms", "predicted ms", "error"]
    lines = []
    if markdown:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    else:
        lines.append(f"{'system':11s} {'model':11s} {'step':14s} {'shape':16s} "
                     f"{'measured':>9s} {'predicted':>9s} {'error':>7s}")
    for r in rows:
        cells = [r["system"], r["model"], r["kind"], r["shape"], f"{r['measured_ms']:.3f}",
                 f"{r['predicted_ms']:.3f}", f"{100 * r['error']:+.1f}%"]
        if markdown:
            lines.append("| " + " | ".join(cells) + " |")
        else:
            lines.append(f"{cells[0]:11s} {cells[1]:11s} {cells[2]:14s} {cells[3]:16s} "
                         f"{cells[4]:>9s} {cells[5]:>9s} {cells[6]:>7s}")
    return "\n".join(lines)


def gap_table(rows: list[dict]) -> str:
    """Where each point's gap lies. sum-micro: the step as the sum of its kernels'
    microbenchmarks at the same shapes (no model); e2e - micro: what isolated kernels do not
    show; model - micro: the kernel models' own error on this step's kernels; matmul: the
    same for the matmuls alone."""
    lines = [f"{'system':11s} {'model':11s} {'step':8s} {'shape':16s} {'measured':>8s} "
             f"{'sum-micro':>9s} {'e2e-micro':>9s} {'model-micro':>11s} {'matmul':>7s} "
             f"{'attn pred':>9s}   (ms)"]
    for r in rows:
        if r["micro_sum_ms"] is None:
            continue
        mm = (r["matmul_predicted_ms"] - r["matmul_measured_ms"]
              if r["matmul_measured_ms"] is not None else float("nan"))
        lines.append(f"{r['system']:11s} {r['model']:11s} {r['kind']:8s} {r['shape']:16s} "
                     f"{r['measured_ms']:8.3f} {r['micro_sum_ms']:9.3f} "
                     f"{r['measured_ms'] - r['micro_sum_ms']:9.3f} "
                     f"{r['predicted_ms'] - r['micro_sum_ms']:11.3f} {mm:7.3f} "
                     f"{r['attention_predicted_ms']:9.3f}")
    return "\n".join(lines)


def ctx_growth(rows: list[dict]) -> str:
    """Decode time growth from ctx 512 to 2048 at fixed batch: everything but attention is
    the same work, so this isolates the attention kernels."""
    by = {(r["system"], r["model"], r["shape"]): r for r in rows if r["kind"] == "decode"}
    lines = [f"{'system':11s} {'model':11s} {'batch':>5s} {'measured':>9s} {'predicted':>9s} "
             "  (ms added from ctx 512 to 2048)"]
    for (system, model, shape), r in by.items():
        if not shape.endswith("ctx=512"):
            continue
        other = by.get((system, model, shape.replace("ctx=512", "ctx=2048")))
        if other:
            lines.append(f"{system:11s} {model:11s} {shape.split()[0][2:]:>5s} "
                         f"{other['measured_ms'] - r['measured_ms']:9.3f} "
                         f"{other['predicted_ms'] - r['predicted_ms']:9.3f}")
    return "\n".join(lines)


def stats(rows: list[dict]) -> dict:
    errs = [abs(r["error"]) for r in rows]
    return {"points": len(errs), "max_abs_error": max(errs),
            "median_abs_error": statistics.median(errs),
            "within_10pct": sum(e <= 0.10 for e in errs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    rows = points(Path(args.results))
    graphs = [r for r in rows if not r["kind"].endswith("eager")]
    eager = [r for r in rows if r["kind"].endswith("eager")]
    print(table(graphs, args.markdown))
    print()
    print("CUDA-graph points (the validation target):", json.dumps(stats(graphs)))
    for system in dict.fromkeys(r["system"] for r in graphs):
        for kind in ("decode", "prefill"):
            some = [r for r in graphs if r["system"] == system and r["kind"] == kind]
            if some:
                print(f"  {system} {kind}:", json.dumps(stats(some)))
    print()
    print(table(eager, args.markdown))
    print()
    print("eager points (not a target; host-bound, noisy):", json.dumps(stats(eager)))
    print()
    print(gap_table(graphs))
    print()
    print(ctx_growth(graphs))


if __name__ == "__main__":
    main()
