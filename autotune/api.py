"""autotune from Python: each `autotune` command is one call here that returns what it made, and
the command line is a thin layer over these (parse, call, print). They print nothing themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.errors import UsageError
from autotune.outputs import check_export_output, recipe_path_for, report_outputs, report_path_for
from autotune.study.settings import RunSettings

if TYPE_CHECKING:
    import optuna

    from autotune.data.summary import DataSummary
    from autotune.margins import MemoryMargin
    from autotune.memory import MemoryEstimate
    from autotune.pareto import Point
    from autotune.probe import ProbeRunner
    from autotune.recipe import Recipe
    from autotune.study.objective import RunEvents
    from autotune.study.overview import StudyOverview, StudyStatus
    from autotune.study.ranking import QualityRanking
    from autotune.training.train import TrainReport


@dataclass(frozen=True)
class RunResult:
    """What a run made: the study, its measured frontier, the report and the exported recipe."""

    study: optuna.Study
    frontier: list[Point]
    """The measured recipes within the budget that no other beats on all three objectives,
    fastest first; each point's `number` is its trial's in `study`."""
    report_path: Path
    recipe: Recipe | None
    """The balanced pick of the frontier; None where nothing was measured within the budget."""
    recipe_path: Path | None
    notes: list[str]
    """What the run has to say besides its trials (a resumed study, interrupted trials)."""
    ranking: QualityRanking
    """The study's quality ranking of its measured recipes (longer probes first where
    --promote ran), which chose the recipe and orders the report."""
    recipe_fit: str = ""
    """How the picked recipe's predicted peak, with its margin, stands against the budget."""
    recipe_trial: int | None = None
    """The trial the balanced recipe is (a row of the frontier); None where none was picked."""


def run(
    settings: RunSettings | None = None,
    *,
    events: RunEvents | None = None,
    runner: ProbeRunner | None = None,
    **fields: Any,
) -> RunResult:
    """Search fine-tuning recipes for a model on data within a memory budget, then write the
    HTML report and the balanced recipe (to reports/<study>... unless the settings say where).

    Give a RunSettings, or its fields as keywords (with settings, they replace its fields).
    `events` hears of each trial (autotune.console.ConsoleReporter prints them); `runner`
    probes a recipe (default: each in a process of its own). Bad input raises UsageError.
    """
    from autotune.export import measured_figures, picked_trial, write_recipe
    from autotune.pareto import frontier
    from autotune.probe import SubprocessProbeRunner
    from autotune.report import write_report
    from autotune.study import RunEvents, measured_points, prepare_run, quality_ranking, run_study
    from autotune.study.storage_urls import redact_url

    if settings is None:
        settings = RunSettings(**fields)
    elif fields:
        settings = dataclasses.replace(settings, **fields)
    events = events if events is not None else RunEvents()
    # every input checked first, in the order a user meets it; the weights where its probes
    # load them (estimate needs config.json alone)
    prepared = prepare_run(settings, check_weights=runner is None)
    if runner is None:
        runner = SubprocessProbeRunner(
            settings.probe_timeout_seconds, timed_steps=settings.probe_steps
        )
    study = run_study(prepared, runner, events)
    points = measured_points(study)
    ranking = quality_ranking(study, points)  # built once: the recipe and the report share it
    recipe = recipe_path = recipe_trial = None
    fit = ""
    if points:
        recipe, recipe_path = write_recipe(
            study,
            "balanced",
            settings.recipe_path or recipe_path_for(prepared.study_name),
            ranking=ranking,
        )
        picked = picked_trial(study, "balanced", points, ranking)
        fit = measured_figures(picked, budget_bytes=settings.budget_bytes).get("predicted_fit", "")
        recipe_trial = picked.number
    report_path = write_report(
        study,
        settings.report_path or report_path_for(prepared.study_name),
        recipe_path=recipe_path,
        storage_url=redact_url(settings.storage) if settings.storage else None,
        ranking=ranking,
    )
    return RunResult(
        study=study,
        frontier=frontier(points),
        report_path=report_path,
        recipe=recipe,
        recipe_path=recipe_path,
        notes=list(events.notes),
        ranking=ranking,
        recipe_fit=fit,
        recipe_trial=recipe_trial,
    )


@dataclass(frozen=True)
class MemoryPrediction:
    estimate: MemoryEstimate
    memory_model: str
    """The memory model that answered: replay or formula."""
    fallback_reason: str
    """Why the formula answered where the replay was asked for ("" where it was not)."""
    margin: MemoryMargin
    """What a study adds to the peak before it holds it to a budget."""
    num_gpus: int = 1
    """The GPUs the recipe trains on: the peak is each one's where several."""
    row_tokens: int | None = None
    """The tokens every row was taken to hold where no data gave their lengths (seq_len, no
    padding); None where a study's data did."""

    @property
    def peak_name(self) -> str:
        return "predicted peak" + (f" per GPU (x{self.num_gpus})" if self.num_gpus > 1 else "")

    @property
    def peak_with_margin_bytes(self) -> int:
        return self.margin.estimate_bytes(self.estimate)


