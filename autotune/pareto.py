"""The Pareto frontier of measured recipes and the policies that pick one recipe from it.

Objectives: peak memory (lower is better), tokens per second (higher), eval loss (lower).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from autotune.fidelity import loss_above

PickPolicy = Literal["balanced", "fastest", "smallest", "best-loss"]
PICK_POLICIES: tuple[str, ...] = ("balanced", "fastest", "smallest", "best-loss")

PICK_HELP = {
    "balanced": "closest to the ideal point (least memory, most tokens/s, least eval loss) "
    "after scaling each objective to [0, 1] over the frontier",
    "fastest": "most tokens per second",
    "smallest": "least peak memory",
    "best-loss": "lowest eval loss; where a noise probe ran, the fastest of the recipes whose "
    "eval loss is within the measured noise of the lowest",
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


def pick(
    points: Sequence[Point],
    policy: str,
    ladders: Mapping[int, Sequence[float]] | None = None,
    noise: float | None = None,
) -> Point:
    """One point of the frontier of `points` by `policy` (see PICK_HELP); best-loss chooses
    among best_loss_candidates (`ladders` and `noise` as there)."""
    front = frontier(points)
    if not front:
        raise ValueError("no measured feasible recipe to pick from")
    if policy == "fastest":
        return max(front, key=lambda p: (p.tokens_per_second, -p.peak_memory_bytes))
    if policy == "smallest":
        return min(front, key=lambda p: (p.peak_memory_bytes, -p.tokens_per_second))
    if policy == "best-loss":
        candidates = best_loss_candidates(front, ladders, noise)
        return min(candidates, key=lambda p: (-p.tokens_per_second, p.peak_memory_bytes, p.number))
    if policy != "balanced":
        raise ValueError(f"unknown pick policy {policy!r}")
    columns = list(zip(*(p.costs() for p in front)))
    lows = [min(c) for c in columns]
    spans = [(max(c) - min(c)) or 1.0 for c in columns]

    def distance(p: Point) -> float:
        return math.sqrt(sum(((v - lo) / span) ** 2 for v, lo, span in zip(p.costs(), lows, spans)))

    return min(front, key=lambda p: (distance(p), p.number))


def best_loss_candidates(
    front: Sequence[Point],
    ladders: Mapping[int, Sequence[float]] | None = None,
    noise: float | None = None,
) -> list[Point]:
    """The frontier points the best-loss pick chooses among, the lowest eval loss first.

    `ladders`: trial number -> its eval loss at each probe length it reached (the study's probe
    first, then each longer promoted one; autotune.study.ranking), so a recipe that reached a
    longer probe ranks before one that did not (fidelity.ladder_order); a point without one is
    its own eval loss. Without a measured `noise` (the eval-loss difference of one recipe
    probed again with another seed) the lowest alone; with it, also every other point whose
    eval loss, at the longest probe both reached, is no more than `noise` above the lowest's:
    which of those is lowest is chance.
    """
    if not front:
        return []

    def ladder(p: Point) -> Sequence[float]:
        return (ladders or {}).get(p.number) or (p.eval_loss,)

    def rank(p: Point) -> tuple[int, float, float]:
        # promoted recipes of equal loss in fidelity.ladder_order's order, the others fastest first
        tie = p.number if len(ladder(p)) > 1 else -p.tokens_per_second
        return (-len(ladder(p)), ladder(p)[-1], tie)

    ranked = sorted(front, key=rank)
    best = ranked[0]
    if noise is None:
        return [best]
    return [best] + [p for p in ranked[1:] if loss_above(ladder(best), ladder(p)) <= noise]


def best_loss_note(candidates: Sequence[Point], noise: float | None) -> str | None:
    """How the best-loss pick chose where the noise left more than one candidate
    (best_loss_candidates); None where it did not."""
    if noise is None or len(candidates) < 2:
        return None
    numbers = ", ".join(str(n) for n in sorted(p.number for p in candidates))
    return (
        f"lowest eval loss within the measured noise ({noise:.4f}): trials {numbers}; "
        "the fastest taken"
    )
