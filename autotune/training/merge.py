"""`autotune train --merge`: the base with the trained LoRA adapter merged into its weights,
saved as a plain Hugging Face model that loads and serves without peft.

A QLoRA adapter trained against the NF4-quantized base; it is merged into that base
dequantized (the very weights it trained against, widened to the merge dtype), not into the
original half-precision weights, which differ from them by the quantization error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autotune.errors import UsageError
from autotune.recipe import Recipe

MERGED_DIR = "merged"
MERGE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""--merge-dtype: the precision the merged weights are saved in."""


def check_merge(recipe: Recipe, dtype_name: str) -> None:
    if recipe.method != "lora":
        raise UsageError(
            f"--merge: method {recipe.method} trains the model's own weights, so there is no "
            "adapter to merge; the saved model is already a plain one"
        )
    if dtype_name not in MERGE_DTYPES:
        raise UsageError(
            f"--merge-dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype_name!r}"
        )


def merge_note(recipe: Recipe) -> str | None:
    """What a user should know about the merged weights of this recipe, if anything."""
    if recipe.quantization == "none":
        return None
    return (
        f"the adapter was merged into the {recipe.quantization}-quantized base, dequantized "
        "(the weights it trained against), not into the original weights"
    )


def merge_adapter(recipe: Recipe, adapter_dir: Path, dtype_name: str, device: str) -> Path:
    """Load the base, apply the adapter saved in `adapter_dir`, merge and save the result in
    `adapter_dir`/merged with the tokenizer; returns that directory."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    dtype = getattr(torch, MERGE_DTYPES[dtype_name])
    base = _base_for_merge(recipe, dtype, device)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True  # training turned it off; serving wants it
    target = adapter_dir / MERGED_DIR
    merged.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(target)
    return target


def _base_for_merge(recipe: Recipe, dtype: Any, device: str) -> Any:
    from transformers import AutoModelForCausalLM

    from autotune.remote_code import remote_code_allowed

    if recipe.quantization == "none":
        return AutoModelForCausalLM.from_pretrained(
            recipe.model, dtype=dtype, trust_remote_code=remote_code_allowed()
        )
    from autotune.training.build import load_model

    quantized, _ = load_model(recipe, device)
    base = quantized.dequantize(dtype=dtype)
    base = base if base is not None else quantized
    if hasattr(base.config, "quantization_config"):  # a merged model is a plain one
        del base.config.quantization_config
    return base.to(dtype)
