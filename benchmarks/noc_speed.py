"""NoC curve speed: wall time of a 20-point latency-vs-load curve on a 64x64 mesh.

    python benchmarks/noc_speed.py            # 64x64, uniform, 20 rates (target: <= 30 s)
    python benchmarks/noc_speed.py --small    # CI: 16x16

Uniform random traffic of 32-byte messages (8 flits on WSE-2's 4-byte links), Bernoulli
injection, default windows (1000 warm-up + 1000 measured + 500 drain cycles), rates from
0.005 to 0.1 flits/cycle/core on 64x64 (saturation is near 4/64 = 0.0625). The whole curve
is timed (traffic generation, program building, the kernel, measurement); one tiny point is
run first so that Numba's one-off load of its cached kernel is not counted (it is printed).
Nothing is asserted; the time and the saturation found are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from compiler.targets import WSE2
from wafersim.noc import TrafficSpec, latency_curve, measure_point


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="16x16 mesh (CI)")
    parser.add_argument("--pattern", default="uniform")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    opts = parser.parse_args(argv)

    k = 16 if opts.small else 64
    target = WSE2.with_mesh(k, k)
    spec = TrafficSpec(pattern=opts.pattern, msg_bytes=32)
    rates = np.linspace(0.1, 2.0, 20) * (4 / k) / 1.25  # 0.08 .. 1.6 x the uniform bound

    t0 = time.perf_counter()
    measure_point(spec, target, rates[0] / 10)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    curve = latency_curve(spec, target, rates)
    wall_s = time.perf_counter() - t0

    kernel_s = sum(p.sim_wall_s for p in curve.points)
    events = sum(p.events for p in curve.points)
    out = {"mesh": f"{k}x{k}", "pattern": spec.pattern, "points": len(curve.points),
           "curve_s": wall_s, "kernel_s": kernel_s, "first_call_s": warm_s, "events": events,
           "messages": sum(p.messages for p in curve.points),
           "saturation_rate": curve.saturation_rate, "channel_load_bound": curve.bound}
    if opts.json:
        print(json.dumps(out))
        return 0
    print(f"{'rate':>7} {'offered':>8} {'accepted':>8} {'latency':>8} {'messages':>9} "
          f"{'events':>10} {'kernel s':>8}")
    for i, p in enumerate(curve.points):
        mark = "  <- saturation" if i == curve.saturation else ""
        print(f"{p.rate:7.4f} {p.offered:8.4f} {p.accepted:8.4f} {p.latency_avg:8.1f} "
              f"{p.messages:9,} {p.events:10,} {p.sim_wall_s:8.2f}{mark}")
    sat = curve.saturation_rate
    print(f"\n{k}x{k} {spec.pattern}: {len(curve.points)} points in {wall_s:.1f} s "
          f"(kernel {kernel_s:.1f} s, {events / kernel_s / 1e6:.1f} M events/s; first call "
          f"{warm_s:.1f} s not counted)")
    print(f"saturation {sat if sat is None else round(sat, 4)} flits/cycle/core; channel-load "
          f"bound {curve.bound:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
