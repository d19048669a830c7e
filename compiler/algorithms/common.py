"""Shared pieces of the mesh lowerings: regions of cores and how dimensions split over them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.program import MeshProgram, ProgramError
from compiler.targets import MeshTarget


@dataclass(frozen=True)
class Region:
    """A rows x cols rectangle of cores whose top-left core is (x0, y0) in a mesh `width` wide."""

    rows: int
    cols: int
    x0: int = 0
    y0: int = 0

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ProgramError(f"region {self.cols}x{self.rows}: both sides must be >= 1 core")

    def cores(self, width: int) -> np.ndarray:
        """Core ids as a [rows, cols] array (row i, column j)."""
        y = self.y0 + np.arange(self.rows)[:, None]
        x = self.x0 + np.arange(self.cols)[None, :]
        return y * width + x


def split(total: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Starts and sizes of `parts` near-equal chunks of `total` (first chunks one larger)."""
    base, extra = divmod(total, parts)
    sizes = np.full(parts, base, dtype=np.int64)
    sizes[:extra] += 1
    starts = np.zeros(parts, dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    return starts, sizes


def check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ProgramError(f"{name}={value!r} must be an integer >= 1")


def finish(program: MeshProgram, target: MeshTarget | None, what: str) -> MeshProgram:
    """Check a lowered program against the target's limits (when one is given)."""
    if target is not None:
        program.check(target, what)
    return program
