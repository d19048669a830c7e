"""The whole-model compiler: compiled tiny models give the numpy reference's logits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compiler.model import POLICIES, CompileOptions, compile_model, pack_inputs
from compiler.prefill_model import unpack_caches
from compiler.program import ProgramError
from compiler.targets import load_target
from models.config import load_model
from models.graph import build_graph
from models.reference import forward, random_weights
from wafersim.functional import execute
from wafersim.simulate import simulate

CFG = load_model("tiny-llama")
GPT2 = load_model("tiny-gpt2")  # LayerNorm, learned positions, biases, erf GELU, tied head
MESH = load_target("wse2").with_mesh(8, 8)


@pytest.mark.parametrize("cfg,options", [
    (CFG, CompileOptions()),  # one 8x8 region holding both layers (a loop of two)
    (CFG, CompileOptions(policy="pipeline")),  # a region per layer, h handed across
    (CFG, CompileOptions(region=(3, 5))),  # uneven tiles, regions stacked vertically
    (CFG, CompileOptions(algo="ring")),  # the pipeline (ring) reductions instead of K-trees
    (GPT2, CompileOptions()),  # GPT-2 style, one region
    (GPT2, CompileOptions(policy="pipeline")),  # GPT-2 style, two regions side by side
    (GPT2, CompileOptions(region=(3, 5))),  # GPT-2 style, uneven heads per row, stacked
], ids=["llama", "llama-pipeline", "llama-3x5", "llama-ring", "gpt2", "gpt2-pipeline",
        "gpt2-3x5"])
def test_decode_steps_match_the_reference(cfg, options):
    weights = random_weights(cfg, seed=1)
    prompt = np.array([[3, 17, 99, 5], [8, 1, 2, cfg.vocab_size - 6]])
    logits, cache = forward(cfg, weights, prompt)
    ids = logits[:, -1].argmax(-1)
    k_wafer = v_wafer = None
    for step in range(3):
        ctx = prompt.shape[1] + step
        compiled = compile_model(build_graph(cfg, "decode", batch=2, ctx_len=ctx), MESH,
                                 options.__class__(**{**vars(options), "capacity": 12}))
        inputs = pack_inputs(compiled, weights, ids, list(cache.k), list(cache.v))
        assert ("pos_embed" in inputs) == (cfg.position == "learned")
        if k_wafer is not None:  # the caches the previous wafer step wrote
            inputs.update(k_wafer)
            inputs.update(v_wafer)
        out = execute(compiled.program, inputs)
        ref, cache = forward(cfg, weights, ids[:, None], cache)
        np.testing.assert_allclose(out["logits"], ref[:, 0], rtol=1e-4, atol=1e-4)
        assert np.array_equal(out["next"][:, 1], ref[:, 0].argmax(-1))
        k_wafer = {n: a for n, a in out.items() if n.endswith("k_cache")}
        v_wafer = {n: a for n, a in out.items() if n.endswith("v_cache")}
        ids = ref[:, 0].argmax(-1)
    res = simulate(compiled.program, MESH)
    assert res.makespan_cycles > 0


def test_memory_is_reported_and_checked():
    compiled = compile_model(build_graph(CFG, "decode", ctx_len=8), MESH)
    mem = compiled.memory
    assert 0 < mem["sram_max_bytes"] <= mem["sram_limit_bytes"]
    assert mem["max_ctx"] >= 8
    assert mem["max_batch"] >= 1
    # The batch it reports compiles on the same placement; twice it does not fit.
    big = compile_model(build_graph(CFG, "decode", batch=mem["max_batch"], ctx_len=8), MESH)
    assert len(big.placements) == len(compiled.placements)
    with pytest.raises(ProgramError, match="does not fit|SRAM"):
        compile_model(build_graph(CFG, "decode", batch=2 * mem["max_batch"] + 2, ctx_len=8),
                      MESH, CompileOptions(region=(compiled.placements[0].region.rows,
                                                   compiled.placements[0].region.cols)))
    tiny_sram = MESH.__class__(**{**vars(MESH), "sram_bytes": 2048})
    with pytest.raises(ProgramError, match="does not fit"):
        compile_model(build_graph(CFG, "decode", ctx_len=8), tiny_sram)


def test_unsupported_models_are_refused():
    with pytest.raises(ProgramError, match="BERT is an encoder"):
        compile_model(build_graph(load_model("bert-base"), "decode", ctx_len=8), MESH)
    graph = build_graph(GPT2, "decode", ctx_len=8)  # build_graph caps ctx_len; so does lowering
    graph.graph["ctx_len"] = GPT2.max_position_embeddings
    with pytest.raises(ProgramError, match="max_position_embeddings"):
        compile_model(graph, MESH)


def test_mixed_llama_gpt2_config_decodes():
    """Norm and position are independent switches: a LLaMA layer (GQA, SwiGLU) with LayerNorm
    and learned positions, no biases, untied head, matches the reference on one region."""
    cfg = dataclasses.replace(CFG, norm="layernorm", position="learned", num_hidden_layers=1)
    weights = random_weights(cfg, seed=2)
    prompt = np.array([[3, 17, 99]])
    logits, cache = forward(cfg, weights, prompt)
    ids = logits[:, -1].argmax(-1)
    compiled = compile_model(build_graph(cfg, "decode", batch=1, ctx_len=3), MESH)
    out = execute(compiled.program, pack_inputs(compiled, weights, ids, list(cache.k),
                                                list(cache.v)))
    ref, _ = forward(cfg, weights, ids[:, None], cache)
    np.testing.assert_allclose(out["logits"], ref[:, 0], rtol=1e-4, atol=1e-4)


def test_gpt2_compiles_for_a_moderate_wafer():
    """GPT-2 (124M, bf16, vocab 50257) on a 128x96 WSE-2 slice: two regions of six layers, the
    embedding and position tables on the first, the tied LM head's copy on the last; a 64x64
    slice is refused in one line."""
    cfg = load_model("gpt2")
    mesh = load_target("wse2").with_mesh(128, 96)
    compiled = compile_model(build_graph(cfg, "decode", ctx_len=64), mesh)
    assert sum(p.count for p in compiled.placements) == 12
    assert compiled.placements[0].embed and compiled.placements[-1].head
    names = {t[0] for t in compiled.code.glue.tensors} | {t[0] for t in compiled.code.body.tensors}
    assert {"pos_embed", "final_norm_bias", "layers.{l}.o_bias", "layers.{l}.up_bias",
            "layers.{l}.attn_norm_bias"} <= names and "rope" not in names
    assert compiled.memory["sram_max_bytes"] <= mesh.sram_bytes
    assert simulate(compiled.code, mesh).makespan_cycles > 0
    with pytest.raises(ProgramError, match="does not fit") as err:
        compile_model(build_graph(cfg, "decode", ctx_len=64), load_target("wse2").with_mesh(64, 64))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cfg,mesh", [
    (CFG, load_target("test16x16")),
    (CFG, load_target("test32x32")),
    # LLaMA-3-8B's layer shape, 3 layers, on a 96x128 mesh with room for them
    (dataclasses.replace(load_model("llama3-8b"), num_hidden_layers=3),
     dataclasses.replace(load_target("wse2").with_mesh(128, 96), sram_bytes=1 << 20)),
])
def test_default_policy_is_at_least_as_fast_as_every_alternative(cfg, mesh):
    graph = build_graph(cfg, "decode", ctx_len=64)
    times = {p: simulate(compile_model(graph, mesh, CompileOptions(policy=p)).code,
                         mesh).makespan_cycles for p in POLICIES}
    assert times["waferllm"] == min(times.values()), times


def test_meshgemv_k_trees_beat_ring_reductions_in_the_whole_model():
    graph = build_graph(CFG, "decode", ctx_len=64)
    mesh = load_target("test32x32")
    times = {a: simulate(compile_model(graph, mesh, CompileOptions(algo=a)).program,
                         mesh).makespan_cycles for a in ("meshgemv", "ring")}
    assert times["meshgemv"] < times["ring"]


@pytest.mark.parametrize("cfg,options", [
    (CFG, CompileOptions()),  # one 8x8 grid holding both layers (a loop of two) and both tables
    (CFG, CompileOptions(policy="pipeline")),  # 4x4 grids: embed, a layer, a layer, LM head
    (CFG, CompileOptions(region=(4, 6))),  # forced non-square regions: 4x4 grids, stacked
    (CFG, CompileOptions(algo="summa", policy="pipeline")),
    (GPT2, CompileOptions()),  # LayerNorm, learned positions, biases, erf GELU, tied head
    (GPT2, CompileOptions(policy="pipeline", algo="cannon")),
], ids=["llama", "llama-pipeline", "llama-4x6", "llama-summa", "gpt2", "gpt2-cannon"])
def test_prefill_matches_the_reference_and_feeds_decode(cfg, options):
    """Prefill of a 7-token prompt: the last token's logits, the argmax and every layer's K / V
    cache equal models.reference; the caches then drive a wafer decode step."""
    weights = random_weights(cfg, seed=4)
    prompt = np.array([3, 17, 99, 5, 200, 42, 7]) % cfg.vocab_size
    logits, cache = forward(cfg, weights, prompt[None])
    compiled = compile_model(build_graph(cfg, "prefill", batch=1, seq_len=len(prompt)), MESH,
                             options)
    assert compiled.phase == "prefill" and compiled.ctx == len(prompt)
    out = execute(compiled.program, pack_inputs(compiled, weights, prompt))
    np.testing.assert_allclose(out["logits"], logits[:, -1], rtol=1e-4, atol=1e-4)
    assert out["next"][0, 1] == logits[0, -1].argmax()
    k, v = unpack_caches(compiled, out)
    for layer in range(cfg.num_hidden_layers):
        np.testing.assert_allclose(k[layer], cache.k[layer], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(v[layer], cache.v[layer], rtol=1e-4, atol=1e-4)
    assert simulate(compiled.program, MESH).makespan_cycles > 0
    if options == CompileOptions():  # hand the caches to a decode step
        ids = out["next"][:, 1].astype(np.int64)
        dec = compile_model(build_graph(cfg, "decode", batch=1, ctx_len=len(prompt)), MESH)
        got = execute(dec.program, pack_inputs(dec, weights, ids, k, v))
        ref, _ = forward(cfg, weights, ids[:, None], cache)
        np.testing.assert_allclose(got["logits"], ref[:, 0], rtol=1e-4, atol=1e-4)


def test_prefill_refusals():
    with pytest.raises(ProgramError, match="batch 1"):
        compile_model(build_graph(CFG, "prefill", batch=2, seq_len=8), MESH)
    with pytest.raises(ProgramError, match="cached tokens"):
        compile_model(build_graph(CFG, "prefill", seq_len=8, ctx_len=4), MESH)
    with pytest.raises(ProgramError, match="RoPE pairs"):
        compile_model(build_graph(CFG, "prefill", seq_len=8), load_target("test32x32"),
                      CompileOptions(region=(32, 32)))
    tiny_sram = MESH.__class__(**{**vars(MESH), "sram_bytes": 8192})
    with pytest.raises(ProgramError, match="does not fit"):
        compile_model(build_graph(CFG, "prefill", seq_len=8), tiny_sram)


def test_a_placement_the_exact_check_refuses_gives_way_to_the_next(monkeypatch):
    """The partition's estimate ranks placements; the SRAM check after lowering decides."""
    import compiler.model as model

    graph = build_graph(CFG, "decode", ctx_len=8)
    ranked = model.partition(CFG, MESH, 1, 9, CompileOptions())
    too_small = (1, 2, [0, 1, 1, 0], False)  # 1x2-core regions cannot hold a layer
    monkeypatch.setattr(model, "partition", lambda *a: [too_small, *ranked])
    compiled = compile_model(graph, MESH)
    region = compiled.placements[0].region
    assert (region.rows, region.cols) == ranked[0][:2]
    monkeypatch.setattr(model, "partition", lambda *a: [too_small])
    with pytest.raises(ProgramError, match="SRAM on core"):
        compile_model(graph, MESH)


