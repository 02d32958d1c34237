"""The `autotune` command: parse, call the library, print. Bad input exits 2 with one line.

Heavy libraries load inside the commands so `autotune --help` stays instant.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from autotune.errors import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find the fastest way to fine-tune a causal LM within the GPU memory you have.",
)
_state = {"debug": False}

STUDY_HELP = "Study name (default: derived from model, data and budget; or the storage's newest)."
STORAGE_HELP = "Optuna storage URL (default: sqlite:///trials/autotune.db)."
BUDGET_HELP = (
    "GPU memory budget, e.g. 24GB, 24GiB or 20000MB. GB/MB are decimal (10^9/10^6 bytes), "
    "GiB/MiB binary (2^30/2^20 bytes)."
)


@app.callback()
def _main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    _state["debug"] = debug


def _tokenize_progress(data: Path) -> Callable[[int, int], None]:
    """Progress lines while a large dataset is tokenized into the cache (small ones are quick)."""
    from autotune.data import TOKENIZE_PROGRESS_ROWS

    def show(done: int, total: int) -> None:
        if total >= TOKENIZE_PROGRESS_ROWS:
            _console(stderr=True).print(f"tokenizing {data}: {done:,} of {total:,} rows")

    return show


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


def _progress(console: Any, transient: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )


def _frontier_table(study: Any) -> Any:
    from rich.table import Table

    from autotune.pareto import frontier
    from autotune.study import measured_points
    from autotune.units import format_bytes

    table = Table(title="Pareto frontier (measured, within budget)")
    for column in ("trial", "recipe", "peak memory", "tokens/s", "eval loss"):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for point in frontier(measured_points(study)):
        trial = study.trials[point.number]
        table.add_row(
            str(point.number),
            trial.user_attrs.get("recipe_label", ""),
            format_bytes(point.peak_memory_bytes),
            f"{point.tokens_per_second:,.0f}",
            f"{point.eval_loss:.4f}",
        )
    return table


TRUST_REMOTE_CODE_HELP = (
    "Run code the model ships with itself (auto_map in its config); off by default. Read it first."
)


def _trust_remote_code() -> Any:
    return typer.Option(False, "--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)


MEMORY_MODEL_HELP = (
    "replay: run the recipe's probe on torch's meta device through a model of the CUDA caching "
    "allocator (seconds). formula: closed-form estimate (instant)."
)


@app.command()
def run(
    model: str = typer.Option(
        ..., "--model", "-m", help="Hugging Face model id or local directory."
    ),
    data: Path = typer.Option(..., "--data", "-d", help="JSONL training data."),
    budget: str = typer.Option(..., "--budget", "-b", help=BUDGET_HELP),
    space: Path | None = typer.Option(
        None, "--space", help="Search space YAML (default: the one shipped with autotune)."
    ),
    trials: int = typer.Option(20, "--trials", "-n", help="Finished trials the study should hold."),
    timeout: str | None = typer.Option(
        None, "--timeout", help="Stop starting trials after this long, e.g. 8h, 90m."
    ),
    study: str | None = typer.Option(None, "--study", help=STUDY_HELP),
    storage: str | None = typer.Option(None, "--storage", help=STORAGE_HELP),
    probe_steps: int = typer.Option(20, "--probe-steps", help="Optimizer steps per probe."),
    probe_timeout: str = typer.Option(
        "15m", "--probe-timeout", help="Kill a probe that runs longer than this."
    ),
    seq_len: int = typer.Option(
        1024, "--seq-len", help="Tokens per sequence (longer samples are truncated)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    seed: int = typer.Option(0, "--seed", help="Seed for the sampler, data order and split."),
    skip_bad_rows: bool = typer.Option(
        False, "--skip-bad-rows", help="Go on without malformed data rows (they are counted)."
    ),
    eval_rows: int | None = typer.Option(
        None, "--eval-rows", help="Rows held out for eval loss (default: 10%, at most 64)."
    ),
    confirm: int = typer.Option(
        3, "--confirm", help="Re-probe this many top frontier recipes, 2x longer, new seed."
    ),
    workers: int = typer.Option(
        1, "--workers", "-j", help="Probes at once on this machine (default 1; see --gpus)."
    ),
    weight_cache: bool = typer.Option(
        False,
        "--weight-cache",
        help="QLoRA probes read the base already quantized from an NF4 copy in trials/cache "
        "(the first one writes it).",
    ),
    gpus: str | None = typer.Option(
        None, "--gpus", help="GPU indices, e.g. 0,1,2,3: one probe per GPU at a time."
    ),
    memory_model: str = typer.Option("replay", "--memory-model", help=MEMORY_MODEL_HELP),
    report_path: Path | None = typer.Option(
        None, "--report", help="HTML report path (default: reports/<study>.html)."
    ),
    recipe_path: Path | None = typer.Option(
        None, "--recipe-out", help="Exported recipe path (default: reports/<study>-recipe.yaml)."
    ),
    trust_remote_code: bool = _trust_remote_code(),
) -> None:
    """Search fine-tuning recipes for MODEL on DATA within BUDGET and export the best."""
    from autotune.export import write_recipe
    from autotune.probe import SubprocessProbeRunner
    from autotune.remote_code import allow_remote_code
    from autotune.report import write_report
    from autotune.study import (
        RunEvents,
        RunSettings,
        TrialStatus,
        TrialSummary,
        finished_trial_count,
        measured_points,
        not_searched,
        nothing_measured_line,
        prepare_run,
        redact_url,
        run_study,
        study_file_name,
    )
    from autotune.training.io import CPU_MEMORY_SOURCE, PROBE_PHASES
    from autotune.units import format_bytes, parse_bytes, parse_duration_seconds

    allow_remote_code(trust_remote_code)
    settings = RunSettings(
        model=model,
        data_path=data,
        budget_bytes=parse_bytes(budget),
        space_path=space,
        trials=trials,
        timeout_seconds=parse_duration_seconds(timeout, "--timeout") if timeout else None,
        study_name=study,
        storage=storage,
        probe_steps=probe_steps,
        probe_timeout_seconds=parse_duration_seconds(probe_timeout, "--probe-timeout"),
        seq_len=seq_len,
        device=device,
        seed=seed,
        workers=workers,
        confirm_top=confirm,
        weight_cache=weight_cache,
        memory_model=memory_model,
        skip_bad_rows=skip_bad_rows,
        eval_rows=eval_rows,
        gpus=tuple(g.strip() for g in gpus.split(",") if g.strip()) if gpus else (),
        tokenize_progress=_tokenize_progress(data),
    )
    prepared = prepare_run(settings)
    console = _console()
    if prepared.skipped_rows:
        console.print(f"skipped {prepared.skipped_rows} bad rows of {settings.data_path}")
    console.print(
        f"study [bold]{prepared.study_name}[/] in {redact_url(prepared.storage)} on "
        f"{prepared.device}; budget {format_bytes(settings.budget_bytes)}; smallest recipe "
        f"in the space needs {format_bytes(prepared.smallest_peak_bytes)} (predicted)"
    )
    for line in not_searched(prepared.unsupported_choices, prepared.ruled_out_choices):
        console.print(line)
    with _progress(console, transient=True) as progress:
        task = progress.add_task("trials", total=trials)

        def started(number: int, label: str) -> None:
            progress.update(task, description=f"trial {number}: {label}")

        def finished(summary: TrialSummary) -> None:
            progress.advance(task)
            if summary.status == TrialStatus.MEASURED:
                memory = format_bytes(summary.peak_memory_bytes or 0)
                if summary.memory_source == CPU_MEMORY_SOURCE:
                    memory = f"CPU RSS +{memory}"
                text = (
                    f"[green]measured[/] {memory} "
                    f"(predicted GPU {format_bytes(summary.predicted_peak_bytes)}), "
                    f"{summary.tokens_per_second:,.0f} tok/s, eval loss {summary.eval_loss:.4f}"
                )
            else:
                text = f"[yellow]{summary.status}[/]: {summary.reason}"
            if summary.repair_of is not None:
                text += f" (nearest recipe that fits, for trial {summary.repair_of})"
            progress.console.print(f"trial {summary.number:>3} {summary.label}: {text}")
            if summary.seconds:
                phases = (*PROBE_PHASES, "total")
                progress.console.print(
                    "      time: "
                    + ", ".join(
                        f"{p} {summary.seconds[p]:.1f}s" for p in phases if p in summary.seconds
                    ),
                    style="dim",
                )

        def confirmed(number: int, confirmation: dict) -> None:
            verdict = "[green]held up[/]" if confirmation["held_up"] else "[red]did not hold up[/]"
            speed = confirmation.get("tokens_per_second")
            detail = (
                f"{speed:,.0f} tok/s ({confirmation['speed_change']:+.0%})"
                if confirmation["status"] == "ok"
                else confirmation["reason"]
            )
            progress.console.print(
                f"confirm trial {number} ({confirmation['steps']} steps, seed "
                f"{confirmation['seed']}): {verdict}: {detail}"
            )

        def noise_measured(noise: dict) -> None:
            progress.console.print(
                f"noise: trial {noise['trial']} again with seed {noise['seed']}: eval loss moved "
                f"{noise['eval_loss_difference']:.4f}, tokens/s "
                f"{(noise['tokens_per_second_change'] or 0):+.1%}"
            )

        events = RunEvents(
            trial_started=started,
            trial_finished=finished,
            confirmed=confirmed,
            noise_measured=noise_measured,
        )
        runner = SubprocessProbeRunner(settings.probe_timeout_seconds)
        result_study = None
        try:
            result_study = run_study(prepared, runner, events)
        finally:
            if result_study is None:
                progress.stop()
        progress.update(task, completed=min(finished_trial_count(result_study), trials))
    for note in events.notes:
        console.print(note)
    console.print(_frontier_table(result_study))
    file_stem = study_file_name(prepared.study_name)
    report_file = write_report(result_study, report_path or Path("reports") / f"{file_stem}.html")
    console.print(f"report: {report_file}")
    if measured_points(result_study):
        _, recipe_file = write_recipe(
            result_study,
            "balanced",
            recipe_path or Path("reports") / f"{file_stem}-recipe.yaml",
        )
        console.print(f"recipe (balanced): {recipe_file}")
    else:
        console.print(nothing_measured_line(result_study))


@app.command()
def export(
    study: str | None = typer.Option(None, "--study", help=STUDY_HELP),
    storage: str | None = typer.Option(None, "--storage", help=STORAGE_HELP),
    pick: str = typer.Option(
        "balanced",
        "--pick",
        help="balanced (closest to the ideal point after scaling each objective over the "
        "frontier), fastest, smallest or best-loss.",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write here (default: stdout)."
    ),
    fmt: str = typer.Option(
        "autotune",
        "--format",
        "-f",
        help="autotune (the recipe schema), hf (TrainingArguments, LoraConfig and "
        "BitsAndBytesConfig keyword arguments), axolotl or llamafactory.",
    ),
) -> None:
    """Write the picked frontier recipe as YAML, with its measured figures."""
    from autotune.export import recipe_yaml, write_text
    from autotune.study import load_existing_study

    found = load_existing_study(storage, study)
    _, text = recipe_yaml(found, pick, fmt)
    if output is None:
        typer.echo(text, nl=False)
    else:
        typer.echo(f"recipe ({pick}): {write_text(output, text)}")


@app.command()
def report(
    study: str | None = typer.Option(None, "--study", help=STUDY_HELP),
    storage: str | None = typer.Option(None, "--storage", help=STORAGE_HELP),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="HTML path (default: reports/<study>.html)."
    ),
    csv: Path | None = typer.Option(None, "--csv", help="Also write the trials table as CSV."),
    png: Path | None = typer.Option(None, "--png", help="Also write the Pareto chart as PNG."),
) -> None:
    """Write a self-contained HTML report: Pareto chart, predicted vs measured memory, trials."""
    from autotune.report import write_report
    from autotune.study import load_existing_study, study_file_name

    found = load_existing_study(storage, study)
    if not found.trials:
        raise UsageError(
            f"study {found.study_name!r} holds no trials yet; run `autotune run` first"
        )
    default = Path("reports") / f"{study_file_name(found.study_name)}.html"
    path = write_report(found, output or default, csv)
    typer.echo(f"report: {path}")
    if csv is not None:
        typer.echo(f"trials table: {csv}")
    if png is not None:
        from autotune.report import write_main_chart_png

        typer.echo(f"chart: {write_main_chart_png(found, png)}")


@app.command()
def train(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML (from autotune export)."),
    data: Path = typer.Option(..., "--data", "-d", help="JSONL training data."),
    output: Path = typer.Option(
        Path("outputs/autotune"),
        "--output",
        "-o",
        help="Where checkpoints and the adapter or model go.",
    ),
    epochs: float | None = typer.Option(None, "--epochs", help="Passes over the data (default 1)."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Optimizer steps (overrides --epochs)."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the latest checkpoint in --output."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Write into a non-empty --output (its files of the same names are replaced).",
    ),
    budget: str | None = typer.Option(
        None, "--budget", "-b", help=BUDGET_HELP + " Enforced on CUDA."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    seed: int = typer.Option(0, "--seed", help="Seed for data order and split."),
    save_steps: int = typer.Option(100, "--save-steps", help="Checkpoint every N optimizer steps."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Train without bad rows."),
    eval_rows: int | None = typer.Option(None, "--eval-rows", help="Rows held out for eval."),
    trust_remote_code: bool = _trust_remote_code(),
) -> None:
    """Fine-tune with a recipe; checkpoints and the adapter or model go to --output."""
    import yaml

    from autotune.architecture import check_recipe
    from autotune.model_spec import load_model_spec
    from autotune.recipe import Recipe
    from autotune.remote_code import allow_remote_code
    from autotune.replay import load_config, predict
    from autotune.study import resolve_device
    from autotune.training.train import train as train_model
    from autotune.units import format_bytes, parse_bytes

    allow_remote_code(trust_remote_code)
    if epochs is not None and max_steps is not None:
        raise UsageError("give --epochs or --max-steps, not both")
    if (epochs is not None and not 0 < epochs < math.inf) or (
        max_steps is not None and max_steps < 1
    ):
        raise UsageError("--epochs and --max-steps must be positive and finite")
    if save_steps < 1:
        raise UsageError(f"--save-steps must be at least 1, got {save_steps}")
    loaded = Recipe.load(recipe)
    measured = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("measured") or {}
    spec = load_model_spec(loaded.model) if loaded.model else None
    if spec is not None:
        spec.check_recipe(loaded, str(recipe))
    config = load_config(loaded.model) if loaded.model else None
    budget_bytes = parse_bytes(budget) if budget else None
    device_name = resolve_device(device)
    if config is not None:
        check_recipe(loaded, config, str(recipe), device_name)
    console = _console()
    with _progress(console, transient=False) as progress:
        task = progress.add_task("training", total=None)

        def started(start_step: int, total_steps: int) -> None:
            progress.update(task, total=total_steps, completed=start_step)
            if start_step:
                progress.console.print(f"resumed from step {start_step}")

        def stepped(step: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"training, loss {loss:.4f}")

        report = train_model(
            loaded,
            data,
            output,
            epochs=epochs,
            max_steps=max_steps,
            resume=resume,
            overwrite=overwrite,
            budget_bytes=budget_bytes,
            device=device_name,
            seed=seed,
            save_every_steps=save_steps,
            skip_bad_rows=skip_bad_rows,
            eval_rows=eval_rows,
            on_start=started,
            on_step=stepped,
        )
    memory = format_bytes(report.peak_memory_bytes)
    if report.memory_source == "cpu_peak_rss_delta":
        memory = f"{memory} (CPU RSS growth, not GPU memory)"
    predicted = "?"
    if spec is not None:
        # as `estimate` and a study predict it: the replay, the formula where it cannot run
        estimated, memory_model, _ = predict(spec, loaded, config)
        predicted = f"{format_bytes(estimated.peak_bytes)} ({memory_model})"
    probe_speed = measured.get("tokens_per_second")
    console.print(f"trained {report.steps} steps; eval loss {report.eval_loss:.4f}")
    console.print(
        f"peak memory {memory}; predicted {predicted}"
        + (
            f"; probe measured {format_bytes(measured['peak_memory_bytes'])}"
            if measured.get("peak_memory_bytes")
            else ""
        )
    )
    console.print(
        f"tokens/s {report.tokens_per_second:,.0f}"
        + (f"; probe measured {probe_speed:,.0f}" if probe_speed else "")
    )
    console.print(f"saved to {report.output_dir}")


@app.command()
def dashboard(
    storage: str | None = typer.Option(None, "--storage", help=STORAGE_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
) -> None:
    """Serve optuna-dashboard on the study storage (loopback only unless --host says otherwise)."""
    from autotune.dashboard import address, is_loopback, serve

    if not is_loopback(host):
        typer.echo(
            "warning: the dashboard has no authentication; anyone who can reach "
            f"{address(host, port)} "
            "can read and change the studies",
            err=True,
        )
    serve(storage, host, port)


@app.command()
def estimate(
    model: str = typer.Option(
        ..., "--model", "-m", help="Model id or directory (config.json is enough)."
    ),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Override the recipe's seq_len."),
    as_json: bool = typer.Option(False, "--json", help="Print {peak_bytes, breakdown} as JSON."),
    memory_model: str = typer.Option("replay", "--memory-model", help=MEMORY_MODEL_HELP),
    trust_remote_code: bool = _trust_remote_code(),
) -> None:
    """Predict a recipe's peak GPU memory from the model config, without loading weights."""
    from autotune.architecture import check_recipe
    from autotune.model_spec import load_model_spec
    from autotune.recipe import UPPER_BOUNDS, Recipe
    from autotune.remote_code import allow_remote_code
    from autotune.replay import check_memory_model, load_config, predict
    from autotune.units import format_bytes

    allow_remote_code(trust_remote_code)
    check_memory_model(memory_model)
    spec = load_model_spec(model)
    loaded = Recipe.load(recipe).replace(model=model)
    if seq_len is not None and not 1 <= seq_len <= UPPER_BOUNDS["seq_len"]:
        raise UsageError(f"--seq-len must be from 1 to {UPPER_BOUNDS['seq_len']}, got {seq_len}")
    spec.check_recipe(loaded, str(recipe))
    config = None
    if memory_model == "replay":
        config = load_config(model)
        check_recipe(loaded, config, str(recipe))
    elif loaded.method == "lora":
        # the formula prices the Llama family's linear layers by name
        spec.target_linears(loaded.lora_target_modules or "all-linear")
    result, used, reason = predict(spec, loaded, config, seq_len, memory_model)
    if as_json:
        typer.echo(json.dumps({**result.as_json(), "memory_model": used}))
        return
    if reason:
        typer.echo(f"memory model: {used} ({reason})")
    for name, size in result.breakdown.items():
        typer.echo(f"{name:>28}  {format_bytes(size):>12}")
    typer.echo(
        f"{'predicted peak':>28}  {format_bytes(result.peak_bytes):>12}  "
        f"({result.peak_bytes} bytes, {used})"
    )
    if result.paged_bytes:
        typer.echo(
            f"{'paged optimizer states':>28}  {format_bytes(result.paged_bytes):>12}  "
            "(unified memory, outside the peak: paged to the host when the GPU runs short)"
        )


