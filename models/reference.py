"""Plain numpy forward pass of a pre-norm decoder (LLaMA, Mistral, Qwen2, GPT-2): the test oracle.

The wafer compiler's functional execution is checked against `forward` (float32, rtol 1e-4), so
this file favours obvious code over speed and follows Hugging Face's LlamaForCausalLM exactly:
pre-norm RMSNorm blocks, q/k/v (+bias) projections, RoPE in the "rotate_half" layout,
grouped-query causal attention over a KV cache, a (gated) MLP, final norm and LM head.
GPT-2 (GPT2LMHeadModel) is the same decoder with LayerNorm (weight and bias) instead of
RMSNorm, learned absolute positions (`pos_embed` [max_pos, d], its row added to the token's
embedding) instead of RoPE, multi-head attention, biases on every projection, a plain GELU MLP
and a tied LM head; the two are independent switches (`cfg.norm`, `cfg.position`).
Everything is computed in float64 from float32 weights and the logits are cast to float32, so
the oracle's own rounding error is far below the tolerance it is used with. BERT is the
post-norm encoder (BertModel): token + position + token-type-0 embeddings, LayerNorm'd
(`embed_norm`); each layer x = LN(x + attn(x)), x = LN(x + mlp(x)); every token sees every
token; no final norm; and, as models.graph's step, logits of each token through `lm_head`
(BERT's masked-LM transform is not modelled). Not modelled: rope_scaling (plain `rope_theta`
frequencies), Mistral's sliding window (attention spans the whole context).

Weights use the x @ W convention (W is [in, out]); names are listed by `weight_shapes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from models.config import ModelConfig

_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class KVCache:
    """Per-layer keys (after RoPE, as Hugging Face stores them) and values, [b, T_total, KV*hd].

    Kept in float64 so that decoding token by token reproduces a prefill to rounding.
    """

    k: tuple[np.ndarray, ...]
    v: tuple[np.ndarray, ...]

    @property
    def length(self) -> int:
        """Tokens cached per sequence: the position the next token takes."""
        return self.k[0].shape[1]


def check_supported(cfg: ModelConfig) -> None:
    """Refuse configs this oracle does not compute, naming the field, instead of computing
    nonsense."""
    if cfg.norm not in ("rmsnorm", "layernorm"):
        raise ValueError(f"{cfg.name}: norm={cfg.norm!r} is not supported")
    if cfg.position not in ("rope", "learned"):
        raise ValueError(f"{cfg.name}: position={cfg.position!r} is not supported")


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight name -> shape, in the order `random_weights` draws them.

    Beyond q/k/v biases, `o_proj_bias` adds ".o_bias" [1, d] and `mlp_bias` adds ".gate_bias"
    (gated only), ".up_bias" [1, f] and ".down_bias" [1, d], as in llama with attention_bias.
    A fast feed-forward model (`fff_depth`) has ".fff_in" [d, nodes] (a column per neuron) and
    ".fff_out" [nodes, d] instead of the MLP's matrices and biases.
    LayerNorm adds a bias to every norm (".attn_norm_bias", ".mlp_norm_bias", "final_norm_bias",
    [1, d]); learned positions add "pos_embed" [max_position_embeddings, d].
    """
    check_supported(cfg)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    ln = cfg.norm == "layernorm"
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab_size, d)}
    if cfg.position == "learned":
        shapes["pos_embed"] = (cfg.max_position_embeddings, d)
    bert = cfg.architecture == "bert"
    if bert:
        shapes |= {"type_embed": (cfg.type_vocab_size, d), "embed_norm": (1, d),
                   "embed_norm_bias": (1, d)}
    for l in range(cfg.num_hidden_layers):
        p = f"layers.{l}."
        shapes[p + "attn_norm"] = (1, d)
        if ln:
            shapes[p + "attn_norm_bias"] = (1, d)
        shapes |= {p + "q": (d, q), p + "k": (d, kv), p + "v": (d, kv), p + "o": (q, d)}
        if cfg.qkv_bias:
            shapes |= {p + "q_bias": (1, q), p + "k_bias": (1, kv), p + "v_bias": (1, kv)}
        if cfg.o_proj_bias:
            shapes[p + "o_bias"] = (1, d)
        shapes[p + "mlp_norm"] = (1, d)
        if ln:
            shapes[p + "mlp_norm_bias"] = (1, d)
        if cfg.fff_depth is not None:  # a fast feed-forward tree instead of the MLP
            shapes |= {p + "fff_in": (d, cfg.fff_nodes), p + "fff_out": (cfg.fff_nodes, d)}
            continue
        if cfg.gated_mlp:
            shapes[p + "gate"] = (d, f)
        shapes |= {p + "up": (d, f), p + "down": (f, d)}
        if cfg.mlp_bias:
            if cfg.gated_mlp:
                shapes[p + "gate_bias"] = (1, f)
            shapes |= {p + "up_bias": (1, f), p + "down_bias": (1, d)}
    if not bert:
        shapes["final_norm"] = (1, d)
        if ln:
            shapes["final_norm_bias"] = (1, d)
    shapes["lm_head"] = (d, cfg.vocab_size)
    return shapes


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic float32 weights scaled so that activations stay O(1) through every layer.

    Matrices ~ N(0, 1/fan_in), norm weights 1 + 0.1 N(0, 1), biases (norm biases too)
    0.1 N(0, 1), embed N(0, 1), pos_embed 0.5 N(0, 1); a tied lm_head is a copy of embed.T
    rather than a draw.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(cfg).items():
        if name == "lm_head" and cfg.tie_word_embeddings:
            w = weights["embed"].T.copy()
        elif name == "embed":
            w = rng.standard_normal(shape)
        elif name in ("pos_embed", "type_embed"):
            w = 0.5 * rng.standard_normal(shape)
        elif name.endswith("norm"):
            w = 1 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            w = 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / math.sqrt(shape[0])
        weights[name] = w.astype(np.float32)
    return weights


