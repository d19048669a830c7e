"""compiler.estimate against the simulator: decode time by region shape, estimated and simulated.

For LLaMA-3-8B's and LLaMA-2-13B's layers (the zoo configs, real vocabularies, cut to one and
two layers), and LLaMA-3-8B at half the width (d 2048, ffn 7168, 16 heads, 4 KV heads: its best
region lies within the sizes that build here, so larger regions lose, as LLaMA-3-8B's do beyond
about 256x256), on WSE-2's cores and links: each region shape is compiled onto a mesh of
exactly that region (`CompileOptions(region=...)`) and simulated with
wafersim.whole.simulate_layout; a layer's simulated cycles are the two-layer step's minus the
one-layer step's (as whole.py extrapolates). Then, per model, a few shapes are compiled onto a
mesh of 2 x 2 regions with four layers (one per region: three hand-offs, side by side and
stacked) to check the whole step. The target is WSE-2 with its mesh cut to the region (or
2 x 2 regions) and, so that one layer and both vocabulary tables fit small regions, 8 MiB of
SRAM per core instead of 48 KB; SRAM size does not enter the timing. Batch 1, 4,095 cached
tokens (capacity 4,096). Last, the estimate of docs/performance.md's full-wafer placements
beside the tokens/s simulated there.

    python benchmarks/estimate.py                       # the table in the report
    python benchmarks/estimate.py --models llama3-8b --shapes 32x32,64x64 --multi ""
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time

SHAPES = "32x32,64x64,96x128,128x128,160x192,256x256,64x256,256x64,128x256,256x128"
MULTI = "32x32,64x64,96x128,128x128"
SRAM = 8 * 2**20
CTX = 4095


def load(model: str):
    """A zoo config, or "llama3-8b-half": LLaMA-3-8B at half the width."""
    from models import load_model

    if model == "llama3-8b-half":
        return dataclasses.replace(load_model("llama3-8b"), name=model, hidden_size=2048,
                                   intermediate_size=7168, num_attention_heads=16,
                                   num_key_value_heads=4)
    return load_model(model)


def _target(width: int, height: int):
    from compiler.targets import load_target

    return dataclasses.replace(load_target("wse2"), name=f"wse2[{width}x{height}]",
                               width=width, height=height, sram_bytes=SRAM)


def measure(model: str, rows: int, cols: int, layers: int, grid: tuple[int, int] = (1, 1),
            ctx: int = CTX) -> dict:
    """Compile `layers` layers of `model` with rows x cols regions on a mesh of grid regions,
    simulate, and return the estimate's inputs with the simulated step."""
    from compiler.model import CompileOptions, compile_model
    from models import build_graph
    from wafersim.whole import simulate_layout

    cfg = dataclasses.replace(load(model), num_hidden_layers=layers)
    target = _target(cols * grid[1], rows * grid[0])
    compiled = compile_model(build_graph(cfg, "decode", ctx_len=ctx), target,
                             CompileOptions(region=(rows, cols)))
    res = simulate_layout(compiled.program, target, compiled.info(), "one")
    out = dict(cfg=cfg, target=target, slots=compiled.slots,
               counts=[p.count for p in compiled.placements], step=res["makespan_cycles"])
    del compiled, res
    gc.collect()
    return out


def _ranks(values: list[float]) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    return [order.index(i) for i in range(len(values))]


def _pairs(est: list[float], sim: list[float]) -> tuple[int, int]:
    """Pairs of shapes ordered alike by both, of all pairs."""
    n = len(est)
    same = sum((est[i] - est[j]) * (sim[i] - sim[j]) > 0 for i in range(n)
               for j in range(i + 1, n))
    return same, n * (n - 1) // 2


def per_layer(model: str, shapes: list[tuple[int, int]]) -> None:
    from compiler.estimate import layer_cycles, step_cycles

    print(f"\n{model}: one region of each shape, batch 1, ctx {CTX}")
    print(f"{'shape':>9} {'slots':>5} {'est layer':>10} {'sim layer':>10} {'ratio':>6} "
          f"{'est step':>9} {'sim step':>9} {'ratio':>6} {'wall':>6}")
    est_l, sim_l, est_s, sim_s = [], [], [], []
    for rows, cols in shapes:
        t0 = time.perf_counter()
        one, two = measure(model, rows, cols, 1), measure(model, rows, cols, 2)
        cfg, target, slots = two["cfg"], two["target"], two["slots"]
        el = layer_cycles(cfg, target, rows, cols, 1, slots)
        es = step_cycles(cfg, target, rows, cols, two["counts"], 1, slots)
        sl, ss = two["step"] - one["step"], two["step"]
        est_l.append(el), sim_l.append(sl), est_s.append(es), sim_s.append(ss)
        print(f"{rows:>4}x{cols:<4} {slots:5d} {el:10,.0f} {sl:10,} {el / sl:6.3f} {es:9,.0f} "
              f"{ss:9,} {es / ss:6.3f} {time.perf_counter() - t0:5.1f}s", flush=True)
    same, total = _pairs(est_l, sim_l)
    print(f"ranking by layer: estimate {_ranks(est_l)}, simulation {_ranks(sim_l)} "
          f"({same}/{total} pairs agree; by step {_pairs(est_s, sim_s)[0]}/{total}); ratios "
          f"{min(est_l[i] / sim_l[i] for i in range(len(shapes))):.3f} .. "
          f"{max(est_l[i] / sim_l[i] for i in range(len(shapes))):.3f}")


