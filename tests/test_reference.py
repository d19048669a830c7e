"""The numpy reference decoder: cache consistency, RoPE, GQA, and agreement with a loop-per-head
implementation written independently here (complex-number RoPE, one token at a time)."""

import dataclasses
import math

import numpy as np
import pytest

from models import load_model
from models.reference import forward, greedy_decode, random_weights, rope_angles

TINY = load_model("tiny-llama")


def ids_for(cfg, b, t, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t))


def direct_forward(cfg, w, ids):
    """One-layer, H == KV decoder, one sequence, token by token with explicit loops over heads.

    RoPE rotates the complex number x[i] + j x[i + hd/2] by pos * inv_freq[i].
    """
    assert cfg.num_hidden_layers == 1 and cfg.num_key_value_heads == cfg.num_attention_heads
    w = {k: v.astype(np.float64) for k, v in w.items()}
    hd, half = cfg.head_dim, cfg.head_dim // 2
    inv_freq = np.array([cfg.rope_theta ** (-2 * i / hd) for i in range(half)])

    def norm(x, g):
        return g[0] * x / math.sqrt(sum(x * x) / len(x) + cfg.norm_eps)

    def lin(x, name):
        return x @ w[f"layers.0.{name}"] + w.get(f"layers.0.{name}_bias", np.zeros(1))[0]

    def rotate(x, pos):
        z = (x[:half] + 1j * x[half:]) * np.exp(1j * pos * inv_freq)
        return np.concatenate([z.real, z.imag])

    def act(x):
        if cfg.hidden_act == "silu":
            return x / (1 + np.exp(-x))
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    keys, values, out = [], [], []
    for pos, token in enumerate(ids):
        x = w["embed"][token]
        h = norm(x, w["layers.0.attn_norm"])
        q, k, v = lin(h, "q"), lin(h, "k"), lin(h, "v")
        heads = range(cfg.num_attention_heads)
        keys.append([rotate(k[i * hd:(i + 1) * hd], pos) for i in heads])
        values.append([v[i * hd:(i + 1) * hd] for i in heads])
        attn = []
        for i in heads:
            qi = rotate(q[i * hd:(i + 1) * hd], pos)
            s = np.array([qi @ keys[j][i] / math.sqrt(hd) for j in range(pos + 1)])
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            attn.append(sum(p[j] * values[j][i] for j in range(pos + 1)))
        x = x + lin(np.concatenate(attn), "o")
        h = norm(x, w["layers.0.mlp_norm"])
        y = act(lin(h, "gate")) * lin(h, "up") if cfg.gated_mlp else act(lin(h, "up"))
        x = x + lin(y, "down")
        out.append(norm(x, w["final_norm"]) @ w["lm_head"])
    return np.array(out)


