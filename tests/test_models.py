"""Tests for models/: zoo sizes against published counts, config validation, and op graphs
whose structure, FLOPs and bytes match closed forms written independently here."""

import json

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import ConfigError, ModelConfig, Op, build_graph, load_model, zoo_names
from models.graph import kv_cache_bytes, layer_ops, total_flops, total_weight_bytes
from models.ops import ATTENTION_KINDS, MATMUL_KINDS

PUBLISHED_PARAMS = {
    "llama3-8b": 8.03e9,
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.016e9,
    "llama3-70b": 70.6e9,
    "mistral-7b": 7.24e9,
    "qwen2-7b": 7.62e9,
    "qwen2-72b": 72.7e9,
    "gpt2": 124.4e6,
    "bert-base": 109.5e6,
}
OPS_PER_LAYER = {"llama": 18, "gpt2": 14, "bert": 14}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 48, "n_layer": 2, "n_head": 4, "vocab_size": 128}


def ops(g: nx.DiGraph) -> list[Op]:
    return [op for _, op in g.nodes(data="op")]


def layer_matrices_and_biases(cfg: ModelConfig) -> tuple[int, int]:
    """Elements of one layer's projection matrices, and of their biases."""
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    mlp_mats = 3 if cfg.gated_mlp else 2
    mats = h * q + 2 * h * kv + q * h + mlp_mats * h * f
    biases = (q + 2 * kv) * cfg.qkv_bias + h * cfg.o_proj_bias
    biases += ((mlp_mats - 1) * f + h) * cfg.mlp_bias
    return mats, biases


def expected_matmul_flops(cfg: ModelConfig, batch: int, seq: int) -> int:
    """2 FLOPs per weight per token, 1 per bias; the LM head sees one token per sequence."""
    mats, biases = layer_matrices_and_biases(cfg)
    layers = cfg.num_hidden_layers * batch * seq * (2 * mats + biases)
    return layers + 2 * batch * cfg.hidden_size * cfg.vocab_size


def expected_attention_flops(cfg: ModelConfig, batch: int, seq: int, ctx: int) -> int:
    """QK^T and PV: 2 * 2 * q_rows * kv_len * head_dim per (sequence, head, layer)."""
    per_head = 4 * seq * (ctx + seq) * cfg.head_dim
    return batch * cfg.num_hidden_layers * cfg.num_attention_heads * per_head


def expected_weight_bytes(cfg: ModelConfig, batch: int, seq: int) -> int:
    """All parameters, except: lookups read only their rows, the pooler is not run, and a
    tied table is read again, whole, by the LM head."""
    h, learned = cfg.hidden_size, cfg.position == "learned"
    tables = cfg.vocab_size + cfg.type_vocab_size + cfg.max_position_embeddings * learned
    lookups = 1 + learned + (cfg.type_vocab_size > 0)
    pooler = h * h + h if cfg.architecture == "bert" else 0
    tied_head = cfg.vocab_size * h * cfg.tie_word_embeddings
    params = cfg.param_count() - tables * h - pooler + tied_head + lookups * batch * seq * h
    return params * cfg.dtype_bytes


def check_graph_against_closed_forms(cfg: ModelConfig, g: nx.DiGraph) -> None:
    batch, seq, ctx = g.graph["batch"], g.graph["seq_len"], g.graph["ctx_len"]
    all_ops = ops(g)
    matmul = sum(op.flops for op in all_ops if op.kind in MATMUL_KINDS)
    attention = sum(op.flops for op in all_ops if op.kind in ATTENTION_KINDS)
    assert matmul == expected_matmul_flops(cfg, batch, seq)
    assert attention == expected_attention_flops(cfg, batch, seq, ctx)
    assert total_weight_bytes(g) == expected_weight_bytes(cfg, batch, seq)
    assert sum(op.kv_read_bytes for op in all_ops) == kv_cache_bytes(cfg, batch, ctx)
    assert sum(op.kv_write_bytes for op in all_ops) == kv_cache_bytes(cfg, batch, seq)
    assert nx.is_directed_acyclic_graph(g)
    for name, op in g.nodes(data="op"):
        into = [g.edges[src, name]["bytes"] for src in g.predecessors(name)]
        if into:
            assert op.in_bytes == sum(into), name
        for dst in g.successors(name):
            assert 0 < g.edges[name, dst]["bytes"] <= op.out_bytes


