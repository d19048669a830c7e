"""GPT-2 style building blocks (LayerNorm, the plain biased GELU MLP) on numpy data equal a
plain numpy model; the whole GPT-2 decode step is checked in tests/test_model.py."""

import math

import numpy as np
import pytest

from compiler.algorithms.common import Region
from compiler.algorithms.mlp import mlp_block
from compiler.algorithms.norm import layernorm
from compiler.program import ProgramBuilder
from tests.test_blocks import column_split_input, mark_output
from wafersim.functional import execute


def ref_layernorm(h, g, bias, eps):
    xc = h - h.mean(axis=1, keepdims=True)
    return xc / np.sqrt(np.mean(xc * xc, axis=1, keepdims=True) + eps) * g + bias


@pytest.mark.parametrize("rows,cols", [(1, 1), (4, 4), (3, 5), (5, 2)])
def test_layernorm_matches_numpy(rows, cols):
    rng = np.random.default_rng(rows + cols)
    b, d, eps = 2, 37, 1e-5
    h = 3 + rng.standard_normal((b, d))  # a large mean, which LayerNorm removes
    g, bias = rng.standard_normal((1, d)), rng.standard_normal((1, d))
    region = Region(rows, cols)
    bld = ProgramBuilder(cols, rows, "fp32")
    out, _ = layernorm(bld, region, column_split_input(bld, region, "h", b, d), b, d, "g", eps)
    mark_output(bld, out, region, "y", b, d)
    y = execute(bld.build(), {"h": h, "g": g, "g_bias": bias})["y"]
    np.testing.assert_allclose(y, ref_layernorm(h, g, bias, eps), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows,cols", [(4, 4), (3, 5)])
def test_gpt2_mlp_block_matches_numpy(rows, cols):
    """LayerNorm -> up + bias -> exact (erf) GELU -> down + bias -> residual."""
    rng = np.random.default_rng(5)
    b, d, f, eps = 2, 48, 192, 1e-5  # tiny-gpt2's sizes
    region = Region(rows, cols)
    bld = ProgramBuilder(cols, rows, "fp32")
    hb = column_split_input(bld, region, "h", b, d)
    out, _ = mlp_block(bld, region, hb, b, d, f, "L", gated=False, act="gelu_erf", eps=eps,
                       norm_kind="layernorm", bias=True)
    mark_output(bld, out, region, "out", b, d)
    w = {"h": rng.standard_normal((b, d)), "L.mlp_norm": 1 + 0.1 * rng.standard_normal((1, d)),
         "L.mlp_norm_bias": 0.1 * rng.standard_normal((1, d)),
         "L.up": rng.standard_normal((d, f)) / math.sqrt(d),
         "L.up_bias": 0.1 * rng.standard_normal((1, f)),
         "L.down": rng.standard_normal((f, d)) / math.sqrt(f),
         "L.down_bias": 0.1 * rng.standard_normal((1, d))}
    up = ref_layernorm(w["h"], w["L.mlp_norm"], w["L.mlp_norm_bias"], eps) @ w["L.up"]
    up = up + w["L.up_bias"]
    erf = np.vectorize(math.erf)
    expected = w["h"] + 0.5 * up * (1 + erf(up / math.sqrt(2))) @ w["L.down"] + w["L.down_bias"]
    got = execute(bld.build(), w)["out"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