@pytest.mark.parametrize("chunks", [[1] * 7, [3, 4], [5, 1, 1]])
def test_prefill_matches_incremental_decoding(chunks):
    w = random_weights(TINY, seed=1)
    ids = ids_for(TINY, 2, sum(chunks))
    full, full_cache = forward(TINY, w, ids)
    parts, cache, start = [], None, 0
    for n in chunks:
        logits, cache = forward(TINY, w, ids[:, start:start + n], cache)
        parts.append(logits)
        start += n
    assert cache.length == full_cache.length == ids.shape[1]
    assert full.dtype == np.float32 and full.shape == (2, 7, TINY.vocab_size)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-6)
    for a, b in zip(cache.k + cache.v, full_cache.k + full_cache.v):
        assert a.shape == (2, 7, TINY.num_key_value_heads * TINY.head_dim)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_rope_is_identity_at_position_zero():
    cos, sin = rope_angles(TINY, 0)
    assert rope_angles(TINY, 0).shape == (2, TINY.head_dim // 2)
    np.testing.assert_array_equal(cos, 1)
    np.testing.assert_array_equal(sin, 0)
    # The first token's cached key is the un-rotated k projection.
    w = random_weights(TINY)
    ids = ids_for(TINY, 1, 3)
    _, cache = forward(TINY, w, ids)
    x = w["embed"][ids[0, 0]].astype(np.float64)
    h = x / np.sqrt(np.mean(x * x) + TINY.norm_eps) * w["layers.0.attn_norm"][0]
    np.testing.assert_allclose(cache.k[0][0, 0], h @ w["layers.0.k"], rtol=1e-5)
    assert not np.allclose(cache.k[0][0, 1], cache.k[0][0, 0])


def test_rope_angles_values():
    hd = TINY.head_dim
    cos, sin = rope_angles(TINY, 5)
    assert cos.dtype == np.float32
    np.testing.assert_allclose(cos[0], math.cos(5), rtol=1e-6)
    np.testing.assert_allclose(sin[-1], math.sin(5 * 1e4 ** (-(hd - 2) / hd)), rtol=1e-6)
    assert rope_angles(TINY, [0, 5]).shape == (2, 2, hd // 2)


@pytest.mark.parametrize(
    "changes",
    [{}, {"qkv_bias": True}, {"gated_mlp": False, "hidden_act": "gelu_new"}],
    ids=["llama", "qkv_bias", "plain_mlp"],
)
def test_matches_direct_implementation(changes):
    cfg = dataclasses.replace(TINY, num_hidden_layers=1, num_key_value_heads=4, **changes)
    w = random_weights(cfg, seed=2)
    ids = ids_for(cfg, 2, 6, seed=3)
    logits, _ = forward(cfg, w, ids)
    for b in range(2):
        np.testing.assert_allclose(logits[b], direct_forward(cfg, w, ids[b]), rtol=1e-4,
                                   atol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
    """Query head h reads kv head h // (H / KV): copying each kv head that often must agree."""
    w = random_weights(TINY, seed=4)
    full = dataclasses.replace(TINY, num_key_value_heads=TINY.num_attention_heads)
    rep = TINY.num_attention_heads // TINY.num_key_value_heads
    wf = dict(w)
    for l in range(TINY.num_hidden_layers):
        for name in ("k", "v"):
            m = w[f"layers.{l}.{name}"].reshape(TINY.hidden_size, -1, TINY.head_dim)
            wf[f"layers.{l}.{name}"] = np.repeat(m, rep, axis=1).reshape(TINY.hidden_size, -1)
    ids = ids_for(TINY, 2, 5)
    np.testing.assert_allclose(forward(TINY, w, ids)[0], forward(full, wf, ids)[0], rtol=1e-5,
                               atol=1e-6)


def expected_shapes(qkv_bias):
    """tiny-llama: d 64, ffn 176, 4 heads of 16, 2 kv heads, vocab 256."""
    shapes = {"embed": (256, 64), "final_norm": (1, 64), "lm_head": (64, 256)}
    for l in range(2):
        shapes |= {f"layers.{l}.{k}": s for k, s in [
            ("attn_norm", (1, 64)), ("q", (64, 64)), ("k", (64, 32)), ("v", (64, 32)),
            ("o", (64, 64)), ("mlp_norm", (1, 64)), ("gate", (64, 176)), ("up", (64, 176)),
            ("down", (176, 64))]}
        if qkv_bias:
            shapes |= {f"layers.{l}.q_bias": (1, 64), f"layers.{l}.k_bias": (1, 32),
                       f"layers.{l}.v_bias": (1, 32)}
    return shapes


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_weights_deterministic_with_listed_shapes(qkv_bias):
    cfg = dataclasses.replace(TINY, qkv_bias=qkv_bias)
    a, b, c = random_weights(cfg, seed=7), random_weights(cfg, seed=7), random_weights(cfg, 8)
    assert {k: v.shape for k, v in a.items()} == expected_shapes(qkv_bias)
    assert all(v.dtype == np.float32 for v in a.values())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["layers.0.q"], c["layers.0.q"])
    assert 0.8 < a["layers.1.down"].std() * math.sqrt(176) < 1.2  # std 1/sqrt(fan_in)


def test_tied_lm_head_is_embed_transposed():
    cfg = dataclasses.replace(TINY, tie_word_embeddings=True)
    w = random_weights(cfg)
    np.testing.assert_array_equal(w["lm_head"], w["embed"].T)
    assert w["lm_head"].flags.c_contiguous


def _ln(w, x, name, eps):
    """LayerNorm from its definition, weight `name`, bias `name + "_bias"`."""
    mu = sum(x) / len(x)
    var = sum((x - mu) ** 2) / len(x)
    return (x - mu) / math.sqrt(var + eps) * w[name][0] + w[name + "_bias"][0]


def _lin(w, x, name):
    return x @ w[name] + w[name + "_bias"][0]


def _erf_gelu(x):
    return np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])


