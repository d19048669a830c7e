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
