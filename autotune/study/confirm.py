"""After the trials: the top frontier recipes probed again for longer, and one probed again with
another seed to measure the noise.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from autotune.pareto import PICK_POLICIES, frontier, pick
from autotune.probe import ProbeRunner
from autotune.study.objective import RunEvents, probe_request
from autotune.study.ranking import pick_number, quality_ranking
from autotune.study.records import measured_points, recipe_of, trial_record
from autotune.study.settings import PreparedRun, trials_dir_of
from autotune.study.study_records import (
    NOISE_ATTR,
    NOISE_FAILED_ATTR,
    Confirmation,
    Noise,
    confirmation_job,
    confirmations,
    holds_up,
    left_frontier,
    noise_probed,
    record_confirmation,
    record_noise,
    study_noise,
)
from autotune.study.workers import claim_once, release_claim

NOISE_POLL_SECONDS = 2.0
NOISE_WAIT_SLACK_SECONDS = 120.0


def measure_noise(
    prepared: PreparedRun, runner: ProbeRunner, study: Any, events: RunEvents | None = None
) -> Noise | None:
    """How far a probe's figures move when only chance changes: the yardstick for differences.

    The QLoRA default (or, without it, the fastest frontier recipe) is probed again with the
    same steps and another seed, so the data order and the adapter's initialisation change and
    nothing else: it reads the study's token cache, so the eval subset is the same. An
    eval-loss difference between two recipes smaller than this one is noise.
    Runs once per study, before the confirmations, whose best-loss pick reads it (`--confirm 0`
    turns both off).
    """
    events = events or RunEvents()
    settings = prepared.settings
    if noise_probed(study):
        return study_noise(study)
    points = measured_points(study)
    if not points or settings.confirm_top < 1:
        return None
    by_number = {p.number: p for p in points}
    default = next(
        (
            t.number
            for t in study.trials
            if t.number in by_number and trial_record(t).baseline == "qlora_default"
        ),
        None,
    )
    number = default if default is not None else pick(points, "fastest").number
    point = by_number[number]

    done = functools.partial(noise_probed, study)
    # Another run probing the noise is waited for (its probe's timeout at most), so that the
    # confirmations of every run on the study choose with the same noise.
    waited_until = time.monotonic() + settings.probe_timeout_seconds + NOISE_WAIT_SLACK_SECONDS
    while not claim_once(study, NOISE_ATTR, done=done):
        if done() or time.monotonic() > waited_until:
            return study_noise(study)
        time.sleep(NOISE_POLL_SECONDS)
    try:
        return _probe_noise(prepared, runner, study, events, number, point)
    finally:
        release_claim(study, NOISE_ATTR)


def _probe_noise(
    prepared: PreparedRun,
    runner: ProbeRunner,
    study: Any,
    events: RunEvents,
    number: int,
    point: Any,
) -> Noise | None:
    settings = prepared.settings
    request = probe_request(
        prepared, recipe_of(study.trials[number]), settings.probe_steps, settings.seed + 1
    )
    result = runner.run(request, trials_dir_of(prepared) / f"noise-{number:04d}")
    if result.status != "ok":
        # recorded, so that no later run measures it after confirmations chose without it
        study.set_user_attr(NOISE_FAILED_ATTR, result.status)
        events.notes.append(
            f"the noise probe (trial {number} again, seed {request.seed}) ended {result.status}"
            f"{f': {result.reason}' if result.reason else ''}; the picks read no noise"
        )
        return None

    def change(now: float | None, before: float) -> float | None:
        return round(now / before - 1, 4) if now is not None and before else None

    assert result.eval_loss is not None  # a probe that ended ok measured it
    noise = Noise(
        trial=number,
        seed=request.seed,
        steps=request.steps,
        eval_loss=result.eval_loss,
        eval_loss_difference=round(abs(result.eval_loss - point.eval_loss), 6),
        tokens_per_second_change=change(result.tokens_per_second, point.tokens_per_second),
        peak_memory_change=change(result.peak_memory_bytes, point.peak_memory_bytes),
    )
    record_noise(study, noise)
    events.noise_measured(noise)
    return noise


def confirm_frontier(
    prepared: PreparedRun, runner: ProbeRunner, study: Any, events: RunEvents | None = None
) -> dict[int, Confirmation]:
    """Re-probe the top frontier recipes with twice the steps and another seed.

    Short probes can flatter a recipe (a lucky data order, a warm cache). A recipe holds up when
    the longer probe finishes, stays within the budget and is no more than 15% slower (holds_up);
    one whose probe ran out of memory, went over the budget or hit a non-finite loss leaves the
    frontier.
    The recipes are chosen from the frontier as the trials measured it, before any confirmation
    took a recipe off it: a resumed run, or another worker, chooses the same ones. A pick whose
    recipe left chooses another, which is confirmed in its place (_confirm_stand_ins).
    """
    events = events or RunEvents()
    settings = prepared.settings
    points = measured_points(study, keep_left_frontier=True)
    if not points or settings.confirm_top < 1:
        return confirmations(study)
    ranking = quality_ranking(study, points)
    first_picks = {policy: pick_number(policy, points, ranking) for policy in PICK_POLICIES}
    chosen: list[int] = []
    for number in [*first_picks.values()] + [p.number for p in frontier(points)]:
        if number not in chosen:
            chosen.append(number)
    top = chosen[: settings.confirm_top]
    for number in top:
        _confirm_once(prepared, runner, study, events, number)
    _confirm_stand_ins(prepared, runner, study, events, first_picks, top)
    return confirmations(study)


def _confirm_stand_ins(
    prepared: PreparedRun,
    runner: ProbeRunner,
    study: Any,
    events: RunEvents,
    first_picks: dict[str, int],
    top: list[int],
) -> None:
    """Confirm the recipe a pick chooses in place of one whose confirmation took it off the
    frontier (and, while any is left of the allowance, the next if that one leaves too): at
    most one confirmation for each of the `top` recipes that left, so a run confirms at most
    twice --confirm recipes however many fail. Which recipe a pick stood on is read back from
    the confirmations (`first_picks`, then each one's `in_place_of`), so a resumed run or
    another worker carries on where one stopped."""
    tried: set[int] = set()
    while True:
        done = confirmations(study)
        removed = left_frontier(study)
        stood_in = [(c.in_place_of, n) for n, c in done.items() if c.in_place_of is not None]
        stand_ins = dict(stood_in)
        points = measured_points(study)
        if len(stood_in) >= len(removed.keys() & set(top)) or not points:
            return
        ranking = quality_ranking(study, points)
        for policy, left in first_picks.items():
            while left in stand_ins:
                left = stand_ins[left]
            number = pick_number(policy, points, ranking)
            if left in removed and number not in done.keys() | tried:
                break
        else:
            return
        tried.add(number)
        _confirm_once(prepared, runner, study, events, number, left, policy)


def _confirm_once(
    prepared: PreparedRun,
    runner: ProbeRunner,
    study: Any,
    events: RunEvents,
    number: int,
    in_place_of: int | None = None,
    pick_policy: str = "",
) -> None:
    """Confirm trial `number` unless it was, or another run holds its claim."""
    job = confirmation_job(number)
    confirmed = functools.partial(_confirmed, study, number)
    if number in confirmations(study) or not claim_once(study, job, done=confirmed):
        return
    try:
        _confirm(prepared, runner, study, events, number, in_place_of, pick_policy)
    finally:
        release_claim(study, job)


def _confirmed(study: Any, number: int) -> bool:
    return number in confirmations(study)


def _confirm(
    prepared: PreparedRun,
    runner: ProbeRunner,
    study: Any,
    events: RunEvents,
    number: int,
    in_place_of: int | None,
    pick_policy: str,
) -> None:
    settings = prepared.settings
    trial = study.trials[number]
    speed = trial.values[1]
    request = probe_request(prepared, recipe_of(trial), 2 * settings.probe_steps, settings.seed + 1)
    result = runner.run(request, trials_dir_of(prepared) / f"confirm-{number:04d}")
    fits = (
        not prepared.device.startswith("cuda")
        or (result.peak_memory_bytes or 0) <= settings.budget_bytes
    )
    finished = result.status == "ok"
    # rounded as stored, so that the verdict and the words read from the record agree
    speed_change = round((result.tokens_per_second or 0.0) / speed - 1 if speed else -1.0, 4)
    confirmation = Confirmation(
        status=result.status,
        reason=result.reason,
        steps=request.steps,
        seed=request.seed,
        peak_memory_bytes=result.peak_memory_bytes,
        tokens_per_second=result.tokens_per_second,
        eval_loss=result.eval_loss,
        speed_change=speed_change,
        held_up=holds_up(finished, fits, speed_change),
        over_budget=finished and not fits,
        in_place_of=in_place_of,
        pick=pick_policy,
    )
    record_confirmation(study, number, confirmation)
    events.confirmed(number, confirmation)
