"""SimResult: what one simulation of a mesh program measured.

Per-core arrays (cycles) and per-link arrays (indexed by link id = core * 4 + direction) are
kept whole so plots and invariant checks can use them; `summary()` gives the scalar keys that
DESIGN.md fixes for every CLI `--json` output.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


class SimulationError(RuntimeError):
    """The program could not run to completion (deadlock, watchdog)."""


@dataclass(frozen=True, eq=False)
class SimResult:
    system: str
    width: int
    height: int
    clock_hz: float
    makespan_cycles: int
    core_busy: np.ndarray  # compute cycles
    core_overhead: np.ndarray  # fixed instruction overheads
    core_wait: np.ndarray  # blocked on a delivery
    core_active: np.ndarray  # bool: the core has instructions
    link_bytes: np.ndarray
    link_busy: np.ndarray  # cycles the link carried data
    messages: int
    hops: int
    events: int
    sim_wall_s: float
    flops: int
    sram_bytes: int = 0  # read and written by compute
    meta: dict = field(default_factory=dict)

    @property
    def makespan_s(self) -> float:
        return self.makespan_cycles / self.clock_hz

    @property
    def core_idle(self) -> np.ndarray:
        """Cycles neither computing nor in overhead: waiting for data or finished early."""
        return self.makespan_cycles - self.core_busy - self.core_overhead

    @property
    def onchip_bytes(self) -> int:
        """Bytes x links crossed: the fabric's traffic."""
        return int(self.link_bytes.sum())

    def fractions(self) -> dict[str, float]:
        """Busy / overhead / idle as fractions of makespan, averaged over active cores."""
        act = self.core_active
        if not act.any() or self.makespan_cycles == 0:
            return {"busy": 0.0, "overhead": 0.0, "idle": 0.0}
        span = float(self.makespan_cycles) * act.sum()
        busy = self.core_busy[act].sum() / span
        overhead = self.core_overhead[act].sum() / span
        return {"busy": busy, "overhead": overhead, "idle": 1.0 - busy - overhead}

    def achieved_flops(self) -> float:
        return self.flops / self.makespan_s if self.makespan_cycles else 0.0

    def link_utilisation(self) -> float:
        """Busiest link's busy fraction."""
        if self.makespan_cycles == 0 or len(self.link_busy) == 0:
            return 0.0
        return float(self.link_busy.max()) / self.makespan_cycles

    def summary(self, **context) -> dict:
        """The DESIGN.md summary keys; `context` supplies model, phase, batch, ctx, tokens."""
        fr = self.fractions()
        tokens = context.pop("tokens", None)
        phase = context.get("phase")
        tps = tokens / self.makespan_s if tokens and self.makespan_cycles else None
        out = {
            "system": self.system, "model": None, "phase": None, "batch": None, "ctx": None,
            "fits": True, "makespan_s": self.makespan_s, "tokens_per_s": tps,
            "tpot_ms": self.makespan_s * 1e3 if phase == "decode" else None,
            "ttft_ms": self.makespan_s * 1e3 if phase == "prefill" else None,
            "busy_fraction": fr["busy"], "idle_fraction": fr["idle"],
            "overhead_fraction": fr["overhead"],
            "onchip_bytes": self.onchip_bytes, "offchip_bytes": 0,
            "events": self.events, "sim_wall_s": self.sim_wall_s,
            "makespan_cycles": self.makespan_cycles, "messages": self.messages,
            "hops": self.hops, "flops": self.flops,
            "achieved_flops_per_s": self.achieved_flops(),
            "max_link_utilisation": self.link_utilisation(),
            "active_cores": int(self.core_active.sum()),
        }
        out.update(context)
        return out


def extrapolate(short: SimResult, long: SimResult, t_short: int, t_long: int,
                full: int) -> SimResult:
    """The result of a loop of `full` identical steps from two runs of its first `t_short` and
    `t_long` steps (compiler.algorithms.meshgemm's sampled steps): every cycle, byte, FLOP and
    message count is affine in the steps, so each is extended along the line through the two
    runs. `events` and `sim_wall_s` are what the two runs took; `meta` says it was sampled."""
    if not 1 <= t_short < t_long <= full:
        raise ValueError(f"extrapolate: sampled steps {t_short} < {t_long} <= {full} needed")
    w = (full - t_long) / (t_long - t_short)

    def line(a, b):
        return np.rint(b + w * (b - a)).astype(np.asarray(b).dtype) if np.ndim(b) else \
            int(round(b + w * (b - a)))

    arrays = ("core_busy", "core_overhead", "core_wait", "link_bytes", "link_busy")
    counts = ("makespan_cycles", "messages", "hops", "flops", "sram_bytes")
    out = {f: line(getattr(short, f), getattr(long, f)) for f in arrays + counts}
    # No core finishes before its own work, and no link carries longer than the step: where
    # the line falls short of that (steps not yet steady), that bound is the step.
    bound = int(max((out["core_busy"] + out["core_overhead"]).max(initial=0),
                    out["link_busy"].max(initial=0)))
    line_span = out["makespan_cycles"]
    out["makespan_cycles"] = max(line_span, bound)
    return replace(long, **out, events=short.events + long.events,
                   sim_wall_s=short.sim_wall_s + long.sim_wall_s,
                   meta={**long.meta, "steps_sampled": [t_short, t_long], "full_steps": full,
                         "extrapolated": True, "work_bound": bound > line_span})
