"""Stamped programs: the parts give the same checks, layout and simulation as the expansion.

(That the expansion computes the model is tests/test_model.py's reference check, which runs
stamped placements of one, two and six regions.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compiler.layout import load_code, load_layout, save_layout
from compiler.model import CompileOptions, compile_model
from compiler.program import SEND, MeshProgram, ProgramError
from compiler.stamp import Stamped
from compiler.targets import load_target
from models.config import load_model
from models.graph import build_graph
from wafersim.functional import execute
from wafersim.simulate import simulate

CFG = dataclasses.replace(load_model("tiny-llama"), num_hidden_layers=5)
MESH = load_target("wse2").with_mesh(16, 12)


@pytest.fixture(scope="module")
def compiled():
    c = compile_model(build_graph(CFG, "decode", batch=2, ctx_len=9), MESH,
                      CompileOptions(region=(4, 5)))
    assert isinstance(c.code, Stamped) and c.code.copies > 2
    return c


def test_checks_from_the_parts_equal_those_of_the_expansion(compiled):
    code, prog = compiled.code, compiled.program
    np.testing.assert_array_equal(code.sram_per_core(), prog.sram_per_core())
    np.testing.assert_array_equal(code.colours_per_core(), prog.colours_per_core())
    assert code.n_instructions == prog.n_instructions
    assert code.n_messages == prog.n_messages
    # Every core of a copy runs the body's instructions inside its loop, the glue outside.
    body = np.diff(code.body.core_ptr)
    inside = prog.loop_end - prog.loop_start
    assert inside.sum() == code.copies * body.sum()
    assert np.all(prog.loop_start >= prog.core_ptr[:-1])
    assert np.all(prog.loop_end <= prog.core_ptr[1:])


def test_layout_stores_the_parts_and_loads_the_expansion(compiled, tmp_path):
    path = tmp_path / "m.wsl"
    save_layout(compiled.code, path, **compiled.info())
    back, info = load_layout(path)
    prog = compiled.program
    for f in dataclasses.fields(MeshProgram):
        a, b = getattr(prog, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=f.name)
            assert a.dtype == b.dtype
        else:
            assert a == b, f.name
    code, _ = load_code(path)
    assert isinstance(code, Stamped) and code.copies == compiled.code.copies
    assert info["phase"] == "decode"


def test_timing_only_simulates_alike_and_refuses_functional_use(compiled):
    timing = compiled.code.expand(True)
    assert len(timing.buf_core) == 0 and len(timing.ins_a) == 0
    full, fast = simulate(compiled.program, MESH), simulate(timing, MESH)
    assert fast.makespan_cycles == full.makespan_cycles and fast.events == full.events
    np.testing.assert_array_equal(fast.core_busy, full.core_busy)
    np.testing.assert_array_equal(fast.link_bytes, full.link_bytes)
    assert fast.sram_bytes == full.sram_bytes > 0
    with pytest.raises(ProgramError, match="timing only"):
        execute(timing, {})
    with pytest.raises(ProgramError, match="timing only"):
        timing.sram_per_core()


def _same_run(a, b) -> None:
    assert (a.makespan_cycles, a.events, a.messages, a.hops, a.flops, a.sram_bytes) == (
        b.makespan_cycles, b.events, b.messages, b.hops, b.flops, b.sram_bytes)
    for f in ("core_busy", "core_overhead", "core_wait", "core_active", "link_bytes",
              "link_busy"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


@pytest.mark.parametrize("case", ["decode", "unequal-layers", "prefill-short", "prefill-long"])
@pytest.mark.parametrize("threads", [1, 3])
def test_the_parts_simulate_as_their_expansion(case, threads, request):
    """simulate() encodes a stamped program from its parts (the body's words copied into every
    region, their slots, route entries, multicast table and links moved) and tallies it copy
    by copy: the same run, to the cycle, and the same totals as its expansion. Cases: regions
    of one layer each; regions of 2, 4 and 4 layers (loops); both bodies of a sampled
    prefill."""
    if case == "decode":
        code = request.getfixturevalue("compiled").code
    elif case == "unequal-layers":
        cfg = dataclasses.replace(CFG, num_hidden_layers=10)
        code = compile_model(build_graph(cfg, "decode", batch=2, ctx_len=9), MESH,
                             CompileOptions(region=(4, 16))).code
        assert {2, 4} <= set(code.loop_count.tolist())
    else:
        code = request.getfixturevalue("sampled").code.with_body(case == "prefill-short")
    assert code.body.msg_multicast.any() and code.glue.msg_multicast.any()
    _same_run(simulate(code, MESH, threads=threads), simulate(code.expand(True), MESH))


def test_a_bad_instruction_in_the_parts_is_named_in_one_line(compiled):
    from wafersim.result import SimulationError

    code = compiled.code
    arg = code.body.ins_arg.copy()
    arg[np.flatnonzero(code.body.ins_kind == SEND)[0]] = code.body.n_messages  # no such message
    bad = dataclasses.replace(code, body=dataclasses.replace(code.body, ins_arg=arg))
    with pytest.raises(SimulationError, match="of the stamped program's layer body cannot be "
                       "simulated: it names an unknown message") as err:
        simulate(bad, MESH)
    assert "\n" not in str(err.value)


def test_ports_bound_to_buffers_of_another_shape_are_refused(compiled):
    code = compiled.code
    bind = code.bind.copy()
    bind[1] = bind[1][::-1]  # ports bound to another core's buffers
    with pytest.raises(ProgramError, match="binds its ports"):
        dataclasses.replace(code, bind=bind).expand()


def test_order_check_finds_a_cycle_of_waits_and_an_unsent_message():
    from compiler.program import ProgramBuilder

    bld = ProgramBuilder(2, 1, "fp32")
    a, b = bld.buffers([0, 1], 1, 1)
    m = bld.messages([0, 1], [1, 0], 4, 0)
    bld.recv(0, 0, m[1], a)  # core 0 waits for core 1, which waits for core 0
    bld.send(0, 1, m[0], a)
    bld.recv(1, 0, m[0], b)
    bld.send(1, 1, m[1], b)
    with pytest.raises(ProgramError, match=r"can deadlock: core \(0,0\) waits forever at its "
                                           r"instruction 0 \(recv\)"):
        bld.build().check_order()
    bld = ProgramBuilder(2, 1, "fp32")
    a, b = bld.buffers([0, 1], 1, 1)
    m = bld.messages([0], [1], 4, 0)
    bld.recv(1, 0, m[0], b)  # nobody sends it
    with pytest.raises(ProgramError, match=r"core \(1,0\)"):
        bld.build().check_order()


def test_compiled_models_pass_the_order_check(compiled):
    compiled.program.check_order()
    compiled.code.check(MESH)


def _two_copies(cycle: bool) -> Stamped:
    """A body on cores 0-1 (0 sends to 1) stamped onto cores 2-3; glue hands over from core 1
    (after its body) to core 2 (before its body), and with `cycle` from core 3 (after) back to
    core 0 (before), which closes a cycle of waits through both bodies."""
    from compiler.program import ProgramBuilder

    body = ProgramBuilder(4, 1, "fp32")
    x = body.buffers([0, 1], 1, 1)
    m = body.messages(0, 1, 4, 0)
    body.send(0, 5, m, x[0])
    body.recv(1, 5, m, x[1])
    glue = ProgramBuilder(4, 1, "fp32")
    y = glue.buffers([0, 1, 2, 3], 1, 1)
    hand = glue.messages(1, 2, 4, 1)
    glue.send(1, 20, hand, y[1])
    glue.recv(2, 0, hand, y[2])
    if cycle:
        back = glue.messages(3, 0, 4, 2)
        glue.send(3, 20, back, y[3])
        glue.recv(0, 0, back, y[0])
    g = glue.build(loop=(5, 10, np.ones(4, np.int64), np.zeros(4, np.int64)))
    return Stamped(g, body.build(), 0, np.array([0, 2]), np.zeros((2, 0), np.int32),
                   g.loop_count, g.loop_base)


@pytest.mark.parametrize("cycle", [False, True])
def test_the_parts_order_check_agrees_with_the_expansions(cycle):
    code = _two_copies(cycle)
    if not cycle:
        code.check_order()
        code.expand().check_order()
        return
    with pytest.raises(ProgramError, match="can deadlock"):
        code.check_order()
    with pytest.raises(ProgramError, match="can deadlock"):
        code.expand().check_order()


@pytest.mark.parametrize("layers", [7, 10])
def test_one_layer_mode_equals_every_layer_when_regions_hold_unequal_counts(layers):
    """[1, 3, 3] and [2, 4, 4] layers: the second run grows only the regions holding two or
    more layers, and `one` must divide by those (it once divided by every region)."""
    from wafersim.whole import simulate_layout

    cfg = dataclasses.replace(CFG, num_hidden_layers=layers)
    c = compile_model(build_graph(cfg, "decode", batch=2, ctx_len=9), MESH,
                      CompileOptions(region=(4, 16)))
    counts = [p.count for p in c.placements]
    assert min(counts) < max(counts) and max(counts) > 2, counts
    one, every = (simulate_layout(c.code, MESH, c.info(), m) for m in ("one", "all"))
    assert one["extrapolated"] and not every["extrapolated"]
    assert one["makespan_cycles"] == every["makespan_cycles"]


# ---- prefill: stamped like decode; sampled steps for grids too large to build whole ----------

PREFILL_CFG = dataclasses.replace(CFG, num_hidden_layers=3)


def _prefill(seq: int = 7, region=(4, 4), **kw):
    return compile_model(build_graph(PREFILL_CFG, "prefill", seq_len=seq), MESH,
                         CompileOptions(region=region, **kw))


def _unstamped_prefill(c) -> MeshProgram:
    """The prefill as one builder makes it, each region's layer lowered in place (the
    lowering before stamping), from the same pieces."""
    from compiler import prefill_model as pm
    from compiler.algorithms.prefill import prefill_layer, prefill_plan
    from compiler.model import EPI, LAYER, LOOP, _carry
    from compiler.program import ProgramBuilder

    cfg, w, h = c.model, c.target.width, c.target.height
    shape = (c.ctx, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
             cfg.head_dim, cfg.intermediate_size)
    bld = ProgramBuilder(w, h, cfg.dtype)
    count, base = np.ones(w * h, np.int64), np.zeros(w * h, np.int64)
    gemm, gemv = pm.algos(c.options)
    prev = None
    for p in c.placements:
        plan = prefill_plan(p.region, w, *shape, gemm)
        x = pm._embed(bld, plan, cfg, plan.s) if p.embed else pm._handoff(bld, prev, plan, EPI)
        prev = (plan, x)
        if p.count:
            out, step = prefill_layer(bld, p.region, x, *shape, LAYER, eps=cfg.norm_eps,
                                      algo=gemm, step=LOOP)
            _carry(bld, plan.core.ravel(), out, x, step)
            count[plan.core.ravel()], base[plan.core.ravel()] = p.count, p.first
        if p.head:
            pm._head(bld, plan, cfg, x, EPI + 10, c.options.levels, gemv)
    return bld.build(loop=(LOOP, EPI, count, base))


@pytest.mark.parametrize("algo", ["meshgemm", "summa"])
def test_stamped_prefill_equals_the_unstamped_program(algo):
    """Several regions (embedding, layer regions, head): the expansion simulates and computes
    exactly as the program lowered region by region."""
    from compiler.model import pack_inputs
    from models.reference import random_weights

    c = _prefill(algo=algo)
    assert isinstance(c.code, Stamped) and c.code.copies >= 2 and not c.code.sampled
    stamped, plain = c.program, _unstamped_prefill(c)
    assert stamped.n_instructions == plain.n_instructions
    assert stamped.n_messages == plain.n_messages
    np.testing.assert_array_equal(c.code.sram_per_core(), plain.sram_per_core())
    a, b = simulate(stamped, MESH), simulate(plain, MESH)
    assert a.makespan_cycles == b.makespan_cycles and a.events == b.events
    np.testing.assert_array_equal(a.core_busy, b.core_busy)
    np.testing.assert_array_equal(a.link_bytes, b.link_bytes)
    ins = pack_inputs(c, random_weights(PREFILL_CFG, seed=2), np.array([4, 9, 200, 3, 7, 1, 60]))
    got, want = execute(stamped, ins), execute(plain, ins)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture
def sampled(monkeypatch):
    """tiny-llama prefill on 4x4 grids with sampled steps forced: (short, long) = (2, 4) of
    the grid's 4, so the long body is the whole layer."""
    from compiler import prefill_model as pm

    monkeypatch.setattr(pm, "SAMPLE_SIDE", 0)
    monkeypatch.setattr(pm, "SAMPLED_STEPS", (2, 4))
    return _prefill(seq=16)


