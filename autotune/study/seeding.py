"""What the sampler is given besides its own proposals: the per-trial memory prediction, the
enqueued baselines, and the nearest recipe that fits when a proposal does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autotune.memory import MemoryEstimate, estimate
from autotune.recipe import Recipe
from autotune.replay import (
    predict,
    replay_in_worker,
    replay_key,
)
from autotune.space import SHARED_DIMENSIONS, SearchSpace
from autotune.study.settings import BASELINES, REPLAY_BAND, PreparedRun


def fits_budget(prepared: PreparedRun) -> Callable[[dict[str, Any]], bool]:
    """Whether the recipe a set of trial parameters stands for is predicted to fit the budget."""
    settings = prepared.settings

    def fits(params: dict[str, Any]) -> bool:
        recipe = prepared.space.build(params, settings.model, prepared.spec, settings.seq_len)
        return estimate(prepared.spec, recipe).peak_bytes <= settings.budget_bytes

    return fits


def trial_predictor(prepared: PreparedRun) -> Callable[[Recipe], tuple[MemoryEstimate, str]]:
    """Each trial's predicted peak and the model that gave it: the replay (in a worker process
    that sees no GPU, once per recipe as memory sees it) where the formula puts the recipe
    within REPLAY_BAND of the budget, the formula elsewhere and where the replay cannot run."""
    settings = prepared.settings
    predicted: dict[str, tuple[MemoryEstimate, str]] = {}

    def predict_trial(recipe: Recipe) -> tuple[MemoryEstimate, str]:
        formula = estimate(prepared.spec, recipe)
        if (
            settings.memory_model != "replay"
            or prepared.model_config is None
            or formula.peak_bytes > REPLAY_BAND * settings.budget_bytes
        ):
            return formula, "formula"
        key = replay_key(recipe)
        if key not in predicted:
            result, used, _ = predict(
                prepared.spec, recipe, prepared.model_config, run=replay_in_worker
            )
            predicted[key] = (result, used)
        return predicted[key]

    return predict_trial


REPAIR_DIMENSIONS = ("gradient_checkpointing", "micro_batch_size", "optimizer")
"""What a recipe over the budget may change to fit: they change speed, not what is learnt."""


def nearest_fitting_params(
    space: SearchSpace, params: dict[str, Any], fits: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """The recipe closest to `params` that fits: fewest of REPAIR_DIMENSIONS changed, then the
    largest micro-batch, then the order the space lists choices in; None when none fits."""
    candidates = []
    for checkpointing in space.gradient_checkpointing:
        for micro_batch in space.micro_batch_size:
            for optimizer in space.optimizer:
                changed = {
                    "gradient_checkpointing": checkpointing,
                    "micro_batch_size": micro_batch,
                    "optimizer": optimizer,
                }
                distance = sum(changed[k] != params.get(k) for k in REPAIR_DIMENSIONS)
                if distance:
                    candidates.append((distance, -micro_batch, {**params, **changed}))
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
        if preferences["method"] not in space.method:
            continue
        method = preferences["method"]
        params: dict[str, Any] = {"method": method}
        names = list(SHARED_DIMENSIONS)
        if method == "lora":
            names = ["quantization", "lora_r", "lora_target_modules"] + names
        elif method == "freeze":
            params["frozen_layers_fraction"] = space.frozen_layers_fraction[0]
        for name in names:
            choices = (
                tuple(space.lora_target_modules)
                if name == "lora_target_modules"
                else getattr(space, name)
            )
            wanted = preferences[name]
            if wanted == "smallest":
                params[name] = min(choices)
            elif wanted == "largest":
                params[name] = max(choices)
            elif wanted in choices:
                params[name] = wanted
            elif all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
                params[name] = min(choices, key=lambda c: abs(c - wanted))
            else:
                params[name] = choices[0]
        if fits and preferences["micro_batch_size"] == "largest":
            for size in sorted(space.micro_batch_size, reverse=True):
                if fits({**params, "micro_batch_size": size}):
                    params["micro_batch_size"] = size
                    break
        if all(params != other for _, other in chosen):
            chosen.append((baseline_name, params))
    return chosen
