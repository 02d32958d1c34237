"""What `autotune data inspect` reports: rows, formats, bad rows and token lengths."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.data.file_records import BadRow
from autotune.data.rows import scan, to_example, usable_rows
from autotune.data.splits import TOKENIZE_PROGRESS_ROWS
from autotune.data.tokens import IGNORE_INDEX, chat_template_of, tokenize


@dataclass(frozen=True)
class DataSummary:
    """What `autotune data inspect` reports about a data file."""

    path: str
    rows: int
    formats: dict[str, int]
    bad_rows: list[BadRow]
    seq_len: int
    token_length_percentiles: dict[str, int] | None = None
    """p50/p90/p99/max of prompt+answer tokens before truncation (with a tokenizer only)."""
    truncated_share: float | None = None
    """Share of rows longer than seq_len."""
    rows_without_answer_tokens: int | None = None
    """Rows whose answer is cut off entirely at seq_len: they teach nothing."""


def summarize(
    path: str | Path,
    tokenizer: Any = None,
    seq_len: int = 1024,
    max_rows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DataSummary:
    """Rows, formats, bad rows and, given a tokenizer, token lengths and truncation;
    `progress(done, total)` every TOKENIZE_PROGRESS_ROWS rows tokenized."""
    data_scan = scan(path)
    summary = DataSummary(
        str(path), data_scan.usable_rows, data_scan.formats, data_scan.bad, seq_len
    )
    if tokenizer is None or not data_scan.usable_rows:
        return summary
    rows = itertools.islice(usable_rows(path), max_rows)
    total = min(data_scan.usable_rows, max_rows or data_scan.usable_rows)
    counted = None if progress is None else (lambda done: progress(done, total))
    return dataclasses.replace(summary, **length_stats(rows, tokenizer, seq_len, counted))


def length_stats(
    rows: Iterable[dict[str, Any]],
    tokenizer: Any,
    seq_len: int,
    progress: Callable[[int], object] | None = None,
) -> dict[str, Any]:
    """Token-length percentiles before truncation, the share truncated at seq_len, and the rows
    whose answer is cut off entirely; `progress(rows done)` every TOKENIZE_PROGRESS_ROWS."""
    template = chat_template_of(tokenizer)
    lengths, empty = [], 0
    for done, row in enumerate(rows, 1):
        if progress and done % TOKENIZE_PROGRESS_ROWS == 0:
            progress(done)
        whole = tokenize(to_example(row, template), tokenizer, seq_len=10**9)
        lengths.append(len(whole.input_ids))
        # Truncation keeps the first seq_len tokens and labels.
        if all(label == IGNORE_INDEX for label in whole.labels[:seq_len]):
            empty += 1
    ordered = sorted(lengths)

    def percentile(share: float) -> int:
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]

    return {
        "token_length_percentiles": {
            "p50": percentile(0.5),
            "p90": percentile(0.9),
            "p99": percentile(0.99),
            "max": ordered[-1],
        },
        "truncated_share": sum(1 for n in lengths if n > seq_len) / len(lengths),
        "rows_without_answer_tokens": empty,
    }
