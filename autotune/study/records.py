"""What a trial stores and how it is read back: objective names, trial statuses, the trial's
recipe, prediction and probe figures (one writer and one reader each; no other module spells
their attribute keys), and the measured points. What the study stores about itself is in
study_records. Readers of a finished study (report, export, dashboard) need only these two
modules and storage.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from autotune.pareto import Point
from autotune.recipe import Recipe
from autotune.study.study_records import StudyBudgets, left_frontier, study_budgets
from autotune.training.io import ProbeResult

OBJECTIVE_NAMES = ("peak_memory_bytes", "tokens_per_second", "eval_loss")
DIRECTIONS = ("minimize", "maximize", "minimize")
CONSTRAINT_KEY = "memory_over_budget"

# What the study reports for a recipe it did not measure: zero speed and the eval loss of a
# uniform guess over the vocabulary, ln(V). Finite, so samplers learn from these trials.
UNMEASURED_TOKENS_PER_SECOND = 0.0


class TrialStatus(str, Enum):
    """What became of a trial (its `status` attribute): the closed set every reader uses."""

    MEASURED = "measured"
    """The probe ran and measured memory, speed and eval loss."""
    OVER_BUDGET_PREDICTED = "over_budget_predicted"
    """The memory model put the recipe over the budget: not probed, infeasible."""
    REFUSED = "refused"
    """The space's choices together named a recipe that cannot train: anywhere (pure fp16
    weights with torch's AdamW, recipe_checks.fp16_moments_refusal) or on this device though it
    runs each of the choices (DoRA over int8 on the CPU, architecture.dora_refusal): not probed,
    infeasible."""
    DUPLICATE = "duplicate"
    """The sampler proposed a recipe already tried: that trial's figures, not probed again."""
    OOM = "oom"
    NAN = "nan"
    TIMEOUT = "timeout"
    """The probe ran out of memory, hit a non-finite loss, or ran past its time: infeasible."""
    CRASH = "crash"
    """The probe failed for a reason that says nothing about the recipe: a failed trial."""
    INTERRUPTED = "interrupted"
    """Its worker died, or Ctrl-C stopped it, while it ran: failed, and queued once more."""

    def __str__(self) -> str:
        return self.value


STATUS_ATTR = "status"
REASON_ATTR = "reason"


def _queued(trial: Any) -> bool:
    """A trial waiting to run: a retry of a stopped trial carries that trial's status and
    reason (Optuna copies its attributes), which say nothing of this one, yet to run."""
    return getattr(getattr(trial, "state", None), "name", "") == "WAITING"


def trial_status(trial: Any) -> TrialStatus | None:
    """A trial's status, None where it has none (queued, running, or written by another
    tool)."""
    if _queued(trial):
        return None
    value = trial.user_attrs.get(STATUS_ATTR)
    try:
        return TrialStatus(value) if value is not None else None
    except ValueError:
        return None


def trial_reason(trial: Any) -> str:
    if _queued(trial):
        # the trial it stands in for is the last of its line (failed_trial is the first)
        history = trial.system_attrs.get("retry_history") or ()
        retried = history[-1] if history else trial.system_attrs.get("failed_trial")
        return f"queued to run again in place of trial {retried}" if retried is not None else ""
    return str(trial.user_attrs.get(REASON_ATTR) or "")


def record_status(trial: Any, status: TrialStatus, reason: str, storage: Any = None) -> None:
    """Write a trial's status and reason (the one writer of both): on the running trial, or,
    given the `storage`, on a frozen trial that another process ran."""
    for key, value in ((STATUS_ATTR, status.value), (REASON_ATTR, reason)):
        if storage is None:
            trial.set_user_attr(key, value)
        else:
            storage.set_trial_user_attr(trial._trial_id, key, value)


CONSTRAINT_BUDGET_ATTR = "constraint_budget_bytes"
"""The budget a trial's stored constraint is relative to: its run's, which may not be the one
the study's budget history (study_records.StudyBudgets) gives its number (a trial another
worker ran under the old budget, or one numbered above a trial queued before the change)."""


def record_constraint(trial: Any, value: float, relative_to_bytes: int) -> None:
    """The trial's memory constraint: > 0 is over the budget (infeasible); a fit is
    (bound - budget) / budget, `relative_to_bytes` being that budget."""
    trial.set_constraint(CONSTRAINT_KEY, value)
    trial.set_user_attr(CONSTRAINT_BUDGET_ATTR, relative_to_bytes)
    # optuna-dashboard 0.21 reads the list under the pre-5.0 system attribute.
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [value])


