"""The output directory of `autotune train`: what makes it one, and the checks before a run
writes into it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autotune.errors import UsageError
from autotune.training.checkpoints import checkpoints, latest_checkpoint
from autotune.training.train_data import TOKEN_CACHE_DIR
from autotune.training.train_plan import RANKS_DIR, RUN_MARKER, run_recipe

__all__ = ["RUN_MARKER", "check_output_dir", "holds_a_run"]


def holds_a_run(path: Path) -> bool:
    """The directory holds a run of `autotune train`: its recipe, a checkpoint, or the rank
    files of a distributed run (written before rank 0 writes anything)."""
    return (
        (path / RUN_MARKER).is_file()
        or bool(checkpoints(path))
        or (path / RANKS_DIR / "request.json").is_file()
    )


def check_output_dir(path: Path, model: str, resume: bool = False, overwrite: bool = False) -> None:
    """Fail early, with one line, when the output directory is the model's own, holds files
    that are not an autotune run's (unless `overwrite`), holds a run that is neither resumed
    nor overwritten, holds no checkpoint to resume, or cannot be written."""
    model_dir = Path(model).expanduser()
    if model_dir.is_dir():
        target, source = path.expanduser().resolve(), model_dir.resolve()
        if target == source or source in target.parents:
            raise UsageError(
                f"--output {path} is inside the model's directory {model_dir}; training never "
                "writes there, choose another directory"
            )
    if path.exists() and not path.is_dir():  # the data or the recipe, given in its place
        raise UsageError(f"--output {path} is a file; give a directory for the run's files")
    # the token cache a run made there is its own, even where the run stopped before its files
    existing = (
        sorted(p.name for p in path.iterdir() if p.name != TOKEN_CACHE_DIR) if path.is_dir() else []
    )
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
    if resume and latest_checkpoint(path) is None:  # before anything is created or loaded
        raise UsageError(f"--resume: no checkpoint in {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".autotune-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"output directory {path} is not writable: {error.strerror}") from None


TRAINED_STATE_FIELDS = (
    "method",
    "quantization",
    "lora_r",
    "lora_target_modules",
    "use_dora",
    "frozen_layers",
    "train_modules",
    "optimizer",
)
"""Recipe fields that decide which weights train and the optimizer's states of them: a
checkpoint of one recipe cannot be resumed under a recipe that differs in any."""
CONTINUED_FIELDS = (
    "precision",
    "lora_alpha",
    "lora_dropout",
    "learning_rate",
    "lr_schedule",
    "warmup_steps",
    "seq_len",
    "batching",
)
"""Recipe fields a checkpoint loads under but does not continue: its step counts batches of
its sequences (another seq_len or batching trains other rows after it), its optimizer keeps
its learning rate (a new one was silently not trained with), and its weights were trained
in their precision and scale. What changes memory and speed alone (micro-batch split,
checkpointing, attention, loss, offloading) may change."""


def _model_place(model: str) -> str:
    """A model as a path resolved where it is a directory (a recipe names it as given)."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def check_same_training(path: Path, recipe: Any) -> None:
    """Refuse to resume the run in output directory `path` with a recipe that trains other
    weights or another model than the recipe that wrote it (its RUN_MARKER), where loading its
    checkpoint would fail on a missing weight or a mismatched optimizer group, or that would
    train on from it otherwise than its run (CONTINUED_FIELDS). A run from before the marker
    was written is not checked."""
    written = run_recipe(path)
    if written is None:
        return
    marker = path / RUN_MARKER
    changed = [
        f"{name} {getattr(written, name)!r}, now {getattr(recipe, name)!r}"
        for name in TRAINED_STATE_FIELDS + CONTINUED_FIELDS
        if getattr(written, name) != getattr(recipe, name)
    ]
    if _model_place(written.model) != _model_place(recipe.model):
        changed.insert(0, f"model {written.model!r}, now {recipe.model!r}")
    if changed:
        raise UsageError(
            f"--resume: {path} holds a training of another recipe ({'; '.join(changed)}); "
            "resume with the recipe that wrote it (its copy is "
            f"{marker}), or train this one into another --output"
        )