def memory_prediction(
    spec: Any,
    recipe: Recipe,
    config: Any,
    seq_len: int | None = None,
    memory_model: str = "replay",
    memory_margin: float | None = None,
    token_lengths: tuple[int, int] | None = None,
) -> MemoryPrediction:
    """The peak a study would predict for `recipe`, with the margin it would add;
    `token_lengths`: the shortest and longest training example, truncated at seq_len, as a
    study on the data knows them (PreparedRun.train_token_lengths; None: full rows)."""
    from autotune.margins import margin_for
    from autotune.prediction import predict

    peak, used, fallback = predict(
        spec, recipe, config, seq_len, memory_model, token_lengths=token_lengths
    )
    return MemoryPrediction(
        peak,
        used,
        fallback,
        margin_for(memory_margin, used, recipe.quantization),
        recipe.num_gpus,
        row_tokens=(seq_len or recipe.seq_len) if token_lengths is None else None,
    )


def _check_seq_len(seq_len: int) -> None:
    from autotune.recipe import UPPER_BOUNDS

    if not 1 <= seq_len <= UPPER_BOUNDS["seq_len"]:
        raise UsageError(f"--seq-len must be from 1 to {UPPER_BOUNDS['seq_len']}, got {seq_len}")


def estimate(
    model: str,
    recipe_path: str | Path,
    *,
    seq_len: int | None = None,
    memory_model: str = "replay",
    trust_remote_code: bool = False,
    memory_margin: float | None = None,
) -> MemoryPrediction:
    """A recipe's peak GPU memory for `model`, from its config alone (no weights are loaded),
    and the margin a study adds to it (`memory_margin`, else the measured one)."""
    from autotune.architecture import check_recipe
    from autotune.margins import check_margin
    from autotune.model_spec import load_model_spec
    from autotune.prediction import check_memory_model
    from autotune.recipe import Recipe
    from autotune.remote_code import allow_remote_code
    from autotune.replay import load_config

    allow_remote_code(trust_remote_code)
    check_memory_model(memory_model)
    check_margin(memory_margin)
    spec = load_model_spec(model)
    recipe = Recipe.load(recipe_path).replace(model=model)
    if seq_len is not None:
        _check_seq_len(seq_len)
    spec.check_recipe(recipe, str(recipe_path))
    config = None
    if memory_model == "replay":
        config = load_config(model)
        check_recipe(recipe, config, str(recipe_path))
    elif recipe.method == "lora":
        # the formula prices the Llama family's linear layers by name
        spec.target_linears(recipe.lora_target_modules or "all-linear")
    return memory_prediction(
        spec, recipe, config, seq_len, memory_model=memory_model, memory_margin=memory_margin
    )


@dataclass(frozen=True)
class TrainResult:
    report: TrainReport
    predicted: MemoryPrediction | None
    """The recipe's peak as a study on the same data predicts it (`estimate`, which has no data,
    takes every row seq_len long); None where it names no model."""
    probe_measured: dict[str, Any]
    """What the study's probe measured for the recipe (its file's `measured:`; may be empty)."""
    ranks: int = 1
    """The processes it trained as (the recipe's num_gpus): peaks are per GPU, tokens/s all's."""


def train(
    recipe_path: str | Path,
    data_path: str | Path,
    output_dir: str | Path,
    *,
    device: str = "auto",
    trust_remote_code: bool = False,
    **options: Any,
) -> TrainResult:
    """Fine-tune with the recipe in `recipe_path`; the adapter or model goes to `output_dir`.
    `options` are autotune.training.train.train's (epochs, max_steps, resume, budget_bytes...)."""
    from autotune.architecture import check_recipe
    from autotune.model_source import check_local_weights
    from autotune.model_spec import load_model_spec
    from autotune.recipe import Recipe
    from autotune.remote_code import allow_remote_code
    from autotune.replay import load_config
    from autotune.study import resolve_device
    from autotune.training.train import train as train_model

    allow_remote_code(trust_remote_code)
    recipe, measured = Recipe.load_measured(recipe_path)
    spec = load_model_spec(recipe.model) if recipe.model else None
    if spec is not None:
        spec.check_recipe(recipe, str(recipe_path))
    config = load_config(recipe.model) if recipe.model else None
    device_name = resolve_device(device)
    if config is not None:
        check_recipe(recipe, config, str(recipe_path), device_name)
    if recipe.model:  # after what the recipe asks of the model: that needs config.json alone
        check_local_weights(recipe.model)
    predicted: list[MemoryPrediction] = []

    def predict_peak(train_lengths: tuple[int, int] | None) -> int | None:
        """As a study on this data predicts it, once the run is checked and its data tokenized:
        the replay, the formula where it cannot run, of the rows the data gives the
        micro-batches (`train_lengths`: the shortest and longest training example's tokens)."""
        if spec is None:
            return None
        predicted.append(memory_prediction(spec, recipe, config, token_lengths=train_lengths))
        return predicted[-1].estimate.peak_bytes

    report = train_model(
        recipe,
        Path(data_path),
        Path(output_dir),
        device=device_name,
        predict_peak=predict_peak,
        **options,
    )
    return TrainResult(report, predicted[0] if predicted else None, measured, recipe.num_gpus)


