"""Quantised and pruned weights and KV caches on GPUs: the baseline's side of compiler.quant.

`quantize(plan, scheme)` rewrites a step's Work items as the scheme stores them, with the same
byte accounting as the wafer (compiler.quant.stored_bytes: values, fp16 group scales, 2:4 index
metadata), so both sides read the same bytes per weight:
- projections, the LM head and the embedding tables read and keep their stored bytes; a matmul
  whose weight dtype has a tensor-core rate on the GPU runs there (costs.timed_flops; W8A8 /
  FP8 style), else it runs at the compute dtype's rate on weights dequantised in registers
  (weight-only, as W4A16 kernels do; the conversion is not charged: it is a few ALU operations
  per weight per kernel, hidden under the HBM stream at decode and dwarfed by 2 x rows FLOPs per
  weight at prefill);
- 2:4 pruned projections are stored compressed (half the values plus a 2-bit index each) and
  run on sparse tensor cores at the datasheet's "with sparsity" rate (twice the dense rate: half
  the FLOPs at the dense rate), with the calibrated dense efficiency (an assumption: sparse
  kernels were not measured); a GPU whose spec lists no sparse rate refuses them;
- unstructured pruning is not accelerated: the weights stay dense in HBM and the dense kernels
  run (cuSPARSE-style kernels win only at far higher sparsity; serving engines run dense);
- KV caches read and keep their stored bytes; attention runs at the compute dtype.
"""

from __future__ import annotations

import dataclasses

from compiler.quant import CACHE, HEAD, PROJ, TABLE, Scheme, compute_bytes, stored_bytes
from wafersim.baseline.costs import Plan, Work

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _kind(w: Work) -> int | None:
    short = w.name.rsplit(".", 1)[-1]
    if w.kind == "embedding":
        return TABLE
    if w.kind == "lm_head":
        return HEAD
    if w.kind in ("gemv", "gemm") and short in _PROJ:
        return PROJ
    return None


def _ratio(s: Scheme, kind: int, rows: int, cols: int) -> float:
    return float(stored_bytes(s, kind, rows, cols) / compute_bytes(s, rows, cols))


def _work(w: Work, s: Scheme, head_dim: int) -> Work:
    changes = {}
    kind = _kind(w)
    if kind is not None:
        rows, cols = w.k, w.n  # a table is [vocab, d], a matrix [K, N]
        matrix = w.k * w.n * float(compute_bytes(s, 1, 1))
        ratio = _ratio(s, kind, rows, cols)
        if kind == TABLE:  # a lookup reads its rows; the whole table stays
            changes.update(weight_bytes=w.weight_bytes * _ratio(s, TABLE, w.m or 1, w.n),
                           weight_store_bytes=w.weight_store_bytes * ratio)
        else:  # the matrix shrinks, its bias stays
            changes.update(weight_bytes=w.weight_bytes - matrix * (1 - ratio),
                           weight_store_bytes=w.weight_store_bytes - matrix * (1 - ratio))
            if s.weights != s.compute:
                changes["wdtype"] = s.weights
            if kind == PROJ and s.structured:
                changes.update(flops=w.flops * s.density, prune24=True)
    if (w.kv_bytes or w.kv_store_bytes) and s.kv != s.compute:
        ratio = _ratio(s, CACHE, 1, head_dim)
        changes.update(kv_bytes=w.kv_bytes * ratio, kv_store_bytes=w.kv_store_bytes * ratio)
    return dataclasses.replace(w, **changes) if changes else w


def quantize(plan: Plan, s: Scheme, head_dim: int) -> Plan:
    """`plan` with weights and KV caches stored as `s` says (module docstring); unstructured
    pruning changes nothing on GPUs."""
    if s.dense:
        return plan
    if not s.structured:
        s = dataclasses.replace(s, density=1.0)
    return dataclasses.replace(
        plan, pre=tuple(_work(w, s, head_dim) for w in plan.pre),
        layers=tuple(tuple(_work(w, s, head_dim) for w in layer) for layer in plan.layers),
        post=tuple(_work(w, s, head_dim) for w in plan.post))