data_app = typer.Typer(no_args_is_help=True, help="Look at training data before a run.")
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    data: Path = typer.Argument(..., help="JSONL, CSV or Parquet file, or a datasets directory."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Tokenize with this model's tokenizer."
    ),
    seq_len: int = typer.Option(1024, "--seq-len", help="Truncation length to check against."),
    trust_remote_code: bool = _trust_remote_code(),
) -> None:
    """Rows, formats, bad rows and (with --model) token lengths and truncation."""
    from autotune.data import describe_bad_rows, summarize
    from autotune.recipe import UPPER_BOUNDS
    from autotune.remote_code import allow_remote_code
    from autotune.study import tokenizer_for

    allow_remote_code(trust_remote_code)
    if not 1 <= seq_len <= UPPER_BOUNDS["seq_len"]:
        raise UsageError(f"--seq-len must be from 1 to {UPPER_BOUNDS['seq_len']}, got {seq_len}")
    tokenizer = tokenizer_for(model) if model else None
    summary = summarize(data, tokenizer, seq_len)
    formats = ", ".join(f"{kind} {count}" for kind, count in sorted(summary.formats.items()))
    typer.echo(f"{summary.path}: {summary.rows} rows ({formats or 'none'})")
    if summary.bad_rows:
        typer.echo(describe_bad_rows(data, summary.bad_rows))
    else:
        typer.echo("no malformed rows")
    if summary.token_length_percentiles:
        lengths = ", ".join(f"{k} {v}" for k, v in summary.token_length_percentiles.items())
        typer.echo(f"tokens per row: {lengths}")
        typer.echo(
            f"longer than seq_len {seq_len}: {summary.truncated_share:.1%} of rows; "
            f"{summary.rows_without_answer_tokens} rows lose their whole answer"
        )


INTERRUPTED = "autotune: interrupted; finished trials are kept in the study"


def main() -> None:
    import warnings

    from autotune.cpu_nf4 import quiet_kernel_hub_notice

    quiet_kernel_hub_notice()
    # libraries' notices of their own coming changes are for their callers' code, not for
    # the person running autotune; they would make a one-line error three lines
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from typer.exceptions import TyperException

    try:
        code = app(standalone_mode=False)
    except TyperException as error:  # click's errors, as typer ships them
        if type(error).__name__ == "NoArgsIsHelpError":
            error.show()  # type: ignore[attr-defined]  # `autotune` or `autotune data` alone
            sys.exit(0)
        # a bad flag or value: one line, like every other input error, not click's panel
        message = " ".join(error.format_message().split())
        print(f"autotune: error: {message}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except UsageError as error:
        if _state["debug"]:
            raise
        print(f"autotune: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    if code == 130:  # Ctrl-C, which typer turns into an exit code
        print(INTERRUPTED, file=sys.stderr)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
