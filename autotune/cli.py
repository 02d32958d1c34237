"""The `autotune` command: parse, call the library, print. Bad input exits 2 with one line.

Heavy libraries load inside the commands so `autotune --help` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from autotune.cli_state import STATE
from autotune.cli_train import train
from autotune.errors import TrainingFailed, error_line, lost_storage
from autotune.options import setting_option, settings_from_options
from autotune.probe_stop import interruption, stop_handling_restored, terminate_as_ctrl_c

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find the fastest way to fine-tune a causal LM within the GPU memory you have.",
)


@app.callback()
def _main_options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    STATE["debug"] = debug


@app.command()
def run(
    model: str = setting_option("model", "--model", "-m"),
    data_path: Path = setting_option("data_path", "--data", "-d"),
    budget_bytes: str = setting_option("budget_bytes", "--budget", "-b"),
    host_budget_bytes: str | None = setting_option("host_budget_bytes", "--host-budget"),
    space_path: Path | None = setting_option("space_path", "--space"),
    trials: int = setting_option("trials", "--trials", "-n"),
    timeout_seconds: str | None = setting_option("timeout_seconds", "--timeout"),
    study_name: str | None = setting_option("study_name", "--study"),
    storage: str | None = setting_option("storage", "--storage"),
    probe_steps: int = setting_option("probe_steps", "--probe-steps"),
    probe_timeout_seconds: str = setting_option("probe_timeout_seconds", "--probe-timeout"),
    seq_len: int = setting_option("seq_len", "--seq-len"),
    device: str = setting_option("device", "--device"),
    seed: int = setting_option("seed", "--seed"),
    skip_bad_rows: bool = setting_option("skip_bad_rows", "--skip-bad-rows"),
    eval_rows: int | None = setting_option("eval_rows", "--eval-rows"),
    confirm_top: int = setting_option("confirm_top", "--confirm"),
    workers: int = setting_option("workers", "--workers", "-j"),
    weight_cache: bool = setting_option("weight_cache", "--weight-cache"),
    gpus: str | None = setting_option("gpus", "--gpus"),
    gpus_per_probe: str | None = setting_option("gpus_per_probe", "--gpus-per-probe"),
    memory_model: str = setting_option("memory_model", "--memory-model"),
    memory_margin: float | None = setting_option("memory_margin", "--memory-margin"),
    report_path: Path | None = setting_option("report_path", "--report"),
    recipe_path: Path | None = setting_option("recipe_path", "--recipe-out"),
    trust_remote_code: bool = setting_option("trust_remote_code", "--trust-remote-code"),
    quality: str = setting_option("quality", "--quality"),
    promote_rounds: int = setting_option("promote_rounds", "--promote"),
) -> None:
    """Search fine-tuning recipes for MODEL on DATA within BUDGET and export the best."""
    options = dict(locals())  # the parameters, named as RunSettings' fields
    STATE["kept"] = "; finished trials are kept in the study"
    STATE["storage"] = storage or ""
    STATE["interrupted"] = (
        f"autotune: interrupted{STATE['kept']} (a trial it stopped is queued again); "
        "the same command resumes the study"
    )
    terminate_as_ctrl_c()  # a batch system's time limit stops a run as Ctrl-C does
    from autotune.api import run as run_autotune
    from autotune.budgets import resolve_budget
    from autotune.console import ConsoleReporter, sizing_progress, tokenize_progress
    from autotune.distributed import parse_gpu_indices
    from autotune.study.unmeasured import nothing_measured_line

    options["gpus"] = parse_gpu_indices(gpus) if gpus is not None else ()  # before auto reads one
    budget = resolve_budget(budget_bytes, options["gpus"][0] if options["gpus"] else None)
    if budget.note:  # a card name or auto: say what size it became
        typer.echo(budget.note)
    options["budget_bytes"] = budget.bytes
    settings = settings_from_options(
        options, tokenize_progress=tokenize_progress(data_path), sizing_progress=sizing_progress()
    )
    with ConsoleReporter() as reporter:
        result = run_autotune(settings, events=reporter)
    reporter.show_result(result)
    if result.recipe_path is None:  # `run ... && train --recipe ...` must stop here
        raise TrainingFailed(nothing_measured_line(result.study))


@app.command()
def export(
    study: str | None = setting_option("study_name", "--study"),
    storage: str | None = setting_option("storage", "--storage"),
    pick: str = typer.Option(
        "balanced",
        "--pick",
        help="balanced (closest to the ideal point after scaling each objective over the "
        "frontier), fastest, smallest or best-loss (lowest eval loss; the fastest of those "
        "within the measured noise of it where a noise probe ran).",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write here (default: stdout)."
    ),
    fmt: str = typer.Option(
        "autotune",
        "--format",
        "-f",
        help="autotune (the recipe schema), hf (TrainingArguments, LoraConfig and "
        "BitsAndBytesConfig keyword arguments), axolotl, llamafactory or accelerate (an "
        "accelerate launch config for a recipe's GPUs).",
    ),
) -> None:
    """Write the picked frontier recipe as YAML, with its measured figures."""
    from autotune.api import export_recipe, exported_train_command

    text = export_recipe(storage, study, pick, fmt, output)
    if output is None:
        typer.echo(text, nl=False)
    else:
        typer.echo(f"recipe ({pick}): {output}")
        if fmt == "autotune":  # the other formats are trained by their own tools
            typer.echo(f"to train it: {exported_train_command(storage, study, output)}")


@app.command()
def report(
    study: str | None = setting_option("study_name", "--study"),
    storage: str | None = setting_option("storage", "--storage"),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="HTML path (default: reports/<study>.html)."
    ),
    csv: Path | None = typer.Option(None, "--csv", help="Also write the trials table as CSV."),
    png: Path | None = typer.Option(None, "--png", help="Also write the Pareto chart as PNG."),
) -> None:
    """Write a self-contained HTML report: Pareto chart, predicted vs measured memory, trials."""
    from autotune.api import write_study_report

    terminate_as_ctrl_c()  # the PNG's headless browser is stopped with it, not left writing

    written = write_study_report(storage, study, output, csv, png)
    typer.echo(f"report: {written.report_path}")
    if written.csv_path is not None:
        typer.echo(f"trials table: {written.csv_path}")
    if written.png_path is not None:
        typer.echo(f"chart: {written.png_path}")


@app.command()
def studies(storage: str | None = setting_option("storage", "--storage")) -> None:
    """Every study in the storage: model, budget, trials finished and running, best per pick."""
    from autotune.api import list_studies
    from autotune.state_text import studies_text

    typer.echo(studies_text(list_studies(storage)))


@app.command()
def status(
    study: str | None = setting_option("study_name", "--study"),
    storage: str | None = setting_option("storage", "--storage"),
) -> None:
    """A study's progress, while it runs or after: trials, probes an hour, frontier so far."""
    from autotune.api import study_status
    from autotune.state_text import status_text

    typer.echo(status_text(study_status(storage, study), storage))


