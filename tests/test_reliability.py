"""Reliability: fuzzed inputs are loaded or refused cleanly, random models compute what the
reference computes and conserve what they should, results are reproducible across processes.

benchmarks/fuzz.py runs the same generators many more times and counts the outcomes
(docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from fuzzing import (
    TINY_LLAMA,
    corrupt,
    functional_case,
    mutated_config,
    random_llama,
    sends,
    small_layout,
    unicast_balance,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.layout import LayoutError, load_layout, save_layout
from compiler.program import ProgramError
from compiler.targets import load_target
from models.config import ConfigError, ModelConfig
from wafersim.simulate import simulate

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(mutated_config())
def test_config_loader_loads_or_refuses_in_one_line(d):
    try:
        cfg = ModelConfig.from_dict(d, name="config.json")
    except ConfigError as e:
        assert str(e).startswith("config.json: ") and "\n" not in str(e)
    else:
        assert cfg.hidden_size > 0 and cfg.hidden_size % cfg.num_attention_heads == 0


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_layout_loader_refuses_corruption_or_loads_the_same_program(tmp_path, data):
    program, path = small_layout(tmp_path)
    raw = path.read_bytes()
    bad = tmp_path / "bad.wsl"
    bad.write_bytes(corrupt(raw, data.draw))
    try:
        back, _ = load_layout(bad)
    except LayoutError as e:
        assert "\n" not in str(e)
    else:  # the damage missed everything the program is made of
        assert np.array_equal(back.ins_arg, program.ins_arg)
        assert np.array_equal(back.route_link, program.route_link)


def test_an_edited_header_is_refused(tmp_path):
    program, path = small_layout(tmp_path)
    raw = path.read_bytes()
    at = raw.index(b'"width": ')  # the program's width, inside the header's JSON
    edited = raw[:at] + b'"width": 9' + raw[at + 10:]
    bad = tmp_path / "edited.wsl"
    bad.write_bytes(edited)
    with pytest.raises(LayoutError):
        load_layout(bad)


@settings(max_examples=12, deadline=None)
@given(random_llama())
def test_random_models_match_the_reference_and_conserve(case):
    """A random small LLaMA-family model on a random mesh: refused with a one-line
    ProgramError, or its decode step gives the reference's logits, and its simulation keeps
    time and messages balanced."""
    try:
        compiled, out, ref = functional_case(*case)
    except ProgramError as e:
        assert "\n" not in str(e)
        return
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-4, atol=1e-4)
    prog = compiled.program
    res = simulate(prog, case[1])
    span = res.makespan_cycles
    assert np.all(res.core_busy + res.core_overhead + res.core_wait <= span)
    assert np.all(res.link_busy <= span)
    sent, received = unicast_balance(prog)
    assert np.array_equal(sent, received)
    hops = np.diff(prog.route_ptr)
    assert res.onchip_bytes == int((prog.msg_bytes * hops * sends(prog)).sum())


DETERMINISM = """
import hashlib, json, numpy as np
from compiler.model import compile_model, CompileOptions
from compiler.targets import load_target
from models import build_graph, load_model
from wafersim.simulate import simulate
t = load_target("test16x16")
c = compile_model(build_graph(load_model("tiny-llama"), "decode", batch=2, ctx_len=20), t,
                  CompileOptions(policy="pipeline"))
r = simulate(c.program, t)
h = hashlib.sha256()
for a in (r.core_busy, r.core_overhead, r.core_wait, r.link_bytes, r.link_busy,
          c.program.ins_arg, c.program.route_link):
    h.update(np.ascontiguousarray(a).tobytes())
print(json.dumps([r.makespan_cycles, r.events, h.hexdigest()]))
"""


def test_results_are_bit_identical_across_processes():
    runs = [subprocess.run([sys.executable, "-c", DETERMINISM], check=True, text=True,
                           capture_output=True).stdout for _ in range(2)]
    assert json.loads(runs[0]) == json.loads(runs[1])


def test_layout_round_trip_of_a_random_model_simulates_alike(tmp_path):
    cfg = ModelConfig.from_dict({**TINY_LLAMA, "num_hidden_layers": 3}, "three")
    compiled, *_ = functional_case(cfg, load_target("wse2").with_mesh(12, 9), 2, 5,
                                   "pipeline", 7)
    path = tmp_path / "m.wsl"
    save_layout(compiled.code, path, **compiled.info())
    back, _ = load_layout(path)
    target = compiled.target
    assert simulate(back, target).makespan_cycles == simulate(compiled.program,
                                                               target).makespan_cycles
