"""Fast feed-forward layers: the tree reference, the conditional-routing lowering (functional
against the reference, its time against the closed form), and the GPU side."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compiler.algorithms.common import Region
from compiler.algorithms.fff import check_paths, draw_paths, fff_block
from compiler.estimate import _fff, _start, layer_cycles, step_cycles
from compiler.model import CompileOptions, compile_model, pack_inputs
from compiler.program import ProgramBuilder, ProgramError
from compiler.targets import WSE2, load_target
from models.config import ConfigError, ModelConfig, load_model
from models.graph import build_graph
from models.reference import _act, fff, forward, random_weights, weight_shapes
from tests.test_blocks import column_split_input, mark_output, ref_rmsnorm
from wafersim.baseline.cluster import parse_cluster
from wafersim.baseline.simulate import simulate_cluster
from wafersim.cli import app
from wafersim.functional import execute
from wafersim.simulate import simulate

MESH = load_target("wse2").with_mesh(8, 8)


def with_fff(name: str, depth: int, **kw) -> ModelConfig:
    return dataclasses.replace(load_model(name), fff_depth=depth, **kw)


def test_fff_config_counts_its_tree_and_round_trips():
    cfg = with_fff("llama3-8b", 11)
    assert cfg.fff_nodes == 4095  # UltraFastBERT-1x11's tree
    dense = load_model("llama3-8b")
    per_layer = 3 * 4096 * 14336 - 2 * 4095 * 4096
    assert dense.param_count() - cfg.param_count() == 32 * per_layer
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (-1, 21, 2.0):
        with pytest.raises(ConfigError, match="fff_depth"):
            with_fff("tiny-llama", bad)


def test_fff_reference_descends_by_sign_and_sums_the_visited_outputs():
    rng = np.random.default_rng(0)
    d, depth = 16, 4
    n = 2 ** (depth + 1) - 1
    x, w_in, w_out = rng.standard_normal((3, 2, d)), rng.standard_normal((d, n)), \
        rng.standard_normal((n, d))
    y, nodes = fff(x, w_in, w_out, depth, "gelu_new")
    assert nodes.shape == (3, 2, depth + 1)
    for i in range(3):
        for j in range(2):
            node, want = 0, np.zeros(d)
            for level in range(depth + 1):
                assert nodes[i, j, level] == node
                z = x[i, j] @ w_in[:, node]
                want += _act("gelu_new", z) * w_out[node]
                node = 2 * node + (2 if z >= 0 else 1)
            np.testing.assert_allclose(y[i, j], want, rtol=1e-12)
    shapes = weight_shapes(with_fff("tiny-llama", 3))
    assert shapes["layers.0.fff_in"] == (64, 15) and "layers.0.up" not in shapes


def test_paths_are_checked_descents():
    p = draw_paths(5, 3, seed=1)
    np.testing.assert_array_equal(check_paths(p, 5, 3), p)
    assert np.all(np.isin(p[:, 1:] - 2 * p[:, :-1], (1, 2)))
    for bad in ([[0, 1, 5]], [[1, 3, 7]], [[0, 1]]):
        with pytest.raises(ProgramError, match="fff paths"):
            check_paths(bad, 2, 1)


def _block(rows, cols, b, d, depth, paths, algo="meshgemv", dtype="fp32"):
    region = Region(rows, cols)
    bld = ProgramBuilder(cols, rows, dtype)
    hb = column_split_input(bld, region, "h", b, d)
    out, _ = fff_block(bld, region, hb, b, d, depth, "L0", paths, act="silu", eps=1e-6,
                       algo=algo)
    mark_output(bld, out, region, "out", b, d)
    return bld.build()


@pytest.mark.parametrize("rows,cols,b,depth,algo", [(4, 4, 1, 3, "meshgemv"),
                                                    (3, 5, 2, 4, "ring"),
                                                    (6, 3, 3, 2, "meshgemv"),
                                                    (1, 1, 1, 2, "meshgemv")])
def test_fff_block_follows_the_datas_path_like_the_reference(rows, cols, b, depth, algo):
    rng = np.random.default_rng(5)
    d, n = 64, 2 ** (depth + 1) - 1
    w = {"h": rng.standard_normal((b, d)), "L0.mlp_norm": rng.standard_normal((1, d)),
         "L0.fff_in": rng.standard_normal((d, n)) / 8,
         "L0.fff_out": rng.standard_normal((n, d)) / 8}
    y, path = fff(ref_rmsnorm(w["h"], w["L0.mlp_norm"], 1e-6), w["L0.fff_in"], w["L0.fff_out"],
                  depth, "silu")
    got = execute(_block(rows, cols, b, d, depth, path, algo), w)["out"]
    np.testing.assert_allclose(got, w["h"] + y, rtol=1e-4, atol=1e-5)
    wrong = path.copy()  # the last level's sibling
    wrong[:, -1] += np.where(wrong[:, -1] % 2 == 1, 1, -1)
    bad = execute(_block(rows, cols, b, d, depth, wrong, algo), w)["out"]
    assert np.abs(bad - (w["h"] + y)).max() > 1e-3


@pytest.mark.parametrize("rows,cols,depth,algo", [(40, 60, 7, "meshgemv"),
                                                  (16, 16, 4, "ring")])
def test_fff_time_matches_its_closed_form_at_batch_1(rows, cols, depth, algo):
    cfg = with_fff("llama3-8b", depth)
    res = simulate(_block(rows, cols, 1, 4096, depth, draw_paths(depth, 1, 0), algo, "bf16"),
                   WSE2)
    est = _fff(_start(rows, cols), cfg, WSE2, 1, algo, 2).done
    assert est == pytest.approx(res.makespan_cycles, rel=0.01)


@pytest.mark.parametrize("rows,cols,depth", [(8, 8, 5), (6, 10, 3)])
def test_fff_model_steps_and_layers_match_the_estimate(rows, cols, depth):
    target = dataclasses.replace(WSE2.with_mesh(cols, rows), sram_bytes=1 << 22)
    cycles = []
    for layers in (1, 2):
        cfg = with_fff("tiny-llama", depth, num_hidden_layers=layers)
        c = compile_model(build_graph(cfg, "decode", ctx_len=63), target,
                          CompileOptions(region=(rows, cols)))
        cycles.append(simulate(c.program, target).makespan_cycles)
        assert step_cycles(cfg, target, rows, cols, [layers], 1, c.slots) == pytest.approx(
            cycles[-1], rel=0.002)
    assert layer_cycles(cfg, target, rows, cols, 1, c.slots) == pytest.approx(
        cycles[1] - cycles[0], rel=0.002)


def test_only_the_paths_rows_do_the_tree_work():
    rows, cols, depth = 16, 8, 4
    path = draw_paths(depth, 1, 0)
    res = simulate(_block(rows, cols, 1, 512, depth, path, dtype="bf16"), WSE2)
    busy = res.core_busy.reshape(rows, cols).sum(axis=1)
    on = np.zeros(rows, bool)
    on[path[0] % rows] = True
    assert busy[on].min() > busy[~on].max()


@pytest.mark.parametrize("name,options", [("tiny-llama", CompileOptions()),
                                          ("tiny-gpt2", CompileOptions(region=(3, 5)))])
def test_one_layer_fff_model_decodes_like_the_reference(name, options):
    cfg = with_fff(name, 3, num_hidden_layers=1)
    weights = random_weights(cfg, seed=1)
    prompt = np.array([[3, 17, 99, 5], [8, 1, 2, 7]])
    logits, cache = forward(cfg, weights, prompt)
    ids = logits[:, -1].argmax(-1)
    paths = []
    ref, _ = forward(cfg, weights, ids[:, None], cache, paths=paths)
    taken = tuple(tuple(int(v) for v in row) for row in paths[0][:, 0])
    compiled = compile_model(build_graph(cfg, "decode", batch=2, ctx_len=4), MESH,
                             dataclasses.replace(options, fff_paths=taken))
    out = execute(compiled.program, pack_inputs(compiled, weights, ids, list(cache.k),
                                                list(cache.v)))
    np.testing.assert_allclose(out["logits"], ref[:, -1], rtol=1e-4, atol=1e-4)


def test_fff_is_refused_where_it_is_not_lowered():
    cfg = with_fff("tiny-llama", 3)
    with pytest.raises(ProgramError, match="fast feed-forward"):
        compile_model(build_graph(cfg, "prefill", seq_len=8), MESH)
    with pytest.raises(ProgramError, match="fast feed-forward"):
        compile_model(build_graph(cfg, "decode", ctx_len=4), MESH,
                      CompileOptions(act_density="0.1"))


def test_gpu_fff_reads_the_path_and_keeps_the_tree_resident():
    cfg = with_fff("llama3-8b", 11)
    g = build_graph(cfg, "decode", batch=1, ctx_len=1024)
    op = g.nodes["L0.fff_in"]["op"]
    assert op.flops == 2 * 4096 * 12 and op.weight_bytes == 12 * 4096 * 2
    assert g.nodes["L0.fff_in"]["weight_store_bytes"] == 4095 * 4096 * 2
    assert "L0.down_proj" not in g
    dense = simulate_cluster(build_graph(load_model("llama3-8b"), "decode", ctx_len=1024),
                             parse_cluster("1xH100"))
    tree = simulate_cluster(g, parse_cluster("1xH100"))
    assert tree.makespan_s < dense.makespan_s and tree.mem_per_gpu < dense.mem_per_gpu


def test_cli_compare_takes_fff_depth():
    out = CliRunner().invoke(app, ["compare", "tiny-llama", "--wafer", "test16x16", "--gpus",
                                   "1xH100", "--ctx", "32", "--fff-depth", "3", "--json"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert r["techniques"] == ["fff_depth=3"] and r["wafer"]["fits"] and r["gpus"]["fits"]
    assert r["wafer_speedup_vs_dense"] > 0 and r["gpus_speedup_vs_dense"] > 0
    both = CliRunner().invoke(app, ["compare", "tiny-llama", "--wafer", "test16x16", "--gpus",
                                    "1xH100", "--fff-depth", "3", "--act-density", "0.1"])
    assert both.exit_code == 2 and "no down projection" in both.output