app.command(name="train")(train)  # its options and run: cli_train


@app.command()
def dashboard(
    storage: str | None = setting_option("storage", "--storage"),
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


@app.command(
    help="Predict a recipe's peak GPU memory from the model config, without loading weights.\n\n"
    "Without data, every row is taken as seq_len long, with no padding in a micro-batch; a "
    "study, which knows the data's lengths, also predicts padded micro-batches."
)
def estimate(
    model: str = typer.Option(
        ..., "--model", "-m", help="Model id or directory (config.json is enough)."
    ),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML."),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="Tokens per sequence, in place of the recipe's seq_len."
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print {peak_bytes, breakdown, ...} as JSON, in bytes (with --budget: budget_bytes "
        "and fits).",
    ),
    memory_model: str = setting_option("memory_model", "--memory-model"),
    memory_margin: float | None = setting_option("memory_margin", "--memory-margin"),
    budget: str | None = typer.Option(
        None,
        "--budget",
        "-b",
        help="Say whether the peak, with its margin, fits this GPU memory budget: a size such as "
        "24GB or 24GiB, or a card's name, as run's --budget. Exit code 1 where it does not fit.",
    ),
    trust_remote_code: bool = setting_option("trust_remote_code", "--trust-remote-code"),
) -> None:
    """`help` above: what `autotune estimate --help` shows, its lines joined."""
    from autotune.api import estimate as estimate_peak
    from autotune.budgets import parse_budget
    from autotune.state_text import show_estimate

    budget_bytes = parse_budget(budget) if budget is not None else None  # before the replay
    predicted = estimate_peak(
        model,
        recipe,
        seq_len=seq_len,
        memory_model=memory_model,
        trust_remote_code=trust_remote_code,
        memory_margin=memory_margin,
    )
    if not show_estimate(predicted, as_json, budget_bytes):
        raise typer.Exit(1)  # over the budget: a script tells it from a fit by the exit code


data_app = typer.Typer(no_args_is_help=True, help="Look at training data before a run.")
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    data: Path = typer.Argument(..., help="JSONL, CSV or Parquet file, or a datasets directory."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Tokenize with this model's tokenizer."
    ),
    seq_len: int = typer.Option(
        1024, "--seq-len", help="Truncation length, in tokens, to check against."
    ),
    trust_remote_code: bool = setting_option("trust_remote_code", "--trust-remote-code"),
) -> None:
    """Rows, formats, bad rows and (with --model) token lengths and truncation."""
    from autotune.api import inspect_data
    from autotune.console import tokenize_progress
    from autotune.data.rows import describe_bad_rows
    from autotune.units import count_of

    summary = inspect_data(
        data,
        model,
        seq_len,
        trust_remote_code=trust_remote_code,
        progress=tokenize_progress(data),
    )
    formats = ", ".join(f"{kind} {count}" for kind, count in sorted(summary.formats.items()))
    typer.echo(f"{summary.path}: {count_of(summary.rows, 'row')} ({formats or 'none'})")
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