def multi_region(model: str, shapes: list[tuple[int, int]]) -> None:
    from compiler.estimate import step_cycles

    print(f"\n{model}: 2 x 2 regions, 4 layers (one per region), whole step")
    print(f"{'shape':>9} {'counts':>12} {'est step':>9} {'sim step':>9} {'ratio':>6}")
    est, sim = [], []
    for rows, cols in shapes:
        m = measure(model, rows, cols, 4, (2, 2))
        e = step_cycles(m["cfg"], m["target"], rows, cols, m["counts"], 1, m["slots"])
        est.append(e), sim.append(m["step"])
        print(f"{rows:>4}x{cols:<4} {str(m['counts']):>12} {e:9,.0f} {m['step']:9,} "
              f"{e / m['step']:6.3f}", flush=True)
    same, total = _pairs(est, sim)
    print(f"ranking: {same}/{total} pairs agree")


def candidates() -> None:
    """Layers on region shapes the full-wafer partition weighs (48 KB SRAM, ctx 4096): the
    estimate's best few and docs/performance.md's pipeline shape, one region each."""
    from compiler.estimate import layer_cycles

    print("\nfull-wafer candidate shapes, one region each, ctx 4096: layer cycles")
    print(f"{'model':>10} {'shape':>9} {'est layer':>10} {'sim layer':>10} {'ratio':>6}")
    for model, shapes in (("llama3-8b", ((248, 187), (331, 187), (497, 150), (497, 187))),
                          ("llama2-13b", ((142, 125), (497, 107)))):
        est, sim = [], []
        for rows, cols in shapes:
            one = measure(model, rows, cols, 1, ctx=4096)
            two = measure(model, rows, cols, 2, ctx=4096)
            est.append(layer_cycles(two["cfg"], two["target"], rows, cols, 1, two["slots"]))
            sim.append(two["step"] - one["step"])
            print(f"{model:>10} {rows:>4}x{cols:<4} {est[-1]:10,.0f} {sim[-1]:10,} "
                  f"{est[-1] / sim[-1]:6.3f}", flush=True)
        same, total = _pairs(est, sim)
        print(f"{model:>10} ranking: {same}/{total} pairs agree")


def full_wafer() -> None:
    """The estimate for docs/performance.md's full-wafer placements (simulated there)."""
    import math

    from compiler.estimate import step_cycles
    from compiler.targets import load_target
    from models import load_model

    target = load_target("wse2")
    print("\nfull WSE-2, ctx 4096 (capacity 4097): estimate vs docs/performance.md's simulation")
    print(f"{'model':>10} {'regions':>20} {'est tok/s':>9} {'sim tok/s':>9} {'ratio':>6}")
    for model, rows, cols, counts, sim in (
            ("llama3-8b", 497, 750, [16] * 2, 2828),
            ("llama3-8b", 248, 187, [2] * 16, 4305),
            ("llama2-13b", 142, 125, [0] + [1] * 40 + [0], 2243)):
        cyc = step_cycles(load_model(model), target, rows, cols, counts, 1,
                          math.ceil(4097 / cols))
        tps = target.clock_hz / cyc
        print(f"{model:>10} {f'{len(counts)} x {rows}x{cols} x {max(counts)}':>20} "
              f"{tps:9,.0f} {sim:9,} {tps / sim:6.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama3-8b,llama2-13b,llama3-8b-half")
    ap.add_argument("--shapes", default=SHAPES, help="region shapes rows x cols")
    ap.add_argument("--multi", default=MULTI, help="shapes for the 2 x 2-region step")
    ap.add_argument("--no-candidates", action="store_true",
                    help="skip the full-wafer candidate shapes (regions up to 497x187)")
    args = ap.parse_args()

    def parse(text):
        return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]

    for model in args.models.split(","):
        per_layer(model, parse(args.shapes))
        if args.multi:
            multi_region(model, parse(args.multi))
    if not args.no_candidates:
        candidates()
    full_wafer()


if __name__ == "__main__":
    main()
