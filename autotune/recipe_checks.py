"""The checks a recipe must pass: each field against its registry or range, and the fields that
make sense only together (LoRA keys for method lora, frozen layers for freeze, ...).
`Recipe.validate` runs them; they report every problem at once.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard, get_args

from autotune.attentions import ATTENTIONS
from autotune.batchings import BATCHINGS
from autotune.distributed import DISTRIBUTED
from autotune.distributed import schema_problems as distributed_problems
from autotune.losses import LOSSES
from autotune.optimizers import OPTIMIZERS
from autotune.precisions import PRECISIONS
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import (
    LEFT_OUT_METHODS,
    LORA_KEYS,
    OFF_BY_DEFAULT,
    UPPER_BOUNDS,
    LrSchedule,
    Method,
    Recipe,
    TrainModules,
)


def _choices(literal: Any) -> tuple[str, ...]:
    return get_args(literal)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[float]:
    """A finite int or float (not a bool, not nan or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def recipe_problems(recipe: Recipe) -> list[str]:
    """Every way this recipe contradicts itself or the schema (empty when it is sound)."""
    problems: list[str] = []
    for name, registry in (
        ("method", _choices(Method)),
        ("loss", LOSSES),
        ("lr_schedule", _choices(LrSchedule)),
        ("train_modules", _choices(TrainModules)),
        ("quantization", QUANTIZATIONS),
        ("precision", PRECISIONS),
        ("optimizer", OPTIMIZERS),
        ("attention", ATTENTIONS),
        ("batching", BATCHINGS),
    ):
        value = getattr(recipe, name)
        if not isinstance(value, str):  # a list or mapping cannot be looked up in a registry
            problems.append(f"{name} {value!r} is not one of {', '.join(registry)}")
        elif name == "method" and value in LEFT_OUT_METHODS:
            problems.append(f"method {value} is left out: {LEFT_OUT_METHODS[value]}")
        elif value not in registry:
            problems.append(f"{name} {value!r} is not one of {', '.join(registry)}")
    if not isinstance(recipe.model, str):
        problems.append(f"model must be a hub id or a directory, got {recipe.model!r}")
    for name in ("micro_batch_size", "gradient_accumulation_steps", "seq_len"):
        value = getattr(recipe, name)
        if not _is_int(value) or not 1 <= value <= UPPER_BOUNDS[name]:
            problems.append(
                f"{name} must be an integer from 1 to {UPPER_BOUNDS[name]}, got {value!r}"
            )
    frozen = recipe.frozen_layers
    if not _is_int(frozen) or not 0 <= frozen <= UPPER_BOUNDS["frozen_layers"]:
        problems.append(f"frozen_layers must be an integer >= 0, got {recipe.frozen_layers!r}")
    for name in ("gradient_checkpointing", "expandable_segments", *OFF_BY_DEFAULT):
        if not isinstance(getattr(recipe, name), bool):
            problems.append(f"{name} must be true or false, got {getattr(recipe, name)!r}")
    if not _is_number(recipe.learning_rate) or recipe.learning_rate <= 0:
        problems.append(
            f"learning_rate must be a finite number above 0, got {recipe.learning_rate!r}"
        )
    warmup = recipe.warmup_steps
    if warmup is not None and (not _is_int(warmup) or warmup < 0):
        problems.append(f"warmup_steps must be an integer >= 0 (or left out), got {warmup!r}")
    if recipe.method == "lora":
        if not _is_int(recipe.lora_r) or not 1 <= recipe.lora_r <= UPPER_BOUNDS["lora_r"]:
            problems.append(
                f"lora_r must be an integer from 1 to {UPPER_BOUNDS['lora_r']}, "
                f"got {recipe.lora_r!r}"
            )
        if not _is_number(recipe.lora_alpha) or recipe.lora_alpha <= 0:
            problems.append(
                f"lora_alpha must be a positive finite number, got {recipe.lora_alpha!r}"
            )
        dropout = recipe.lora_dropout
        if not _is_number(dropout) or not 0 <= dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {dropout!r}")
        targets = recipe.lora_target_modules
        if not (
            targets == "all-linear"
            or (isinstance(targets, tuple) and targets and all(isinstance(t, str) for t in targets))
        ):
            problems.append("lora_target_modules must be all-linear or a non-empty list of names")
        if recipe.frozen_layers:
            problems.append("frozen_layers is for method freeze; LoRA already freezes the base")
    else:
        present = [k for k in LORA_KEYS if getattr(recipe, k) is not None]
        if present:
            problems.append(f"{', '.join(present)} given but method is {recipe.method}, not lora")
        if recipe.quantization != "none":
            problems.append(
                f"quantization {recipe.quantization} needs method lora "
                "(quantized weights cannot be trained directly)"
            )
    if recipe.method == "freeze" and recipe.frozen_layers < 1:
        problems.append("method freeze needs frozen_layers >= 1")
    if (
        isinstance(recipe.optimizer, str)
        and isinstance(recipe.precision, str)
        and recipe.optimizer in OPTIMIZERS
        and recipe.precision in PRECISIONS
        and OPTIMIZERS[recipe.optimizer].host_states
        and PRECISIONS[recipe.precision].scales_loss
    ):
        # the gradients reach the host as backward makes them, before the scaler unscales them
        problems.append(
            f"optimizer {recipe.optimizer} cannot run with {recipe.precision}'s loss scaling"
        )
    if recipe.method != "lora" and recipe.use_dora is True:
        problems.append(f"use_dora is for method lora, not {recipe.method}")
    if recipe.method != "freeze" and recipe.train_modules != "all":
        problems.append(f"train_modules is for method freeze, not {recipe.method}")
    if recipe.method == "full" and recipe.frozen_layers:
        problems.append("frozen_layers must be 0 for method full (use method freeze)")
    return problems + distributed_problems(recipe)


def fp16_moments_refusal(recipe: Recipe) -> str:
    """Why `recipe` cannot train its weights with its optimizer ("" when it can), which
    `autotune train` refuses and a study does not probe (a sound recipe all the same, so a
    stored one still reads and its memory is still predicted): pure fp16
    weights of a full or freeze recipe with torch's AdamW, whose moments are fp16 too. The
    second moment, 0.001 x grad^2 after the first step, rounds to 0 under fp16's smallest
    number (6e-8) for gradients under about 5e-3, most of them: the foreach step divides by it
    plus eps 1e-8, itself 0 in fp16, and gives NaN at the first step; the fused kernel computes
    in fp32 but stores the moment back in fp16, so each step forgets the squared gradients
    before it and steps ever larger than AdamW's. DeepSpeed's fp16 mode keeps fp32 master
    weights and moments; LoRA's adapters are fp32; bitsandbytes' 8-bit moments are scaled
    per block."""
    named = (recipe.precision, recipe.optimizer, recipe.distributed)
    if not all(isinstance(value, str) for value in named) or recipe.method not in (
        "full",
        "freeze",
    ):
        return ""
    if recipe.precision not in PRECISIONS or recipe.optimizer not in OPTIMIZERS:
        return ""
    kind = PRECISIONS[recipe.precision]
    strategy = DISTRIBUTED.get(recipe.distributed)
    if kind.weight_dtype != "float16" or not OPTIMIZERS[recipe.optimizer].weight_dtype_moments:
        return ""
    if strategy is not None and strategy.uses_deepspeed:
        return ""
    return (
        f"precision {recipe.precision} with optimizer {recipe.optimizer} keeps method "
        f"{recipe.method}'s AdamW moments in fp16, where the second moment of gradients under "
        "about 5e-3 rounds to 0 (NaN or oversized steps); choose amp_fp16 (fp32 weights and "
        "moments, loss scaling), bf16, or adamw_8bit"
    )
