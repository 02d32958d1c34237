"""Where stored studies stand, read without running anything: every study of a storage with its
best recipe per pick (`autotune studies`), and one study's progress (`autotune status`).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from autotune.pareto import PICK_POLICIES, Point, frontier
from autotune.study.claims import is_claim_study
from autotune.study.coverage import space_tried, space_tried_words, untried_recipes
from autotune.study.ranking import pick_note, pick_number, quality_ranking
from autotune.study.records import (
    TrialStatus,
    finished_trial_count,
    gone_from_this_host,
    measured_points,
    trial_record,
    trial_status,
)
from autotune.study.sqlite_checks import empty_sqlite
from autotune.study.storage import existing_storage_url, load_existing_study, make_storage
from autotune.study.study_records import (
    confirmations,
    confirmed_in_place,
    left_frontier,
    noise_probed,
    study_setup,
    target_trials,
)
from autotune.units import count_of


@dataclass(frozen=True)
class MeasuredRecipe:
    trial: int
    recipe: str
    peak_memory_bytes: float
    tokens_per_second: float
    eval_loss: float
    host_peak_bytes: int | None = None
    """Where it offloads: the host memory its probe measured."""
    memory_source: str = ""
    """What its probe measured as peak memory (training.io's CUDA or CPU memory source)."""


@dataclass(frozen=True)
class StudyOverview:
    """One study of a storage: what it searches for and its current best per pick."""

    name: str
    model: str
    budget_bytes: int
    finished: int
    running: int
    """Trials running now: those of a run on this host that has ended left out."""
    picks: dict[str, MeasuredRecipe]
    """Pick policy -> the frontier recipe it chooses now (empty before anything is measured)."""
    target_trials: int | None = None
    """The --trials of its latest run (None: a study from before it was stored)."""
    space_recipes_tried: int | None = None
    """Where every recipe of its space has been tried: how many there are (coverage)."""
    space_recipes_untried: int | None = None
    """Its space's recipes without a complete trial (None: not counted; coverage)."""
    pick_notes: dict[str, str] = field(default_factory=dict)
    """Pick policy -> how the measured noise decided it (ranking.pick_note), where it did."""

    @property
    def finished_words(self) -> str:
        return finished_words(
            self.finished, self.target_trials, self.space_recipes_tried, self.space_recipes_untried
        )


def finished_words(
    finished: int, target: int | None, space_tried: int | None = None, untried: int | None = None
) -> str:
    """'12 of 20 trials finished', the target being the latest run's --trials; without one
    (an older study) or past it (a run with a lower --trials), the count and what is known;
    short of it with every one of the space's `space_tried` recipes tried, that it is done;
    with fewer of its recipes `untried` than the target's trials left, the most it can reach
    (a run stops once every recipe is tried)."""
    if space_tried is not None and (target is None or finished < target):
        shown = f" (--trials {target})" if target is not None else ""
        return f"{count_of(finished, 'trial')} finished{shown}: {space_tried_words(space_tried)}"
    if target is not None and untried is not None and finished + untried < target:
        return (
            f"{finished:,} of at most {count_of(finished + untried, 'trial')} finished "
            f"(--trials {target}; {count_of(untried, 'recipe')} of the space untried)"
        )
    if target is None:
        return f"{count_of(finished, 'trial')} finished"
    if finished > target:
        return f"{count_of(finished, 'trial')} finished (--trials {target})"
    return f"{finished:,} of {count_of(target, 'trial')} finished"


PREDICTING_WORDS = "(recipe chosen, predicting its memory)"
"""What a running trial shows between the sampler's choice and its recorded recipe: the memory
model's prediction (a few seconds of replay on a 7B model)."""


@dataclass(frozen=True)
class RunningTrial:
    trial: int
    recipe: str
    """Its recipe's label; PREDICTING_WORDS once sampled, before the recipe is recorded; empty
    while the sampler chooses."""
    seconds: float
    """Since it started."""
    run_ended: bool = False
    """Its run, on this host, has ended (killed): marked running until the next run, which
    queues it again."""


@dataclass(frozen=True)
class StudyStatus:
    """A study's progress: trials done and running, probes an hour, and its frontier so far."""

    overview: StudyOverview
    measured: int
    waiting: int
    probes: int
    """Trials that ran a probe of their own (a repeated recipe runs none)."""
    probes_per_hour: float | None
    """The trials' probes over the wall time during which any trial ran (now ends a running
    one), so parallel workers count together and a pause between runs does not; None before a
    probe finished."""
    noise_checks: int
    """The noise probe, once it has run (0 or 1): a trial's recipe again with another seed."""
    confirmations: int
    """The frontier recipes probed again, for longer (confirm.confirm_frontier)."""
    running_trials: list[RunningTrial]
    frontier: list[MeasuredRecipe]
    """Fastest first."""
    left_frontier: dict[int, str] = field(default_factory=dict)
    """Trial number -> why its confirmation took it off the frontier (Confirmation.removal)."""
    confirmed_in_place: dict[int, str] = field(default_factory=dict)
    """Trial number of one that left -> the confirmation of the recipe its pick chose next
    (study_records.confirmed_in_place)."""


def _measured(study: Any, number: int) -> MeasuredRecipe:
    trial = study.trials[number]
    memory, speed, loss = trial.values
    record = trial_record(trial)
    host = record.probe.host_peak_bytes if record.probe else None
    source = record.probe.memory_source if record.probe else ""
    return MeasuredRecipe(number, record.label, memory, speed, loss, host, source)


def _state_count(study: Any, state: str) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState[state],)))


