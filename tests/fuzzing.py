"""Generators of hostile and random inputs, shared by tests/test_reliability.py and
benchmarks/fuzz.py (which imports this file by path)."""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from compiler.layout import save_layout
from compiler.model import POLICIES, CompileOptions, compile_model, pack_inputs
from compiler.program import RECV, SEND
from compiler.targets import load_target
from models.config import ModelConfig
from models.graph import build_graph
from models.reference import forward, random_weights
from wafersim.functional import execute

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"
TINY_LLAMA = json.loads((ZOO / "tiny-llama.json").read_text())
WEIRD = [None, -1, 0, 1, 3, 7, 64, 10**12, 1.5, float("nan"), "x", "", True, False, [], {},
         "silu", "llama", "float16"]


@st.composite
def mutated_config(draw) -> dict:
    """tiny-llama's config.json with one to three fields deleted or set to odd values."""
    d = dict(TINY_LLAMA)
    keys = sorted(d) + ["head_dim", "attention_bias", "rope_scaling", "n_embd"]
    keys = keys + ["model_type", "architectures"] * 3  # the fields that pick the parser
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        value = draw(st.sampled_from(WEIRD))
        if value is None:
            d.pop(key, None)
        else:
            d[key] = value
    return d


@lru_cache(maxsize=1)
def _small_stamped():
    target = load_target("wse2").with_mesh(8, 8)
    return compile_model(build_graph(ModelConfig.from_dict(TINY_LLAMA, "tiny"), "decode",
                                     ctx_len=6), target, CompileOptions(policy="pipeline"))


def small_layout(tmp_path: Path):
    """(program, path) of a stamped whole-model layout (tiny-llama on 8x8 cores)."""
    compiled = _small_stamped()
    path = tmp_path / "small.wsl"
    if not path.exists():
        save_layout(compiled.code, path, **compiled.info())
    return compiled.program, path


def corrupt(raw: bytes, draw) -> bytes:
    """A truncation, a few flipped bytes or a zeroed span of `raw`."""
    n = len(raw)
    how = draw(st.sampled_from(["truncate", "flip", "zero"]))
    if how == "truncate":
        return raw[:draw(st.integers(0, n - 1))]
    out = bytearray(raw)
    if how == "flip":
        for at in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4)):
            out[at] ^= draw(st.integers(1, 255))
    else:
        at = draw(st.integers(0, n - 1))
        out[at:at + draw(st.integers(1, 64))] = bytes(min(64, n - at))[:len(out[at:at + 64])]
    return bytes(out)


@st.composite
def random_llama(draw):
    """(cfg, target, batch, ctx, policy, seed): a small LLaMA-family decode step on a random
    mesh with random link bandwidth, hop latency and overheads."""
    hd = draw(st.sampled_from([4, 8, 16]))
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2]))
    d = dict(TINY_LLAMA, hidden_size=heads * hd, num_attention_heads=heads,
             num_key_value_heads=kv, intermediate_size=draw(st.integers(2, 12)) * 8,
             num_hidden_layers=draw(st.integers(1, 3)), vocab_size=draw(st.integers(16, 200)))
    if draw(st.booleans()):
        d["attention_bias"] = True
    cfg = ModelConfig.from_dict(d, "random-llama")
    target = dataclasses.replace(  # a WSE-2-like core with random fabric and overheads
        load_target("wse2").with_mesh(draw(st.integers(3, 12)), draw(st.integers(3, 12))),
        link_bytes_per_cycle=draw(st.sampled_from([1, 2, 4, 8])),
        hop_latency_cycles=draw(st.integers(0, 4)),
        send_overhead_cycles=draw(st.integers(0, 8)),
        recv_overhead_cycles=draw(st.integers(0, 8)),
        compute_overhead_cycles=draw(st.integers(0, 4)))
    return (cfg, target, draw(st.integers(1, 2)), draw(st.integers(1, 12)),
            draw(st.sampled_from(POLICIES)), draw(st.integers(0, 2**16)))


def functional_case(cfg, target, batch, ctx, policy, seed):
    """Compile one decode step after a random prompt of `ctx` tokens and run it on numpy data:
    (compiled, wafer outputs, the reference's logits [batch, vocab])."""
    weights = random_weights(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, cfg.vocab_size, size=(batch, ctx))
    logits, cache = forward(cfg, weights, prompt)
    ids = logits[:, -1].argmax(-1)
    compiled = compile_model(build_graph(cfg, "decode", batch=batch, ctx_len=ctx), target,
                             CompileOptions(policy=policy))
    out = execute(compiled.program, pack_inputs(compiled, weights, ids, list(cache.k),
                                                list(cache.v)))
    ref, _ = forward(cfg, weights, ids[:, None], cache)
    return compiled, out, ref[:, 0]


def _repeats(prog) -> np.ndarray:
    """How many times each instruction runs (its core's loop count inside the loop)."""
    core = np.repeat(np.arange(prog.cores), np.diff(prog.core_ptr))
    i = np.arange(prog.n_instructions)
    inside = (i >= prog.loop_start[core]) & (i < prog.loop_end[core])
    return np.where(inside, prog.loop_count[core], 1)


def sends(prog) -> np.ndarray:
    """How many times each message is sent in a run."""
    send = prog.ins_kind == SEND
    return np.bincount(prog.ins_arg[send], weights=_repeats(prog)[send],
                       minlength=prog.n_messages).astype(np.int64)


def unicast_balance(prog) -> tuple[np.ndarray, np.ndarray]:
    """Per unicast message: how often it is sent and how often received in a run.
    Conservation: the two are equal."""
    recv = prog.ins_kind == RECV  # its argument is a route entry
    msg = np.searchsorted(prog.route_ptr, prog.ins_arg[recv], side="right") - 1
    received = np.bincount(msg, weights=_repeats(prog)[recv], minlength=prog.n_messages)
    unicast = ~prog.msg_multicast
    return sends(prog)[unicast], received[unicast].astype(np.int64)