def _angles(cfg: ModelConfig, pos) -> np.ndarray:
    """pos * inv_freq in float64, [*pos.shape, hd//2]; inv_freq[i] = theta^(-2i/hd)."""
    check_supported(cfg)
    hd = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    return np.multiply.outer(np.asarray(pos, dtype=np.float64), inv_freq)


def rope_angles(cfg: ModelConfig, pos) -> np.ndarray:
    """[2, hd//2] float32: cos and sin of pos * inv_freq (no rope_scaling).

    An array of positions gives [2, *pos.shape, hd//2].
    """
    a = _angles(cfg, pos)
    return np.stack([np.cos(a), np.sin(a)]).astype(np.float32)


def _rope(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """HF apply_rotary_pos_emb on x [b, T, heads, hd] with angles [T, hd//2]: dims i, i + hd/2
    form a pair, x * cos + rotate_half(x) * sin with cos/sin repeated over both halves."""
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[None, :, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[None, :, None, :]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _layernorm(x: np.ndarray, w: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """torch.nn.LayerNorm: biased variance, eps inside the square root."""
    xc = x - x.mean(axis=-1, keepdims=True)
    return xc / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + eps) * w + bias


def _norm(cfg: ModelConfig, x: np.ndarray, weights: dict[str, np.ndarray], name: str
          ) -> np.ndarray:
    if cfg.norm == "layernorm":
        return _layernorm(x, weights[name], weights[name + "_bias"], cfg.norm_eps)
    return _rmsnorm(x, weights[name], cfg.norm_eps)


def _act(name: str, x: np.ndarray) -> np.ndarray:
    """HF ACT2FN: "gelu" is the exact erf form, gelu_new / gelu_pytorch_tanh the tanh form."""
    if name in ("silu", "swish"):
        return x / (1 + np.exp(-x))
    if name == "relu":
        return np.maximum(x, 0)
    if name in _GELU_TANH:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "gelu":
        return 0.5 * x * (1 + np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2)))
    raise ValueError(f"hidden_act={name!r} is not supported")