def _running(study: Any) -> list[Any]:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))


def _run_ended(trial: Any) -> bool:
    """A trial marked running whose run, on this host, has ended (a kill -9, a reboot)."""
    return gone_from_this_host(trial_record(trial).worker)


def study_overview(study: Any, points: Sequence[Point]) -> StudyOverview:
    """The study and the recipe each pick chooses from its measured `points`."""
    setup = study_setup(study)
    ranking = quality_ranking(study, points)
    picks = (
        {p: _measured(study, pick_number(p, points, ranking)) for p in PICK_POLICIES}
        if points
        else {}
    )
    return StudyOverview(
        study.study_name,
        setup.model,
        setup.budget_bytes,
        finished_trial_count(study),
        sum(1 for t in _running(study) if not _run_ended(t)),
        picks,
        target_trials(study),
        space_tried(study),
        untried_recipes(study),
        {
            p: note
            for p in PICK_POLICIES
            if points and (note := pick_note(p, points, ranking)) is not None
        },
    )


def study_overviews(storage_url: str | None) -> list[StudyOverview]:
    """Every study in the storage (default: the one `autotune run` writes), oldest first."""
    import optuna

    url = existing_storage_url(storage_url, allow_empty=True)
    if empty_sqlite(url):
        return []  # as a storage with Optuna's tables and no study, without writing them
    storage = make_storage(url)
    overviews = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        if not is_claim_study(summary.study_name):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            overviews.append(study_overview(study, measured_points(study)))
    return overviews


def busy_seconds(trials: Sequence[Any], now: datetime.datetime) -> float:
    """Wall time during which some trial ran: the union of the trials' runs, from start to end
    (now for a running one), so parallel workers count together (status and the report). An
    interrupted trial is left out: its end is when a later run found its worker dead, not when
    it stopped; so is a trial still marked running whose worker on this host has ended (a
    killed run's, until the next run fails it), which would count until now."""
    spans = sorted(
        (t.datetime_start, t.datetime_complete or now)
        for t in trials
        if t.datetime_start
        and trial_status(t) != TrialStatus.INTERRUPTED
        and (t.datetime_complete or not _run_ended(t))
    )
    seconds, covered_until = 0.0, None
    for start, end in spans:
        if covered_until is not None:
            start = max(start, covered_until)
        if end > start:
            seconds += (end - start).total_seconds()
            covered_until = end
    return seconds


def study_status(storage_url: str | None, study_name: str | None) -> StudyStatus:
    """The named study's progress (without a name, the storage's only or newest study)."""
    study = load_existing_study(storage_url, study_name)
    points = measured_points(study)
    trials = study.get_trials(deepcopy=False)
    now = datetime.datetime.now()
    probed = [
        t
        for t in trials
        if t.datetime_complete
        and trial_record(t).probe is not None
        and trial_status(t) != TrialStatus.DUPLICATE
    ]
    running = _running(study)
    hours = busy_seconds(trials, now) / 3600
    rate = len(probed) / hours if probed and hours > 0 else None
    return StudyStatus(
        overview=study_overview(study, points),
        measured=sum(1 for t in trials if trial_status(t) == TrialStatus.MEASURED),
        waiting=_state_count(study, "WAITING"),
        probes=len(probed),
        probes_per_hour=rate,
        noise_checks=int(noise_probed(study)),
        confirmations=len(confirmations(study)),
        running_trials=[
            RunningTrial(
                t.number,
                trial_record(t).label or (PREDICTING_WORDS if t.params else ""),
                (now - t.datetime_start).total_seconds() if t.datetime_start else 0.0,
                _run_ended(t),
            )
            for t in running
        ],
        frontier=[_measured(study, p.number) for p in frontier(points)],
        left_frontier=left_frontier(study),
        confirmed_in_place=confirmed_in_place(study),
    )
