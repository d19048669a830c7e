"""`wafersim layer`: one layer on a P x P grid, extrapolated (WaferLLM's method)."""

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from compiler.model import CompileOptions, compile_model
from compiler.program import ProgramError
from compiler.targets import load_target
from models import build_graph, load_model
from wafersim import layer
from wafersim.cli import app
from wafersim.layer import layer_run
from wafersim.whole import simulate_layout

runner = CliRunner()
CFG = load_model("tiny-llama")
WSE2 = load_target("wse2")


def _whole_step(cfg, layers: int, p: int, phase: str, ctx: int) -> int:
    cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    tgt = WSE2.with_mesh(p, p)
    graph = (build_graph(cfg, phase, seq_len=ctx) if phase == "prefill"
             else build_graph(cfg, phase, ctx_len=ctx))
    compiled = compile_model(graph, tgt, CompileOptions(region=(p, p)))
    return simulate_layout(compiled.code, tgt, compiled.info(), "all")[
        "makespan_cycles"]


@pytest.mark.parametrize("p", [8, 16])
def test_decode_layer_is_two_layer_step_minus_one_layer_step(p):
    r = layer_run(CFG, WSE2, p, "decode", ctx=32)
    one, two = _whole_step(CFG, 1, p, "decode", 32), _whole_step(CFG, 2, p, "decode", 32)
    assert r["one_layer_step_cycles"] == one
    assert r["two_layer_step_cycles"] == two
    assert r["layer_cycles"] == two - one > 0
    assert r["extrapolated"] is True and not r["vocab_shrunk"] and not r["sampled"]


@pytest.mark.parametrize("p", [8, 16])
def test_prefill_layer_alone_takes_what_the_second_layer_adds(p):
    # the layer's program alone against the 2- minus 1-layer whole step (13 of 13,884 cycles
    # apart at P = 16: a prefill layer ends in a grid-wide dependency)
    r = layer_run(CFG, WSE2, p, "prefill", ctx=32)
    added = _whole_step(CFG, 2, p, "prefill", 32) - _whole_step(CFG, 1, p, "prefill", 32)
    assert r["layer_cycles"] == pytest.approx(added, rel=2e-3)
    assert r["layer_measured"] == "the layer's program alone" and not r["sampled"]
    assert r["one_layer_step_cycles"] is None and r["tokens_per_s_with_rest"] is None
    assert 0 < r["layer_sram_max_bytes"] < r["layer_alone_sram_max_bytes"] <= WSE2.sram_bytes
    assert r["fits"]


def test_sampled_prefill_layer_is_close_to_exact():
    # LLaMA-3-8B's layer on 16 x 16 cores, 512 tokens: 2 and 3 of the 16 steps, extrapolated,
    # land 0.18% above the exact program (docs/validation.md has 16 to 96 cores a side)
    cfg = load_model("llama3-8b")
    exact = layer_run(cfg, WSE2, 16, "prefill", ctx=512, sample=False)
    sampled = layer_run(cfg, WSE2, 16, "prefill", ctx=512, sample=True)
    assert sampled["sampled"] and sampled["steps_sampled"][2] == 16 and sampled["sampled_steady"]
    t1, t2 = sampled["steps_sampled"][:2]
    assert t2 == t1 + 1 == len(sampled["sampled_cycles_per_step"]) + 2  # from T = 2
    assert sampled["layer_cycles"] == pytest.approx(exact["layer_cycles"], rel=0.005)
    assert sampled["layer_cycles"] > exact["layer_cycles"]  # the causal rows' savings missed
    assert sampled["layer_flops"] == pytest.approx(exact["layer_flops"], rel=0.02)
    assert not exact["fits"]  # an 8B layer on 256 cores: timed, and said not to fit
    assert exact["layer_alone_sram_max_bytes"] > WSE2.sram_bytes


def test_sampled_prefill_layer_is_never_shorter_than_its_busiest_cores_work(monkeypatch):
    monkeypatch.setattr(layer, "MAX_SAMPLED_STEPS", 3)  # T = 2 and 3 only: not steady here
    r = layer_run(load_model("llama3-8b"), WSE2, 48, "prefill", ctx=4096, sample=True)
    assert r["steps_sampled"] == [2, 3, 48] and r["sampled_steady"] is False
    assert r["last_core_compute"] + r["last_core_overhead"] <= 1 + 1e-9
    assert 0 < r["busy_fraction"] <= 1


