"""Activation sparsity (TwELL-style): the sparse MLP computes the masked dense MLP, skips the
inactive rows of the down projection, sends packed activations, and both sides charge it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compiler.algorithms.common import Region, split
from compiler.algorithms.mlp import mlp_block
from compiler.model import CompileOptions, compile_model, pack_inputs
from compiler.program import COMPUTE, OP_MATMUL_ACC, ProgramBuilder, ProgramError
from compiler.sparsity import ELL_INDEX_BYTES, ActSparsity, SparsityError, ell_width
from compiler.targets import WSE2, load_target
from models.config import load_model
from models.graph import build_graph, with_activation_sparsity
from models.reference import forward, random_weights
from tests.test_blocks import column_split_input, mark_output, ref_rmsnorm
from wafersim.baseline.cluster import parse_cluster
from wafersim.baseline.simulate import simulate_cluster
from wafersim.cli import app
from wafersim.compare import compare, sparse_graph
from wafersim.functional import execute
from wafersim.simulate import simulate

MESH = load_target("wse2").with_mesh(8, 8)


@pytest.mark.parametrize("spec,layers,expect", [
    ("0.1", 3, [0.1, 0.1, 0.1]),
    ("0.5,0.25", 2, [0.5, 0.25]),
])
def test_density_specs(spec, layers, expect):
    np.testing.assert_allclose(ActSparsity(spec).densities(layers), expect)


def test_beta_densities_are_seeded_and_near_their_mean():
    a = ActSparsity("beta:0.1:50", seed=4).densities(400)
    np.testing.assert_array_equal(a, ActSparsity("beta:0.1:50", seed=4).densities(400))
    assert not np.array_equal(a, ActSparsity("beta:0.1:50", seed=5).densities(400))
    assert abs(a.mean() - 0.1) < 0.01 and a.std() > 0.01


@pytest.mark.parametrize("spec", ["0", "1.5", "abc", "beta:0.1", "beta:1.2:3", "0.1,,0.2"])
def test_bad_density_specs_are_refused_in_one_line(spec):
    with pytest.raises(SparsityError, match="--act-density") as e:
        ActSparsity(spec).densities(2)
    assert "\n" not in str(e.value)


def test_a_per_layer_list_must_cover_every_layer():
    with pytest.raises(SparsityError, match="lists 2 densities; the model has 3 layers"):
        ActSparsity("0.1,0.2").densities(3)


def test_masks_are_seeded_draws_at_each_layers_density():
    s = ActSparsity("0.5,0.05", seed=2)
    m0, m1 = s.mask(0, 4, 20000, 2), s.mask(1, 4, 20000, 2)
    np.testing.assert_array_equal(m0, ActSparsity("0.5,0.05", seed=2).mask(0, 4, 20000, 2))
    assert abs(m0.mean() - 0.5) < 0.02 and abs(m1.mean() - 0.05) < 0.01
    assert abs(s.body_mask(2, 4, 20000).mean() - 0.275) < 0.02  # the layers' mean


def test_ell_width_is_the_widest_sequence_per_chunk():
    mask = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]], bool)
    np.testing.assert_array_equal(ell_width(mask, np.array([0, 3])), [2, 1])


def _block(rows, cols, b, d, f, mask, gated=True, algo="meshgemv", dtype="fp32"):
    region = Region(rows, cols)
    bld = ProgramBuilder(cols, rows, dtype)
    hb = column_split_input(bld, region, "h", b, d)
    out, _ = mlp_block(bld, region, hb, b, d, f, "L0", gated=gated,
                       act="silu" if gated else "gelu", eps=1e-6, algo=algo, mask=mask)
    mark_output(bld, out, region, "out", b, d)
    return bld.build()


@pytest.mark.parametrize("rows,cols,gated,algo", [(4, 4, True, "meshgemv"),
                                                  (3, 5, False, "ring"),
                                                  (6, 3, True, "meshgemv")])
def test_sparse_mlp_block_equals_the_dense_mlp_on_masked_activations(rows, cols, gated, algo):
    rng = np.random.default_rng(11)
    b, d, f = 2, 64, 176
    mask = ActSparsity("0.3", seed=1).mask(0, b, f)
    w = {"h": rng.standard_normal((b, d)), "L0.mlp_norm": rng.standard_normal((1, d)),
         "L0.up": rng.standard_normal((d, f)) / 8, "L0.down": rng.standard_normal((f, d)) / 8,
         "L0.act_mask": mask.astype(np.float32)}
    xn = ref_rmsnorm(w["h"], w["L0.mlp_norm"], 1e-6)
    up = xn @ w["L0.up"]
    if gated:
        w["L0.gate"] = rng.standard_normal((d, f)) / 8
        g = xn @ w["L0.gate"]
        a = g / (1 + np.exp(-g)) * up
    else:
        a = 0.5 * up * (1 + np.tanh(0.7978845608 * (up + 0.044715 * up ** 3)))
    got = execute(_block(rows, cols, b, d, f, mask, gated, algo), w)["out"]
    np.testing.assert_allclose(got, w["h"] + (a * mask) @ w["L0.down"], rtol=1e-4, atol=1e-4)
    assert np.abs(got - (w["h"] + a @ w["L0.down"])).max() > 1e-2  # the mask matters


def test_the_down_projection_is_charged_for_active_rows_and_sends_packed_chunks():
    rows, cols, b, d, f = 8, 8, 1, 256, 1024
    mask = ActSparsity("0.1", seed=3).mask(0, b, f)
    prog = _block(rows, cols, b, d, f, mask, dtype="bf16")
    width = ell_width(mask, split(f, rows)[0])
    k0, ks = split(f, rows)
    n0, ns = split(d, cols)
    mm = (prog.ins_kind == COMPUTE) & (prog.ins_op == OP_MATMUL_ACC)
    down = mm & (prog.buf_rows[prog.ins_b] == ks[0])  # the [f/rows, d/cols] tiles
    core = np.repeat(np.arange(prog.cores), np.diff(prog.core_ptr))[down]
    np.testing.assert_array_equal(prog.ins_flops[down], 2 * b * width[core // cols] * ns[0])
    packed = np.ceil(b * width * (2 + ELL_INDEX_BYTES))  # bf16 values and their indices
    assert set(packed.astype(int)) <= set(prog.msg_bytes.tolist())
    dense = _block(rows, cols, b, d, f, None, dtype="bf16")
    assert prog.ins_flops.sum() < dense.ins_flops.sum()
    assert prog.msg_bytes.sum() < dense.msg_bytes.sum()


def test_uneven_active_rows_leave_the_light_rows_waiting():
    rows, cols, b, d, f = 4, 4, 1, 64, 4096
    mask = np.zeros((b, f), bool)
    mask[0, :1024] = True  # every neuron of row 0's chunk fires, none of the others
    res = simulate(_block(rows, cols, b, d, f, mask, dtype="bf16"), WSE2)
    busy = res.core_busy.reshape(rows, cols)
    assert busy[0].min() > busy[1:].max()
    wait = res.core_wait.reshape(rows, cols)
    assert wait[1:].mean() > wait[0].mean()


@pytest.mark.parametrize("name,options", [
    ("tiny-llama", CompileOptions(act_density="0.3")),
    ("tiny-gpt2", CompileOptions(act_density="0.5,0.2", act_seed=3, policy="pipeline")),
])
def test_sparse_decode_step_matches_the_masked_reference(name, options):
    cfg = load_model(name)
    weights = random_weights(cfg, seed=1)
    prompt = np.array([[3, 17, 99, 5], [8, 1, 2, 7]])
    logits, cache = forward(cfg, weights, prompt)
    ids = logits[:, -1].argmax(-1)
    compiled = compile_model(build_graph(cfg, "decode", batch=2, ctx_len=4), MESH, options)
    sp = ActSparsity(options.act_density, options.act_seed)
    masks = [sp.mask(layer, 2, cfg.intermediate_size, cfg.num_hidden_layers)
             for layer in range(cfg.num_hidden_layers)]
    ref, _ = forward(cfg, weights, ids[:, None], cache, act_mask=masks)
    out = execute(compiled.program, pack_inputs(compiled, weights, ids, list(cache.k),
                                                list(cache.v)))
    np.testing.assert_allclose(out["logits"], ref[:, -1], rtol=1e-4, atol=1e-4)


def test_sparsity_is_refused_where_it_is_not_lowered():
    cfg = load_model("tiny-llama")
    with pytest.raises(ProgramError, match="decode only"):
        compile_model(build_graph(cfg, "prefill", seq_len=8), MESH,
                      CompileOptions(act_density="0.1"))
    with pytest.raises(ProgramError, match="every density"):
        compile_model(build_graph(cfg, "decode", ctx_len=4), MESH,
                      CompileOptions(act_density="2"))


def test_gpu_graph_reads_only_active_rows_and_keeps_the_dense_weights_resident():
    cfg = load_model("llama3-8b")
    g = build_graph(cfg, "decode", batch=4, ctx_len=1024)
    masks = [ActSparsity("0.05").mask(layer, 4, cfg.intermediate_size, 32) for layer in
             range(32)]
    s = with_activation_sparsity(g, masks)
    dense, sparse = g.nodes["L3.down_proj"]["op"], s.nodes["L3.down_proj"]["op"]
    union = masks[3].any(axis=0).sum()
    assert sparse.weight_bytes == union * cfg.hidden_size * 2
    assert sparse.flops == 2 * masks[3].sum() * cfg.hidden_size
    assert s.nodes["L3.down_proj"]["weight_store_bytes"] == dense.weight_bytes
    assert g.nodes["L3.down_proj"]["op"] is dense  # the input graph is left alone
    h100 = parse_cluster("1xH100")
    a, b = simulate_cluster(g, h100), simulate_cluster(s, h100)
    assert b.makespan_s < a.makespan_s and b.mem_per_gpu == a.mem_per_gpu


def test_compare_reports_each_sides_speedup_over_its_dense_step():
    r = compare(load_model("tiny-llama"), load_target("test16x16"), "1xH100", ctx=32,
                options=CompileOptions(act_density="0.1"))
    assert r["techniques"] == ["act_density=0.1"]
    for side in ("wafer", "gpus"):
        assert r[f"{side}_speedup_vs_dense"] == pytest.approx(
            r[side]["tokens_per_s"] / r["dense"][side]["tokens_per_s"])
    assert r["dense"]["wafer"]["onchip_bytes"] > r["wafer"]["onchip_bytes"]
    g = build_graph(load_model("tiny-llama"), "decode", ctx_len=32)
    assert sparse_graph(g, CompileOptions()) is g


def test_cli_compare_takes_act_density_and_refuses_a_bad_one():
    runner = CliRunner()
    ok = runner.invoke(app, ["compare", "tiny-llama", "--wafer", "test16x16", "--gpus",
                             "1xH100", "--ctx", "32", "--act-density", "0.2", "--json"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.output)
    assert out["wafer_speedup_vs_dense"] > 0 and out["gpus_speedup_vs_dense"] > 0
    bad = runner.invoke(app, ["compare", "tiny-llama", "--wafer", "test16x16", "--gpus",
                              "1xH100", "--act-density", "0.1,0.2,0.3"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "--act-density" in bad.output
