"""Fuzzing figures for docs/reliability.md: many cases of tests/fuzzing.py's generators, and
what became of each (loaded or computed correctly, refused with a one-line message, crashed).

    python benchmarks/fuzz.py              # the docs' figures (a few minutes)
    python benchmarks/fuzz.py --cases 50   # quicker
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fuzzing import (  # noqa: E402
    corrupt,
    functional_case,
    mutated_config,
    random_llama,
    sends,
    small_layout,
    unicast_balance,
)

from compiler.layout import LayoutError, load_layout  # noqa: E402
from compiler.program import ProgramError  # noqa: E402
from models.config import ConfigError, ModelConfig  # noqa: E402
from wafersim.simulate import simulate  # noqa: E402


def run(name: str, strategy, body, cases: int) -> None:
    outcomes, slowest = Counter(), [0.0]

    @settings(max_examples=cases, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def each(x):
        t0 = time.perf_counter()
        try:
            outcomes[body(x)] += 1
        except Exception as e:  # noqa: BLE001 - a crash is what we count
            outcomes[f"CRASH {type(e).__name__}: {e}"] += 1
        slowest[0] = max(slowest[0], time.perf_counter() - t0)

    each()
    print(f"{name}: {sum(outcomes.values())} cases, slowest {slowest[0]:.2f} s")
    for what, n in outcomes.most_common():
        print(f"    {n:5d}  {what}")


def config_case(d) -> str:
    try:
        ModelConfig.from_dict(d, name="config.json")
    except ConfigError as e:
        return "refused (one line)" if "\n" not in str(e) else "refused (multi-line)"
    return "loaded"


def layout_case(tmp: Path):
    program, path = small_layout(tmp)
    raw = path.read_bytes()

    def body(draw) -> str:
        bad = tmp / "bad.wsl"
        bad.write_bytes(corrupt(raw, draw))
        try:
            back, _ = load_layout(bad)
        except LayoutError:
            return "refused"
        same = (np.array_equal(back.ins_arg, program.ins_arg)
                and np.array_equal(back.route_link, program.route_link))
        return "loaded, identical" if same else "LOADED DIFFERENT PROGRAM"
    return body


def model_case(case) -> str:
    try:
        compiled, out, ref = functional_case(*case)
    except ProgramError:
        return "refused (does not fit or not lowered)"
    if not np.allclose(out["logits"], ref, rtol=1e-4, atol=1e-4):
        return "WRONG LOGITS"
    prog = compiled.program
    res = simulate(prog, case[1])
    sent, received = unicast_balance(prog)
    ok = (np.all(res.core_busy + res.core_overhead + res.core_wait <= res.makespan_cycles)
          and np.all(res.link_busy <= res.makespan_cycles) and np.array_equal(sent, received)
          and res.onchip_bytes == int((prog.msg_bytes * np.diff(prog.route_ptr)
                                       * sends(prog)).sum()))
    return "reference logits, invariants hold" if ok else "INVARIANT BROKEN"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=300)
    args = ap.parse_args()
    run("config.json loader", mutated_config(), config_case, args.cases)
    with tempfile.TemporaryDirectory() as tmp:
        run("layout loader", st.data(), lambda data: layout_case(Path(tmp))(data.draw),
            args.cases)
    run("random LLaMA-family decode steps", random_llama(), model_case, args.cases // 3)


if __name__ == "__main__":
    main()