def test_sampled_prefill_with_the_whole_loop_sampled_simulates_exactly(sampled):
    from wafersim.whole import simulate_layout

    exact = _prefill(seq=16)
    assert sampled.code.sampled and sampled.memory["steps"] == {"full": 4, "sampled": [2, 4]}
    for layers in ("all", "one"):
        got = simulate_layout(sampled.code, MESH, sampled.info(), layers)
        want = simulate_layout(exact.code, MESH, exact.info(), layers)
        assert got["steps_sampled"] == [2, 4, 4] and got["extrapolated"]
        for key in ("makespan_cycles", "flops", "messages", "onchip_bytes"):
            assert got[key] == want[key], key


def test_sampled_prefill_extrapolates_close_to_the_exact_simulation(monkeypatch):
    """Sampled (2, 3) of 8 steps on 8x8 grids: the step time within 3% of every step simulated
    (docs/validation.md measures larger grids)."""
    from compiler import prefill_model as pm
    from wafersim.whole import simulate_layout

    mesh = load_target("wse2").with_mesh(16, 8)
    graph = build_graph(PREFILL_CFG, "prefill", seq_len=24)
    exact = compile_model(graph, mesh, CompileOptions(region=(8, 8)))
    monkeypatch.setattr(pm, "SAMPLE_SIDE", 0)
    monkeypatch.setattr(pm, "SAMPLED_STEPS", (2, 3))
    fast = compile_model(graph, mesh, CompileOptions(region=(8, 8)))
    want = simulate_layout(exact.code, mesh, exact.info())["makespan_cycles"]
    got = simulate_layout(fast.code, mesh, fast.info())
    assert got["steps_sampled"] == [2, 3, 8]
    assert abs(got["makespan_cycles"] / want - 1) < 0.03
    assert got["steps_caveat"].startswith("steps 2 and 3 of 8 simulated and extrapolated")
    assert simulate_layout(exact.code, mesh, exact.info())["steps_caveat"] is None


