"""What a DeepSpeed ZeRO rank allocates beyond its model states (zero_memory.py), as DeepSpeed
0.19.8 sizes it from the exported config's zero_optimization (autotune.distributed.
deepspeed_config) or, for the keys it leaves out, DeepSpeed's defaults
(deepspeed/runtime/zero/config.py). Sizes are in elements there; a buffer holds the model's
16-bit dtype (2 bytes). None of them is capped at the model's size: a 1M-parameter model on
the defaults allocates the same 1-2 GB as a 7B one, so on a small model they are most of the
peak.

- ZeRO-2 (runtime/zero/stage_1_and_2.py, setup_buckets): with contiguous_gradients, the
  gradient bucket (IPG) `torch.empty(reduce_bucket_size)`, a second one with overlap_comm,
  made at the first parameter's gradient, released after the step (_release_ipg_buffers):
  by then the loss's backward has let the logits' buffers go, so they add to the peak only
  what they exceed those by (traced: a real rank's peak stays at the loss while the buckets
  are smaller). The 16-bit
  gradients of the rank's partition (grads_in_partition) are model states already.
- ZeRO-2 with offload_optimizer (stage_1_and_2.py, __init__): a 16-bit staging buffer of the
  largest parameter's elements on the GPU (temp_grad_buffer_for_gpu_offload).
- ZeRO-3 (runtime/zero/stage3.py, __init__): with contiguous_gradients, one IPG bucket of
  reduce_bucket_size, kept from the start; the prefetched parameters, gathered ahead of their
  module up to stage3_prefetch_bucket_size elements, never more than
  stage3_max_live_parameters (partitioned_param_coordinator.py, fetch_sub_module); parameters under
  stage3_param_persistence_threshold elements are never partitioned
  (partition_parameters.py, _partition: `param.ds_numel < persistence_threshold`), so each
  rank holds them whole, (N - 1) / N of them beyond its share.

Model states already (zero_memory.py): the fp32 flat partitions (master weights, their
gradient: ZeRO-3's grad_partitions_flat_buffer, ZeRO-2's single_grad_partition at the step), the
16-bit gradient partition (ZeRO-2's grads_in_partition), the module ZeRO-3 has gathered.
The allgather_bucket_size of ZeRO-2 gathers the updated 16-bit partitions into the flat 16-bit
buffer the weights already view (all_gather_dp_groups): nothing beyond it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autotune.distributed import DISTRIBUTED
from autotune.zero_memory import largest_layer_params

if TYPE_CHECKING:
    from autotune.model_spec import ModelSpec
    from autotune.recipe import Recipe

BUFFER_BYTES = 2
"""Bytes per element of the buckets: the model's 16-bit dtype."""

DEEPSPEED_DEFAULTS: dict[str, Any] = {
    "contiguous_gradients": True,
    "overlap_comm": False,  # True for stage 3 (DeepSpeedZeroConfig.overlap_comm_valid)
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_param_persistence_threshold": 100_000,
}
"""deepspeed/runtime/zero/config.py's defaults of the keys the buffers depend on."""


def zero_optimization(recipe: Recipe) -> dict[str, Any]:
    """The zero_optimization the probes and exports run with, DeepSpeed's defaults filled in."""
    from autotune import distributed

    return {**DEEPSPEED_DEFAULTS, **distributed.deepspeed_config(recipe)["zero_optimization"]}


def ipg_bucket_bytes(stage: int, zero: dict[str, Any]) -> int:
    """The gradient buckets (IPG): one of reduce_bucket_size elements, two in ZeRO-2 with
    overlap_comm (double buffering), none without contiguous_gradients."""
    if not zero["contiguous_gradients"]:
        return 0
    buckets = 2 if stage == 2 and zero["overlap_comm"] else 1
    return buckets * int(zero["reduce_bucket_size"]) * BUFFER_BYTES


def persistent_params(spec: ModelSpec, threshold: int) -> int:
    """Parameters of fewer than `threshold` elements (ZeRO-3 keeps them whole on every rank):
    the norms' weights and the attention projections' biases, whichever are that small."""
    per_layer = [spec.hidden_size, spec.hidden_size]  # input and post-attention norms
    if spec.attention_bias:
        per_layer += [spec.q_dim, spec.kv_dim, spec.kv_dim]
    small = sum(n for n in per_layer if n < threshold) * spec.num_layers
    return small + (spec.hidden_size if spec.hidden_size < threshold else 0)  # the final norm


def zero_buffer_parts(spec: ModelSpec, recipe: Recipe, logits_bytes: int = 0) -> dict[str, int]:
    """The named per-GPU buffers of a ZeRO recipe in DeepSpeed's 16-bit modes; `logits_bytes`
    the loss's buffers, which ZeRO-2's buckets replace at the peak."""
    stage = DISTRIBUTED[recipe.distributed].deepspeed_stage
    zero = zero_optimization(recipe)
    gpus = recipe.num_gpus
    buckets = ipg_bucket_bytes(stage or 0, zero)
    if stage == 2:
        parts = {"zero_ipg_buckets_past_loss": max(buckets - logits_bytes, 0)}
    else:
        parts = {"zero_ipg_buckets": buckets}
    if stage == 2 and recipe.offload != "none":
        parts["zero_offload_gradient_staging"] = largest_layer_params(spec) * BUFFER_BYTES
    if stage == 3:
        prefetch = min(
            int(zero["stage3_prefetch_bucket_size"]),
            int(zero["stage3_max_live_parameters"]),
            spec.total_params,
        )
        parts["zero_prefetched_params"] = prefetch * BUFFER_BYTES
        whole = persistent_params(spec, int(zero["stage3_param_persistence_threshold"]))
        parts["zero_persistent_params"] = (whole - whole // gpus) * BUFFER_BYTES
    return parts
