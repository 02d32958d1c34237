"""Checkpoints of `autotune train`: the trainable weights, optimizer and scheduler state, the
random generators and the step, so that `--resume` continues exactly where a run stopped. A
DeepSpeed ZeRO run's optimizer states (and fp32 master weights) stay partitioned: each rank
writes its own beside state.pt (autotune/training/deepspeed_engine.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from autotune.errors import UsageError, first_line
from autotune.training.deepspeed_engine import is_engine
from autotune.units import count_of

CHECKPOINT_PREFIX = "checkpoint-"


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest step first."""
    found = [
        p
        for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if p.is_dir()
        and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()
        and (p / "state.pt").exists()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def in_process_group() -> bool:
    """This process is a rank of a distributed `autotune train` run."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def writes_files() -> bool:
    """Rank 0 alone writes a distributed run's files; a single process writes its own."""
    import torch.distributed as dist

    return not in_process_group() or dist.get_rank() == 0


def _full_state_options(**options: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)


def trainable_weights(model: Any) -> dict[str, Any]:
    """The weights that train, on the CPU: what a checkpoint keeps of the model. In a process
    group (every rank calls it) FSDP's shards are gathered by torch's distributed state-dict
    API (a DeepSpeed engine's, ZeRO-3's partitions included, by DeepSpeed) and named without
    DDP's, FSDP's or DeepSpeed's wrapping; rank 0 gets them, the others nothing."""
    if is_engine(model) or in_process_group():
        return full_model_state(model, trainable_only=True)
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def full_model_state(model: Any, trainable_only: bool) -> dict[str, Any]:
    """In a process group: the whole model's state (or its trainable weights), gathered to
    rank 0's CPU for saving (the other ranks get nothing)."""
    if is_engine(model):
        from autotune.training.deepspeed_engine import gathered_weights

        return gathered_weights(model, trainable_only)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(
        model, options=_full_state_options(cpu_offload=True, ignore_frozen_params=trainable_only)
    )


def optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state; in a process group gathered whole to rank 0 (keyed by parameter
    name), as torch's distributed state-dict API gives it. A DeepSpeed engine's stays in its
    ranks' partitions (save_checkpoint writes them)."""
    if is_engine(model):
        return {}
    if in_process_group():
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=_full_state_options(cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any], path: Path) -> None:
    """Restore the optimizer's state from checkpoint `path`'s `state` (a DeepSpeed engine's:
    from each rank's partition there)."""
    if is_engine(model):
        from autotune.training.deepspeed_engine import load_partition

        load_partition(model, path)
        return
    if in_process_group():
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=_full_state_options())
        return
    optimizer.load_state_dict(state)


def read_state(path: Path, mmap: bool = False) -> Any:
    """A state file autotune wrote (tensors and plain values only); in a process group once
    rank 0 has written it (every rank calls it). With `mmap`, its tensors are read only when
    used."""
    import torch

    if in_process_group():
        import torch.distributed as dist

        dist.barrier()
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_checkpoint_state(path: Path, mmap: bool = False) -> Any:
    """A checkpoint's state.pt (read_state), or one line saying why it is not resumed."""
    import pickle

    try:
        return read_state(path / "state.pt", mmap)
    except pickle.UnpicklingError:
        raise UsageError(
            f"checkpoint {path / 'state.pt'} holds more than tensors and plain values, so it is "
            "not loaded (unpickling it could run code); resume from a checkpoint autotune wrote "
            "or start again without --resume"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise UsageError(
            f"checkpoint {path / 'state.pt'} cannot be read: {first_line(error)}"
        ) from None


def load_trainable(model: Any, weights: dict[str, Any]) -> None:
    import torch

    if is_engine(model):
        from autotune.training.deepspeed_engine import load_gathered

        load_gathered(model, weights)
        return
    if in_process_group():  # every rank holds the whole weights; each keeps its shard
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, weights, options=_full_state_options(strict=False))
        return
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value.to(parameters[name].device))


