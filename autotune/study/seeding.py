"""What the sampler is given besides its own proposals: the per-trial memory prediction, the
enqueued baselines, and the nearest recipe that fits when a proposal does not.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from autotune.memory import ALLOCATOR_FIXED_BYTES, MemoryEstimate
from autotune.model_spec import ModelSpec
from autotune.prediction import (
    formula_estimate,
    predict,
    probe_rows,
    replay_in_worker,
    replay_key,
)
from autotune.recipe import Recipe
from autotune.space import SearchSpace
from autotune.study.pruning import held_peak_bytes, with_formula_margin
from autotune.study.settings import BASELINES, REPLAY_BAND, PreparedRun, RunSettings

Predicted = tuple[MemoryEstimate, str]
"""A recipe's predicted peak and the memory model that gave it ("replay" or "formula")."""


def replayed_at(formula_peak_bytes: int, settings: RunSettings, model_config: Any) -> bool:
    """Whether a trial whose recipe the formula puts at `formula_peak_bytes` is held to the
    replay (where it can run): with --memory-model replay, within REPLAY_BAND of the budget once
    the formula's fixed allocator reserve is left out (REPLAY_BAND)."""
    return (
        settings.memory_model == "replay"
        and model_config is not None
        and formula_peak_bytes - ALLOCATOR_FIXED_BYTES <= REPLAY_BAND * settings.budget_bytes
    )


def held_predictor(
    spec: ModelSpec,
    model_config: Any,
    settings: RunSettings,
    token_lengths: tuple[int, int] | None,
    predicted: dict[str, Predicted] | None = None,
) -> Callable[[Recipe], Predicted]:
    """The prediction a trial's recipe is held to the budget by: the replay (in a worker
    process that sees no GPU, once per recipe as memory sees it; `predicted` holds those made,
    by replay_key) where the formula puts the recipe within REPLAY_BAND of the budget, the
    formula elsewhere and where the replay cannot run; either told of the rows data whose
    examples span `token_lengths` gives the probe's micro-batches (probe_rows)."""
    replayed = {} if predicted is None else predicted

    def predict_held(recipe: Recipe) -> Predicted:
        formula = formula_estimate(spec, recipe, token_lengths)
        if not replayed_at(formula.peak_bytes, settings, model_config):
            return formula, "formula"
        key = replay_key(recipe, probe_rows(recipe, token_lengths))
        if key not in replayed:
            result, used, _ = predict(
                spec, recipe, model_config, run=replay_in_worker, token_lengths=token_lengths
            )
            replayed[key] = (result, used)
        return replayed[key]

    return predict_held


def trial_predictor(prepared: PreparedRun) -> Callable[[Recipe], Predicted]:
    """Each trial's predicted peak and the model that gave it (held_predictor), starting from
    the replays the space's sizing made (PreparedRun.replayed)."""
    return held_predictor(
        prepared.spec,
        prepared.model_config,
        prepared.settings,
        prepared.train_token_lengths,
        dict(prepared.replayed),
    )


CONFIRMED_CANDIDATES = 4
"""At most this many recipes of one choice among several (the nearest that fits a trial over
the budget, a baseline's largest micro-batch) are predicted as their trials would be: a replay
each, seconds on a 7B model. The formula ranks them first (BudgetCheck.first_fitting)."""


