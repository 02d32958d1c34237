"""Predict a recipe's peak GPU memory by replaying its probe on the meta device.

The model is built from its config on torch's meta device (shapes and dtypes, no data, no GPU),
loaded, quantized, adapted and trained for a few steps by the same code a probe runs:
transformers' model, bitsandbytes' quantization and 8-bit optimizers (their fake kernels),
peft's adapters, the probe's own k-bit preparation, `prepare_model` and `build_optimizer`.
Every storage the replay allocates and frees goes, in order, through a model of PyTorch's
CUDA caching allocator (autotune.allocator), whose peak reserved bytes plus the CUDA context is
the prediction: the figure `torch.cuda.max_memory_reserved()` reaches on the GPU.

What the meta device cannot run is emulated with CUDA's memory behaviour:
- SDPA picks its kernel as on CUDA: flash attention for fp16/bf16 without a mask (output and a
  fp32 log-sum-exp saved; fp32 dq accumulator in backward), the memory-efficient kernel
  where the heads match (transformers repeats grouped key heads under a mask), which also
  keeps the additive mask torch makes of a boolean one at each call, the math path (the real
  ops) otherwise;
- softmax's backward (SDPA's math path, eager attention) holds a temporary of the gradient's
  size beside its output, as CUDA's kernel does (`grad * output`): under an attention matrix,
  one more matrix at the step's peak;
- dropout keeps a one-byte mask (CUDA's native_dropout), not the CPU's full-size one;
- amp precisions cast the inputs of matrix multiplies to bf16/fp16 above autograd, caching the
  casts of trainable weights over the forward, as torch.autocast does;
- cuBLAS keeps one workspace per handle: one for the forward thread, one for backward's;
- transformers' loader reserves one block of the weights' size before loading them
  (caching_allocator_warmup), and quantizes each weight from a half-precision copy;
- bitsandbytes' int8 matmul allocates what its CUDA kernels do (autotune.meta_int8), with
  outlier columns (their count depends on the data) from the size where they emerge;
- paged optimizer states live in CUDA unified memory, outside the allocator.
Rows are full length (the probe's first step holds the longest examples); a padding-free
micro-batch is one row of its sequences end to end, and packed rows hold several sequences, so
both get the block-diagonal mask transformers builds from positions that restart. Each
micro-batch's loss, and its graph, lives until the next one's is made, as in the probe's step
loop.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

from autotune.allocator import CachingAllocator
from autotune.attentions import ATTENTIONS
from autotune.batchings import BATCHINGS
from autotune.errors import UsageError, first_line
from autotune.memory import CUDA_CONTEXT_BYTES, MemoryEstimate
from autotune.meta_cuda import (
    Autocast,
    Recorder,
    cuda_behaviour,
    fresh_bitsandbytes_caches,
)
from autotune.meta_fsdp import fsdp_replayed, shard_on_meta
from autotune.meta_host import HostMemory
from autotune.meta_int8 import int8_cuda_kernels
from autotune.model_source import check_model_reference
from autotune.optimizers import OPTIMIZERS, PAGED_MIN_ELEMENTS
from autotune.recipe import Recipe

CUBLAS_WORKSPACE_BYTES = 32 * 2**20
"""cuBLAS workspace per handle on Hopper (torch's default `:4096:8`), from the caching allocator."""

REPLAY_STEPS = 2
"""Optimizer steps replayed: the first makes the optimizer states, the second runs with them
(a third changed no prediction on the H100 rows)."""

REPLAY_MICRO_BATCHES = 2
"""Micro-batches replayed per step: gradients are made by the first and accumulated in place by
the rest, so a third adds nothing new to the allocator's picture."""

REPLAY_EVAL_BATCHES = 1

PHASES = ("weights", "activations", "gradients", "optimizer", "eval")
"""What the tensors alive at the allocated peak were made for, as the breakdown names them."""

_LOCK = threading.Lock()
"""A replay patches module attributes (torch, transformers, peft): one at a time per process."""


@dataclass
class Replay:
    peak_reserved_bytes: int
    peak_allocated_bytes: int
    at_peak: dict[str, int]
    """Bytes alive at the allocated peak, by the phase that allocated them."""
    paged_bytes: int = 0
    reservations: list[tuple[int, int]] = field(default_factory=list)
    """(bytes reserved, bytes requested) of each segment the allocator reserved, in order."""
    host_peak_bytes: int = 0
    """Peak host memory of offloaded activations (pinned blocks)."""
    live_at_peak: list[tuple[int, str]] = field(default_factory=list)
    """(block bytes, phase) of each block alive at the allocated peak, largest first."""

    def estimate(self) -> MemoryEstimate:
        parts = {phase: self.at_peak.get(phase, 0) for phase in PHASES}
        parts["allocator_overhead"] = self.peak_reserved_bytes - self.peak_allocated_bytes
        parts["cuda_context"] = CUDA_CONTEXT_BYTES
        return MemoryEstimate(
            peak_bytes=self.peak_reserved_bytes + CUDA_CONTEXT_BYTES,
            breakdown=parts,
            paged_bytes=self.paged_bytes,
            host_bytes=self.host_peak_bytes,
        )


def _meta_model(recipe: Recipe, config: Any) -> Any:
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


def _load(model: Any, recipe: Recipe, recorder: Recorder) -> None:
    """Put the weights on the 'device' as transformers' loader does: one warm-up block of their
    size reserved and freed, then each weight in checkpoint (name) order, bitsandbytes weights
    quantized from a half-precision copy."""
    import bitsandbytes as bnb
    import torch

    from autotune.training.build import compute_dtype

    quantized_size = {"nf4": 0.5, "int8": 1.0}.get(recipe.quantization)
    seen: dict[int, tuple[str, Any]] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        seen.setdefault(tensor.untyped_storage()._cdata, (name, tensor))
    modules = dict(model.named_modules())
    warmup = 0.0
    for name, tensor in seen.values():
        module = modules.get(name.rpartition(".")[0])
        is_quantized = isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
        if is_quantized and name.endswith(".weight"):
            warmup += tensor.numel() * quantized_size
        else:
            warmup += tensor.numel() * tensor.element_size()
    if warmup:
        recorder.allocator.free(recorder.allocator.malloc(int(warmup) // 2 * 2))
    half = compute_dtype(recipe)
    for name, tensor in sorted(seen.values(), key=lambda item: item[0]):
        module = modules.get(name.rpartition(".")[0])
        if isinstance(module, bnb.nn.Linear4bit) and name.endswith(".weight"):
            source = torch.empty(module.out_features, module.in_features, dtype=half, device="meta")
            weight = bnb.nn.Params4bit(
                source,
                requires_grad=False,
                quant_type=tensor.quant_type,
                compress_statistics=tensor.compress_statistics,
                quant_storage=tensor.quant_storage,
                blocksize=tensor.blocksize,
                module=module,
            )
            weight._quantize("meta")
            del source
            module.weight = weight
        elif isinstance(module, bnb.nn.Linear8bitLt) and name.endswith(".weight"):
            source = torch.empty(module.out_features, module.in_features, dtype=half, device="meta")
            int8_weight = bnb.nn.Int8Params(source, requires_grad=False, has_fp16_weights=False)
            int8_weight._quantize("meta")
            del source
            module.weight = int8_weight
        else:
            recorder.track(tensor)


def _optimizer(
    model: Any, recipe: Recipe, recorder: Recorder, host: HostMemory
) -> tuple[Any, list[int]]:
    """The probe's optimizer as it runs on CUDA: torch's AdamW fused or foreach as the registry
    names it, paged states kept out of the allocator (their bytes are counted apart), host
    states counted in `host`."""
    from autotune.training.build import build_optimizer, trainable_parameters

    kind = OPTIMIZERS[recipe.optimizer]
    if kind.host_states:
        return host.offload_optimizer(trainable_parameters(model), recipe.learning_rate), []
    optimizer = build_optimizer(model, recipe)
    paged: list[int] = []
    if kind.fused:  # the meta device has the fused kernel too (cuda_behaviour lets it run)
        for group in optimizer.param_groups:
            group.update(fused=True, foreach=False)
    elif kind.step_temporaries:
        for group in optimizer.param_groups:
            group["foreach"] = True
    elif kind.paged:
        import torch

        def state_buffer(A, dtype=torch.float32):  # noqa: ANN001, N803
            if A.numel() < PAGED_MIN_ELEMENTS:
                return torch.zeros_like(A, dtype=dtype, device=A.device)
            with recorder.pause():
                buffer = torch.zeros_like(A, dtype=dtype, device=A.device)
            paged.append(buffer.numel() * buffer.element_size())
            return buffer

        optimizer.get_state_buffer = state_buffer
    return optimizer, paged


def _forward_loss(
    model: Any,
    recipe: Recipe,
    shape: tuple[int, int],
    autocast: Autocast | None,
    padded: bool = False,
) -> tuple[Any, list[Any]]:
    """A micro-batch's loss on full-length rows, computed as the step loop computes it, and the
    batch tensors the probe makes for it (input ids, attention mask, labels), which live until
    the next micro-batch's are made. `padded`: its other rows are shorter, so the model gets
    their attention mask (padded_rows)."""
    import torch

    from autotune.training.loss import causal_lm_loss

    rows, length = shape
    batching = BATCHINGS[recipe.batching]
    if batching.one_row:  # the micro-batch's sequences end to end
        rows, length = 1, rows * length
    input_ids = torch.zeros(rows, length, dtype=torch.long, device="meta")
    labels = torch.zeros_like(input_ids)
    inputs = {"input_ids": input_ids, "labels": labels}
    if batching.masks_rows:
        # positions restart at each sequence: transformers builds the block-diagonal mask
        positions = torch.arange(shape[1], device="meta").repeat(length // shape[1])
        inputs["position_ids"] = positions.expand(rows, length).contiguous()
        batch = [input_ids, labels, inputs["position_ids"]]
    else:
        batch = [input_ids, torch.ones_like(input_ids), labels]
        if padded and padded_rows(recipe):
            # a mask with padding: transformers builds the 4-D mask, SDPA gets it, and grouped
            # key heads are repeated (cuda_behaviour tells transformers the mask has padding)
            inputs["attention_mask"] = batch[1]
    if autocast is not None:
        autocast.caching = True
    # all-ones masks are dropped by transformers; the meta device cannot read them to see so
    loss = causal_lm_loss(model, inputs, recipe)
    if autocast is not None:
        autocast.cache.clear()  # autocast's cast cache lives as long as its forward
        autocast.caching = False
    return loss, batch


def padded_rows(recipe: Recipe) -> bool:
    """Whether padding in a micro-batch changes what the model runs: padded batching of more
    than one row, and an attention that takes a mask (flash attention 2 takes the rows' bounds
    and is replayed without one)."""
    return BATCHINGS[recipe.batching].pads(recipe.micro_batch_size) and not (
        ATTENTIONS[recipe.attention].flash
    )


def replay(
    recipe: Recipe,
    config: Any,
    seq_len: int | None = None,
    steps: int = REPLAY_STEPS,
    eval_batches: int = REPLAY_EVAL_BATCHES,
    cublas_workspace_bytes: int = CUBLAS_WORKSPACE_BYTES,
    padded: bool = False,
) -> Replay:
    """Replay `recipe` on the model of `config` (a transformers PretrainedConfig); `padded`:
    its micro-batches hold shorter rows beside full-length ones (padding, so an attention
    mask), as the probe's first step does on data whose longest examples differ in length."""
    import warnings

    with _LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _replay(recipe, config, seq_len, steps, eval_batches, cublas_workspace_bytes, padded)


def _replay(
    recipe: Recipe,
    config: Any,
    seq_len: int | None,
    steps: int,
    eval_batches: int,
    cublas_workspace_bytes: int,
    padded: bool,
) -> Replay:
    import copy

    import torch

    from autotune.training import build
    from autotune.training.build import autocast_dtype, prepare_model

    seq_len = seq_len or recipe.seq_len
    allocator = CachingAllocator(expandable_segments=recipe.expandable_segments)
    recorder = Recorder(allocator)
    amp = autocast_dtype(recipe)
    autocast = Autocast(amp) if amp is not None else None
    model = _meta_model(recipe, copy.deepcopy(config))
    parameters = sum(p.numel() for p in model.parameters())
    recorder.kernels.update(int8_cuda_kernels(recorder.track, parameters))
    host = HostMemory()
    with (
        fresh_bitsandbytes_caches(),
        cuda_behaviour(recipe, autocast, host),
        fsdp_replayed(recipe, recorder.track, recorder.release),
        recorder.mode,
    ):
        recorder.track(torch.zeros(1, device="meta"))  # the CUDA context's first tensor
        _load(model, recipe, recorder)
        original_release = build.release_cached_memory
        build.release_cached_memory = allocator.empty_cache  # torch.cuda.empty_cache()
        try:
            # tensors made without a device land on meta: DoRA deep-copies a QLoRA base layer,
            # and bitsandbytes' copy starts from an empty tensor it then sets the data of
            with torch.device("meta"):
                model = prepare_model(model, recipe)
        finally:
            build.release_cached_memory = original_release
        if recipe.distributed == "fsdp":  # rank 0 of num_gpus, over a fake process group
            model = shard_on_meta(model, recipe)
        recorder.phase = "optimizer"
        optimizer, paged = _optimizer(model, recipe, recorder, host)
        workspaces: list[Any] = []
        batch: list[Any] = []
        loss = scaled = None
        shape = (recipe.micro_batch_size, seq_len)
        for _ in range(steps):
            for _ in range(min(recipe.gradient_accumulation_steps, REPLAY_MICRO_BATCHES)):
                recorder.phase = "activations"
                if not workspaces:  # cuBLAS's, for the forward's thread
                    workspaces.append(
                        torch.empty(cublas_workspace_bytes, dtype=torch.uint8, device="meta")
                    )
                loss, batch = _forward_loss(model, recipe, shape, autocast, padded)
                # scaled by its share of the step's tokens; the probe's loop names it until the
                # next micro-batch's is made, so its graph lives that long, and with it what
                # bitsandbytes' int8 matmul keeps on its nodes past backward (its inputs)
                scaled = loss * 1.0
                recorder.phase = "gradients"
                if len(workspaces) == 1:  # and for backward's
                    workspaces.append(
                        torch.empty(cublas_workspace_bytes, dtype=torch.uint8, device="meta")
                    )
                scaled.backward()
            recorder.phase = "optimizer"
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss = scaled = None  # the probe's loop returns before the eval
        recorder.phase = "eval"
        model.eval()
        with torch.no_grad():
            for _ in range(eval_batches):
                loss, batch = _forward_loss(model, recipe, shape, autocast, padded)
                del loss
        model.train()
    return Replay(
        peak_reserved_bytes=allocator.peak_reserved_bytes,
        peak_allocated_bytes=allocator.peak_allocated_bytes,
        at_peak={k: v for k, v in recorder.at_peak.items() if v},
        paged_bytes=sum(paged),
        reservations=list(allocator.reservations),
        host_peak_bytes=host.peak_bytes,
        live_at_peak=recorder.live_at_peak(),
    )


def load_config(model: str) -> Any:
    """The transformers config of a hub id or local directory (config.json is enough)."""
    check_model_reference(model)
    from transformers import AutoConfig

    from autotune.remote_code import remote_code_allowed

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=remote_code_allowed())
    except Exception as error:  # noqa: BLE001 - unknown architectures, bad JSON, no network
        unknown = re.search(r"model type `([^`]+)` but Transformers does not recognize", str(error))
        if unknown:  # transformers' own words run past one line
            import transformers

            raise UsageError(
                f"cannot build model {model!r} from its config: its model_type "
                f"{unknown.group(1)!r} is not one transformers {transformers.__version__} knows "
                "(a newer transformers may, or the model's own code with --trust-remote-code)"
            ) from None
        raise UsageError(
            f"cannot build model {model!r} from its config: {first_line(error)}"
        ) from None
