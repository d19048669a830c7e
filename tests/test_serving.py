"""The serving simulation (wafersim.serving) and its step-time cache (wafersim.steps)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from models import load_model
from wafersim import serving
from wafersim.cli import app
from wafersim.steps import GpuSource, StepTable, build_table, error_bound


def test_littles_law_holds_on_the_queue():
    # A loaded server (rho ~ 0.8) so that the queue is busy; the monitor samples densely.
    t = serving.constant_table(decode_s=0.002, prefill_s=0.0, max_batch=1, kv_tokens=10**6)
    w = serving.poisson(rate=200, duration_s=300, prompt=10, output=3, seed=3)
    s = serving.simulate(w, t, samples=100_000).summary()
    little = s["little"]
    assert little["L_queue"] > 1
    assert little["rel_error"] < 0.02


def test_md1_mean_latency_matches_pollaczek_khinchine():
    # batch 1, no prefill time, one decode step of D: an M/D/1 queue with service D.
    d, lam = 0.01, 50.0  # rho = 0.5
    t = serving.constant_table(decode_s=d, prefill_s=0.0, max_batch=1, kv_tokens=10**6)
    w = serving.poisson(rate=lam, duration_s=2000, prompt=10, output=2, seed=7)
    s = serving.simulate(w, t, samples=100).summary()
    rho = lam * d
    theory = d + lam * d * d / (2 * (1 - rho))
    assert s["e2e_s"]["mean"] == pytest.approx(theory, rel=0.05)


def test_same_seed_gives_identical_results_and_another_seed_differs():
    t = serving.constant_table(decode_s=0.003, prefill_s=0.02, max_batch=4, kv_tokens=2000)
    a = serving.simulate(serving.bursty(30, 60, 100, 50, seed=1), t).summary()
    b = serving.simulate(serving.bursty(30, 60, 100, 50, seed=1), t).summary()
    c = serving.simulate(serving.bursty(30, 60, 100, 50, seed=2), t).summary()
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(c)


def test_kv_capacity_makes_requests_wait_and_refuses_the_impossible():
    # 500 tokens of cache: two requests of 150 + 100 fit at once, a third waits.
    t = serving.constant_table(decode_s=0.01, prefill_s=0.0, max_batch=16, kv_tokens=500)
    w = serving.Workload(np.array([0.0, 0.0, 0.0, 0.0]), np.array([150, 150, 150, 600]),
                         np.array([100, 100, 100, 10]), "four", 1.0)
    r = serving.simulate(w, t)
    assert r.refused.tolist() == [False, False, False, True]
    assert r.admit_s[0] == r.admit_s[1] == 0.0
    assert r.admit_s[2] == pytest.approx(r.done_s[0])  # waited for a completion
    s = r.summary()
    assert s["refused"] == 1 and s["completed"] == 3
    assert s["kv_reserved_max"] <= 1.0


def test_continuous_batching_admits_into_a_running_batch():
    t = serving.constant_table(decode_s=0.01, prefill_s=0.0, max_batch=8, kv_tokens=10**5)
    w = serving.Workload(np.array([0.0, 0.055]), np.array([10, 10]), np.array([100, 100]),
                         "two", 1.0)
    r = serving.simulate(w, t)
    # the second joins at the end of the decode step during which it arrived
    assert r.admit_s[1] == pytest.approx(0.06)
    assert r.done_s[0] == pytest.approx(0.99)


def test_disaggregated_prefill_feeds_the_decode_server():
    dec = serving.constant_table(decode_s=0.005, prefill_s=1.0, max_batch=8, kv_tokens=10**5)
    pre = serving.constant_table(decode_s=1.0, prefill_s=0.05, max_batch=1, kv_tokens=10**5,
                                 system="prefill")
    w = serving.poisson(rate=5, duration_s=60, prompt=100, output=10, seed=0)
    s = serving.simulate(w, dec, pre).summary()
    assert s["disaggregated"] and s["completed"] == len(w)
    assert s["ttft_ms"]["p50"] >= 50 - 1e-9  # the prefill server's 50 ms, not the 1 s
    assert s["tpot_ms"]["p50"] == pytest.approx(5.0)


def test_step_table_roundtrip_and_error_bound(tmp_path):
    src = GpuSource(load_model("tiny-llama"), "1xH100")
    t = build_table(src, batches=[1, 4, 16], ctxs=[64, 256], prefill_tokens=[64, 256])
    path = tmp_path / "steps.json"
    t.save(path)
    u = StepTable.load(path)
    for b, c in ((1, 64), (3, 100), (16, 256), (40, 600)):
        assert u.decode(b, c) == pytest.approx(t.decode(b, c))
    assert u.decode(4, 256) == pytest.approx(src.decode_point(4, 256))  # a bucket is exact
    assert [p["phase"] for p in u.points].count("decode") == 6
    err = error_bound(u, n=2)  # rebuilt from the saved source
    assert len(err["points"]) >= 2
    assert all(p["ctx"] not in u.ctxs or p["batch"] not in u.batches for p in err["points"])
    assert 0 <= err["max_rel_error"] < 0.1


def test_workload_trace_and_bad_input(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,prompt_tokens,output_tokens\n0.5,10,5\n0.1,20,3\n")
    w = serving.make_workload(str(p), 1, 1, 1, 1)
    assert w.arrival_s.tolist() == [0.1, 0.5] and w.prompt.tolist() == [20, 10]
    with pytest.raises(ValueError, match="arrivals"):
        serving.make_workload("uniform", 1, 1, 1, 1)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,p\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        serving.load_trace(bad)


def test_wafer_points_are_simulated_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    """A full-wafer-sized prefill takes minutes, so every simulated point is kept on disk,
    keyed by the source and the simulator's code; prefill on grids past SAMPLE_SIDE is
    simulated with sampled steps and the table says so."""
    from compiler import prefill_model
    from compiler.targets import load_target
    from wafersim import compare
    from wafersim.steps import WaferSource

    monkeypatch.setattr(prefill_model, "SAMPLE_SIDE", 2)  # tiny-llama's 16x16 grid: sampled
    src = WaferSource(load_model("tiny-llama"), load_target("test16x16"), cache_dir=tmp_path)
    t = build_table(src, batches=[1], ctxs=[64], prefill_tokens=[32])
    assert "every layer and steps 2 and 3 of 16, extrapolated" in t.prefill_note, t.prefill_note
    # the capacity (at the largest batch that compiles), decode at batch 1, prefill
    assert len(list(tmp_path.glob("point_*.json"))) == 3
    monkeypatch.setattr(compare, "wafer_side", lambda *a: pytest.fail("simulated again"))
    again = WaferSource(load_model("tiny-llama"), load_target("test16x16"), cache_dir=tmp_path)
    assert again.capacity(64)["max_batch"] == t.max_batch
    assert again.prefill_point(1, 32) == t.prefill(1, 32)
    assert again.decode_point(1, 64) == t.decode(1, 64)


def test_cli_serve_json_keys_and_bad_input(tmp_path):
    runner = CliRunner()
    args = ["serve", "tiny-llama", "--wafer", "test16x16", "--gpus", "1xH100", "--rate", "50",
            "--duration", "20", "--prompt", "64", "--output", "16", "--batches", "1,2",
            "--ctxs", "64", "--error-points", "0", "--rates", "20,80", "--json",
            "--cache-dir", str(tmp_path)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert runner.invoke(app, args).stdout == r.stdout  # the second run reads the cache
    out = json.loads(r.stdout)
    assert set(out["systems"]) == {"wafer", "gpus"}
    for s in out["systems"].values():
        for key in ("output_tokens_per_s", "ttft_ms", "tpot_ms", "queue_ms", "goodput_fraction",
                    "kv_series", "little", "steps"):
            assert key in s
        assert set(s["ttft_ms"]) == {"mean", "p50", "p90", "p99"}
    assert [row["rate"] for row in out["curves"]["gpus"]] == [20, 80]
    bad = runner.invoke(app, ["serve", "tiny-llama", "--gpus", "1xH100", "--rate", "-1"])
    assert bad.exit_code == 2 and "error:" in bad.output


def test_the_wafer_serves_the_largest_batch_on_one_placement(tmp_path):
    """The batch limit is the largest batch any placement holds (not the batch-1 placement's),
    and every decode point runs on that placement's region shape."""
    from compiler.model import largest_batch
    from compiler.targets import load_target
    from wafersim.steps import MAX_WAFER_BATCH, WaferSource

    cfg, tgt = load_model("tiny-llama"), load_target("test16x16")
    src = WaferSource(cfg, tgt, cache_dir=tmp_path)
    cap = src.capacity(64)
    best = min(MAX_WAFER_BATCH, largest_batch(cfg, tgt, 65))
    assert 1 < cap["max_batch"] <= best and src.region is not None
    assert cap["kv_capacity_tokens"] >= cap["max_batch"] * 65
    one = src._run("decode", 1, 64)
    assert one["region"] == cap["region"] == "{}x{}".format(*src.region)
    assert src.decode_point(1, 64) <= src.decode_point(cap["max_batch"], 64)
