"""A recipe in the configuration languages of other trainers: Hugging Face, axolotl, LLaMA-Factory.

Each function returns a plain mapping whose keys are the target's own option names; `render`
adds a comment header with what autotune measured, since those tools reject unknown keys.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from autotune.attentions import ATTENTIONS
from autotune.batchings import BATCHINGS
from autotune.distributed import (
    DISTRIBUTED,
    accelerate_keys,
    axolotl_keys,
    hf_training_keys,
    launch_line,
    llamafactory_keys,
)
from autotune.losses import LOSSES
from autotune.optimizers import OPTIMIZERS
from autotune.precisions import PRECISIONS
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import WARMUP_FRACTION, Recipe

EXPORT_FORMATS = ("autotune", "hf", "axolotl", "llamafactory", "accelerate")
PREDICTED_FIGURES = frozenset(
    {"predicted_peak_bytes", "memory_model", "memory_margin", "predicted_fit"}
)
"""The figures a study records beside its measurements that are the memory model's."""


def _half_flags(recipe: Recipe) -> dict[str, bool]:
    """bf16/fp16 flags as Trainer-based tools read them (autocast, fp32 master weights)."""
    return {
        "bf16": PRECISIONS[recipe.precision].compute_dtype == "bfloat16",
        "fp16": PRECISIONS[recipe.precision].compute_dtype == "float16",
    }


def _trains_fp16_weights(recipe: Recipe) -> bool:
    """Trainer-based tools' fp16 is autocast with a loss scaler, which refuses fp16 gradients
    ("Attempting to unscale FP16 gradients"): a recipe that trains fp16 weights goes without one,
    as the probe does. (A LoRA adapter's weights and gradients are fp32, peft's default: there
    the scaler works.)"""
    return recipe.method != "lora" and PRECISIONS[recipe.precision].weight_dtype == "float16"


def _trainer_half_flags(recipe: Recipe) -> dict[str, bool]:
    """The flags for transformers' Trainer and accelerate: no scaler for fp16 weights."""
    flags = _half_flags(recipe)
    if _trains_fp16_weights(recipe):
        flags["fp16"] = False
    return flags


def _axolotl_half_flags(recipe: Recipe) -> dict[str, bool]:
    """axolotl's: `float16` is its fp16 without AMP, for fp16 weights."""
    flags = _half_flags(recipe)
    if _trains_fp16_weights(recipe):
        flags.update(fp16=False, float16=True)
    return flags


HF_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
LLAMAFACTORY_MODULES = {"all": "all", "attention": "self_attn", "mlp": "mlp"}
"""LLaMA-Factory's freeze_trainable_modules for each train_modules."""
"""lr_schedule -> transformers' lr_scheduler_type (each with a linear warm-up, as autotune's)."""


def _warmup(recipe: Recipe) -> int | float:
    """warmup_steps, or the share of the run's steps autotune warms up over when unset."""
    return recipe.warmup_steps if recipe.warmup_steps is not None else WARMUP_FRACTION


def _schedule_keys(recipe: Recipe, share_key: str = "warmup_steps") -> dict[str, Any]:
    """Trainer-based tools: transformers 5's warmup_steps takes steps (int) or a share of the
    run (float < 1); a tool on transformers 4, whose warmup_steps counts steps alone (0.03 of a
    step is no warm-up), takes the share as `share_key` (warmup_ratio)."""
    key = "warmup_steps" if recipe.warmup_steps is not None else share_key
    return {"lr_scheduler_type": HF_SCHEDULERS[recipe.lr_schedule], key: _warmup(recipe)}


def _target_list(recipe: Recipe) -> list[str] | str:
    targets = recipe.lora_target_modules
    return targets if isinstance(targets, str) else list(targets or ())


def hf_config(recipe: Recipe, output_dir: str = "outputs/autotune") -> dict[str, Any]:
    """Keyword arguments of TrainingArguments, LoraConfig and BitsAndBytesConfig."""
    training = {
        "output_dir": output_dir,
        "per_device_train_batch_size": recipe.micro_batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "learning_rate": recipe.learning_rate,
        **_schedule_keys(recipe),
        "optim": OPTIMIZERS[recipe.optimizer].trainer_name,
        "gradient_checkpointing": recipe.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        **_trainer_half_flags(recipe),
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
            "target_modules": _target_list(recipe),
            "task_type": "CAUSAL_LM",
        }
        if recipe.use_dora:
            config["lora_config"]["use_dora"] = True
    bitsandbytes_config = QUANTIZATIONS[recipe.quantization].bitsandbytes_config
    if bitsandbytes_config is not None:
        compute = "float16" if _half_flags(recipe)["fp16"] else "bfloat16"
        config["bits_and_bytes_config"] = bitsandbytes_config(compute)
    if recipe.method == "freeze":
        config["frozen_layers"] = recipe.frozen_layers
        if recipe.train_modules != "all":
            config["train_modules"] = recipe.train_modules
    sft_config = BATCHINGS[recipe.batching].sft_config
    if sft_config is not None:
        # TRL's SFTConfig: packing to max_length, or padding-free micro-batches; without it
        # TRL packs rows of its default 1024 tokens, not the seq_len the probe measured
        config["sft_config"] = {**sft_config, "max_length": recipe.seq_len}
    return config


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
        entry.update(field_messages="messages", roles_to_train=["assistant"])
    return entry


