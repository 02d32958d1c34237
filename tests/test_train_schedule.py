"""The learning-rate schedule of `autotune train`: warm-up to the peak, then cosine or linear
decay to 0, or constant; recipe keys lr_schedule and warmup_steps, exported to other tools."""

from __future__ import annotations

import math

import pytest
import torch

from autotune.errors import UsageError
from autotune.formats import axolotl_config, hf_config, llamafactory_config
from autotune.recipe import Recipe
from autotune.training.schedule import lr_factor, warmup_steps

PEAK = 1e-3


def recipe(**changes) -> Recipe:
    return Recipe.from_dict({"model": "m", "method": "lora", "learning_rate": PEAK, **changes})


def learning_rates(recipe: Recipe, total_steps: int) -> list[float]:
    """The learning rate of each step, as torch's scheduler sets it on a real optimizer."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=recipe.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe, total_steps))
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_cosine_rises_over_the_warm_up_then_falls_along_a_half_cosine():
    rates = learning_rates(recipe(lr_schedule="cosine", warmup_steps=2), 10)
    decay = [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]  # steps 2..9 of 8
    assert rates == pytest.approx([PEAK / 2, PEAK] + [PEAK * f for f in decay])
    assert rates[6] == pytest.approx(PEAK / 2)  # half-way through the decay
    assert max(rates) == pytest.approx(PEAK)  # learning_rate is the peak


def test_linear_and_constant_and_no_warm_up():
    linear = learning_rates(recipe(lr_schedule="linear", warmup_steps=0), 4)
    assert linear == pytest.approx([PEAK, 0.75 * PEAK, 0.5 * PEAK, 0.25 * PEAK])
    constant = learning_rates(recipe(lr_schedule="constant", warmup_steps=3), 6)
    assert constant == pytest.approx([PEAK / 3, 2 * PEAK / 3] + [PEAK] * 4)


def test_default_is_cosine_with_three_percent_warm_up():
    default = recipe()
    assert default.lr_schedule == "cosine" and default.warmup_steps is None
    assert warmup_steps(default, 1000) == 30 and warmup_steps(default, 10) == 1
    rates = learning_rates(default, 1000)
    assert rates[29] == pytest.approx(PEAK) and rates[28] < PEAK
    assert rates[29 + 485] == pytest.approx(PEAK / 2, rel=1e-2)


def test_schedule_keys_are_validated_and_round_trip():
    with pytest.raises(UsageError, match="lr_schedule 'step' is not one of cosine, linear"):
        recipe(lr_schedule="step")
    for bad in (-1, 2.5, True):
        with pytest.raises(UsageError, match="warmup_steps must be an integer >= 0"):
            recipe(warmup_steps=bad)
    chosen = recipe(lr_schedule="linear", warmup_steps=50)
    assert Recipe.from_yaml(chosen.to_yaml()) == chosen
    assert "warmup_steps" not in recipe().to_dict()  # left out: 3% of the run
    assert Recipe.from_yaml(recipe().to_yaml()) == recipe()


def test_exports_carry_the_schedule(tmp_path):
    from transformers import TrainingArguments

    default, chosen = recipe(), recipe(lr_schedule="constant", warmup_steps=50)
    hf_default = hf_config(default)["training_arguments"]
    assert (hf_default["lr_scheduler_type"], hf_default["warmup_steps"]) == ("cosine", 0.03)
    hf_chosen = hf_config(chosen)["training_arguments"]
    assert (hf_chosen["lr_scheduler_type"], hf_chosen["warmup_steps"]) == (
        "constant_with_warmup",
        50,
    )
    for training in (hf_default, hf_chosen):  # transformers itself accepts them
        keys = ("lr_scheduler_type", "warmup_steps", "learning_rate")
        TrainingArguments(output_dir=str(tmp_path), **{k: training[k] for k in keys})
    axolotl = axolotl_config(default, "d.jsonl", "chat")
    assert (axolotl["lr_scheduler"], axolotl["warmup_ratio"]) == ("cosine", 0.03)
    assert axolotl_config(chosen, "d.jsonl", "chat")["warmup_steps"] == 50
    # LLaMA-Factory runs on transformers 4.55-5.6; 4's warmup_steps counts whole steps: the share
    # goes as warmup_ratio (0.03 as warmup_steps would be no warm-up at all)
    factory = llamafactory_config(recipe(lr_schedule="linear"))
    assert (factory["lr_scheduler_type"], factory["warmup_ratio"]) == ("linear", 0.03)
    assert "warmup_steps" not in factory
    assert llamafactory_config(chosen)["warmup_steps"] == 50 and "warmup_ratio" not in (
        llamafactory_config(chosen)
    )
