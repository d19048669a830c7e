"""wafersim.viz figures, wafersim.trace timelines and the `plot` / `simulate --trace` CLI."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compiler.layout import save_layout
from compiler.model import compile_model
from compiler.program import RECV
from compiler.targets import load_target
from models import build_graph, load_model
from wafersim import viz
from wafersim.cli import app
from wafersim.simulate import simulate
from wafersim.trace import core_timelines, trace_events
from wafersim.whole import simulate_layout

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tgt = load_target("test16x16")
    compiled = compile_model(build_graph(load_model("tiny-llama"), "decode", ctx_len=64), tgt)
    path = str(tmp_path_factory.mktemp("viz") / "tiny.wsl")
    save_layout(compiled.code, path, **compiled.info())
    return compiled, tgt, path, simulate(compiled.program, tgt)


def _png(fig, path):
    viz.save(fig, str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_block_reduce_closed_form():
    a = np.arange(12.0).reshape(3, 4)  # f = 2: blocks [[0,1,4,5],[2,3,6,7],[8,9],[10,11]]
    out, f = viz.block_reduce(a, max_side=2)
    assert f == 2 and out.shape == (2, 2)
    assert np.allclose(out, [[2.5, 4.5], [8.5, 10.5]])  # ragged last row: NaN padding ignored
    mx, _ = viz.block_reduce(a, max_side=2, how="max")
    assert np.allclose(mx, [[5, 7], [9, 11]])
    big = np.arange(994 * 750, dtype=float).reshape(750, 994)  # full WSE-2 mesh shape
    out, f = viz.block_reduce(big, max_side=100)
    assert f == 10 and out.shape == (75, 100)
    # block (i, j) of 10x10 cells with value 994 r + c: mean 994 (10 i + 4.5) + 10 j + 4.5
    i, j = np.mgrid[0:75, 0:99]
    assert np.allclose(out[:, :99], 994 * (10 * i + 4.5) + 10 * j + 4.5)
    assert np.allclose(out[:, 99], 994 * (10 * np.arange(75) + 4.5) + 990 + 1.5)  # 4 columns
    nan = np.full((4, 4), np.nan)
    nan[0, 0] = 1.0
    out, _ = viz.block_reduce(nan, max_side=2)
    assert out[0, 0] == 1.0 and np.isnan(out[1, 1])
    with pytest.raises(ValueError):
        viz.block_reduce(a, 2, how="median")


def test_mesh_maps_render(tiny, tmp_path):
    compiled, tgt, path, res = tiny
    hor, ver = viz.link_fractions(res)
    assert hor.shape == (res.height, res.width) and 0 < hor.max() <= 1 and ver.max() > 0
    _png(viz.util_map(res), tmp_path / "util.png")
    _png(viz.traffic_map(res), tmp_path / "traffic.png")
    _png(viz.traffic_map(res, reduce="sum", split=False), tmp_path / "traffic1.png")
    _png(viz.placement_map(compiled.info(), tgt.width, tgt.height), tmp_path / "place.png")
    _png(viz.memory_map(compiled.program, tgt), tmp_path / "mem.png")
    _png(viz.util_map(res, max_side=5), tmp_path / "util5.png")  # aggregated path


def test_timeline_replay_matches_the_engine(tiny, tmp_path):
    compiled, tgt, _, res = tiny
    program = compiled.program
    tl = core_timelines(program, tgt, max_cores=16)  # raises if a replay disagrees
    assert tl.loop_capped == program.looped
    assert len(tl.cores) == 16 and len({c.core for c in tl.cores}) == 16
    for ct in tl.cores:
        assert np.all(np.diff(ct.start) >= 0) and np.all(ct.end >= ct.start)
        assert np.all(ct.wait[ct.kind != RECV] == 0)
        assert np.all(ct.start[1:] - ct.wait[1:] == ct.end[:-1])  # back to back
    one = core_timelines(program, tgt, cores=[int(np.argmax(res.core_busy))])
    assert len(one.cores) == 1
    with pytest.raises(ValueError):
        core_timelines(program, tgt, cores=[10**6])
    _png(viz.timeline(program, tgt, max_cores=4), tmp_path / "time.png")


def test_trace_structure(tiny):
    compiled, tgt, _, _ = tiny
    tl = core_timelines(compiled.program, tgt, max_cores=8)
    trace = json.loads(json.dumps(trace_events(tl)))
    ev = trace["traceEvents"]
    xs = [e for e in ev if e["ph"] == "X"]
    assert xs and all(e["ph"] in ("X", "M") for e in ev)
    assert {e["name"] for e in xs} <= {"compute", "send", "recv", "wait"}
    for e in xs:
        assert {"ts", "dur", "pid", "tid"} <= set(e) and e["dur"] >= 0 and e["ts"] >= 0
    assert {e["tid"] for e in xs} == set(trace["otherData"]["cores"])
    span_us = tl.makespan_cycles / tgt.clock_hz * 1e6
    assert max(e["ts"] + e["dur"] for e in xs) <= span_us * (1 + 1e-9)
    small = trace_events(tl, max_events=80)  # bounded: 10 events per core
    assert small["otherData"]["truncated"]
    assert sum(e["ph"] == "X" for e in small["traceEvents"]) <= 80 + 8


def test_compare_bars(tiny, tmp_path):
    compiled, tgt, _, _ = tiny
    wafer = simulate_layout(compiled.program, tgt, compiled.info())
    gpu = {"system": "1xH100", "tokens_per_s": 900.0, "tpot_ms": 1.1, "busy_fraction": 0.3}
    _png(viz.compare_bars(wafer, gpu), tmp_path / "cmp.png")


def test_roofline_puts_each_op_at_its_bound(tiny, tmp_path):
    from wafersim.baseline.gpus import GPUS

    compiled, tgt, _, res = tiny
    graph = build_graph(load_model("tiny-llama"), "decode", ctx_len=64)
    ops = [d["op"] for _, d in graph.nodes(data=True) if d["op"].layer in (-1, 0)]
    gpu = GPUS["a100"]
    fig = viz.roofline(ops, tgt, "fp32", gpu, (1.0, res.flops / res.makespan_s))
    wafer, gpus, star = fig.axes[0].collections
    (a, bound), op = wafer.get_offsets()[0], next(o for o in ops if o.flops and o.bytes)
    assert a == pytest.approx(op.flops / op.bytes)
    peak, bw = tgt.peak_flops("fp32"), tgt.sram_bytes_per_cycle * tgt.cores * tgt.clock_hz
    assert bound == pytest.approx(min(peak, a * bw))
    assert gpus.get_offsets()[0][1] == pytest.approx(min(gpu.peak_flops["fp32"],
                                                         a * gpu.hbm_bw_Bps))
    assert len(wafer.get_offsets()) == sum(1 for o in ops if o.flops and o.bytes)
    assert star.get_offsets()[0][1] < bound  # the simulated step is below its ops' bounds
    _png(fig, tmp_path / "roofline.png")


def test_cli_plot_and_trace(tiny, tmp_path):
    _, _, path, _ = tiny
    for kind in ("util", "traffic", "placement", "memory", "time", "roofline"):
        png = tmp_path / f"{kind}.png"
        out = runner.invoke(app, ["plot", path, "--kind", kind, "-o", str(png),
                                  "--layers", "one"])
        assert out.exit_code == 0, out.output
        assert png.stat().st_size > 1000
    out = runner.invoke(app, ["plot", path, "--kind", "bogus", "-o", str(tmp_path / "x.png")])
    assert out.exit_code == 2 and "bogus" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
    trace = tmp_path / "trace.json"
    out = runner.invoke(app, ["simulate", path, "--trace", str(trace), "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert summary["trace"] == str(trace) and summary["trace_cores"] <= 64
    ev = json.loads(trace.read_text())["traceEvents"]
    assert isinstance(ev, list) and any(e["ph"] == "X" for e in ev)
