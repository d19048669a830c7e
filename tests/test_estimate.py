"""compiler.estimate: closed-form decode time against the simulator, on small meshes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compiler.algorithms.meshgemv import lower_gemv
from compiler.estimate import gemv_cycles, layer_cycles, step_cycles
from compiler.model import CompileOptions, compile_model
from compiler.program import COMPUTE
from compiler.targets import load_target
from models.config import load_model
from models.graph import build_graph
from wafersim.simulate import compute_cycles, simulate

CFG = load_model("tiny-llama")
WSE2 = load_target("wse2")


def _mesh(rows: int, cols: int, sram: int = 1 << 20):
    return dataclasses.replace(WSE2.with_mesh(cols, rows), sram_bytes=sram)


def _compile(cfg, rows, cols, layers, mesh=None, ctx=63, **options):
    target = _mesh(*(mesh or (rows, cols)))
    compiled = compile_model(
        build_graph(dataclasses.replace(cfg, num_hidden_layers=layers), "decode", ctx_len=ctx),
        target, CompileOptions(region=(rows, cols), **options))
    return compiled, target


@pytest.mark.parametrize("b,k,n,rows,cols,k_axis,algo", [
    (1, 256, 192, 8, 8, "rows", "meshgemv"),
    (1, 256, 704, 8, 16, "cols", "meshgemv"),
    (2, 100, 37, 5, 3, "rows", "meshgemv"),  # uneven tiles
    (1, 1003, 301, 41, 7, "rows", "meshgemv"),  # rows of uneven K: staggered senders
    (1, 777, 5000, 61, 23, "cols", "meshgemv"),
    (1, 256, 192, 8, 8, "rows", "ring"),
])
def test_a_lone_gemv_is_exact(b, k, n, rows, cols, k_axis, algo):
    program = lower_gemv(b, k, n, rows, cols, algo, k_axis=k_axis, dtype="bf16")
    sim = simulate(program, WSE2.with_mesh(cols, rows)).makespan_cycles
    assert gemv_cycles(WSE2, "bf16", b, k, n, rows, cols, k_axis, algo) == sim


def test_one_core_is_the_sum_of_its_computes():
    """On 1x1 there are no messages: a layer is its loop body's computes and overheads."""
    compiled, target = _compile(CFG, 1, 1, 2)
    prog = compiled.program
    assert prog.n_messages == 0
    body = slice(int(prog.loop_start[0]), int(prog.loop_end[0]))
    computes = prog.ins_kind[body] == COMPUTE
    assert computes.all()
    expected = compute_cycles(prog, target)[body].sum() + computes.sum() * \
        target.compute_overhead_cycles
    assert layer_cycles(CFG, target, 1, 1, 1, compiled.slots) == expected
    one, _ = _compile(CFG, 1, 1, 1)
    assert expected == (simulate(prog, target).makespan_cycles
                        - simulate(one.program, target).makespan_cycles)


@pytest.mark.parametrize("rows,cols", [(1, 1), (4, 4), (8, 16)])
def test_the_estimate_grows_with_slots(rows, cols):
    cycles = [layer_cycles(CFG, WSE2, rows, cols, 1, s) for s in (1, 4, 16, 64)]
    assert np.all(np.diff(cycles) > 0)
    assert layer_cycles(CFG, WSE2, rows, cols, 2, 16) > cycles[2]  # and with the batch


def test_shapes_rank_as_the_simulation_ranks_them():
    """tiny-llama's best region is 16x16: 16x32 is larger and slower. Whole steps of two
    layers on one region, within a few per cent and in the same order."""
    shapes = [(4, 4), (8, 8), (4, 16), (16, 16), (16, 32)]
    est, sim = [], []
    for rows, cols in shapes:
        compiled, target = _compile(CFG, rows, cols, 2)
        sim.append(simulate(compiled.program, target).makespan_cycles)
        est.append(step_cycles(CFG, target, rows, cols, [2], 1, compiled.slots))
    assert np.argsort(est).tolist() == np.argsort(sim).tolist()
    assert sim[-1] > sim[-2]  # the case the policy is for: more cores, slower
    np.testing.assert_allclose(est, sim, rtol=0.03)


def test_a_step_over_several_regions():
    """Four 4x4 regions on an 8x8 mesh: embedding, hand-offs side by side and stacked, head."""
    compiled, target = _compile(CFG, 4, 4, 4, mesh=(8, 8))
    counts = [p.count for p in compiled.placements]
    assert len(counts) == 4
    sim = simulate(compiled.program, target).makespan_cycles
    est = step_cycles(CFG, target, 4, 4, counts, 1, compiled.slots)
    assert est == pytest.approx(sim, rel=0.03)
