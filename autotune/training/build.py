"""Recipe -> tokenizer, model (quantized, adapted, frozen, checkpointed) and optimizer.

Loading is the real Hugging Face path: a hub id or a local directory, bitsandbytes for int8/NF4,
peft for LoRA. Imports of torch and friends stay inside the functions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from autotune.errors import UsageError, first_line
from autotune.optimizers import OPTIMIZERS
from autotune.precisions import PRECISIONS
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import Recipe
from autotune.training.freeze import freeze


def compute_dtype(recipe: Recipe) -> Any:
    """The dtype matrix multiplies run in."""
    import torch

    return getattr(torch, PRECISIONS[recipe.precision].compute_dtype)


def storage_dtype(recipe: Recipe) -> Any:
    """The dtype weights are stored in: amp_* keeps fp32 weights and autocasts."""
    import torch

    return getattr(torch, PRECISIONS[recipe.precision].weight_dtype)


def load_dtype(recipe: Recipe) -> Any:
    """The dtype from_pretrained loads the base in (PrecisionKind.load_dtype)."""
    import torch

    quantized = recipe.quantization != "none"
    return getattr(torch, PRECISIONS[recipe.precision].load_dtype(quantized))


def autocast_dtype(recipe: Recipe) -> Any | None:
    return compute_dtype(recipe) if PRECISIONS[recipe.precision].autocast else None


NO_TOKENIZER_FILES = "no tokenizer files there (tokenizer.json, tokenizer_config.json, ...)"
TOKENIZER_FILE_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "*.model", "*.tiktoken")
"""Files one of which a local model's tokenizer is read from."""


def _holds_tokenizer_files(model_name: str) -> bool:
    """True for a hub id, or a local directory with a file a tokenizer could be read from."""
    path = Path(model_name).expanduser()
    return not path.is_dir() or any(
        next(path.glob(pattern), None) for pattern in TOKENIZER_FILE_PATTERNS
    )


def load_tokenizer(model_name: str, vocab_size: int | None = None) -> Any:
    """The model's tokenizer, padding with a token below `vocab_size` (pad_within_vocabulary).

    `vocab_size`: the model config's (None: any token of the tokenizer pads)."""
    from transformers import AutoTokenizer

    from autotune.remote_code import remote_code_allowed

    if Path(model_name).expanduser().is_file():  # not transformers' words on a bad hub id
        raise UsageError(
            f"cannot load the tokenizer of model {model_name!r}: it is a file; give the "
            "model's directory"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_name, trust_remote_code=remote_code_allowed()
        )
    except Exception as error:  # noqa: BLE001 - missing files, hub errors: cannot tokenize
        # a directory without config.json or tokenizer files: transformers' words were cut at
        # a comma ("Couldn't instantiate the backend tokenizer from one of: (1) a ... file,")
        words = "" if _holds_tokenizer_files(model_name) else NO_TOKENIZER_FILES
        raise UsageError(
            f"cannot load the tokenizer of model {model_name!r}: {words or first_line(error)}"
        ) from None
    if len(tokenizer) < 2:
        # transformers 5 builds an empty tokenizer of the model's class where no tokenizer
        # file is found; it turns every text into no tokens
        raise UsageError(f"cannot load the tokenizer of model {model_name!r}: {NO_TOKENIZER_FILES}")
    pad_within_vocabulary(tokenizer, vocab_size)
    return tokenizer


def pad_within_vocabulary(tokenizer: Any, vocab_size: int | None) -> None:
    """Padding is masked and carries no loss, so any token of the model's vocabulary pads:
    where the tokenizer has no pad token, or one at or past the config's `vocab_size` (an
    added [PAD] the embeddings have no row for), it pads with its eos, bos or unk token, or
    token 0: the first below `vocab_size` (None: not known, any id)."""

    def fits(token_id: int | None) -> bool:
        return token_id is not None and (vocab_size is None or token_id < vocab_size)

    if fits(tokenizer.pad_token_id):
        return
    named = (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id)
    pad_token_id = next((token_id for token_id in named if fits(token_id)), 0)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_token_id)


def quantization_config(recipe: Recipe) -> Any | None:
    settings = QUANTIZATIONS[recipe.quantization].bitsandbytes_config
    if settings is None:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**settings(compute_dtype(recipe)))


def build_model(recipe: Recipe, device: str) -> Any:
    """Load the base model as the recipe says and make it trainable, in training mode."""
    return prepare_model(load_model(recipe, device)[0], recipe)


