"""Slower checks on larger meshes (run with `pytest -m slow`; CI runs them)."""

import numpy as np
import pytest

from compiler.algorithms.meshgemm import GEMM_ALGOS, lower_gemm
from compiler.algorithms.meshgemv import GEMV_ALGOS, lower_gemv
from compiler.targets import WSE2
from wafersim.engine import run_kernel
from wafersim.functional import execute
from wafersim.reference import run_reference
from wafersim.simulate import kernel_args

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("algo", GEMV_ALGOS)
def test_gemv_on_a_24x20_mesh_matches_numpy(algo):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 1000)).astype(np.float32)
    w = rng.standard_normal((1000, 333)).astype(np.float32)
    out = execute(lower_gemv(2, 1000, 333, 24, 20, algo), {"x": x, "W": w})
    np.testing.assert_allclose(out["y"], x @ w, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("algo", GEMM_ALGOS)
def test_gemm_on_a_12x12_mesh_matches_numpy(algo):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((100, 130)).astype(np.float32)
    b = rng.standard_normal((130, 70)).astype(np.float32)
    out = execute(lower_gemm(100, 130, 70, 12, 12, algo), {"A": a, "B": b})
    np.testing.assert_allclose(out["C"], a @ b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("make", [lambda: lower_gemv(1, 4096, 4096, 48, 48),
                                  lambda: lower_gemm(1024, 1024, 1024, 12, 12, "summa")])
def test_simpy_twin_agrees_on_larger_programs(make):
    args = kernel_args(make(), WSE2)
    ker, ref = run_kernel(*args), run_reference(*args)
    for r, k in zip(ref[2:6], ker[2:6], strict=True):
        np.testing.assert_array_equal(r, k)
