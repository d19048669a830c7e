"""KV-cache capacity (compiler.kvcache): shift-based against concatenation, closed form and as
the compiler reports it."""

import numpy as np
import pytest

from compiler import kvcache
from compiler.model import compile_model, lower
from compiler.targets import load_target
from models import build_graph, load_model

CFG = load_model("tiny-llama")
MESH = load_target("test16x16")


def _fill(kind: str, cores: int, per_core: int, prompt: int) -> int:
    """Tokens held when the first core overflows, placing tokens one by one."""
    held = np.zeros(cores, np.int64)
    held[:] = prompt // cores
    held[:prompt % cores] += 1  # prefill's even layout, first positions one larger
    if held.max() > per_core:
        return 0
    tokens = prompt
    while True:
        if kind == "shift":  # entries shift along the line: the emptiest position takes one
            held[np.argmin(held)] += 1
        else:  # appended on the tail core
            held[-1] += 1
        if held.max() > per_core:
            return tokens
        tokens += 1


@pytest.mark.parametrize("kind", kvcache.KV_KINDS)
@pytest.mark.parametrize("cores,per_core,prompt", [(1, 5, 0), (4, 10, 0), (4, 10, 8),
                                                   (5, 7, 13), (3, 4, 12), (3, 4, 13),
                                                   (6, 0, 0)])
def test_closed_form_matches_placing_tokens_one_by_one(kind, cores, per_core, prompt):
    expected = _fill(kind, cores, per_core, prompt)
    assert kvcache.max_tokens(kind, cores, per_core, prompt) == expected
    assert kvcache.max_decode(kind, cores, per_core, prompt) == max(0, expected - prompt)


def test_closed_form_cases():
    assert kvcache.max_tokens("shift", 4, 10) == 40
    assert kvcache.max_tokens("concat", 4, 10) == 10  # one core fills, three stay empty
    assert kvcache.max_tokens("concat", 4, 10, prompt=8) == 16  # tail holds 2 of the prompt
    assert kvcache.max_decode("shift", 4, 10, prompt=41) == 0  # the prompt does not fit
    assert kvcache.max_tokens("shift", 1, 9, 3) == kvcache.max_tokens("concat", 1, 9, 3) == 9


def test_shift_holds_at_least_as_much_as_concat():
    for cores in range(1, 12):
        for per_core in range(0, 15):
            for prompt in range(0, cores * per_core + 3):
                shift = kvcache.max_decode("shift", cores, per_core, prompt)
                concat = kvcache.max_decode("concat", cores, per_core, prompt)
                assert shift >= concat >= 0
                if prompt == 0:
                    assert shift == cores * concat


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="not one of shift, concat"):
        kvcache.max_tokens("paged", 4, 4)
    with pytest.raises(ValueError, match="cores=0 must be >= 1"):
        kvcache.max_tokens("shift", 0, 4)


def test_compile_report_gives_both_capacities_and_the_shift_one_compiles():
    compiled = compile_model(build_graph(CFG, "decode", ctx_len=40), MESH)
    mem = compiled.memory
    region = compiled.placements[0].region
    assert mem["kv_cores_per_line"] == region.cols
    per_core = mem["kv_tokens_per_core"]
    assert mem["max_tokens_shift"] == per_core * region.cols == mem["max_ctx"] + 1
    assert mem["max_decode_shift"] == mem["max_tokens_shift"] - 40
    assert mem["max_tokens_concat"] == 40 + per_core - 40 // region.cols
    assert mem["max_decode_shift"] > mem["max_decode_concat"] > 0
    # the reported slots per core pass the exact SRAM check on the same placement; more do not
    placements = list(compiled.placements)
    for slots, fits in ((per_core, True), (per_core + 1, False)):
        code = lower(CFG, MESH.width, MESH.height, placements, 1, 40, slots, compiled.options)
        sram = int(code.sram_per_core().max())
        assert (sram <= MESH.sram_bytes) == fits
