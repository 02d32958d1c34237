"""The Optuna study: storage, sampler, objective, constraints and resume.

Each trial samples a recipe, predicts its memory, skips it as infeasible when the prediction
exceeds the budget, and otherwise probes it in a child process. Every outcome is recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import queue
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.architecture import Architecture, read_architecture
from autotune.data import (
    cached_splits,
    check_enough_rows,
    checked_scan,
    length_stats,
    usable_rows,
)
from autotune.errors import UsageError
from autotune.memory import MemoryEstimate, estimate
from autotune.model_spec import ModelSpec, load_model_spec
from autotune.offgpu import run_off_gpu
from autotune.pareto import PICK_POLICIES, Point, frontier, pick
from autotune.probe import ProbeRunner
from autotune.recipe import UPPER_BOUNDS, Recipe
from autotune.replay import (
    check_memory_model,
    load_config,
    predict,
    replay_in_worker,
    replay_key,
)
from autotune.space import SHARED_DIMENSIONS, SearchSpace
from autotune.training.io import ProbeRequest, ProbeResult
from autotune.units import format_bytes

OBJECTIVE_NAMES = ("peak_memory_bytes", "tokens_per_second", "eval_loss")
DIRECTIONS = ("minimize", "maximize", "minimize")
CONSTRAINT_KEY = "memory_over_budget"
SPACE_CHOICES_ATTR = "space_choices"
"""Study attribute: the choices of each dimension the study searches (the space file's, less
those the memory model rules out under the budget)."""
TRIALS_DIR = Path("trials")
HEARTBEAT_SECONDS = 10
"""How often a running trial tells the storage it is alive (RDB storages)."""
STALE_AFTER_SECONDS = 40
"""A running trial silent this long belongs to a dead worker: it is failed and retried once."""
DEFAULT_STORAGE = f"sqlite:///{TRIALS_DIR}/autotune.db"
LENGTH_STATS_ROWS = 2000
"""Rows the report's token-length distribution and truncation figures are taken over."""
ARTIFACTS_DIR = TRIALS_DIR / "artifacts"
"""Each trial's recipe YAML and probe log, as Optuna artifacts optuna-dashboard shows."""

# What the study reports for a recipe it did not measure: zero speed and the eval loss of a
# uniform guess over the vocabulary, ln(V). Finite, so samplers learn from these trials.
UNMEASURED_TOKENS_PER_SECOND = 0.0

# Known-good starting points, tried first so the frontier is not empty by morning. Each value
# is a preference; where the space lacks it, the nearest choice the space has is used.
BASELINES: dict[str, dict[str, Any]] = {
    "qlora_default": {
        "method": "lora",
        "quantization": "nf4",
        "lora_r": 16,
        "lora_target_modules": "all-linear",
        "precision": "bf16",
        "micro_batch_size": "smallest",
        "gradient_checkpointing": True,
        "optimizer": "adamw",
        "expandable_segments": False,
        "attention": "sdpa",
        "batching": "padded",
    },
    "full_8bit_adam": {
        "method": "full",
        "precision": "bf16",
        "micro_batch_size": "smallest",
        "gradient_checkpointing": True,
        "optimizer": "adamw_8bit",
        "expandable_segments": True,
        "attention": "sdpa",
        "batching": "padded",
    },
    "bf16_lora_qv": {
        "method": "lora",
        "quantization": "none",
        "lora_r": 16,
        "lora_target_modules": "qv",
        "precision": "bf16",
        "micro_batch_size": "largest",
        "gradient_checkpointing": True,
        "optimizer": "adamw",
        "expandable_segments": True,
        "attention": "sdpa",
        "batching": "padded",
    },
}


@dataclass(frozen=True)
class RunSettings:
    model: str
    data_path: Path
    budget_bytes: int
    space_path: Path | None = None
    trials: int = 20
    timeout_seconds: float | None = None
    study_name: str | None = None
    storage: str | None = None
    probe_steps: int = 20
    probe_timeout_seconds: float = 900.0
    seq_len: int = 1024
    device: str = "auto"
    seed: int = 0
    confirm_top: int = 3
    """Frontier recipes re-probed after the search, twice as long and with another seed."""
    workers: int = 1
    """Probes run at once on this machine (one thread each, each probe its own process)."""
    skip_bad_rows: bool = False
    """Go on without malformed data rows instead of stopping before any probe."""
    eval_rows: int | None = None
    """Rows held out for eval loss (default: a tenth of the data, at most 64)."""
    gpus: tuple[str, ...] = ()
    """CUDA device indices; each probe gets one of them as its only visible GPU."""
    tokenize_progress: Callable[[int, int], None] | None = None
    """Called with (rows done, rows) while the data is tokenized into the cache."""
    weight_cache: bool = False
    """QLoRA probes load the base from an NF4 copy the first one writes to trials/cache."""
    memory_model: str = "replay"
    """How each trial's peak is predicted before its probe: replay (autotune.replay) or formula
    (autotune.memory). The search space is pruned with the formula either way (it is instant)."""


REPLAY_BAND = 1.25
"""Trials the formula puts above this many budgets are over the budget whatever the replay says
(the formula's largest miss on the H100 rows is under 20%), so they are not replayed."""


@dataclass(frozen=True)
class TrialSummary:
    number: int
    label: str
    status: str
    predicted_peak_bytes: int
    peak_memory_bytes: float | None = None
    memory_source: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    """Where the probe's time went: start, device_init, data, load, warmup, steps, eval, total."""
    tokens_per_second: float | None = None
    eval_loss: float | None = None
    reason: str = ""
    repair_of: int | None = None
    """The trial over the budget this one stands in for, as the nearest recipe that fits."""


@dataclass
class RunEvents:
    """Hooks the CLI uses to show progress; the study itself prints nothing."""

    trial_started: Callable[[int, str], None] = lambda number, label: None
    trial_finished: Callable[[TrialSummary], None] = lambda summary: None
    confirmed: Callable[[int, dict[str, Any]], None] = lambda number, confirmation: None
    noise_measured: Callable[[dict[str, Any]], None] = lambda noise: None
    notes: list[str] = field(default_factory=list)


class ProbeCrashed(Exception):
    """A probe failed for a reason that says nothing about the recipe; recorded as FAIL."""


SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "key")
"""Query parameters of a storage URL that are masked like its password (any key containing one)."""
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>.*)@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&][^=&#]*(?:" + "|".join(SECRET_QUERY_KEYS) + r")[^=&#]*=)(?P<value>[^&#]*)",
    re.IGNORECASE,
)


