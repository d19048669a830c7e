"""Wafer targets: what a 2D mesh of cores is, as the compiler and simulator see it.

A `MeshTarget` holds the constants of WaferLLM's PLMR view of a wafer: how many cores
(Parallelism), how far apart in hops and how fast the links are (Latency), how much SRAM
each core has (Memory) and how many routes a router can hold (Routing). The presets
`WSE2` and `WSE3` take their figures from vendor documents; docs/hardware.md cites each.
Constants marked "assumed" there are not published and are named so they can be overridden.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}


class TargetError(ValueError):
    """A target description that cannot describe a working mesh."""


@dataclass(frozen=True)
class MeshTarget:
    """A rectangular mesh of identical cores joined by neighbour-only links."""

    name: str
    width: int  # cores along x (columns)
    height: int  # cores along y (rows)
    clock_hz: float
    sram_bytes: int  # per core
    flops_per_cycle: tuple[tuple[str, float], ...]  # per core, per dtype
    sram_bytes_per_cycle: float  # per core, reads + writes
    link_bytes_per_cycle: float  # per link, per direction
    hop_latency_cycles: int  # router-to-router forwarding of a message head
    send_overhead_cycles: int  # core instructions to start a send
    recv_overhead_cycles: int  # core instructions to finish a receive
    compute_overhead_cycles: int  # fixed cost of starting one compute instruction
    colours: int  # routing colours per router
    io_bytes_per_cycle: float  # wafer-edge I/O, whole wafer
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        positive = ("width", "height", "clock_hz", "sram_bytes", "sram_bytes_per_cycle",
                    "link_bytes_per_cycle", "colours", "io_bytes_per_cycle")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise TargetError(f"target {self.name!r}: {name}={value!r} must be > 0")
        for name in ("hop_latency_cycles", "send_overhead_cycles", "recv_overhead_cycles",
                     "compute_overhead_cycles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TargetError(f"target {self.name!r}: {name}={value!r} must be an int >= 0")
        if not self.flops_per_cycle:
            raise TargetError(f"target {self.name!r}: flops_per_cycle names no dtype")
        for dtype, rate in self.flops_per_cycle:
            if dtype not in DTYPE_BYTES:
                raise TargetError(f"target {self.name!r}: flops_per_cycle dtype {dtype!r} is "
                                  f"not one of {', '.join(DTYPE_BYTES)}")
            if rate <= 0:
                raise TargetError(f"target {self.name!r}: flops_per_cycle[{dtype}]={rate} must "
                                  "be > 0")

    @property
    def cores(self) -> int:
        return self.width * self.height

    def rate(self, dtype: str) -> float:
        """FLOPs per cycle per core for `dtype`."""
        rates = dict(self.flops_per_cycle)
        if dtype not in rates:
            raise TargetError(f"target {self.name!r} has no compute rate for dtype {dtype!r} "
                              f"(it has {', '.join(rates)})")
        return rates[dtype]

    def peak_flops(self, dtype: str = "fp16") -> float:
        """Whole-mesh peak FLOP/s for `dtype`."""
        return self.rate(dtype) * self.cores * self.clock_hz

    def with_mesh(self, width: int, height: int) -> MeshTarget:
        """The same cores and links on a mesh of another size (a region or a test mesh)."""
        return dataclasses.replace(self, name=f"{self.name}[{width}x{height}]",
                                   width=width, height=height)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["flops_per_cycle"] = dict(self.flops_per_cycle)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MeshTarget:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TargetError(f"target: unknown field {unknown[0]!r} (fields: {', '.join(known)})")
        missing = sorted(known - set(d) - {"notes"})
        if missing:
            raise TargetError(f"target: missing field {missing[0]!r}")
        d = dict(d)
        rates = d["flops_per_cycle"]
        if not isinstance(rates, dict):
            raise TargetError("target: flops_per_cycle must be a table of dtype = FLOPs/cycle")
        d["flops_per_cycle"] = tuple(sorted(rates.items()))
        return cls(**d)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix == ".toml":
            path.write_text(_to_toml(self.to_dict()))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _to_toml(d: dict) -> str:
    lines, tables = [], []
    for key, value in d.items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]\n" + "".join(f"{k} = {v!r}\n" for k, v in value.items()))
        elif isinstance(value, str):
            lines.append(f"{key} = {json.dumps(value)}\n")
        else:
            lines.append(f"{key} = {value!r}\n")
    return "".join(lines) + "".join(tables)


def load_target(name_or_path: str) -> MeshTarget:
    """A preset by name (`wse2`, `wse3`, `test8x8`, ...) or a target TOML/JSON file."""
    key = name_or_path.lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(name_or_path)
    if not path.exists():
        raise TargetError(f"target {name_or_path!r}: not a preset ({', '.join(PRESETS)}) "
                          "and no such file")
    try:
        text = path.read_text()
        d = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TargetError(f"target file {path}: cannot parse ({exc})") from None
    if not isinstance(d, dict):
        raise TargetError(f"target file {path}: must hold one table of fields")
    return MeshTarget.from_dict(d)


# Cerebras WSE-2. Sources in docs/hardware.md. The SDK exposes 757 x 996 PEs of which about
# 750 x 994 are usable by a program; 48 KB SRAM per PE; one 32-bit wavelet per link per cycle;
# 24 routable colours; ~1.1 GHz; fp16 4-wide SIMD FMA = 8 FLOP/cycle; 2 x 64-bit reads +
# 1 x 64-bit write per cycle = 24 B/cycle. Overheads are assumed (not published).
WSE2 = MeshTarget(
    name="wse2", width=750, height=994, clock_hz=1.1e9, sram_bytes=48 * 1024,
    flops_per_cycle=(("bf16", 8.0), ("fp16", 8.0), ("fp32", 2.0)),
    sram_bytes_per_cycle=24.0, link_bytes_per_cycle=4.0, hop_latency_cycles=1,
    send_overhead_cycles=4, recv_overhead_cycles=4, compute_overhead_cycles=4, colours=24,
    io_bytes_per_cycle=1.2e12 / 8 / 1.1e9,
    notes="Cerebras WSE-2; see docs/hardware.md",
)

# Cerebras WSE-3: 900,000 cores, 44 GB SRAM (48 KB per core as on WSE-2), SDK fabric
# 762 x 1172 (WaferLLM scripts). Per-core rates are taken equal to WSE-2's (assumed: the vendor
# publishes only the sparse 125 PFLOP/s peak).
WSE3 = dataclasses.replace(
    WSE2, name="wse3", width=762, height=1172, notes="Cerebras WSE-3; see docs/hardware.md"
)

PRESETS: dict[str, MeshTarget] = {
    "wse2": WSE2,
    "wse3": WSE3,
    **{f"test{n}x{n}": WSE2.with_mesh(n, n) for n in (4, 8, 16, 32)},
}
