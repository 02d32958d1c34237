"""What a study stores and how it is read back: objective names, attribute keys, trial statuses,
the measured points and the recipe of a trial. Readers of a finished study (report, export,
dashboard) need only this module and storage.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from autotune.pareto import Point
from autotune.recipe import Recipe
from autotune.units import format_bytes

OBJECTIVE_NAMES = ("peak_memory_bytes", "tokens_per_second", "eval_loss")
DIRECTIONS = ("minimize", "maximize", "minimize")
CONSTRAINT_KEY = "memory_over_budget"
SPACE_CHOICES_ATTR = "space_choices"
"""Study attribute: the choices of each dimension the study searches (the space file's, less
those the memory model rules out under the budget)."""

# What the study reports for a recipe it did not measure: zero speed and the eval loss of a
# uniform guess over the vocabulary, ln(V). Finite, so samplers learn from these trials.
UNMEASURED_TOKENS_PER_SECOND = 0.0


class TrialStatus(str, Enum):
    """What became of a trial (its `status` attribute): the closed set every reader uses."""

    MEASURED = "measured"
    """The probe ran and measured memory, speed and eval loss."""
    OVER_BUDGET_PREDICTED = "over_budget_predicted"
    """The memory model put the recipe over the budget: not probed, infeasible."""
    DUPLICATE = "duplicate"
    """The sampler proposed a recipe already tried: that trial's figures, not probed again."""
    OOM = "oom"
    NAN = "nan"
    TIMEOUT = "timeout"
    """The probe ran out of memory, hit a non-finite loss, or ran past its time: infeasible."""
    CRASH = "crash"
    """The probe failed for a reason that says nothing about the recipe: a failed trial."""
    INTERRUPTED = "interrupted"
    """Its worker died while it ran: failed, and queued once more."""

    def __str__(self) -> str:
        return self.value


STATUS_ATTR = "status"
REASON_ATTR = "reason"


def trial_status(trial: Any) -> TrialStatus | None:
    """A trial's status, None where it has none (running, or written by another tool)."""
    value = trial.user_attrs.get(STATUS_ATTR)
    try:
        return TrialStatus(value) if value is not None else None
    except ValueError:
        return None


def trial_reason(trial: Any) -> str:
    return str(trial.user_attrs.get(REASON_ATTR) or "")


def record_status(trial: Any, status: TrialStatus, reason: str) -> None:
    """Write a trial's status and reason (the one writer of both)."""
    trial.set_user_attr(STATUS_ATTR, status.value)
    trial.set_user_attr(REASON_ATTR, reason)


class ProbeCrashed(Exception):
    """A probe failed for a reason that says nothing about the recipe; recorded as FAIL."""


SURPLUS_ATTR = "surplus"
"""Trial attribute: started by one run after others had already taken the study's last slot."""


def finished_trial_count(study: Any) -> int:
    """Finished trials, not counting a failed trial that was retried (its retry counts) or a
    surplus one (never run)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return sum(
        1
        for t in trials
        if t.state in finished and t.number not in retried and not t.user_attrs.get(SURPLUS_ATTR)
    )


CLAIM_PREFIX = "claim:"


MEASURED_UNDER_ATTR = "measured_under"
"""Study attribute: the settings under which its trials were measured (see measured_under)."""


NOISE_ATTR = "noise"
"""Study attribute: one recipe probed again with another seed and the same steps."""


CONFIRMATION_PREFIX = "confirmation:"


def confirmations(study: Any) -> dict[int, dict[str, Any]]:
    """Trial number -> what its longer, reseeded re-probe measured and whether it held up."""
    return {
        int(key.removeprefix(CONFIRMATION_PREFIX)): value
        for key, value in study.user_attrs.items()
        if key.startswith(CONFIRMATION_PREFIX)
    }


def measured_points(study: Any) -> list[Point]:
    """Feasible trials whose probe measured all three objectives."""
    from optuna.trial import TrialState

    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        feasible = all(v <= 0 for v in trial.constraints.values())
        if feasible and trial_status(trial) == TrialStatus.MEASURED:
            memory, speed, loss = trial.values
            points.append(Point(trial.number, memory, speed, loss))
    return points


PROBE_FAILURE_WORDS = {
    TrialStatus.CRASH: "crashed",
    TrialStatus.TIMEOUT: "timed out",
    TrialStatus.OOM: "ran out of memory",
    TrialStatus.NAN: "had a non-finite loss",
    TrialStatus.INTERRUPTED: "was interrupted",
}
"""A trial's status when its probe did not finish -> how the run's end says it."""


def nothing_measured_line(study: Any) -> str:
    """Why a study has no measured recipe, in one line: the probes that did not finish, with
    the first reason of each kind, or that nothing measured fit the budget."""
    from collections import Counter

    trials = study.get_trials(deepcopy=False)
    statuses = [trial_status(t) for t in trials]
    if TrialStatus.MEASURED in statuses or not any(s in PROBE_FAILURE_WORDS for s in statuses):
        return "no recipe was measured within the budget, so none was exported"
    counts = Counter(s for s in statuses if s in PROBE_FAILURE_WORDS)
    reasons: dict[TrialStatus, str] = {}
    for trial, status in zip(trials, statuses):
        if status is not None and status in counts and status not in reasons:
            reasons[status] = trial_reason(trial) or "no reason recorded"
    parts = [
        f"{count} trial{'s' if count > 1 else ''} {PROBE_FAILURE_WORDS[status]}: {reasons[status]}"
        for status, count in counts.most_common()
    ]
    return "no recipe ran: " + "; ".join(parts)


def recipe_of(trial: Any) -> Recipe:
    return Recipe.from_dict(trial.user_attrs["recipe"], source=f"trial {trial.number}")


def describe_ruled_out(ruled_out: dict[str, dict[str, int]]) -> str:
    """'method full (31.95 GiB at least), micro_batch_size 8 (32.88 GiB at least), ...'"""
    return describe_unsupported(
        {
            name: {choice: f"{format_bytes(peak)} at least" for choice, peak in peaks.items()}
            for name, peaks in ruled_out.items()
        }
    )


def describe_unsupported(unsupported: dict[str, dict[str, str]]) -> str:
    """'lora_target_modules qv (GPTNeoXForCausalLM has no q_proj, v_proj), ...'"""
    return ", ".join(
        f"{name} {choice} ({why})"
        for name, reasons in unsupported.items()
        for choice, why in reasons.items()
    )


def not_searched(
    unsupported: dict[str, dict[str, str]], ruled_out: dict[str, dict[str, int]]
) -> list[str]:
    """What a study leaves out of its space file and why, a line per reason (CLI and report)."""
    lines = []
    if unsupported:
        lines.append(
            "not searched, the model cannot run them: " + describe_unsupported(unsupported)
        )
    if ruled_out:
        lines.append(
            "not searched, no recipe with them fits the budget (predicted): "
            + describe_ruled_out(ruled_out)
        )
    return lines
