"""Functional checks: every mesh algorithm, run on numpy data, returns the reference result."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler import program
from compiler.algorithms.meshgemm import GEMM_ALGOS, interleaved_ring, lower_gemm
from compiler.algorithms.meshgemv import GEMV_ALGOS, lower_gemv
from compiler.program import OP_ADD, OP_COPY, OP_ZERO, ProgramBuilder, ProgramError, link_dst
from compiler.targets import WSE2
from wafersim.functional import execute

MESHES = [(1, 1), (4, 4), (3, 5), (6, 2), (7, 9)]  # rows x cols, square and not


@pytest.mark.parametrize("algo", GEMV_ALGOS)
@pytest.mark.parametrize("rows,cols", MESHES)
@pytest.mark.parametrize("allreduce", [True, False])
def test_gemv_matches_numpy(algo, rows, cols, allreduce):
    rng = np.random.default_rng(rows * 10 + cols)
    b, k, n = 3, 41, 29  # divide evenly by none of the mesh sides
    x = rng.standard_normal((b, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    prog = lower_gemv(b, k, n, rows, cols, algo, allreduce=allreduce)
    out = execute(prog, {"x": x, "W": w})
    np.testing.assert_allclose(out["y"], x @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_ktree_levels_all_give_the_same_result(levels):
    rng = np.random.default_rng(levels)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    prog = lower_gemv(1, 64, 16, 16, 4, levels=levels)
    np.testing.assert_allclose(execute(prog, {"x": x, "W": w})["y"], x @ w, rtol=1e-5,
                               atol=1e-5)


def test_gemv_allreduce_leaves_result_on_every_core_of_a_column():
    prog = lower_gemv(1, 32, 8, 8, 4)
    holders = np.bincount(prog.buf_core[prog.buf_role == 2], minlength=prog.cores)
    assert (holders == 1).all()


@pytest.mark.parametrize("algo", GEMM_ALGOS)
@pytest.mark.parametrize("rows,cols", MESHES)
def test_gemm_matches_numpy(algo, rows, cols):
    rng = np.random.default_rng(rows * 10 + cols)
    m, k, n = 13, 29, 17
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    prog = lower_gemm(m, k, n, rows, cols, algo)
    np.testing.assert_allclose(execute(prog, {"A": a, "B": b})["C"], a @ b, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("s", range(2, 12))
def test_interleaved_ring_neighbours_are_at_most_two_hops_apart(s):
    ring = interleaved_ring(s)
    assert sorted(ring) == list(range(s))
    assert np.abs(np.diff(np.append(ring, ring[0]))).max() <= 2


def test_meshgemm_messages_travel_at_most_two_hops_but_cannon_wraps_across_the_row():
    mesh = lower_gemm(64, 64, 64, 8, 8, "meshgemm")
    cannon = lower_gemm(64, 64, 64, 8, 8, "cannon")
    assert np.diff(mesh.route_ptr).max() == 2
    assert np.diff(cannon.route_ptr).max() == 7


def test_tile_too_big_for_sram_is_refused_with_core_and_limit():
    with pytest.raises(ProgramError, match=r"needs [\d,]+ B of SRAM on core .* 49,152 B"):
        lower_gemv(1, 4096, 4096, 4, 4, target=WSE2)


def test_too_many_colours_is_refused():
    target = WSE2.with_mesh(64, 64)
    import dataclasses
    few = dataclasses.replace(target, colours=2)
    with pytest.raises(ProgramError, match="colours"):
        lower_gemv(1, 256, 64, 64, 4, levels=3, target=few)


def test_colours_per_core_counts_each_routers_distinct_colours():
    prog = lower_gemv(1, 256, 64, 8, 8, levels=3)
    seen = [set() for _ in range(prog.cores)]
    for m in range(prog.n_messages):
        col = int(prog.msg_colour[m])
        seen[prog.msg_src[m]].add(col)
        for link in prog.route_link[prog.route_ptr[m]:prog.route_ptr[m + 1]]:
            seen[int(link_dst(np.array([link]), prog.width)[0])].add(col)
    assert prog.colours_per_core().tolist() == [len(s) for s in seen]


def test_program_bigger_than_the_target_is_refused():
    with pytest.raises(ProgramError, match="mesh"):
        lower_gemv(1, 64, 64, 16, 16, target=WSE2.with_mesh(8, 8))


@pytest.mark.parametrize("bad", [dict(b=0), dict(k=-3), dict(n=2.5)])
def test_bad_dimensions_are_refused(bad):
    dims = dict(b=1, k=8, n=8) | bad
    with pytest.raises(ProgramError, match="must be an integer >= 1"):
        lower_gemv(dims["b"], dims["k"], dims["n"], 2, 2)


def test_unknown_algorithm_is_refused():
    with pytest.raises(ProgramError, match="not one of"):
        lower_gemm(8, 8, 8, 2, 2, "strassen")


@pytest.mark.parametrize("algo", GEMV_ALGOS)
@pytest.mark.parametrize("rows,cols", [(4, 4), (3, 5), (6, 2)])
def test_gemv_with_k_over_columns_matches_numpy(algo, rows, cols):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 23)).astype(np.float32)
    w = rng.standard_normal((23, 31)).astype(np.float32)
    prog = lower_gemv(2, 23, 31, rows, cols, algo, k_axis="cols")
    np.testing.assert_allclose(execute(prog, {"x": x, "W": w})["y"], x @ w, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("rows,cols", [(4, 4), (5, 3)])
def test_chained_gemvs_with_alternating_axes_need_no_data_movement(rows, cols):
    """y = (x @ W1) @ W2: the first GEMV's output layout is the second's input layout."""
    from compiler.algorithms.common import Region
    from compiler.algorithms.meshgemv import gemv
    from compiler.program import ProgramBuilder

    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 19)).astype(np.float32)
    w1 = rng.standard_normal((19, 26)).astype(np.float32)
    w2 = rng.standard_normal((26, 17)).astype(np.float32)
    bld = ProgramBuilder(cols, rows, "fp32")
    h, step = gemv(bld, Region(rows, cols), 1, 19, 26, names=("x", "W1", None))
    gemv(bld, Region(rows, cols), 1, 26, 17, k_axis="cols", x=h, names=(None, "W2", "y"),
         step=step)
    out = execute(bld.build(), {"x": x, "W1": w1, "W2": w2})
    np.testing.assert_allclose(out["y"], x @ w1 @ w2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunks", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("rows,cols,k_axis", [(5, 3, "rows"), (4, 6, "cols"), (1, 4, "rows")])
def test_pipeline_gemv_streams_any_number_of_chunks(chunks, rows, cols, k_axis):
    """Chunks cut the flat [b, n] partial sum (b > 1 too), unevenly, more than its elements."""
    from compiler.algorithms.common import Region
    from compiler.algorithms.meshgemv import gemv
    from compiler.program import ProgramBuilder

    rng = np.random.default_rng(chunks)
    x = rng.standard_normal((3, 22)).astype(np.float32)
    w = rng.standard_normal((22, 17)).astype(np.float32)
    bld = ProgramBuilder(cols, rows, "fp32")
    gemv(bld, Region(rows, cols), 3, 22, 17, "pipeline", k_axis=k_axis, chunks=chunks)
    prog = bld.build()
    prog.check(WSE2)
    np.testing.assert_allclose(execute(prog, {"x": x, "W": w})["y"], x @ w, rtol=1e-5,
                               atol=1e-5)


def test_pipeline_chunks_follow_the_closed_form_optimum():
    from compiler.algorithms.allreduce import pipeline_chunks

    # o = 4 + 4 + 2 * 4 + 1 = 17 cycles per chunk, v = 92 B / 4 B per cycle = 23 cycles
    assert pipeline_chunks(360, 92, WSE2, most=100) == round((358 * 23 / 17) ** 0.5) == 22
    assert pipeline_chunks(360, 92, WSE2) == 8
    assert pipeline_chunks(2, 10_000, WSE2) == 1  # one hop: nothing to overlap
    assert pipeline_chunks(64, 2, WSE2) == 1


def test_pipeline_beats_the_ring_on_a_long_line_and_matches_it_with_one_chunk():
    """A chain of 64 cores: streaming 8 chunks overlaps the hops' transfers and adds."""
    from compiler.algorithms.common import Region
    from compiler.algorithms.meshgemv import gemv
    from compiler.program import ProgramBuilder
    from wafersim.simulate import simulate

    def cycles(algo, chunks=1):
        bld = ProgramBuilder(1, 64, "bf16")
        gemv(bld, Region(64, 1), 1, 64, 512, algo, chunks=chunks)
        return simulate(bld.build(), WSE2).makespan_cycles

    ring, one, eight = cycles("ring"), cycles("pipeline", 1), cycles("pipeline", 8)
    assert eight < 0.5 * ring
    assert one == pytest.approx(ring, rel=0.05)  # the take / put of a whole vector only


