"""The `autotune train` command: its options, and the run with its progress bar and figures.

Registered on the `autotune` app by cli.py; heavy libraries load inside it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from autotune.cli_state import STATE
from autotune.errors import UsageError
from autotune.options import setting_help, setting_option
from autotune.probe_stop import terminate_as_ctrl_c


def train(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML (from autotune export)."),
    data: Path = setting_option("data_path", "--data", "-d"),
    output: Path = typer.Option(
        Path("outputs/autotune"),
        "--output",
        "-o",
        help="Where checkpoints and the adapter or model go.",
    ),
    epochs: float | None = typer.Option(None, "--epochs", help="Passes over the data (default 1)."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Optimizer steps to train, instead of --epochs."
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
        None, "--budget", "-b", help=setting_help("budget_bytes") + " Enforced on CUDA."
    ),
    device: str = setting_option("device", "--device"),
    gpus: str | None = typer.Option(
        None,
        "--gpus",
        help="A recipe on several GPUs: the CUDA indices its ranks train on, one per GPU, e.g. "
        "0,1 (default: the first num_gpus). On --device cpu, gloo processes stand in.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for data order and split."),
    save_steps: int = typer.Option(100, "--save-steps", help="Checkpoint every N optimizer steps."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Train without bad rows."),
    eval_rows: int | None = setting_option("eval_rows", "--eval-rows"),
    eval_steps: int | None = typer.Option(
        None,
        "--eval-steps",
        help="Score the held-out rows every N optimizer steps; the best weights are saved.",
    ),
    early_stopping_patience: int | None = typer.Option(
        None,
        "--early-stopping-patience",
        help="With --eval-steps: stop after K evaluations without a better eval loss "
        "(default 3; 0 never stops).",
    ),
    merge: bool = typer.Option(
        False,
        "--merge",
        help="LoRA: also save the base with the adapter merged, a plain model, in --output/merged.",
    ),
    merge_dtype: str | None = typer.Option(
        None, "--merge-dtype", help="Precision of the merged model: bf16 (default), fp16, fp32."
    ),
    report_to: str = typer.Option(
        "none",
        "--report-to",
        help="none, tensorboard (in --output/runs) or wandb (offline without a network): train "
        "and eval loss, learning rate, tokens/s, peak memory beside the predicted peak.",
    ),
    logging_steps: int = typer.Option(
        10, "--logging-steps", help="With --report-to: log every N optimizer steps."
    ),
    trust_remote_code: bool = setting_option("trust_remote_code", "--trust-remote-code"),
) -> None:
    """Fine-tune with a recipe; checkpoints and the adapter or model go to --output."""
    from autotune.api import train as train_with_recipe
    from autotune.budgets import parse_budget
    from autotune.console import make_console, tokenize_progress
    from autotune.distributed import parse_gpu_indices
    from autotune.train_console import TrainProgress, show_trained

    STATE["interrupted"] = (
        f"autotune: interrupted; the checkpoints saved so far stay in {output} "
        "(--resume continues from the latest)"
    )
    terminate_as_ctrl_c()
    budget_bytes = parse_budget(budget) if budget else None
    if merge_dtype is not None and not merge:
        raise UsageError("--merge-dtype needs --merge")
    console = make_console()
    with TrainProgress(console) as progress:
        result = train_with_recipe(
            recipe,
            data,
            output,
            device=device,
            gpus=parse_gpu_indices(gpus) if gpus is not None else (),
            trust_remote_code=trust_remote_code,
            epochs=epochs,
            max_steps=max_steps,
            resume=resume,
            overwrite=overwrite,
            budget_bytes=budget_bytes,
            seed=seed,
            save_every_steps=save_steps,
            skip_bad_rows=skip_bad_rows,
            eval_rows=eval_rows,
            eval_steps=eval_steps,
            early_stopping_patience=early_stopping_patience,
            merge_dtype=(merge_dtype or "bf16") if merge else None,
            report_to=report_to,
            logging_steps=logging_steps,
            on_start=progress.started,
            on_step=progress.stepped,
            on_eval=progress.evaluated,
            tokenize_progress=tokenize_progress(data),
        )
    show_trained(console, result)
    if budget_bytes and not result.report.budget_enforced:
        console.print(
            "note: --budget was not enforced: it caps a CUDA device's memory, and only below "
            "the device's size"
        )
