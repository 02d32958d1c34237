"""Write the recipe a study found as the YAML of the recipe schema, measured figures included."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from autotune.errors import UsageError
from autotune.files import write_atomically
from autotune.margins import fit_words, stored_margin
from autotune.pareto import PICK_POLICIES, Point
from autotune.recipe import Recipe
from autotune.study.ranking import QualityRanking, pick_note, pick_number, quality_ranking
from autotune.study.records import measured_points, recipe_of, trial_record
from autotune.study.study_records import (
    Confirmation,
    confirmations,
    stored_data_formats,
    study_setup,
)
from autotune.training.freeze import FreezeLayout


def _speed(tokens_per_second: float | None) -> float | None:
    """Tokens/s as an export writes it, the probe's and its confirmation's alike."""
    return None if tokens_per_second is None else round(float(tokens_per_second), 2)


def _loss(eval_loss: float | None) -> float | None:
    return None if eval_loss is None else round(float(eval_loss), 5)


def measured_figures(
    trial: Any, confirmation: Confirmation | None = None, budget_bytes: int = 0
) -> dict[str, Any]:
    """What the probe measured for a trial, as written under `measured:`; with the study's
    budget, how the predicted peak with its margin stands against it; with its confirmation,
    what that found and, where it was confirmed in place of a trial that left the frontier,
    that trial's number (`in_place_of`) and the pick that chose this recipe next."""
    memory, speed, loss = trial.values
    record = trial_record(trial)
    probe = record.probe
    figures = {
        "peak_memory_bytes": int(memory),
        "tokens_per_second": _speed(speed),
        "eval_loss": _loss(loss),
        "memory_source": probe.memory_source if probe else "",
        "device": probe.device if probe else "",
        "predicted_peak_bytes": record.predicted_peak_bytes,
        "memory_model": record.memory_model,
        "memory_margin": record.memory_margin,
        "probe_steps_done": probe.steps_done if probe else None,
        "trial": trial.number,
    }
    if budget_bytes and record.predicted_peak_bytes:
        margin = stored_margin(
            record.memory_margin, record.memory_model, recipe_of(trial).quantization
        )
        figures["predicted_fit"] = fit_words(
            record.predicted_peak_bytes, margin, budget_bytes, recipe_of(trial).num_gpus
        )
    if confirmation:
        figures["confirmation"] = {
            "held_up": confirmation.held_up,
            "verdict": confirmation.words(),
            "steps": confirmation.steps,
            "seed": confirmation.seed,
            "tokens_per_second": _speed(confirmation.tokens_per_second),
            "peak_memory_bytes": confirmation.peak_memory_bytes,
            "eval_loss": _loss(confirmation.eval_loss),
        }
        if confirmation.in_place_of is not None:  # beyond --confirm: its pick's recipe left
            figures["confirmation"]["in_place_of"] = confirmation.in_place_of
            figures["confirmation"]["pick"] = confirmation.pick
    return figures


def picked_trial(study: Any, policy: str, points: Sequence[Point], ranking: QualityRanking) -> Any:
    """The trial the pick `policy` chooses from the study's measured `points` by their quality
    `ranking`."""
    if policy not in PICK_POLICIES:
        raise UsageError(f"--pick {policy!r} is not one of {', '.join(PICK_POLICIES)}")
    if not points:
        raise UsageError(
            f"study {study.study_name!r} has no measured recipe within its budget yet; "
            "run more trials or raise --budget"
        )
    return study.trials[pick_number(policy, points, ranking)]


def recipe_yaml(
    study: Any, policy: str, fmt: str = "autotune", ranking: QualityRanking | None = None
) -> tuple[Recipe, str]:
    """The picked recipe in `fmt` (autotune, hf, axolotl or llamafactory); `ranking` is the
    study's quality ranking where the caller built it (else it is built here)."""
    from autotune.data.rows import scan
    from autotune.formats import EXPORT_FORMATS, render

    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    points = measured_points(study)
    if ranking is None:
        ranking = quality_ranking(study, points)
    trial = picked_trial(study, policy, points, ranking)
    recipe = recipe_of(trial)
    setup = study_setup(study)
    measured = measured_figures(trial, confirmations(study).get(trial.number), setup.budget_bytes)
    longer = ranking.longest(trial.number)
    if longer is not None:  # --promote probed it again for longer
        measured["longer_probe"] = {"steps": longer[0], "eval_loss": _loss(longer[1])}
    note = pick_note(policy, points, ranking)
    if note is not None:  # the measured noise decided the pick
        measured["pick"] = f"{policy}: {note}"
    data_path = setup.data_path or None
    data_format, formats = "alpaca", None
    if fmt == "axolotl":
        found = stored_data_formats(study)
        if found is None and data_path and Path(data_path).exists():  # a study from before
            data_scan = scan(data_path)
            found = data_scan.first_format, data_scan.formats
        if found is not None:
            data_format, formats = found[0] or data_format, found[1]
    return recipe, render(
        fmt,
        recipe,
        measured,
        data_path=data_path,
        data_format=data_format,
        num_layers=setup.num_layers,
        data_formats=formats,
        tied_head=setup.tie_word_embeddings,
        freeze_layout=FreezeLayout.from_dict(setup.freeze_layout) if setup.freeze_layout else None,
    )


def write_text(path: str | Path, text: str) -> Path:
    """Write a file whole or not at all (autotune.files: a full disk or Ctrl-C midway leaves
    the file as it was, an earlier report or recipe included), turning an unwritable
    destination into a one-line error."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, text)
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def write_recipe(
    study: Any,
    policy: str,
    path: str | Path,
    fmt: str = "autotune",
    ranking: QualityRanking | None = None,
) -> tuple[Recipe, Path]:
    recipe, text = recipe_yaml(study, policy, fmt, ranking)
    return recipe, write_text(path, text)