def test_whole_model_compiler_takes_only_the_reductions_its_estimate_models():
    from compiler.model import CompileOptions, compile_model
    from compiler.targets import load_target
    from models import build_graph, load_model

    graph = build_graph(load_model("tiny-llama"), "decode", ctx_len=8)
    with pytest.raises(ProgramError, match="not one of meshgemv, ring"):
        compile_model(graph, load_target("test16x16"), CompileOptions(algo="pipeline"))


@pytest.mark.parametrize("algo", GEMM_ALGOS)
def test_sampled_gemm_steps_extrapolate_to_the_whole_loop(algo):
    """A few of the loop's steps, extrapolated, against the whole loop simulated: Cannon-family
    steps are identical once the shifts are under way (exact); SUMMA's first panels have their
    owners near one edge (within 3.1% here; benchmarks/gemm_sampling.py prints more)."""
    from wafersim.simulate import simulate, simulate_sampled
    s, n = 16, 45  # 2.8 elements per core a side, the paper's 2K on 720 cores
    exact = simulate(lower_gemm(n, n, n, s, s, algo, target=WSE2), WSE2)
    est = simulate_sampled(lambda t: lower_gemm(n, n, n, s, s, algo, target=WSE2, steps=t),
                           WSE2, s, (4, 8))
    tol = 0.031 if algo == "summa" else 0.0
    assert abs(est.makespan_cycles / exact.makespan_cycles - 1) <= tol
    assert est.meta["extrapolated"] and est.meta["steps_sampled"] == [4, 8]
    assert est.flops == exact.flops and est.messages == exact.messages
    assert est.onchip_bytes == exact.onchip_bytes
    assert (est.core_busy + est.core_overhead <= est.makespan_cycles).all()


