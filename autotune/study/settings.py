"""A run's settings and what preparing them gives: the checked inputs, the space the model can run,
the budget's fit; names and folders derived from them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autotune.errors import UsageError
from autotune.model_spec import ModelSpec
from autotune.space import SearchSpace
from autotune.study.claims import CLAIM_SEPARATOR, is_claim_study
from autotune.study.storage_urls import TRIALS_DIR

LENGTH_STATS_ROWS = 2000
"""Rows the report's token-length distribution and truncation figures are taken over."""

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
    """What `autotune run` and `autotune.run` are asked to do. The docstring under each field is
    also its option's help on the command line (autotune.options reads it from here)."""

    model: str
    """Hugging Face model id or local directory."""
    data_path: Path
    """Training data: a JSONL, CSV or Parquet file, or a datasets directory (docs/data.md)."""
    budget_bytes: int
    """GPU memory budget in bytes; on the command line e.g. 24GB, 24GiB or 20000MB (GB/MB are
    decimal, 10^9/10^6 bytes, GiB/MiB binary, 2^30/2^20), a card's name (rtx4090, a100-80gb,
    h100-80gb, ...: docs/study.md) or auto (the free memory of the GPU it trains on)."""
    host_budget_bytes: int | None = None
    """Host memory for what a recipe keeps off the GPU (offloaded activations, optimizer states
    and sharded parameters on the host; all ranks of a probe together), e.g. 64GB; a trial
    predicted above it is ruled out (default: the RAM available when the study starts, less
    10%)."""
    space_path: Path | None = None
    """Search space YAML (default: the one shipped with autotune)."""
    trials: int = 20
    """Finished trials the study should hold."""
    timeout_seconds: float | None = None
    """Stop starting trials after this long, e.g. 8h, 90m (seconds in Python)."""
    study_name: str | None = None
    """Study name (default: derived from model, data and budget; or the storage's newest)."""
    storage: str | None = None
    """Optuna storage URL (default: sqlite:///trials/autotune.db)."""
    probe_steps: int = 80
    """Optimizer steps per probe."""
    # 80: on bench/fidelity_bench.py's pretrained models, 80-step probes ranked eleven recipes
    # by eval loss as 400-step runs did with Spearman's rho 0.87, 0.96 and 0.90 (two tasks, two
    # model sizes); 40-step ones 0.86, 0.60 and 0.86 (bench/README.md#fidelity_benchpy)
    probe_timeout_seconds: float = 900.0
    """Kill a probe of --probe-steps steps that runs longer than this (seconds in Python); a
    confirmation or promoted probe of more steps gets it in proportion."""
    seq_len: int = 1024
    """Tokens per sequence (longer samples are truncated)."""
    device: str = "auto"
    """auto, cuda or cpu."""
    seed: int = 0
    """Seed for the sampler, data order and split."""
    confirm_top: int = 3
    """Re-probe this many top frontier recipes after the search, 2x longer, new seed."""
    workers: int = 1
    """Probes at once on this machine, each in its own process (see --gpus); on the CPU at most
    its cores."""
    skip_bad_rows: bool = False
    """Go on without malformed data rows (they are counted) instead of stopping before any
    probe."""
    eval_rows: int | None = None
    """Rows held out for eval loss (default: 10%, at most 64)."""
    gpus: tuple[str, ...] = ()
    """GPU indices, e.g. 0,1,2,3: one probe per GPU at a time, which is its only visible GPU."""
    gpus_per_probe: tuple[int, ...] = (1,)
    """GPUs (one process each) every probe trains on, with the space's distributed strategies
    (all, DeepSpeed's where it is installed, unless it names some): a count (2), or a list
    (1,2,4) or range (1-4) to search; --gpus is then cut into groups of the largest. On
    --device cpu, that many gloo processes stand in for the GPUs."""
    tokenize_progress: Callable[[int, int], None] | None = None
    """Called with (rows done, rows) while the data is tokenized into the cache."""
    sizing_progress: Callable[[int, int], None] | None = None
    """Called with (recipes done, recipes) while the recipes the formula puts over the budget
    are predicted as their trials would be (budget_fit; a replay takes seconds at 7B)."""
    weight_cache: bool = False
    """QLoRA probes read the base already quantized from an NF4 copy in trials/cache (the first
    one writes it)."""
    memory_margin: float | None = None
    """Share added to each predicted peak (less its CUDA context) before it is held to the
    budget, e.g. 0.1 for 10% (default: the memory model's worst measured under-prediction for
    the recipe's kind of base, from autotune/memory_margins.json)."""
    memory_model: str = "replay"
    """How a recipe's peak memory is predicted. replay: run the recipe's probe on torch's meta
    device through a model of the CUDA caching allocator (seconds; the formula answers where the
    replay cannot run). formula: closed-form estimate (instant; a study prunes its space with it
    either way)."""
    report_path: Path | None = None
    """HTML report path (default: reports/<study>.html)."""
    recipe_path: Path | None = None
    """Exported recipe path (default: reports/<study>-recipe.yaml)."""
    trust_remote_code: bool = False
    """Run code the model ships with itself (auto_map in its config); off by default. Read it
    first."""
    quality: str = "eval_loss"
    """The third objective: eval_loss, or exact_match or rouge_l of greedy generations from the
    eval prompts after each probe (recorded as 1 - the score, so lower is better)."""
    promote_rounds: int = 0
    """After the search, this many rounds of successive halving: the better half by eval loss
    of the recipes that fit is probed again with twice the steps of the round before."""

    def __post_init__(self) -> None:
        if isinstance(self.gpus_per_probe, int):  # one count, as the library took it before
            object.__setattr__(self, "gpus_per_probe", (self.gpus_per_probe,))

    @property
    def largest_probe_gpus(self) -> int:
        """The most GPUs a probe trains on: the size of each group --gpus is cut into."""
        return max(self.gpus_per_probe, default=1)


