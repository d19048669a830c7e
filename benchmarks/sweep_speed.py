"""Sweep speed: N points of LLaMA-3-8B decode on 256 x 256 meshes through `wafersim.sweep` on a
local dask cluster, against N x the single-point time / workers (the ideal). Target: the ratio
measured / ideal <= 1.3 with 2 workers on a 2-core machine.

The model is the zoo's llama3-8b unchanged (32 layers, 128k vocabulary), decode, batch 1, 4,096
cached tokens. It does not fit 256 x 256 cores of 48 KB (its 16 GB of bf16 weights need
~250 KB per core), so the target is a WSE-2 cut to 256 x 256 whose SRAM per core is an axis
from 512 KiB up. The axes: sram_bytes (5 values) x link_bytes_per_cycle (5) x
hop_latency_cycles (1, 2, ...): 200 distinct points for N = 200 (every point compiles and
simulates afresh; nothing is shared between points but the worker processes). Each point
simulates with layers = "one" (one layer per region run and extrapolated; `--layers all` to
simulate every layer).

The single-point time is the mean wall time of `--samples` points spread over the sweep, run
one after the other in this process after a warm-up (the same run_point the workers call).
BLAS / OpenMP threads are pinned to 1 here, as dask's nanny pins them on its workers. The
sweep's wall time counts everything: starting the cluster, warming the workers, the points and
writing the CSV.

    python benchmarks/sweep_speed.py                 # 200 points (about 12 minutes on 2 cores)
    python benchmarks/sweep_speed.py --points 20     # a quick check
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SRAM = ("512KiB", "768KiB", "1MiB", "1536KiB", "2MiB")
LINKS = (2, 4, 8, 16, 32)


def sweep_spec(points: int, layers: str):
    from wafersim.sweep import parse_sweep

    hops = max(1, math.ceil(points / (len(SRAM) * len(LINKS))))
    return parse_sweep({
        "base": {"model": "llama3-8b", "target": "wse2", "mesh": "256x256", "phase": "decode",
                 "batch": 1, "ctx": 4096, "layers": layers},
        "axes": {"sram_bytes": list(SRAM), "link_bytes_per_cycle": list(LINKS),
                 "hop_latency_cycles": {"start": 1, "stop": hops, "step": 1}},
    }, "sweep_speed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=200, help="points to run (default 200)")
    ap.add_argument("--workers", type=int, default=2, help="local worker processes")
    ap.add_argument("--samples", type=int, default=4, help="points timed one by one")
    ap.add_argument("--layers", default="one", choices=("one", "all"))
    ap.add_argument("--out", default="", help="results CSV (default: a temporary file)")
    args = ap.parse_args()

    from wafersim.sweep import read_results, run_point, run_sweep, warm_up

    spec = sweep_spec(args.points, args.layers)
    points = spec.points()[0][:args.points]
    print(f"{len(points)} points: llama3-8b decode, batch 1, ctx 4096, 256x256 cores, "
          f"layers={args.layers}; axes sram_bytes x link_bytes_per_cycle x hop_latency_cycles",
          flush=True)
    load = os.getloadavg()
    print(f"load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min; "
          f"{os.cpu_count()} cores)", flush=True)
    warm_up()
    picks = [points[round(i * (len(points) - 1) / max(args.samples - 1, 1))]
             for i in range(args.samples)]
    times = []
    for p in picks:
        row = run_point(p)
        if row["error"]:
            raise SystemExit(f"sample point {p.axes} failed: {row['error']}")
        times.append(row["point_wall_s"])
        print(f"  single point {p.axes}: {row['point_wall_s']:.2f} s "
              f"(compile {row['compile_wall_s']:.2f} s, simulate {row['sim_wall_s']:.2f} s, "
              f"{row['tokens_per_s']:,.0f} tokens/s)", flush=True)
    single = sum(times) / len(times)
    ideal = len(points) * single / args.workers
    print(f"single-point time {single:.2f} s (mean of {len(times)}); ideal "
          f"points x single / {args.workers} = {ideal:.1f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "sweep_speed.csv")
        t0 = time.perf_counter()
        report = run_sweep(spec, out, workers=args.workers, limit=len(points))
        wall = time.perf_counter() - t0
        rows = read_results(out)[1]
    load = os.getloadavg()
    busy = sum(r["point_wall_s"] for r in rows)
    print(f"sweep: {report.computed} points ({report.failed} failed) on {report.workers} "
          f"workers in {wall:.1f} s (worker warm-up {max(report.warm_s or [0]):.1f} s)")
    each = busy / len(rows)
    print(f"  points took {each:.2f} s each on the workers (x{each / single:.2f} the "
          f"single-point time: CPU / memory contention); the workers were busy "
          f"{busy / args.workers / wall:.1%} of the sweep's wall time (scheduling, start-up)")
    print(f"  load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
          f"(1 / 5 / 15 min; {os.cpu_count()} cores)")
    print(f"ratio measured / ideal = {wall / ideal:.3f} (target <= 1.3)")


if __name__ == "__main__":
    main()
