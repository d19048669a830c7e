"""A model pipelined over several wafers: the stages together give the reference's logits,
and the step's time, traffic and bubble follow from the stages' simulations."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from compiler.estimate import step_cycles
from compiler.model import compile_model
from compiler.multiwafer import (
    compile_multiwafer,
    is_cluster,
    load_cluster,
    pack_stage_inputs,
)
from compiler.program import ProgramError
from compiler.targets import TargetError
from models import build_graph, load_model
from models.reference import forward, random_weights
from wafersim.functional import execute
from wafersim.multiwafer import simulate_multiwafer
from wafersim.whole import simulate_layout

CFG = dataclasses.replace(load_model("tiny-llama"), num_hidden_layers=5)
CLUSTER = load_cluster("3xtest8x8")


def _compiled(cfg=CFG, cluster=CLUSTER, ctx=4, batch=2):
    return compile_multiwafer(build_graph(cfg, "decode", batch=batch, ctx_len=ctx), cluster)


def test_stages_together_give_the_reference_logits():
    weights = random_weights(CFG, seed=1)
    prompt = np.array([[3, 17, 99, 5], [8, 1, 2, 250]])
    logits, cache = forward(CFG, weights, prompt)
    ids = logits[:, -1].argmax(-1)
    mw = _compiled()
    assert [(s.first, s.count) for s in mw.stages] == [(0, 1), (1, 2), (3, 2)]
    assert [s.compiled.options.ends for s in mw.stages] == [(True, False), (False, False),
                                                            (False, True)]
    x = ids
    for st in mw.stages:
        out = execute(st.compiled.program, pack_stage_inputs(st, weights, x, cache.k, cache.v))
        x = out.get("h")
        if not st.compiled.options.head:
            assert x.shape == (2, CFG.hidden_size) and "logits" not in out
    ref, ref_cache = forward(CFG, weights, ids[:, None], cache)
    np.testing.assert_allclose(out["logits"], ref[:, 0], rtol=1e-4, atol=1e-4)
    assert np.array_equal(out["next"][:, 1], ref[:, 0].argmax(-1))


def test_equal_stages_share_one_program():
    cfg = dataclasses.replace(CFG, num_hidden_layers=8)
    mw = _compiled(cfg, load_cluster("4xtest8x8"))
    assert [s.count for s in mw.stages] == [2, 2, 2, 2]
    assert mw.stages[1].compiled is mw.stages[2].compiled
    assert len({id(s.compiled) for s in mw.stages}) == 3


def test_the_step_is_the_stages_in_turn_plus_the_crossings():
    mw = _compiled()
    r = simulate_multiwafer(mw)
    per = [simulate_layout(s.compiled.code, CLUSTER.wafer, s.compiled.info())["makespan_s"]
           for s in mw.stages]
    h_bytes = 2 * CFG.hidden_size * 4  # batch 2, fp32
    crossing = CLUSTER.io_latency_s + h_bytes / CLUSTER.io_bytes_per_s
    assert r["offchip_bytes"] == r["interwafer_bytes"] == 2 * h_bytes
    assert math.isclose(r["crossing_s"], crossing)
    assert math.isclose(r["makespan_s"], sum(per) + 2 * crossing)
    assert math.isclose(r["tokens_per_s"], 2 / r["makespan_s"])
    assert math.isclose(r["bubble_fraction"], 1 - sum(per) / (3 * r["makespan_s"]))
    assert 2 / 3 <= r["bubble_fraction"] < 1  # one step in flight: each wafer waits for two
    assert [s["layers"] for s in r["stages"]] == ["0-0", "1-2", "3-4"]
    assert r["system"] == "3xwse2[8x8]" and r["fits"] and r["wafers"] == 3


def test_one_wafer_is_the_whole_model():
    graph = build_graph(CFG, "decode", batch=1, ctx_len=8)
    one = simulate_multiwafer(compile_multiwafer(graph, load_cluster("1xtest8x8")))
    whole = compile_model(graph, CLUSTER.wafer)
    ref = simulate_layout(whole.code, CLUSTER.wafer, whole.info())
    assert one["makespan_s"] == ref["makespan_s"] and one["bubble_fraction"] == 0
    assert one["offchip_bytes"] == 0


def test_stage_estimate_follows_the_simulator():
    """compiler.estimate's step time without the embedding and the head (a middle stage)."""
    mw = _compiled()
    st = mw.stages[1]
    c = st.compiled
    p = c.placements[0].region
    est = step_cycles(c.model, CLUSTER.wafer, p.rows, p.cols, [q.count for q in c.placements],
                      2, c.slots, ends=(False, False))
    sim = simulate_layout(c.code, CLUSTER.wafer, c.info())["makespan_cycles"]
    assert abs(est - sim) / sim < 0.05


@pytest.mark.parametrize("name,cluster,match", [
    ("llama3-70b", "2xwse2", "does not fit 2xwse2: its wafers hold at most 16\\+16 = 32 of its "
                             "80 layers .*; 5 of these wafers would hold it"),
    ("tiny-llama", "3xtest8x8", "3 wafers for tiny-llama's 2 layers"),
])
def test_refusals_name_the_limit(name, cluster, match):
    with pytest.raises(ProgramError, match=match):
        compile_multiwafer(build_graph(load_model(name), "decode", ctx_len=64),
                           load_cluster(cluster))


def test_cluster_names():
    assert is_cluster("4xwse3") and not is_cluster("wse3") and not is_cluster("test8x8")
    cl = load_cluster("4xwse3")
    assert cl.count == 4 and cl.wafer.name == "wse3" and cl.name == "4xwse3"
    assert cl.io_bytes_per_s == pytest.approx(1.2e12 / 8)
    with pytest.raises(TargetError, match="not a preset"):
        load_cluster("2xnope")
    with pytest.raises(TargetError, match="wafer count 0"):
        load_cluster("0xwse2")
    with pytest.raises(ProgramError, match="runs decode steps"):
        compile_multiwafer(build_graph(CFG, "prefill", seq_len=8), CLUSTER)


def test_cli_compile_and_compare_take_a_cluster(tmp_path):
    import json

    from typer.testing import CliRunner

    from wafersim.cli import app

    runner = CliRunner()
    out = tmp_path / "tiny.wsl"
    res = runner.invoke(app, ["compile", "tiny-llama", "--target", "2xtest16x16", "--ctx", "32",
                              "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["wafers"] == 2 and [s["layers"] for s in rep["stages"]] == ["0-0", "1-1"]
    assert rep["interwafer_bytes"] == 64 * 4 and 0.5 < rep["estimated_bubble_fraction"] < 1
    assert rep["layouts"] == [str(tmp_path / f"tiny.wafer{k}.wsl") for k in range(2)]
    res = runner.invoke(app, ["simulate", rep["layouts"][1], "--json"])  # a stage alone
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["compare", "tiny-llama", "--wafer", "2xtest16x16", "--gpus",
                              "1xH100", "--ctx", "32", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["wafer"]["wafers"] == 2 and r["wafer"]["offchip_bytes"] == 64 * 4
    assert r["speedup"] == r["wafer"]["tokens_per_s"] / r["gpus"]["tokens_per_s"]
    est, sim = rep["estimated_step_s"], r["wafer"]["makespan_s"]
    assert abs(est - sim) / sim < 0.05