def inspect_data(
    data_path: str | Path,
    model: str | None = None,
    seq_len: int = 1024,
    *,
    trust_remote_code: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> DataSummary:
    """Rows, formats and bad rows of a data file and, given a model, its token lengths
    (`progress(done, total)` as rows are tokenized). A file without a row to train on (empty, or
    every row bad) is refused, as a run refuses it."""
    from autotune.data.rows import check_usable
    from autotune.data.summary import summarize
    from autotune.model_source import check_model_reference
    from autotune.remote_code import allow_remote_code
    from autotune.study import tokenizer_for

    allow_remote_code(trust_remote_code)
    _check_seq_len(seq_len)
    if model:  # a path that is not there is said as such, not as a hub id transformers refuses
        check_model_reference(model)
    tokenizer = tokenizer_for(model) if model else None
    summary = summarize(data_path, tokenizer, seq_len, progress=progress)
    check_usable(data_path, summary.rows, summary.bad_rows)
    return summary


def export_recipe(
    storage: str | None,
    study_name: str | None,
    pick: str = "balanced",
    fmt: str = "autotune",
    output: str | Path | None = None,
) -> str:
    """The picked frontier recipe of a stored study as YAML in `fmt`, written to `output` if
    given (see autotune.pareto.PICK_HELP and autotune.formats.EXPORT_FORMATS)."""
    from autotune.export import recipe_yaml, write_text
    from autotune.study import load_existing_study

    check_export_output(output, storage)
    _, text = recipe_yaml(load_existing_study(storage, study_name), pick, fmt)
    if output is not None:
        write_text(output, text)
    return text


def exported_train_command(storage: str | None, study_name: str | None, recipe_path: Path) -> str:
    """The `autotune train` command of a recipe `export_recipe` wrote to `recipe_path`, on the
    study's data, as `autotune run` and the report give it."""
    from autotune.report.card import study_train_command
    from autotune.study import load_existing_study

    return study_train_command(load_existing_study(storage, study_name), str(recipe_path))


@dataclass(frozen=True)
class StudyReport:
    report_path: Path
    csv_path: Path | None
    png_path: Path | None


def write_study_report(
    storage: str | None,
    study_name: str | None,
    output: str | Path | None = None,
    csv: str | Path | None = None,
    png: str | Path | None = None,
) -> StudyReport:
    """The HTML report of a stored study (default reports/<study>.html) and, if asked, its
    trials as CSV and its Pareto chart as PNG."""
    from autotune.report import write_main_chart_png, write_report
    from autotune.study import load_existing_study

    found = load_existing_study(storage, study_name)
    if not found.trials:
        raise UsageError(
            f"study {found.study_name!r} holds no trials yet; run `autotune run` first"
        )
    from autotune.study.storage_urls import redact_url

    recipe_path = recipe_path_for(found.study_name)
    output = report_outputs(found.study_name, output, csv, png, storage)
    path = write_report(
        found,
        output,
        csv,
        recipe_path=recipe_path,
        exported=recipe_path.is_file(),
        storage_url=redact_url(storage) if storage else None,
    )
    png_path = None
    if png is not None:
        try:
            png_path = write_main_chart_png(found, png)
        except UsageError as error:  # the PNG is drawn last: say what was written before it
            written = ", ".join(str(p) for p in (path, csv) if p is not None)
            raise UsageError(f"{error}; the report was written: {written}") from None
    return StudyReport(path, Path(csv) if csv is not None else None, png_path)


def list_studies(storage: str | None = None) -> list[StudyOverview]:
    """Every study in a storage: its model, budget, trials finished and running, and the recipe
    each pick chooses now."""
    from autotune.study.overview import study_overviews

    return study_overviews(storage)


def study_status(storage: str | None = None, study_name: str | None = None) -> StudyStatus:
    """A study's progress, while it runs or after: trials, probes an hour, its frontier so far."""
    from autotune.study.overview import study_status as status_of

    return status_of(storage, study_name)
