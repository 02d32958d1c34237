"""What each GPU holds of the model under DeepSpeed ZeRO in its 16-bit modes (precision bf16 or
fp16), where DeepSpeed's ZeRO optimizer keeps fp32 master weights beside the 16-bit ones.

DeepSpeed ships estimators of these "model states" for a full fine-tune with Adam
(deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs and
deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs); where deepspeed is
installed and the recipe is one they describe, their figures are used. Otherwise the same
terms, written out per trained parameter (T trained of P, N GPUs, S the optimizer's fp32
state bytes: 8 for AdamW):

- ZeRO-2: 16-bit weights whole (2 P); 16-bit and fp32 gradient partitions (2 T + 4 T) / N;
  fp32 master weights and optimizer states (4 T + S) / N;
- ZeRO-3: the 16-bit weights divided by N too, no 16-bit gradient partition (each layer's is
  reduce-scattered into the fp32 one as backward goes), plus the largest layer gathered (4 x
  its parameters: its 16-bit weights and their gradient);
- offload optimizer: the fp32 partitions (gradients, master weights, states) live in host
  memory; offload optimizer_and_params (ZeRO-3): the 16-bit weight partitions too.

Neither counts the buffers DeepSpeed allocates beyond model states (its gradient buckets,
ZeRO-3's prefetched and persistent parameters: zero_buffers.py) or the fp32 copy of the model
each process loads before DeepSpeed partitions it.
fp32 and amp_bf16 recipes run DeepSpeed in fp32 (no master copy): the generic sharding terms
of distributed_memory.py describe them.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autotune.distributed import DISTRIBUTED, deepspeed_installed

if TYPE_CHECKING:
    from autotune.model_spec import ModelSpec
    from autotune.recipe import Recipe

SIXTEEN_BIT_PRECISIONS = ("bf16", "fp16")
"""Precisions the probes run in DeepSpeed's own 16-bit modes (deepspeed_engine.probe_config)."""

FP32_BYTES = 4
HALF_BYTES = 2
ADAM_STATE_BYTES = 8
"""Per parameter, the fp32 moments DeepSpeed's estimators assume."""


@dataclass(frozen=True)
class ZeroStates:
    gpu_bytes: int
    """Model states each GPU holds (weights, gradients, master weights, optimizer states)."""
    host_bytes: int
    """Model states in host memory for each GPU (offload)."""
    source: str
    """'deepspeed' (its estimators) or 'formula' (the terms written out)."""


def runs_16bit_zero(recipe: Recipe) -> bool:
    """A ZeRO recipe in DeepSpeed's 16-bit mode, the model states this module predicts."""
    kind = DISTRIBUTED[recipe.distributed]
    return kind.uses_deepspeed and recipe.precision in SIXTEEN_BIT_PRECISIONS


def largest_layer_params(spec: ModelSpec) -> int:
    """Parameters of the largest single module (ZeRO-3 gathers one at a time): the embedding,
    a separate head, or the widest linear of a block."""
    widest = spec.hidden_size * max(spec.intermediate_size, spec.expert_intermediate_size)
    return max(spec.embedding_params, spec.lm_head_params, widest, spec.q_dim * spec.hidden_size)


def written_out(
    spec: ModelSpec, recipe: Recipe, frozen_bytes: int, trained: int, state_bytes: int
) -> ZeroStates:
    """The terms of the module's docstring; `frozen_bytes` the weights nobody trains (a LoRA
    base), `state_bytes` the optimizer's states of the trained parameters in fp32."""
    gpus = recipe.num_gpus
    stage = DISTRIBUTED[recipe.distributed].deepspeed_stage
    weights = HALF_BYTES * trained + frozen_bytes
    fp32_partitions = (FP32_BYTES + FP32_BYTES) * trained + state_bytes
    half_gradients = HALF_BYTES * trained
    gathered = 0
    if stage == 3:
        weights = -(-weights // gpus)
        gathered = 2 * HALF_BYTES * largest_layer_params(spec)
        half_gradients = 0  # reduce-scattered into the fp32 partition layer by layer
    host = 0
    if recipe.offload != "none":
        # the fp32 partitions, stepped on the CPU; 16-bit gradients pass through the buckets
        host, fp32_partitions, half_gradients = -(-fp32_partitions // gpus), 0, 0
    if recipe.offload == "optimizer_and_params":
        host, weights = host + weights, 0
    gpu = weights + gathered + -(-(fp32_partitions + half_gradients) // gpus)
    return ZeroStates(gpu, host, "formula")


def deepspeed_estimate(spec: ModelSpec, recipe: Recipe) -> ZeroStates | None:
    """DeepSpeed's own estimate of a full fine-tune with Adam's two fp32 moments, None where
    it describes something else or deepspeed is not installed. Its host figure is per machine
    (num_gpus_per_node GPUs, with its additional_buffer_factor of 1.5): divided by num_gpus."""
    if not deepspeed_installed():
        return None
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        # its accelerator's choice is logged as it is imported
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    total, gpus = spec.total_params, recipe.num_gpus
    offload = recipe.offload != "none"
    if DISTRIBUTED[recipe.distributed].deepspeed_stage == 2:
        host, gpu = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=gpus, cpu_offload=offload
        )
    else:
        host, gpu, _ = estimate_zero3_model_states_mem_needs(
            total,
            largest_layer_params(spec),
            num_gpus_per_node=gpus,
            cpu_offload=offload,
            cpu_offload_params=recipe.offload == "optimizer_and_params",
            zero_init=False,  # each rank loads the whole model, then DeepSpeed partitions it
        )
    return ZeroStates(int(gpu), int(host) // gpus if offload else 0, "deepspeed")


def zero_model_states(
    spec: ModelSpec, recipe: Recipe, frozen_bytes: int, trained: int, state_bytes: int
) -> ZeroStates:
    """Each GPU's model states: DeepSpeed's estimators where they describe the recipe (a full
    fine-tune, Adam's moments) and deepspeed is installed, else the written-out terms."""
    described = recipe.method == "full" and state_bytes == ADAM_STATE_BYTES * trained
    estimated = deepspeed_estimate(spec, recipe) if described else None
    return estimated or written_out(spec, recipe, frozen_bytes, trained, state_bytes)