# --- the zoo --------------------------------------------------------------------------------


def test_zoo_lists_the_eleven_bundled_models():
    assert set(zoo_names()) == set(PUBLISHED_PARAMS) | {"tiny-llama", "tiny-gpt2"}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_count_matches_published_size(name):
    assert load_model(name).param_count() == pytest.approx(PUBLISHED_PARAMS[name], rel=0.005)


@pytest.mark.parametrize(
    "name, exact",
    [("llama3-8b", 8_030_261_248), ("gpt2", 124_439_808), ("bert-base", 109_482_240)],
)
def test_param_count_is_exact_for_models_with_published_exact_counts(name, exact):
    assert load_model(name).param_count() == exact


def test_zoo_configs_carry_each_family_traits():
    llama3 = load_model("llama3-8b")
    assert (llama3.head_dim, llama3.num_key_value_heads, llama3.rope_theta) == (128, 8, 500000.0)
    assert (llama3.norm, llama3.gated_mlp, llama3.position, llama3.dtype) == (
        "rmsnorm", True, "rope", "bf16"
    )
    assert load_model("llama2-7b").dtype == "fp16"
    qwen = load_model("qwen2-7b")
    assert qwen.qkv_bias and not qwen.o_proj_bias and not qwen.mlp_bias
    gpt2 = load_model("gpt2")
    assert gpt2.tie_word_embeddings and gpt2.position == "learned" and not gpt2.gated_mlp
    assert (gpt2.intermediate_size, gpt2.hidden_act, gpt2.norm) == (3072, "gelu_new", "layernorm")
    bert = load_model("bert-base")
    assert (bert.type_vocab_size, bert.norm_eps, bert.architecture) == (2, 1e-12, "bert")


def test_tiny_models_have_the_agreed_shapes():
    llama = load_model("tiny-llama")
    assert (llama.hidden_size, llama.intermediate_size, llama.num_hidden_layers) == (64, 176, 2)
    assert (llama.num_attention_heads, llama.num_key_value_heads, llama.vocab_size) == (4, 2, 256)
    assert llama.gated_mlp and llama.norm == "rmsnorm" and llama.position == "rope"
    gpt2 = load_model("tiny-gpt2")
    assert (gpt2.hidden_size, gpt2.num_hidden_layers, gpt2.num_attention_heads) == (48, 2, 4)
    assert (gpt2.vocab_size, gpt2.hidden_act, gpt2.norm) == (128, "gelu", "layernorm")
    assert gpt2.tie_word_embeddings and gpt2.position == "learned"


def test_load_model_takes_any_case_a_path_or_a_folder(tmp_path):
    assert load_model("LLaMA3-8B") == load_model("llama3-8b")
    folder = tmp_path / "My-Model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    by_folder, by_path = load_model(str(folder)), load_model(str(folder / "config.json"))
    assert by_folder == by_path and by_folder.name == "My-Model"


def test_unknown_model_name_lists_the_zoo():
    with pytest.raises(ConfigError, match="llama3-8b") as err:
        load_model("llama5-1t")
    assert "llama5-1t" in str(err.value)


@pytest.mark.parametrize("name", ["llama3-8b", "qwen2-72b", "gpt2", "bert-base", "tiny-gpt2"])
def test_to_dict_round_trips_through_json(name):
    cfg = load_model(name)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_explicit_head_dim_overrides_hidden_over_heads():
    change = {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 8}
    cfg = ModelConfig.from_dict({**TINY_LLAMA, **change})
    assert cfg.head_dim == 8 and cfg.head_dim_override == 8
    g = build_graph(cfg, batch=1, ctx_len=4)
    assert g.nodes["L0.q_proj"]["op"].n == 24 and g.nodes["L0.o_proj"]["op"].k == 24
    check_graph_against_closed_forms(cfg, g)