def nf4_copy_dir(recipe: Recipe, cache_dir: str | Path) -> Path | None:
    """Where an NF4-quantized copy of the recipe's base weights lives, for QLoRA recipes: named
    after the weights (path, sizes and times of their files, or the hub id), the quantization
    settings and the library versions that wrote it."""
    if recipe.quantization != "nf4":
        return None
    import bitsandbytes
    import transformers

    source = Path(recipe.model).expanduser()
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
        fingerprint = [str(source.resolve())] + [
            [p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files
        ]
    else:
        fingerprint = [recipe.model]
    key = json.dumps(
        [
            fingerprint,
            str(compute_dtype(recipe)),
            transformers.__version__,
            bitsandbytes.__version__,
        ]
    )
    return Path(cache_dir) / f"weights-nf4-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def unloadable_weights(error: Exception) -> str | None:
    """What is wrong with a model's weight files, where `error` (from `load_model`) says they
    are missing, unreadable or of other shapes than the config's; None for any other error
    (an out-of-memory error is a RuntimeError too, and no fault of the files)."""
    from safetensors import SafetensorError

    if isinstance(error, (OSError, ValueError, SafetensorError)):
        return first_line(error)
    text = str(error)
    if isinstance(error, RuntimeError) and (
        "ignore_mismatched_sizes" in text or "Error(s) in loading state_dict" in text
    ):
        # transformers' own line points at its load report, logged above it
        return "their shapes differ from those its config.json gives (see the load report above)"
    return None


def load_model(
    recipe: Recipe, device: str, weight_cache: str | Path | None = None
) -> tuple[Any, str]:
    """The base model on the device: read, cast and (bitsandbytes, weight by weight as it is
    read) quantized; and where its weights came from. With `weight_cache`, a QLoRA base is read
    already quantized from its NF4 copy there, which the first probe to need it writes."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    quantization = quantization_config(recipe)
    copy = nf4_copy_dir(recipe, weight_cache) if weight_cache else None
    from autotune.remote_code import remote_code_allowed

    options = {
        "device_map": {"": device},
        "attn_implementation": recipe.attention,
        "trust_remote_code": remote_code_allowed(),
    }
    if copy is not None and (copy / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(copy, dtype=compute_dtype(recipe), **options)
        weights = "nf4 cache"
    else:
        model = AutoModelForCausalLM.from_pretrained(
            recipe.model,
            dtype=load_dtype(recipe),
            quantization_config=quantization,
            **options,
        )
        weights = "original"
        if copy is not None:
            _write_copy(model, copy)
            weights = "original, nf4 cache written"
    model.config.use_cache = False
    if recipe.quantization == "nf4" and device == "cpu":
        from autotune.cpu_nf4 import apply_cpu_nf4_path

        apply_cpu_nf4_path(model)
    return model, weights


def _write_copy(model: Any, target: Path) -> None:
    """Save next to the target, then rename: a reader never sees half a copy, and of two
    probes writing at once one keeps its copy and the other drops its own."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(scratch)
        scratch.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def prepare_kbit_base(model: Any) -> Any:
    """peft's k-bit preparation (`prepare_model_for_kbit_training`, less the checkpointing that
    `prepare_model` sets up itself): every base weight frozen, and what bitsandbytes did not
    quantize upcast to fp32 for stable norms and head, in peft's order, then the CUDA cache
    emptied. One difference: the stacked weights of a mixture's routed experts (3-D, not linear
    layers, so never quantized) stay in their half dtype. Frozen, they gain nothing from fp32,
    which would double the model's largest part and send the experts' grouped matmul from its
    bf16 kernel to a loop of fp32 matmuls."""
    import torch

    for param in model.parameters():
        param.requires_grad = False
    for param in model.parameters():
        if (
            param.dtype in (torch.float16, torch.bfloat16)
            and type(param).__name__ != "Params4bit"
            and param.dim() < 3
        ):
            param.data = param.data.to(torch.float32)
    release_cached_memory()
    return model


def release_cached_memory() -> None:
    """Give the CUDA caching allocator's unused segments back, as peft does after upcasting."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_model(model: Any, recipe: Recipe) -> Any:
    """Make a loaded base trainable as the recipe says: k-bit preparation, adapters, frozen
    blocks, checkpointing; in training mode."""
    checkpointing_kwargs = {"use_reentrant": False}
    if recipe.method == "lora":
        from peft import LoraConfig, get_peft_model

        if recipe.quantization != "none":
            model = prepare_kbit_base(model)  # checkpointing is switched on below
        targets = recipe.lora_target_modules
        # a validated LoRA recipe has all three (Recipe.from_dict fills them in)
        assert recipe.lora_r is not None and recipe.lora_alpha is not None
        model = get_peft_model(
            model,
            LoraConfig(
                r=recipe.lora_r,
                lora_alpha=recipe.lora_alpha,
                lora_dropout=recipe.lora_dropout or 0.0,
                target_modules=targets if isinstance(targets, str) else list(targets or ()),
                use_dora=recipe.use_dora,
                task_type="CAUSAL_LM",
            ),
        )
    elif recipe.method == "freeze":
        freeze(model, recipe.frozen_layers, recipe.train_modules)
    if recipe.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.20
            base.activation_checkpointing_enable(
                activation_checkpointing_kwargs=checkpointing_kwargs
            )
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
        if recipe.method != "full":
            # With frozen embeddings nothing entering the first block needs a gradient; make
            # the inputs require one so checkpointed blocks still backpropagate.
            model.enable_input_require_grads()
    # from_pretrained returns eval mode, where HF blocks skip checkpointing and dropout.
    model.train()
    return model


def trainable_parameters(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: Any, recipe: Recipe) -> Any:
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the recipe leaves no trainable parameter")
    return OPTIMIZERS[recipe.optimizer].build(params, recipe.learning_rate)
