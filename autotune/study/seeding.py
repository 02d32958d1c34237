"""What the sampler is given besides its own proposals: the per-trial memory prediction, the
enqueued baselines, and the nearest recipe that fits when a proposal does not.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from autotune.memory import MemoryEstimate
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
from autotune.study.pruning import margined_peak_bytes
from autotune.study.settings import BASELINES, REPLAY_BAND, PreparedRun, RunSettings


def fits_budget(prepared: PreparedRun) -> Callable[[dict[str, Any]], bool]:
    """Whether the recipe a set of trial parameters stands for is predicted to fit the budget
    (the formula's prediction, with its margin, of the rows the data gives the probe)."""
    settings = prepared.settings

    def fits(params: dict[str, Any]) -> bool:
        recipe = prepared.space.build(params, settings.model, prepared.spec, settings.seq_len)
        peak = margined_peak_bytes(
            prepared.spec, recipe, prepared.train_token_lengths, settings.memory_margin
        )
        return peak <= settings.budget_bytes

    return fits


Predicted = tuple[MemoryEstimate, str]
"""A recipe's predicted peak and the memory model that gave it ("replay" or "formula")."""


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
        if (
            settings.memory_model != "replay"
            or model_config is None
            or formula.peak_bytes > REPLAY_BAND * settings.budget_bytes
        ):
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


REPAIR_DIMENSIONS = ("gradient_checkpointing", "micro_batch_size", "optimizer")
"""What a recipe over the budget may change to fit: they change speed, not what is learnt."""


def nearest_fitting_params(
    space: SearchSpace, params: dict[str, Any], fits: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """The recipe closest to `params` that fits: fewest of REPAIR_DIMENSIONS changed, then the
    largest micro-batch, then the order the space lists choices in; None when none fits."""
    candidates = []
    pools = [space.choices_of(name) for name in REPAIR_DIMENSIONS]
    for values in itertools.product(*pools):
        changed = dict(zip(REPAIR_DIMENSIONS, values))
        distance = sum(changed[k] != params.get(k) for k in REPAIR_DIMENSIONS)
        if distance:
            candidates.append((distance, -changed["micro_batch_size"], {**params, **changed}))
    for _, _, candidate in sorted(candidates, key=lambda c: c[:2]):
        if fits(candidate):
            return candidate
    return None


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
            for size in sorted(space.choices_of("micro_batch_size"), reverse=True):
                if fits({**params, "micro_batch_size": size}):
                    params["micro_batch_size"] = size
                    break
        if all(params != other for _, other in chosen):
            chosen.append((baseline_name, params))
    return chosen


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
