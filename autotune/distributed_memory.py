"""Peak memory per GPU of a distributed recipe, from the single-GPU formula's parts.

Each rank runs the same micro-batch as a single GPU would, so activations and logits stay;
what changes is what each GPU holds of the model and its training state:

- ddp: a full replica (weights, gradients, optimizer states) plus DDP's gradient buckets, flat
  copies of the gradients in buckets of bucket_cap_mb (25 MB) that together are as large as
  the gradients (gradient_as_bucket_view off, torch's default);
- fsdp (FSDP2, each decoder block a unit, the root holding embeddings, final norm and head):
  weights, gradients, optimizer states and the step's temporaries divided by num_gpus, plus
  the all-gathered units (the root, kept gathered from forward to backward, the current block
  and the prefetched next one) and the reduce-scatter buffers of the largest trained unit (its
  unsharded gradient and the flat copy reduce-scatter reads);
- deepspeed_zero2: gradients and optimizer states divided, weights whole; deepspeed_zero3 as
  fsdp. That is DeepSpeed in fp32 (precision fp32, amp_bf16); in its 16-bit modes (bf16, fp16)
  it keeps fp32 master weights beside the 16-bit ones, and its model states come from its own
  estimators or the same terms written out (zero_memory.py), its gradient buckets and
  ZeRO-3's prefetched and persistent parameters from its config (zero_buffers.py);
- offload: the shares that move to host memory leave the GPU's peak and make the host figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from autotune.distributed import DISTRIBUTED
from autotune.zero_memory import runs_16bit_zero

if TYPE_CHECKING:
    from autotune.memory import MemoryEstimate
    from autotune.model_spec import ModelSpec
    from autotune.recipe import Recipe

SHARDED_PARTS = ("optimizer_states", "gradients", "optimizer_step_temporaries")
"""Parts every sharding strategy divides by num_gpus (ZeRO-2 and up)."""


def unit_params(spec: ModelSpec) -> tuple[int, int]:
    """(parameters of one decoder block, of the root unit: embeddings, final norm, head)."""
    root = spec.embedding_params + spec.lm_head_params + spec.hidden_size
    return (spec.total_params - root) // max(spec.num_layers, 1), root


def trained_unit_params(spec: ModelSpec, recipe: Recipe, trainable: int) -> tuple[int, int]:
    """(trained parameters of one trained block, of the root unit)."""
    if recipe.method == "full":
        root = spec.embedding_params + spec.lm_head_params + spec.hidden_size
    elif recipe.method == "freeze":
        root = spec.lm_head_params + spec.hidden_size
    else:
        root = 0
    blocks = spec.num_layers - (recipe.frozen_layers if recipe.method == "freeze" else 0)
    return (trainable - root) // max(blocks, 1), root


def per_gpu_estimate(
    spec: ModelSpec, recipe: Recipe, single: MemoryEstimate, trainable: int, trainable_bytes: int
) -> MemoryEstimate:
    """`single` (the one-GPU prediction of the recipe's micro-batch) as each of num_gpus GPUs
    holds it under the recipe's strategy; the new parts are named in the breakdown."""
    from autotune.memory import ALLOCATOR_OVERHEAD_FRACTION, UNALLOCATED_PARTS, MemoryEstimate

    kind = DISTRIBUTED[recipe.distributed]
    gpus = recipe.num_gpus
    parts = dict(single.breakdown)
    allocated_before = sum(v for k, v in parts.items() if k not in UNALLOCATED_PARTS)
    gradient_bytes = trainable * trainable_bytes
    if not kind.shards_states:  # ddp
        parts["ddp_gradient_buckets"] = gradient_bytes
    else:
        for name in SHARDED_PARTS:
            if name in parts:
                parts[name] = -(-parts[name] // gpus)
        if kind.shards_parameters:
            weight_bytes = parts["weights"] / max(spec.total_params, 1)
            block, root = unit_params(spec)
            parts["weights"] = -(-parts["weights"] // gpus)
            parts["gathered_units"] = int((root + 2 * block) * weight_bytes)
            trained_block, trained_root = trained_unit_params(spec, recipe, trainable)
            parts["reduce_scatter_buffers"] = 2 * max(trained_block, trained_root) * trainable_bytes
    host = 0
    if runs_16bit_zero(recipe):
        frozen = single.breakdown["weights"] - trainable * trainable_bytes
        host = zero_parts(spec, recipe, parts, max(frozen, 0), trainable)
    for name in offloaded_parts(recipe):
        host += parts.pop(name, 0)
    allocated = sum(v for k, v in parts.items() if k not in UNALLOCATED_PARTS)
    parts["allocator_overhead"] += int(ALLOCATOR_OVERHEAD_FRACTION * (allocated - allocated_before))
    paged = single.paged_bytes // gpus if kind.shards_states else single.paged_bytes
    return MemoryEstimate(
        peak_bytes=int(sum(parts.values())),
        breakdown=parts,
        paged_bytes=paged,
        host_bytes=single.host_bytes + host,  # offloaded activations stay per rank
    )


ZERO_REPLACED_PARTS = (
    "weights",
    "gradients",
    "optimizer_states",
    "gathered_units",
    "reduce_scatter_buffers",
)
"""The parts DeepSpeed's 16-bit modes hold as their own model states (zero_memory.py)."""


def zero_parts(
    spec: ModelSpec, recipe: Recipe, parts: dict[str, int], frozen_bytes: int, trainable: int
) -> int:
    """Replace the model's parts in `parts` by DeepSpeed's 16-bit model states (named by where
    the figure came from), the optimizer step's temporaries by those of its fp32 partition;
    return the host bytes of its offload. `frozen_bytes`: the weights nobody trains. Its
    buffers beyond the model states (gradient buckets, ZeRO-3's prefetched and persistent
    parameters) are parts of their own (zero_buffers.py)."""
    from autotune.optimizers import OPTIMIZERS
    from autotune.zero_buffers import zero_buffer_parts
    from autotune.zero_memory import FP32_BYTES, zero_model_states

    gpus = recipe.num_gpus
    kind = OPTIMIZERS[recipe.optimizer]
    state_bytes = kind.state_bytes(max(trainable // gpus, 1), FP32_BYTES) * trainable
    states = zero_model_states(spec, recipe, frozen_bytes, trainable, state_bytes)
    for name in ZERO_REPLACED_PARTS:
        parts.pop(name, None)
    parts[f"zero_model_states_{states.source}"] = states.gpu_bytes
    parts.update(zero_buffer_parts(spec, recipe, parts.get("logits_and_loss", 0)))
    if "optimizer_step_temporaries" in parts:
        stepped_on_gpu = recipe.offload == "none" and kind.step_temporaries
        parts["optimizer_step_temporaries"] = (
            -(-FP32_BYTES * trainable // gpus) if stepped_on_gpu else 0
        )
    return states.host_bytes


def offloaded_parts(recipe: Recipe) -> tuple[str, ...]:
    """The per-GPU parts an offloading recipe keeps in host memory instead: the optimizer
    states and their step's temporaries (the step runs on the CPU), and with the parameters
    also their shards and their gradients' shards (DeepSpeed's 16-bit modes: zero_parts)."""
    if recipe.offload == "none" or runs_16bit_zero(recipe):
        return ()
    optimizer = ("optimizer_states", "optimizer_step_temporaries")
    if recipe.offload == "optimizer":
        return optimizer
    return (*optimizer, "weights", "gradients")
