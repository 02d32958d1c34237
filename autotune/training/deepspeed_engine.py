"""One rank of a DeepSpeed ZeRO probe or `autotune train` run: the model and its optimizer
handed to `deepspeed.initialize` with the DeepSpeed JSON the exports write
(autotune.distributed.deepspeed_config), its "auto" values filled in as the HF integration
would from the recipe; for `autotune train`, the weights gathered to rank 0 and each rank's
partition of a checkpoint.

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
from pathlib import Path
from typing import Any

from autotune.distributed import DISTRIBUTED, deepspeed_config
from autotune.recipe import Recipe

SHARED_MEMORY_OP = "deepspeed_shm_comm"
"""The name deepspeed.ops.__compatible_ops__ knows DeepSpeed's CPU shared-memory all-reduce by."""

NO_PRINT_STEPS = 10**9
"""steps_per_print: DeepSpeed's own progress lines stay out of the probe log."""


def probe_config(recipe: Recipe) -> dict[str, Any]:
    """The exported DeepSpeed JSON with the values its "auto" entries take for this recipe.

    bf16/fp16 precisions run DeepSpeed's own 16-bit modes (16-bit weights, fp32 master weights
    and optimizer states in its ZeRO optimizer); fp32 and amp_bf16 run it in fp32, amp_bf16 with
    the step loop's torch.autocast around the forward. Gradients are not clipped, as in every
    probe (the exported gradient_clipping, 0)."""
    config = deepspeed_config(recipe)
    micro, accumulation = recipe.micro_batch_size, recipe.gradient_accumulation_steps
    config.update(
        bf16={"enabled": recipe.precision == "bf16"},
        fp16={"enabled": recipe.precision == "fp16"},
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro * accumulation * recipe.num_gpus,
        zero_allow_untested_optimizer=True,
        steps_per_print=NO_PRINT_STEPS,
    )
    if recipe.offload != "none":
        # ZeRO-Offload steps the client optimizer on the host's fp32 partitions; DeepSpeed's own
        # DeepSpeedCPUAdam (a compiled op) would step faster, so tokens/s is a lower bound
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def cpu_refusal(recipe: Recipe) -> str:
    """Why DeepSpeed cannot train this recipe on the CPU ('' where it can): its CPU
    accelerator has an fp16 mode only where oneDNN's fp16 kernels run on the processor."""
    if not DISTRIBUTED[recipe.distributed].uses_deepspeed or recipe.precision != "fp16":
        return ""
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if torch.float16 in CPU_Accelerator().supported_dtypes():
        return ""
    return (
        f"precision fp16 with {recipe.distributed} on the CPU: DeepSpeed's CPU accelerator has "
        "no fp16 on this processor (oneDNN lacks it); choose bf16 or fp32, or train on CUDA"
    )