def _url_secrets(url: str) -> list[str]:
    """The password (as written and decoded) and the secret query values of a storage URL."""
    from urllib.parse import unquote

    secrets = []
    match = _USERINFO.match(url)
    if match and ":" in match["userinfo"]:
        secrets.append(match["userinfo"].split(":", 1)[1])
    secrets += [m["value"] for m in _QUERY_SECRET.finditer(url)]
    secrets += [unquote(s) for s in secrets]
    return sorted({s for s in secrets if s}, key=len, reverse=True)


def redact_url(url: str) -> str:
    """A storage URL with its password and secret query parameters replaced by ***, safe for
    output, logs and reports. The user part ends at the *last* '@': a password holding an
    unescaped '@' is masked whole (SQLAlchemy's parser would end it at the first '@' and print
    the rest as the host), and an empty user keeps its password masked too."""
    match = _USERINFO.match(url)
    if match and ":" in match["userinfo"]:
        user = match["userinfo"].split(":", 1)[0]
        url = f"{match['scheme']}{user}:***@" + url[match.end() :]
    return _QUERY_SECRET.sub(lambda m: m["key"] + "***", url)


def without_secrets(text: str, url: str) -> str:
    """`text` (a driver's error, say) with every secret of the storage URL `url` masked."""
    for secret in _url_secrets(url):
        text = text.replace(secret, "***")
    return text


def default_study_name(model: str, data_path: Path, budget_bytes: int) -> str:
    model_name = Path(model).name if Path(model).exists() else model.replace("/", "--")
    return f"{model_name}-{Path(data_path).stem}-{budget_bytes / 1e9:g}GB"


STUDY_FILE_NAME_CHARS = 80
"""At most this many characters of a study's name go into its file names (then a hash)."""


def study_file_name(study_name: str) -> str:
    """The name of a study's trial folder, report and recipe: the study name with letters,
    digits, '.', '_' and '-' kept and every other run of characters one '-', so no name (from
    --study, or from a storage someone else writes) reaches outside trials/ or reports/; a
    name that changed or ran long gets a hash of the whole, so two studies never share files."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", study_name).strip("-.")
    if not slug:
        raise UsageError(
            f"study name {study_name!r} has no letter or digit to name its files by; "
            "choose another with --study"
        )
    if slug != study_name or len(slug) > STUDY_FILE_NAME_CHARS:
        digest = hashlib.sha256(study_name.encode("utf-8")).hexdigest()[:8]
        slug = f"{slug[:STUDY_FILE_NAME_CHARS].rstrip('-.')}-{digest}"
    return slug


def trials_dir_of(prepared: PreparedRun) -> Path:
    """Where a study's probes keep their files: trials/<the study's file name>/."""
    return TRIALS_DIR / study_file_name(prepared.study_name)


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"device {device!r} is not one of auto, cuda, cpu")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda" if device == "auto" else device
    if device == "auto":
        return "cpu"
    raise UsageError(f"device {device} was asked for but torch sees no CUDA GPU here")


def check_workers(settings: RunSettings, device: str) -> None:
    if settings.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {settings.workers}")
    if not settings.gpus:
        return
    if not device.startswith("cuda"):
        raise UsageError(f"--gpus {','.join(settings.gpus)} needs CUDA, but the device is {device}")
    import torch

    count = torch.cuda.device_count()
    missing = [g for g in settings.gpus if not (g.isdigit() and int(g) < count)]
    if missing:
        raise UsageError(
            f"--gpus names {', '.join(missing)}, but this machine has GPUs 0-{count - 1}"
            if count
            else f"--gpus names {', '.join(missing)}, but this machine has no GPU"
        )
    if len(set(settings.gpus)) != len(settings.gpus):
        raise UsageError(f"--gpus lists a GPU twice: {','.join(settings.gpus)}")


@dataclass(frozen=True)
class PreparedRun:
    settings: RunSettings
    spec: ModelSpec
    space: SearchSpace
    device: str
    study_name: str
    storage: str
    smallest_peak_bytes: int
    fitting_choices: dict[str, list[Any]] = field(default_factory=dict)
    """Each dimension's choices that some recipe predicted to fit the budget uses."""
    ruled_out_choices: dict[str, dict[str, int]] = field(default_factory=dict)
    """Dimension -> choice -> the smallest predicted peak of a recipe with it (over budget)."""
    skipped_rows: int = 0
    token_cache: str | None = None
    data_stats: dict[str, Any] = field(default_factory=dict)
    """Rows, skipped rows, token lengths and truncation of the data (first 2000 rows)."""
    model_config: Any = None
    """The model's transformers config, for the replay memory model."""
    unsupported_choices: dict[str, dict[str, str]] = field(default_factory=dict)
    """Dimension -> choice of the space file -> why the model cannot run it (not searched)."""


@dataclass(frozen=True)
class BudgetFit:
    """What the memory model says of a whole space under a budget, before any trial."""

    smallest_peak_bytes: int
    choices: dict[str, list[Any]]
    """Each dimension's choices that at least one recipe predicted to fit uses."""
    ruled_out: dict[str, dict[str, int]]
    """Dimension -> choice no fitting recipe uses -> the smallest peak predicted with it."""


def describe_ruled_out(ruled_out: dict[str, dict[str, int]]) -> str:
    """'method full (31.95 GiB at least), micro_batch_size 8 (32.88 GiB at least), ...'"""
    return describe_unsupported(
        {
            name: {choice: f"{format_bytes(peak)} at least" for choice, peak in peaks.items()}
            for name, peaks in ruled_out.items()
        }
    )


