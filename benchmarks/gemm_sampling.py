"""Sampled GEMM steps against exact simulation: how well two short runs predict the whole loop.

`wafersim op gemm` samples the loop of a GEMM on grids wider than
compiler.algorithms.meshgemm.EXACT_MAX_SIDE (WaferLLM's 360 and 720 grids hold 93 M and 745 M
messages exactly). Here both are run where the exact program still fits in memory, at the
tile sizes per core of the paper's points (2K and 8K on 360 and 720 cores a side), and the
relative error of the sampled makespan is printed for each sample of steps.

    python benchmarks/gemm_sampling.py            # grids 60 and 120
    python benchmarks/gemm_sampling.py --grids 60,120,180
"""

from __future__ import annotations

import argparse
import time

from compiler.algorithms.meshgemm import GEMM_ALGOS, lower_gemm
from compiler.targets import load_target
from wafersim.simulate import simulate, simulate_sampled

TILES = (2048 / 720, 2048 / 360, 8192 / 720, 8192 / 360)  # elements per core a side
SAMPLES = ((2, 3), (4, 8), (8, 16))


def rows(grids, target):
    for s in grids:
        for tile in TILES:
            n = round(tile * s)
            for algo in GEMM_ALGOS:
                t0 = time.perf_counter()
                exact = simulate(lower_gemm(n, n, n, s, s, algo, target=target), target)
                wall = time.perf_counter() - t0
                full = exact.meta["full_steps"]
                out = {"grid": s, "n": n, "tile": tile, "algo": algo,
                       "exact_cycles": exact.makespan_cycles, "exact_wall_s": wall}
                for sample in SAMPLES:
                    def lower(t, n=n, s=s, algo=algo):
                        return lower_gemm(n, n, n, s, s, algo, target=target, steps=t)

                    est = simulate_sampled(lower, target, full, sample)
                    out[sample] = est.makespan_cycles / exact.makespan_cycles - 1
                yield out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grids", default="60,120")
    args = ap.parse_args()
    target = load_target("wse2")
    print(f"{'grid':>5s} {'n':>6s} {'tile':>5s} {'algo':9s} {'exact cycles':>12s} "
          + " ".join(f"{f'{a},{b} err':>10s}" for a, b in SAMPLES) + "  exact wall")
    for r in rows([int(g) for g in args.grids.split(",")], target):
        errs = " ".join(f"{100 * r[sm]:+9.2f}%" for sm in SAMPLES)
        print(f"{r['grid']:5d} {r['n']:6d} {r['tile']:5.1f} {r['algo']:9s} "
              f"{r['exact_cycles']:12,d} {errs}  {r['exact_wall_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
