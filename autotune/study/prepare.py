"""`prepare_run`: every input checked before anything runs."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

from autotune.architecture import read_architecture
from autotune.data.rows import check_data_path, checked_scan, usable_rows
from autotune.data.splits import check_enough_rows, check_seed, check_token_ids
from autotune.data.summary import length_stats
from autotune.data.token_cache import cached_splits
from autotune.errors import UsageError
from autotune.margins import check_margin
from autotune.memory import MemoryEstimate
from autotune.model_source import check_local_weights
from autotune.model_spec import ModelSpec, load_model_spec
from autotune.offgpu import run_off_gpu
from autotune.outputs import check_run_outputs
from autotune.prediction import NARROWEST_TOKEN_LENGTHS, check_memory_model
from autotune.quality import check_quality
from autotune.recipe import UPPER_BOUNDS
from autotune.remote_code import allow_remote_code
from autotune.replay import load_config
from autotune.space import SearchSpace
from autotune.study.pruning import (
    BudgetQuery,
    budget_fit,
    distributed_space,
    smallest_peak_over_budget,
    supported_space,
)
from autotune.study.seeding import held_predictor
from autotune.study.settings import (
    LENGTH_STATS_ROWS,
    PreparedRun,
    RunSettings,
    check_workers,
    default_study_name,
    resolve_device,
    study_file_name,
    tokenizer_for,
)
from autotune.study.sqlite_checks import check_sqlite_storage
from autotune.study.storage import make_storage, make_trials_dir
from autotune.study.storage_urls import DEFAULT_STORAGE, TRIALS_DIR, check_storage_url
from autotune.study.study_records import FIRST_FORMAT_KEY, FORMATS_KEY
from autotune.study.unmeasured import smallest_recipe_words
from autotune.units import format_bytes


def prepare_run(settings: RunSettings, check_weights: bool = False) -> PreparedRun:
    """Check every input before anything runs (with `check_weights`, a local model's weight
    files, which probes load); bad input raises UsageError."""
    allow_remote_code(settings.trust_remote_code)
    if settings.trials < 1:
        raise UsageError(f"--trials must be at least 1, got {settings.trials}")
    if settings.probe_steps < 1:
        raise UsageError(f"--probe-steps must be at least 1, got {settings.probe_steps}")
    if not 2 <= settings.seq_len <= UPPER_BOUNDS["seq_len"]:
        raise UsageError(
            f"--seq-len must be from 2 to {UPPER_BOUNDS['seq_len']}, got {settings.seq_len}"
        )
    if settings.confirm_top < 0:
        raise UsageError(f"--confirm must be 0 or more, got {settings.confirm_top}")
    if settings.promote_rounds < 0:
        raise UsageError(f"--promote must be 0 or more, got {settings.promote_rounds}")
    check_seed(settings.seed)
    check_run_outputs(settings)
    check_quality(settings.quality, settings.largest_probe_gpus)
    if settings.study_name is not None:
        study_file_name(settings.study_name)  # refuses a name no file can be named by
    check_memory_model(settings.memory_model)
    if settings.storage:
        check_storage_url(settings.storage)
    check_sqlite_storage(settings.storage or DEFAULT_STORAGE)
    if settings.storage and not settings.storage.startswith("sqlite"):
        # a database server: a wrong host, password or name is said now, not after the data
        # is tokenized and the space sized (a SQLite file is only made once all is checked)
        make_storage(settings.storage).engine.dispose()
    spec = load_model_spec(settings.model)
    check_data_path(settings.data_path)  # a typo is said now, not after the model's classes load
    try:
        model_config = load_config(settings.model)
    except UsageError:
        if settings.memory_model == "replay":
            raise
        model_config = None  # the formula reads config.json itself; the probes will judge
    device = resolve_device(settings.device)
    check_workers(settings, device)  # before the data is read and the space sized
    # peft's checks import bitsandbytes, which gives a process a CUDA context where there is a
    # GPU: off this process then, so the probes keep the memory; on a CPU here, in it
    run = None if device == "cpu" else run_off_gpu
    architecture = read_architecture(model_config, run) if model_config is not None else None
    space, unsupported = supported_space(
        SearchSpace.load(settings.space_path), architecture, device
    )
    space = distributed_space(space, settings.gpus_per_probe, unsupported, device)
    if "lora" in space.choices_of("method") and max(space.choices_of("lora_r")) > spec.hidden_size:
        raise UsageError(
            f"{space.source}: lora_r {max(space.choices_of('lora_r'))} exceeds the model's width "
            f"{spec.hidden_size}; a rank is at most the width of the layers it adapts"
        )
    data_scan = checked_scan(settings.data_path, settings.skip_bad_rows)
    check_enough_rows(
        data_scan.usable_rows,
        space.effective_batch_size,
        settings.eval_rows,
        str(settings.data_path),
    )
    check_margin(settings.memory_margin)
    # the least peaks any data gives (rows one token wide where the data sets their width): a
    # budget below the smallest of them is refused before the data is tokenized
    # replays made while the space is sized, by replay_key: the trials' predictions start there
    replayed: dict[str, tuple[MemoryEstimate, str]] = {}
    smallest_over = smallest_peak_over_budget(
        _budget_query(settings, space, spec, model_config, NARROWEST_TOKEN_LENGTHS, replayed)
    )
    if smallest_over is not None:
        _refuse_budget(*smallest_over, settings, space, "whatever the data's lengths")
    if check_weights:  # before the data is tokenized and the space sized (minutes at 7B)
        check_local_weights(settings.model)
    # Recipes and probe requests name local paths absolutely so they work from anywhere.
    settings = dataclasses.replace(settings, data_path=Path(settings.data_path).resolve())
    if Path(settings.model).expanduser().exists():
        settings = dataclasses.replace(
            settings, model=str(Path(settings.model).expanduser().resolve())
        )
    tokenizer = tokenizer_for(settings.model, spec.vocab_size)
    data_stats = {
        "rows": data_scan.usable_rows,
        "skipped_rows": len(data_scan.bad),
        # what an axolotl export names, so it needs the file no more
        FORMATS_KEY: data_scan.formats,
        FIRST_FORMAT_KEY: data_scan.first_format,
        **length_stats(
            itertools.islice(usable_rows(settings.data_path), LENGTH_STATS_ROWS),
            tokenizer,
            settings.seq_len,
        ),
    }
    make_trials_dir()
    # Tokenize once for every probe and worker of this study (and later studies on the data);
    # this also refuses data that truncation at seq_len leaves without an answer token.
    splits, token_cache = cached_splits(
        settings.data_path,
        tokenizer,
        settings.seq_len,
        settings.seed,
        TRIALS_DIR / "cache",
        settings.eval_rows,
        row_count=data_scan.usable_rows,
        progress=settings.tokenize_progress,
    )
    check_token_ids(splits, spec.vocab_size, settings.model)
    # the space sized on the rows this data gives each probe, as its trials are predicted
    train_token_lengths = splits.train.length_span
    fit = budget_fit(
        _budget_query(settings, space, spec, model_config, train_token_lengths, replayed),
        settings.sizing_progress,
    )
    longest = train_token_lengths[1] if train_token_lengths else settings.seq_len
    if not fit.choices.get("method"):
        _refuse_budget(
            fit.smallest_peak_bytes,
            fit.smallest_peak_model,
            settings,
            space,
            f"on this data (its longest training example {longest} tokens)",
        )
    # non-padding tokens of one epoch, as probes count tokens/s: the report's epoch time
    data_stats["train_tokens"] = splits.train.tokens
    study_name = settings.study_name or default_study_name(
        settings.model, settings.data_path, settings.budget_bytes
    )
    storage = settings.storage or DEFAULT_STORAGE
    freeze_layout = architecture.freeze_layout if architecture else None
    return PreparedRun(
        settings,
        spec,
        space,
        device,
        study_name,
        storage,
        fit.smallest_peak_bytes,
        fitting_choices=fit.choices,
        ruled_out_choices=fit.ruled_out,
        smallest_peak_model=fit.smallest_peak_model,
        ruled_out_models=fit.ruled_out_models,
        replayed=replayed,
        skipped_rows=len(data_scan.bad),
        data_stats=data_stats,
        token_cache=str(token_cache.resolve()),
        model_config=model_config,
        unsupported_choices=unsupported,
        pad_token_id=tokenizer.pad_token_id,
        train_token_lengths=train_token_lengths,
        freeze_layout=freeze_layout.to_dict() if freeze_layout else None,
    )


def _budget_query(
    settings: RunSettings,
    space: SearchSpace,
    spec: ModelSpec,
    model_config: Any,
    token_lengths: tuple[int, int] | None,
    replayed: dict[str, tuple[MemoryEstimate, str]],
) -> BudgetQuery:
    """Which recipes of `space` fit the run's budget on the rows of `token_lengths`, held to it
    as its trials are (a replay, the formula where it cannot run; each replay kept in
    `replayed`)."""
    return BudgetQuery(
        space,
        settings.model,
        spec,
        settings.seq_len,
        settings.budget_bytes,
        settings.memory_margin,
        token_lengths,
        held_predictor(spec, model_config, settings, token_lengths, replayed),
    )


def _refuse_budget(
    smallest: int, memory_model: str, settings: RunSettings, space: SearchSpace, rows: str
) -> None:
    """Refuse the budget, below `smallest`: the peak `memory_model` predicts, on the rows `rows`
    says, of the recipe of the space the formula puts least, in a line."""
    recipe = smallest_recipe_words(memory_model, f"in {space.source}")
    raise UsageError(
        f"budget {format_bytes(settings.budget_bytes)} is below the "
        f"{format_bytes(smallest)} ({smallest / 1e9:.2f} GB) that {recipe} needs at seq_len "
        f"{settings.seq_len} {rows}, by the {memory_model} with its margin; raise --budget or "
        "shorten --seq-len (or set --memory-margin)"
    )