@pytest.mark.parametrize("algo", ["meshgemm", "summa"])
def test_sampled_steps_keep_the_whole_layers_sram(algo, monkeypatch):
    """Every buffer of the layer is allocated whatever the steps run (SUMMA's weight tiles of
    rows the sampled loop never reaches too), so the SRAM check is the exact program's."""
    from compiler import prefill_model as pm

    exact = _prefill(seq=16, algo=algo)
    monkeypatch.setattr(pm, "SAMPLE_SIDE", 0)
    monkeypatch.setattr(pm, "SAMPLED_STEPS", (1, 2))
    fast = _prefill(seq=16, algo=algo)
    assert fast.code.sampled
    for key in ("sram_max_bytes", "sram_mean_bytes"):
        assert fast.memory[key] == exact.memory[key], key


def test_a_sampled_prefill_is_for_timing_only_and_keeps_both_bodies(sampled, tmp_path):
    code = sampled.code
    with pytest.raises(ProgramError, match="timing only"):
        code.expand()
    with pytest.raises(ProgramError, match="timing only"):
        code.expand(True)  # which body?
    with pytest.raises(ProgramError, match="timing only"):
        code.sram_per_core()  # the bodies keep only their ports' buffers
    assert code.expand(True, short=True).n_messages < code.expand(True, short=False).n_messages
    path = tmp_path / "p.wsl"
    save_layout(code, path, **sampled.info())
    back, info = load_code(path)
    assert back.sampled and info["memory"]["steps"]["sampled"] == [2, 4]
    for short in (True, False):
        a, b = code.expand(True, short=short), back.expand(True, short=short)
        np.testing.assert_array_equal(a.ins_kind, b.ins_kind)
        np.testing.assert_array_equal(a.msg_bytes, b.msg_bytes)
    with pytest.raises(Exception, match="sampled steps"):
        load_layout(path)
