"""One rank of a distributed probe: joining the process group, wrapping the model as the
recipe's strategy says (torch's DDP, FSDP2 with each decoder block a unit, or a DeepSpeed ZeRO
engine), and taking this rank's share of each step's sequences.

The probe launcher (autotune/probe_ranks.py) sets RANK, WORLD_SIZE and the rendezvous file; on
CUDA rank r trains on the r-th visible GPU through nccl, on the CPU through gloo.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from autotune.distributed import DISTRIBUTED
from autotune.recipe import Recipe

T = TypeVar("T")


@dataclass(frozen=True)
class RankPlace:
    rank: int
    world_size: int
    device: str
    """This rank's device: cuda:<rank> or cpu."""


def join_process_group(recipe: Recipe, device: str) -> RankPlace:
    """This process's rank, after joining the probe's process group (a single-GPU recipe:
    rank 0 of 1 on `device`, no group)."""
    if recipe.num_gpus < 2:
        return RankPlace(0, 1, device)
    import datetime

    import torch
    import torch.distributed as dist

    from autotune.probe_ranks import RENDEZVOUS_ENV

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    # a rank that died is noticed by the launcher; this only bounds a lost collective
    timeout = datetime.timedelta(minutes=10)
    # the store itself, not a file:// URL: a URL would read a relative --output's first folder
    # as its host, and a path's `?` or `#` as its query or fragment
    store = dist.FileStore(os.environ[RENDEZVOUS_ENV], world)
    store.set_timeout(timeout)
    dist.init_process_group(
        backend="nccl" if device.startswith("cuda") else "gloo",
        store=store,
        rank=rank,
        world_size=world,
        timeout=timeout,
    )
    if DISTRIBUTED[recipe.distributed].uses_deepspeed:
        from autotune.training.deepspeed_engine import prepare_deepspeed

        prepare_deepspeed(device)  # imported before the memory meter's baseline, as torch is
    return RankPlace(rank, world, device)


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_rank() -> NoReturn:
    """Leave the process group and end this rank's process at once, its result written by
    then. Left to the interpreter's teardown, the threads DeepSpeed and gloo leave behind
    aborted about one rank exit in ten ("terminate called without an active exception")."""
    try:
        leave_process_group()
    finally:  # also where leaving fails (a broken peer): the result is written
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def rank_share(step_examples: Sequence[Sequence[T]], place: RankPlace) -> list[list[T]]:
    """This rank's sequences of each step: every world_size-th, from its rank on."""
    return [list(step[place.rank :: place.world_size]) for step in step_examples]


def evaluate_on_ranks(
    model: Any, examples: Sequence[Any], recipe: Recipe, place: RankPlace, pad_token_id: int
) -> float:
    """Mean loss per answer token over `examples`, the same on every rank (every rank calls
    this). FSDP and ZeRO-3 gather each block's weights inside the forward, so there every rank
    scores every row. DDP's and ZeRO-2's ranks each hold all the weights: each scores its share
    of the rows on the unwrapped module (no collective runs inside its forward, so shares of
    unequal length cannot hang), and the loss sums and token counts are added over the ranks."""
    from autotune.training.loop import eval_loss_sum, evaluate, mean_eval_loss

    if place.world_size == 1 or DISTRIBUTED[recipe.distributed].shards_parameters:
        return evaluate(model, examples, recipe, place.device, pad_token_id)
    import torch
    import torch.distributed as dist

    share = rank_share([examples], place)[0]
    # the module DDP or DeepSpeed's engine wraps: DDP's own forward broadcasts its buffers
    loss_sum, tokens = eval_loss_sum(model.module, share, recipe, place.device, pad_token_id)
    totals = torch.tensor([loss_sum, tokens], dtype=torch.float64, device=place.device)
    dist.all_reduce(totals)
    return mean_eval_loss(float(totals[0]), int(totals[1]))


def distribute_model(model: Any, recipe: Recipe, place: RankPlace) -> Any:
    """The model as the recipe's strategy trains it; build the optimizer after this (FSDP2
    replaces the parameters by their shards)."""
    if recipe.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        on_cuda = place.device.startswith("cuda")
        return DistributedDataParallel(model, device_ids=[place.rank] if on_cuda else None)
    if recipe.distributed == "fsdp":
        shard_blocks(model, offload=recipe.offload != "none")
    return model


def train_with_engine(model: Any, optimizer: Any, recipe: Recipe, place: RankPlace) -> tuple:
    """(model, optimizer) as the step loop drives them: a DeepSpeed ZeRO recipe's engine and its
    ZeRO optimizer (autotune/training/deepspeed_engine.py); the others as they are."""
    if not DISTRIBUTED[recipe.distributed].uses_deepspeed:
        return model, optimizer
    from autotune.training.deepspeed_engine import deepspeed_engine

    engine = deepspeed_engine(model, optimizer, recipe, place.device)
    return engine, engine.optimizer


def shard_blocks(model: Any, mesh: Any = None, offload: bool = False) -> None:
    """FSDP2 as accelerate's transformer-based wrap does it: each decoder block one unit, the
    rest (embeddings, final norm, head) the root's; parameters resharded after forward; with
    `offload`, the shards (and their gradients and optimizer states) in host memory."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from autotune.training.freeze import decoder_blocks

    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for block in decoder_blocks(base):
        fully_shard(block, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
