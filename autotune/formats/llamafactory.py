"""A recipe as a LLaMA-Factory `llamafactory-cli train` configuration."""

from __future__ import annotations

from typing import Any

from autotune.attentions import ATTENTIONS
from autotune.batchings import BATCHINGS
from autotune.distributed import DISTRIBUTED, llamafactory_keys
from autotune.formats.freeze import layout_or_llama, llamafactory_freeze_keys
from autotune.formats.trainer_keys import half_flags, schedule_keys, trains_half_without_autocast
from autotune.losses import LOSSES
from autotune.optimizers import MAX_GRAD_NORM, OPTIMIZERS
from autotune.precisions import PRECISIONS
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import Recipe
from autotune.training.freeze import FreezeLayout

TEMPLATES = {
    "alpaca": "alpaca",  # ### Instruction: ... ### Response: (with its system line)
    "input_output": "empty",  # the input, then the output: no words around them
    "text": "empty",
}
"""autotune's data format -> the LLaMA-Factory template that renders its rows closest to how
autotune does. Chat rows have none here: without `template`, LLaMA-Factory parses the
tokenizer's own chat template (get_template_and_fix_tokenizer), as autotune renders them."""

TEMPLATE_NOTES = {
    "alpaca": "template alpaca: LLaMA-Factory adds its system line before the instruction and "
    "joins an input to the instruction with a newline (autotune: no system line, an '### Input:' "
    "section)",
    "input_output": "template empty: LLaMA-Factory puts no newline between input and output "
    "(autotune: one)",
    "chat": "template left out: LLaMA-Factory then parses the tokenizer's chat template, as "
    "autotune renders chat rows (a tokenizer without one: LLaMA-Factory's empty template, "
    "autotune's <|role|> turns)",
}
"""Where the exported template still renders a row otherwise than autotune trained it."""


def llamafactory_config(
    recipe: Recipe,
    num_layers: int | None = None,
    dataset: str = "autotune_data",
    output_dir: str = "saves/autotune",
    tied_head: bool | None = None,
    freeze_layout: FreezeLayout | None = None,
    data_format: str = "alpaca",
) -> dict[str, Any]:
    """`freeze_layout`: where the model keeps what a freeze recipe trains (None: the Llama
    family's, of `num_layers` blocks, with `tied_head` saying whether the output head is the
    input embedding, None: not known); `data_format`: the data's (its first row's), which
    chooses the template."""
    config: dict[str, Any] = {
        "model_name_or_path": recipe.model,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": recipe.method,
        "dataset": dataset,
        **({"template": TEMPLATES[data_format]} if data_format in TEMPLATES else {}),
        "cutoff_len": recipe.seq_len,
        "output_dir": output_dir,
        "per_device_train_batch_size": recipe.micro_batch_size,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps,
        "learning_rate": recipe.learning_rate,
        # LLaMA-Factory runs on transformers 4.55 to 5.6; 4's warmup_steps is whole steps
        **schedule_keys(recipe, share_key="warmup_ratio"),
        "num_train_epochs": 1.0,
        "optim": OPTIMIZERS[recipe.optimizer].trainer_name,
        "max_grad_norm": MAX_GRAD_NORM,  # its Seq2SeqTrainingArguments': unset, 1.0 clips
        "disable_gradient_checkpointing": not recipe.gradient_checkpointing,
        "flash_attn": ATTENTIONS[recipe.attention].llamafactory,
        **half_flags(recipe),
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
        layout = layout_or_llama(recipe, freeze_layout, num_layers, tied_head)
        unknown_head = freeze_layout is None and tied_head is None
        config.update(llamafactory_freeze_keys(recipe, layout, unknown_head))
    if (
        recipe.method in ("full", "freeze")
        and PRECISIONS[recipe.precision].weight_dtype == "bfloat16"
        and DISTRIBUTED[recipe.distributed].deepspeed_stage != 3
    ):
        # LLaMA-Factory upcasts trainable weights to fp32 (AMP) unless told to train in bf16,
        # as autotune's bf16 does: twice the weights, gradients and states the probe measured.
        # It refuses pure_bf16 beside ZeRO-3, whose bf16 mode keeps the weights in bf16 itself.
        # (LoRA stays out: pure_bf16 gets peft's adapters in bf16, get_peft_model's
        # autocast_adapter_dtype=False in init_adapter, src/llamafactory/model/adapter.py,
        # hiyouga/LLaMA-Factory ff6d4d12; the probe's are fp32, peft's default.)
        config["pure_bf16"] = True
        if trains_half_without_autocast(recipe):
            # pure_bf16 is its training without AMP, with TrainingArguments' bf16 off, as its
            # web UI's pure_bf16 compute type writes them (src/llamafactory/webui/runner.py);
            # the model's bf16 compute dtype comes from pure_bf16 (get_train_args in
            # hparams/parser.py). bf16: true beside it would still autocast the forward.
            config["bf16"] = False
    return config
