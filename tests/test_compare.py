"""`wafersim compare`: the wafer and a GPU cluster side by side, as a table, JSON or CSV."""

import csv
import json

import pytest
from typer.testing import CliRunner

from compiler.targets import load_target
from models import load_model
from wafersim.cli import app
from wafersim.compare import SUMMARY_KEYS, compare

runner = CliRunner()
TINY = ["tiny-llama", "--wafer", "test16x16", "--ctx", "64"]


def run_json(*args):
    out = runner.invoke(app, ["compare", *args, "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)  # one JSON object, nothing else on stdout


@pytest.fixture(scope="module")
def tiny_h100():
    return run_json(*TINY, "--gpus", "1xH100")


def test_json_has_both_sides_with_the_summary_keys(tiny_h100):
    r = tiny_h100
    assert set(SUMMARY_KEYS) <= set(r["wafer"]) and set(SUMMARY_KEYS) <= set(r["gpus"])
    w, g = r["wafer"], r["gpus"]
    assert w["system"] == "wse2[16x16]" and g["system"] == "1xH100"
    for side in (w, g):
        assert side["fits"] and side["reason"] is None
        assert side["model"] == "tiny-llama" and side["phase"] == "decode" and side["batch"] == 1
        assert side["tokens_per_s"] > 0 and side["tpot_ms"] > 0 and side["ttft_ms"] is None
        assert side["makespan_s"] > 0 and 0 <= side["busy_fraction"] <= 1
        assert 0 <= side["idle_fraction"] <= 1 and side["onchip_bytes"] > 0
    assert w["events"] > 0 and w["sim_wall_s"] >= 0  # wafer-only keys
    assert "energy_j" not in w  # the wafer target has no power figure: no energy invented
    assert g["energy_j"] > 0  # the GPU preset has its board power


def test_speedup_is_the_ratio_of_throughputs(tiny_h100):
    r = tiny_h100
    assert r["speedup"] == pytest.approx(r["wafer"]["tokens_per_s"] / r["gpus"]["tokens_per_s"])
    assert r["speedup_reason"] is None


def test_python_api_matches_the_cli(tiny_h100):
    r = compare(load_model("tiny-llama"), load_target("test16x16"), "1xH100", ctx=64)
    assert r["wafer"]["makespan_s"] == tiny_h100["wafer"]["makespan_s"]
    assert r["gpus"]["makespan_s"] == tiny_h100["gpus"]["makespan_s"]


@pytest.mark.parametrize("spec, n_gpus", [("4xA100+4xH20", 8),
                                           ("1xH100@dc1+1x(2xA100)@dc2;dc1-dc2=1000km", 3)])
def test_mixed_cluster(spec, n_gpus):
    r = run_json(*TINY, "--gpus", spec, "--layers", "one")
    g = r["gpus"]
    assert g["fits"] and g["gpus"] == n_gpus and g["tokens_per_s"] > 0
    assert g["offchip_bytes"] > 0  # the pipeline hop between the two nodes
    assert r["wafer"]["fits"] and not r["wafer"]["extrapolated"]  # two layers: all simulated
    assert r["speedup"] == pytest.approx(r["wafer"]["tokens_per_s"] / g["tokens_per_s"])


def test_two_datacenter_cluster_against_a_wafer_too_small():
    r = run_json("llama3-8b", "--wafer", "test16x16", "--ctx", "4096",
                 "--gpus", "2x(8xH100)@dc1+1x(8x910B)@dc2;dc1-dc2=1000km")
    g = r["gpus"]
    assert g["fits"] and g["gpus"] == 24 and g["interdc_bytes"] > 0 and g["tpot_ms"] > 0
    assert not r["wafer"]["fits"] and "does not fit" in r["wafer"]["reason"]


def test_cluster_that_cannot_run_the_dtype_reports_why():
    r = run_json(*TINY, "--gpus", "1xH100+1x910B")  # tiny-llama is fp32; the 910B has none
    assert not r["gpus"]["fits"] and "910B has no fp32 rate" in r["gpus"]["reason"]
    assert r["wafer"]["fits"] and r["speedup"] is None


def test_cluster_with_more_stages_than_layers_reports_why():
    r = run_json(*TINY, "--gpus", "2x(8xH100)@dc1+1x(8x910B)@dc2;dc1-dc2=1000km")
    assert not r["gpus"]["fits"] and "fewer than the 3 pipeline stages" in r["gpus"]["reason"]
    assert r["gpus"]["tokens_per_s"] is None and r["speedup"] is None
    assert r["wafer"]["fits"]


@pytest.mark.parametrize("args, msg", [
    (["--gpus", "9xFOO"], "unknown GPU 'FOO'"),
    (["--gpus", "8xH100+"], "empty group"),
    (["--wafer", "nowhere"], "not a preset"),
    (["--layers", "two"], "not one of all, one"),
    (["--policy", "random"], "not one of waferllm, pipeline"),
])
def test_bad_input_is_one_line_and_exit_2(args, msg):
    out = runner.invoke(app, ["compare", *TINY, *args])
    assert out.exit_code == 2, out.output
    assert msg in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("error: ") and "Traceback" not in out.output
    assert out.stdout == ""


def test_unknown_model_exits_2():
    out = runner.invoke(app, ["compare", "no-such-model", "--wafer", "test16x16"])
    assert out.exit_code == 2 and out.stderr.startswith("error: no-such-model: unknown model")


def test_model_that_does_not_fit_the_wafer_reports_the_reason():
    r = run_json("tiny-llama", "--wafer", "test4x4", "--gpus", "1xH100", "--ctx", "1024")
    w = r["wafer"]
    assert w["fits"] is False and "does not fit wse2[4x4]" in w["reason"]
    assert "KB per core" in w["reason"] and w["tokens_per_s"] is None
    assert set(SUMMARY_KEYS) <= set(w)
    assert r["gpus"]["fits"] and r["gpus"]["tokens_per_s"] > 0  # the other side still runs
    assert r["speedup"] is None and r["speedup_reason"]


def test_prefill_runs_on_both_sides():
    r = run_json(*TINY, "--gpus", "1xH100", "--phase", "prefill")
    w = r["wafer"]
    assert w["fits"] and w["ttft_ms"] > 0 and w["tpot_ms"] is None and w["ctx"] == 64
    assert abs(w["tokens_per_s"] * w["ttft_ms"] / 1e3 - 64) < 1e-6  # the prompt's tokens
    assert r["speedup"] > 0
    g = r["gpus"]
    assert g["fits"] and g["ttft_ms"] > 0 and g["tpot_ms"] is None and g["seq_len"] == 64


def test_table_and_csv(tmp_path):
    path = tmp_path / "cmp.csv"
    out = runner.invoke(app, ["compare", *TINY, "--gpus", "1xH100", "--csv", str(path)])
    assert out.exit_code == 0, out.output
    for text in ("throughput (tokens/s)", "latency (TPOT)", "on-chip traffic", "wse2[16x16]",
                 "1xH100", "x"):
        assert text in out.stdout
    with open(path, newline="") as f:
        rows = {row["metric"]: row for row in csv.DictReader(f)}
    assert {"system", "fits", "tokens_per_s", "tpot_ms", "makespan_s", "busy_fraction",
            "idle_fraction", "onchip_bytes", "offchip_bytes", "energy_j"} <= set(rows)
    tps = rows["tokens_per_s"]
    assert float(tps["wafer_over_gpus"]) == pytest.approx(
        float(tps["wafer"]) / float(tps["gpus"]))
    assert rows["system"]["wafer"] == "wse2[16x16]" and rows["energy_j"]["wafer"] == ""


def test_csv_names_the_reason_of_a_side_that_does_not_fit(tmp_path):
    path = tmp_path / "cmp.csv"
    out = runner.invoke(app, ["compare", "tiny-llama", "--wafer", "test4x4", "--gpus", "1xH100",
                              "--ctx", "1024", "--csv", str(path), "--json"])
    assert out.exit_code == 0, out.output
    json.loads(out.stdout)
    with open(path, newline="") as f:
        rows = {row["metric"]: row for row in csv.DictReader(f)}
    assert rows["fits"]["wafer"] == "False" and "does not fit" in rows["wafer_reason"]["wafer"]
