"""Vocabulary tables spread over a wafer's regions (compiler.model's tight fallback, where no
placement fits otherwise): the compiled steps still give the numpy reference's logits and
token, on one wafer and as a pipeline stage, and Qwen2-72B in bf16 now fits four WSE-3s."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compiler.model import CompileOptions, compile_model, pack_inputs, partition
from compiler.multiwafer import (
    WaferCluster,
    compile_multiwafer,
    load_cluster,
    pack_stage_inputs,
    stage_capacity,
    stage_counts,
    tables_spread,
)
from compiler.targets import load_target
from models import build_graph, load_model
from models.reference import forward, random_weights
from wafersim.functional import execute
from wafersim.simulate import simulate

MESH = load_target("wse2").with_mesh(8, 8)


def _tiny(name: str, layers: int, vocab: int):
    """A tiny model whose vocabulary tables weigh several layers, as a 72B model's do."""
    return dataclasses.replace(load_model(name), num_hidden_layers=layers, vocab_size=vocab)


def _reference(cfg):
    """Weights, the next ids after a 4-token prompt, its caches, and the reference's logits
    for those ids."""
    weights = random_weights(cfg, seed=1)
    prompt = np.array([[3, 17, 99, 5], [8, 1, 2, cfg.vocab_size - 6]])
    logits, cache = forward(cfg, weights, prompt)
    ids = logits[:, -1].argmax(-1)
    ref, _ = forward(cfg, weights, ids[:, None], cache)
    return weights, ids, cache, ref[:, 0]


@pytest.mark.parametrize("cfg,sram,region,shape", [
    # 2 x 2 regions of 4 x 4: side-by-side and stacked crossings of the chains
    (_tiny("tiny-llama", 4, 512), 24_000, (4, 4), (4, 4, [1, 1, 1, 1])),
    # LayerNorm, learned positions (their table spread too), a tied head
    (_tiny("tiny-gpt2", 4, 512), 18_000, (4, 4), (4, 4, [1, 1, 1, 1])),
    # six regions of 2 x 4 over three rows (two turns), the end ones holding tables alone
    (_tiny("tiny-llama", 4, 1024), 48_500, (2, 4), (2, 4, [0, 1, 1, 1, 1, 0])),
    # the partition's own choice
    (_tiny("tiny-llama", 2, 1024), 20_300, None, (8, 4, [1, 1])),
], ids=["llama-2x2", "gpt2-2x2", "llama-2x4", "llama-chosen"])
def test_spread_tables_give_the_reference_logits(cfg, sram, region, shape):
    target = dataclasses.replace(MESH, sram_bytes=sram)
    options = CompileOptions(region=region, capacity=12)
    best = partition(cfg, target, 2, 12, options)[0]
    assert best == (*shape, True)  # nothing fits with each table on one region
    compiled = compile_model(build_graph(cfg, "decode", batch=2, ctx_len=4), target, options)
    assert all(p.embed and p.head for p in compiled.placements)
    assert compiled.memory["sram_max_bytes"] <= sram
    weights, ids, cache, ref = _reference(cfg)
    out = execute(compiled.program, pack_inputs(compiled, weights, ids, list(cache.k),
                                                list(cache.v)))
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-4, atol=1e-4)
    assert np.array_equal(out["next"][:, 1], ref.argmax(-1))
    assert simulate(compiled.program, target).makespan_cycles > 0


def test_a_model_that_fits_keeps_each_table_on_one_region():
    cfg = _tiny("tiny-llama", 4, 512)
    for options in (CompileOptions(), CompileOptions(region=(4, 4))):
        compiled = compile_model(build_graph(cfg, "decode", batch=2, ctx_len=4), MESH, options)
        places = compiled.placements
        assert [p.embed for p in places] == [True] + [False] * (len(places) - 1)
        assert [p.head for p in places] == [False] * (len(places) - 1) + [True]


def test_a_stage_with_its_head_spread_gives_the_reference_logits():
    """Two wafers: the first holds its embedding on one region; the last can hold its four
    layers only with the head spread over its two regions."""
    cfg = _tiny("tiny-llama", 8, 1024)
    cluster = WaferCluster(dataclasses.replace(MESH, sram_bytes=22_400), 2)
    mw = compile_multiwafer(build_graph(cfg, "decode", batch=2, ctx_len=4), cluster)
    assert [(s.first, s.count) for s in mw.stages] == [(0, 4), (4, 4)]
    assert [tables_spread(s.compiled) for s in mw.stages] == [False, True]
    assert len(mw.stages[1].compiled.placements) == 2
    weights, ids, cache, ref = _reference(cfg)
    x = ids
    for st in mw.stages:
        out = execute(st.compiled.program, pack_stage_inputs(st, weights, x, cache.k, cache.v))
        x = out.get("h")
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-4, atol=1e-4)
    assert np.array_equal(out["next"][:, 1], ref.argmax(-1))


def test_qwen2_72b_in_bf16_fits_four_wse3():
    """The plan only (compiling the three stage programs takes about a minute and 8 GB):
    with each table on one region the end wafers hold 2 layers fewer than 80 / 4 needs."""
    cfg, cluster, options = load_model("qwen2-72b"), load_cluster("4xwse3"), CompileOptions()
    assert cfg.dtype == "bf16"
    ends = ((True, False), (False, False), (False, True))
    one = [stage_capacity(cfg, cluster.wafer, 1, 4097, options, e) for e in ends]
    assert one[0] + 2 * one[1] + one[2] < 80
    assert stage_counts(cfg, cluster, 1, 4097, options) == [20, 20, 20, 20]


def test_the_serving_batch_limit_counts_spread_tables_where_nothing_else_fits():
    """LLaMA-2-13B with 7,000 tokens a sequence fits one WSE-2 only with its tables spread; the
    serving batch limit must not say that not even one sequence fits."""
    from compiler.model import largest_batch

    cfg, wse2 = load_model("llama2-13b"), load_target("wse2")
    assert partition(cfg, wse2, 1, 7000, CompileOptions())[0][3]  # tight
    assert largest_batch(cfg, wse2, 7000) >= 1
    assert not partition(cfg, wse2, 1, 5000, CompileOptions())[0][3]
    assert largest_batch(cfg, wse2, 5000) >= 1