def trial_budget(trial: Any, budgets: StudyBudgets) -> int:
    """The budget trial's constraint is relative to: the one it stored, or for a trial from
    before that record, the one the study's budget history gives its number."""
    stored = trial.user_attrs.get(CONSTRAINT_BUDGET_ATTR)
    return int(stored) if stored else budgets.held_to(trial.number)


def constraint_now(trial: Any, budgets: StudyBudgets) -> float:
    """The trial's constraint held against the study's budget now. It stored its constraint
    relative to the budget of its run (trial_budget), (bound - budget then) / budget then,
    where the bound is its measured peak on CUDA, its margined prediction elsewhere; for a
    trial that fit, that is the GPU term alone, so its bound is read back and held to the
    budget now. A trial ruled out under its run's budget stays ruled out (a larger budget now
    is searched by a new study)."""
    stored = max(trial.constraints.values(), default=0.0)
    then = trial_budget(trial, budgets)
    now = budgets.current_bytes
    if stored > 0 or then == now or not then or not now:
        return stored
    return (round(then * (1 + stored)) - now) / now


WORKER_ATTR = "worker"
BASELINE_ATTR = "baseline"
REPAIR_OF_ATTR = "repair_of"
RECIPE_ATTR = "recipe"
PROBE_PREFIX = "probe_"
"""Trial attributes `probe_<field>` and `probe_seconds_<phase>`: what its probe reported."""


def worker_id() -> str:
    """This process as a trial's worker: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gone_from_this_host(worker: str) -> bool:
    """Whether `worker` ("host:pid", as worker_id writes it) ran on this host and has ended;
    a worker of another host cannot be checked from here, and counts as not gone."""
    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid))


def record_worker(trial: Any, worker: str) -> None:
    """The process running the trial (worker_id), so that its death can be told."""
    trial.set_user_attr(WORKER_ATTR, worker)


def baseline_attrs(name: str) -> dict[str, Any]:
    """The attributes of an enqueued baseline trial (the QLoRA default and the like)."""
    return {BASELINE_ATTR: name}


def repair_attrs(number: int) -> dict[str, Any]:
    """The attributes of a trial enqueued as the nearest fitting recipe to trial `number`."""
    return {REPAIR_OF_ATTR: number}


MEMORY_MARGIN_ATTR = "memory_margin"
PREDICTED_HOST_ATTR = "predicted_host_bytes"


def record_prediction(
    trial: Any,
    recipe: Recipe,
    peak_bytes: int,
    breakdown: dict[str, Any],
    memory_model: str,
    margin: float = 0.0,
    host_bytes: int = 0,
) -> None:
    """The trial's recipe, the memory predicted for it and the margin added to that before it
    was held to the budget, before it is probed or ruled out; `host_bytes`, the host memory
    predicted for all its ranks, where it offloads."""
    trial.set_user_attr(RECIPE_ATTR, recipe.to_dict())
    trial.set_user_attr("recipe_label", recipe.label())
    trial.set_user_attr("predicted_peak_bytes", peak_bytes)
    trial.set_user_attr("predicted_breakdown", breakdown)
    trial.set_user_attr("memory_model", memory_model)
    trial.set_user_attr(MEMORY_MARGIN_ATTR, margin)
    if host_bytes:
        trial.set_user_attr(PREDICTED_HOST_ATTR, host_bytes)


def record_probe_place(trial: Any, workdir: str, gpu: str | None) -> None:
    """Where the trial's probe runs: its folder and, with several GPUs, its GPU."""
    trial.set_user_attr("probe_dir", workdir)
    if gpu is not None:
        trial.set_user_attr("gpu", gpu)


_PROBE_FIELDS = tuple(
    f.name for f in dataclasses.fields(ProbeResult) if f.name not in ("seconds", "step_seconds")
)


def record_probe_result(trial: Any, result: ProbeResult) -> None:
    """What the probe reported, as flat JSON attributes (its step times left out)."""
    for name in _PROBE_FIELDS:
        trial.set_user_attr(f"{PROBE_PREFIX}{name}", getattr(result, name))
    for phase, seconds in result.seconds.items():
        trial.set_user_attr(f"{PROBE_PREFIX}seconds_{phase}", round(seconds, 3))


