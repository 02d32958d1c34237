"""`autotune train`: the real fine-tune with a recipe, on the probe's model builder and step loop.

Checkpoints hold the trainable weights, optimizer and scheduler state and the step, so `--resume`
continues where a run stopped. The result is a peft adapter (LoRA) or a full model directory.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.errors import UsageError, first_line
from autotune.recipe import Recipe

CHECKPOINT_PREFIX = "checkpoint-"
WARMUP_FRACTION = 0.03


@dataclass
class TrainReport:
    steps: int
    resumed_from_step: int
    tokens_per_second: float
    peak_memory_bytes: int
    memory_source: str
    eval_loss: float
    train_loss: float
    output_dir: Path
    budget_enforced: bool
    losses: list[float] = field(default_factory=list)


RUN_MARKER = "autotune_recipe.yaml"
"""Written first into an output directory: the directory holds a run of `autotune train`."""


def holds_a_run(path: Path) -> bool:
    return (path / RUN_MARKER).is_file() or bool(_checkpoints(path))


def check_output_dir(path: Path, model: str, resume: bool = False, overwrite: bool = False) -> None:
    """Fail early, with one line, when the output directory is the model's own, holds files
    that are not an autotune run's (unless `overwrite`), holds a run that is neither resumed
    nor overwritten, or cannot be written."""
    model_dir = Path(model).expanduser()
    if model_dir.is_dir():
        target, source = path.expanduser().resolve(), model_dir.resolve()
        if target == source or source in target.parents:
            raise UsageError(
                f"--output {path} is inside the model's directory {model_dir}; training never "
                "writes there, choose another directory"
            )
    existing = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if existing and not resume and not overwrite:
        if holds_a_run(path):
            raise UsageError(
                f"--output {path} holds an earlier autotune train run; add --resume to continue "
                "it, --overwrite to start it again, or choose another directory"
            )
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise UsageError(
            f"--output {path} is not empty ({shown}) and holds no autotune run; choose an empty "
            "or new directory, or add --overwrite to replace files of the same names"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".autotune-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"output directory {path} is not writable: {error.strerror}") from None


def _checkpoints(output_dir: Path) -> list[Path]:
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
    checkpoints = _checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _epoch_batches(
    example_count: int, effective_batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """The example indices of each step of an epoch; examples are read only when trained on."""
    order = list(range(example_count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [
        order[i : i + effective_batch_size]
        for i in range(0, len(order) - effective_batch_size + 1, effective_batch_size)
    ]


def _schedule(total_steps: int) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * WARMUP_FRACTION))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _save_checkpoint(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    step: int,
    output_dir: Path,
    device: str,
    keep: int = 2,
) -> Path:
    import torch

    path = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    path.mkdir(parents=True, exist_ok=True)
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    # Tensors and plain values only, so that resuming loads it with weights_only=True: a
    # checkpoint is a file someone may hand over, and it must not be able to run code.
    rng = {"cpu": torch.get_rng_state()}
    if device.startswith("cuda"):  # the training device's generator only
        rng["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(
        {
            "step": step,
            "trainable": trainable,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,
        },
        path / "state.pt.tmp",
    )
    (path / "state.pt.tmp").replace(path / "state.pt")
    for old in _checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _load_checkpoint(model: Any, optimizer: Any, scheduler: Any, path: Path, device: str) -> int:
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
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            parameters[name].copy_(value.to(parameters[name].device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng", {})
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.startswith("cuda"):
        torch.cuda.set_rng_state(rng["cuda"], device)
    return int(state["step"])


def _check_length(epochs: float | None, max_steps: int | None, save_every_steps: int) -> None:
    if epochs is not None and max_steps is not None:
        raise UsageError("give --epochs or --max-steps, not both")
    if (epochs is not None and not 0 < epochs < math.inf) or (
        max_steps is not None and max_steps < 1
    ):
        raise UsageError("--epochs and --max-steps must be positive and finite")
    if save_every_steps < 1:
        raise UsageError(f"--save-steps must be at least 1, got {save_every_steps}")


def train(
    recipe: Recipe,
    data_path: Path,
    output_dir: Path,
    *,
    epochs: float | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    budget_bytes: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    save_every_steps: int = 100,
    skip_bad_rows: bool = False,
    eval_rows: int | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainReport:
    """Fine-tune with `recipe` and save the adapter or model to `output_dir`."""
    _check_length(epochs, max_steps, save_every_steps)
    import torch

    from autotune.data.splits import load_splits
    from autotune.training.build import build_model, build_optimizer, load_tokenizer
    from autotune.training.loop import MemoryMeter, evaluate, tokens_per_second, train_steps

    if not recipe.model:
        raise UsageError("the recipe names no model; add `model:` or export it from a study")
    from autotune.data.rows import checked_scan

    data_scan = checked_scan(data_path, skip_bad_rows)
    check_output_dir(output_dir, recipe.model, resume, overwrite)
    if overwrite and not resume:
        for old in _checkpoints(output_dir):  # a new run: no old step may be resumed later
            shutil.rmtree(old)
    if recipe.expandable_segments:
        # Read when the CUDA allocator starts, which is at the first allocation below.
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    meter = MemoryMeter(device)
    budget_enforced = meter.enforce_budget(budget_bytes) if budget_bytes else False
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(recipe.model)
    splits = load_splits(
        data_path, tokenizer, recipe.seq_len, seed, eval_rows, data_scan.usable_rows
    )
    steps_per_epoch = len(splits.train) // recipe.effective_batch_size
    if steps_per_epoch < 1:
        raise UsageError(
            f"{data_path} has {len(splits.train)} training rows, fewer than one effective batch "
            f"of {recipe.effective_batch_size}"
        )
    total_steps = max_steps or max(1, math.ceil(steps_per_epoch * (epochs or 1.0)))
    try:
        model = build_model(recipe, device)
    except (OSError, ValueError) as error:  # no weights, unreadable or mismatched files
        raise UsageError(
            f"cannot load the weights of model {recipe.model!r}: {first_line(error)}"
        ) from None
    optimizer = build_optimizer(model, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps))
    start_step = 0
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if resume and checkpoint is None:
        raise UsageError(f"--resume: no checkpoint in {output_dir}")
    if checkpoint is not None:
        start_step = _load_checkpoint(model, optimizer, scheduler, checkpoint, device)
    (output_dir / RUN_MARKER).write_text(recipe.to_yaml(), encoding="utf-8")
    if on_start:
        on_start(start_step, total_steps)

    records = []
    losses: list[float] = []
    step = start_step
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        batches = _epoch_batches(len(splits.train), recipe.effective_batch_size, seed, epoch)
        chunk_indices = batches[offset : offset + (total_steps - step)]
        chunk = ([splits.train[i] for i in indices] for indices in chunk_indices)

        def after_step(index: int, record: Any, first: int = step) -> None:
            current = first + index + 1
            scheduler.step()
            losses.append(record.loss)
            if current % save_every_steps == 0 and current < total_steps:
                _save_checkpoint(model, optimizer, scheduler, current, output_dir, device)
            if on_step:
                on_step(current, record.loss)

        records += train_steps(
            model, optimizer, chunk, recipe, device, tokenizer.pad_token_id, after_step
        )
        step += len(chunk_indices)
    _save_checkpoint(model, optimizer, scheduler, step, output_dir, device)
    eval_loss = evaluate(model, splits.eval, recipe, device, tokenizer.pad_token_id)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    peak, _ = meter.peak_bytes()
    report = TrainReport(
        steps=step,
        resumed_from_step=start_step,
        tokens_per_second=tokens_per_second(records) if records else 0.0,
        peak_memory_bytes=peak,
        memory_source=meter.source,
        eval_loss=eval_loss,
        train_loss=statistics.fmean(losses[-10:]) if losses else float("nan"),
        output_dir=output_dir,
        budget_enforced=budget_enforced,
        losses=losses,
    )
    (output_dir / "train_metrics.json").write_text(
        json.dumps(
            {k: (str(v) if isinstance(v, Path) else v) for k, v in report.__dict__.items()},
            indent=2,
        ),
        encoding="utf-8",
    )
    return report
