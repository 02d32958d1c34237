"""Predict a recipe's peak GPU memory by replaying its probe on the meta device.

The model is built from its config on torch's meta device (shapes and dtypes, no data, no GPU),
loaded, quantized, adapted and trained for a few steps by the same code a probe runs:
transformers' model, bitsandbytes' quantization and 8-bit optimizers (their fake kernels),
peft's adapters, the probe's own k-bit preparation, `prepare_model` and `build_optimizer`.
Every storage the replay allocates and frees goes, in order, through a model of PyTorch's
CUDA caching allocator (autotune.allocator), whose peak reserved bytes plus the CUDA context is
the prediction: the figure `torch.cuda.max_memory_reserved()` reaches on the GPU.

What the meta device cannot run is emulated with CUDA's memory behaviour: the loader's
(autotune.meta_load), the ops' and kernels' (autotune.meta_cuda, with SDPA's in
autotune.meta_attention, cuBLAS's workspaces in autotune.meta_cublas, bitsandbytes' 4-bit
matmul and quantize in autotune.meta_bitsandbytes and its int8 matmul in autotune.meta_int8),
the optimizer's (autotune.meta_optimizer: paged states live in CUDA unified memory, outside
the allocator),
activation offload's pinned host blocks (autotune.meta_host) and FSDP2's sharding
(autotune.meta_fsdp); autograd sums a tied weight's gradients in place, as on CUDA
(autotune.tied_gradients).
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
from autotune.memory import CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES, MemoryEstimate
from autotune.meta_bitsandbytes import bitsandbytes_cuda_kernels, fresh_bitsandbytes_caches
from autotune.meta_cublas import CublasWorkspaces
from autotune.meta_cuda import (
    Autocast,
    autocast_forward,
    cuda_behaviour,
    cuda_empty_cache,
    cuda_kernels,
)
from autotune.meta_fsdp import fsdp_replayed, shard_on_meta
from autotune.meta_host import HostMemory
from autotune.meta_int8 import int8_cuda_kernels
from autotune.meta_load import load_weights, meta_model
from autotune.meta_optimizer import cuda_optimizer
from autotune.meta_recorder import Recorder
from autotune.model_source import check_model_reference
from autotune.recipe import Recipe
from autotune.tied_gradients import tied_gradient_shapes

REPLAY_STEPS = 2
"""Optimizer steps replayed: the first makes the optimizer states, the second runs with them
(a third changed no prediction on the H100 rows)."""

REPLAY_MICRO_BATCHES = 2
"""Micro-batches replayed per step: gradients are made by the first and accumulated in place by
the rest, so a third adds nothing new to the allocator's picture."""

REPLAY_EVAL_BATCHES = 1

PHASES = ("weights", "activations", "gradients", "optimizer", "eval", "cublas_workspaces")
"""What the tensors alive at the allocated peak were made for, as the breakdown names them:
cuBLAS's workspaces (one per thread's handle, the forward's and backward's) are a part of their
own, whichever phase first multiplies on that thread."""

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

    from autotune.training.build import autocast_dtype, prepare_model

    seq_len = seq_len or recipe.seq_len
    allocator = CachingAllocator(expandable_segments=recipe.expandable_segments)
    recorder = Recorder(allocator)
    amp = autocast_dtype(recipe)
    autocast = Autocast(amp) if amp is not None else None
    model = meta_model(recipe, copy.deepcopy(config))
    parameters = sum(p.numel() for p in model.parameters())
    # cuBLAS's workspaces: backward's thread's while gradients are made, the forward's else
    # (taken at the thread's first matmul; the forward's by the forward's start at the latest)
    cublas = CublasWorkspaces(
        cublas_workspace_bytes,
        recorder.track,
        lambda: "backward" if recorder.phase == "gradients" else "forward",
        lambda: recorder.in_phase("cublas_workspaces"),
    )
    recorder.kernels.update(cuda_kernels(recorder.track, cublas.multiplied))
    recorder.kernels.update(bitsandbytes_cuda_kernels(recorder.track, cublas.multiplied))
    recorder.kernels.update(int8_cuda_kernels(recorder.track, parameters))
    host = HostMemory()
    with (
        fresh_bitsandbytes_caches(),
        cuda_behaviour(recipe, autocast, host),
        fsdp_replayed(recipe, recorder.track, recorder.release),
        recorder.mode,
    ):
        recorder.track(torch.zeros(1, device="meta"))  # the CUDA context's first tensor
        load_weights(model, recipe, recorder)
        # tensors made without a device land on meta: DoRA deep-copies a QLoRA base layer,
        # and bitsandbytes' copy starts from an empty tensor it then sets the data of
        with cuda_empty_cache(allocator), torch.device("meta"):
            model = prepare_model(model, recipe)
        if recipe.distributed == "fsdp":  # rank 0 of num_gpus, over a fake process group
            model = shard_on_meta(model, recipe)
        recorder.tied = tied_gradient_shapes(model)
        recorder.phase = "optimizer"
        optimizer, paged = cuda_optimizer(model, recipe, recorder, host)
        batch: list[Any] = []
        loss = scaled = None
        shape = (recipe.micro_batch_size, seq_len)
        for _ in range(steps):
            for _ in range(min(recipe.gradient_accumulation_steps, REPLAY_MICRO_BATCHES)):
                recorder.phase = "activations"
                cublas.take("forward")
                loss, batch = _forward_loss(model, recipe, shape, autocast, padded)
                # scaled by its share of the step's tokens; the probe's loop names it until the
                # next micro-batch's is made, so its graph lives that long, and with it what
                # bitsandbytes' int8 matmul keeps on its nodes past backward (its inputs)
                scaled = loss * 1.0
                recorder.phase = "gradients"
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
    with autocast_forward(autocast):
        # all-ones masks are dropped by transformers; the meta device cannot read them to see so
        loss = causal_lm_loss(model, inputs, recipe)
    return loss, batch


def padded_rows(recipe: Recipe) -> bool:
    """Whether padding in a micro-batch changes what the model runs: padded batching of more
    than one row, and an attention that takes a mask (flash attention 2 takes the rows' bounds
    and is replayed without one)."""
    return BATCHINGS[recipe.batching].pads(recipe.micro_batch_size) and not (
        ATTENTIONS[recipe.attention].flash
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
