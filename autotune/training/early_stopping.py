"""Evaluation during `autotune train`: every N optimizer steps the held-out split is scored,
the best weights so far are kept, and the run stops after K evaluations without improvement.

The best weights (the trainable ones: an adapter is small, a full model is not, and both are
what a checkpoint holds anyway) live in their own directory beside the rolling checkpoints, so
deleting old checkpoints never deletes them, and `--resume` finds them again.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.errors import UsageError
from autotune.training.checkpoints import (
    load_trainable,
    read_state,
    trainable_weights,
    writes_files,
)

BEST_CHECKPOINT = "best-checkpoint"
DEFAULT_PATIENCE = 3
"""Evaluations without improvement before stopping, when evaluation is on."""


def check_evaluation(eval_steps: int | None, patience: int | None) -> int | None:
    """The patience the run uses (None: no evaluation during training); a bad pair is refused."""
    if eval_steps is None:
        if patience is not None:
            raise UsageError("--early-stopping-patience needs --eval-steps N")
        return None
    if eval_steps < 1:
        raise UsageError(f"--eval-steps must be at least 1, got {eval_steps}")
    if patience is not None and patience < 0:
        raise UsageError(
            f"--early-stopping-patience must be 0 (never stop) or more, got {patience}"
        )
    return DEFAULT_PATIENCE if patience is None else patience


@dataclass
class EarlyStopping:
    """The evaluations so far: the best eval loss, its step, and how many since were worse."""

    patience: int
    """Evaluations without improvement that stop the run; 0: never stop, only keep the best."""
    best_loss: float = math.inf
    best_step: int | None = None
    evaluations_since_best: int = 0
    last_step: int | None = None
    """The step of the latest evaluation."""
    history: list[tuple[int, float]] = field(default_factory=list)
    """(step, eval loss) of every evaluation, oldest first."""

    def observe(self, step: int, eval_loss: float) -> bool:
        """Record an evaluation; True when it is the best so far."""
        self.last_step = step
        self.history.append((step, eval_loss))
        if eval_loss < self.best_loss:
            self.best_loss, self.best_step, self.evaluations_since_best = eval_loss, step, 0
            return True
        self.evaluations_since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.evaluations_since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """Plain values, stored in each checkpoint so that a resumed run keeps counting."""
        return {
            "best_loss": self.best_loss,
            "best_step": self.best_step,
            "evaluations_since_best": self.evaluations_since_best,
            "last_step": self.last_step,
            "history": [list(entry) for entry in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss = float(state["best_loss"])
        self.best_step = state["best_step"]
        self.evaluations_since_best = int(state["evaluations_since_best"])
        self.last_step = state["last_step"]
        self.history = [(int(step), float(loss)) for step, loss in state["history"]]


def save_best(model: Any, output_dir: Path, step: int, eval_loss: float) -> None:
    """Keep the model's trainable weights as the best so far (written whole, then renamed; by
    rank 0 in a distributed run, where every rank calls it)."""
    import torch

    trainable = trainable_weights(model)
    if not writes_files():
        return
    path = output_dir / BEST_CHECKPOINT
    path.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "eval_loss": eval_loss, "trainable": trainable}
    torch.save(state, path / "best.tmp")
    (path / "best.tmp").replace(path / "state.pt")


def restore_best(model: Any, output_dir: Path) -> int:
    """Load the kept best weights into the model; returns the step they came from."""
    state = read_state(output_dir / BEST_CHECKPOINT / "state.pt")
    load_trainable(model, state["trainable"])
    return int(state["step"])


def forget_best(output_dir: Path) -> None:
    """A new run in the same directory: an earlier run's best must not be restored."""
    shutil.rmtree(output_dir / BEST_CHECKPOINT, ignore_errors=True)
