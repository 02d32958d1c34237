"""What the exports to Trainer-based tools (transformers' Trainer, accelerate, axolotl,
LLaMA-Factory) share: their half-precision flags, the learning-rate schedule, LoRA targets."""

from __future__ import annotations

from typing import Any

from autotune.precisions import PRECISIONS
from autotune.recipe import WARMUP_FRACTION, Recipe

HF_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
"""lr_schedule -> transformers' lr_scheduler_type (each with a linear warm-up, as autotune's)."""


def half_flags(recipe: Recipe) -> dict[str, bool]:
    """bf16/fp16 flags as Trainer-based tools read them (autocast, fp32 master weights)."""
    return {
        "bf16": PRECISIONS[recipe.precision].compute_dtype == "bfloat16",
        "fp16": PRECISIONS[recipe.precision].compute_dtype == "float16",
    }


def trains_fp16_weights(recipe: Recipe) -> bool:
    """Trainer-based tools' fp16 is autocast with a loss scaler, which refuses fp16 gradients
    ("Attempting to unscale FP16 gradients"): a recipe that trains fp16 weights goes without one,
    as the probe does. (A LoRA adapter's weights and gradients are fp32, peft's default: there
    the scaler works.)"""
    return recipe.method != "lora" and PRECISIONS[recipe.precision].weight_dtype == "float16"


def trainer_half_flags(recipe: Recipe) -> dict[str, bool]:
    """The flags for transformers' Trainer and accelerate: no scaler for fp16 weights."""
    flags = half_flags(recipe)
    if trains_fp16_weights(recipe):
        flags["fp16"] = False
    return flags


def warmup(recipe: Recipe) -> int | float:
    """warmup_steps, or the share of the run's steps autotune warms up over when unset."""
    return recipe.warmup_steps if recipe.warmup_steps is not None else WARMUP_FRACTION


def schedule_keys(recipe: Recipe, share_key: str = "warmup_steps") -> dict[str, Any]:
    """Trainer-based tools: transformers 5's warmup_steps takes steps (int) or a share of the
    run (float < 1); a tool on transformers 4, whose warmup_steps counts steps alone (0.03 of a
    step is no warm-up), takes the share as `share_key` (warmup_ratio)."""
    key = "warmup_steps" if recipe.warmup_steps is not None else share_key
    return {"lr_scheduler_type": HF_SCHEDULERS[recipe.lr_schedule], key: warmup(recipe)}


def target_list(recipe: Recipe) -> list[str] | str:
    targets = recipe.lora_target_modules
    return targets if isinstance(targets, str) else list(targets or ())
