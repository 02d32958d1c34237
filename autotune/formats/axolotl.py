"""A recipe as an axolotl configuration."""

from __future__ import annotations

import copy
from typing import Any

from autotune.attentions import ATTENTIONS
from autotune.batchings import BATCHINGS
from autotune.distributed import axolotl_keys
from autotune.formats.freeze import layout_or_llama, unfrozen_parameters
from autotune.formats.trainer_keys import (
    HF_SCHEDULERS,
    half_flags,
    target_list,
    trains_half_without_autocast,
    warmup,
)
from autotune.losses import LOSSES
from autotune.optimizers import MAX_GRAD_NORM, OPTIMIZERS
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import Recipe
from autotune.training.freeze import FreezeLayout


def axolotl_half_flags(recipe: Recipe) -> dict[str, bool]:
    """axolotl's bf16/fp16 are TrainingArguments' (autocast) and also its model's dtype
    (resolve_dtype, src/axolotl/utils/config/__init__.py). Its `float16` ("No AMP") loads the
    model in fp16 and leaves TrainingArguments' fp16 off (_configure_precision_settings in
    src/axolotl/core/builders/base.py: fp16 = cfg.fp16 and not cfg.bf16; axolotl-ai-cloud/axolotl
    067b021c): an fp16 recipe trains as the probe ran it. Its `bfloat16`, documented "No AMP"
    too, turns TrainingArguments' bf16 on all the same (there: bf16 = cfg.bf16 or cfg.bfloat16),
    so a bf16 recipe keeps bf16: true and its header says axolotl autocasts."""
    flags = half_flags(recipe)
    if trains_half_without_autocast(recipe) and flags["fp16"]:
        flags.update(fp16=False, float16=True)
    return flags


def _axolotl_dataset(data_path: str | None, data_format: str) -> dict[str, Any]:
    kinds = {"alpaca": "alpaca", "chat": "chat_template", "text": "completion"}
    entry: dict[str, Any] = {"path": data_path or "train.jsonl", "ds_type": "json"}
    if data_format == "input_output":
        entry["type"] = {
            "field_instruction": "input",
            "field_output": "output",
            "format": "{instruction}\n",
            "no_input_format": "{instruction}\n",
        }
    else:
        entry["type"] = kinds.get(data_format, "alpaca")
    if data_format == "chat":
        # the end of each trained turn carries loss, as autotune's chat rows do (docs/data.md)
        entry.update(field_messages="messages", roles_to_train=["assistant"], train_on_eos="turn")
    return entry


def axolotl_config(
    recipe: Recipe,
    data_path: str | None = None,
    data_format: str = "alpaca",
    num_layers: int | None = None,
    output_dir: str = "outputs/autotune",
    freeze_layout: FreezeLayout | None = None,
    tied_head: bool | None = None,
) -> dict[str, Any]:
    """`freeze_layout`: where the model keeps what a freeze recipe trains (None: the Llama
    family's, of `num_layers` blocks, with `tied_head` whether its head is its input
    embedding, None: not known)."""
    config: dict[str, Any] = {
        "base_model": recipe.model,
        "load_in_8bit": QUANTIZATIONS[recipe.quantization].bits == 8,
        "load_in_4bit": QUANTIZATIONS[recipe.quantization].bits == 4,
        "datasets": [_axolotl_dataset(data_path, data_format)],
        "val_set_size": 0.05,
        "output_dir": output_dir,
        "sequence_len": recipe.seq_len,
        "micro_batch_size": recipe.micro_batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "num_epochs": 1,
        "optimizer": OPTIMIZERS[recipe.optimizer].trainer_name,
        "learning_rate": recipe.learning_rate,
        # set, it goes to TrainingArguments (_set_base_training_args in
        # src/axolotl/core/builders/base.py), whose Trainer clips where it is > 0; unset, 1.0
        "max_grad_norm": MAX_GRAD_NORM,
        "lr_scheduler": HF_SCHEDULERS[recipe.lr_schedule],
        # axolotl keeps the two apart: warmup_steps counts steps, warmup_ratio is a share
        ("warmup_steps" if recipe.warmup_steps is not None else "warmup_ratio"): warmup(recipe),
        "train_on_inputs": False,
        "gradient_checkpointing": recipe.gradient_checkpointing,
        **axolotl_half_flags(recipe),
    }
    config.update(BATCHINGS[recipe.batching].axolotl)
    config.update(copy.deepcopy(LOSSES[recipe.loss].axolotl))
    config.update(ATTENTIONS[recipe.attention].axolotl)
    config.update(axolotl_keys(recipe))
    if recipe.activation_offload:
        config["activation_offloading"] = True  # saved activations to host memory
    if recipe.method == "lora":
        config.update(
            adapter="qlora" if QUANTIZATIONS[recipe.quantization].bits == 4 else "lora",
            lora_r=recipe.lora_r,
            lora_alpha=recipe.lora_alpha,
            lora_dropout=recipe.lora_dropout,
        )
        if recipe.use_dora:
            config["peft_use_dora"] = True
        if recipe.lora_target_modules == "all-linear":
            config["lora_target_linear"] = True
        else:
            config["lora_target_modules"] = target_list(recipe)
    elif recipe.method == "freeze":
        # Everything not listed stays frozen: the decoder blocks from frozen_layers up (only
        # their attention or MLP where train_modules says so), the final norm and an untied head.
        layout = layout_or_llama(recipe, freeze_layout, num_layers, tied_head)
        config["unfrozen_parameters"] = unfrozen_parameters(recipe, layout)
    return config
