"""Which memory model predicts a recipe's peak: the replay (replay.py), in this process or in
the long-lived child process that sees no GPU, or the formula (memory.py) where the replay
cannot run faithfully or fails; and the key under which recipes replay alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autotune.batchings import BATCHINGS
from autotune.distributed import replay_refusal
from autotune.errors import UsageError, first_line
from autotune.losses import LOSSES
from autotune.memory import MemoryEstimate, estimate
from autotune.model_spec import ModelSpec
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import Recipe
from autotune.replay import REPLAY_MICRO_BATCHES, Replay, replay

MEMORY_MODELS = ("replay", "formula")
"""How a recipe's peak is predicted: autotune.replay's replay (seconds), or autotune.memory's
closed-form estimate (microseconds), which also stands in where the replay cannot run."""


def check_memory_model(memory_model: str) -> None:
    if memory_model not in MEMORY_MODELS:
        raise UsageError(
            f"--memory-model must be one of {', '.join(MEMORY_MODELS)}, got {memory_model!r}"
        )


def not_replayable(recipe: Recipe) -> str | None:
    """Why `recipe` cannot be replayed faithfully, or None."""
    if replay_refusal(recipe):
        return replay_refusal(recipe)
    if LOSSES[recipe.loss].fused:
        return "Liger's fused linear cross-entropy is a Triton kernel the meta device cannot run"
    return QUANTIZATIONS[recipe.quantization].replay_refusal or None


def pads_micro_batches(recipe: Recipe, token_lengths: tuple[int, int] | None) -> bool:
    """Whether the probe of `recipe` meets micro-batches of the longest width with shorter rows
    (padding, so an attention mask) on data whose examples, truncated at seq_len, span
    `token_lengths` (shortest, longest): a padded batching of several rows where the lengths
    differ. The first step holds the longest examples and later steps draw at random, so any
    difference may put a shorter row beside a longest one. Unknown lengths (None): not padded,
    every row seq_len long."""
    if token_lengths is None or not BATCHINGS[recipe.batching].pads(recipe.micro_batch_size):
        return False
    shortest, longest = token_lengths
    return shortest < longest


@dataclass(frozen=True)
class ProbeRows:
    """The rows of the probe's widest micro-batch, as the memory models are told of them."""

    width: int | None = None
    """Tokens a row: the longest truncated example where each row is one example padded to
    the micro-batch's longest (the probe's first step holds the longest examples, and no
    micro-batch is wider); None: seq_len (packed and padding-free rows, unknown lengths)."""
    padded: bool = False
    """Shorter rows beside the longest (pads_micro_batches)."""


def probe_rows(recipe: Recipe, token_lengths: tuple[int, int] | None) -> ProbeRows:
    """The probe's widest micro-batch of `recipe` on data whose examples, truncated at
    seq_len, span `token_lengths` (shortest, longest); None: not known, full rows."""
    padded = pads_micro_batches(recipe, token_lengths)
    if token_lengths is None or BATCHINGS[recipe.batching].masks_rows:
        return ProbeRows(None, padded)
    return ProbeRows(min(token_lengths[1], recipe.seq_len), padded)


NARROWEST_TOKEN_LENGTHS = (1, 1)
"""Token lengths (shortest, longest) no data goes below: every example one token long. With
them probe_rows gives each recipe the narrowest rows any data can give its probe, unpadded,
so the formula its least peak whatever the data: a lower bound, known before the data is
tokenized."""


def formula_estimate(
    spec: ModelSpec, recipe: Recipe, token_lengths: tuple[int, int] | None
) -> MemoryEstimate:
    """The formula's prediction of `recipe` on the rows data whose examples, truncated at
    seq_len, span `token_lengths` gives its probe (probe_rows; None: full rows)."""
    rows = probe_rows(recipe, token_lengths)
    return estimate(spec, recipe, rows.width, rows.padded)


def replay_rows(
    recipe: Recipe, config: Any, seq_len: int | None = None, padded: bool = False
) -> Replay:
    """`replay` of full-length rows, `padded` (its micro-batches' other rows shorter) or not."""
    return replay(recipe, config, seq_len, padded=padded)


def replay_in_worker(
    recipe: Recipe, config: Any, seq_len: int | None = None, padded: bool = False
) -> Replay:
    """`replay_rows` in the long-lived child process that sees no GPU (autotune.offgpu)."""
    from autotune.offgpu import run_off_gpu

    return run_off_gpu(replay_rows, recipe, config, seq_len, padded)


def replay_key(recipe: Recipe, rows: ProbeRows = ProbeRows()) -> str:
    """The recipe as far as its replay sees it: recipes with the same key replay alike (the
    learning rate, its schedule and LoRA's alpha change no size; accumulation past
    REPLAY_MICRO_BATCHES is not replayed); `rows` as the replay is given them."""
    import json

    fields = recipe.to_dict()
    for size_free in ("learning_rate", "lr_schedule", "warmup_steps", "lora_alpha"):
        fields.pop(size_free, None)
    fields["gradient_accumulation_steps"] = min(
        recipe.gradient_accumulation_steps, REPLAY_MICRO_BATCHES
    )
    fields["padded"] = rows.padded
    fields["row_tokens"] = rows.width or recipe.seq_len
    return json.dumps(fields, sort_keys=True, default=str)


def predict(
    spec: ModelSpec,
    recipe: Recipe,
    config: Any,
    seq_len: int | None = None,
    memory_model: str = "replay",
    run: Callable[[Recipe, Any, int | None, bool], Replay] = replay_rows,
    token_lengths: tuple[int, int] | None = None,
) -> tuple[MemoryEstimate, str, str]:
    """The predicted peak of `recipe`, the model that gave it ("replay" or "formula") and, when
    the replay was asked for and the formula answered, why. `run` replays (`replay_rows`, or
    `replay_in_worker` in a process that must stay off the GPU); `token_lengths`: the shortest
    and longest training example, truncated at seq_len, which decide the probe's micro-batches
    (probe_rows; None: full rows). A `seq_len` given is the rows' width whatever the data."""
    rows = probe_rows(recipe, token_lengths)
    width = seq_len or rows.width
    if memory_model == "formula":
        return estimate(spec, recipe, width, rows.padded), "formula", ""
    reason = not_replayable(recipe)
    if reason is None:
        try:
            return run(recipe, config, width, rows.padded).estimate(), "replay", ""
        except Exception as error:  # noqa: BLE001 - an architecture the meta device cannot run
            reason = f"the replay failed: {type(error).__name__}: {first_line(error, fallback='')}"
    return estimate(spec, recipe, width, rows.padded), "formula", reason