# --- bad configs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base, change, message",
    [
        (TINY_LLAMA, {"hidden_size": None}, "missing field 'hidden_size'"),
        (TINY_LLAMA, {"num_attention_heads": 5}, "num_attention_heads=5 must divide hidden_size="),
        (TINY_LLAMA, {"num_key_value_heads": 3}, "num_key_value_heads=3 must divide"),
        (TINY_LLAMA, {"intermediate_size": -176}, "intermediate_size=-176 must be an integer > 0"),
        (TINY_LLAMA, {"num_hidden_layers": True}, "num_hidden_layers=True must be an integer"),
        (TINY_LLAMA, {"vocab_size": "256"}, "vocab_size='256' must be an integer"),
        (
            TINY_LLAMA,
            {"hidden_act": "foo"},
            "hidden_act='foo' is not one of gelu, gelu_new, relu, silu, swish, gelu_pytorch_tanh",
        ),
        (TINY_LLAMA, {"torch_dtype": "float8"}, "torch_dtype='float8' is not one of"),
        (TINY_LLAMA, {"model_type": "falcon"}, "model_type='falcon' is not one of"),
        (TINY_LLAMA, {"model_type": None, "architectures": 7},
         "architectures=7 must be a list of names"),
        (TINY_LLAMA, {"rms_norm_eps": 0}, "rms_norm_eps=0 must be a number > 0"),
        (TINY_LLAMA, {"tie_word_embeddings": 1}, "tie_word_embeddings=1 must be true or false"),
        (TINY_LLAMA, {"head_dim": 15}, "head_dim=15 must be even for rope"),
        (TINY_GPT2, {"n_embd": None}, "missing field 'n_embd'"),
        (TINY_GPT2, {"n_head": 5}, "n_head=5 must divide n_embd=48"),
        (TINY_GPT2, {"activation_function": "tanh"}, "activation_function='tanh' is not one of"),
    ],
)
def test_bad_config_raises_one_line_naming_the_field(base, change, message):
    d = {k: v for k, v in {**base, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(d, name="config.json")
    text = str(err.value)
    assert text.startswith("config.json: ") and message in text and "\n" not in text


def test_model_type_can_come_from_architectures():
    d = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    assert ModelConfig.from_dict({**d, "architectures": ["Qwen2ForCausalLM"]}).qkv_bias
    with pytest.raises(ConfigError, match="missing field 'model_type'"):
        ModelConfig.from_dict(d)


def test_own_dict_form_rejects_unknown_and_missing_fields():
    d = load_model("tiny-llama").to_dict()
    with pytest.raises(ConfigError, match="unknown field 'colour'"):
        ModelConfig.from_dict({**d, "colour": "red"})
    with pytest.raises(ConfigError, match="missing field 'vocab_size'"):
        ModelConfig.from_dict({k: v for k, v in d.items() if k != "vocab_size"})


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="x: norm='batchnorm' is not one of"):
        ModelConfig("x", "llama", 64, 128, 2, 4, 4, 100, 128, norm="batchnorm")


def test_unreadable_json_files_raise_config_error_with_the_path(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_json(bad)
    with pytest.raises(ConfigError, match="no such file"):
        ModelConfig.from_json(tmp_path / "absent.json")


# --- op graphs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo_names())
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_every_layer_has_the_same_ops_and_the_graph_is_a_dag(name, phase):
    cfg = load_model(name)
    g = build_graph(cfg, phase, batch=2, seq_len=None if phase == "decode" else 16, ctx_len=32)
    assert nx.is_directed_acyclic_graph(g)
    first = [(op.name.split(".", 1)[1], op.kind) for op in layer_ops(g, 0)]
    assert len(first) == OPS_PER_LAYER[cfg.architecture]
    for layer in range(cfg.num_hidden_layers):
        assert [(op.name.split(".", 1)[1], op.kind) for op in layer_ops(g, layer)] == first
    outside = len(layer_ops(g, -1))
    assert g.number_of_nodes() == outside + cfg.num_hidden_layers * len(first)


@pytest.mark.parametrize("name", zoo_names())
def test_decode_costs_match_closed_forms(name):
    cfg = load_model(name)
    check_graph_against_closed_forms(cfg, build_graph(cfg, "decode", batch=3, ctx_len=100))


@pytest.mark.parametrize("name", zoo_names())
@pytest.mark.parametrize("ctx_len", [0, 24])
def test_prefill_costs_match_closed_forms(name, ctx_len):
    cfg = load_model(name)
    check_graph_against_closed_forms(cfg, build_graph(cfg, "prefill", 2, 40, ctx_len))


def test_decode_attention_flops_match_the_textbook_formula():
    cfg, batch, ctx = load_model("llama3-8b"), 4, 4096
    g = build_graph(cfg, "decode", batch=batch, ctx_len=ctx)
    attention = sum(op.flops for op in ops(g) if op.kind in ATTENTION_KINDS)
    assert attention == 4 * batch * 32 * 32 * 128 * (ctx + 1)


def test_llama3_8b_decode_shapes_show_grouped_query_attention():
    g = build_graph(load_model("llama3-8b"), "decode", batch=2, ctx_len=4096)
    node = g.nodes
    assert (node["L5.q_proj"]["op"].n, node["L5.k_proj"]["op"].n, node["L5.v_proj"]["op"].n) == (
        4096, 1024, 1024
    )
    score = node["L5.attn_score"]["op"]
    assert (score.m, score.k, score.n, score.count) == (1, 128, 4097, 2 * 32)
    assert (score.heads, score.kv_heads) == (32, 8)
    value = node["L5.attn_value"]["op"]
    assert (value.m, value.k, value.n, value.count) == (1, 4097, 128, 64)
    # Only the 8 KV heads' cache is read, not 32 heads' worth.
    assert score.kv_read_bytes == 2 * 8 * 4096 * 128 * 2
    assert g.graph["seq_len"] == 1 and g.graph["dtype"] == "bf16"


def test_matmul_kinds_and_rows_follow_the_phase():
    cfg = load_model("tiny-llama")
    decode = build_graph(cfg, "decode", batch=3)
    prefill = build_graph(cfg, "prefill", batch=3, seq_len=7)
    assert {(op.kind, op.m) for op in ops(decode) if op.layer >= 0 and op.k and op.weight} == {
        ("gemv", 3)
    }
    assert {(op.kind, op.m) for op in ops(prefill) if op.layer >= 0 and op.k and op.weight} == {
        ("gemm", 21)
    }
    for g in (decode, prefill):
        head = g.nodes["lm_head"]["op"]
        assert (head.kind, head.m, head.k, head.n) == ("lm_head", 3, 64, 256)
        assert g.nodes["sample"]["op"].m == 3


def test_qwen2_projections_charge_their_biases():
    cfg = load_model("qwen2-7b")
    g = build_graph(cfg, "decode", batch=2)
    q, o = g.nodes["L0.q_proj"]["op"], g.nodes["L0.o_proj"]["op"]
    assert q.flops == 2 * 2 * 3584 * 3584 + 2 * 3584
    assert q.weight_bytes == (3584 * 3584 + 3584) * 2
    assert o.flops == 2 * 2 * 3584 * 3584


def test_pre_norm_and_post_norm_blocks_are_wired_in_order():
    llama = build_graph(load_model("tiny-llama"))
    assert set(llama.predecessors("L0.q_proj")) == {"L0.attn_norm"}
    assert set(llama.predecessors("L0.attn_score")) == {"L0.q_rope", "L0.k_rope"}
    assert set(llama.predecessors("L0.attn_residual")) == {"L0.o_proj", "embed"}
    assert set(llama.predecessors("L0.gate_mul")) == {"L0.act", "L0.up_proj"}
    assert set(llama.predecessors("final_norm")) == {"L1.mlp_residual"}
    bert = build_graph(load_model("bert-base"), "prefill", seq_len=8)
    assert set(bert.predecessors("embed_sum")) == {"embed", "pos_embed", "type_embed"}
    assert set(bert.predecessors("L0.q_proj")) == {"embed_norm"}
    assert set(bert.predecessors("L0.attn_norm")) == {"L0.attn_residual"}
    assert set(bert.predecessors("L0.up_proj")) == {"L0.attn_norm"}
    assert set(bert.predecessors("lm_head")) == {"L11.mlp_norm"}
    gpt2 = build_graph(load_model("gpt2"))
    assert set(gpt2.predecessors("L0.attn_score")) == {"L0.q_proj", "L0.k_proj"}
    assert set(gpt2.predecessors("L0.attn_norm")) == {"embed_sum"}


def test_layer_ops_come_in_topological_order():
    g = build_graph(load_model("tiny-llama"), "prefill", seq_len=4)
    order = [op.name for op in layer_ops(g, 1)]
    for name in order:
        for pred in g.predecessors(name):
            if pred in order:
                assert order.index(pred) < order.index(name)


def test_weight_names_are_unique_except_a_tied_embedding():
    untied = [op.weight for op in ops(build_graph(load_model("tiny-llama"))) if op.weight]
    assert len(untied) == len(set(untied)) and "L1.down_proj.weight" in untied
    tied = [op.weight for op in ops(build_graph(load_model("tiny-gpt2"))) if op.weight]
    assert tied.count("embed.weight") == 2 and len(tied) == len(set(tied)) + 1


def test_totals_and_kv_cache_helpers():
    cfg = load_model("llama3-8b")
    g = build_graph(cfg, "decode", batch=1, ctx_len=4096)
    assert total_flops(g) == sum(op.flops for op in ops(g))
    assert kv_cache_bytes(cfg, 1, 4096) == 2 * 32 * 8 * 128 * 2 * 4096  # 512 MiB
    op = g.nodes["L0.attn_score"]["op"]
    assert op.bytes == op.in_bytes + op.out_bytes + op.kv_read_bytes + op.kv_write_bytes


def test_learned_positions_cap_defaults_and_reject_longer_steps():
    gpt2 = load_model("gpt2")
    assert build_graph(gpt2).graph["ctx_len"] == 1023
    assert build_graph(load_model("tiny-gpt2"), "prefill").graph["seq_len"] == 128
    with pytest.raises(ValueError, match="max_position_embeddings=1024"):
        build_graph(gpt2, "decode", ctx_len=1024)
    assert build_graph(load_model("llama2-7b"), ctx_len=100_000).graph["ctx_len"] == 100_000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"phase": "train"}, "phase='train'"),
        ({"batch": 0}, "batch=0"),
        ({"batch": True}, "batch=True"),
        ({"phase": "decode", "seq_len": 4}, "seq_len=4"),
        ({"phase": "prefill", "ctx_len": -1}, "ctx_len=-1"),
    ],
)
def test_bad_step_shapes_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_graph(load_model("tiny-llama"), **kwargs)


