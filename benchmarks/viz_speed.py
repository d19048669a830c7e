"""Full-wafer map render time: util_map and traffic_map of a synthetic WSE-2-sized result
(750 x 994 cores, random busy / overhead / wait and link figures), figure built and PNG
written, each timed on its own (docs/viz.md, docs/performance.md).

    python benchmarks/viz_speed.py
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from compiler.targets import load_target
from wafersim import viz
from wafersim.result import SimResult


def synthetic(width: int, height: int, seed: int = 0) -> SimResult:
    rng = np.random.default_rng(seed)
    cores, span = width * height, 100_000
    busy = rng.integers(0, span // 2, cores)
    return SimResult(system="wse2", width=width, height=height, clock_hz=1.1e9,
                     makespan_cycles=span, core_busy=busy,
                     core_overhead=rng.integers(0, span // 4, cores),
                     core_wait=rng.integers(0, span // 4, cores),
                     core_active=rng.random(cores) < 0.95,
                     link_bytes=rng.integers(0, 10**6, 4 * cores),
                     link_busy=rng.integers(0, span, 4 * cores), messages=0, hops=0, events=0,
                     sim_wall_s=0.0, flops=0)


def main() -> None:
    t = load_target("wse2")
    res = synthetic(t.width, t.height)
    with tempfile.TemporaryDirectory() as tmp:
        for name, draw in (("util_map", viz.util_map), ("traffic_map", viz.traffic_map)):
            t0 = time.perf_counter()
            viz.save(draw(res), os.path.join(tmp, f"{name}.png"))
            print(f"{name}: {time.perf_counter() - t0:.2f} s for {t.width}x{t.height} cores")


if __name__ == "__main__":
    main()