def test_sampled_gemm_is_refused_for_functional_execution():
    prog = lower_gemm(8, 8, 8, 4, 4, "meshgemm", steps=2)
    with pytest.raises(ProgramError, match="sampled steps"):
        execute(prog, {"A": np.ones((8, 8), np.float32), "B": np.ones((8, 8), np.float32)})
    with pytest.raises(ProgramError, match="steps=5 sampled of the meshgemm loop's 4"):
        lower_gemm(8, 8, 8, 4, 4, "meshgemm", steps=5)


def test_extrapolate_follows_the_line_and_never_undercuts_a_cores_work():
    from wafersim.result import SimResult, extrapolate

    def run(span, busy, link, msgs):
        return SimResult("t", 2, 1, 1e9, span, np.array(busy), np.array([1, 1]),
                         np.array([0, 0]), np.array([True, True]), np.array([8 * msgs, 0]),
                         np.array([link, 0]), msgs, msgs, 10, 0.1, 100 * msgs)

    # steps 2 and 3 of 10: everything grows by its per-step amount 7 more times
    e = extrapolate(run(100, [40, 30], 20, 4), run(120, [50, 35], 25, 6), 2, 3, 10)
    assert e.makespan_cycles == 120 + 7 * 20 and not e.meta["work_bound"]
    assert list(e.core_busy) == [50 + 7 * 10, 35 + 7 * 5] and e.messages == 6 + 7 * 2
    assert e.flops == 100 * e.messages and e.events == 20 and e.meta["steps_sampled"] == [2, 3]
    # a core whose work grows faster than the step: the step is at least that work
    e = extrapolate(run(100, [60, 30], 20, 4), run(110, [90, 35], 25, 6), 2, 3, 10)
    assert e.makespan_cycles == 90 + 7 * 30 + 1 and e.meta["work_bound"]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_builder_orders_batches_like_a_stable_sort(data, monkeypatch):
    """build() places every column of scalar, broadcast, empty, small and large batches
    (program.SMALL_BATCH shrunk to 3) where a stable sort by (core, step) puts it."""
    monkeypatch.setattr(program, "SMALL_BATCH", 3)
    width, height = 3, 2
    cores = width * height
    bld = ProgramBuilder(width, height)
    bufs = bld.buffers(np.arange(cores), 1, 4)
    rows = []  # (core, step, op, a, flops) in the order added
    for _ in range(data.draw(st.integers(1, 8))):
        n = data.draw(st.integers(0, 7))
        core = np.array(data.draw(st.lists(st.integers(0, cores - 1), min_size=n, max_size=n)),
                        np.int64)
        steps = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
        step = steps[0] if n and data.draw(st.booleans()) else np.array(steps, np.int64)
        op = data.draw(st.sampled_from([OP_ADD, OP_COPY, OP_ZERO]))
        a = np.broadcast_to(bufs[0], n) if data.draw(st.booleans()) else bufs[core]
        flops = data.draw(st.integers(0, 99))
        bld.compute(core, step, op, bufs[core], a=a, flops=flops)
        rows += [(c, s, op, b, flops) for c, s, b in zip(core, np.broadcast_to(step, n), a)]
    prog = bld.build()
    want = sorted(range(len(rows)), key=lambda i: (rows[i][0], rows[i][1]))
    assert list(np.repeat(np.arange(cores), np.diff(prog.core_ptr))) == [rows[i][0]
                                                                         for i in want]
    assert list(prog.ins_op) == [rows[i][2] for i in want]
    assert list(prog.ins_a) == [rows[i][3] for i in want]
    assert list(prog.ins_flops) == [rows[i][4] for i in want]