def axolotl_config(
    recipe: Recipe,
    data_path: str | None = None,
    data_format: str = "alpaca",
    num_layers: int | None = None,
    output_dir: str = "outputs/autotune",
) -> dict[str, Any]:
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
        "lr_scheduler": HF_SCHEDULERS[recipe.lr_schedule],
        # axolotl keeps the two apart: warmup_steps counts steps, warmup_ratio is a share
        ("warmup_steps" if recipe.warmup_steps is not None else "warmup_ratio"): _warmup(recipe),
        "train_on_inputs": False,
        "gradient_checkpointing": recipe.gradient_checkpointing,
        **_axolotl_half_flags(recipe),
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
            config["lora_target_modules"] = _target_list(recipe)
    elif recipe.method == "freeze":
        # Everything not listed stays frozen: the decoder blocks from frozen_layers up (only
        # their attention or MLP where train_modules says so), the final norm and the head.
        layers = range(recipe.frozen_layers, num_layers or recipe.frozen_layers + 1)
        part = {"all": "", "attention": r"self_attn\.", "mlp": r"mlp\."}[recipe.train_modules]
        config["unfrozen_parameters"] = [
            *(rf"^model\.layers\.{i}\.{part}.*" for i in layers),
            r"^model\.norm\..*",
            r"^lm_head\..*",
        ]
    return config


def llamafactory_config(
    recipe: Recipe,
    num_layers: int | None = None,
    dataset: str = "autotune_data",
    output_dir: str = "saves/autotune",
    tied_head: bool | None = None,
) -> dict[str, Any]:
    """`tied_head`: whether the output head is the input embedding (None: not known)."""
    config: dict[str, Any] = {
        "model_name_or_path": recipe.model,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": recipe.method,
        "dataset": dataset,
        "template": "default",
        "cutoff_len": recipe.seq_len,
        "output_dir": output_dir,
        "per_device_train_batch_size": recipe.micro_batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "learning_rate": recipe.learning_rate,
        # LLaMA-Factory runs on transformers 4.55 to 5.6; 4's warmup_steps is whole steps
        **_schedule_keys(recipe, share_key="warmup_ratio"),
        "num_train_epochs": 1.0,
        "optim": OPTIMIZERS[recipe.optimizer].trainer_name,
        "disable_gradient_checkpointing": not recipe.gradient_checkpointing,
        "flash_attn": ATTENTIONS[recipe.attention].llamafactory,
        **_half_flags(recipe),
    }
    config.update(BATCHINGS[recipe.batching].llamafactory)
    config.update(LOSSES[recipe.loss].llamafactory)
    config.update(llamafactory_keys(recipe))
    if recipe.method == "lora":
        targets = recipe.lora_target_modules
        config.update(
            lora_rank=recipe.lora_r,
            lora_alpha=recipe.lora_alpha,
            lora_dropout=recipe.lora_dropout,
            lora_target="all" if targets == "all-linear" else ",".join(targets or ()),
        )
        if recipe.use_dora:
            config["use_dora"] = True
        bits = QUANTIZATIONS[recipe.quantization].bits
        if bits is not None:
            config.update(
                quantization_bit=bits,
                quantization_method="bitsandbytes",
            )
    elif recipe.method == "freeze":
        # LLaMA-Factory counts the trainable blocks from the top.
        config["freeze_trainable_layers"] = (num_layers or recipe.frozen_layers + 1) - (
            recipe.frozen_layers
        )
        # LLaMA-Factory names the blocks' sub-modules; all is every one of them
        config["freeze_trainable_modules"] = LLAMAFACTORY_MODULES[recipe.train_modules]
        if tied_head is False:
            # autotune's freeze trains an untied head; LLaMA-Factory takes the top-level
            # module's name (a tied head is no parameter of its own there, and refused)
            config["freeze_extra_modules"] = "lm_head"
    if (
        recipe.method in ("full", "freeze")
        and PRECISIONS[recipe.precision].weight_dtype == "bfloat16"
        and DISTRIBUTED[recipe.distributed].deepspeed_stage != 3
    ):
        # LLaMA-Factory upcasts trainable weights to fp32 (AMP) unless told to train in bf16,
        # as autotune's bf16 does: twice the weights, gradients and states the probe measured.
        # (A LoRA adapter is fp32 in both, peft's default.) It refuses pure_bf16 beside ZeRO-3,
        # whose bf16 mode keeps the weights in bf16 itself.
        config["pure_bf16"] = True
    return config


def accelerate_config(recipe: Recipe) -> dict[str, Any]:
    """An `accelerate launch --config_file` config: the machine's processes and the strategy;
    the training keys go to the script it launches (export --format hf)."""
    half = _trainer_half_flags(recipe)
    return {
        "compute_environment": "LOCAL_MACHINE",
        "mixed_precision": "bf16" if half["bf16"] else "fp16" if half["fp16"] else "no",
        "use_cpu": False,
        "debug": False,
        **accelerate_keys(recipe),
    }


