"""The study's sampler: Optuna's TPE, reading every finished trial's memory constraint held to
the study's budget now rather than to the budget of the run that stored it.

A trial stores its constraint relative to its run's budget (records.record_constraint), and
Optuna's samplers read it as stored: TPE puts a trial with a positive constraint among the
infeasible ones when it splits the trials (`_split_trials`, `_get_infeasible_trial_score`), as
NSGA-II's constrained domination and the GP sampler's feasibility model do. After a resume under
a smaller `--budget`, a recipe that fit the old budget and not the new one would still read as
feasible, and the search would go on near it. BudgetedSampler hands its sampler a view of the
study whose trials carry their constraint now (records.constraint_now); the stored trials are
not rewritten (they keep what their run measured, relative to its budget).
"""

from __future__ import annotations

import copy
from collections.abc import Container, Sequence
from typing import Any

from optuna.samplers import BaseSampler

from autotune.study.records import constraint_now
from autotune.study.study_records import StudyBudgets, study_budgets

_CONSTRAINTS_ATTR = "constraints"
"""Optuna's system attribute of a trial's constraints: the list under this key (pre-5.0, which
records.record_constraint also writes for optuna-dashboard) and one value under `constraints:NAME`
per named constraint (Trial.set_constraint)."""


def held_to_budget(trial: Any, budgets: StudyBudgets) -> Any:
    """The frozen `trial` as a sampler should read it: where its constraint against the budget
    now differs from the one it stored, a copy whose every constraint value is that one;
    otherwise the trial itself (a trial without constraints, a running one, is left as it is)."""
    stored = trial.constraints
    if not stored:
        return trial
    now = constraint_now(trial, budgets)
    if all(value == now for value in stored.values()):
        return trial
    held = copy.copy(trial)
    held.system_attrs = {
        key: (
            [now] * len(value)
            if key == _CONSTRAINTS_ATTR
            else now
            if key.startswith(f"{_CONSTRAINTS_ATTR}:")
            else value
        )
        for key, value in trial.system_attrs.items()
    }
    return held


class _StudyHeldToBudget:
    """The study as the sampler reads it: its trials held to the budget now (held_to_budget),
    everything else the study's own (storage, directions, ids)."""

    def __init__(self, study: Any) -> None:
        self._study = study
        self._budgets: StudyBudgets | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _held(self, trials: list[Any]) -> list[Any]:
        if self._budgets is None:  # read once per call of the sampler
            self._budgets = study_budgets(self._study)
        budgets = self._budgets
        return [held_to_budget(trial, budgets) for trial in trials]

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[Any] | None = None,
        use_cache: bool = False,
    ) -> list[Any]:
        return self._held(self._study._get_trials(deepcopy, states, use_cache))

    def get_trials(self, deepcopy: bool = True, states: Container[Any] | None = None) -> list[Any]:
        return self._held(self._study.get_trials(deepcopy, states))

    @property
    def trials(self) -> list[Any]:
        return self.get_trials()


def _held_view(study: Any) -> Any:
    """The view a sampler takes for the study it was called with (Optuna types it a Study)."""
    return _StudyHeldToBudget(study)


class BudgetedSampler(BaseSampler):
    """`sampler`, shown each trial's constraint under the study's budget now (a study resumed
    under another `--budget`); what it proposes and records is its own."""

    def __init__(self, sampler: BaseSampler) -> None:
        self.sampler = sampler

    def __str__(self) -> str:
        return f"BudgetedSampler({self.sampler})"

    def reseed_rng(self) -> None:
        self.sampler.reseed_rng()

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return self.sampler.infer_relative_search_space(_held_view(study), trial)

    def sample_relative(
        self, study: Any, trial: Any, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        return self.sampler.sample_relative(_held_view(study), trial, search_space)

    def sample_independent(
        self, study: Any, trial: Any, param_name: str, param_distribution: Any
    ) -> Any:
        return self.sampler.sample_independent(
            _held_view(study), trial, param_name, param_distribution
        )

    def before_trial(self, study: Any, trial: Any) -> None:
        self.sampler.before_trial(study, trial)

    def after_trial(
        self, study: Any, trial: Any, state: Any, values: Sequence[float] | None
    ) -> None:
        self.sampler.after_trial(study, trial, state, values)