class BudgetCheck:
    """Whether the recipe a set of trial parameters stands for fits the budget as its trial is
    held to it (held_predictor, with its margin, on the rows the data gives the probe): a
    choice the replay keeps in the space where the formula rules it out (a full fine-tune of
    the demo at 1GB) has recipes to choose among, as a trial's repair or a baseline's
    micro-batch, and what is chosen is not itself ruled out when its trial runs. `held` is the
    trials' predictor (default: one that keeps its replays in PreparedRun.replayed, where the
    trials' predictions start), so a chosen recipe's trial finds its replay made."""

    def __init__(
        self, prepared: PreparedRun, held: Callable[[Recipe], Predicted] | None = None
    ) -> None:
        self.prepared = prepared
        settings = prepared.settings
        self.held = held or held_predictor(
            prepared.spec,
            prepared.model_config,
            settings,
            prepared.train_token_lengths,
            prepared.replayed,
        )

    def _recipe(self, params: dict[str, Any]) -> Recipe:
        settings = self.prepared.settings
        return self.prepared.space.build(
            params, settings.model, self.prepared.spec, settings.seq_len
        )

    def __call__(self, params: dict[str, Any]) -> bool:
        settings = self.prepared.settings
        peak, _ = held_peak_bytes(self._recipe(params), self.held, settings.memory_margin)
        return peak <= settings.budget_bytes

    def formula_rank(self, params: dict[str, Any]) -> int | None:
        """0 where the formula, with its margin, fits the recipe; 1 where it does not but the
        replay its trial would be held to may (within REPLAY_BAND of the budget); None where
        the trial's prediction puts it over the budget whatever (held_predictor's rule)."""
        settings, prepared = self.prepared.settings, self.prepared
        recipe = self._recipe(params)
        estimate = formula_estimate(prepared.spec, recipe, prepared.train_token_lengths)
        if with_formula_margin(estimate, recipe, settings.memory_margin) <= settings.budget_bytes:
            return 0
        return 1 if replayed_at(estimate.peak_bytes, settings, prepared.model_config) else None

    def first_fitting(self, candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The first of `candidates` (in the order they are preferred) that fits as its trial
        would be held: those the formula fits first, then those only the replay may fit; at
        most CONFIRMED_CANDIDATES of them predicted so."""
        ranks = [self.formula_rank(candidate) for candidate in candidates]
        ranked = sorted((rank, order) for order, rank in enumerate(ranks) if rank is not None)
        for _, order in ranked[:CONFIRMED_CANDIDATES]:
            if self(candidates[order]):
                return candidates[order]
        return None


def fits_budget(
    prepared: PreparedRun, held: Callable[[Recipe], Predicted] | None = None
) -> BudgetCheck:
    """Whether the recipe a set of trial parameters stands for fits the budget as its trial
    would be held to it (BudgetCheck)."""
    return BudgetCheck(prepared, held)


def first_fitting(
    candidates: list[dict[str, Any]], fits: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """The first of `candidates` that `fits`: a BudgetCheck's choice (the formula ranks, the
    trials' model confirms a few), else the first `fits` says fits."""
    if isinstance(fits, BudgetCheck):
        return fits.first_fitting(candidates)
    return next((candidate for candidate in candidates if fits(candidate)), None)


REPAIR_DIMENSIONS = ("gradient_checkpointing", "micro_batch_size", "optimizer")
"""What a recipe over the budget may change to fit: they change speed, not what is learnt."""


def nearest_fitting_params(
    space: SearchSpace, params: dict[str, Any], fits: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """The recipe closest to `params` that fits: fewest of REPAIR_DIMENSIONS changed, then the
    largest micro-batch, then the order the space lists choices in (as first_fitting chooses
    among them); None when none fits."""
    candidates = []
    pools = [space.choices_of(name) for name in REPAIR_DIMENSIONS]
    for values in itertools.product(*pools):
        changed = dict(zip(REPAIR_DIMENSIONS, values))
        distance = sum(changed[k] != params.get(k) for k in REPAIR_DIMENSIONS)
        if distance:
            candidates.append((distance, -changed["micro_batch_size"], {**params, **changed}))
    return first_fitting([c for _, _, c in sorted(candidates, key=lambda c: c[:2])], fits)


def baseline_params(
    space: SearchSpace, fits: Callable[[dict[str, Any]], bool] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """BASELINES, each moved to the nearest point the space can express (duplicates dropped);
    with `fits`, a "largest" micro-batch is the largest that fits the budget."""
    chosen: list[tuple[str, dict[str, Any]]] = []
    for baseline_name, preferences in BASELINES.items():
        if preferences["method"] not in space.choices_of("method"):
            continue
        # a point of the space: each parameter of the method as the baseline prefers it
        # (params_like: where it is a choice, else the first), "smallest"/"largest" of the
        # choices, or the nearest number
        params = space.params_like(preferences)
        for name, choices in ((n, space.choices_of(n)) for n in params if n != "method"):
            wanted = preferences.get(name)
            if wanted == "smallest":
                params[name] = min(choices)
            elif wanted == "largest":
                params[name] = max(choices)
            elif wanted not in choices and _is_number(wanted):
                if all(_is_number(c) for c in choices):
                    params[name] = min(choices, key=lambda c: abs(c - wanted))
        if fits and preferences["micro_batch_size"] == "largest":
            sizes = sorted(space.choices_of("micro_batch_size"), reverse=True)
            largest = first_fitting([{**params, "micro_batch_size": s} for s in sizes], fits)
            params = largest or params
        if all(params != other for _, other in chosen):
            chosen.append((baseline_name, params))
    return chosen


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
