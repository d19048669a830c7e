"""SimResult: what one simulation of a mesh program measured.

Per-core arrays (cycles) and per-link arrays (indexed by link id = core * 4 + direction) are
kept whole so plots and invariant checks can use them; `summary()` gives the scalar keys that
DESIGN.md fixes for every CLI `--json` output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
