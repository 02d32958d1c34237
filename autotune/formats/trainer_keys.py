"""What the exports to Trainer-based tools (transformers' Trainer, accelerate, axolotl,
LLaMA-Factory) share: their half-precision flags, the learning-rate schedule, LoRA targets."""

from __future__ import annotations

from typing import Any

from autotune.distributed import DISTRIBUTED
from autotune.precisions import PRECISIONS
from autotune.recipe import WARMUP_FRACTION, Recipe

HF_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
"""lr_schedule -> transformers' lr_scheduler_type (each with a linear warm-up, as autotune's)."""


def half_flags(recipe: Recipe) -> dict[str, bool]:
    """bf16/fp16 flags as Trainer-based tools read them: the recipe's compute dtype."""
    return {
        "bf16": PRECISIONS[recipe.precision].compute_dtype == "bfloat16",
        "fp16": PRECISIONS[recipe.precision].compute_dtype == "float16",
    }


def trains_half_without_autocast(recipe: Recipe) -> bool:
    """The probe trains this recipe's weights in their own half dtype, with no autocast, where a
    Trainer-based tool's bf16/fp16 would add one: transformers' Trainer hands them to accelerate
    as mixed_precision, whose Accelerator (native_amp) wraps the forward in torch.autocast. Not
    under DeepSpeed: there the flags choose DeepSpeed's own 16-bit mode, which the probe runs
    (deepspeed_engine.probe_config), and accelerate autocasts nothing (native_amp stays off)."""
    precision = PRECISIONS[recipe.precision]
    return (
        not precision.autocast
        and precision.compute_dtype != "float32"
        and not DISTRIBUTED[recipe.distributed].uses_deepspeed
    )


def trainer_half_flags(recipe: Recipe) -> dict[str, bool]:
    """The flags for transformers' Trainer and accelerate: on for an amp_* recipe (autocast, and
    fp16's loss scaler, over fp32 weights) and DeepSpeed's 16-bit modes; off for weights that
    train in their half dtype, which load so through the hf export's `dtype`. (Trainer's bf16
    there would add autocast, with its copies of fp32 heads, norms and adapters, and have
    accelerate's FSDP2 upcast the trained weights to fp32: fsdp2_prepare_model.)"""
    if trains_half_without_autocast(recipe):
        return {"bf16": False, "fp16": False}
    return half_flags(recipe)


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