def save_checkpoint(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    step: int,
    output_dir: Path,
    device: str,
    keep: int = 2,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint-<step>, keeping the newest `keep`; `extra`: plain values the run
    restores on resume (the early-stopping state)."""
    import torch

    trainable, optimizer_states = trainable_weights(model), optimizer_state(model, optimizer)
    path = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    if is_engine(model):  # every rank's partition is written before state.pt completes it
        import torch.distributed as dist

        from autotune.training.deepspeed_engine import save_partition

        save_partition(model, path)
        dist.barrier()
    if not writes_files():
        return path
    path.mkdir(parents=True, exist_ok=True)
    # Tensors and plain values only, so that resuming loads it with weights_only=True: a
    # checkpoint is a file someone may hand over, and it must not be able to run code.
    rng = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):  # the training device's generator only
        rng["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(
        {
            "step": step,
            "trainable": trainable,
            "optimizer": optimizer_states,
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            "extra": extra or {},
        },
        path / "state.pt.tmp",
    )
    (path / "state.pt.tmp").replace(path / "state.pt")
    for old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


BATCH_KEY = "effective_batch_size"
"""The `extra` value a checkpoint keeps of the sequences its steps trained on."""


def check_same_batch(extra: dict[str, Any], recipe: Any, path: Path) -> None:
    """Refuse to resume `path` with another effective batch (other num_gpus, micro-batch or
    accumulation): its step counts batches of the old size, so the data after it and the
    schedule would not be the run's. A checkpoint from before it was kept is not checked."""
    written = extra.get(BATCH_KEY)
    if written is not None and written != recipe.effective_batch_size:
        raise UsageError(
            f"--resume: {path} trained on {written} sequences a step and this recipe on "
            f"{recipe.effective_batch_size} ({recipe.per_gpu_batch_size} per GPU x "
            f"{count_of(recipe.num_gpus, 'GPU')}); resume with the num_gpus, micro_batch_size and "
            "gradient_accumulation_steps that wrote it"
        )


STRATEGY_KEY = "distributed"
"""The `extra` value a checkpoint keeps of the distributed strategy that wrote it."""


def check_same_strategy(extra: dict[str, Any], recipe: Any, path: Path) -> None:
    """Refuse to resume `path` across DeepSpeed's boundary or between its stages: ZeRO keeps
    its fp32 weights and optimizer states in partitions of its own layout (ZeRO-2 a flat
    group's share, ZeRO-3 each parameter's), which another strategy cannot read, and which
    another stage of the same size read scrambled. A checkpoint from before the strategy was
    kept is told by its partition files, and their stage by its run's recipe file."""
    from autotune.distributed import DISTRIBUTED
    from autotune.training.deepspeed_engine import PARTITION_NAME

    written = extra.get(STRATEGY_KEY)
    if written not in DISTRIBUTED:
        written = _zero_strategy_before_kept(path)
    if written in DISTRIBUTED:
        zero_written = DISTRIBUTED[written].uses_deepspeed
        differs = written != recipe.distributed
    else:
        zero_written = any(path.glob(PARTITION_NAME.format(rank="*")))
        differs = False
    zero_now = DISTRIBUTED[recipe.distributed].uses_deepspeed
    if zero_written != zero_now or (differs and zero_now):
        wrote = written or ("a DeepSpeed ZeRO run" if zero_written else "a run without DeepSpeed")
        raise UsageError(
            f"--resume: {path} was written by {wrote} and this recipe trains with "
            f"{recipe.distributed}; ZeRO keeps its optimizer states in partitions of its own, "
            "so resume with the strategy that wrote it"
        )


def _zero_strategy_before_kept(path: Path) -> str | None:
    """The ZeRO strategy that wrote `path`, a checkpoint from before checkpoints kept theirs:
    where it holds ZeRO partitions, the recipe its run wrote beside it (train_plan.run_recipe)
    names the stage; None where nothing tells."""
    from autotune.distributed import DISTRIBUTED
    from autotune.training.deepspeed_engine import PARTITION_NAME
    from autotune.training.train_plan import run_recipe

    if not any(path.glob(PARTITION_NAME.format(rank="*"))):
        return None
    written = run_recipe(path.parent)
    strategy = written.distributed if written is not None else None
    if strategy in DISTRIBUTED and DISTRIBUTED[strategy].uses_deepspeed:
        return str(strategy)
    return None


def check_resumable(path: Path, recipe: Any) -> None:
    """Refuse a checkpoint `recipe` cannot continue (check_same_batch, check_same_strategy)
    from its `extra` values alone, before the model is built: its weights and optimizer
    states are mapped, not read."""
    extra = dict(read_checkpoint_state(path, mmap=True).get("extra", {}))
    check_same_batch(extra, recipe, path)
    check_same_strategy(extra, recipe, path)


def check_steps_left(path: Path, max_steps: int | None) -> None:
    """Refuse a --resume whose --max-steps the checkpoint at `path` has already reached: it
    would train nothing and write the finished run's metrics again without a step."""
    step = int(path.name.removeprefix(CHECKPOINT_PREFIX))
    if max_steps is not None and step >= max_steps:
        raise UsageError(
            f"--resume: {path.parent} has trained {count_of(step, 'step')} already, and "
            f"--max-steps {max_steps} leaves none to train; give --max-steps above {step} to "
            "train on"
        )


def load_checkpoint(
    model: Any, optimizer: Any, scheduler: Any, path: Path, device: str
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint into the model, optimizer, scheduler and generators; returns its
    step and its `extra` values (check_resumable has refused one the run cannot continue)."""
    import torch

    state = read_checkpoint_state(path)
    load_trainable(model, state["trainable"])
    load_optimizer_state(model, optimizer, state["optimizer"], path)
    scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng", {})
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.startswith("cuda"):
        torch.cuda.set_rng_state(rng["cuda"], device)
    return int(state["step"]), dict(state.get("extra", {}))
