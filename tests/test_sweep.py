"""Design-space sweeps (wafersim.sweep, `wafersim sweep`): the sweep file's checks, points and
keys, and sweeps run through a real dask scheduler with two worker processes on loopback:
rows, failed points, deduplication, resume, the Pareto front, the CLI's JSON."""

import json
import logging

import pytest
from typer.testing import CliRunner

from wafersim import sweep as sw
from wafersim.cli import app

runner = CliRunner()

SMALL = """
[base]
model = "tiny-llama"
target = "wse2"
ctx = 32

[axes]
mesh = ["16x16", "32x32"]
sram_bytes = ["2KB", "48KB", 49152]      # 2 KB fits 32x32, not 16x16; 48KB == 49152
link_bytes_per_cycle = {start = 4, stop = 8, factor = 2}
"""
# 2 meshes x 3 SRAM values x 2 link values = 12 points, 8 unique, 2 of them fail (16x16, 2 KB).


@pytest.fixture(scope="module")
def scheduler():
    """A real dask scheduler and two worker processes (one thread each) on 127.0.0.1."""
    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.ERROR)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


def write(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(tmp_path, text) -> str:
    with pytest.raises(sw.SweepError) as err:
        sw.load_sweep(write(tmp_path, text))
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# ---- the sweep file ------------------------------------------------------------------------

def test_axes_expand_lists_ranges_and_sizes(tmp_path):
    s = sw.load_sweep(write(tmp_path, """
        [base]
        model = "tiny-llama"
        [axes]
        batch = {start = 1, stop = 8, factor = 2}
        ctx = {start = 64, stop = 256, step = 64}
        sram_bytes = ["96KB", "1MiB", 4096]
        hop_latency_cycles = [1, 2, 1]
        clock_hz = [1e9, 2e9]
    """))
    assert s.axes["batch"] == [1, 2, 4, 8]
    assert s.axes["ctx"] == [64, 128, 192, 256]  # stop included when a step lands on it
    assert s.axes["sram_bytes"] == [96 * 1024, 1 << 20, 4096]
    assert s.axes["hop_latency_cycles"] == [1, 2, 1]
    assert s.size == 4 * 4 * 3 * 3 * 2
    assert len(s.points()[0]) == 4 * 4 * 3 * 2 * 2  # repeated values make duplicate points
    assert s.base["phase"] == "decode" and s.base["target"] == "wse2"


def test_points_resolve_to_custom_targets_and_duplicates_are_dropped(tmp_path):
    s = sw.load_sweep(write(tmp_path, SMALL))
    points, duplicates = s.points()
    assert s.size == 12 and len(points) == 8 and duplicates == 4
    p = points[0]
    assert (p.target.width, p.target.height, p.target.sram_bytes) == (16, 16, 2048)
    assert p.target.link_bytes_per_cycle == 4.0 and p.cfg.name == "tiny-llama" and p.ctx == 32
    assert len({q.key for q in points}) == 8
    # the key is stable and depends on what runs, not on how the file spells it
    again = sw.load_sweep(write(tmp_path, SMALL.replace('"48KB", 49152', '49152'), "b.toml"))
    assert {q.key for q in again.points()[0]} == {q.key for q in points}


def test_dtype_and_options_axes(tmp_path):
    s = sw.load_sweep(write(tmp_path, """
        [base]
        model = "tiny-llama"
        width = 16
        height = 8
        [base.options]
        policy = "pipeline"
        [axes]
        dtype = ["bf16", "fp32"]
        algo = ["meshgemv", "ring"]
    """))
    points, _ = s.points()
    assert {p.cfg.dtype for p in points} == {"bf16", "fp32"}
    assert {p.options.algo for p in points} == {"meshgemv", "ring"}
    assert all(p.options.policy == "pipeline" and p.target.cores == 128 for p in points)


def test_target_file_relative_to_the_sweep_file(tmp_path):
    import dataclasses

    from compiler.targets import load_target

    custom = dataclasses.replace(load_target("test16x16"), name="mine", sram_bytes=96 * 1024,
                                 link_bytes_per_cycle=8.0)
    custom.save(tmp_path / "mine.toml")
    s = sw.load_sweep(write(tmp_path, """
        [base]
        model = "tiny-llama"
        target = "mine.toml"
        [axes]
        hop_latency_cycles = [1, 2]
    """))
    points, _ = s.points()
    assert [p.target.hop_latency_cycles for p in points] == [1, 2]
    assert all(p.target.sram_bytes == 96 * 1024 and p.target.link_bytes_per_cycle == 8.0
               and p.target.cores == 256 for p in points)


@pytest.mark.parametrize("text, words", [
    ('[base]\nmodel = "tiny-llama"\n[axes]\nsram = [1]', ("axis sram", "unknown parameter")),
    ('[base]\nmodel = "tiny-llama"\n[axes]\nbatch = []', ("axis batch", "no values")),
    ('[base]\nmodel = "tiny-llama"\n[axes]\nsram_bytes = [-1]',
     ("axis sram_bytes", "must be > 0")),
    ('[base]\nmodel = "tiny-llama"\n[axes]\nsram_bytes = ["lots"]',
     ("axis sram_bytes", "byte count")),
    ('[base]\nmodel = "tiny-llama"\n[axes]\nlink_bytes_per_cycle = ["fast"]',
     ("axis link_bytes_per_cycle", "number")),
    ('[base]\nmodel = "tiny-llama"\n[axes]\nhop_latency_cycles = [1.5]',
     ("axis hop_latency_cycles", "integer")),
    ('[base]\nmodel = "tiny-llama"\n[axes]\nmesh = ["256"]', ("axis mesh", "ROWSxCOLS")),
    ('[base]\nmodel = "tiny-llama"\n[axes]\npolicy = ["fastest"]',
     ("axis policy", "not one of")),
    ('[base]\nmodel = "tiny-llama"\n[axes]\nbatch = {start = 1, stop = 8, factor = 1}',
     ("axis batch", "factor")),
    ('[base]\nmodel = "tiny-llama"\n[axes]\nbatch = {start = 1, stop = 8}',
     ("axis batch", "range table")),
    ('[base]\nmodel = "tiny-llama"\n[axes]\nctx = 5', ("axis ctx", "list")),
    ('[base]\nmodel = "tiny-llama"\nmesh = "16x16"\n[axes]\nwidth = [8]', ("mesh", "not both")),
    ('[base]\nmodel = "tiny-llama"\nbatch = 2\n[axes]\nbatch = [1]', ("axis batch", "[base]")),
    ('[base]\nmodel = "no-such-model"', ("base model",)),
    ('[base]\nmodel = "tiny-llama"\ntarget = "wse9"', ("base target",)),
    ('[base]\nctx = 4', ("names no model",)),
    ('[base]\nmodel = "tiny-llama"\n[output]\nx = 1', ("unknown table [output]",)),
    ('[base\n', ("cannot parse",)),
])
def test_bad_sweep_files_are_refused_in_one_line(tmp_path, text, words):
    msg = refused(tmp_path, text)
    for w in words:
        assert w in msg, msg


# ---- running points ------------------------------------------------------------------------

def test_a_point_that_raises_is_a_row_with_its_message(tmp_path, monkeypatch):
    import compiler.model

    points, _ = sw.load_sweep(write(tmp_path, SMALL)).points()
    no_fit = sw.run_point(points[0])  # 2 KB per core
    assert no_fit["fits"] is False and "KB" in no_fit["error"] and no_fit["tokens_per_s"] is None
    assert no_fit["mesh"] == "16x16" and no_fit["sram_bytes"] == 2048 and no_fit["cores"] == 256

    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(compiler.model, "compile_model", boom)
    row = sw.run_point(points[1])
    assert row["error"] == "RuntimeError: boom second line" and row["fits"] is None


def test_results_file_survives_a_torn_last_line(tmp_path):
    s = sw.load_sweep(write(tmp_path, SMALL))
    out = tmp_path / "r.csv"
    w = sw._Writer(out, s.columns())
    row = sw._base_row(s.points()[0][0])
    w.write(row)
    w.close()
    with open(out, "a") as f:
        f.write("abc,16x16,20")  # killed mid-write
    header, rows = sw.read_results(out)
    assert header == s.columns() and [r["key"] for r in rows] == [row["key"]]
    sw._Writer(out, s.columns()).close()  # reopening drops the torn line
    assert out.read_text().endswith("\n") and out.read_text().count("\n") == 2


def test_pareto_front():
    rows = [dict(key=k, cores=c, tokens_per_s=t, error=None)
            for k, c, t in (("a", 256, 10.0), ("b", 256, 12.0), ("c", 1024, 11.0),
                            ("d", 1024, 20.0), ("e", 4096, 19.0))]
    rows.append(dict(key="f", cores=16, tokens_per_s=None, error="does not fit"))
    assert [r["key"] for r in sw.pareto_front(rows)] == ["b", "d"]


# ---- through a real dask scheduler ---------------------------------------------------------

def test_sweep_on_dask_records_rows_and_resumes_without_recomputing(tmp_path, scheduler):
    s = sw.load_sweep(write(tmp_path, SMALL))
    out = tmp_path / "results.csv"
    first = sw.run_sweep(s, out, scheduler=scheduler, limit=3)
    assert (first.points, first.unique, first.duplicates) == (12, 8, 4)
    assert (first.computed, first.skipped, first.remaining) == (3, 0, 5)
    assert first.workers == 2 and first.scheduler == scheduler and len(first.warm_s) == 2
    _, rows = sw.read_results(out)
    assert len(rows) == 3

    second = sw.run_sweep(s, out, scheduler=scheduler)  # resumes: only the 5 left
    assert (second.computed, second.skipped, second.remaining) == (5, 3, 0)
    assert first.failed + second.failed == 2
    third = sw.run_sweep(s, out, scheduler=scheduler)
    assert (third.computed, third.skipped) == (0, 8)

    header, rows = sw.read_results(out)
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 8
    assert header[:5] == ["key", "mesh", "sram_bytes", "link_bytes_per_cycle", "cores"]
    failed = [r for r in rows if r["error"]]
    assert len(failed) == 2 and all(r["sram_bytes"] == 2048 and r["mesh"] == "16x16"
                                    and r["fits"] is False for r in failed)
    assert all("KB" in r["error"] for r in failed)  # the compiler's one-line reason
    ok = [r for r in rows if not r["error"]]
    for r in ok:
        assert r["fits"] is True and r["tokens_per_s"] > 0 and r["model"] == "tiny-llama"
        assert r["cores"] == {"16x16": 256, "32x32": 1024}[r["mesh"]]
        assert r["system"] == f"wse2[{r['mesh']}]" and r["ctx"] == 32
        assert r["point_wall_s"] > 0 and r["events"] > 0
    # two worker processes ran all the points: kernels loaded once per process, not per point
    assert 1 <= len({r["worker"] for r in rows}) <= 2
    # faster links never slow a point down
    by = {(r["mesh"], r["sram_bytes"], r["link_bytes_per_cycle"]): r["tokens_per_s"] for r in ok}
    for (mesh, sram, link), tps in by.items():
        if link == 4.0:
            assert by[(mesh, sram, 8.0)] >= tps

    retry = sw.run_sweep(s, out, scheduler=scheduler, retry_failed=True)
    assert (retry.computed, retry.failed) == (2, 2)
    assert len(sw.read_results(out)[1]) == 8  # the retried rows replace the old ones

    other = write(tmp_path, SMALL.replace("[axes]", "[axes]\nbatch = [1]"), "other.toml")
    with pytest.raises(sw.SweepError, match="another sweep"):
        sw.run_sweep(sw.load_sweep(other), out, scheduler=scheduler)


def test_cli_sweep_json_and_plot(tmp_path, scheduler):
    path = write(tmp_path, SMALL)
    out, plot = tmp_path / "r.csv", tmp_path / "pareto.png"
    res = runner.invoke(app, ["sweep", str(path), "--scheduler", scheduler, "-o", str(out),
                              "--plot", str(plot), "--pareto-x", "sram_bytes", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # one JSON object, nothing else on stdout
    for key in ("out", "points", "unique", "duplicates", "skipped", "computed", "failed",
                "remaining", "wall_s", "scheduler", "workers", "rows", "failed_total", "plot",
                "pareto_x", "pareto_y", "pareto"):
        assert key in data, key
    assert (data["points"], data["computed"], data["failed"], data["rows"]) == (12, 8, 2, 8)
    assert data["pareto_x"] == "sram_bytes" and data["pareto"]
    # 2 KB per core holds tiny-llama on 32x32 cores only: the cheapest point of the front
    assert data["pareto"][0]["sram_bytes"] == 2048 and data["pareto"][0]["mesh"] == "32x32"
    assert plot.stat().st_size > 0 and out.exists()


def test_cli_sweep_refuses_bad_input_with_exit_2(tmp_path):
    bad = write(tmp_path, '[base]\nmodel = "tiny-llama"\n[axes]\nsram_bytes = []')
    res = runner.invoke(app, ["sweep", str(bad)])
    assert res.exit_code == 2
    assert res.output.strip() == "error: axis sram_bytes: no values (an axis needs at least one)"
    good = write(tmp_path, SMALL, "good.toml")
    res = runner.invoke(app, ["sweep", str(good), "--pareto-x", "colour"])
    assert res.exit_code == 2 and "--pareto-x 'colour'" in res.output