def _bad_builder(fault: str) -> ProgramBuilder:
    """A 4x1 mesh with one message from core 0 to core 2 (2 hops) and one fault."""
    bld = ProgramBuilder(4, 1)
    buf = bld.buffers(np.arange(4), 1, 4)
    m = bld.messages(0, 2, 8, 0)
    bld.send(0, 0, 99 if fault == "undeclared" else m, buf[0])
    core, hop = {"hop": (2, 5), "core": (3, -1), "unicast": (1, 0)}.get(fault, (2, -1))
    bld.recv(core, 1, m, buf[core], hop=hop)
    if fault == "flops":
        bld.compute(1, 2, OP_ADD, buf[1], a=buf[1], b=buf[1], flops=2**31)
    if fault == "default":
        big = bld.buffers([1, 1], [2**16, 2**16], [2**16, 2**16])
        bld.compute(1, 2, program.OP_MATMUL_ACC, big[0], a=big[0], b=big[1])
    return bld


@pytest.mark.parametrize("fault,says", [
    ("undeclared", "SEND or RECV of an undeclared message"),
    ("hop", "RECV at a hop beyond the message's route"),
    ("core", "RECV on core 3 of message 0, which is not delivered there (its route passes "
             "core 2)"),
    ("unicast", "RECV at an intermediate hop of a message that is not multicast"),
    ("flops", program.TOO_LARGE),
    ("default", program.TOO_LARGE),
])
def test_builder_refuses_a_bad_program_in_one_line(fault, says):
    with pytest.raises(ProgramError) as err:
        _bad_builder(fault).build()
    assert str(err.value) == says


def test_the_bad_builder_without_its_fault_builds():
    _bad_builder("none").build()  # so each case above fails on its one fault