REPLAY_BAND = 1.25
"""Trials the formula puts above this many budgets are over the budget whatever the replay says
(the formula's largest miss on the H100 rows is under 20%), so they are not replayed. The
formula's fixed allocator reserve (memory.ALLOCATOR_FIXED_BYTES, what the H100's smallest
recipes showed) is left out of that comparison: it does not grow with the model, and on a model
of a few million parameters it alone is more than a fifth of what the replay predicts."""


def default_study_name(model: str, data_path: Path, budget_bytes: int) -> str:
    model_name = Path(model).name if Path(model).exists() else model.replace("/", "--")
    return f"{model_name}-{Path(data_path).stem}-{budget_bytes / 1e9:g}GB"


STUDY_FILE_NAME_CHARS = 80
"""At most this many characters of a study's name go into its file names (then a hash)."""


RESERVED_FILE_NAMES = {"cache", "artifacts", "autotune.db", "autotune.db-journal"}
"""What trials/ holds besides the studies' folders."""


def study_file_name(study_name: str) -> str:
    """The name of a study's trial folder, report and recipe: the study name with letters,
    digits, '.', '_' and '-' kept and every other run of characters one '-', so no name (from
    --study, or from a storage someone else writes) reaches outside trials/ or reports/; a
    name that changed or ran long gets a hash of the whole, so two studies never share files."""
    if is_claim_study(study_name):
        raise UsageError(
            f"study name {study_name!r} holds {CLAIM_SEPARATOR!r}, which names autotune's "
            "claims of one-time jobs; choose another with --study"
        )
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", study_name).strip("-.")
    if not slug:
        raise UsageError(
            f"study name {study_name!r} has no letter or digit to name its files by; "
            "choose another with --study"
        )
    # names trials/ holds for itself, and names that look like an earlier slug with its hash,
    # get a hash too, so no study shares a folder with the cache, the database or another study
    reserved = slug.lower() in RESERVED_FILE_NAMES or re.search(r"-[0-9a-f]{8}$", slug)
    if slug != study_name or len(slug) > STUDY_FILE_NAME_CHARS or reserved:
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
    from autotune.distributed import (
        cpu_probes_refusal,
        cpu_ranks_refusal,
        format_gpu_counts,
        parse_gpu_counts,
    )

    counts = settings.gpus_per_probe
    shown = format_gpu_counts(counts)
    if parse_gpu_counts(shown) != counts:  # the library's callers give tuples unchecked
        raise UsageError(f"--gpus-per-probe counts must be ascending and from 1, got {shown}")
    per_probe = settings.largest_probe_gpus
    if settings.gpus and len(settings.gpus) % per_probe:
        raise UsageError(
            f"--gpus-per-probe {per_probe} is more than the {len(settings.gpus)} GPUs of --gpus"
            if per_probe > len(settings.gpus)
            else f"--gpus-per-probe: its largest count must divide the {len(settings.gpus)} "
            f"GPUs of --gpus, got {shown}"
        )
    if not device.startswith("cuda"):
        if settings.gpus:
            raise UsageError(
                f"--gpus {','.join(settings.gpus)} needs CUDA, but the device is {device}"
            )
        refusal = cpu_ranks_refusal(per_probe)
        if refusal:
            raise UsageError(f"--gpus-per-probe {per_probe} on --device {device}: {refusal}")
        # each worker's probe runs its own gloo processes, all at once
        refusal = cpu_ranks_refusal(settings.workers * per_probe) if per_probe > 1 else ""
        if refusal:
            raise UsageError(
                f"--workers {settings.workers} x --gpus-per-probe {per_probe} on --device "
                f"{device}: {refusal}"
            )
        # one process each: the workers' probes would share the cores as well
        refusal = cpu_probes_refusal(settings.workers)
        if refusal:
            raise UsageError(f"--workers {settings.workers} on --device {device}: {refusal}")
        return
    import torch

    count = torch.cuda.device_count()
    if not settings.gpus and per_probe > count:
        raise UsageError(f"--gpus-per-probe {per_probe} is more than the {count} GPUs here")
    if not settings.gpus:
        return
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
    """The peak, with its margin, of the recipe of the space the formula puts least on the rows
    the data gives its probe (prediction.probe_rows), predicted as its trial would be
    (BudgetFit)."""
    fitting_choices: dict[str, list[Any]] = field(default_factory=dict)
    """Each dimension's choices that some recipe predicted to fit the budget uses (on the
    rows the data gives its probe)."""
    ruled_out_choices: dict[str, dict[str, int]] = field(default_factory=dict)
    """Dimension -> choice -> the predicted peak that ruled it out (BudgetFit.ruled_out)."""
    smallest_peak_model: str = "formula"
    """The memory model that gave smallest_peak_bytes ("replay" or "formula")."""
    ruled_out_models: dict[str, dict[str, str]] = field(default_factory=dict)
    """Dimension -> ruled out choice -> the memory model whose peak ruled it out."""
    over_budget_choices: dict[str, dict[str, int]] = field(default_factory=dict)
    """Of a resumed study: dimension -> choice it searches that the budget rules out -> the
    peak that rules it out (SpaceChoices.over_budget); those choices are then not among
    ruled_out_choices, which holds what the study does not search."""
    kept_out_choices: dict[str, list[str]] = field(default_factory=dict)
    """Of a resumed study: dimension -> choice that fits the budget but the study does not
    search (SpaceChoices.kept_out)."""
    replayed: dict[str, tuple[Any, str]] = field(default_factory=dict)
    """The replays the space's sizing made (replay_key -> MemoryEstimate, the model that
    answered), where the trials' predictions start."""
    skipped_rows: int = 0
    token_cache: str | None = None
    data_stats: dict[str, Any] = field(default_factory=dict)
    """Rows, skipped rows, token lengths and truncation of the data (first 2000 rows)."""
    model_config: Any = None
    """The model's transformers config, for the replay memory model."""
    unsupported_choices: dict[str, dict[str, str]] = field(default_factory=dict)
    """Dimension -> choice of the space file -> why the model cannot run it (not searched)."""
    pad_token_id: int | None = None
    """The id padding gets, below the config's vocab_size (load_tokenizer); each
    probe pads with it (None: the tokenizer's own)."""
    train_token_lengths: tuple[int, int] | None = None
    """Tokens of the shortest and the longest training example, truncated at seq_len: whether
    a probe's micro-batches are padded (prediction.pads_micro_batches); None: not known."""
    freeze_layout: dict[str, Any] | None = None
    """Where the model keeps what a freeze recipe trains (FreezeLayout.to_dict), stored with
    the study for its exports; None where the model's architecture was not read."""


