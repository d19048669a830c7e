"""How alike a layer's rows of cores are: LLaMA-3-8B's decode layer with WaferLLM's paper
attention on a P x P grid of a WSE-2 (as `wafersim layer --attention paper` compiles it),
simulated as its 1- and 2-layer steps. It prints the classes of rows whose per-core busy and
wait cycles in the layer (2- minus 1-layer step) are identical, the classes of rows and
columns of the layer body's instruction counts, and the share of hops that no arbitration could
delay (their link is entered from one input port only, over the whole program, so its requests
come in the order of the upstream link's grants): what a simulation of fewer events could build
on (docs/performance.md, "Compile and the layer runs").

    python benchmarks/row_classes.py --grid 240
    python benchmarks/row_classes.py --grid 360
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from compiler.model import CompileOptions, compile_model
from compiler.targets import load_target
from models import build_graph, load_model
from wafersim.engine import INJECT
from wafersim.layer import _up, paper_config
from wafersim.simulate import simulate_loops


def classes(a: np.ndarray) -> list[np.ndarray]:
    """The rows of `a` grouped by equal content, largest group first."""
    _, inv = np.unique(a, axis=0, return_inverse=True)
    inv = np.asarray(inv).ravel()
    return sorted((np.flatnonzero(inv == k) for k in range(inv.max() + 1)), key=len,
                  reverse=True)


def show(what: str, groups: list[np.ndarray]) -> None:
    print(f"{what}: {len(groups)} classes")
    for g in groups:
        print(f"  {len(g)}: {', '.join(str(i) for i in g[:6])}{', ...' if len(g) > 6 else ''}")


def one_port_hops(prog) -> tuple[int, int]:
    """(hops after the first whose link only ever has requests from one input port, hops after
    the first), over `prog`'s routes. A route's first hop comes from the core (INJECT), a later
    hop along the previous link's direction."""
    links = prog.route_link.astype(np.int64)
    first = np.zeros(len(links), bool)
    first[prog.route_ptr[:-1][np.diff(prog.route_ptr) > 0]] = True
    port = np.where(first, INJECT, np.roll(links, 1) % 4)
    ports = np.zeros(prog.width * prog.height * 4, np.int64)
    np.bitwise_or.at(ports, links, 1 << port)
    one = (ports & (ports - 1)) == 0
    return int((one[links] & ~first).sum()), int((~first).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=int, default=240)
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    p = args.grid
    cfg = paper_config(dataclasses.replace(load_model("llama3-8b"), num_hidden_layers=2), p)
    cfg = dataclasses.replace(cfg, vocab_size=p, tie_word_embeddings=False)  # as layer_run
    target = load_target("wse2").with_mesh(p, p)
    code = compile_model(build_graph(cfg, "decode", batch=1, ctx_len=_up(args.ctx, p)), target,
                         CompileOptions(region=(p, p))).code
    count = code.loop_count
    one, two = simulate_loops(code, target, [np.minimum(count, 1), np.minimum(count, 2)])
    busy = (two.core_busy - one.core_busy).reshape(p, p)
    wait = (two.core_wait - one.core_wait).reshape(p, p)
    print(f"llama3-8b decode layer, paper attention, {p}x{p} cores of wse2")
    show("rows of the layer's per-core (busy, wait) cycles", classes(np.hstack([busy, wait])))
    n = np.diff(code.body.core_ptr).reshape(p, p)
    show("rows of the body's instruction counts", classes(n))
    show("columns of the body's instruction counts", classes(n.T))
    for name, prog in (("glue", code.glue), ("body", code.body)):
        one, later = one_port_hops(prog)
        print(f"{name}: {one:,} of {later:,} hops after a route's first ({one / later:.1%}) "
              f"enter a link that only one input port feeds")


if __name__ == "__main__":
    main()