def _linear(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    y = x @ w[name].astype(np.float64)
    bias = w.get(name + "_bias")
    return y if bias is None else y + bias


def _check_weights(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> None:
    for name, shape in weight_shapes(cfg).items():
        if name not in weights:
            raise ValueError(f"{cfg.name}: missing weight {name!r}")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{cfg.name}: weight {name!r} has shape "
                             f"{tuple(weights[name].shape)}, expected {shape}")


def fff(x: np.ndarray, w_in: np.ndarray, w_out: np.ndarray, depth: int, act: str
        ) -> tuple[np.ndarray, np.ndarray]:
    """Fast feed-forward (UltraFastBERT's FFF, inference): every row of x [..., d] descends the
    tree from the root, node n's children being 2n + 1 (left) and 2n + 2 (right): at each
    level z = x . w_in[:, n], the output gains act(z) * w_out[n], and z >= 0 goes right.
    Returns (y like x, the nodes each row visits [..., depth + 1])."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    node = np.zeros(len(flat), np.int64)
    y = np.zeros_like(flat)
    nodes = []
    for _ in range(depth + 1):
        z = np.einsum("rd,dr->r", flat, w_in[:, node].astype(np.float64))
        y += _act(act, z)[:, None] * w_out[node].astype(np.float64)
        nodes.append(node)
        node = 2 * node + 1 + (z >= 0)
    return y.reshape(x.shape), np.stack(nodes, axis=-1).reshape(*x.shape[:-1], depth + 1)


def forward(
    cfg: ModelConfig, weights: dict[str, np.ndarray], ids, cache: KVCache | None = None,
    act_mask=None, paths: list | None = None,
) -> tuple[np.ndarray, KVCache]:
    """Logits [b, T, vocab] float32 for new tokens ids [b, T], and the cache grown by T.

    Positions continue from `cache.length` (0 without a cache); each new token attends to the
    whole cache and to the new tokens up to itself. `act_mask`: per layer, the MLP neurons
    that fire ([b, f] or [b, T, f], 0 or 1; activation sparsity): the others' activations are
    zeroed before the down projection. `paths`: a list that gets, per layer of a fast
    feed-forward model, the nodes each token visits ([b, T, depth + 1], `fff`).
    """
    _check_weights(cfg, weights)
    ids = np.asarray(ids)
    if ids.ndim != 2 or not ids.size or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be a non-empty integer array [batch, tokens], got "
                         f"{ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"ids must lie in [0, {cfg.vocab_size}) (vocab_size)")
    b, t = ids.shape
    past = 0 if cache is None else cache.length
    if cache is not None and cache.k[0].shape[0] != b:
        raise ValueError(f"batch {b} differs from the cache's {cache.k[0].shape[0]}")
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    rope = cfg.position == "rope"
    if not rope and past + t > cfg.max_position_embeddings:
        raise ValueError(f"{cfg.name}: positions up to {past + t - 1} exceed the learned table "
                         f"of {cfg.max_position_embeddings} (max_position_embeddings)")
    bert = cfg.architecture == "bert"
    if bert and cache is not None:
        raise ValueError(f"{cfg.name}: an encoder takes no KV cache")
    angles = _angles(cfg, np.arange(past, past + t)) if rope else None
    # Query i (position past + i) may see keys 0 .. past + i (an encoder: every key).
    visible = np.arange(past + t)[None, :] <= past + np.arange(t)[:, None]
    if bert:
        visible = np.ones_like(visible)
    group = np.arange(heads) // (heads // kv_heads)  # kv head of each query head

    x = weights["embed"].astype(np.float64)[ids]
    if not rope:
        x = x + weights["pos_embed"].astype(np.float64)[past:past + t][None]
    if bert:
        x = _norm(cfg, x + weights["type_embed"].astype(np.float64)[0], weights, "embed_norm")
    ks, vs = [], []
    for l in range(cfg.num_hidden_layers):
        w = {k.removeprefix(f"layers.{l}."): v for k, v in weights.items()
             if k.startswith(f"layers.{l}.")}
        h = x if bert else _norm(cfg, x, w, "attn_norm")
        q = _linear(h, w, "q").reshape(b, t, heads, hd)
        k = _linear(h, w, "k").reshape(b, t, kv_heads, hd)
        if rope:
            q, k = _rope(q, angles), _rope(k, angles)
        k = k.reshape(b, t, -1)
        v = _linear(h, w, "v")
        if cache is not None:
            k = np.concatenate([cache.k[l], k], axis=1)
            v = np.concatenate([cache.v[l], v], axis=1)
        ks.append(k)
        vs.append(v)
        kh = k.reshape(b, past + t, kv_heads, hd)[:, :, group]  # [b, S, heads, hd]
        vh = v.reshape(b, past + t, kv_heads, hd)[:, :, group]
        scores = np.einsum("bthd,bshd->bhts", q, kh) / math.sqrt(hd)
        scores = np.where(visible, scores, -np.inf)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        attn = np.einsum("bhts,bshd->bthd", p, vh).reshape(b, t, heads * hd)
        x = x + _linear(attn, w, "o")
        if bert:
            x = _norm(cfg, x, w, "attn_norm")
        h = x if bert else _norm(cfg, x, w, "mlp_norm")
        if cfg.fff_depth is not None:
            y, visited = fff(h, w["fff_in"], w["fff_out"], cfg.fff_depth, cfg.hidden_act)
            if paths is not None:
                paths.append(visited)
            x = x + y
            if bert:
                x = _norm(cfg, x, w, "mlp_norm")
            continue
        up = _linear(h, w, "up")
        if cfg.gated_mlp:
            y = _act(cfg.hidden_act, _linear(h, w, "gate")) * up
        else:
            y = _act(cfg.hidden_act, up)
        if act_mask is not None:
            y = y * np.reshape(act_mask[l], (b, -1, y.shape[-1]))
        x = x + _linear(y, w, "down")
        if bert:
            x = _norm(cfg, x, w, "mlp_norm")
    if not bert:
        x = _norm(cfg, x, weights, "final_norm")
    logits = (x @ weights["lm_head"].astype(np.float64)).astype(np.float32)
    return logits, KVCache(tuple(ks), tuple(vs))


def greedy_decode(cfg: ModelConfig, weights: dict[str, np.ndarray], prompt_ids, steps: int):
    """Prefill the prompt, then take the argmax token `steps` times through the cache.

    A prompt [T] gives a list of ints; a batch [b, T] a list of [b] arrays, one per step.
    """
    prompt = np.asarray(prompt_ids)
    ids = prompt[None] if prompt.ndim == 1 else prompt
    out, cache = [], None
    for _ in range(steps):
        logits, cache = forward(cfg, weights, ids, cache)
        ids = logits[:, -1].argmax(axis=-1)[:, None]
        out.append(int(ids[0, 0]) if prompt.ndim == 1 else ids[:, 0].copy())
    return out
