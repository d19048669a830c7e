"""The CLI: results as tables or one JSON object; bad input as one line and exit status 2."""

import json

from typer.testing import CliRunner

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
    assert set(algos) == {"meshgemv", "ring"}
    assert data["best"] == "meshgemv"
    for r in algos.values():
        assert r["makespan_s"] > 0 and 0 <= r["busy_fraction"] <= 1


def test_op_gemm_table():
    out = runner.invoke(app, ["op", "gemm", "--m", "64", "--k", "64", "--n", "64", "--mesh",
                              "4x4"])
    assert out.exit_code == 0, out.output
    assert "summa" in out.stdout and "cannon" in out.stdout


def test_bad_input_is_one_line_and_exit_2():
    for args, msg in [
        (["op", "gemv", "--mesh", "4by4"], "--mesh '4by4'"),
        (["op", "gemv", "--algo", "fast"], "not one of meshgemv, ring"),
        (["op", "conv"], "not one of gemv, gemm"),
        (["op", "gemv", "--target", "nowhere"], "not a preset"),
        (["op", "gemv", "--mesh", "2x2"], "B of SRAM on core (0,0)"),
    ]:
        out = runner.invoke(app, args)
        assert out.exit_code == 2, (args, out.output)
        assert msg in out.stderr and len(out.stderr.strip().splitlines()) == 1
        assert "Traceback" not in out.output
