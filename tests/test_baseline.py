"""Tests for wafersim.baseline: closed forms (one GEMV, ring all-reduce, a whole single-GPU
step), accounting invariants (busy + idle == makespan, bytes sent == bytes received), the
split solver's memory bound, and one-line refusals of bad cluster specs."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
from wafersim.baseline import (
    GPUS,
    LINKS,
    ClusterError,
    ClusterSpec,
    LinkSpec,
    Node,
    SplitError,
    allgather,
    costs,
    get_gpu,
    parse_cluster,
    ring_allreduce,
    send_recv,
    simulate_cluster,
    solve_split,
    tree_allreduce,
    wan,
)
from wafersim.baseline.simulate import LINK_CLASSES

ROOT = Path(__file__).resolve().parents[1]
DESIGN_KEYS = ("system", "model", "phase", "batch", "ctx", "fits", "makespan_s", "tokens_per_s",
               "tpot_ms", "ttft_ms", "busy_fraction", "idle_fraction", "onchip_bytes",
               "offchip_bytes")


def graph(name="llama3-8b", phase="decode", batch=1, ctx_len=None, seq_len=None):
    """A decode step attending to 512 tokens by default, or a prefill from an empty cache."""
    cfg = models.load_model(name)
    if phase == "decode":
        return models.build_graph(cfg, "decode", batch=batch,
                                  ctx_len=511 if ctx_len is None else ctx_len)
    return models.build_graph(cfg, "prefill", batch=batch, seq_len=seq_len, ctx_len=ctx_len)


# --------------------------------------------------------------------------- closed forms
def test_one_gemv_is_bytes_over_bandwidth_plus_overheads():
    h100 = get_gpu("H100")
    k, n = 4096, 14336
    nbytes = 2 * (k * n + k + n)
    t = costs.kernel_time_s(2 * k * n, nbytes, "gemv", "bf16", h100)
    expect = nbytes / (3.35e12 * h100.achievable_bw_frac) + (
        h100.graph_kernel_overhead_s + h100.matmul_overhead_s)
    assert t == pytest.approx(expect, rel=1e-12)


def test_compute_bound_gemm_is_flops_over_rate_plus_overheads():
    h100 = get_gpu("H100")
    flops, nbytes = 2 * 8192**3, 3 * 2 * 8192**2
    t = costs.kernel_time_s(flops, nbytes, "gemm", "bf16", h100)
    expect = flops / (989e12 * h100.achievable_flops_frac) + (
        h100.graph_kernel_overhead_s + h100.matmul_overhead_s)
    assert t == pytest.approx(expect, rel=1e-12)


def test_eager_kernel_takes_at_least_the_launch_time():
    h100 = get_gpu("H100")
    assert costs.kernel_time_s(1, 1, "add", "bf16", h100, cuda_graphs=False) == (
        h100.kernel_overhead_s)


def test_single_gpu_decode_step_is_the_sum_of_its_op_rooflines():
    g = graph("llama3-8b", batch=8, ctx_len=1000)
    gpu = get_gpu("H200")
    expect = 0.0
    for _, op in g.nodes(data="op"):
        t = max(op.flops / (989e12 * gpu.achievable_flops_frac),
                op.bytes / (4.8e12 * gpu.achievable_bw_frac))
        t += gpu.graph_kernel_overhead_s
        if op.kind in ("gemv", "gemm", "lm_head", "attn_score", "attn_value"):
            t += gpu.matmul_overhead_s
        expect += t
    r = simulate_cluster(g, parse_cluster("1xH200"))
    assert r.makespan_s == pytest.approx(expect, rel=1e-9)
    assert r.summary()["onchip_bytes"] == pytest.approx(
        sum(op.bytes for _, op in g.nodes(data="op")), rel=1e-9)
    assert r.busy_ps == (r.makespan_ps,) and r.idle_ps == (0,)
    assert r.tpot_ms == pytest.approx(1e3 * expect, rel=1e-9) and r.ttft_ms is None
    assert r.tokens_per_s == pytest.approx(8 / expect, rel=1e-9)


def test_ring_allreduce_closed_form():
    link = LinkSpec("x", bw_Bps=450e9, latency_s=2e-6)
    for n in (2, 4, 8):
        nbytes = 3 * 2**20
        c = ring_allreduce(nbytes, n, link)
        assert c.time_s == pytest.approx(2 * (n - 1) / n * nbytes / 450e9 + 2 * (n - 1) * 2e-6)
        assert c.sent_per_gpu == pytest.approx((2 * (n - 1) / n * nbytes,) * n)
    assert ring_allreduce(1000, 1, link).time_s == 0.0


def test_tree_allgather_and_send_recv_closed_forms():
    link = LinkSpec("x", bw_Bps=100.0, latency_s=1.0)
    assert tree_allreduce(400, 8, link).time_s == pytest.approx(2 * 3 * (1 + 4))
    assert tree_allreduce(400, 8, link).total_bytes == pytest.approx(2 * 7 * 400)
    assert allgather(400, 4, link).time_s == pytest.approx(3 / 4 * 4 + 3)
    assert send_recv(400, link).time_s == pytest.approx(5.0)


def test_wan_latency_grows_with_distance():
    assert wan(100).latency_s == pytest.approx(0.5e-3)
    assert wan(1000).latency_s == pytest.approx(5e-3)
    assert wan(1000, gbit_per_s=400).bw_Bps == pytest.approx(50e9)


# --------------------------------------------------------------------------- invariants
SPECS = ["1xH100", "8xA100", "4xA100+4xH20", "dp2:2x(4xH100)",
         "2x(8xH100)@dc1+1x(8x910B)@dc2;dc1-dc2=1000km", "1xH20+2xH100+1xA100"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_busy_plus_idle_is_makespan_and_bytes_balance(spec, phase):
    g = graph("llama3-8b", phase, batch=4, ctx_len=300 if phase == "decode" else 0,
              seq_len=None if phase == "decode" else 128)
    r = simulate_cluster(g, parse_cluster(spec), microbatches=2)
    assert len(r.gpus) == parse_cluster(spec).n_gpus
    for b, i in zip(r.busy_ps, r.idle_ps, strict=True):
        assert isinstance(b, int) and isinstance(i, int)
        assert b + i == r.makespan_ps and b > 0 and i >= 0
    for c in LINK_CLASSES:
        assert sum(r.sent_bytes[c]) == sum(r.recv_bytes[c])
    s = r.summary()
    assert s["offchip_bytes"] == sum(sum(r.sent_bytes[c]) for c in LINK_CLASSES)
    assert s["busy_fraction"] + s["idle_fraction"] == pytest.approx(1.0)


def test_pipeline_hop_bytes_leave_one_stage_and_arrive_at_the_next():
    cluster = parse_cluster("2xH100+1xA100")
    r = simulate_cluster(graph(batch=2), cluster)
    sent, recv = r.sent_bytes["internode"], r.recv_bytes["internode"]
    # stage 0 = GPUs 0-1, stage 1 = GPU 2: only the first pair talks (min(tp) pairs).
    hidden = 2 * 4096 * 2
    assert sent == (hidden, 0, 0) and recv == (0, 0, hidden)


def test_tensor_parallel_all_reduces_twice_per_layer_over_nvlink():
    g = graph(batch=1)
    r = simulate_cluster(g, parse_cluster("8xH100"), allreduce_algorithm="ring")
    one = ring_allreduce(4096 * 2, 8, LINKS["nvlink4"])
    per_gpu = 32 * 2 * one.sent_per_gpu[0] + allgather(8, 8, LINKS["nvlink4"]).sent_per_gpu[0]
    assert r.sent_bytes["nvlink"] == pytest.approx((per_gpu,) * 8, abs=8)
    assert r.tpot_ms < simulate_cluster(g, parse_cluster("1xH100")).tpot_ms
    assert r.summary()["internode_bytes"] == 0


def test_summary_has_the_design_keys_and_is_json():
    r = simulate_cluster(graph("llama3-8b", "prefill", seq_len=256), parse_cluster("1xH100"))
    s = r.summary()
    assert all(k in s for k in DESIGN_KEYS)
    assert s["tpot_ms"] is None and s["ttft_ms"] == pytest.approx(1e3 * s["makespan_s"])
    assert s["energy_j"] == pytest.approx(700 * s["makespan_s"])
    json.dumps(s)


def test_mixed_gpus_get_layers_in_proportion_to_speed():
    r = simulate_cluster(graph(batch=8), parse_cluster("1xA100+1xH200"))
    a100, h200 = r.stage_layers
    assert a100 + h200 == 32 and h200 > a100 >= 1


def test_datacenter_hop_pays_the_wan_latency():
    near = simulate_cluster(graph(), parse_cluster("1xH100@a+1xH100@b;a-b=10km"))
    far = simulate_cluster(graph(), parse_cluster("1xH100@a+1xH100@b;a-b=1000km"))
    assert far.makespan_s - near.makespan_s == pytest.approx(990 * 5e-6, rel=1e-3)
    assert far.summary()["interdc_bytes"] == 4096 * 2


def test_flash_prefill_charges_the_causal_half_in_one_kernel():
    g = graph("llama3-8b", "prefill", seq_len=2048)
    plan = costs.plan(g, flash_prefill=True)
    kinds = [w.kind for w in plan.layers[0]]
    assert "flash_attention" in kinds and "softmax" not in kinds
    full = costs.plan(g, flash_prefill=False)
    attn = sum(w.flops for w in full.layers[0] if w.kind in ("attn_score", "attn_value"))
    flash = next(w for w in plan.layers[0] if w.kind == "flash_attention")
    assert flash.flops == pytest.approx(attn * (2049 / 2) / 2048)
    cached = costs.plan(graph("llama3-8b", "prefill", seq_len=1024, ctx_len=1024), True)
    rect = 4 * 1024 * 2048 * 128 * 32  # score + value over the full rectangle
    attended = 4 * (1024 * 1024 + 1024 * 1025 / 2) * 128 * 32
    flash = next(w for w in cached.layers[0] if w.kind == "flash_attention")
    assert flash.flops == pytest.approx(attended) and flash.flops < rect


# --------------------------------------------------------------------------- memory and split
def test_fits_flag_and_capacity_limits():
    ok = simulate_cluster(graph("llama2-13b", batch=32, ctx_len=2047), parse_cluster("1xH100"))
    assert ok.fits and ok.max_batch >= 32 and ok.max_ctx >= 2048
    big = simulate_cluster(graph("llama3-70b", batch=1), parse_cluster("1xH100"))
    assert not big.fits and big.max_batch == 0 and big.makespan_s > 0
    assert "does not fit 1xH100" in big.reason and "\n" not in big.reason


def test_split_solver_refuses_clearly_when_nothing_fits():
    with pytest.raises(SplitError, match=r"^llama3-70b at batch 1, ctx 512 does not fit") as e:
        solve_split(graph("llama3-70b"), parse_cluster("1xA100"))
    assert "\n" not in str(e.value)
    with pytest.raises(SplitError, match="fewer than the 3 pipeline stages"):
        solve_split(graph("tiny-llama"), parse_cluster("1xH100+1xH100+1xH100"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gpus=st.lists(st.sampled_from(sorted(GPUS)), min_size=1, max_size=4),
    tps=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=4, max_size=4),
    hbm_gb=st.lists(st.floats(0.5, 40.0), min_size=4, max_size=4),
    batch=st.sampled_from([1, 4, 16, 64]),
    ctx=st.sampled_from([128, 2048, 8192]),
    model=st.sampled_from(["llama3-8b", "llama2-13b"]),
)
def test_split_never_exceeds_memory(gpus, tps, hbm_gb, batch, ctx, model):
    nodes = tuple(Node(replace(get_gpu(name), hbm_bytes=hbm * 1e9), tp)
                  for name, tp, hbm in zip(gpus, tps, hbm_gb, strict=False))
    cluster = ClusterSpec("+".join(f"{n.n_gpus}x{n.gpu.name}" for n in nodes), nodes)
    g = graph(model, batch=batch, ctx_len=ctx)
    try:
        split = solve_split(g, cluster)
    except SplitError as e:
        assert "\n" not in str(e) and "does not fit" in str(e)
        return
    assert sum(split.layers) == g.graph["cfg"].num_hidden_layers and min(split.layers) >= 1
    for need, cap in zip(split.mem_per_gpu, split.capacity, strict=True):
        assert need <= cap
    # and the independent count: weights + KV of the stage's layers fit on each GPU
    cfg = g.graph["cfg"]
    for node, n_layers, cap in zip(nodes, split.layers, split.capacity, strict=True):
        tp = node.n_gpus
        kv = 2 * batch * (ctx + 1) * math.ceil(cfg.num_key_value_heads / tp) * cfg.head_dim * 2
        assert n_layers * kv <= cap


# --------------------------------------------------------------------------- cluster specs
def test_good_specs_parse():
    c = parse_cluster("2x(8xH100)@dc1+1x(8x910B)@dc2;dc1-dc2=1000km")
    assert [(n.gpu.name, n.n_gpus, n.datacenter) for n in c.nodes] == [
        ("H100", 8, "dc1"), ("H100", 8, "dc1"), ("910B", 8, "dc2")]
    assert c.hop(0)[0] == "internode" and c.hop(1)[0] == "interdc"
    assert parse_cluster(" 4 x a100 + 4xH20 ").name == "4xA100+4xH20"
    assert parse_cluster("dp2:8xH100").n_gpus == 16
    assert parse_cluster("1xH100").nodes[0].gpu is get_gpu("h100")


@pytest.mark.parametrize("spec, token", [
    ("9xFOO", "'9xFOO'"),
    ("0xH100", "'0xH100'"),
    ("2x(0xH100)", "'2x(0xH100)'"),
    ("2x(8xH100)@dc1+1x(8x910B)@dc2", "dc1 and dc2"),
    ("16xH100", "'16xH100'"),
    ("8xH100@a+8xH100", "'8xH100'"),
    ("8xH100+", "empty group"),
    ("8H100", "'8H100'"),
    ("dp0:8xH100", "'dp0:'"),
    ("8xH100@a+8xH100@b;a-b=warp", "'a-b=warp'"),
    ("", "empty"),
])
def test_bad_specs_are_refused_in_one_line(spec, token):
    with pytest.raises(ClusterError) as e:
        parse_cluster(spec)
    msg = str(e.value)
    assert "\n" not in msg and token in msg
    assert isinstance(e.value, ValueError)


# --------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("fname, gpu, peak_bw", [("h100.jsonl", "H100", 3.35e12),
                                                 ("h200.jsonl", "H200", 4.8e12)])
def test_presets_hold_the_calibrated_constants(fname, gpu, peak_bw):
    import importlib.util
    spec = importlib.util.spec_from_file_location("calibrate",
                                                  ROOT / "benchmarks/gpu/calibrate.py")
    cal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cal)
    fit = cal.calibrate(cal.load(ROOT / "benchmarks/gpu/results" / fname), peak_bw, 989e12)
    g = get_gpu(gpu)
    for key in ("achievable_bw_frac", "achievable_flops_frac", "graph_kernel_overhead_s",
                "matmul_overhead_s", "kernel_overhead_s"):
        assert getattr(g, key) == pytest.approx(fit[key], rel=0.01), key
    assert g.calibration.endswith(fname)