def copy_measurement(earlier: Any, trial: Any) -> None:
    """Give a duplicate trial the recipe, prediction and probe figures of the `earlier` trial
    with its recipe (not who ran it, nor why it was enqueued)."""
    for key, value in earlier.user_attrs.items():
        if key not in (BASELINE_ATTR, WORKER_ATTR, REPAIR_OF_ATTR):
            trial.set_user_attr(key, value)


@dataclass(frozen=True)
class TrialRecord:
    """What a trial stores about itself besides its status and values (read with trial_record)."""

    label: str = ""
    """The recipe in a few words."""
    recipe: dict[str, Any] = field(default_factory=dict)
    """The recipe as stored (recipe_of reads it as a Recipe)."""
    predicted_peak_bytes: int | None = None
    memory_model: str = "formula"
    memory_margin: float = 0.0
    """The share added to the predicted peak before it was held to the budget (0 in studies
    that predate margins)."""
    baseline: str = ""
    repair_of: int | None = None
    worker: str = ""
    probe: ProbeResult | None = None
    """What its probe reported (a duplicate carries its original's); None if none ran."""
    predicted_host_bytes: int | None = None
    """Host memory predicted for all its ranks, where it offloads (None: it offloads nothing,
    or the study predates host figures); the measured one is probe.host_peak_bytes."""


def trial_record(trial: Any) -> TrialRecord:
    attrs = trial.user_attrs
    probe = None
    if f"{PROBE_PREFIX}status" in attrs:
        stored = {
            n: attrs[f"{PROBE_PREFIX}{n}"] for n in _PROBE_FIELDS if PROBE_PREFIX + n in attrs
        }
        seconds_prefix = f"{PROBE_PREFIX}seconds_"
        seconds = {
            k.removeprefix(seconds_prefix): v
            for k, v in attrs.items()
            if k.startswith(seconds_prefix)
        }
        probe = ProbeResult(**stored, seconds=seconds)
    return TrialRecord(
        label=attrs.get("recipe_label", ""),
        recipe=attrs.get(RECIPE_ATTR) or {},
        predicted_peak_bytes=attrs.get("predicted_peak_bytes"),
        memory_model=attrs.get("memory_model", "formula"),
        memory_margin=attrs.get(MEMORY_MARGIN_ATTR, 0.0),
        baseline=attrs.get(BASELINE_ATTR, ""),
        repair_of=attrs.get(REPAIR_OF_ATTR),
        worker=attrs.get(WORKER_ATTR, ""),
        probe=probe,
        predicted_host_bytes=attrs.get(PREDICTED_HOST_ATTR),
    )


def recipe_of(trial: Any) -> Recipe:
    return Recipe.from_dict(trial.user_attrs[RECIPE_ATTR], source=f"trial {trial.number}")


class ProbeCrashed(Exception):
    """A probe failed for a reason that says nothing about the recipe; recorded as FAIL."""


SURPLUS_ATTR = "surplus"
"""Trial attribute: started by one run after others had already taken the study's last slot."""


def mark_surplus(trial: Any) -> None:
    trial.set_user_attr(SURPLUS_ATTR, True)


def finished_trial_count(study: Any) -> int:
    """Finished trials, not counting a failed trial that was retried (its retry counts; a
    retry's `retry_history` names every trial of its line) or a surplus one (never run)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    retried.update(n for t in trials for n in t.system_attrs.get("retry_history", ()))
    finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return sum(
        1
        for t in trials
        if t.state in finished and t.number not in retried and not t.user_attrs.get(SURPLUS_ATTR)
    )


def measured_points(study: Any, keep_left_frontier: bool = False) -> list[Point]:
    """Trials within the study's budget now (constraint_now) whose probe measured all three
    objectives, less those whose confirmation ran out of memory, went over the budget or hit a
    non-finite loss (study_records.left_frontier). `keep_left_frontier` keeps them: the points
    as the trials measured them, from which the confirmations choose, so that every run of the
    study chooses the same recipes to confirm."""
    from optuna.trial import TrialState

    budgets = study_budgets(study)
    removed = {} if keep_left_frontier else left_frontier(study)
    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        feasible = constraint_now(trial, budgets) <= 0 and trial.number not in removed
        if feasible and trial_status(trial) == TrialStatus.MEASURED:
            memory, speed, loss = trial.values
            points.append(Point(trial.number, memory, speed, loss))
    return points
