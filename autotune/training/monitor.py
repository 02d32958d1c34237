"""`autotune train --report-to`: the run's numbers, as it goes, in TensorBoard or Weights & Biases.

Every logging step: train loss, learning rate, tokens per second, and the peak memory beside
the recipe's predicted peak (so a run that creeps toward the budget shows it); every evaluation:
eval loss. The libraries are optional (`pip install 'autotune[monitor]'` for TensorBoard); asking
for one that is not installed fails before anything loads.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from typing import Any, Protocol

from autotune.errors import UsageError
from autotune.recipe import Recipe

REPORT_TO = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}
"""--report-to: the name, and the package it needs."""
TENSORBOARD_DIR = "runs"
WANDB_HOST = ("api.wandb.ai", 443)


class Monitor(Protocol):
    location: str
    """Where the run's records are (a directory, or a W&B run's address and directory)."""

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def check_report_to(name: str) -> None:
    """Refuse an unknown name, or a library that is not installed, in one line."""
    if name not in REPORT_TO:
        raise UsageError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {name!r}")
    package = REPORT_TO[name]
    if package is not None and importlib.util.find_spec(package) is None:
        install = (
            "pip install 'autotune[monitor]'" if name == "tensorboard" else f"pip install {package}"
        )
        raise UsageError(f"--report-to {name} needs the {package} package ({install})")


def open_monitor(name: str, output_dir: Path, recipe: Recipe) -> Monitor | None:
    if name == "tensorboard":
        return _TensorBoard(output_dir / TENSORBOARD_DIR)
    if name == "wandb":
        return _WandB(output_dir, recipe)
    return None


class _TensorBoard:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.location = str(log_dir)
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()  # a run watched live, or killed, shows its latest step

    def close(self) -> None:
        self._writer.close()


def wandb_mode() -> str:
    """WANDB_MODE when set; else online when W&B's server answers, offline when it does not
    (the run is kept on disk for `wandb sync`)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    try:
        socket.create_connection(WANDB_HOST, timeout=3).close()
    except OSError:
        return "offline"
    return "online"


class _WandB:
    def __init__(self, output_dir: Path, recipe: Recipe) -> None:
        import wandb

        mode = wandb_mode()
        self._run: Any = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "autotune"),
            dir=str(output_dir),
            config=recipe.to_dict(),
            mode=mode,
        )
        url = getattr(self._run, "url", None)
        where = f"{url} and " if url and mode == "online" else ""
        self.location = f"{where}{self._run.dir} ({mode})"

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()