BERT = dataclasses.replace(load_model("bert-base"), name="tiny-bert", hidden_size=48,
                           num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                           num_hidden_layers=2, vocab_size=100, max_position_embeddings=32,
                           dtype="fp32")


@pytest.mark.parametrize("options", [CompileOptions(), CompileOptions(policy="pipeline")])
def test_bert_prefill_encodes_like_the_reference(options):
    """BERT's encoder pass: embeddings with token types and LayerNorm, bidirectional
    attention, post-norm layers; the last token's logits and every layer's K / V."""
    weights = random_weights(BERT, seed=3)
    prompt = np.array([5, 61, 7, 99, 0, 42])
    logits, cache = forward(BERT, weights, prompt[None])
    compiled = compile_model(build_graph(BERT, "prefill", seq_len=len(prompt)), MESH, options)
    out = execute(compiled.program, pack_inputs(compiled, weights, prompt))
    np.testing.assert_allclose(out["logits"], logits[:, -1], rtol=1e-4, atol=1e-4)
    k, v = unpack_caches(compiled, out)
    for layer in range(BERT.num_hidden_layers):
        np.testing.assert_allclose(v[layer], cache.v[layer], rtol=1e-4, atol=1e-4)
    with pytest.raises(ProgramError, match="multiple of the grid side"):
        compile_model(build_graph(BERT, "prefill", seq_len=len(prompt)), MESH,
                      CompileOptions(region=(4, 4)))
