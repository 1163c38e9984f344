"""Per-step metric accumulation on one rank, reduced over all ranks at the end of the step."""

from __future__ import annotations

import math

from trainer.process import Collectives


class StepMetrics:
    """Weighted means, maxima and minima on one rank; `reduce` makes them global.

    Every rank must record the same keys (they do: the same code path runs on every rank, and a
    micro-batch without loss tokens records the neutral element).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.maxes: dict[str, float] = {}
        self.mins: dict[str, float] = {}

    def mean(self, key: str, value: float, weight: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
        self.weights[key] = self.weights.get(key, 0.0) + weight

    def max(self, key: str, value: float) -> None:
        self.maxes[key] = max(self.maxes.get(key, -math.inf), float(value))

    def min(self, key: str, value: float) -> None:
        self.mins[key] = min(self.mins.get(key, math.inf), float(value))

    def reduce(self, comm: Collectives) -> dict[str, float]:
        """Global values: weighted means over all ranks (0 where no weight), maxima and minima
        (0 where nothing was recorded). A collective: every rank calls it."""
        out: dict[str, float] = {}
        keys = sorted(self.sums)
        if keys:
            sums = comm.all_reduce([self.sums[k] for k in keys] + [self.weights[k] for k in keys])
            for k, s, w in zip(keys, sums[: len(keys)], sums[len(keys) :], strict=True):
                out[k] = s / w if w > 0 else 0.0
        for table, op, empty in ((self.maxes, "max", -math.inf), (self.mins, "min", math.inf)):
            keys = sorted(table)
            if keys:
                for k, v in zip(keys, comm.all_reduce([table[k] for k in keys], op), strict=True):
                    out[k] = 0.0 if v == empty else v
        return out