def name_deepspeed_accelerator(device: str) -> None:
    """Tell DeepSpeed the device before anything imports it (accelerate does, to unwrap a model
    being saved, wherever DeepSpeed is installed): left to detect one without CUDA, it printed a
    warning on stdout that it could not find a GPU. A DS_ACCELERATOR the user set is kept."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.startswith("cuda") else "cpu")


def prepare_deepspeed(device: str) -> None:
    """Import deepspeed with the probe's device as its accelerator; on the CPU, without its
    shared-memory all-reduce (compiled at the engine's start)."""
    name_deepspeed_accelerator(device)
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


# `autotune train` of a ZeRO recipe keeps autotune's checkpoint format: rank 0's state.pt holds
# the weights that train gathered whole (as for DDP and FSDP), and each rank writes beside it
# its own partition of the fp32 master weights and of the optimizer states, tensors and plain
# values only (DeepSpeed's own checkpoints are unpickled on load, which can run code).


def gathered_weights(engine: Any, trainable_only: bool) -> dict[str, Any]:
    """The engine's model weights (or its trainable ones) whole on rank 0's CPU, named as the
    unwrapped model names them (tied weights under each name); the other ranks get nothing.
    ZeRO-3's partitioned parameters are gathered one at a time; ZeRO-2's are whole on every
    rank. Every rank calls it."""
    import deepspeed
    import torch.distributed as dist

    rank_0 = dist.get_rank() == 0
    weights: dict[str, Any] = {}
    by_id: dict[int, Any] = {}
    for name, parameter in engine.module.named_parameters(remove_duplicate=False):
        if trainable_only and not parameter.requires_grad:
            continue
        if id(parameter) not in by_id:
            with deepspeed.zero.GatheredParameters([parameter]):
                by_id[id(parameter)] = parameter.detach().cpu().clone() if rank_0 else None
        if rank_0:
            weights[name] = by_id[id(parameter)]
    return weights


def load_gathered(engine: Any, weights: dict[str, Any]) -> None:
    """Put whole `weights` (every rank holds them) into the engine's model, each rank keeping
    its partition under ZeRO-3."""
    import deepspeed
    import torch

    with torch.no_grad():
        for name, parameter in engine.module.named_parameters():
            if name in weights:
                with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
                    parameter.copy_(weights[name].to(parameter.device, parameter.dtype))


PARTITION_NAME = "zero_rank{rank}.pt"
"""A rank's partition of the fp32 master weights and optimizer states, in each checkpoint."""


def _partition_path(checkpoint: Path, rank: int | str) -> Path:
    return checkpoint / PARTITION_NAME.format(rank=rank)


def _fp32_partitions(engine: Any) -> list[Any]:
    """This rank's flat fp32 master weights: ZeRO-2's and ZeRO-3's optimizers name them apart."""
    zero = engine.optimizer
    if hasattr(zero, "single_partition_of_fp32_groups"):
        return list(zero.single_partition_of_fp32_groups)
    return list(zero.fp32_partitioned_groups_flat)


def save_partition(engine: Any, checkpoint: Path) -> None:
    """Write this rank's fp32 master weights, optimizer states and loss scale into `checkpoint`
    (written whole, then renamed); every rank calls it before rank 0 writes state.pt."""
    import torch
    import torch.distributed as dist

    checkpoint.mkdir(parents=True, exist_ok=True)
    path = _partition_path(checkpoint, dist.get_rank())
    client = engine.optimizer.optimizer  # the torch optimizer, stepping the flat partitions
    flats = _fp32_partitions(engine)
    state = {
        "fp32": [flat.detach().cpu() for flat in flats],
        # keyed by partition, since ZeRO-3 empties the groups' params between its steps
        "states": [
            {key: _on_cpu(value) for key, value in client.state[flat].items()} for flat in flats
        ],
        "groups": [_hyperparameters(group) for group in client.param_groups],
        "loss_scale": _plain_values(engine.optimizer.loss_scaler),  # fp16's dynamic scale
    }
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def load_partition(engine: Any, checkpoint: Path) -> None:
    """Restore this rank's fp32 master weights, optimizer states and loss scale from
    `checkpoint`."""
    import torch
    import torch.distributed as dist

    from autotune.errors import UsageError

    path, world = _partition_path(checkpoint, dist.get_rank()), dist.get_world_size()
    written = len(list(checkpoint.glob(_partition_path(checkpoint, "*").name)))
    if written != world:
        raise UsageError(
            f"--resume: {checkpoint} was written by {written} DeepSpeed ranks and this run has "
            f"{world}; a ZeRO checkpoint resumes on the number of ranks that wrote it"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    client, flats = engine.optimizer.optimizer, _fp32_partitions(engine)
    with torch.no_grad():
        for flat, saved in zip(flats, state["fp32"], strict=True):
            flat.copy_(saved.to(flat.device))
    for flat, saved_state in zip(flats, state["states"], strict=True):
        client.state[flat] = {  # a step counter stays on the CPU, where torch keeps it
            key: value.to(flat.device) if _is_tensor(value) and value.dim() else value
            for key, value in saved_state.items()
        }
    for group, saved_group in zip(client.param_groups, state["groups"], strict=True):
        group.update(saved_group)
    for name, value in state["loss_scale"].items():
        setattr(engine.optimizer.loss_scaler, name, value)


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _on_cpu(value: Any) -> Any:
    return value.detach().cpu() if _is_tensor(value) else value


def _plain_values(thing: Any) -> dict[str, Any]:
    """The numbers and flags among an object's attributes (a loss scaler's scale, its counts)."""
    return {
        name: value
        for name, value in vars(thing).items()
        if isinstance(value, int | float | bool) or value is None
    }


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's values (learning rate, betas...) without its parameters."""
    return {key: value for key, value in group.items() if key != "params"}