def supported_space(
    space: SearchSpace, architecture: Architecture | None, device: str | None = None
) -> tuple[SearchSpace, dict[str, dict[str, str]]]:
    """The space without the LoRA target sets, quantizations (on `device`) and attention
    implementations the model cannot run, and why each left out; where none of a dimension's
    choices runs, what usually does (all-linear, eager, no quantization) takes their place,
    so a space written for the Llama family still searches Gemma 2 or GPT-NeoX; where no LoRA
    runs at all (peft refuses dropout on the stacked expert weights of a mixture of experts),
    the other methods are searched."""
    if architecture is None:
        return space, {}
    unsupported: dict[str, dict[str, str]] = {}
    if "lora" in space.method:
        for name, targets in space.lora_target_modules.items():
            refusal = architecture.lora_refusal(targets, space.lora_dropout)
            if refusal:
                unsupported.setdefault("lora_target_modules", {})[name] = refusal
    for choice in space.attention:
        refusal = architecture.attention_refusals.get(choice)
        if refusal:
            unsupported.setdefault("attention", {})[choice] = refusal
    if "lora" in space.method:
        for choice in space.quantization:
            refusal = architecture.quantization_refusal(choice, device)
            if refusal:
                unsupported.setdefault("quantization", {})[choice] = refusal
    if not unsupported:
        return space, {}
    refused = unsupported.get("lora_target_modules", {})
    targets = {n: t for n, t in space.lora_target_modules.items() if n not in refused}
    if not targets and not architecture.lora_refusal("all-linear", space.lora_dropout):
        targets = {"all-linear": "all-linear"}
    quantization = tuple(
        c for c in space.quantization if c not in unsupported.get("quantization", {})
    )
    changes: dict[str, Any] = {
        "lora_target_modules": targets,
        "quantization": quantization or ("none",),
    }
    if not targets:
        # no LoRA at all on this model with this space: search the other methods
        changes["method"] = tuple(m for m in space.method if m != "lora")
        changes["quantization"] = ("none",)
        changes["lora_target_modules"] = space.lora_target_modules
        unsupported["method"] = {"lora": f"no LoRA target set runs on {architecture.name}"}
        for choice in space.quantization:
            if choice != "none":
                unsupported.setdefault("quantization", {}).setdefault(choice, "trains LoRA only")
        if not changes["method"]:
            raise UsageError(
                f"{space.source}: no LoRA target set runs on {architecture.name} ("
                + describe_unsupported({"lora_target_modules": refused})
                + ") and the space has no other method"
            )
    attention = tuple(c for c in space.attention if c not in unsupported.get("attention", {}))
    changes["attention"] = attention or ("eager",)
    return dataclasses.replace(space, **changes), unsupported


def resumed_space(prepared: PreparedRun, stored: dict[str, list[Any]]) -> tuple[SearchSpace, str]:
    """The space of a study being resumed: the choices it started with. Optuna samples each
    dimension from one fixed set of choices for the life of a study, so a choice the study
    holds that this run does not search (the space file changed, or the model cannot run it)
    is refused in one line before any trial; a choice this run would add is left out, and the
    returned note says so."""
    space = prepared.space
    current = space.choices()
    dropped = {
        name: [c for c in kept if c not in current.get(name, [])]
        for name, kept in stored.items()
        if name in current
    }
    dropped = {name: choices for name, choices in dropped.items() if choices}
    if dropped:
        reasons = []
        for name, choices in dropped.items():
            for choice in choices:
                why = prepared.unsupported_choices.get(name, {}).get(str(choice))
                reasons.append(f"{name} {choice} ({why or f'not in {space.source}'})")
        raise UsageError(
            f"study {prepared.study_name} was started with choices this run does not search: "
            + ", ".join(reasons)
            + "; resume it with the space it started with, or start a new study with --study"
        )
    added = {
        name: [c for c in fitting if c not in stored.get(name, [])]
        for name, fitting in prepared.fitting_choices.items()
    }
    added = {name: choices for name, choices in added.items() if choices}
    note = ""
    if added:
        note = (
            f"study {prepared.study_name} keeps the choices it started with; not searched: "
            + ", ".join(f"{name} {', '.join(map(str, choices))}" for name, choices in added.items())
            + " (start a new study with --study to search them)"
        )
    return space.restricted(stored), note


def describe_unsupported(unsupported: dict[str, dict[str, str]]) -> str:
    """'lora_target_modules qv (GPTNeoXForCausalLM has no q_proj, v_proj), ...'"""
    return ", ".join(
        f"{name} {choice} ({why})"
        for name, reasons in unsupported.items()
        for choice, why in reasons.items()
    )


def not_searched(
    unsupported: dict[str, dict[str, str]], ruled_out: dict[str, dict[str, int]]
) -> list[str]:
    """What a study leaves out of its space file and why, a line per reason (CLI and report)."""
    lines = []
    if unsupported:
        lines.append(
            "not searched, the model cannot run them: " + describe_unsupported(unsupported)
        )
    if ruled_out:
        lines.append(
            "not searched, no recipe with them fits the budget (predicted): "
            + describe_ruled_out(ruled_out)
        )
    return lines


def budget_fit(
    space: SearchSpace, model: str, spec: ModelSpec, seq_len: int, budget_bytes: int
) -> BudgetFit:
    """Predict every point of the space (milliseconds each): a choice that only recipes over
    the budget use would only ever be ruled out, so the search need not spend trials on it."""
    smallest: dict[str, dict[Any, int]] = {}
    for params in space.all_params():
        peak = estimate(spec, space.build(params, model, spec, seq_len)).peak_bytes
        for name, value in params.items():
            seen = smallest.setdefault(name, {})
            seen[value] = min(seen.get(value, peak), peak)
    fitting: dict[str, list[Any]] = {}
    ruled_out: dict[str, dict[str, int]] = {}
    for name, choices in space.choices().items():
        peaks = smallest.get(name, {})
        fitting[name] = [c for c in choices if peaks.get(c, budget_bytes + 1) <= budget_bytes]
        over = {str(c): peaks[c] for c in choices if c in peaks and peaks[c] > budget_bytes}
        if over:
            ruled_out[name] = over
    return BudgetFit(min(smallest["method"].values()), fitting, ruled_out)


def tokenizer_for(model: str) -> Any:
    """The model's tokenizer (UsageError in one line where it cannot be loaded)."""
    from autotune.training.build import load_tokenizer

    return load_tokenizer(model)