def main() -> None:
    import warnings

    from autotune.cpu_nf4 import quiet_kernel_hub_notice

    quiet_kernel_hub_notice()
    # libraries' notices of their own coming changes are for their callers' code, not for
    # the person running autotune; they would make a one-line error three lines
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from typer.exceptions import TyperException

    with stop_handling_restored():  # a caller in this process keeps its signal handling
        try:
            code = app(standalone_mode=False)
        except TyperException as error:  # click's errors, as typer ships them
            if type(error).__name__ == "NoArgsIsHelpError":
                error.show()  # type: ignore[attr-defined]  # `autotune` or `autotune data` alone
                sys.exit(0)
            # a bad flag or value: one line, like every other input error, not click's panel
            message = " ".join(error.format_message().split())
            if message.startswith("No such option: --debug"):  # given after the command
                message = "--debug goes before the command: autotune --debug COMMAND ..."
            print(f"autotune: error: {message}", file=sys.stderr)
            sys.exit(2)
        except (typer.Abort, KeyboardInterrupt):
            code = 130
        except Exception as error:  # noqa: BLE001 - each kind of error its line (error_line)
            line, exit_code = error_line(error, STATE["kept"])
            if STATE["debug"] or not exit_code:
                raise
            if lost_storage(error):  # the driver's words: no password, whatever it quotes
                from autotune.study.storage_urls import without_secrets

                line = without_secrets(line, STATE["storage"])
            print(f"autotune: error: {line}", file=sys.stderr)
            sys.exit(exit_code)
        if code == 130:  # Ctrl-C (or SIGTERM, SIGHUP), which typer turns into an exit code
            words, code = interruption(STATE["interrupted"])
            print(words, file=sys.stderr)
        if isinstance(code, int) and code:
            sys.exit(code)


if __name__ == "__main__":
    main()
