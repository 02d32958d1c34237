"""A recipe as transformers' own configuration: TrainingArguments, LoraConfig and
BitsAndBytesConfig keyword arguments, and an `accelerate launch` config for its GPUs."""

from __future__ import annotations

import copy
from typing import Any

from autotune.batchings import BATCHINGS
from autotune.distributed import accelerate_keys, hf_training_keys
from autotune.formats.freeze import layout_or_llama, trainable_parameters
from autotune.formats.trainer_keys import schedule_keys, target_list, trainer_half_flags
from autotune.losses import LOSSES
from autotune.optimizers import MAX_GRAD_NORM, OPTIMIZERS
from autotune.precisions import PRECISIONS
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import Recipe
from autotune.training.freeze import FreezeLayout


def hf_config(
    recipe: Recipe,
    output_dir: str = "outputs/autotune",
    freeze_layout: FreezeLayout | None = None,
    num_layers: int | None = None,
    tied_head: bool | None = None,
) -> dict[str, Any]:
    """Keyword arguments of TrainingArguments, LoraConfig and BitsAndBytesConfig; for a freeze
    recipe, the parameters that train as regular expressions (`freeze_layout`: the model's,
    None: the Llama family's, of `num_layers` blocks, with `tied_head` whether its head is its
    input embedding, None: not known)."""
    training = {
        "output_dir": output_dir,
        "per_device_train_batch_size": recipe.micro_batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "learning_rate": recipe.learning_rate,
        **schedule_keys(recipe),
        "optim": OPTIMIZERS[recipe.optimizer].trainer_name,
        "max_grad_norm": MAX_GRAD_NORM,  # Trainer clips where > 0 (its default 1.0)
        "gradient_checkpointing": recipe.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        **trainer_half_flags(recipe),
    }
    training.update(copy.deepcopy(LOSSES[recipe.loss].trainer))
    training.update(hf_training_keys(recipe))
    config: dict[str, Any] = {
        "model_name_or_path": recipe.model,
        "max_length": recipe.seq_len,  # TRL's SFTConfig name (it dropped max_seq_length)
        "attn_implementation": recipe.attention,
        # from_pretrained's dtype: the weights as the probe held them (bf16 trains bf16
        # weights; amp_bf16 fp32 weights under autocast, a k-bit base's others in bf16); left
        # out, the checkpoint's own
        "dtype": PRECISIONS[recipe.precision].load_dtype(recipe.quantization != "none"),
        "training_arguments": training,
    }
    if recipe.method == "lora":
        config["lora_config"] = {
            "r": recipe.lora_r,
            "lora_alpha": recipe.lora_alpha,
            "lora_dropout": recipe.lora_dropout,
            "target_modules": target_list(recipe),
            "task_type": "CAUSAL_LM",
        }
        if recipe.use_dora:
            config["lora_config"]["use_dora"] = True
    bitsandbytes_config = QUANTIZATIONS[recipe.quantization].bitsandbytes_config
    if bitsandbytes_config is not None:
        # the probe's compute dtype (build.quantization_config): an fp32 recipe's 4-bit
        # matmuls run in fp32 there, not in bf16
        config["bits_and_bytes_config"] = bitsandbytes_config(
            PRECISIONS[recipe.precision].compute_dtype
        )
    if recipe.method == "freeze":
        config["frozen_layers"] = recipe.frozen_layers
        if recipe.train_modules != "all":
            config["train_modules"] = recipe.train_modules
        layout = layout_or_llama(recipe, freeze_layout, num_layers, tied_head)
        config["trainable_parameters"] = trainable_parameters(recipe, layout)
    sft_config = BATCHINGS[recipe.batching].sft_config
    if sft_config is not None:
        # TRL's SFTConfig: packing to max_length, or padding-free micro-batches; without it
        # TRL packs rows of its default 1024 tokens, not the seq_len the probe measured
        config["sft_config"] = {**sft_config, "max_length": recipe.seq_len}
    return config


def accelerate_config(recipe: Recipe) -> dict[str, Any]:
    """An `accelerate launch --config_file` config: the machine's processes and the strategy;
    the training keys go to the script it launches (export --format hf)."""
    half = trainer_half_flags(recipe)
    return {
        "compute_environment": "LOCAL_MACHINE",
        "mixed_precision": "bf16" if half["bf16"] else "fp16" if half["fp16"] else "no",
        "use_cpu": False,
        "debug": False,
        **accelerate_keys(recipe),
    }