def prepare_run(settings: RunSettings) -> PreparedRun:
    """Check every input before anything runs; bad input raises UsageError."""
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
    if settings.study_name is not None:
        study_file_name(settings.study_name)  # refuses a name no file can be named by
    check_memory_model(settings.memory_model)
    spec = load_model_spec(settings.model)
    try:
        model_config = load_config(settings.model)
    except UsageError:
        if settings.memory_model == "replay":
            raise
        model_config = None  # the formula reads config.json itself; the probes will judge
    device = resolve_device(settings.device)
    # peft's checks import bitsandbytes, which gives a process a CUDA context where there is a
    # GPU: off this process then, so the probes keep the memory; on a CPU here, in it
    run = None if device == "cpu" else run_off_gpu
    architecture = read_architecture(model_config, run) if model_config is not None else None
    space, unsupported = supported_space(
        SearchSpace.load(settings.space_path), architecture, device
    )
    if "lora" in space.method and max(space.lora_r) > spec.hidden_size:
        raise UsageError(
            f"{space.source}: lora_r {max(space.lora_r)} exceeds the model's width "
            f"{spec.hidden_size}; a rank is at most the width of the layers it adapts"
        )
    data_scan = checked_scan(settings.data_path, settings.skip_bad_rows)
    check_enough_rows(data_scan.usable_rows, space.effective_batch_size, settings.eval_rows)
    fit = budget_fit(space, settings.model, spec, settings.seq_len, settings.budget_bytes)
    smallest = fit.smallest_peak_bytes
    if smallest > settings.budget_bytes:
        raise UsageError(
            f"budget {format_bytes(settings.budget_bytes)} is below the "
            f"{format_bytes(smallest)} ({smallest / 1e9:.2f} GB) that the smallest recipe in "
            f"{space.source} needs at seq_len {settings.seq_len}; "
            "raise --budget or shorten --seq-len"
        )
    # Recipes and probe requests name local paths absolutely so they work from anywhere.
    settings = dataclasses.replace(settings, data_path=Path(settings.data_path).resolve())
    if Path(settings.model).expanduser().exists():
        settings = dataclasses.replace(
            settings, model=str(Path(settings.model).expanduser().resolve())
        )
    tokenizer = tokenizer_for(settings.model)
    data_stats = {
        "rows": data_scan.usable_rows,
        "skipped_rows": len(data_scan.bad),
        **length_stats(
            itertools.islice(usable_rows(settings.data_path), LENGTH_STATS_ROWS),
            tokenizer,
            settings.seq_len,
        ),
    }
    make_trials_dir()
    # Tokenize once for every probe and worker of this study (and later studies on the data);
    # this also refuses data that truncation at seq_len leaves without an answer token.
    _, token_cache = cached_splits(
        settings.data_path,
        tokenizer,
        settings.seq_len,
        settings.seed,
        TRIALS_DIR / "cache",
        settings.eval_rows,
        row_count=data_scan.usable_rows,
        progress=settings.tokenize_progress,
    )
    check_workers(settings, device)
    study_name = settings.study_name or default_study_name(
        settings.model, settings.data_path, settings.budget_bytes
    )
    storage = settings.storage or DEFAULT_STORAGE
    return PreparedRun(
        settings,
        spec,
        space,
        device,
        study_name,
        storage,
        smallest,
        fitting_choices=fit.choices,
        ruled_out_choices=fit.ruled_out,
        skipped_rows=len(data_scan.bad),
        data_stats=data_stats,
        token_cache=str(token_cache.resolve()),
        model_config=model_config,
        unsupported_choices=unsupported,
    )


class _ReportedCrashes(logging.Filter):
    """Drops Optuna's warnings for a trial whose probe crashed: the run already printed the
    trial and the probe's own error, and the traceback Optuna adds is of the objective raising
    ProbeCrashed, which says nothing more. A failure of anything else keeps its traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.crashed: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        trial = message.split(" failed with ", 1)[0]
        if isinstance(error, ProbeCrashed):
            self.crashed.add(trial)
            return False
        return not (" failed with value " in message and trial in self.crashed)


def _quiet_optuna() -> None:
    """Optuna marks heartbeats, group sampling and metric names experimental; users need not
    see that on every run, nor a second report of a crashed probe."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optimize_logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _ReportedCrashes) for f in optimize_logger.filters):
        optimize_logger.addFilter(_ReportedCrashes())


def make_trials_dir() -> None:
    """trials/, readable by its owner only where this run creates it: it holds the token
    cache (the training data), probe logs and the study database."""
    TRIALS_DIR.mkdir(mode=0o700, exist_ok=True)


def make_storage(url: str) -> Any:
    _quiet_optuna()
    if url == DEFAULT_STORAGE:
        make_trials_dir()
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        try:
            return _open_storage(url)
        except Exception as error:  # noqa: BLE001 - driver errors vary; all mean "cannot open"
            # Two workers creating a new database at once race on its tables; the loser retries.
            if "already exists" in str(error) and attempt < 2:
                time.sleep(0.5 + attempt)
                continue
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UsageError(
                f"cannot open storage {redact_url(url)}: {without_secrets(first[:200], url)}"
            ) from None
    raise AssertionError("unreachable")


def _open_storage(url: str) -> Any:
    import optuna

    if not url.startswith(("sqlite", "postgresql", "mysql")):
        return optuna.storages.get_storage(url)
    sqlite = url.startswith("sqlite")
    # SQLite serialises writers; a long lock timeout lets a few local workers share it.
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {}
    storage = optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=STALE_AFTER_SECONDS,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=1
        ),
    )
    if sqlite:
        _serialise_sqlite_transactions(storage.engine)
    return storage


