"""What a study did not measure or search, in words: the probes that did not finish and why
(the run's end), and the choices its space left out (the run's headline, status and report).
"""

from __future__ import annotations

from typing import Any

from autotune.study.records import TrialStatus, measured_points, trial_reason, trial_status
from autotune.study.study_records import left_frontier
from autotune.units import count_of, format_bytes

PROBE_FAILURE_WORDS = {
    TrialStatus.CRASH: "crashed",
    TrialStatus.TIMEOUT: "timed out",
    TrialStatus.OOM: "ran out of memory",
    TrialStatus.NAN: "had a non-finite loss",
    TrialStatus.INTERRUPTED: "was interrupted",
    TrialStatus.REFUSED: "was refused",
}
"""A trial's status when its probe did not finish, or was refused -> how the run's end says it."""


def _agreeing(words: str, count: int) -> str:
    """'was refused' of one trial, 'were refused' of several."""
    return f"were {words[4:]}" if count > 1 and words.startswith("was ") else words


def nothing_measured_line(study: Any) -> str:
    """Why a study has no measured recipe, in one line: the probes that did not finish, with
    the first reason of each kind, or that nothing measured fit the budget."""
    from collections import Counter

    trials = study.get_trials(deepcopy=False)
    statuses = [trial_status(t) for t in trials]
    removed = left_frontier(study)
    if removed and not measured_points(study) and measured_points(study, keep_left_frontier=True):
        return "no recipe was exported: " + "; ".join(
            f"trial {number} left the frontier: {why}" for number, why in sorted(removed.items())
        )
    if TrialStatus.MEASURED in statuses or not any(s in PROBE_FAILURE_WORDS for s in statuses):
        return "no recipe was measured within the budget, so none was exported"
    counts = Counter(s for s in statuses if s in PROBE_FAILURE_WORDS)
    reasons: dict[TrialStatus, str] = {}
    for trial, status in zip(trials, statuses):
        if status is not None and status in counts and status not in reasons:
            reasons[status] = trial_reason(trial) or "no reason recorded"
    parts = [
        f"{count_of(count, 'trial')} {_agreeing(PROBE_FAILURE_WORDS[status], count)}: "
        f"{reasons[status]}"
        for status, count in counts.most_common()
    ]
    return "no recipe ran: " + "; ".join(parts)


def smallest_recipe_words(memory_model: str, where: str) -> str:
    """'the smallest recipe in the space' where `memory_model`, which gave its peak, is the
    formula that found it; "the formula's smallest recipe in the space" where another model
    predicted the recipe the formula puts least (it may put another lower)."""
    if memory_model == "formula":
        return f"the smallest recipe {where}"
    return f"the formula's smallest recipe {where}"


def describe_ruled_out(
    ruled_out: dict[str, dict[str, int]], models: dict[str, dict[str, str]] | None = None
) -> str:
    """'method full (31.95 GiB at least by the formula), micro_batch_size 8 (1.02 GiB by the
    replay), ...': the peak that ruled each out and the memory model whose it is (`models`;
    the formula's least where none is named, as studies that stored none were sized)."""
    models = models or {}

    def words(name: str, choice: str, peak: int) -> str:
        model = models.get(name, {}).get(choice, "formula")
        least = " at least" if model == "formula" else ""
        return f"{format_bytes(peak)}{least} by the {model}"

    return describe_unsupported(
        {
            name: {choice: words(name, choice, peak) for choice, peak in peaks.items()}
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
    unsupported: dict[str, dict[str, str]],
    ruled_out: dict[str, dict[str, int]],
    ruled_out_models: dict[str, dict[str, str]] | None = None,
    over_budget: dict[str, dict[str, int]] | None = None,
    kept_out: dict[str, list[str]] | None = None,
    budget_bytes: int | None = None,
) -> list[str]:
    """What a study leaves out of its space file and why, a line per reason, and the choices
    it searches that no recipe fits the budget with now (`over_budget`: a study resumed under
    a smaller budget) (CLI and report). `kept_out`: choices a resumed study does not search
    though a recipe with them fits the budget now. `budget_bytes`: the budget that sized them,
    named where the reader cannot tell which budget is meant (the report of a study whose runs
    held several); the run's opening lines follow its headline, which names it."""
    budget = "the budget" + (f" of {format_bytes(budget_bytes)}" if budget_bytes else "")
    lines = []
    if unsupported:
        lines.append("not searched, they cannot run here: " + describe_unsupported(unsupported))
    if ruled_out:
        lines.append(
            f"not searched, no recipe with them fits {budget} (predicted): "
            + describe_ruled_out(ruled_out, ruled_out_models)
        )
    if over_budget:
        lines.append(
            f"searched by the study, but no recipe with them fits {budget} (predicted): "
            + describe_ruled_out(over_budget, ruled_out_models)
            + "; Optuna keeps a study's choices, so trials with them are held over the budget "
            "and run no probe (a new study, --study NAME, leaves them out)"
        )
    if kept_out:
        lines.append(
            "not searched, the study keeps the choices it searches, though a recipe with them "
            f"fits {budget} now: "
            + ", ".join(f"{name} {', '.join(choices)}" for name, choices in kept_out.items())
            + " (a new study, --study NAME, searches them)"
        )
    return lines
