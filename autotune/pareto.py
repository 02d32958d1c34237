"""The Pareto frontier of measured recipes and the policies that pick one recipe from it.

Objectives: peak memory (lower is better), tokens per second (higher), eval loss (lower).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PickPolicy = Literal["balanced", "fastest", "smallest", "best-loss"]
PICK_POLICIES: tuple[str, ...] = ("balanced", "fastest", "smallest", "best-loss")

PICK_HELP = {
    "balanced": "closest to the ideal point (least memory, most tokens/s, least eval loss) "
    "after scaling each objective to [0, 1] over the frontier",
    "fastest": "most tokens per second",
    "smallest": "least peak memory",
    "best-loss": "lowest eval loss",
}


@dataclass(frozen=True)
class Point:
    """One measured, feasible recipe: its trial number and its three objective values."""

    number: int
    peak_memory_bytes: float
    tokens_per_second: float
    eval_loss: float

    def costs(self) -> tuple[float, float, float]:
        """All three as quantities to minimise."""
        return (self.peak_memory_bytes, -self.tokens_per_second, self.eval_loss)


def dominates(a: Point, b: Point) -> bool:
    ca, cb = a.costs(), b.costs()
    return all(x <= y for x, y in zip(ca, cb)) and any(x < y for x, y in zip(ca, cb))


def frontier(points: Sequence[Point]) -> list[Point]:
    """Points no other point dominates, fastest first."""
    front = [p for p in points if not any(dominates(q, p) for q in points if q is not p)]
    return sorted(front, key=lambda p: -p.tokens_per_second)


def pick(points: Sequence[Point], policy: str, quality_order: Sequence[int] = ()) -> Point:
    """One point of the frontier of `points` by `policy` (see PICK_HELP). `quality_order`:
    trial numbers best first by longer probes (autotune.study.ranking); best-loss takes the
    first of them on the frontier, and the lowest eval loss where none is."""
    front = frontier(points)
    if not front:
        raise ValueError("no measured feasible recipe to pick from")
    if policy == "fastest":
        return max(front, key=lambda p: (p.tokens_per_second, -p.peak_memory_bytes))
    if policy == "smallest":
        return min(front, key=lambda p: (p.peak_memory_bytes, -p.tokens_per_second))
    if policy == "best-loss":
        position = {number: index for index, number in enumerate(quality_order)}

        def quality_rank(p: Point) -> tuple[int, float, float]:
            return (position.get(p.number, len(position)), p.eval_loss, -p.tokens_per_second)

        return min(front, key=quality_rank)
    if policy != "balanced":
        raise ValueError(f"unknown pick policy {policy!r}")
    columns = list(zip(*(p.costs() for p in front)))
    lows = [min(c) for c in columns]
    spans = [(max(c) - min(c)) or 1.0 for c in columns]

    def distance(p: Point) -> float:
        return math.sqrt(sum(((v - lo) / span) ** 2 for v, lo, span in zip(p.costs(), lows, spans)))

    return min(front, key=lambda p: (distance(p), p.number))