def _serialise_sqlite_transactions(engine: Any) -> None:
    """Make every SQLite transaction take the write lock when it begins (BEGIN IMMEDIATE).

    Optuna reads a trial's state and then writes it (e.g. WAITING -> RUNNING when a worker
    takes an enqueued trial). SQLite ignores SELECT ... FOR UPDATE, so two workers could both
    read WAITING and both run the trial; an immediate transaction closes that gap.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


def open_study(storage_url: str, study_name: str, seed: int = 0) -> Any:
    """Create the study or load it to resume; refuse one that has other objectives."""
    import optuna

    storage = make_storage(storage_url)
    sampler = optuna.samplers.TPESampler(
        multivariate=True, group=True, constant_liar=True, seed=seed, n_startup_trials=5
    )
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            directions=list(DIRECTIONS),
            sampler=sampler,
            load_if_exists=True,
        )
    except ValueError as error:
        raise UsageError(f"study {study_name!r}: {error}") from None
    directions = [d.name.lower() for d in study.directions]
    if directions != list(DIRECTIONS) or (
        study.metric_names and list(study.metric_names) != list(OBJECTIVE_NAMES)
    ):
        raise UsageError(
            f"study {study_name!r} exists in {redact_url(storage_url)} with other objectives "
            f"({', '.join(study.metric_names or directions)}); choose another --study name"
        )
    study.set_metric_names(list(OBJECTIVE_NAMES))
    return study


def existing_storage_url(storage_url: str | None) -> str:
    """The storage to read: the given URL, or the default one if a run has created it."""
    url = storage_url or DEFAULT_STORAGE
    # a command that only reads must not create an empty SQLite database where none was
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise UsageError(
            f"no study storage at {url}; run `autotune run` first or pass --storage"
            if url == DEFAULT_STORAGE
            else f"no SQLite database at {url.removeprefix('sqlite:///')}; check --storage"
        )
    return url


def load_existing_study(storage_url: str | None, study_name: str | None) -> Any:
    """A study to export or report on; without a name, the storage's only (or newest) study."""
    import optuna

    url = existing_storage_url(storage_url)
    storage = make_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if study_name is None:
        if not names:
            raise UsageError(f"storage {redact_url(url)} holds no study yet")
        study_name = names[-1]
    elif study_name not in names:
        raise UsageError(
            f"no study {study_name!r} in {redact_url(url)}; it holds: {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=study_name, storage=storage)


def fits_budget(prepared: PreparedRun) -> Callable[[dict[str, Any]], bool]:
    """Whether the recipe a set of trial parameters stands for is predicted to fit the budget."""
    settings = prepared.settings

    def fits(params: dict[str, Any]) -> bool:
        recipe = prepared.space.build(params, settings.model, prepared.spec, settings.seq_len)
        return estimate(prepared.spec, recipe).peak_bytes <= settings.budget_bytes

    return fits


def trial_predictor(prepared: PreparedRun) -> Callable[[Recipe], tuple[MemoryEstimate, str]]:
    """Each trial's predicted peak and the model that gave it: the replay (in a worker process
    that sees no GPU, once per recipe as memory sees it) where the formula puts the recipe
    within REPLAY_BAND of the budget, the formula elsewhere and where the replay cannot run."""
    settings = prepared.settings
    predicted: dict[str, tuple[MemoryEstimate, str]] = {}

    def predict_trial(recipe: Recipe) -> tuple[MemoryEstimate, str]:
        formula = estimate(prepared.spec, recipe)
        if (
            settings.memory_model != "replay"
            or prepared.model_config is None
            or formula.peak_bytes > REPLAY_BAND * settings.budget_bytes
        ):
            return formula, "formula"
        key = replay_key(recipe)
        if key not in predicted:
            result, used, _ = predict(
                prepared.spec, recipe, prepared.model_config, run=replay_in_worker
            )
            predicted[key] = (result, used)
        return predicted[key]

    return predict_trial


REPAIR_DIMENSIONS = ("gradient_checkpointing", "micro_batch_size", "optimizer")
"""What a recipe over the budget may change to fit: they change speed, not what is learnt."""


def nearest_fitting_params(
    space: SearchSpace, params: dict[str, Any], fits: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """The recipe closest to `params` that fits: fewest of REPAIR_DIMENSIONS changed, then the
    largest micro-batch, then the order the space lists choices in; None when none fits."""
    candidates = []
    for checkpointing in space.gradient_checkpointing:
        for micro_batch in space.micro_batch_size:
            for optimizer in space.optimizer:
                changed = {
                    "gradient_checkpointing": checkpointing,
                    "micro_batch_size": micro_batch,
                    "optimizer": optimizer,
                }
                distance = sum(changed[k] != params.get(k) for k in REPAIR_DIMENSIONS)
                if distance:
                    candidates.append((distance, -micro_batch, {**params, **changed}))
    for _, _, candidate in sorted(candidates, key=lambda c: c[:2]):
        if fits(candidate):
            return candidate
    return None


def baseline_params(
    space: SearchSpace, fits: Callable[[dict[str, Any]], bool] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """BASELINES, each moved to the nearest point the space can express (duplicates dropped);
    with `fits`, a "largest" micro-batch is the largest that fits the budget."""
    chosen: list[tuple[str, dict[str, Any]]] = []
    for baseline_name, preferences in BASELINES.items():
        if preferences["method"] not in space.method:
            continue
        method = preferences["method"]
        params: dict[str, Any] = {"method": method}
        names = list(SHARED_DIMENSIONS)
        if method == "lora":
            names = ["quantization", "lora_r", "lora_target_modules"] + names
        elif method == "freeze":
            params["frozen_layers_fraction"] = space.frozen_layers_fraction[0]
        for name in names:
            choices = (
                tuple(space.lora_target_modules)
                if name == "lora_target_modules"
                else getattr(space, name)
            )
            wanted = preferences[name]
            if wanted == "smallest":
                params[name] = min(choices)
            elif wanted == "largest":
                params[name] = max(choices)
            elif wanted in choices:
                params[name] = wanted
            elif all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
                params[name] = min(choices, key=lambda c: abs(c - wanted))
            else:
                params[name] = choices[0]
        if fits and preferences["micro_batch_size"] == "largest":
            for size in sorted(space.micro_batch_size, reverse=True):
                if fits({**params, "micro_batch_size": size}):
                    params["micro_batch_size"] = size
                    break
        if all(params != other for _, other in chosen):
            chosen.append((baseline_name, params))
    return chosen


def loss_when_unmeasured(spec: ModelSpec) -> float:
    return math.log(spec.vocab_size)


def _record_constraint(trial: Any, value: float) -> None:
    trial.set_constraint(CONSTRAINT_KEY, value)
    # optuna-dashboard 0.21 reads the list under the pre-5.0 system attribute.
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [value])


def artifact_store() -> Any:
    import optuna

    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return optuna.artifacts.FileSystemArtifactStore(base_path=str(ARTIFACTS_DIR))


def _attach_artifacts(trial: Any, recipe: Recipe, workdir: Path) -> None:
    """The trial's recipe and, where a probe ran, its log, for the dashboard's artifact view."""
    import optuna

    workdir.mkdir(parents=True, exist_ok=True)
    recipe_path = workdir / "recipe.yaml"
    recipe_path.write_text(recipe.to_yaml(), encoding="utf-8")
    store = artifact_store()
    for path in (recipe_path, workdir / "probe.log"):
        if path.exists():
            optuna.artifacts.upload_artifact(
                artifact_store=store,
                file_path=str(path),
                study_or_trial=trial,
                mimetype="text/plain",
            )


def make_objective(prepared: PreparedRun, runner: ProbeRunner, events: RunEvents) -> Callable:
    settings, spec, space = prepared.settings, prepared.spec, prepared.space
    budget = settings.budget_bytes
    unmeasured_loss = loss_when_unmeasured(spec)
    trials_dir = trials_dir_of(prepared)
    gpu_pool: queue.Queue[str] | None = None
    if settings.gpus:
        gpu_pool = queue.Queue()
        for gpu in settings.gpus:
            gpu_pool.put(gpu)

    fits = fits_budget(prepared)
    predict_trial = trial_predictor(prepared)

    def objective(trial: Any) -> tuple[float, float, float]:
        trial.set_user_attr("worker", worker_id())
        if beyond_target(trial.study, trial.number, settings.trials):
            # Another run on this study took the last slot first: give this one up uncounted.
            import optuna

            trial.set_user_attr(SURPLUS_ATTR, True)
            trial.study.stop()
            raise optuna.TrialPruned("the study reached its target of trials")
        recipe = space.suggest(trial, settings.model, spec, settings.seq_len)
        prediction, memory_model = predict_trial(recipe)
        workdir = trials_dir / f"trial-{trial.number:04d}"

        def record(
            status: str,
            reason: str,
            values: tuple[float, ...] | None = None,
            result: ProbeResult | None = None,
        ) -> None:
            """Status and reason on the trial, its artifacts, and the event the CLI shows."""
            trial.set_user_attr("status", status)
            trial.set_user_attr("reason", reason)
            _attach_artifacts(trial, recipe, workdir)
            measured = status == "measured" and values is not None
            events.trial_finished(
                TrialSummary(
                    number=trial.number,
                    label=recipe.label(),
                    status=status,
                    predicted_peak_bytes=prediction.peak_bytes,
                    peak_memory_bytes=result.peak_memory_bytes if result else None,
                    memory_source=result.memory_source if result else "",
                    seconds=dict(result.seconds) if result else {},
                    tokens_per_second=values[1] if measured else None,
                    eval_loss=values[2] if measured else None,
                    reason=reason,
                    repair_of=trial.user_attrs.get("repair_of"),
                )
            )

        earlier = _earlier_trial_with_params(trial)
        if earlier is not None:
            # The sampler proposed a recipe already tried: reuse its figures instead of paying
            # for another probe, and keep it off the frontier so no recipe shows twice.
            for key, value in earlier.user_attrs.items():
                if key not in ("baseline", "worker", "repair_of"):
                    trial.set_user_attr(key, value)
            _record_constraint(trial, max(earlier.constraints.values(), default=0.0))
            record("duplicate", f"same recipe as trial {earlier.number}")
            return tuple(earlier.values)
        trial.set_user_attr("recipe", recipe.to_dict())
        trial.set_user_attr("recipe_label", recipe.label())
        trial.set_user_attr("predicted_peak_bytes", prediction.peak_bytes)
        trial.set_user_attr("predicted_breakdown", prediction.breakdown)
        trial.set_user_attr("memory_model", memory_model)
        events.trial_started(trial.number, recipe.label())

        def finish(
            status: str,
            values: tuple[float, float, float],
            constraint: float,
            reason: str = "",
            result: ProbeResult | None = None,
        ) -> tuple[float, float, float]:
            _record_constraint(trial, constraint)
            record(status, reason, values, result)
            return values

        if prediction.peak_bytes > budget:
            nearest = nearest_fitting_params(space, trial.params, fits)
            if nearest is not None and "repair_of" not in trial.user_attrs:
                # Probe the closest recipe that fits next: the sampler asked for this region.
                trial.study.enqueue_trial(
                    nearest, user_attrs={"repair_of": trial.number}, skip_if_exists=True
                )
            return finish(
                "over_budget_predicted",
                (float(prediction.peak_bytes), UNMEASURED_TOKENS_PER_SECOND, unmeasured_loss),
                (prediction.peak_bytes - budget) / budget,
                f"predicted {format_bytes(prediction.peak_bytes)} > budget {format_bytes(budget)}",
            )

        gpu = gpu_pool.get() if gpu_pool else None
        try:
            request = probe_request(prepared, recipe, settings.probe_steps, settings.seed, gpu)
            trial.set_user_attr("probe_dir", str(workdir))
            if gpu is not None:
                trial.set_user_attr("gpu", gpu)
            result = runner.run(request, workdir)
        finally:
            if gpu_pool is not None and gpu is not None:
                gpu_pool.put(gpu)
        for key, value in result.user_attrs().items():
            trial.set_user_attr(key, value)

        if result.status == "ok":
            measured = float(result.peak_memory_bytes or 0)
            # On CUDA the measured peak is what the budget bounds; a CPU run's RSS is not GPU
            # memory, so there feasibility rests on the prediction.
            bound = measured if prepared.device.startswith("cuda") else prediction.peak_bytes
            return finish(
                "measured",
                (measured, float(result.tokens_per_second or 0.0), float(result.eval_loss or 0.0)),
                (bound - budget) / budget,
                result=result,
            )
        if result.status == "crash":
            record("crash", result.reason)
            raise ProbeCrashed(result.reason)
        # Out of memory, NaN loss and timeout are properties of the recipe: infeasible.
        memory = float(
            max(
                result.peak_memory_bytes or 0,
                prediction.peak_bytes,
                budget if result.status == "oom" else 0,
            )
        )
        return finish(
            result.status,
            (memory, UNMEASURED_TOKENS_PER_SECOND, unmeasured_loss),
            1.0,
            result.reason,
            result,
        )

    return objective


def _earlier_trial_with_params(trial: Any) -> Any | None:
    from optuna.trial import TrialState

    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.params == trial.params and other.number != trial.number:
            return other
    return None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_interrupted_trials(study: Any) -> list[int]:
    """Fail the RUNNING trials whose worker is gone, and enqueue each once more.

    A worker on this host that no longer exists (killed, rebooted) is known dead at once; trials
    of other hosts are left to the storage's heartbeat, which fails them once stale.
    """
    import copy

    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    storage = study._storage
    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
        dead = (worker_host == host and pid.isdigit() and not _process_alive(int(pid))) or (
            not worker and time.time() - started > STALE_AFTER_SECONDS
        )
        if not dead:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "status", "interrupted")
            storage.set_trial_user_attr(trial._trial_id, "reason", f"worker {worker or '?'} died")
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker finished or failed it meanwhile
        failed.append(trial.number)
        retry = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
        if retry is not None:
            retry(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return failed


SURPLUS_ATTR = "surplus"
"""Trial attribute: started by one run after others had already taken the study's last slot."""


def finished_trial_count(study: Any) -> int:
    """Finished trials, not counting a failed trial that was retried (its retry counts) or a
    surplus one (never run)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    finished = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    return sum(
        1
        for t in trials
        if t.state in finished and t.number not in retried and not t.user_attrs.get(SURPLUS_ATTR)
    )


def beyond_target(study: Any, number: int, target: int) -> bool:
    """Whether trial `number`, just started, would make the study hold more than `target`
    trials: the finished ones and those running that started before it already reach it. Of
    two runs that start the last trial at once, the later-numbered one yields."""
    from optuna.trial import TrialState

    ahead = sum(
        1
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.number < number
    )
    return finished_trial_count(study) + ahead >= target


CLAIM_PREFIX = "claim:"
CLAIM_SETTLE_SECONDS = 1.0
"""How long a claim is left before it is read back: longer than the gap between another
run's reading that nothing is claimed and its writing its own claim."""


def claim_once(study: Any, job: str, settle_seconds: float | None = None) -> bool:
    """Whether this process takes the one-time `job` of the study (a confirmation, the noise
    probe), claimed through the storage so that two runs on one study never both do it. A
    claim stands unless its run, on this host, is gone; the last writer of concurrent claims
    wins, and each reads the claim back after `settle_seconds`."""
    attr = CLAIM_PREFIX + job
    me = worker_id()
    holder = study.user_attrs.get(attr)
    if holder == me:
        return True
    if holder is not None:
        host, _, pid = str(holder).rpartition(":")
        if host != socket.gethostname() or not pid.isdigit() or _process_alive(int(pid)):
            return False
    study.set_user_attr(attr, me)
    time.sleep(CLAIM_SETTLE_SECONDS if settle_seconds is None else settle_seconds)
    return study.user_attrs.get(attr) == me


MEASURED_UNDER_ATTR = "measured_under"
"""Study attribute: the settings under which its trials were measured (see measured_under)."""


def measured_under(prepared: PreparedRun) -> dict[str, Any]:
    """What makes two trials' figures comparable on one frontier: the same data and tokenizer
    (the token cache's key, which also covers seq_len, the split seed and size), the same
    model shape, probe length, budget and kind of device."""
    spec = json.dumps(dataclasses.asdict(prepared.spec), sort_keys=True, default=str)
    return {
        "data": Path(prepared.token_cache).name if prepared.token_cache else None,
        "model": hashlib.sha256(spec.encode()).hexdigest()[:16],
        "seq_len": prepared.settings.seq_len,
        "probe_steps": prepared.settings.probe_steps,
        "budget_bytes": prepared.settings.budget_bytes,
        "device": prepared.device.split(":")[0],
    }


_MEASURED_UNDER_WORDS = {
    "data": "the data, its tokenizer or its split (seed, --eval-rows)",
    "model": "the model's shape",
    "seq_len": "--seq-len",
    "probe_steps": "--probe-steps",
    "budget_bytes": "--budget",
    "device": "the device",
}


def check_comparable(study: Any, prepared: PreparedRun) -> None:
    """Refuse to resume a study under settings that would put figures measured differently
    on one frontier; a study from before this record is checked on what it stored."""
    current = measured_under(prepared)
    stored = study.user_attrs.get(MEASURED_UNDER_ATTR) or {
        key: study.user_attrs[key]
        for key in ("seq_len", "probe_steps", "budget_bytes")
        if key in study.user_attrs
    }
    changed = [key for key in current if key in stored and stored[key] != current[key]]
    if not changed:
        return
    shown = []
    for key in changed:
        if key in ("data", "model"):
            shown.append(f"{_MEASURED_UNDER_WORDS[key]} changed")
        else:
            value = format_bytes(stored[key]) if key == "budget_bytes" else stored[key]
            now = format_bytes(current[key]) if key == "budget_bytes" else current[key]
            shown.append(f"{_MEASURED_UNDER_WORDS[key]} was {value}, now {now}")
    raise UsageError(
        f"study {prepared.study_name} was measured under other settings ({'; '.join(shown)}), "
        "so its trials and this run's would not be comparable; run with its settings, or "
        "start a new study with --study NAME"
    )


def run_study(prepared: PreparedRun, runner: ProbeRunner, events: RunEvents | None = None) -> Any:
    """Run (or resume) the study until it holds `trials` finished trials or time runs out."""
    events = events or RunEvents()
    settings = prepared.settings
    study = open_study(prepared.storage, prepared.study_name, settings.seed)
    new_study = not study.get_trials(deepcopy=False)
    if not new_study:
        check_comparable(study, prepared)
    if new_study and prepared.fitting_choices:
        study.set_user_attr(SPACE_CHOICES_ATTR, prepared.fitting_choices)
        study.set_user_attr("ruled_out_choices", prepared.ruled_out_choices)
        if prepared.unsupported_choices:
            study.set_user_attr("unsupported_choices", prepared.unsupported_choices)
    # A resumed study keeps the choices it started with: Optuna refuses other ones.
    choices = study.user_attrs.get(SPACE_CHOICES_ATTR)
    if choices:
        space, note = resumed_space(prepared, choices)
        prepared = dataclasses.replace(prepared, space=space)
        if note:
            events.notes.append(note)
    if new_study:
        for key, value in {
            "model": settings.model,
            "data_path": str(settings.data_path),
            "budget_bytes": settings.budget_bytes,
            "seq_len": settings.seq_len,
            "probe_steps": settings.probe_steps,
            "device": prepared.device,
            "space": prepared.space.source,
            "seed": settings.seed,
            "vocab_size": prepared.spec.vocab_size,
            "num_layers": prepared.spec.num_layers,
            MEASURED_UNDER_ATTR: measured_under(prepared),
        }.items():
            study.set_user_attr(key, value)
        for name, params in baseline_params(prepared.space, fits_budget(prepared)):
            study.enqueue_trial(params, user_attrs={"baseline": name}, skip_if_exists=True)
    study.set_user_attr("data_stats", prepared.data_stats)
    interrupted = fail_interrupted_trials(study)
    if interrupted:
        events.notes.append(
            f"trials {', '.join(map(str, interrupted))} were interrupted earlier: marked failed "
            "and queued to run again"
        )
    remaining = settings.trials - finished_trial_count(study)
    if remaining <= 0:
        events.notes.append(
            f"study {prepared.study_name} already holds {settings.trials} finished trials; "
            "raise --trials to run more"
        )
        confirm_frontier(prepared, runner, study, events)
        measure_noise(prepared, runner, study, events)
        return study

    def stop_at_target(study: Any, trial: Any) -> None:
        # Other workers or commands may feed the same study: stop at the shared total.
        if finished_trial_count(study) >= settings.trials:
            study.stop()

    study.optimize(
        make_objective(prepared, runner, events),
        n_trials=remaining,
        timeout=settings.timeout_seconds,
        n_jobs=max(settings.workers, len(settings.gpus) or 1),
        catch=(ProbeCrashed,),
        callbacks=[stop_at_target],
        gc_after_trial=False,
    )
    confirm_frontier(prepared, runner, study, events)
    measure_noise(prepared, runner, study, events)
    return study


NOISE_ATTR = "noise"
"""Study attribute: one recipe probed again with another seed and the same steps."""


def measure_noise(
    prepared: PreparedRun, runner: ProbeRunner, study: Any, events: RunEvents | None = None
) -> dict[str, Any] | None:
    """How far a probe's figures move when only chance changes: the yardstick for differences.

    The QLoRA default (or, without it, the fastest frontier recipe) is probed again with the
    same steps and another seed, so the data order and the adapter's initialisation change and
    nothing else: it reads the study's token cache, so the eval subset is the same. An
    eval-loss difference between two recipes smaller than this one is noise.
    Runs once per study, with the confirmations (`--confirm 0` turns both off).
    """
    events = events or RunEvents()
    settings = prepared.settings
    if NOISE_ATTR in study.user_attrs:
        return study.user_attrs[NOISE_ATTR]
    points = measured_points(study)
    if not points or settings.confirm_top < 1:
        return None
    by_number = {p.number: p for p in points}
    default = next(
        (
            t.number
            for t in study.trials
            if t.user_attrs.get("baseline") == "qlora_default" and t.number in by_number
        ),
        None,
    )
    number = default if default is not None else pick(points, "fastest").number
    point = by_number[number]
    if not claim_once(study, NOISE_ATTR):
        return None
    request = probe_request(
        prepared, recipe_of(study.trials[number]), settings.probe_steps, settings.seed + 1
    )
    result = runner.run(request, trials_dir_of(prepared) / f"noise-{number:04d}")
    if result.status != "ok":
        return None

    def change(now: float | None, before: float) -> float | None:
        return round(now / before - 1, 4) if now is not None and before else None

    noise = {
        "trial": number,
        "seed": request.seed,
        "steps": request.steps,
        "eval_loss": result.eval_loss,
        "eval_loss_difference": round(abs(result.eval_loss - point.eval_loss), 6),
        "tokens_per_second_change": change(result.tokens_per_second, point.tokens_per_second),
        "peak_memory_change": change(result.peak_memory_bytes, point.peak_memory_bytes),
    }
    study.set_user_attr(NOISE_ATTR, noise)
    events.noise_measured(noise)
    return noise


CONFIRMATION_PREFIX = "confirmation:"
CONFIRM_SPEED_TOLERANCE = 0.15
"""A confirmed recipe's tokens/s may differ this much (relative) from its first probe."""


def confirmations(study: Any) -> dict[int, dict[str, Any]]:
    """Trial number -> what its longer, reseeded re-probe measured and whether it held up."""
    return {
        int(key.removeprefix(CONFIRMATION_PREFIX)): value
        for key, value in study.user_attrs.items()
        if key.startswith(CONFIRMATION_PREFIX)
    }


def confirm_frontier(
    prepared: PreparedRun, runner: ProbeRunner, study: Any, events: RunEvents | None = None
) -> dict[int, dict[str, Any]]:
    """Re-probe the top frontier recipes with twice the steps and another seed.

    Short probes can flatter a recipe (a lucky data order, a warm cache). A recipe holds up when
    the longer probe finishes, stays within the budget and keeps its speed within 15%.
    """
    events = events or RunEvents()
    settings = prepared.settings
    points = measured_points(study)
    if not points or settings.confirm_top < 1:
        return confirmations(study)
    chosen: list[int] = []
    for number in [pick(points, policy).number for policy in PICK_POLICIES] + [
        p.number for p in frontier(points)
    ]:
        if number not in chosen:
            chosen.append(number)
    done = confirmations(study)
    for number in chosen[: settings.confirm_top]:
        if number in done or not claim_once(study, f"{CONFIRMATION_PREFIX}{number}"):
            continue
        trial = study.trials[number]
        speed = trial.values[1]
        request = probe_request(
            prepared, recipe_of(trial), 2 * settings.probe_steps, settings.seed + 1
        )
        result = runner.run(request, trials_dir_of(prepared) / f"confirm-{number:04d}")
        fits = (
            not prepared.device.startswith("cuda")
            or (result.peak_memory_bytes or 0) <= settings.budget_bytes
        )
        speed_change = (result.tokens_per_second or 0.0) / speed - 1 if speed else -1.0
        confirmation = {
            "status": result.status,
            "reason": result.reason,
            "steps": request.steps,
            "seed": request.seed,
            "peak_memory_bytes": result.peak_memory_bytes,
            "tokens_per_second": result.tokens_per_second,
            "eval_loss": result.eval_loss,
            "speed_change": round(speed_change, 4),
            "held_up": result.status == "ok"
            and fits
            and abs(speed_change) <= CONFIRM_SPEED_TOLERANCE,
        }
        study.set_user_attr(f"{CONFIRMATION_PREFIX}{number}", confirmation)
        events.confirmed(number, confirmation)
    return confirmations(study)


def probe_request(
    prepared: PreparedRun, recipe: Recipe, steps: int, seed: int, visible_gpu: str | None = None
) -> ProbeRequest:
    """A probe of `recipe` on the study's data, device, budget, eval rows and caches."""
    settings = prepared.settings
    return ProbeRequest(
        recipe=recipe,
        data_path=str(settings.data_path),
        steps=steps,
        device=prepared.device,
        budget_bytes=settings.budget_bytes,
        seed=seed,
        visible_gpu=visible_gpu,
        token_cache=prepared.token_cache,
        eval_rows=settings.eval_rows,
        weight_cache=str((TRIALS_DIR / "cache").resolve()) if settings.weight_cache else None,
    )


def measured_points(study: Any) -> list[Point]:
    """Feasible trials whose probe measured all three objectives."""
    from optuna.trial import TrialState

    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        feasible = all(v <= 0 for v in trial.constraints.values())
        if feasible and trial.user_attrs.get("status") == "measured":
            memory, speed, loss = trial.values
            points.append(Point(trial.number, memory, speed, loss))
    return points


PROBE_FAILURE_WORDS = {
    "crash": "crashed",
    "timeout": "timed out",
    "oom": "ran out of memory",
    "nan": "had a non-finite loss",
    "interrupted": "was interrupted",
}
"""A trial's status when its probe did not finish -> how the run's end says it."""


def nothing_measured_line(study: Any) -> str:
    """Why a study has no measured recipe, in one line: the probes that did not finish, with
    the first reason of each kind, or that nothing measured fit the budget."""
    from collections import Counter

    trials = study.get_trials(deepcopy=False)
    statuses = [t.user_attrs.get("status") for t in trials]
    if "measured" in statuses or not any(s in PROBE_FAILURE_WORDS for s in statuses):
        return "no recipe was measured within the budget, so none was exported"
    counts = Counter(s for s in statuses if s in PROBE_FAILURE_WORDS)
    reasons: dict[str, str] = {}
    for trial in trials:
        status = trial.user_attrs.get("status")
        if status in counts and status not in reasons:
            reasons[status] = str(trial.user_attrs.get("reason") or "no reason recorded")
    parts = [
        f"{count} trial{'s' if count > 1 else ''} {PROBE_FAILURE_WORDS[status]}: {reasons[status]}"
        for status, count in counts.most_common()
    ]
    return "no recipe ran: " + "; ".join(parts)


def recipe_of(trial: Any) -> Recipe:
    return Recipe.from_dict(trial.user_attrs["recipe"], source=f"trial {trial.number}")
