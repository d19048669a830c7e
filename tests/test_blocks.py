"""Decoder building blocks (RMSNorm, MLP block) run on numpy data equal a plain numpy model."""

import numpy as np
import pytest

from compiler.algorithms.common import Region, split
from compiler.algorithms.mlp import mlp_block
from compiler.algorithms.norm import rmsnorm
from compiler.program import INPUT, ProgramBuilder, ProgramError
from compiler.targets import WSE2
from wafersim.functional import execute
from wafersim.simulate import simulate


def column_split_input(bld, region, name, b, d):
    """Tensor `name` [b, d] split over the region's columns, copied down every column."""
    grid = region.cores(bld.width)
    c0, cs = split(d, region.cols)
    cj = np.broadcast_to(np.arange(region.cols)[None, :], grid.shape)
    t = bld.tensor(name, b, d)
    return bld.buffers(grid.ravel(), b, cs[cj].ravel(), INPUT, t, 0,
                       c0[cj].ravel()).reshape(grid.shape)


def mark_output(bld, bufs, region, name, b, d):
    c0, _ = split(d, region.cols)
    cj = np.broadcast_to(np.arange(region.cols)[None, :], bufs.shape)
    bld.mark(bufs.ravel(), 2, bld.tensor(name, b, d), 0, c0[cj].ravel())


def ref_rmsnorm(h, g, eps):
    return h / np.sqrt(np.mean(h * h, axis=1, keepdims=True) + eps) * g


@pytest.mark.parametrize("rows,cols", [(1, 1), (4, 4), (3, 5), (5, 2)])
def test_rmsnorm_matches_numpy(rows, cols):
    rng = np.random.default_rng(rows + cols)
    b, d, eps = 2, 37, 1e-5
    h, g = rng.standard_normal((b, d)), rng.standard_normal((1, d))
    region = Region(rows, cols)
    bld = ProgramBuilder(cols, rows, "fp32")
    hb = column_split_input(bld, region, "h", b, d)
    out, _ = rmsnorm(bld, region, hb, b, d, "g", eps)
    mark_output(bld, out, region, "y", b, d)
    y = execute(bld.build(), {"h": h, "g": g})["y"]
    np.testing.assert_allclose(y, ref_rmsnorm(h, g, eps), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows,cols", [(4, 4), (3, 5), (6, 3)])
@pytest.mark.parametrize("gated,act", [(True, "silu"), (False, "gelu")])
def test_mlp_block_matches_numpy(rows, cols, gated, act):
    rng = np.random.default_rng(11)
    b, d, f, eps = 2, 64, 176, 1e-6  # tiny-llama's sizes
    region = Region(rows, cols)
    bld = ProgramBuilder(cols, rows, "fp32")
    hb = column_split_input(bld, region, "h", b, d)
    out, _ = mlp_block(bld, region, hb, b, d, f, "L0.mlp", gated=gated, act=act, eps=eps)
    mark_output(bld, out, region, "out", b, d)
    w = {"h": rng.standard_normal((b, d)), "L0.mlp.mlp_norm": rng.standard_normal((1, d)),
         "L0.mlp.up": rng.standard_normal((d, f)) / 8,
         "L0.mlp.down": rng.standard_normal((f, d)) / 8}
    if gated:
        w["L0.mlp.gate"] = rng.standard_normal((d, f)) / 8
    xn = ref_rmsnorm(w["h"], w["L0.mlp.mlp_norm"], eps)
    up = xn @ w["L0.mlp.up"]
    if gated:
        g = xn @ w["L0.mlp.gate"]
        a = g / (1 + np.exp(-g)) * up
    else:
        a = 0.5 * up * (1 + np.tanh(0.7978845608 * (up + 0.044715 * up ** 3)))
    expected = w["h"] + a @ w["L0.mlp.down"]
    got = execute(bld.build(), w)["out"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_mlp_block_of_llama3_8b_fits_and_simulates_on_a_wse2_region():
    region = Region(120, 120)
    bld = ProgramBuilder(120, 120, "bf16")
    hb = column_split_input(bld, region, "h", 1, 4096)
    mlp_block(bld, region, hb, 1, 4096, 14336, "L0.mlp")
    prog = bld.build()
    prog.check(WSE2.with_mesh(120, 120), "llama3-8b mlp block")
    res = simulate(prog, WSE2)
    assert res.makespan_cycles > 0
    np.testing.assert_array_equal(res.core_busy + res.core_overhead + res.core_idle,
                                  res.makespan_cycles)


def test_region_wider_than_the_model_is_refused():
    region = Region(4, 8)
    bld = ProgramBuilder(8, 4)
    with pytest.raises(ProgramError, match="hidden size >= 8"):
        mlp_block(bld, region, np.zeros((4, 8), dtype=int), 1, 6, 16, "L0.mlp")