def test_op_rejects_unknown_kinds_and_negative_sizes():
    with pytest.raises(ValueError, match="kind='conv'"):
        Op("x", "conv", 0, 1, 1, 1)
    with pytest.raises(ValueError, match="flops=-1"):
        Op("x", "gemv", 0, 1, 1, 1, flops=-1)


# --- random small models --------------------------------------------------------------------


@st.composite
def hf_configs(draw) -> dict:
    """A small Hugging Face config.json of any supported family."""
    family = draw(st.sampled_from(["llama", "mistral", "qwen2", "gpt2", "bert"]))
    kv_heads, group = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 6, 10]))
    heads = kv_heads * group
    sizes = {
        "num_hidden_layers": draw(st.integers(1, 3)),
        "vocab_size": draw(st.integers(1, 300)),
        "torch_dtype": draw(st.sampled_from(["bfloat16", "float16", "float32"])),
        "tie_word_embeddings": draw(st.booleans()),
    }
    intermediate = draw(st.integers(1, 100))
    if family == "gpt2":
        return {"model_type": "gpt2", "n_embd": heads * head_dim, "n_head": heads,
                "n_layer": sizes.pop("num_hidden_layers"), "n_inner": intermediate,
                "n_positions": 64, **sizes}
    d = {"model_type": family, "hidden_size": heads * head_dim, "num_attention_heads": heads,
         "intermediate_size": intermediate, **sizes}
    if family == "bert":
        return {**d, "max_position_embeddings": 64, "type_vocab_size": draw(st.integers(0, 3))}
    if draw(st.booleans()):  # explicit head_dim, hidden size free
        d |= {"head_dim": head_dim, "hidden_size": draw(st.integers(1, 40))}
    return {**d, "num_key_value_heads": kv_heads, "attention_bias": draw(st.booleans())}


@settings(max_examples=60, deadline=None)
@given(
    hf=hf_configs(),
    phase=st.sampled_from(["decode", "prefill"]),
    batch=st.integers(1, 3),
    seq_len=st.integers(1, 8),
    ctx_len=st.integers(0, 16),
)
def test_random_small_models_match_closed_forms(hf, phase, batch, seq_len, ctx_len):
    cfg = ModelConfig.from_dict(hf)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    g = build_graph(cfg, phase, batch, seq_len if phase == "prefill" else None, ctx_len)
    check_graph_against_closed_forms(cfg, g)
