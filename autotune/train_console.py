"""What `autotune train` shows on the terminal: its progress bar, and at the end what the run
measured beside the recipe's prediction and its probe's figures."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from autotune.console import ProgressDisplay
from autotune.training.io import measured_memory
from autotune.units import count_of, format_bytes

if TYPE_CHECKING:
    from autotune.api import TrainResult
    from autotune.training.train_plan import TrainReport


class TrainProgress(ProgressDisplay):
    """`autotune train`'s progress bar: optimizer steps done of all, and the latest loss. It
    shows once training starts (`started`), so input refused before then prints only its
    error, on stderr."""

    def __init__(self, console: Any) -> None:
        self.console = console

    def started(self, start_step: int, total_steps: int) -> None:
        if self._progress is None:
            self._show_progress(self.console, "training", total_steps, transient=False)
        self._progress.update(self._task, total=total_steps, completed=start_step)
        if start_step:
            self.console.print(f"resumed from step {start_step}")

    def stepped(self, step: int, loss: float) -> None:
        self._progress.update(self._task, completed=step, description=f"training, loss {loss:.4f}")

    def evaluated(self, step: int, eval_loss: float, is_best: bool) -> None:
        best = " (best so far)" if is_best else ""
        self.console.print(f"step {step}: eval loss {eval_loss:.4f}{best}")


def _probe_figure(measured: dict[str, Any], key: str) -> float | None:
    """A figure of the recipe's `measured:` (not checked on read): None unless a number > 0."""
    value = measured.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _speed(report: TrainReport, together: str) -> str:
    """The run's tokens/s and the steps it is the median of. A run of one step (a resume of
    the last) timed only its warm-up, whose cold kernels and allocator would understate it."""
    if report.tokens_per_second is None:
        trained = report.steps - report.resumed_from_step
        why = "it had no step left to train" if not trained else "its one step was the warm-up"
        return f"tokens/s not measured: {why}"
    timed = f" (median of {count_of(report.timed_steps, 'step')} after warm-up)"
    return f"tokens/s{together} {report.tokens_per_second:,.0f}" + (
        timed if report.timed_steps else ""
    )


def show_trained(console: Any, result: TrainResult) -> None:
    """What a training run measured, beside what the recipe's prediction and probe said."""
    from autotune.training.io import CPU_MEMORY_SOURCE

    report, measured = result.report, result.probe_measured
    memory = format_bytes(report.peak_memory_bytes)
    on_cpu = report.memory_source == CPU_MEMORY_SOURCE
    if on_cpu:
        memory = f"{memory} (CPU RSS growth, not GPU memory)"
    predicted = "?"
    if result.predicted is not None:
        peak_bytes = result.predicted.estimate.peak_bytes
        # a prediction is of GPU memory: beside a CPU run's resident growth, it says so
        gpu = "GPU " if on_cpu else ""
        predicted = f"{gpu}{format_bytes(peak_bytes)} ({result.predicted.memory_model})"
    probe_peak_bytes = _probe_figure(measured, "peak_memory_bytes")
    probe_source = str(measured.get("memory_source"))
    probe_speed = _probe_figure(measured, "tokens_per_second")
    trained = count_of(report.steps - report.resumed_from_step, "step")
    if report.resumed_from_step:  # this run's steps, not the whole training's
        trained += f" after step {report.resumed_from_step}, to step {report.steps}"
    console.print(f"trained {trained}; eval loss {report.eval_loss:.4f}")
    if report.best_step is not None:
        stopped = "stopped early; " if report.stopped_early else ""
        console.print(f"{stopped}saved the weights of step {report.best_step}, the best eval loss")
    per_gpu, together = "", ""
    if result.ranks > 1:  # the largest rank's peak and the ranks' summed speed
        per_gpu = (
            f" per rank (the largest of {result.ranks})"
            if report.memory_source == CPU_MEMORY_SOURCE
            else f" per GPU (the largest of {result.ranks} ranks)"
        )
        together = f" ({result.ranks} ranks together)"
    console.print(
        f"peak memory{per_gpu} {memory}; predicted {predicted}"
        + (
            # as the probe measured it: a CPU probe's resident growth, or a GPU's peak
            f"; probe measured {measured_memory(probe_peak_bytes, probe_source)}"
            if probe_peak_bytes is not None
            else ""
        )
    )
    console.print(
        _speed(report, together)
        + (f"; probe measured {probe_speed:,.0f}" if probe_speed is not None else "")
    )
    console.print(f"saved to {report.output_dir}")
    if report.monitor_location is not None:
        console.print(f"run records: {report.monitor_location}")
    if report.merged_dir is not None:
        console.print(f"merged model (loads without peft) in {report.merged_dir}")
        if report.merge_note:
            console.print(f"note: {report.merge_note}")
