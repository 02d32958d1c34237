"""Successive halving after the search (`--promote ROUNDS`): the recipes that fit the budget
are ranked by the quality objective, and the better half of them is probed again with twice the
steps, round after round, so the quality ranking of the best rests on longer probes.

bench/fidelity_bench.py measures how far probe length changes the ranking (bench/README.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from autotune.fidelity import successive_halving
from autotune.probe import ProbeRunner
from autotune.quality import quality_cost
from autotune.study.objective import RunEvents, probe_request
from autotune.study.ranking import PROMOTION_PREFIX, Promotion, promotions
from autotune.study.records import measured_points, recipe_of
from autotune.study.settings import PreparedRun, trials_dir_of
from autotune.study.workers import claim_once, release_claim


def _record(study: Any, number: int, rounds: list[Promotion]) -> None:
    study.set_user_attr(f"{PROMOTION_PREFIX}{number}", [dataclasses.asdict(p) for p in rounds])


def promote(
    prepared: PreparedRun, runner: ProbeRunner, study: Any, events: RunEvents | None = None
) -> dict[int, list[Promotion]]:
    """Run the study's promotion rounds (a resumed study reuses the rounds it has)."""
    events = events or RunEvents()
    settings = prepared.settings
    scores = {p.number: p.eval_loss for p in measured_points(study)}  # those that fit
    done = promotions(study)
    for round_number in range(1, settings.promote_rounds + 1):
        if len(scores) < 2:
            break
        steps = settings.probe_steps * 2**round_number
        promoted = successive_halving(scores)
        scores = {}
        for number in promoted:
            rounds = done.setdefault(number, [])
            reached = next((p for p in rounds if p.round == round_number), None)
            if reached is None:
                job = f"{PROMOTION_PREFIX}{number}:{round_number}"
                if not claim_once(study, job, done=_reached_by(study, number, round_number)):
                    continue  # another run on this study probes it, or has
                try:
                    reached = _promote(prepared, runner, study, number, round_number, steps)
                    rounds.append(reached)
                    _record(study, number, rounds)
                    events.promoted(number, reached)
                finally:  # recorded (or failed): the claim is let go, as confirmations' are
                    release_claim(study, job)
            if reached.quality is not None:
                scores[number] = reached.quality
        events.notes.append(
            f"promotion round {round_number}: trials {', '.join(map(str, promoted))} probed "
            f"for {steps} steps"
        )
    return done


def _reached_by(study: Any, number: int, round_number: int) -> Callable[[], bool]:
    """Whether trial `number`'s probe of round `round_number` is recorded (by any run)."""

    def reached() -> bool:
        return any(p.round == round_number for p in promotions(study).get(number, []))

    return reached


def _promote(
    prepared: PreparedRun,
    runner: ProbeRunner,
    study: Any,
    number: int,
    round_number: int,
    steps: int,
) -> Promotion:
    """Trial `number`'s recipe probed again for `steps` steps, as round `round_number`."""
    settings = prepared.settings
    request = probe_request(prepared, recipe_of(study.trials[number]), steps, settings.seed)
    workdir = trials_dir_of(prepared) / f"promote-{round_number}-{number:04d}"
    result = runner.run(request, workdir)
    ok = result.status == "ok" and result.eval_loss is not None
    return Promotion(
        round=round_number,
        steps=steps,
        status=result.status,
        eval_loss=result.eval_loss,
        quality=quality_cost(settings.quality, result.eval_loss or 0.0, result.quality_score)
        if ok
        else None,
        reason=result.reason,
    )
