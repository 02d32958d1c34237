"""Train and eval splits: which rows are held out for eval, and the tokenized splits of a file."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.data.rows import scan, to_example, usable_rows
from autotune.data.tokens import TokenTable, TokenTableBuilder, chat_template_of, tokenize_many
from autotune.errors import UsageError
from autotune.units import count_of

EVAL_FRACTION = 0.1
MAX_EVAL_ROWS = 64
MAX_SEED = 2**32 - 1
"""The largest seed numpy's generators (Optuna's too) accept."""


def check_seed(seed: int) -> None:
    """--seed, of a run or a training: refused in one line outside what the generators take."""
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be from 0 to {MAX_SEED}, got {seed}")


@dataclass(frozen=True)
class Splits:
    train: TokenTable
    eval: TokenTable


def eval_row_count(row_count: int, eval_rows: int | None = None, source: str = "the data") -> int:
    """Rows held out for eval: `eval_rows`, or a tenth of the data and at most MAX_EVAL_ROWS."""
    if row_count < 2:
        raise UsageError(
            f"{source} has {count_of(row_count, 'usable row')}; at least 2 are needed (train "
            "and eval)"
        )
    if eval_rows is not None and not 1 <= eval_rows < row_count:
        raise UsageError(
            f"--eval-rows {eval_rows} must be at least 1 and less than the {row_count} rows"
        )
    return eval_rows or min(max(1, round(row_count * EVAL_FRACTION)), MAX_EVAL_ROWS)


def eval_indices(
    row_count: int, seed: int, eval_rows: int | None = None, source: str = "the data"
) -> set[int]:
    """Deterministic split: the same data and seed give the same eval subset of row indices."""
    order = list(range(row_count))
    random.Random(seed).shuffle(order)
    return set(order[: eval_row_count(row_count, eval_rows, source)])


def check_enough_rows(
    row_count: int,
    effective_batch_size: int,
    eval_rows: int | None = None,
    source: str = "the data",
) -> None:
    train_rows = row_count - eval_row_count(row_count, eval_rows, source)
    if train_rows < effective_batch_size:
        raise UsageError(
            f"{source} has {count_of(train_rows, 'training row')} after the eval split, fewer "
            f"than one effective batch of {effective_batch_size}; add rows or lower "
            "effective_batch_size"
        )


TOKENIZE_PROGRESS_ROWS = 10_000
"""How often (in rows) tokenization reports progress."""
TOKENIZE_CHUNK_ROWS = 1000
"""Rows read and tokenized together: one batched tokenizer call, a bounded amount of text."""


def load_splits(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    eval_rows: int | None = None,
    row_count: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Splits:
    """Tokenized train and eval splits, streamed: rows are read and tokenized one at a time.

    Bad rows were refused (or accepted for skipping) before anything ran; they are left out
    here. `row_count` (usable rows) saves a counting pass when the caller has scanned the file;
    `progress(done, total)` is called every TOKENIZE_PROGRESS_ROWS rows.
    """
    if row_count is None:
        row_count = scan(path).usable_rows
    held_out = eval_indices(row_count, seed, eval_rows, str(path))
    template = chat_template_of(tokenizer)
    train, evaluation = TokenTableBuilder(), TokenTableBuilder()
    rows = enumerate(usable_rows(path))
    done = 0
    while chunk := list(itertools.islice(rows, TOKENIZE_CHUNK_ROWS)):
        examples = [to_example(row, template) for _, row in chunk]
        for (index, _), example in zip(chunk, tokenize_many(examples, tokenizer, seq_len)):
            if example.has_answer_tokens:
                (evaluation if index in held_out else train).append(example)
        done += len(chunk)
        if progress and done < row_count and done % TOKENIZE_PROGRESS_ROWS < TOKENIZE_CHUNK_ROWS:
            progress(done, row_count)
    if progress:  # the end, once
        progress(row_count, row_count)
    emptied = [name for name, split in (("training", train), ("eval", evaluation)) if not split]
    if emptied:
        raise UsageError(
            f"{path}: every {' and '.join(emptied)} row is truncated to nothing at seq_len "
            f"{seq_len} (the answer starts later); raise --seq-len"
        )
    return Splits(train=train.build(), eval=evaluation.build())


def check_token_ids(splits: Splits, vocab_size: int, model: str) -> None:
    """Every token id of the data must be a row of the model's embedding: a tokenizer with more
    tokens than the config's vocab_size otherwise fails each probe (an index error on a CPU, a
    device-side assert on CUDA). The padding needs no check: load_tokenizer pads with a token
    below vocab_size (pad_within_vocabulary)."""
    tables = (splits.train, splits.eval)
    largest = max((int(table.ids.max()) for table in tables if len(table.ids)), default=-1)
    if largest >= vocab_size:
        raise UsageError(
            f"the tokenizer of model {model!r} gives token id {largest}, but its config.json has "
            f"vocab_size {vocab_size} (ids below it); the tokenizer is not the one the model's "
            "embeddings were made for"
        )
