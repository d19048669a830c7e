"""Activation sparsity (TwELL-style): which FFN neurons fire, and what their packed form costs.

TwELL (Sakana AI with NVIDIA) keeps only the active activations of a feed-forward layer, in a
packed ELL-style layout (values and neuron indices, every row padded to the longest) written
by the preceding matmul's epilogue, so the down projection reads only the weight rows of
active neurons. Which neurons fire depends on the data. For timing, the compiler draws them:
each neuron of each sequence fires independently with its layer's density, seeded, so a run
is reproducible and a functional test can mask its numpy reference with the very same draw.

A density spec (`--act-density`) is one of
- "0.1": every layer at density 0.1;
- "0.1,0.05,...": one density per layer;
- "beta:MEAN:CONC": per-layer densities drawn from a Beta distribution of that mean and
  concentration (alpha = MEAN * CONC, beta = (1 - MEAN) * CONC), seeded.

>>> s = ActSparsity("0.25", seed=1)
>>> m = s.mask(0, 2, 1000)
>>> m.shape, 0.2 < m.mean() < 0.3
((2, 1000), True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.graph import ELL_INDEX_BYTES  # one 16-bit index per entry (a chunk of f < 65,536)


class SparsityError(ValueError):
    """A density spec that cannot be used; the message names --act-density."""


@dataclass(frozen=True)
class ActSparsity:
    """A density spec and the seed of every draw made from it."""

    spec: str
    seed: int = 0

    def __post_init__(self):
        self._parse()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SparsityError(f"--act-seed {self.seed!r} must be an integer >= 0")

    def _parse(self) -> tuple[str, tuple[float, ...]]:
        text = str(self.spec).strip()
        kind, parts = ("beta", text[5:].split(":")) if text.startswith("beta:") else (
            "list", text.split(","))
        try:
            values = tuple(float(v) for v in parts)
        except ValueError:
            raise SparsityError(f"--act-density {text!r}: give a density (0.1), one per layer "
                                "(0.1,0.2,...) or beta:MEAN:CONC") from None
        if kind == "beta":
            if len(values) != 2 or not 0 < values[0] < 1 or values[1] <= 0:
                raise SparsityError(f"--act-density {text!r}: beta:MEAN:CONC needs 0 < MEAN < 1 "
                                    "and CONC > 0")
        elif not values or any(not 0 < v <= 1 for v in values):
            raise SparsityError(f"--act-density {text!r}: every density must lie in (0, 1]")
        return kind, values

    def densities(self, layers: int) -> np.ndarray:
        """The density of each of `layers` layers."""
        kind, values = self._parse()
        if kind == "beta":
            mean, conc = values
            rng = np.random.default_rng([self.seed, 0])
            return np.clip(rng.beta(mean * conc, (1 - mean) * conc, layers), 1e-6, 1.0)
        if len(values) == 1:
            return np.full(layers, values[0])
        if len(values) != layers:
            raise SparsityError(f"--act-density lists {len(values)} densities; the model has "
                                f"{layers} layers")
        return np.array(values)

    def mask(self, layer: int, batch: int, f: int, layers: int | None = None) -> np.ndarray:
        """bool [batch, f]: the neurons of `layer` that fire, per sequence (a seeded draw)."""
        rho = self.densities(layer + 1 if layers is None else layers)[layer]
        return np.random.default_rng([self.seed, 1, layer]).random((batch, f)) < rho

    def body_mask(self, layers: int, batch: int, f: int) -> np.ndarray:
        """The draw a compiled layer body is timed with: the engine repeats one body for every
        layer of a region's loop (and stamps it onto every region), so it is drawn at the
        layers' mean density."""
        rho = float(self.densities(layers).mean())
        return np.random.default_rng([self.seed, 2]).random((batch, f)) < rho


def ell_width(mask: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per chunk of f (non-empty, from `starts` to the next): the ELL width, the most active
    neurons of any sequence (every sequence's row is padded to it)."""
    return np.add.reduceat(np.asarray(mask, np.int64), starts, axis=1).max(axis=0)


def ell_tile_cost(entries, n, b: int, dtype_bytes: float):
    """(FLOPs, SRAM elements read + written) of a core's down-projection tile on packed
    activations: each ELL entry (a value and its index, the index counted in elements of
    `dtype_bytes`) scales one weight row of n into its sequence's accumulator, which is read
    and written once ([b, n]). Numbers or arrays."""
    entries = np.asarray(entries)
    return 2 * entries * n, entries * (1 + ELL_INDEX_BYTES / dtype_bytes) + entries * n + 2 * b * n
