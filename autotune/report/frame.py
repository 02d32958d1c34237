"""The study as a table (pandas): one row per trial, what the report's text and charts read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autotune.margins import MemoryMargin
from autotune.pareto import Point, frontier
from autotune.study.ranking import QualityRanking
from autotune.study.records import (
    OBJECTIVE_NAMES,
    TrialStatus,
    constraint_now,
    trial_reason,
    trial_record,
    trial_status,
)
from autotune.study.study_records import confirmations, left_frontier, study_budgets

MEASURED = TrialStatus.MEASURED.value
DUPLICATE = TrialStatus.DUPLICATE.value


def promoted_column(steps: int) -> str:
    """The frame's column of the eval loss that a promotion round's `steps`-step probe measured."""
    return f"eval_loss_at_{steps}_steps"


def trial_seconds(trial: Any) -> float | None:
    """From the trial's start to its end (None until it ends): a study resumed later is timed
    without the pause between runs."""
    if trial.datetime_complete and trial.datetime_start:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def trials_frame(study: Any, points: Sequence[Point], ranking: QualityRanking) -> Any:
    """One row per trial: recipe fields, predicted and measured figures, status and reason;
    `points` are the study's measured points (records.measured_points) and `ranking` their
    quality ranking (ranking.quality_ranking), which give the frontier and longer-probe columns."""
    import pandas as pd

    front = {p.number for p in frontier(points)}
    confirmed = confirmations(study)
    removed = left_frontier(study)
    budgets = study_budgets(study)
    rows = []
    for trial in study.get_trials(deepcopy=False):
        record = trial_record(trial)
        probe = record.probe
        values = trial.values or [None, None, None]
        known = trial_status(trial)
        status = known.value if known else trial.state.name.lower()
        row: dict[str, Any] = {
            "trial": trial.number,
            "state": trial.state.name,
            "status": status,
            "recipe": record.label,
            "feasible": bool(trial.constraints) and constraint_now(trial, budgets) <= 0,
            "on_frontier": trial.number in front,
            "predicted_peak_bytes": record.predicted_peak_bytes,
            "memory_margin": record.memory_margin,
            "predicted_with_margin_bytes": (
                MemoryMargin(record.memory_margin, "").bytes_of(record.predicted_peak_bytes)
                if record.predicted_peak_bytes
                else None
            ),
            "memory_model": record.memory_model,
            "trial_seconds": trial_seconds(trial),
        }
        measured = status == MEASURED
        for name, value in zip(OBJECTIVE_NAMES, values):
            row[name] = value if measured else None
        ladder = ranking.ladders.get(trial.number, [])
        for steps, quality in zip(ranking.steps[1:], ladder[1:]):
            row[promoted_column(steps)] = quality
        confirmation = confirmed.get(trial.number)
        row["held_up"] = None if confirmation is None else bool(confirmation.held_up)
        row["confirmation"] = None if confirmation is None else confirmation.words()
        row["confirm_tokens_per_second"] = confirmation and confirmation.tokens_per_second
        row["baseline"] = record.baseline
        row["memory_source"] = probe.memory_source if probe else ""
        row["peak_allocated_bytes"] = probe.peak_allocated_bytes if probe else None
        # host columns only where a recipe offloads (a frame without them shows none)
        if record.predicted_host_bytes:
            row["predicted_host_bytes"] = record.predicted_host_bytes
        if probe and probe.host_peak_bytes is not None:
            row["host_peak_bytes"] = probe.host_peak_bytes
        row["reason"] = "; ".join(
            part
            for part in (
                trial_reason(trial),
                removed.get(trial.number) and f"left the frontier: {removed[trial.number]}",
            )
            if part
        )
        # a duplicate ran no probe: the times it carries are its original's
        for phase, seconds in (probe.seconds if probe and status != DUPLICATE else {}).items():
            row[f"seconds_{phase}"] = seconds
        for key, value in record.recipe.items():
            if key not in ("model", "autotune_recipe"):
                row[f"param_{key}"] = ",".join(value) if isinstance(value, list) else value
        rows.append(row)
    return pd.DataFrame(rows)


def probed_rows(frame: Any) -> Any:
    """Trials that ran a probe of their own (a duplicate's row carries no times)."""
    if "seconds_total" not in frame.columns:
        return frame.iloc[0:0]
    return frame[frame["seconds_total"].notna() & (frame["status"] != DUPLICATE)]
