"""What `autotune train` is asked (a checked plan, as every rank of a distributed run receives
it) and what it reports."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from autotune.errors import UsageError
from autotune.recipe import Recipe

RANKS_DIR = "ranks"
"""A distributed run's rank files, under --output: request, results, rendezvous, logs,
progress."""
RUN_MARKER = "autotune_recipe.yaml"
"""Written first into an output directory, with the recipe of the run that trains there: the
directory holds a run of `autotune train`."""


def run_recipe(output_dir: Path) -> Recipe | None:
    """The recipe of the run that trains into `output_dir`, as its RUN_MARKER holds it (written
    when training starts, rewritten only after a resume has loaded a checkpoint); None where no
    run has written one (runs from before the marker). An unreadable one is refused in one
    line, as a recipe file is."""
    marker = output_dir / RUN_MARKER
    return Recipe.load(marker) if marker.is_file() else None


@dataclass
class TrainReport:
    steps: int
    resumed_from_step: int
    tokens_per_second: float | None
    """The median over this run's steps after warm-up (a resumed run's own steps); None where
    it trained one step, its warm-up."""
    peak_memory_bytes: int
    memory_source: str
    eval_loss: float
    train_loss: float | None
    """The mean of this run's last ten steps' losses; None where it trained no step (a resume of
    a run that had stopped early or ended), as tokens_per_second."""
    output_dir: Path
    budget_enforced: bool
    losses: list[float] = field(default_factory=list)
    best_step: int | None = None
    """With evaluation during training: the step whose weights were saved (the best eval loss)."""
    stopped_early: bool = False
    evaluations: list[tuple[int, float]] = field(default_factory=list)
    """(step, eval loss) of each evaluation during training."""
    merged_dir: Path | None = None
    """Where the base with the adapter merged was saved (--merge)."""
    merge_note: str | None = None
    """What the merge did that a user should know (a QLoRA base merged dequantized)."""
    monitor_location: str | None = None
    """Where --report-to wrote the run's records."""
    timed_steps: int = 0
    """The steps tokens_per_second is the median of."""


@dataclass(frozen=True)
class TrainPlan:
    """A checked `autotune train` run, as every rank of a distributed one receives it."""

    recipe: Recipe
    data_path: Path
    output_dir: Path
    device: str
    token_cache: Path
    """The token cache directory of the run's data (train_data.py): every rank maps it."""
    gpus: tuple[str, ...] = ()
    """CUDA indices the ranks train on (the first num_gpus where empty)."""
    epochs: float | None = None
    max_steps: int | None = None
    resume: bool = False
    budget_bytes: int | None = None
    seed: int = 0
    save_every_steps: int = 100
    eval_rows: int | None = None
    eval_steps: int | None = None
    patience: int | None = None
    merge_dtype: str | None = None
    report_to: str = "none"
    logging_steps: int = 10
    predicted_peak_bytes: int | None = None


MAX_EPOCHS = 10_000
"""More passes than any fine-tune makes: a larger --epochs is a typo (1e308 overflowed)."""


def check_length(epochs: float | None, max_steps: int | None, save_every_steps: int) -> None:
    """How long a run trains (TrainPlan's epochs or max_steps) and how often it saves, refused
    in one line where they cannot be trained."""
    if epochs is not None and max_steps is not None:
        raise UsageError("give --epochs or --max-steps, not both")
    if epochs is not None and not 0 < epochs < math.inf:
        raise UsageError(f"--epochs must be a positive finite number, got {epochs:g}")
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {max_steps}")
    if epochs is not None and epochs > MAX_EPOCHS:
        raise UsageError(f"--epochs must be at most {MAX_EPOCHS:,}, got {epochs:g}")
    if save_every_steps < 1:
        raise UsageError(f"--save-steps must be at least 1, got {save_every_steps}")


@dataclass(frozen=True)
class TrainCallbacks:
    on_start: Callable[[int, int], None] | None = None
    on_step: Callable[[int, float], None] | None = None
    on_eval: Callable[[int, float, bool], None] | None = None


def report_json(report: TrainReport) -> str:
    return json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in report.__dict__.items()},
        indent=2,
    )