def _attend(q, keys, values, heads, hd):
    """One query row against lists of key / value rows, head by head, softmax by its
    definition."""
    out = []
    for i in range(heads):
        sl = slice(i * hd, (i + 1) * hd)
        s = np.array([q[sl] @ kk[sl] / math.sqrt(hd) for kk in keys])
        e = np.exp(s - s.max())
        out.append(sum(pj * vv[sl] for pj, vv in zip(e / e.sum(), values)))
    return np.concatenate(out)


BERT = dataclasses.replace(load_model("bert-base"), name="tiny-bert", hidden_size=48,
                           num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                           num_hidden_layers=2, vocab_size=100, max_position_embeddings=32,
                           dtype="fp32")


def bert_direct(cfg, w, ids):
    """BertModel written independently, one token's row at a time: embeddings (token,
    position, token type 0) through LayerNorm, post-norm layers over every token, then each
    token's row through lm_head."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    hd, heads = cfg.head_dim, cfg.num_attention_heads

    def ln(x, name):
        return _ln(w, x, name, cfg.norm_eps)

    xs = [ln(w["embed"][t] + w["pos_embed"][p] + w["type_embed"][0], "embed_norm")
          for p, t in enumerate(ids)]
    for l in range(cfg.num_hidden_layers):
        p = f"layers.{l}."
        q, k, v = ([_lin(w, x, p + n) for x in xs] for n in ("q", "k", "v"))
        out = []
        for i, x in enumerate(xs):
            y = ln(x + _lin(w, _attend(q[i], k, v, heads, hd), p + "o"), p + "attn_norm")
            g = _erf_gelu(_lin(w, y, p + "up"))
            out.append(ln(y + _lin(w, g, p + "down"), p + "mlp_norm"))
        xs = out
    return np.array([x @ w["lm_head"] for x in xs])


def test_bert_matches_direct_implementation():
    w = random_weights(BERT, seed=5)
    ids = ids_for(BERT, 2, 5, seed=6)
    logits, _ = forward(BERT, w, ids)
    for b in range(2):
        np.testing.assert_allclose(logits[b], bert_direct(BERT, w, ids[b]), rtol=1e-4,
                                   atol=1e-5)
    assert "final_norm" not in w and w["type_embed"].shape == (2, 48)
    with pytest.raises(ValueError, match="encoder takes no KV cache"):
        forward(BERT, w, ids, forward(BERT, w, ids)[1])


def test_rejects_bad_ids_and_weights():
    w = random_weights(TINY)
    for bad in (np.array([[0, 256]]), np.array([[-1]]), np.zeros(3, dtype=int),
                np.zeros((1, 1))):
        with pytest.raises(ValueError, match="ids"):
            forward(TINY, w, bad)
    with pytest.raises(ValueError, match="layers.1.up"):
        forward(TINY, {**w, "layers.1.up": w["layers.1.up"].T}, np.zeros((1, 1), dtype=int))


def test_greedy_decode_matches_argmax_of_full_forward():
    w = random_weights(TINY, seed=5)
    prompt = [3, 14, 15, 92]
    got = greedy_decode(TINY, w, prompt, steps=4)
    seq = list(prompt)
    for _ in range(4):
        seq.append(int(forward(TINY, w, np.array([seq]))[0][0, -1].argmax()))
    assert got == seq[len(prompt):]
    batch = greedy_decode(TINY, w, np.array([prompt, prompt]), steps=4)
    assert [list(step) for step in batch] == [[t, t] for t in got]


# ---- GPT-2 style: LayerNorm, learned positions, MHA, biases, GELU MLP, tied head -----------

GPT2 = load_model("tiny-gpt2")


def gpt2_direct(cfg, w, ids):
    """GPT2LMHeadModel written independently: one sequence, token by token, loops over heads
    and layers, LayerNorm from its definition, erf GELU ("gelu") via math.erf."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    hd, heads = cfg.head_dim, cfg.num_attention_heads

    def gelu(x):
        if cfg.hidden_act == "gelu":
            return _erf_gelu(x)
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    def ln(x, name):
        return _ln(w, x, name, cfg.norm_eps)

    layers = range(cfg.num_hidden_layers)
    keys, values = [[] for _ in layers], [[] for _ in layers]
    out = []
    for pos, token in enumerate(ids):
        x = w["embed"][token] + w["pos_embed"][pos]
        for l in layers:
            p = f"layers.{l}."
            h = ln(x, p + "attn_norm")
            q, k, v = (_lin(w, h, p + n) for n in ("q", "k", "v"))
            keys[l].append(k)
            values[l].append(v)
            x = x + _lin(w, _attend(q, keys[l], values[l], heads, hd), p + "o")
            x = x + _lin(w, gelu(_lin(w, ln(x, p + "mlp_norm"), p + "up")), p + "down")
        out.append(ln(x, "final_norm") @ w["embed"].T)  # tied head
    return np.array(out)


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_gpt2_matches_direct_implementation(act):
    cfg = dataclasses.replace(GPT2, hidden_act=act)
    w = random_weights(cfg, seed=2)
    ids = ids_for(cfg, 2, 6, seed=3)
    logits, _ = forward(cfg, w, ids)
    for b in range(2):
        np.testing.assert_allclose(logits[b], gpt2_direct(cfg, w, ids[b]), rtol=1e-4,
                                   atol=1e-5)


