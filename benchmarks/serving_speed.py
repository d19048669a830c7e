"""Serving simulation speed: a one-hour Poisson trace at 50 requests/s (about 180k requests)
of LLaMA-3-8B on 8 A100s, prompt 512, output 256, with cached step times (the GPU baseline's
table, built first and not timed). Prints the wall time of the simulation (target <= 60 s).

    python benchmarks/serving_speed.py [--rate 50] [--duration 3600]
"""

import argparse
import time

from models import load_model
from wafersim.serving import poisson, simulate
from wafersim.steps import GpuSource, build_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--gpus", default="8xA100")
    a = ap.parse_args()
    t0 = time.perf_counter()
    table = build_table(GpuSource(load_model("llama3-8b"), a.gpus), ctxs=[512, 1024],
                        prefill_tokens=[512])
    build = time.perf_counter() - t0
    w = poisson(a.rate, a.duration, 512, 256, seed=0)
    t0 = time.perf_counter()
    r = simulate(w, table)
    wall = time.perf_counter() - t0
    s = r.summary()
    print(f"step table: {len(table.points)} points in {build:.2f} s")
    print(f"{len(w):,} requests over {a.duration:g} s at {a.rate:g}/s on {table.system}: "
          f"{r.iterations:,} scheduler iterations, simulated in {wall:.1f} s "
          f"({'within' if wall <= 60 else 'over'} the 60 s target)")
    print(f"throughput {s['output_tokens_per_s']:,.0f} tokens/s, TTFT p99 "
          f"{s['ttft_ms']['p99']:.1f} ms, TPOT p99 {s['tpot_ms']['p99']:.2f} ms")


if __name__ == "__main__":
    main()