@dataclass(frozen=True)
class BudgetFit:
    """What the memory model says of a whole space under a budget, before any trial."""

    smallest_peak_bytes: int
    """The peak with its margin of the recipe the formula puts least, predicted as its trial
    would be (by smallest_peak_model)."""
    choices: dict[str, list[Any]]
    """Each dimension's choices that at least one recipe predicted to fit uses."""
    ruled_out: dict[str, dict[str, int]]
    """Dimension -> choice no fitting recipe uses -> the peak that ruled it out: the formula's
    least of any recipe with it, or the replay's of that recipe where trials are held to the
    replay."""
    ruled_out_models: dict[str, dict[str, str]] = field(default_factory=dict)
    """Dimension -> ruled out choice -> the model whose peak ruled it out."""
    smallest_peak_model: str = "formula"
    """The memory model that gave smallest_peak_bytes ("replay" or "formula")."""


def gpu_groups(settings: RunSettings, device: str) -> list[str]:
    """The CUDA_VISIBLE_DEVICES of each probe slot: --gpus cut into groups of the largest
    --gpus-per-probe (the first that many GPUs where --gpus is not given); none on the CPU or
    for one GPU. A probe on fewer GPUs sees the first of its group's (probe_request)."""
    size = settings.largest_probe_gpus
    gpus = settings.gpus or (tuple(map(str, range(size))) if size > 1 else ())
    if not device.startswith("cuda") or not gpus:
        return []
    return [",".join(gpus[i : i + size]) for i in range(0, len(gpus), size)]


def tokenizer_for(model: str, vocab_size: int | None = None) -> Any:
    """The model's tokenizer (UsageError in one line where it cannot be loaded), padding with
    a token below the config's `vocab_size` where given (load_tokenizer)."""
    from autotune.training.build import load_tokenizer

    return load_tokenizer(model, vocab_size)
