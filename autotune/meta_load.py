"""The probe's model as transformers loads it on CUDA, made on the meta device for the replay
(autotune.replay): built from its config, bitsandbytes' layers swapped in, weights put on the
'device' in the loader's order, with the loader's warm-up block and quantization copies.
"""

from __future__ import annotations

from typing import Any

from autotune.attentions import ATTENTIONS
from autotune.meta_recorder import Recorder
from autotune.recipe import Recipe


def meta_model(recipe: Recipe, config: Any) -> Any:
    """The recipe's model of `config` on the meta device, its quantized linears bitsandbytes'
    layers as transformers' loader makes them."""
    import torch
    from transformers import AutoModelForCausalLM

    from autotune.training.build import load_dtype, quantization_config

    quantization = quantization_config(recipe)
    dtype = load_dtype(recipe)
    config.use_cache = False
    attention = ATTENTIONS[recipe.attention].replayed_as
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    if quantization is not None:
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear

        head = model.get_output_embeddings()
        skip = ["lm_head"] + [name for name, module in model.named_modules() if module is head]
        model = replace_with_bnb_linear(
            model, modules_to_not_convert=skip, quantization_config=quantization
        )
        model.is_quantized = True
        model.quantization_method = "bitsandbytes"
        model.is_loaded_in_4bit = recipe.quantization == "nf4"
        model.is_loaded_in_8bit = recipe.quantization == "int8"
    return model


def warmup_bytes(needed: float, allocator: Any) -> float:
    """What transformers' caching_allocator_warmup asks for, the weights needing `needed` bytes:
    less the memory reserved and unused (the CUDA context's first segment), which the caching
    allocator would serve first; only the least that forces a new segment when the weights need
    not 1.5 GiB past it; nothing when they fit in it."""
    unused = allocator.reserved_bytes - allocator.allocated_bytes
    if needed - unused > unused:
        return needed - unused
    if needed - unused > 1.5 * 2**30:
        return unused + 1
    return 0.0


def load_weights(model: Any, recipe: Recipe, recorder: Recorder) -> None:
    """Put the weights on the 'device' as transformers' loader does: one warm-up block of their
    size reserved and freed (caching_allocator_warmup), then each weight in checkpoint (name)
    order, bitsandbytes weights quantized from a half-precision copy."""
    import bitsandbytes as bnb
    import torch

    from autotune.training.build import compute_dtype

    quantized_size = {"nf4": 0.5, "int8": 1.0}.get(recipe.quantization)
    seen: dict[int, tuple[str, Any]] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        seen.setdefault(tensor.untyped_storage()._cdata, (name, tensor))
    modules = dict(model.named_modules())

    def quantized_layer(name: str) -> Any:
        """The bitsandbytes layer whose weight `name` is, None for any other tensor."""
        module = modules.get(name.rpartition(".")[0])
        is_quantized = isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
        return module if is_quantized and name.endswith(".weight") else None

    warmup = 0.0
    for name, tensor in seen.values():
        if quantized_layer(name) is not None:
            warmup += tensor.numel() * quantized_size
        else:
            warmup += tensor.numel() * tensor.element_size()
    warmup_request = int(warmup_bytes(warmup, recorder.allocator)) // 2 * 2
    if warmup_request:  # CUDA's allocator never sees a request of 0 bytes
        recorder.allocator.free(recorder.allocator.malloc(warmup_request))
    half = compute_dtype(recipe)
    for name, tensor in sorted(seen.values(), key=lambda item: item[0]):
        module = quantized_layer(name)
        if module is None:
            recorder.track(tensor)
            continue
        source = torch.empty(module.out_features, module.in_features, dtype=half, device="meta")
        weight: Any
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.nn.Params4bit(
                source,
                requires_grad=False,
                quant_type=tensor.quant_type,
                compress_statistics=tensor.compress_statistics,
                quant_storage=tensor.quant_storage,
                blocksize=tensor.blocksize,
                module=module,
            )
        else:
            weight = bnb.nn.Int8Params(source, requires_grad=False, has_fp16_weights=False)
        weight._quantize("meta")
        del source
        module.weight = weight
