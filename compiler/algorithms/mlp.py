"""The feed-forward block of a decoder layer in decode: norm, MLP, residual add.

Dataflow on one region, no data moved between ops (WaferLLM's alternating GEMV layouts):
h (split over columns) -> RMSNorm -> gate and up GEMVs with K over columns (results split over
rows) -> SiLU(gate) * up -> down GEMV with K over rows (result split over columns, like h) ->
h + down. A plain (GPT-2 style) MLP is LayerNorm -> up (+ bias) -> GELU -> down (+ bias).
"""

from __future__ import annotations

import numpy as np

from compiler.algorithms.bias import add_bias
from compiler.algorithms.common import Region
from compiler.algorithms.meshgemv import gemv
from compiler.algorithms.norm import norm
from compiler.program import (
    OP_ADD,
    OP_GELU,
    OP_GELU_ERF,
    OP_MUL,
    OP_SILU,
    ProgramBuilder,
    ProgramError,
)

# Block-level activation names. "gelu" here is the tanh form (as the block tests use it);
# `model_activation` maps a Hugging Face hidden_act, whose "gelu" is the exact erf form.
ACTIVATIONS = {"silu": OP_SILU, "swish": OP_SILU, "gelu": OP_GELU, "gelu_new": OP_GELU,
               "gelu_pytorch_tanh": OP_GELU, "gelu_erf": OP_GELU_ERF}


def model_activation(hidden_act: str) -> str:
    """The block activation computing a config's `hidden_act` as Hugging Face's ACT2FN does
    ("gelu" is the exact erf GELU there; gelu_new / gelu_pytorch_tanh the tanh form)."""
    return "gelu_erf" if hidden_act == "gelu" else hidden_act


def mlp_block(bld: ProgramBuilder, region: Region, h, b: int, d: int, f: int, prefix: str, *,
              gated: bool = True, act: str = "silu", eps: float = 1e-5, algo: str = "meshgemv",
              levels: int = 2, step: int = 0, norm_kind: str = "rmsnorm", bias: bool = False):
    """h + MLP(Norm(h)). `h`: [rows, cols] buffer ids split over columns.

    Weights are read from tensors `{prefix}.mlp_norm` [1, d] (and `.mlp_norm_bias` for a
    LayerNorm), `{prefix}.gate` [d, f] (gated only), `{prefix}.up` [d, f] and `{prefix}.down`
    [f, d], with `bias`: `.gate_bias` (gated), `.up_bias` [1, f] and `.down_bias` [1, d].
    Returns (output buffer ids, next step).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not one of {', '.join(ACTIVATIONS)}")
    grid = region.cores(bld.width)
    if d < region.cols or f < region.rows:
        raise ProgramError(f"mlp block: a {region.cols}x{region.rows} region needs hidden size "
                           f">= {region.cols} and ffn size >= {region.rows} (got {d}, {f})")
    xn, step = norm(norm_kind, bld, region, h, b, d, f"{prefix}.mlp_norm", eps, levels=levels,
                    step=step)
    kw = dict(algo=algo, levels=levels, k_axis="cols", x=xn)
    up, step = gemv(bld, region, b, d, f, names=(None, f"{prefix}.up", None), step=step, **kw)
    if bias:
        step = add_bias(bld, region, up, f, f"{prefix}.up_bias", "rows", step=step)
    act_in = up
    if gated:
        act_in, step = gemv(bld, region, b, d, f, names=(None, f"{prefix}.gate", None),
                            step=step, **kw)
        if bias:
            step = add_bias(bld, region, act_in, f, f"{prefix}.gate_bias", "rows", step=step)
    held = act_in.ravel() >= 0
    cores, a = grid.ravel()[held], bld.like(act_in.ravel()[held])
    bld.compute(cores, step, ACTIVATIONS[act], c=a, a=act_in.ravel()[held])
    if gated:
        bld.compute(cores, step + 1, OP_MUL, c=a, a=a, b=up.ravel()[held])
    m = np.full(grid.size, -1, dtype=np.int64)
    m[held] = a
    down, step = gemv(bld, region, b, f, d, algo, k_axis="rows", x=m.reshape(grid.shape),
                      names=(None, f"{prefix}.down", None), levels=levels, step=step + 2)
    if bias:
        step = add_bias(bld, region, down, d, f"{prefix}.down_bias", "cols", step=step)
    out = bld.like(h)
    bld.compute(grid.ravel(), step, OP_ADD, c=out.ravel(), a=np.asarray(h).ravel(),
                b=down.ravel())
    return out, step + 1
