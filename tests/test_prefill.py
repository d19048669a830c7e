"""A prefill layer on a grid of cores, executed functionally, equals a plain numpy LLaMA layer."""

import numpy as np
import pytest

from compiler.algorithms.common import Region
from compiler.algorithms.prefill import (
    causal_mask,
    lower_prefill_layer,
    pack_weights,
    prefill_input,
    prefill_layer,
    prefill_output,
    prefill_plan,
    rope_table,
    unpack_k_cache,
)
from compiler.program import ProgramBuilder, ProgramError
from compiler.targets import load_target
from models import load_model
from models.reference import forward, random_weights, rope_angles
from wafersim.functional import execute
from wafersim.simulate import simulate


def reference_layer(w, h, heads, kv_heads, hd, eps, gated=True, theta=10000.0):
    """Plain float64 LLaMA decoder layer on [seq, d] (HF rotate_half RoPE, causal GQA)."""
    seq = h.shape[0]
    x = {k: v.astype(np.float64) for k, v in w.items()}
    h = h.astype(np.float64)

    def rms(a, g):
        return a / np.sqrt((a * a).mean(-1, keepdims=True) + eps) * g

    def lin(a, name):
        return a @ x[name] + x.get(name + "_bias", 0.0)

    def rope(a):  # [seq, n, hd]
        ang = np.arange(seq)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)
        cos, sin = (np.concatenate([f(ang)] * 2, -1)[:, None] for f in (np.cos, np.sin))
        rot = np.concatenate([-a[..., hd // 2:], a[..., :hd // 2]], -1)
        return a * cos + rot * sin

    xn = rms(h, x["L.attn_norm"])
    q = rope(lin(xn, "L.q").reshape(seq, heads, hd))
    k = rope(lin(xn, "L.k").reshape(seq, kv_heads, hd))
    v = lin(xn, "L.v").reshape(seq, kv_heads, hd)
    grp = np.arange(heads) // (heads // kv_heads)
    sc = np.einsum("thd,shd->hts", q, k[:, grp]) / np.sqrt(hd)
    sc = np.where(np.tril(np.ones((seq, seq), bool)), sc, -np.inf)
    pr = np.exp(sc - sc.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    attn = np.einsum("hts,shd->thd", pr, v[:, grp]).reshape(seq, heads * hd)
    h = h + attn @ x["L.o"]
    xm = rms(h, x["L.mlp_norm"])
    up = xm @ x["L.up"]
    if gated:
        gate = xm @ x["L.gate"]
        a = gate / (1 + np.exp(-gate)) * up
    else:
        a = 0.5 * up * (1 + np.tanh(0.7978845608 * (up + 0.044715 * up ** 3)))
    return h + a @ x["L.down"], k.reshape(seq, -1), v.reshape(seq, -1)


def random_layer(seq, d, heads, kv_heads, hd, f, bias, gated=True, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"L.attn_norm": (1, d), "L.q": (d, heads * hd), "L.k": (d, kv_heads * hd),
              "L.v": (d, kv_heads * hd), "L.o": (heads * hd, d), "L.mlp_norm": (1, d),
              "L.up": (d, f), "L.down": (f, d)}
    if gated:
        shapes["L.gate"] = (d, f)
    if bias:
        shapes |= {"L.q_bias": (1, heads * hd), "L.k_bias": (1, kv_heads * hd),
                   "L.v_bias": (1, kv_heads * hd)}
    w = {}
    for name, shape in shapes.items():
        if name.endswith("norm"):
            w[name] = 1 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            w[name] = 0.1 * rng.standard_normal(shape)
        else:
            w[name] = rng.standard_normal(shape) / np.sqrt(shape[0])
    w = {k: v.astype(np.float32) for k, v in w.items()}
    return w, rng.standard_normal((seq, d)).astype(np.float32)


def run_layer(rows, cols, seq, d, heads, kv_heads, hd, f, algo="meshgemm", bias=False,
              gated=True):
    eps = 1e-5
    w, h = random_layer(seq, d, heads, kv_heads, hd, f, bias, gated)
    prog = lower_prefill_layer(seq, d, heads, kv_heads, hd, f, rows, cols, algo, gated=gated,
                               act="silu" if gated else "gelu", qkv_bias=bias, eps=eps,
                               dtype="fp32")
    plan = prefill_plan(Region(rows, cols), cols, seq, d, heads, kv_heads, hd, f, algo)
    ins = pack_weights(w, "L", heads, kv_heads, hd) | {
        "h": h, "rope": rope_table(seq, hd), "causal_mask": causal_mask(plan)}
    got = execute(prog, ins)
    ref, k, v = reference_layer(w, h, heads, kv_heads, hd, eps, gated)
    np.testing.assert_allclose(got["out"], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(unpack_k_cache(got["L.k_cache"], kv_heads, hd), k, rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(got["L.v_cache"], v, rtol=1e-4, atol=1e-4)
    return prog


@pytest.mark.parametrize("rows,cols,seq,d,heads,kv_heads,hd,f", [
    (4, 4, 16, 32, 4, 2, 8, 48),  # two columns per KV head, everything divisible
    (6, 6, 13, 40, 4, 2, 8, 50),  # three columns per KV head, nothing divisible
    (3, 5, 10, 24, 6, 2, 8, 40),  # non-square region: a 3x3 grid, uneven head groups
    (2, 2, 7, 16, 6, 3, 4, 24),  # fewer columns than KV heads: whole heads per column
    (4, 4, 3, 32, 4, 4, 8, 32),  # seq shorter than the grid: empty query blocks
])
def test_prefill_layer_matches_numpy(rows, cols, seq, d, heads, kv_heads, hd, f):
    run_layer(rows, cols, seq, d, heads, kv_heads, hd, f)


@pytest.mark.parametrize("algo", ["cannon", "summa"])
def test_prefill_layer_other_gemms(algo):
    run_layer(5, 5, 11, 30, 4, 2, 8, 36, algo=algo)


def test_prefill_layer_bias_and_plain_mlp():
    run_layer(3, 3, 9, 24, 4, 1, 6, 30, bias=True, gated=False)


def test_two_layers_of_tiny_llama_match_models_reference():
    """Real weight names ("layers.0.q", ...) and rope_angles: the caches equal the reference
    model's KV cache and the final hidden state gives its logits."""
    cfg = load_model("tiny-llama")
    w = random_weights(cfg, seed=3)
    ids = np.array([[5, 17, 3, 250, 9, 9, 100, 42, 7, 1, 0]])
    seq, d, hd = ids.shape[1], cfg.hidden_size, cfg.head_dim
    logits, cache = forward(cfg, w, ids)
    shape = (seq, d, cfg.num_attention_heads, cfg.num_key_value_heads, hd,
              cfg.intermediate_size)
    region = Region(4, 5)
    bld = ProgramBuilder(5, 4, "fp32")
    plan = prefill_plan(region, 5, *shape)
    h, step = prefill_input(bld, plan, "h"), 0
    for layer in range(cfg.num_hidden_layers):
        h, step = prefill_layer(bld, region, h, *shape, f"layers.{layer}", eps=cfg.norm_eps,
                                step=step)
    prefill_output(bld, plan, h, "out")
    ins = {"h": w["embed"][ids[0]], "rope": rope_angles(cfg, np.arange(seq)).reshape(-1, hd // 2),
           "causal_mask": causal_mask(plan)}
    for layer in range(cfg.num_hidden_layers):
        ins |= pack_weights(w, f"layers.{layer}", cfg.num_attention_heads,
                            cfg.num_key_value_heads, hd)
    got = execute(bld.build(), ins)
    for layer in range(cfg.num_hidden_layers):
        k = unpack_k_cache(got[f"layers.{layer}.k_cache"], cfg.num_key_value_heads, hd)
        np.testing.assert_allclose(k, cache.k[layer][0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[f"layers.{layer}.v_cache"], cache.v[layer][0],
                                   rtol=1e-4, atol=1e-4)
    x = got["out"].astype(np.float64)
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * w["final_norm"]
    np.testing.assert_allclose(x @ w["lm_head"], logits[0], rtol=1e-4, atol=1e-3)


def test_prefill_layer_simulates():
    target = load_target("test16x16")
    prog = lower_prefill_layer(32, 64, 4, 2, 16, 176, 8, 8, "meshgemm", target=target)
    res = simulate(prog, target)
    assert res.makespan_cycles > 0
    assert np.all(res.core_busy + res.core_overhead + res.core_wait <= res.makespan_cycles)
    assert res.flops >= 2 * 32 * 64 * (4 * 16 + 2 * 2 * 16 + 4 * 16 + 3 * 176)


def test_region_too_small_for_the_weights_is_refused():
    prog = lower_prefill_layer(64, 2048, 16, 8, 128, 8192, 4, 4, dtype="bf16")
    with pytest.raises(ProgramError, match="SRAM"):
        prog.check(load_target("test4x4"))


def test_grid_wider_than_the_head_dims_is_refused():
    with pytest.raises(ProgramError, match="RoPE pairs"):
        prefill_plan(Region(8, 8), 8, 16, 32, 2, 1, 8, 32)


def test_meshgemm_shifts_take_at_most_two_hops():
    """MeshGEMM's interleaved ring and the K/V pipeline move tiles between logical neighbours,
    at most two hops apart; Cannon's wrap-around crosses the grid."""
    from compiler.algorithms.prefill import _A, _B, _KV

    hops = {}
    for algo in ("meshgemm", "cannon"):
        prog = lower_prefill_layer(12, 32, 4, 2, 8, 32, 6, 6, algo)
        n = np.diff(prog.route_ptr)
        hops[algo] = n[np.isin(prog.msg_colour, (_A, _B, _KV))].max()
    assert hops["meshgemm"] == 2 and hops["cannon"] == 5


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_embedding_in_rounds_matches_the_reference(name, monkeypatch):
    """The embedding looks its ids up a few row blocks at a time (3 of an 8x8 grid's 8 rows a
    round, the last round padded) so that long prompts fit; logits and caches are unchanged.
    GPT-2 adds each round's rows of the learned position table."""
    from compiler import prefill_model
    from compiler.model import CompileOptions, compile_model, pack_inputs
    from compiler.prefill_model import unpack_caches
    from models import build_graph

    cfg = load_model(name)
    monkeypatch.setattr(prefill_model, "embed_rows", lambda *a: 3)
    weights = random_weights(cfg, seed=5)
    prompt = np.array([3, 17, 99, 5, 200, 42, 7, 1, 9, 64, 11, 30, 2]) % cfg.vocab_size
    logits, cache = forward(cfg, weights, prompt[None])
    compiled = compile_model(build_graph(cfg, "prefill", seq_len=len(prompt)),
                             load_target("wse2").with_mesh(8, 8), CompileOptions(region=(8, 8)))
    assert compiled.memory["grid"] == "8x8"
    out = execute(compiled.program, pack_inputs(compiled, weights, prompt))
    np.testing.assert_allclose(out["logits"], logits[:, -1], rtol=1e-4, atol=1e-4)
    k, v = unpack_caches(compiled, out)
    np.testing.assert_allclose(k[-1], cache.k[-1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(v[-1], cache.v[-1], rtol=1e-4, atol=1e-4)
