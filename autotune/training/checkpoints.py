"""Checkpoints of `autotune train`: the trainable weights, optimizer and scheduler state, the
random generators and the step, so that `--resume` continues exactly where a run stopped."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from autotune.errors import UsageError, first_line

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


def trainable_weights(model: Any) -> dict[str, Any]:
    """The weights that train, on the CPU: what a checkpoint keeps of the model."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: Any, weights: dict[str, Any]) -> None:
    import torch

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

    path = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    path.mkdir(parents=True, exist_ok=True)
    # Tensors and plain values only, so that resuming loads it with weights_only=True: a
    # checkpoint is a file someone may hand over, and it must not be able to run code.
    rng = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):  # the training device's generator only
        rng["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(
        {
            "step": step,
            "trainable": trainable_weights(model),
            "optimizer": optimizer.state_dict(),
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


def load_checkpoint(
    model: Any, optimizer: Any, scheduler: Any, path: Path, device: str
) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint into the model, optimizer, scheduler and generators; returns its
    step and its `extra` values."""
    import pickle

    import torch

    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
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
    load_trainable(model, state["trainable"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng", {})
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.startswith("cuda"):
        torch.cuda.set_rng_state(rng["cuda"], device)
    return int(state["step"]), dict(state.get("extra", {}))