def test_sampled_prefill_steps_stop_at_the_message_budget(monkeypatch):
    """Steps stop where the next program would pass MAX_LAYER_MESSAGES (not steady: reported
    as such), and a grid where even a second step would pass it is refused in one line."""
    cfg = load_model("llama3-8b")
    two = layer_run(cfg, WSE2, 48, "prefill", ctx=4096, sample=True)
    t1, t2 = two["steps_sampled"][:2]
    assert t2 > 3  # it needs more than T = 2 and 3 to settle here
    per_step = two["layer_messages"] / 48
    monkeypatch.setattr(layer, "MAX_LAYER_MESSAGES", int(3 * per_step))
    r = layer_run(cfg, WSE2, 48, "prefill", ctx=4096, sample=True)
    assert r["steps_sampled"] == [2, 3, 48] and r["sampled_steady"] is False
    monkeypatch.setattr(layer, "MAX_LAYER_MESSAGES", int(2 * per_step))
    with pytest.raises(ProgramError, match="MAX_LAYER_MESSAGES"):
        layer_run(cfg, WSE2, 48, "prefill", ctx=4096, sample=True)


def test_prefill_grids_wider_than_64_are_sampled():
    wide = dataclasses.replace(CFG, hidden_size=136, num_attention_heads=2,
                               num_key_value_heads=2, head_dim_override=68,
                               intermediate_size=272)  # 68 RoPE pairs: grids up to 68
    out = runner.invoke(app, ["layer", "tiny-llama", "--phase", "prefill", "--grid", "8",
                              "--ctx", "32", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["sampled"] is False
    r = layer_run(wide, WSE2, 66, "prefill", ctx=132)
    assert r["sampled"] and r["steps_sampled"][2] == 66 and r["fits"]
    assert r["layer_cycles"] > 0 and r["tokens_per_s"] > 0


def test_extrapolated_tokens_per_s_formula():
    cfg = dataclasses.replace(CFG, num_hidden_layers=32)  # the layer count only scales
    r = layer_run(cfg, WSE2, 8, "decode", ctx=32)
    layer_s = r["layer_cycles"] / WSE2.clock_hz
    rest_s = r["one_layer_step_cycles"] / WSE2.clock_hz - layer_s
    assert r["layers"] == 32
    assert r["tokens_per_s"] == pytest.approx(1 / (32 * layer_s))
    assert r["tokens_per_s_with_rest"] == pytest.approx(1 / (32 * layer_s + rest_s))
    assert r["rest_s"] == pytest.approx(rest_s)
    # prefill: the prompt's tokens per step
    r = layer_run(cfg, WSE2, 8, "prefill", ctx=32)
    assert r["tokens_per_s"] == pytest.approx(32 / (32 * r["layer_cycles"] / WSE2.clock_hz))


def test_breakdown_and_estimate_are_sane():
    r = layer_run(CFG, WSE2, 8, "decode", ctx=32)
    parts = r["last_core_compute"] + r["last_core_overhead"] + r["last_core_wait"]
    assert parts == pytest.approx(1.0, abs=0.05)
    assert 0 < r["busy_fraction"] < 1 and 0 <= r["idle_fraction"] < 1
    assert r["layer_link_bytes"] > 0 and r["layer_messages"] > 0 and r["layer_flops"] > 0
    assert 0 < r["layer_sram_max_bytes"] <= r["one_layer_step_sram_max_bytes"]
    assert r["fits"] and r["sram_limit_bytes"] == WSE2.sram_bytes
    assert r["estimate_layer_cycles"] == pytest.approx(r["layer_cycles"], rel=0.2)
    assert layer_run(CFG, WSE2, 8, "prefill", ctx=32)["estimate_layer_cycles"] is None


def test_paper_attention_changes_the_shapes():
    r = layer_run(CFG, WSE2, 12, "decode", ctx=50, attention="paper")
    assert (r["num_attention_heads"], r["num_key_value_heads"]) == (1, 1)
    assert r["hidden_size"] == 72 and r["head_dim"] == 72  # 64 rounded up to 12
    assert r["intermediate_size"] == 180  # 176 rounded up
    assert r["ctx"] == 60
    m = layer_run(CFG, WSE2, 12, "decode", ctx=50, attention="model")
    assert (m["num_attention_heads"], m["num_key_value_heads"], m["head_dim"]) == (4, 2, 16)
    assert (m["hidden_size"], m["ctx"]) == (64, 50)


def test_paper_attention_refuses_beyond_the_rope_limit():
    with pytest.raises(ProgramError, match="head_dim/2"):
        layer_run(CFG, WSE2, 72, "decode", ctx=64, attention="paper")


def test_vocabulary_shrunk_when_the_tables_do_not_fit():
    big = dataclasses.replace(CFG, vocab_size=400_000)
    r = layer_run(big, WSE2, 8, "decode", ctx=32)
    assert r["vocab_shrunk"] and r["vocab_size"] == 8
    assert r["layer_cycles"] == layer_run(CFG, WSE2, 8, "decode", ctx=32)["layer_cycles"]


def test_cli_json_keys():
    out = runner.invoke(app, ["layer", "tiny-llama", "--grid", "8", "--ctx", "32", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["extrapolated"] is True
    assert {"layer_cycles", "layer_s", "estimate_layer_cycles", "one_layer_step_cycles",
            "tokens_per_s", "tokens_per_s_with_rest", "last_core_compute",
            "last_core_overhead", "last_core_wait", "busy_fraction", "idle_fraction",
            "layer_link_bytes", "layer_sram_max_bytes", "sram_limit_bytes", "fits",
            "vocab_shrunk", "grid", "attention", "layers", "kv", "max_decode", "sampled",
            "steps_sampled", "layer_measured", "layer_alone_sram_max_bytes",
            "max_decode_shift", "max_decode_concat", "kv_tokens_per_core"} <= set(data)


@pytest.mark.parametrize("kv", ["shift", "concat"])
def test_kv_capacity_of_the_layer_grid(kv):
    r = layer_run(CFG, WSE2, 8, "decode", ctx=32, kv=kv)
    per_core = r["kv_tokens_per_core"]
    assert r["kv"] == kv and r["kv_cores_per_line"] == 8
    assert r["max_decode"] == r[f"max_decode_{kv}"]
    assert r["max_tokens_shift"] == 8 * per_core == r["max_decode_shift"] + 32
    assert r["max_tokens_concat"] == 32 + per_core - 32 // 8
    assert r["max_decode_shift"] > r["max_decode_concat"] > 0
    # the timing is the shift layout's either way; prefill has no decode capacity
    assert r["layer_cycles"] == layer_run(CFG, WSE2, 8, "decode", ctx=32)["layer_cycles"]
    assert layer_run(CFG, WSE2, 8, "prefill", ctx=32, kv=kv)["max_decode"] is None


def test_cli_sweep_rows_text_and_plot(tmp_path):
    png = tmp_path / "sweep.png"
    out = runner.invoke(app, ["layer", "tiny-llama", "--grid", "8,16", "--ctx", "32",
                              "--attention", "paper", "--json", "-o", str(png)])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["extrapolated"] is True and [r["grid"] for r in data["rows"]] == [8, 16]
    assert png.stat().st_size > 0
    out = runner.invoke(app, ["layer", "tiny-llama", "--grid", "8,16", "--ctx", "32"])
    assert out.exit_code == 0, out.output
    assert "extrapolated: true" in out.stdout and "estimate" in out.stdout
    assert "max decode (shift KV)" in out.stdout


@pytest.mark.parametrize("args", [["--grid", "0"], ["--grid", "abc"], ["--grid", "2000"],
                                  ["--attention", "heads"], ["--phase", "train"],
                                  ["--kv", "paged"]])
def test_cli_bad_input_is_one_line_exit_2(args):
    out = runner.invoke(app, ["layer", "tiny-llama", "--ctx", "32", *args])
    assert out.exit_code == 2, (args, out.output)
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1


def test_prefill_beyond_the_rope_pairs_is_one_line_exit_2():
    out = runner.invoke(app, ["layer", "tiny-llama", "--phase", "prefill", "--grid", "17",
                              "--ctx", "34"])
    assert out.exit_code == 2, out.output
    assert "RoPE pairs" in out.stderr and out.stderr.count("\n") == 1
