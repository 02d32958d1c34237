"""The quality ranking that the picks and the report read: each measured recipe's quality at the
study's probe length and, where `--promote` probed it again for longer, at each longer length.

Qualities from probes of different lengths are not comparable, so the frontier keeps the study's
probe as its third objective (every trial has it), and only the ranking on quality (the
best-loss pick, the noise groups, the cards' quality reading) compares two recipes at the
longest probe both reached (autotune.fidelity.ladder_order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autotune.pareto import Point, best_loss_candidates, best_loss_note, frontier, pick
from autotune.study.study_records import study_noise, study_setup

PROMOTION_PREFIX = "promotion:"
"""Study attribute `promotion:N`: trial N's promoted probes, one per round it reached."""


@dataclass(frozen=True)
class Promotion:
    """One longer probe of a promoted recipe."""

    round: int
    steps: int
    status: str
    eval_loss: float | None = None
    quality: float | None = None
    """The quality objective's value (eval loss or 1 - the task metric); None unless ok."""
    reason: str = ""


def promotions(study: Any) -> dict[int, list[Promotion]]:
    """Trial number -> its promoted probes, first round first."""
    return {
        int(key.removeprefix(PROMOTION_PREFIX)): [Promotion(**stored) for stored in value]
        for key, value in study.user_attrs.items()
        if key.startswith(PROMOTION_PREFIX)
    }


def _measured_rungs(recorded: dict[int, list[Promotion]]) -> dict[int, list[Promotion]]:
    """Each trial's promoted probes that measured its quality, up to the first that did not
    (a round after a failed one ranks nothing)."""
    rungs: dict[int, list[Promotion]] = {}
    for number, rounds in recorded.items():
        kept: list[Promotion] = []
        for promotion in sorted(rounds, key=lambda p: p.round):
            if promotion.quality is None or promotion.round != len(kept) + 1:
                break
            kept.append(promotion)
        rungs[number] = kept
    return rungs


@dataclass(frozen=True)
class QualityRanking:
    """The measured recipes' quality at each probe length they reached."""

    ladders: dict[int, list[float]]
    """Trial number -> its quality at the study's probe length, then at each promoted round it
    reached (measured trials that fit the budget only)."""
    steps: tuple[int, ...]
    """The probe length of each rung: the study's probe, then each promotion round's."""
    noise: float | None = None
    """The eval-loss difference the study's noise probe measured (None: none ran): the
    best-loss pick takes the fastest of the recipes within it of the lowest."""

    def ladders_of(self, numbers: Sequence[int]) -> dict[int, list[float]]:
        return {n: self.ladders[n] for n in numbers if n in self.ladders}

    def longest(self, number: int) -> tuple[int, float] | None:
        """(steps, quality) of the trial's longest promoted probe; None if it was not promoted."""
        ladder = self.ladders.get(number, [])
        return (self.steps[len(ladder) - 1], ladder[-1]) if len(ladder) > 1 else None

    def common(self, a: int, b: int) -> tuple[int, float, float] | None:
        """(steps, quality of a, quality of b) at the longest probe both reached."""
        if a not in self.ladders or b not in self.ladders:
            return None
        rung = min(len(self.ladders[a]), len(self.ladders[b])) - 1
        return self.steps[rung], self.ladders[a][rung], self.ladders[b][rung]


def quality_ranking(study: Any, points: Sequence[Point]) -> QualityRanking:
    """The study's quality ranking of its measured `points` (records.measured_points; without
    promotions, every ladder is its one probe)."""
    rungs = _measured_rungs(promotions(study))
    base = study_setup(study).probe_steps
    if base is None:  # a study from before the record: promotion round r probes 2**r times it
        first = next((r[0] for r in rungs.values() if r), None)
        base = first.steps // 2 if first else 0
    steps = [base]
    ladders: dict[int, list[float]] = {}
    for point in points:
        promoted = rungs.get(point.number, [])
        ladders[point.number] = [point.eval_loss] + [p.quality or 0.0 for p in promoted]
        for promotion in promoted[len(steps) - 1 :]:
            steps.append(promotion.steps)
    noise = study_noise(study)
    return QualityRanking(
        ladders, tuple(steps), noise.eval_loss_difference if noise is not None else None
    )


def pick_number(policy: str, points: Sequence[Point], ranking: QualityRanking) -> int:
    """The trial the pick `policy` chooses from the frontier of the study's measured `points`,
    best-loss by its quality `ranking` (the longest probes where promotion rounds ran, and the
    fastest within the measured noise of the lowest)."""
    return pick(points, policy, ranking.ladders, ranking.noise).number


def pick_note(policy: str, points: Sequence[Point], ranking: QualityRanking) -> str | None:
    """Where the measured noise decided the best-loss pick, how (pareto.best_loss_note), to be
    said where the pick is shown; None for another policy or where it did not."""
    if policy != "best-loss":
        return None
    candidates = best_loss_candidates(frontier(points), ranking.ladders, ranking.noise)
    return best_loss_note(candidates, ranking.noise)


def ranking_line(ranking: QualityRanking, numbers: Sequence[int]) -> str | None:
    """Which of `numbers` (the frontier's trials) the quality ranking compares on longer
    probes, and at which lengths; None where none was promoted."""
    by_steps: dict[int, list[int]] = {}
    for number in numbers:
        longest = ranking.longest(number)
        by_steps.setdefault(longest[0] if longest else ranking.steps[0], []).append(number)
    if len(by_steps) < 2 and ranking.steps[0] in by_steps:
        return None
    parts = []
    for steps in sorted(by_steps, reverse=True):
        trials = by_steps[steps]
        kind = "probe" if steps == ranking.steps[0] else "promoted probe"
        parts.append(
            f"trial{'s' if len(trials) > 1 else ''} {', '.join(map(str, sorted(trials)))} "
            f"at {steps} steps ({kind})"
        )
    return (
        "Quality ranking (best eval loss pick, noise groups, cards): the frontier's recipes are "
        f"compared at the longest probe both reached: {'; '.join(parts)}. The frontier itself "
        f"and its eval-loss column are the {ranking.steps[0]}-step probe of every trial."
    )
