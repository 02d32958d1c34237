"""FSDP2 on the meta device, for the replay of a sharded recipe: torch's own fully_shard code
shards the meta model as one rank of num_gpus would, over torch's fake process group (a group
whose collectives move no data, made for running one rank alone), so the sharded parameters,
gradients and optimizer states, and the all-gather and reduce-scatter buffers with their
prefetch, are what FSDP2 allocates, each through the replay's allocator model.

FSDP2 allocates its buffers on its mesh's device; here that device is meta, run with the CPU's
stream handle (no streams on either), and its check that no parameter is left on meta (a model
must be materialised before training for real) is lifted for the replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from autotune.meta_patches import patched
from autotune.recipe import Recipe


def _fake_group(world_size: int) -> Any:
    """A device mesh over a fake process group of `world_size`, this process rank 0."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized() and dist.get_world_size() != world_size:
        dist.destroy_process_group()
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    return init_device_mesh("cpu", (world_size,))


@contextlib.contextmanager
def fsdp_on_meta(on_alloc: Callable[[Any], None], on_free: Callable[[Any], None]) -> Iterator[None]:
    """FSDP2's device is meta while this lasts, its storage resizes told to a tracker."""
    import torch
    import torch.distributed.fsdp._fully_shard._fsdp_init as fsdp_init
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group
    import torch.distributed.fsdp._fully_shard._fully_shard as fully_shard_module

    def meta_device(mesh: Any) -> Any:
        return torch.device("meta")

    patches = [
        (fsdp_init, "_get_device_from_mesh", meta_device),
        (fully_shard_module, "_get_device_from_mesh", meta_device),
        (param_group.FSDPParamGroup, "_validate_no_meta_params", lambda self: None),
        (torch, "meta", torch.cpu),  # the device handle FSDP2 looks up by the device's name
    ]
    with patched(patches), fsdp_storage_resizes(on_alloc, on_free):
        yield


@contextlib.contextmanager
def fsdp_storage_resizes(
    on_alloc: Callable[[Any], None], on_free: Callable[[Any], None]
) -> Iterator[None]:
    """FSDP2 frees its unsharded parameters after use and makes them again before the next
    by resizing their storages, which no dispatch mode sees: tell a tracker of each (a
    tensor whose storage was just given its bytes back, or is about to lose them)."""
    import torch.distributed.fsdp._fully_shard._fsdp_param as fsdp_param
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

    alloc_storage, free_storage = fsdp_param.alloc_storage, fsdp_param.free_storage

    def alloc(tensor: Any) -> None:
        alloc_storage(tensor)
        on_alloc(tensor)

    def free(tensor: Any) -> None:
        on_free(tensor)
        free_storage(tensor)

    with patched(
        [
            (fsdp_param, "alloc_storage", alloc),
            (param_group, "alloc_storage", alloc),
            (fsdp_param, "free_storage", free),
        ]
    ):
        yield


def fsdp_replayed(
    recipe: Recipe, on_alloc: Callable[[Any], None], on_free: Callable[[Any], None]
) -> Any:
    """`fsdp_on_meta` for a recipe that FSDP shards, nothing for the others."""
    if recipe.distributed != "fsdp":
        return contextlib.nullcontext()
    return fsdp_on_meta(on_alloc, on_free)


def shard_on_meta(model: Any, recipe: Recipe) -> Any:
    """The meta model as rank 0 of the recipe's num_gpus holds it under FSDP2 (call inside
    `fsdp_on_meta`)."""
    from autotune.training.ranks import shard_blocks

    shard_blocks(model, mesh=_fake_group(recipe.num_gpus))
    return model