def test_gpt2_weights_and_cache():
    """Names and shapes (norm biases, position table, tied head), and a prefill equal to
    decoding token by token with positions continuing from the cache."""
    w = random_weights(GPT2, seed=1)
    d, f, v = 48, 192, 128
    assert w["pos_embed"].shape == (128, d)
    for name in ("final_norm_bias", "layers.1.attn_norm_bias", "layers.0.mlp_norm_bias",
                 "layers.0.o_bias", "layers.1.down_bias"):
        assert w[name].shape == (1, d)
    assert w["layers.0.up_bias"].shape == (1, f) and "layers.0.gate" not in w
    assert w["layers.0.q_bias"].shape == (1, d)
    np.testing.assert_array_equal(w["lm_head"], w["embed"].T)
    assert w["embed"].shape == (v, d)
    ids = ids_for(GPT2, 2, 5)
    full, _ = forward(GPT2, w, ids)
    cache, parts = None, []
    for t in range(5):
        logits, cache = forward(GPT2, w, ids[:, t:t + 1], cache)
        parts.append(logits)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-6)
    # Positions matter: the same token at two positions gives different logits.
    same = np.array([[7, 7]])
    out, _ = forward(GPT2, w, same)
    assert not np.allclose(out[0, 0], out[0, 1])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        forward(GPT2, w, np.zeros((1, 129), dtype=int))


def test_layernorm_and_mixed_configs():
    """LayerNorm is RMSNorm of the centred vector plus the bias; norm and position are
    independent switches (a llama config with LayerNorm and learned positions runs)."""
    from models.reference import _layernorm, _rmsnorm
    rng = np.random.default_rng(0)
    x, g, bias = (rng.standard_normal(shape) for shape in ((3, 48), (1, 48), (1, 48)))
    np.testing.assert_allclose(_layernorm(x, g, bias, 1e-5),
                               _rmsnorm(x - x.mean(-1, keepdims=True), g, 1e-5) + bias,
                               rtol=1e-12)
    mixed = dataclasses.replace(TINY, norm="layernorm", position="learned")
    w = random_weights(mixed, seed=3)
    assert "pos_embed" in w and "layers.0.attn_norm_bias" in w and "layers.0.gate" in w
    logits, cache = forward(mixed, w, ids_for(mixed, 2, 4))
    assert logits.shape == (2, 4, TINY.vocab_size) and np.isfinite(logits).all()
