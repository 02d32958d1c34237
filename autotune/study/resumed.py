"""The space of a resumed study: Optuna samples a parameter from one set of choices for the life
of a study, so a resumed run searches the choices the study holds, adds the dimensions it did not
search, and refuses a space that drops choices it searches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from autotune.errors import UsageError
from autotune.space import SearchSpace
from autotune.study.searched_choices import SpaceChoices
from autotune.study.settings import PreparedRun


def resumed_space(
    prepared: PreparedRun, stored: SpaceChoices, held: dict[str, tuple[Any, ...]]
) -> tuple[SearchSpace, SpaceChoices, list[str]]:
    """The space of a study being resumed, the choices the study searches from this run on and
    notes that say how they differ from this run's space file. Optuna samples a parameter from
    one fixed set of choices for the life of a study (`held`: the choices its trials were
    sampled from, by parameter), so a dimension the study searches keeps the choices it started
    with: one it holds that this run does not search (the space file changed, or the model
    cannot run it) is refused in one line before any trial, and one this run would add to it is
    left out, which the run's opening lines say (`kept_out`). A dimension the study did not
    search (its earlier space fixed it, or its budget left it one choice, which no trial
    sampled), which this run's space searches, is new to Optuna: it is searched from this run
    on, with the choices that fit the budget, and the study records it. What this run's budget
    rules out, and what the model or device here cannot run, is recorded as this run finds it,
    with the budget it sized the space under: the record is the one place that says so, which
    the run's opening lines and the report read."""
    space = prepared.space
    # what Optuna holds the study to: a parameter its trials sampled, or one stored with more
    # than one choice (not yet sampled); one the budget left a single choice of, which no trial
    # sampled, is new to Optuna as one the earlier space fixed is
    searches = {
        name: kept for name, kept in stored.fitting.items() if name in held or len(kept) > 1
    }
    dropped = {
        name: [c for c in kept if c not in space.choices_by_parameter.get(name, ())]
        for name, kept in searches.items()
    }
    dropped = {name: choices for name, choices in dropped.items() if choices}
    if dropped:
        _refuse_dropped(prepared, dropped)
    new = {
        name: fitting for name, fitting in prepared.fitting_choices.items() if name not in searches
    }
    resumed = space.restricted({**searches, **new})
    # the order the study's trials hold (a space file may list the same choices in another)
    resumed = dataclasses.replace(
        resumed,
        choices_by_parameter={
            **resumed.choices_by_parameter,
            **{
                name: held[name]
                for name, choices in resumed.choices().items()
                if name in held and set(held[name]) == set(choices)
            },
        },
    )
    changed = {
        name: choices
        for name, choices in resumed.choices().items()
        if name in held and tuple(held[name]) != tuple(choices)
    }
    if changed:
        raise UsageError(
            f"study {prepared.study_name} sampled "
            + "; ".join(
                f"{name} from {', '.join(map(str, held[name]))}, which this run would sample "
                f"from {', '.join(map(str, choices))}"
                for name, choices in changed.items()
            )
            + "; Optuna samples a parameter from one set of choices for the life of a study: "
            "resume it with the space it searched, or start a new study with --study"
        )
    notes = []
    # (one the budget narrows to no choice, or one, is not searched in this run)
    searched_now = {name: choices for name, choices in new.items() if len(choices) > 1}
    if searched_now:
        notes.append(
            f"study {prepared.study_name} searches "
            + ", ".join(
                f"{name} {', '.join(map(str, choices))}" for name, choices in searched_now.items()
            )
            + " from this run on; its earlier trials ran with one value of "
            + ("it" if len(searched_now) == 1 else "each")
        )
    added = {
        name: [c for c in fitting if c not in searches[name]]
        for name, fitting in prepared.fitting_choices.items()
        if name in searches
    }
    # (the run's opening lines name them: SpaceChoices.kept_out)
    added = {name: choices for name, choices in added.items() if choices}
    # what the study searches that this run's budget rules out (a smaller --budget): Optuna
    # still samples it, and the objective records its trials as over the budget, unprobed
    fitting = {**searches, **new}
    over_budget = {
        name: {
            str(choice): prepared.ruled_out_choices[name][str(choice)]
            for choice in kept
            if str(choice) in prepared.ruled_out_choices.get(name, {})
        }
        for name, kept in fitting.items()
    }
    over_budget = {name: peaks for name, peaks in over_budget.items() if peaks}
    # what this run's budget rules out of its space file that the study does not search (a
    # choice a larger budget left out comes back under the smaller one; one the study never
    # held, which this run's space adds, is named as any other)
    ruled_out = {
        name: {c: peak for c, peak in peaks.items() if c not in over_budget.get(name, {})}
        for name, peaks in prepared.ruled_out_choices.items()
    }
    models = {
        name: {**stored.ruled_out_models.get(name, {}), **prepared.ruled_out_models.get(name, {})}
        for name in {*stored.ruled_out_models, *prepared.ruled_out_models}
    }
    # a choice the study left out when it was sized that fits this run's budget (a larger
    # --budget) is not searched for that reason now
    kept_out = {name: [str(choice) for choice in choices] for name, choices in added.items()}
    searched = SpaceChoices(
        fitting,
        {name: peaks for name, peaks in ruled_out.items() if peaks},
        # what this run's space lists that cannot run here: one the study searches was refused
        # above, and one an earlier run could not run that runs here is kept out now
        prepared.unsupported_choices,
        {name: chosen for name, chosen in models.items() if chosen},
        over_budget,
        kept_out,
        prepared.settings.budget_bytes,
    )
    return resumed, searched, notes


def _refuse_dropped(prepared: PreparedRun, dropped: dict[str, list[Any]]) -> None:
    """Refuse a resume whose space leaves out choices the study searches, in one line: those
    not in its space file, and those the model or device here cannot run."""
    space = prepared.space
    absent, unsupported = [], []
    for name, choices in dropped.items():
        for choice in choices:
            why = prepared.unsupported_choices.get(name, {}).get(str(choice))
            if why:
                unsupported.append(f"{name} {choice} ({why})")
            else:
                absent.append(f"{name} {choice} (not in {space.source})")
    parts, advice = [], []
    if absent:
        parts.append("choices this run's space does not: " + ", ".join(absent))
        advice.append("resume it with the space it searches")
    if unsupported:
        parts.append("choices that cannot run here: " + ", ".join(unsupported))
        advice.append("resume it where they run")
    raise UsageError(
        f"study {prepared.study_name} searches "
        + "; and ".join(parts)
        + "; "
        + ", or ".join(advice)
        + ", or start a new study with --study"
    )


def held_choices(study: Any) -> dict[str, tuple[Any, ...]]:
    """The choices the study's trials sampled each categorical parameter from, which Optuna
    requires of every later trial."""
    from optuna.distributions import CategoricalDistribution

    held: dict[str, tuple[Any, ...]] = {}
    for trial in study.get_trials(deepcopy=False):
        for name, distribution in trial.distributions.items():
            if isinstance(distribution, CategoricalDistribution):
                held.setdefault(name, tuple(distribution.choices))
    return held