def _autotune_only(recipe: Recipe, fmt: str) -> list[tuple[str, str]]:
    """(key, what the exported config does instead) of each recipe key `fmt` cannot carry."""
    keys = []
    if recipe.activation_offload and fmt != "axolotl":
        keys.append(("activation_offload", "keeps the saved activations on the GPU"))
    if OPTIMIZERS[recipe.optimizer].host_states:
        keys.append((f"optimizer {recipe.optimizer}", "keeps the optimizer's states on the GPU"))
    return keys


def _axolotl_halves_weights(recipe: Recipe) -> bool:
    """axolotl's bf16/fp16 set the dtype it loads the model in (resolve_dtype): an amp_* recipe's
    fp32 weights load in half (a k-bit base's other weights autotune loads so too)."""
    return PRECISIONS[recipe.precision].autocast and QUANTIZATIONS[recipe.quantization].bits is None


def _llamafactory_freeze_notes(tied_head: bool | None) -> list[str]:
    """What LLaMA-Factory's freeze cannot train of autotune's: the final norm, as its
    freeze_extra_modules matches parameter names by substring (`norm` is every block's too)."""
    norm = (
        "# freeze: LLaMA-Factory cannot train the final norm alone (freeze_extra_modules: norm "
        "would match every block's norms), which autotune trained: it stays frozen here"
    )
    head = (
        "# freeze: the study did not record whether the output head is tied; if it is not, "
        "add freeze_extra_modules: lm_head (autotune trained it)"
    )
    return [norm, head] if tied_head is None else [norm]


def render(
    fmt: str,
    recipe: Recipe,
    measured: dict[str, Any] | None,
    *,
    data_path: str | None = None,
    data_format: str = "alpaca",
    num_layers: int | None = None,
    data_formats: dict[str, int] | None = None,
    tied_head: bool | None = None,
) -> str:
    """The recipe as YAML in `fmt`; measured figures as YAML (autotune) or a comment header.
    `data_formats` (rows per format) says where axolotl's one format cannot read every row;
    `tied_head` whether the model's output head is its input embedding (None: not known)."""
    if fmt == "autotune":
        return recipe.to_yaml(measured=measured)
    if fmt == "hf":
        body = hf_config(recipe)
    elif fmt == "axolotl":
        body = axolotl_config(recipe, data_path, data_format, num_layers)
    elif fmt == "accelerate":
        body = accelerate_config(recipe)
    else:
        body = llamafactory_config(recipe, num_layers, tied_head=tied_head)
    header = [f"# {recipe.label()} — exported by autotune ({fmt} format)"]
    for key, value in (measured or {}).items():
        if isinstance(value, dict):
            if "verdict" in value:  # the confirmation, perhaps of one that stood in
                stood_in = value.get("in_place_of")  # for a trial that left the frontier
                as_pick = f" (in place of trial {stood_in} as the {value.get('pick')} pick)"
                header.append(
                    f"# {key}: {value['verdict']}{as_pick if stood_in is not None else ''}"
                )
            continue
        # the study's record holds the memory model's prediction beside what was measured
        kind = "" if key in PREDICTED_FIGURES else "measured "
        header.append(f"# {kind}{key}: {value}")
    if launch_line(recipe, fmt):
        header.append(f"# on {recipe.num_gpus} GPUs: {launch_line(recipe, fmt)}")
    if fmt == "axolotl" and len(data_formats or {}) > 1:
        mix = ", ".join(f"{kind} {rows}" for kind, rows in sorted((data_formats or {}).items()))
        header.append(
            f"# the data mixes formats ({mix}); an axolotl dataset has one, and this names "
            f"{data_format}, its first row's: give axolotl one file per format"
        )
    if fmt in LOSSES[recipe.loss].autotune_only_in:
        header.append(
            f"# loss {recipe.loss} is autotune-only: {fmt} has no equivalent, so this config "
            "trains with the standard loss and more memory (autotune train runs the recipe as "
            "it is)"
        )
    for key, instead in _autotune_only(recipe, fmt):
        header.append(
            f"# {key} is autotune-only: {fmt} has no equivalent, so this config {instead} and "
            "needs more GPU memory (autotune train runs the recipe as it is)"
        )
    if fmt == "axolotl" and _axolotl_halves_weights(recipe):
        precision = PRECISIONS[recipe.precision]
        flag = "bf16" if _half_flags(recipe)["bf16"] else "fp16"
        header.append(
            f"# precision {recipe.precision}: axolotl loads the weights in "
            f"{precision.compute_dtype} ({flag}: true sets its model dtype; it has no key for "
            f"{precision.weight_dtype} weights under autocast), less memory than autotune measured"
        )
    if fmt == "llamafactory" and recipe.method == "freeze":
        header += _llamafactory_freeze_notes(tied_head)
    if fmt == "llamafactory":
        header.append(
            f"# register dataset {body['dataset']!r} in data/dataset_info.json "
            f"pointing at {Path(data_path).name if data_path else 'your JSONL file'}"
        )
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False)
