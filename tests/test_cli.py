"""The CLI: results as tables or one JSON object; bad input as one line and exit status 2."""

import json

from typer.testing import CliRunner

from models import load_model
from wafersim.cli import app

runner = CliRunner()


def test_info_lists_targets_and_models_as_json():
    out = runner.invoke(app, ["info", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert {t["name"] for t in data["targets"]} >= {"wse2", "wse3"}
    assert {m["name"] for m in data["models"]} >= {"llama3-8b", "llama2-13b", "tiny-llama"}


def test_op_compares_algorithms_in_json():
    out = runner.invoke(app, ["op", "gemv", "--k", "512", "--n", "256", "--mesh", "16x16",
                              "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    algos = {r["algo"]: r for r in data["results"]}
    assert set(algos) == {"meshgemv", "ring", "pipeline"}
    assert data["best"] == "meshgemv"
    for r in algos.values():
        assert r["makespan_s"] > 0 and 0 <= r["busy_fraction"] <= 1


def test_op_gemm_table():
    out = runner.invoke(app, ["op", "gemm", "--m", "64", "--k", "64", "--n", "64", "--mesh",
                              "4x4"])
    assert out.exit_code == 0, out.output
    assert "summa" in out.stdout and "cannon" in out.stdout


def test_op_gemm_sampled_steps_are_labelled():
    out = runner.invoke(app, ["op", "gemm", "--m", "96", "--k", "96", "--n", "96", "--mesh",
                              "12x12", "--steps", "4,8", "--json"])
    assert out.exit_code == 0, out.output
    rows = {r["algo"]: r for r in json.loads(out.stdout)["results"]}
    assert all(r["extrapolated"] and r["steps_sampled"] == [4, 8] for r in rows.values())
    exact = json.loads(runner.invoke(app, ["op", "gemm", "--m", "96", "--k", "96", "--n", "96",
                                           "--mesh", "12x12", "--json"]).stdout)["results"]
    assert not any(r["extrapolated"] for r in exact)
    assert rows["meshgemm"]["makespan_cycles"] == exact[0]["makespan_cycles"]


def test_bad_input_is_one_line_and_exit_2():
    for args, msg in [
        (["op", "gemv", "--mesh", "4by4"], "--mesh '4by4'"),
        (["op", "gemv", "--algo", "fast"], "not one of meshgemv, ring"),
        (["op", "conv"], "not one of gemv, gemm"),
        (["op", "gemv", "--target", "nowhere"], "not a preset"),
        (["op", "gemv", "--mesh", "2x2"], "B of SRAM on core (0,0)"),
        (["op", "gemm", "--mesh", "4x4", "--steps", "3,2"], "1 <= T1 < T2 <= 4"),
        (["op", "gemm", "--mesh", "4x4", "--steps", "lots"], "--steps 'lots'"),
        (["op", "gemv", "--steps", "4,8"], "only a GEMM's loop is sampled"),
    ]:
        out = runner.invoke(app, args)
        assert out.exit_code == 2, (args, out.output)
        assert msg in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert "Traceback" not in out.output


def test_compile_then_simulate_a_layout(tmp_path):
    path = str(tmp_path / "tiny.wsl")
    config = tmp_path / "tiny-6.json"  # six layers, so one region's loop runs more than twice
    config.write_text(json.dumps({**load_model("tiny-llama").to_dict(), "num_hidden_layers": 6}))
    out = runner.invoke(app, ["compile", str(config), "--target", "test16x16", "--ctx", "64",
                              "-o", path, "--json"])
    assert out.exit_code == 0, out.output
    compiled = json.loads(out.stdout)
    assert compiled["fits"] and compiled["sram_max_bytes"] <= compiled["sram_limit_bytes"]
    assert compiled["max_ctx"] >= 64
    runs = {}
    for layers in ("all", "one"):
        out = runner.invoke(app, ["simulate", path, "--layers", layers, "--json"])
        assert out.exit_code == 0, out.output
        runs[layers] = json.loads(out.stdout)
    full, one = runs["all"], runs["one"]
    assert not full["extrapolated"] and one["extrapolated"]
    assert full["tokens_per_s"] > 0 and full["tpot_ms"] > 0
    assert abs(full["busy_fraction"] + full["idle_fraction"] + full["overhead_fraction"] - 1) < 1e-9
    assert full["flops"] == one["flops"]  # the whole step's work either way
    assert abs(one["makespan_cycles"] - full["makespan_cycles"]) <= 0.05 * full["makespan_cycles"]


def test_compile_then_simulate_a_prefill(tmp_path):
    path = str(tmp_path / "prefill.wsl")
    out = runner.invoke(app, ["compile", "tiny-llama", "--target", "test16x16", "--phase",
                              "prefill", "--ctx", "16", "-o", path, "--json"])
    assert out.exit_code == 0, out.output
    compiled = json.loads(out.stdout)
    assert compiled["phase"] == "prefill" and compiled["ctx"] == 16 and compiled["fits"]
    out = runner.invoke(app, ["simulate", path, "--json"])
    assert out.exit_code == 0, out.output
    run = json.loads(out.stdout)
    assert run["phase"] == "prefill" and run["ttft_ms"] > 0 and run["tpot_ms"] is None
    out = runner.invoke(app, ["compile", "tiny-llama", "--target", "test16x16", "--phase",
                              "prefill", "--batch", "2", "--ctx", "16"])
    assert out.exit_code == 2 and "batch 1" in out.stderr


def test_compile_refuses_a_model_that_does_not_fit():
    out = runner.invoke(app, ["compile", "llama3-70b", "--target", "wse2"])
    assert out.exit_code == 2
    assert "does not fit" in out.output and "KB per core" in out.output


def test_long_runs_print_no_progress_when_not_on_a_terminal(tmp_path):
    """Spinners and bars go to stderr on a terminal only: piped output stays clean."""
    layout = tmp_path / "tiny.wsl"
    for args in (["compile", "tiny-llama", "--target", "test16x16", "--ctx", "16", "-o",
                  str(layout), "--json"],
                 ["simulate", str(layout), "--json"],
                 ["layer", "tiny-llama", "--target", "test16x16", "--grid", "8,12", "--ctx",
                  "16", "--json"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        assert res.stderr == "" and res.stdout.startswith("{")
