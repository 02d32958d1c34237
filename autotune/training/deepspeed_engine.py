"""One rank of a DeepSpeed ZeRO probe: the model and its optimizer handed to `deepspeed.initialize`
with the DeepSpeed JSON the exports write (autotune.distributed.deepspeed_config), its "auto"
values filled in as the HF integration would from the recipe.

The optimizer is the recipe's own torch optimizer, given to DeepSpeed as a client optimizer
(`zero_allow_untested_optimizer`): DeepSpeed's fused Adam and its CPU Adam are C++/CUDA ops that
are compiled on first use, and the probes must not depend on a compiler. The step loop calls
engine.backward and engine.step (autotune/training/loop.py), marking the last micro-batch of
each step as the accumulation boundary itself, since a step's number of micro-batches depends
on the batching.

On the CPU (`--device cpu`, the ranks in a gloo group), DeepSpeed's CPU accelerator would
compile its shared-memory all-reduce (deepspeed_shm_comm) with ninja and g++ when the engine
starts, every rank at once; it is marked not compatible here, so DeepSpeed's collectives go
through the gloo group the rank already joined and nothing is compiled.
"""

from __future__ import annotations

import os
from typing import Any

from autotune.distributed import DISTRIBUTED, deepspeed_config
from autotune.recipe import Recipe

SHARED_MEMORY_OP = "deepspeed_shm_comm"
"""The name deepspeed.ops.__compatible_ops__ knows DeepSpeed's CPU shared-memory all-reduce by."""

NO_PRINT_STEPS = 10**9
"""steps_per_print: DeepSpeed's own progress lines stay out of the probe log."""


def uses_deepspeed(recipe: Recipe) -> bool:
    return DISTRIBUTED[recipe.distributed].deepspeed_stage is not None


def probe_config(recipe: Recipe) -> dict[str, Any]:
    """The exported DeepSpeed JSON with the values its "auto" entries take for this recipe.

    bf16/fp16 precisions run DeepSpeed's own 16-bit modes (16-bit weights, fp32 master weights
    and optimizer states in its ZeRO optimizer); fp32 and amp_bf16 run it in fp32, amp_bf16 with
    the step loop's torch.autocast around the forward. Gradients are not clipped, as in every
    probe."""
    config = deepspeed_config(recipe)
    micro, accumulation = recipe.micro_batch_size, recipe.gradient_accumulation_steps
    config.update(
        bf16={"enabled": recipe.precision == "bf16"},
        fp16={"enabled": recipe.precision == "fp16"},
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro * accumulation * recipe.num_gpus,
        gradient_clipping=0.0,
        zero_allow_untested_optimizer=True,
        steps_per_print=NO_PRINT_STEPS,
    )
    if recipe.offload != "none":
        # ZeRO-Offload steps the client optimizer on the host's fp32 partitions; DeepSpeed's own
        # DeepSpeedCPUAdam (a compiled op) would step faster, so tokens/s is a lower bound
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def prepare_deepspeed(device: str) -> None:
    """Import deepspeed with the probe's device as its accelerator; on the CPU, without its
    shared-memory all-reduce (compiled at the engine's start)."""
    os.environ["DS_ACCELERATOR"] = "cuda" if device.startswith("cuda") else "cpu"
    import deepspeed.ops

    if not device.startswith("cuda"):
        # the mapping DeepSpeed consults before building the op; an edit to it persists
        deepspeed.ops.__compatible_ops__[SHARED_MEMORY_OP] = False


def deepspeed_engine(model: Any, optimizer: Any, recipe: Recipe, device: str) -> Any:
    """The DeepSpeed engine training `model` with `optimizer`, in the process group the rank
    joined (autotune.training.ranks.join_process_group)."""
    prepare_deepspeed(device)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=probe_config(recipe), dist_init_required=False
    )
    return engine


def is_engine(model: Any) -> bool:
    """A DeepSpeed engine (without importing deepspeed where the probe does not use it)."""
    return type(model).__name__ == "DeepSpeedEngine"
