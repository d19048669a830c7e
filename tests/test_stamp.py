"""Stamped programs: the parts give the same checks, layout and simulation as the expansion.

(That the expansion computes the model is tests/test_model.py's reference check, which runs
stamped placements of one, two and six regions.)"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from compiler.layout import load_code, load_layout, save_layout
from compiler.model import CompileOptions, compile_model
from compiler.program import MeshProgram, ProgramError
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
    timing = compiled.timing_program()
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
