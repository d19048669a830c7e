"""Where activation sparsity and fast feed-forward layers save time, on the wafer and on GPUs.

Wafer: one feed-forward block of LLaMA-3-8B (norm, MLP or FFF tree, residual; batch 1, bf16)
lowered on one region of WSE-2 cores (default 497 x 187, rows x columns: the region the
default policy gives the dense model on the full wafer) and simulated: the block's cycles, the
busiest core's compute cycles, the FLOPs, on-chip bytes, messages and SRAM per core, and
compiler.estimate's closed form where it models the block (dense MLP, FFF). GPUs: LLaMA-3-8B's
decode step (ctx 4096) with the baseline's breakdown: the step, its matmul kernels, the
feed-forward ops (up, gate, activation, multiply, down; or the tree) and the tensor-parallel
collectives. docs/efficiency.md quotes the output.

    python benchmarks/efficiency.py
    python benchmarks/efficiency.py --region 64x64 --clusters 1xH100
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from compiler.algorithms.common import Region, split
from compiler.algorithms.fff import draw_paths, fff_block
from compiler.algorithms.mlp import mlp_block
from compiler.estimate import _fff, _mlp, _start
from compiler.program import INPUT, ProgramBuilder
from compiler.sparsity import ActSparsity
from compiler.targets import WSE2
from models import build_graph, load_model
from models.graph import with_activation_sparsity
from wafersim.baseline.cluster import parse_cluster
from wafersim.baseline.costs import plan, work_cost
from wafersim.baseline.simulate import simulate_cluster
from wafersim.simulate import simulate


def block(cfg, rows: int, cols: int, density: float | None) -> dict:
    """Simulate one feed-forward block of `cfg` on a rows x cols region."""
    bld = ProgramBuilder(cols, rows, cfg.dtype)
    region = Region(rows, cols)
    grid = region.cores(cols)
    c0, cs = split(cfg.hidden_size, cols)
    j = np.broadcast_to(np.arange(cols)[None, :], grid.shape)
    h = bld.buffers(grid.ravel(), 1, cs[j].ravel(), INPUT, bld.tensor("h", 1, cfg.hidden_size),
                    0, c0[j].ravel()).reshape(grid.shape)
    if cfg.fff_depth is not None:
        fff_block(bld, region, h, 1, cfg.hidden_size, cfg.fff_depth, "L0",
                  draw_paths(cfg.fff_depth, 1, 0), act=cfg.hidden_act)
        est = _fff(_start(rows, cols), cfg, WSE2, 1, "meshgemv", 2).done
    else:
        mask = None if density is None else ActSparsity(str(density)).mask(
            0, 1, cfg.intermediate_size)
        mlp_block(bld, region, h, 1, cfg.hidden_size, cfg.intermediate_size, "L0", mask=mask)
        est = _mlp(_start(rows, cols), cfg, WSE2, 1, "meshgemv", 2).done if mask is None \
            else None
    prog = bld.build()
    res = simulate(prog, WSE2)
    return dict(cycles=res.makespan_cycles, estimate=est, busiest=int(res.core_busy.max()),
                flops=res.flops, onchip=res.onchip_bytes, messages=prog.n_messages,
                sram=int(prog.sram_per_core().max()))


def gpu(cfg, cluster: str, density: float | None) -> dict:
    g = build_graph(cfg, "decode", batch=1, ctx_len=4096)
    if density is not None:
        sp = ActSparsity(str(density))
        g = with_activation_sparsity(g, [sp.mask(layer, 1, cfg.intermediate_size,
                                                 cfg.num_hidden_layers)
                                         for layer in range(cfg.num_hidden_layers)])
    spec = parse_cluster(cluster)
    r = simulate_cluster(g, spec)
    node = spec.nodes[0]
    ffn = sum(work_cost(w, node.gpu, node.n_gpus, node.intra_link).kernel_s
              for layer in plan(g).layers for w in layer
              if w.name.rsplit(".", 1)[-1] in ("down_proj", "fff_in", "fff_out", "act",
                                                "gate_mul", "up_proj", "gate_proj"))
    kinds = r.time_by_kind_s
    return dict(ms=r.makespan_s * 1e3, gemv=kinds.get("gemv", 0.0) * 1e3, ffn=ffn * 1e3,
                tp=kinds.get("tp_collectives", 0.0) * 1e3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--region", default="497x187", help="ROWSxCOLS of the wafer region.")
    ap.add_argument("--clusters", default="8xA100,1xH100")
    args = ap.parse_args(argv)
    rows, cols = (int(v) for v in args.region.split("x"))
    base = load_model("llama3-8b")
    variants = [("dense MLP", base, None)] + [
        (f"act density {d}", base, d) for d in (1.0, 0.5, 0.1, 0.01)] + [
        (f"FFF depth {k}", dataclasses.replace(base, fff_depth=k), None) for k in (11, 7)]
    print(f"wafer: one LLaMA-3-8B feed-forward block on {rows}x{cols} WSE-2 cores, batch 1")
    print(f"{'variant':18} {'cycles':>8} {'estimate':>9} {'busiest':>8} {'GFLOP':>7} "
          f"{'on-chip MB':>10} {'messages':>9} {'SRAM B':>7} {'wall s':>6}")
    for name, cfg, density in variants:
        t0 = time.perf_counter()
        b = block(cfg, rows, cols, density)
        est = "-" if b["estimate"] is None else f"{b['estimate']:,.0f}"
        print(f"{name:18} {b['cycles']:>8,} {est:>9} {b['busiest']:>8,} {b['flops'] / 1e9:>7.3f} "
              f"{b['onchip'] / 1e6:>10.1f} {b['messages']:>9,} {b['sram']:>7,} "
              f"{time.perf_counter() - t0:>6.1f}")
    for cluster in args.clusters.split(","):
        print(f"\nGPUs: LLaMA-3-8B decode step, ctx 4096, {cluster} (ms)")
        print(f"{'variant':18} {'step':>7} {'matmuls':>8} {'FFN ops':>8} {'TP coll.':>8}")
        for name, cfg, density in variants:
            if density == 1.0:
                continue
            r = gpu(cfg, cluster, density)
            print(f"{name:18} {r['ms']:>7.3f} {r['gemv']:>8.3f} {r['ffn']:>8.3f} "
                  f"{r['tp']:>8.3f}")


if __name__ == "__main__":
    main()
