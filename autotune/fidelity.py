"""How far a short probe's eval loss can be trusted to rank recipes: rank correlation against
longer runs, and frontier recipes grouped where their eval-loss difference is inside the noise.

bench/fidelity_bench.py measures the correlation; the report groups recipes with the noise a
study measured (autotune.study.confirm.measure_noise).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, smallest first; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman_rho(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the two rank vectors (ties take
    average ranks, as scipy.stats.spearmanr does). 1: the same order; -1: reversed.

    Written out rather than importing scipy, which autotune does not otherwise need.
    """
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("spearman_rho needs two sequences of the same length, at least 2")
    rx, ry = ranks(xs), ranks(ys)
    mean = (len(rx) + 1) / 2  # the mean of ranks 1..n, ties or not
    covariance = sum((a - mean) * (b - mean) for a, b in zip(rx, ry))
    spread_x = sum((a - mean) ** 2 for a in rx) ** 0.5
    spread_y = sum((b - mean) ** 2 for b in ry) ** 0.5
    if spread_x == 0 or spread_y == 0:
        return float("nan")  # a constant sequence has no order to compare
    return covariance / (spread_x * spread_y)


def ladder_order(ladders: Mapping[Key, Sequence[float]]) -> list[Key]:
    """Keys best first, where each key's ladder is its eval loss at each probe length it
    reached (the shortest first, as successive halving promotes): a recipe that reached a longer
    probe comes before one that did not, and recipes that reached the same length are ordered
    by their loss at it. Any two are so ordered by the longest probe both reached, as halving
    promoted the lower of them at each shorter one."""
    return sorted(ladders, key=lambda key: (-len(ladders[key]), ladders[key][-1], key))


def loss_above(best: Sequence[float], other: Sequence[float]) -> float:
    """How far `other`'s eval loss lies above `best`'s at the longest probe both reached (each
    a ladder: its loss at each probe length, the shortest first)."""
    common = min(len(best), len(other)) - 1
    return other[common] - best[common]


def ladder_groups(ladders: Mapping[Key, Sequence[float]], noise: float) -> list[list[Key]]:
    """ladder_order's keys grouped where a neighbour's loss, at the longest probe both reached,
    is no more than `noise` above the one before it: inside a group the order is chance, so the
    report does not rank it.

    A group is a chain (each member within `noise` of the next), so its ends can lie further
    apart than `noise` when the chain is long; that still says no member clearly beats the next.
    """
    groups: list[list[Key]] = []
    for key in ladder_order(ladders):
        if groups:
            if loss_above(ladders[groups[-1][-1]], ladders[key]) <= noise:
                groups[-1].append(key)
                continue
        groups.append([key])
    return groups


def successive_halving(
    scores: dict[Key, float], keep_fraction: float = 0.5, minimum: int = 1
) -> list[Key]:
    """The keys promoted from one round to the next: the lowest-scoring `keep_fraction` of
    them (at least `minimum`), lowest first. Ties keep the keys' order, so a rerun promotes the
    same."""
    count = max(minimum, int(len(scores) * keep_fraction))
    return sorted(scores, key=lambda key: scores[key])[:count]


def noise_groups_line(ladders: Mapping[int, Sequence[float]], noise: float) -> str | None:
    """The report's reading of the frontier trials (number -> eval loss at each probe length
    it reached, as ladder_groups reads them) that the noise does not tell apart; None when each
    stands apart from the next."""
    groups = [g for g in ladder_groups(ladders, noise) if len(g) > 1]
    if not groups:
        return None
    shown = "; ".join("trials " + ", ".join(map(str, group)) for group in groups)
    compared = (
        ", each pair compared at the longest probe both reached"
        if any(len(ladder) > 1 for ladder in ladders.values())
        else ""
    )
    return (
        f"Indistinguishable on eval loss (neighbours apart by no more than the noise, "
        f"{noise:.4f}{compared}), so not ranked: {shown}."
    )


FIDELITY_READING = (
    "Fidelity of the eval-loss axis: on small pretrained models (bench/fidelity_bench.py, two "
    "tasks, two model sizes), 80-step probes ranked eleven recipes as 400-step runs did with "
    "Spearman's rho 0.87, 0.96 and 0.90 (40-step probes: 0.86, 0.60 and 0.86); another seed "
    "moved a probe's eval loss by 0.003 to 0.008 (median)."
)
"""What bench/results/fidelity_cpu{,_summary,_bigger}.json measured, stated next to the
quality axis."""

SHORTEST_MEASURED_PROBE_STEPS = 20
"""The shortest probe whose ranking bench/fidelity_bench.py measured (20, 40 and 80 steps)."""


def fidelity_reading(probe_steps: int | None) -> str:
    """FIDELITY_READING, then the study's own probe length, and where the benchmark measured
    none as short, that it says nothing of the study's ranking."""
    if probe_steps is None:
        return FIDELITY_READING
    own = f" This study's probes ran {probe_steps} steps"
    if probe_steps < SHORTEST_MEASURED_PROBE_STEPS:
        own += (
            f", shorter than any the benchmark measured ({SHORTEST_MEASURED_PROBE_STEPS} at "
            "the least): how far their ranking holds was not measured"
        )
    return FIDELITY_READING + own + "."
