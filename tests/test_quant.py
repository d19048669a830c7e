"""Quantisation and pruning (compiler.quant): stored bytes in closed form, the quantised and
pruned tiny models against the numpy reference with the same stored weights, and the time,
traffic and capacity invariants on the wafer and on GPUs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compiler import quant
from compiler.estimate import step_cycles
from compiler.model import CompileOptions, compile_model, pack_inputs
from compiler.program import ProgramError
from compiler.quant import CACHE, HEAD, PROJ, TABLE
from compiler.targets import load_target
from models import build_graph, load_model
from models.reference import KVCache, forward, random_weights
from wafersim.baseline.cluster import parse_cluster
from wafersim.baseline.simulate import simulate_cluster
from wafersim.cli import app
from wafersim.compare import compare
from wafersim.functional import execute
from wafersim.simulate import simulate

CFG = load_model("tiny-llama")  # fp32
GPT2 = load_model("tiny-gpt2")
BF16 = dataclasses.replace(CFG, dtype="bf16")
MESH = load_target("wse2").with_mesh(8, 8)


def _compile(cfg, options, ctx=11, batch=1, target=MESH):
    return compile_model(build_graph(cfg, "decode", batch=batch, ctx_len=ctx), target, options)


def test_stored_bytes_in_closed_form():
    s = quant.scheme("bf16", "int8", "int8")
    assert quant.stored_bytes(s, PROJ, 256, 64) == 256 * 64 + 2 * 64 * 2  # 2 groups along K
    assert quant.stored_bytes(s, HEAD, 100, 64) == 100 * 64 + 1 * 64 * 2
    assert quant.stored_bytes(s, TABLE, 10, 300) == 10 * 300 + 10 * 3 * 2  # groups along d
    assert quant.stored_bytes(s, CACHE, 10, 64) == 10 * 64 + 10 * 2
    assert quant.stored_bytes(quant.scheme("bf16", "int4"), PROJ, 256, 64) == 256 * 32 + 256
    # 2:4: half the values and a 2-bit index each; unstructured: values and the cheaper of a
    # bitmask and 16-bit indices.
    assert quant.stored_bytes(quant.scheme("bf16", prune="2:4"), PROJ, 128, 64) == 4096 * 2 + 1024
    assert quant.stored_bytes(quant.scheme("bf16", prune="0.5"), PROJ, 128, 64) == 8192 + 1024
    assert quant.stored_bytes(quant.scheme("bf16", prune="0.05"), PROJ, 128, 64) == \
        np.ceil(409.6 * 2 + 409.6 * 2)
    # Only the projections are pruned; the compute dtype stores what it always stored.
    assert quant.stored_bytes(quant.scheme("bf16", prune="2:4"), HEAD, 128, 64) == 128 * 64 * 2
    assert quant.stored_bytes(quant.scheme("fp32"), PROJ, 3, 5) == 60


@pytest.mark.parametrize("kwargs,match", [
    (dict(quant="int3"), "--quant 'int3' is not one of"),
    (dict(kv_dtype="fp4"), "--kv-dtype 'fp4' is not one of"),
    (dict(group=0), "--quant-group 0 must be"),
    (dict(prune="1.5"), r"--prune '1.5'.*\(0, 1\]"),
    (dict(prune="3:4"), "--prune '3:4' must be 2:4 or a density"),
])
def test_bad_schemes_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant.scheme("bf16", **kwargs)


def test_fake_quant_and_prune():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 48)).astype(np.float32)
    for dtype, levels in (("int8", 127), ("int4", 7)):
        q = quant.fake_quant(w, dtype, 64)
        step = np.abs(w).reshape(4, 64, 48).max(axis=1) / levels  # per group and column
        assert np.all(np.abs(q - w).reshape(4, 64, 48) <= step[:, None] * 0.5001 + 1e-6)
        assert len(np.unique(q[:64, 0])) <= 2 * levels + 1
    assert np.abs(quant.fake_quant(w, "fp8", 128) - w).max() < 0.07 * np.abs(w).max()
    assert np.array_equal(quant.fake_quant(np.zeros((4, 4)), "int8", 2), np.zeros((4, 4)))
    p = quant.prune(w, quant.scheme("fp32", prune="2:4"))
    assert np.all((p.reshape(64, 4, 48) != 0).sum(axis=1) == 2)
    kept = np.abs(w.reshape(64, 4, 48)).argsort(axis=1)[:, 2:]  # the two largest stay
    assert np.all(np.take_along_axis(p.reshape(64, 4, 48), kept, axis=1) != 0)
    p = quant.prune(w, quant.scheme("fp32", prune="0.25"))
    assert np.count_nonzero(p) == pytest.approx(0.25 * w.size, abs=2)
    assert np.abs(p[p != 0]).min() >= np.abs(w[p == 0]).max()


@pytest.mark.parametrize("cfg,options", [
    (CFG, CompileOptions(quant="int8", kv_dtype="int8")),
    (CFG, CompileOptions(quant="int4", kv_dtype="fp8", quant_group=32)),
    (CFG, CompileOptions(prune="2:4")),
    (CFG, CompileOptions(prune="0.3", quant="int8", policy="pipeline")),
    (GPT2, CompileOptions(quant="int8", kv_dtype="int4", prune="2:4")),
], ids=["int8", "int4-fp8kv", "2:4", "0.3-int8-pipeline", "gpt2-int8-int4kv-2:4"])
def test_quantised_and_pruned_steps_match_the_reference(cfg, options):
    """The compiled step on the weights and caches as stored gives the reference's logits on
    the same numbers (the new token's K/V enters attention unquantised, as it is computed).
    GPT-2: learned positions (a quantised table), biases, a tied head."""
    s = quant.of(options, cfg.dtype)
    weights = quant.stored_weights(random_weights(cfg, seed=1), s)
    prompt = np.array([[3, 17, 99, 5, 7, 9, 11, 13, 2, 4, 6], [8, 1, 2, 120, 4, 4, 4, 1, 0, 9, 3]])
    logits, cache = forward(cfg, weights, prompt)
    cache = KVCache(*(tuple(quant.stored_cache(x, s, cfg.head_dim) for x in c)
                      for c in (cache.k, cache.v)))
    ids = logits[:, -1].argmax(-1)
    compiled = _compile(cfg, options, ctx=prompt.shape[1], batch=2)
    out = execute(compiled.program, pack_inputs(compiled, weights, ids, list(cache.k),
                                                list(cache.v)))
    ref, _ = forward(cfg, weights, ids[:, None], cache)
    np.testing.assert_allclose(out["logits"], ref[:, 0], rtol=1e-4, atol=1e-4)
    if s.prune:
        assert np.mean(weights["layers.0.up"] == 0) >= 1 - s.density - 1e-3


def _weight_bytes(compiled) -> int:
    """Stored bytes of every weight buffer of the step (projections, head, tables)."""
    s = quant.of(compiled.options, compiled.model.dtype)
    total = 0
    for part in (compiled.code.glue, compiled.code.body):
        kind = quant.kinds(part.tensors)[part.buf_tensor]
        view = quant.storage_view(part, s).buffer_bytes()
        total += int(view[np.isin(kind, (PROJ, HEAD, TABLE))].sum())
    return total


def test_int8_halves_the_weight_bytes_and_dequantises_on_a_wse2():
    """bf16 -> int8: weight SRAM about halves (plus an fp16 scale per column of each tile's
    K-groups: tiles of K = 32 and 88 here); the WSE-2 has no int8 rate, so each weight is
    converted and scaled (FLOPs up), and the step is slower; its SRAM reads drop."""
    region = CompileOptions(region=(2, 2))
    dense = _compile(BF16, region)
    q8 = _compile(BF16, dataclasses.replace(region, quant="int8"))
    ratio = _weight_bytes(q8) / _weight_bytes(dense)
    assert 0.5 + 1 / 88 < ratio < 0.5 + 1 / 32
    assert q8.memory["sram_max_bytes"] < dense.memory["sram_max_bytes"]
    rd, rq = simulate(dense.program, MESH), simulate(q8.program, MESH)
    assert q8.program.ins_flops.sum() > dense.program.ins_flops.sum()
    assert q8.program.ins_bytes.sum() < dense.program.ins_bytes.sum()
    assert rq.makespan_cycles > rd.makespan_cycles


@pytest.mark.parametrize("change", [
    # cores that multiply int8 at twice the bf16 rate run int8 weights there
    {"flops_per_cycle": MESH.flops_per_cycle + (("int8", 16.0),)},
    # a tenth of the SRAM bandwidth (2.4 B/cycle): a bf16 weight takes longer to read than to
    # multiply, so int8 weights pay for their dequantisation and more
    {"sram_bytes_per_cycle": 2.4},
], ids=["native-int8-rate", "sram-bound"])
def test_int8_is_faster_where_the_target_favours_it(change):
    target = dataclasses.replace(MESH, **change)
    region = CompileOptions(region=(8, 8))
    dense = simulate(_compile(BF16, region, target=target).program, target).makespan_cycles
    q8 = simulate(_compile(BF16, dataclasses.replace(region, quant="int8"), target=target
                           ).program, target).makespan_cycles
    assert q8 < dense


def test_pruning_skips_half_the_weight_flops():
    region = CompileOptions(region=(8, 8))
    dense, p24 = _compile(BF16, region), _compile(BF16, dataclasses.replace(region, prune="2:4"))

    def weight_flops(compiled):
        body = compiled.code.body
        reads = quant.kinds(body.tensors)[body.buf_tensor][np.maximum(body.ins_b, 0)] == PROJ
        return int(body.ins_flops[(body.ins_b >= 0) & reads].sum())

    assert weight_flops(p24) * 2 == weight_flops(dense)
    assert simulate(p24.program, MESH).makespan_cycles < simulate(dense.program,
                                                                  MESH).makespan_cycles
    assert p24.memory["sram_max_bytes"] < dense.memory["sram_max_bytes"]


def test_a_quantised_kv_cache_moves_and_holds_fewer_bytes():
    """ctx 11 on 8 columns: the shift scheme passes entries east; int8 entries (fp32
    compute) are a quarter the bytes plus scales, and the caches hold more tokens."""
    region = CompileOptions(region=(8, 8))
    dense = _compile(CFG, region)
    kv8 = _compile(CFG, dataclasses.replace(region, kv_dtype="int8"))
    assert kv8.program.msg_bytes.sum() < dense.program.msg_bytes.sum()
    assert kv8.memory["max_ctx"] > 2 * dense.memory["max_ctx"]
    gain = kv8.memory["quant"]
    assert gain["dense"]["max_ctx"] == dense.memory["max_ctx"]  # the same formula, same region
    assert gain["quant"]["max_ctx"] == kv8.memory["max_ctx"]


@pytest.mark.parametrize("options", [
    CompileOptions(quant="int8", kv_dtype="int8"), CompileOptions(prune="2:4"),
    CompileOptions(quant="int4", prune="0.5"),
], ids=["int8", "2:4", "int4-0.5"])
def test_the_estimate_stays_in_step(options):
    """compiler.estimate charges what compiler.quant.apply charges: within the 3% it keeps
    for dense steps."""
    for cfg in (CFG, BF16):
        compiled = _compile(cfg, dataclasses.replace(options, region=(8, 8)), ctx=11)
        sim = simulate(compiled.program, MESH).makespan_cycles
        est = step_cycles(cfg, MESH, 8, 8, [2], 1, compiled.slots,
                          q=quant.of(compiled.options, cfg.dtype))
        assert est == pytest.approx(sim, rel=0.03)


def test_a_model_that_fits_only_quantised():
    small = dataclasses.replace(MESH.with_mesh(4, 4), sram_bytes=12 * 1024)
    with pytest.raises(ProgramError, match="does not fit"):
        _compile(CFG, CompileOptions(), target=small)
    compiled = _compile(CFG, CompileOptions(quant="int4"), target=small)
    gain = compiled.memory["quant"]
    assert gain["dense"]["fits"] is False and gain["quant"]["fits"] is True
    assert gain["dense"]["max_ctx"] is None and gain["quant"]["max_ctx"] >= 11


def test_prefill_refuses_a_scheme():
    graph = build_graph(CFG, "prefill", batch=1, seq_len=16)
    with pytest.raises(ProgramError, match="decode only"):
        compile_model(graph, MESH, CompileOptions(quant="int8"))


def test_gpus_read_fewer_bytes_and_use_their_rates():
    cfg = load_model("llama3-8b")
    graph = build_graph(cfg, "decode", batch=1, ctx_len=4096)

    def run(cluster, **kw):
        return simulate_cluster(graph, parse_cluster(cluster),
                                scheme=quant.scheme(cfg.dtype, **kw) if kw else None)

    dense, q8 = run("1xH100"), run("1xH100", quant="int8")
    assert sum(q8.hbm_bytes) < 0.6 * sum(dense.hbm_bytes)  # weights dominate at batch 1
    assert 1.3 < dense.makespan_s / q8.makespan_s < 2.0  # HBM bound, not quite halved
    assert run("1xH100", prune="0.5").makespan_ps == dense.makespan_ps  # not accelerated
    p24 = run("1xH100", prune="2:4")
    assert p24.flops < dense.flops and p24.makespan_ps < dense.makespan_ps
    kv8 = run("1xH100", kv_dtype="int8")
    assert kv8.max_ctx > 1.9 * dense.max_ctx
    with pytest.raises(ValueError, match="910B has no 2:4"):
        run("1x910B", prune="2:4")


def test_compare_reports_the_speedup_on_each_side():
    opts = CompileOptions(quant="int8", kv_dtype="int8")
    r = compare(CFG, load_target("test16x16"), "1xH100", ctx=64, options=opts)
    assert r["techniques"] == ["quant=int8", "kv_dtype=int8"]
    for side in ("wafer", "gpus"):
        ratio = r[side]["tokens_per_s"] / r["dense"][side]["tokens_per_s"]
        assert r[f"{side}_speedup_vs_dense"] == pytest.approx(ratio)
        assert r[side]["max_ctx"] > r["dense"][side]["max_ctx"]


def test_cli_compile_and_compare_take_the_options():
    runner = CliRunner()
    out = runner.invoke(app, ["compile", "tiny-llama", "--target", "test16x16", "--ctx", "64",
                              "--quant", "int8", "--kv-dtype", "int8", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["storage"] == "weights int8, kv int8 (group 128)"
    assert data["quant_max_ctx"] == data["max_ctx"] > data["dense_max_ctx"]
    out = runner.invoke(app, ["compare", "tiny-llama", "--wafer", "test16x16", "--gpus",
                              "1xH100", "--ctx", "64", "--prune", "2:4", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["gpus_speedup_vs_dense"] > 1 and data["wafer_speedup_vs_dense"] > 1
    out = runner.invoke(app, ["compare", "tiny-llama", "--wafer", "test16x16", "--ctx", "64",
                              "--quant", "int3"])
    assert out.exit_code == 2 and out.output.strip().count("\n") == 0
    assert "--quant 'int3'" in out.output


def test_a_loaded_layout_counts_sram_as_stored(tmp_path):
    """The memory map of a quantised layout (wafersim plot --kind memory) shows the SRAM the
    compiler checked, not the compute dtype's."""
    from compiler.layout import load_layout, save_layout
    from compiler.quant import stored_layout

    c = _compile(CFG, CompileOptions(quant="int8", kv_dtype="int8"), ctx=64)
    path = tmp_path / "q.wsl"
    save_layout(c.code, path, **c.info())
    program, info = load_layout(path)
    assert int(stored_layout(program, info).sram_per_core().max()) == c.memory["sram_max_bytes"]
    assert int(program.sram_per_core().max()) > c.memory["sram_max_bytes"]
