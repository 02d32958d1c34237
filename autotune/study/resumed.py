"""The space of a resumed study: Optuna samples a parameter from one set of choices for the life
of a study, so a resumed run searches the choices the study holds, adds the dimensions it did not
search, and refuses a space that drops choices it searches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from autotune.errors import UsageError
from autotune.space import SearchSpace
from autotune.study.settings import PreparedRun
from autotune.study.study_records import SpaceChoices


def resumed_space(
    prepared: PreparedRun, stored: SpaceChoices, held: dict[str, tuple[Any, ...]]
) -> tuple[SearchSpace, SpaceChoices, list[str]]:
    """The space of a study being resumed, the choices the study searches from this run on and
    notes that say how they differ from this run's space file. Optuna samples a parameter from
    one fixed set of choices for the life of a study (`held`: the choices its trials were
    sampled from, by parameter), so a dimension the study searches keeps the choices it started
    with: one it holds that this run does not search (the space file changed, or the model
    cannot run it) is refused in one line before any trial, and one this run would add to it is
    left out, which a note says. A dimension the study did not search (its earlier space fixed
    it), which this run's space searches, is new to Optuna: it is searched from this run on,
    with the choices that fit the budget, and the study records it."""
    space = prepared.space
    dropped = {
        name: [c for c in kept if c not in space.choices_by_parameter.get(name, ())]
        for name, kept in stored.fitting.items()
    }
    dropped = {name: choices for name, choices in dropped.items() if choices}
    if dropped:
        reasons = []
        for name, choices in dropped.items():
            for choice in choices:
                why = prepared.unsupported_choices.get(name, {}).get(str(choice))
                reasons.append(f"{name} {choice} ({why or f'not in {space.source}'})")
        raise UsageError(
            f"study {prepared.study_name} searches choices this run's space does not: "
            + ", ".join(reasons)
            + "; resume it with the space it searches, or start a new study with --study"
        )
    new = {
        name: fitting
        for name, fitting in prepared.fitting_choices.items()
        if name not in stored.fitting
    }
    resumed = space.restricted({**stored.fitting, **new})
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
    searched_now = {name: choices for name, choices in new.items() if resumed.searched(name)}
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
        name: [c for c in fitting if c not in stored.fitting[name]]
        for name, fitting in prepared.fitting_choices.items()
        if name in stored.fitting
    }
    added = {name: choices for name, choices in added.items() if choices}
    if added:
        notes.append(
            f"study {prepared.study_name} keeps the choices it searches; not searched: "
            + ", ".join(f"{name} {', '.join(map(str, choices))}" for name, choices in added.items())
            + " (start a new study with --study to search them)"
        )

    def with_new(stored_part: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
        """What the study stored of each dimension, and this run's of those it adds."""
        return {**stored_part, **{name: current[name] for name in new if name in current}}

    # what the study searches that this run's budget rules out (a smaller --budget): Optuna
    # still samples it, and the objective records its trials as over the budget, unprobed
    over_budget = {
        name: {
            str(choice): prepared.ruled_out_choices[name][str(choice)]
            for choice in kept
            if str(choice) in prepared.ruled_out_choices.get(name, {})
        }
        for name, kept in stored.fitting.items()
    }
    over_budget = {name: peaks for name, peaks in over_budget.items() if peaks}
    models = with_new(stored.ruled_out_models, prepared.ruled_out_models)
    for name, peaks in over_budget.items():
        now = prepared.ruled_out_models.get(name, {})
        models[name] = {**models.get(name, {}), **{c: now[c] for c in peaks if c in now}}
    # a choice the study left out when it was sized that fits this run's budget (a larger
    # --budget) is not searched for that reason now
    kept_out = {name: [str(choice) for choice in choices] for name, choices in added.items()}
    ruled_out = {
        name: {c: peak for c, peak in peaks.items() if c not in kept_out.get(name, ())}
        for name, peaks in stored.ruled_out.items()
    }
    searched = SpaceChoices(
        {**stored.fitting, **new},
        with_new(
            {name: peaks for name, peaks in ruled_out.items() if peaks}, prepared.ruled_out_choices
        ),
        with_new(stored.unsupported, prepared.unsupported_choices),
        models,
        over_budget,
        kept_out,
    )
    return resumed, searched, notes


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
