"""Training data: JSONL rows -> (prompt, answer) -> token ids with the loss on answer tokens.

Rows may be {"input","output"}, {"instruction","input","output"} (alpaca), {"messages":[...]}
(chat) or {"text"}. Every row is checked before any probe runs; a bad line is named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.errors import UsageError

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt and padding), as torch's cross_entropy expects."""

EVAL_FRACTION = 0.1
MAX_EVAL_ROWS = 64
PLAIN_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
"""How chat rows are rendered when the tokenizer has no chat template of its own."""


@dataclass(frozen=True)
class Example:
    """One sample: prompt text (no loss) and answer text (loss); text rows have no prompt."""

    prompt: str
    answer: str


def detect_format(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "chat"
    if "instruction" in row:
        return "alpaca"
    if "output" in row:
        return "input_output"
    if "text" in row:
        return "text"
    return "unknown"


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    kind = detect_format(row)
    if kind == "unknown":
        return 'no known fields: expected "text", "input"/"output", "instruction" or "messages"'
    if kind == "chat":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return '"messages" must be a non-empty list'
        for number, message in enumerate(messages):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                return f'message {number} needs string "role" and "content"'
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            return "the last message must be a non-empty assistant answer"
        return None
    fields = {
        "alpaca": ("instruction", "output"),
        "input_output": ("input", "output"),
        "text": ("text",),
    }[kind]
    for name in fields + (("input",) if kind == "alpaca" and "input" in row else ()):
        if not isinstance(row.get(name), str):
            return f'field "{name}" must be a string'
    answer_field = "text" if kind == "text" else "output"
    if not row[answer_field].strip():
        return f'field "{answer_field}" is empty'
    return None


@dataclass(frozen=True)
class BadRow:
    line: int
    """1-based line (JSONL, CSV with its header as line 1) or row number (Parquet, datasets)."""
    problem: str


MAX_BAD_ROWS_SHOWN = 3


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_number, BadRow(line_number, "not UTF-8 text")
                continue
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                yield line_number, BadRow(line_number, f"not valid JSON ({error.msg})")


def _csv_records(path: Path) -> Iterator[tuple[int, Any]]:
    import csv

    with path.open(encoding="utf-8", newline="", errors="strict") as handle:
        reader = csv.DictReader(handle)
        try:
            for row in reader:
                yield reader.line_num, _decode_cells(row)
        except UnicodeDecodeError:
            yield reader.line_num + 1, BadRow(reader.line_num + 1, "not UTF-8 text")


def _decode_cells(row: dict[str, Any], empty_is_missing: bool = True) -> dict[str, Any]:
    """Table cells: a messages cell may hold the message list as JSON; CSV has no null, so
    there an empty cell means a missing field."""
    missing = (None, "") if empty_is_missing else (None,)
    row = {k: v for k, v in row.items() if k is not None and v not in missing}
    if isinstance(row.get("messages"), str):
        try:
            row["messages"] = json.loads(row["messages"])
        except json.JSONDecodeError:
            pass
    return row


def _table_records(rows: Iterator[dict[str, Any]]) -> Iterator[tuple[int, Any]]:
    for number, row in enumerate(rows, start=1):
        yield number, _decode_cells(row, empty_is_missing=False)


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    def rows() -> Iterator[dict[str, Any]]:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()

    return _table_records(rows())


def _datasets_records(path: Path) -> Iterator[tuple[int, Any]]:
    from datasets import Dataset, DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    assert isinstance(loaded, Dataset)
    return _table_records(iter(loaded))


def records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, row or BadRow) of a JSONL, CSV or Parquet file or a datasets dir."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file {path} does not exist")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise UsageError(
                f"data path {path} is a directory but not a datasets save_to_disk directory"
            )
        return _datasets_records(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_records(path)
    if suffix in (".parquet", ".pq"):
        return _parquet_records(path)
    return _jsonl_records(path)


def scan_rows(path: str | Path) -> tuple[list[dict[str, Any]], list[BadRow]]:
    """Every usable row and every bad one, with its line, in one pass."""
    rows: list[dict[str, Any]] = []
    bad: list[BadRow] = []
    try:
        for number, record in records(path):
            if isinstance(record, BadRow):
                bad.append(record)
                continue
            problem = _row_problem(record)
            if problem:
                bad.append(BadRow(number, problem))
            else:
                rows.append(record)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - pyarrow/datasets/csv errors: unreadable file
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"data file {path} cannot be read: {first[:200]}") from None
    return rows, bad


def describe_bad_rows(path: str | Path, bad: list[BadRow]) -> str:
    shown = "; ".join(f"line {b.line}: {b.problem}" for b in bad[:MAX_BAD_ROWS_SHOWN])
    more = f"; and {len(bad) - MAX_BAD_ROWS_SHOWN} more" if len(bad) > MAX_BAD_ROWS_SHOWN else ""
    noun = "bad row" if len(bad) == 1 else "bad rows"
    return f"{path}: {len(bad)} {noun}: {shown}{more}"


def check_rows(
    path: str | Path, rows: Sequence[dict[str, Any]], bad: list[BadRow], skip_bad_rows: bool
) -> None:
    """Bad rows stop a run, naming their lines, unless skipped; no usable row stops it too."""
    if bad and not skip_bad_rows:
        raise UsageError(describe_bad_rows(path, bad) + " (fix them or pass --skip-bad-rows)")
    if not rows:
        raise UsageError(
            f"data file {path} is empty"
            if not bad
            else f"data file {path} has no usable row: " + describe_bad_rows(path, bad)
        )


def read_rows(path: str | Path, skip_bad_rows: bool = False) -> list[dict[str, Any]]:
    """The rows of a data file; bad rows stop here, naming their lines, unless skipped."""
    rows, bad = scan_rows(path)
    check_rows(path, rows, bad, skip_bad_rows)
    return rows


def first_row_format(path: str | Path) -> str | None:
    """The format of the first usable row, reading no further than it."""
    for _, record in records(path):
        if not isinstance(record, BadRow) and _row_problem(record) is None:
            return detect_format(record)
    return None


def to_example(row: dict[str, Any], chat_template: Any = None) -> Example:
    """Prompt and answer of a row; `chat_template` renders message lists (None: plain template)."""
    kind = detect_format(row)
    if kind == "text":
        return Example(prompt="", answer=row["text"])
    if kind == "input_output":
        return Example(prompt=f"{row['input']}\n", answer=row["output"])
    if kind == "alpaca":
        context = f"### Input:\n{row['input']}\n\n" if row.get("input") else ""
        prompt = f"### Instruction:\n{row['instruction']}\n\n{context}### Response:\n"
        return Example(prompt=prompt, answer=row["output"])
    messages = row["messages"]
    history, answer = messages[:-1], messages[-1]["content"]
    if chat_template is not None:
        prompt = chat_template(history)
    else:
        prompt = "".join(PLAIN_CHAT_TEMPLATE.format(**m) for m in history) + "<|assistant|>\n"
    return Example(prompt=prompt, answer=answer)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def tokenize(example: Example, tokenizer: Any, seq_len: int) -> TokenizedExample:
    """Token ids truncated to seq_len; labels mask the prompt so the loss is on the answer."""
    prompt_ids = (
        tokenizer(example.prompt, add_special_tokens=False)["input_ids"] if example.prompt else []
    )
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    bos = (
        [tokenizer.bos_token_id]
        if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
        else []
    )
    input_ids = (bos + prompt_ids + answer_ids)[:seq_len]
    labels = ([IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + answer_ids)[:seq_len]
    return TokenizedExample(input_ids=input_ids, labels=labels)


def chat_template_of(tokenizer: Any) -> Any:
    """A function rendering a message list with the tokenizer's own template, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return render


@dataclass(frozen=True)
class Splits:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]


def split_rows(
    rows: Sequence[dict[str, Any]], seed: int, eval_rows: int | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train/eval split: the same data and seed give the same eval subset.

    `eval_rows` rows are held out (default: a tenth of the data, at most MAX_EVAL_ROWS).
    """
    if len(rows) < 2:
        raise UsageError(f"the data has {len(rows)} row; at least 2 are needed (train and eval)")
    if eval_rows is not None and not 1 <= eval_rows < len(rows):
        raise UsageError(
            f"--eval-rows {eval_rows} must be at least 1 and less than the {len(rows)} rows"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    eval_count = eval_rows or min(max(1, round(len(rows) * EVAL_FRACTION)), MAX_EVAL_ROWS)
    eval_rows = [rows[i] for i in sorted(order[:eval_count])]
    train_rows = [rows[i] for i in order[eval_count:]]
    return train_rows, eval_rows


def check_enough_rows(
    rows: Sequence[dict[str, Any]],
    effective_batch_size: int,
    seed: int,
    eval_rows: int | None = None,
) -> None:
    train_rows, _ = split_rows(rows, seed, eval_rows)
    if len(train_rows) < effective_batch_size:
        raise UsageError(
            f"the data has {len(train_rows)} training rows after the eval split, fewer than one "
            f"effective batch of {effective_batch_size}; add rows or lower effective_batch_size"
        )


def load_splits(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    eval_rows: int | None = None,
    rows: Sequence[dict[str, Any]] | None = None,
) -> Splits:
    """Tokenized train and eval splits; `rows` saves reading the file again when at hand."""
    if rows is None:
        # Bad rows were refused (or accepted for skipping) before anything ran: drop them here.
        rows = read_rows(path, skip_bad_rows=True)
    train_rows, held_out = split_rows(rows, seed, eval_rows)
    template = chat_template_of(tokenizer)

    def encode(selected: list[dict[str, Any]]) -> list[TokenizedExample]:
        encoded = [tokenize(to_example(row, template), tokenizer, seq_len) for row in selected]
        return [e for e in encoded if e.trained_tokens > 0]

    splits = Splits(train=encode(train_rows), eval=encode(held_out))
    emptied = [
        name for name, split in (("training", splits.train), ("eval", splits.eval)) if not split
    ]
    if emptied:
        raise UsageError(
            f"{path}: every {' and '.join(emptied)} row is truncated to nothing at seq_len "
            f"{seq_len} (the answer starts later); raise --seq-len"
        )
    return splits


def step_batches(
    examples: Sequence[TokenizedExample], steps: int, effective_batch_size: int, seed: int
) -> list[list[TokenizedExample]]:
    """The examples of each optimizer step, the same for every recipe given the seed.

    Step 0 holds the longest examples, so the first (warm-up) step meets the worst-case memory.
    """
    longest = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)[:effective_batch_size]
    order = list(examples)
    random.Random(seed).shuffle(order)
    batches = [list(longest)]
    cursor = 0
    for _ in range(steps - 1):
        batch = []
        for _ in range(effective_batch_size):
            batch.append(order[cursor % len(order)])
            cursor += 1
        batches.append(batch)
    return batches


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, list[list[int]]]:
    """Right-pad to the longest example; padding gets attention 0 and no loss."""
    width = max(len(e.input_ids) for e in examples)
    input_ids, labels, attention_mask = [], [], []
    for e in examples:
        pad = width - len(e.input_ids)
        input_ids.append(e.input_ids + [pad_token_id] * pad)
        labels.append(e.labels + [IGNORE_INDEX] * pad)
        attention_mask.append([1] * len(e.input_ids) + [0] * pad)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


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
    path: str | Path, tokenizer: Any = None, seq_len: int = 1024, max_rows: int | None = None
) -> DataSummary:
    """Rows, formats, bad rows and, given a tokenizer, token lengths and truncation."""
    rows, bad = scan_rows(path)
    formats: dict[str, int] = {}
    for row in rows:
        kind = detect_format(row)
        formats[kind] = formats.get(kind, 0) + 1
    summary = DataSummary(str(path), len(rows), formats, bad, seq_len)
    if tokenizer is None or not rows:
        return summary
    return dataclasses.replace(summary, **length_stats(rows, tokenizer, seq_len, max_rows))


def length_stats(
    rows: Sequence[dict[str, Any]], tokenizer: Any, seq_len: int, max_rows: int | None = None
) -> dict[str, Any]:
    """Token-length percentiles before truncation, the share truncated at seq_len, and the rows
    whose answer is cut off entirely (over the first `max_rows` rows)."""
    template = chat_template_of(tokenizer)
    lengths, empty = [], 0
    for row in rows[:max_rows] if max_rows else rows:
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


TOKEN_CACHE_VERSION = 1


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Changes whenever the tokens a text becomes could change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    )
    parts = [
        vocabulary,
        str(getattr(tokenizer, "chat_template", "")),
        str(tokenizer.eos_token_id),
        str(tokenizer.bos_token_id),
        str(getattr(tokenizer, "add_bos_token", False)),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def token_cache_key(
    path: str | Path, tokenizer: Any, seq_len: int, seed: int, eval_rows: int | None = None
) -> str:
    """One key per (data content, tokenizer, seq_len, split seed and size)."""
    text = f"{TOKEN_CACHE_VERSION}:{_file_digest(Path(path))}:{tokenizer_fingerprint(tokenizer)}"
    return hashlib.sha256(f"{text}:{seq_len}:{seed}:{eval_rows}".encode()).hexdigest()[:24]


def _pack(examples: list[TokenizedExample]) -> dict[str, Any]:
    import numpy as np

    lengths = [len(e.input_ids) for e in examples]
    return {
        "ids": np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int32),
        "labels": np.fromiter((t for e in examples for t in e.labels), dtype=np.int32),
        "offsets": np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
    }


def _unpack(ids: Any, labels: Any, offsets: Any) -> list[TokenizedExample]:
    return [
        TokenizedExample(ids[a:b].tolist(), labels[a:b].tolist())
        for a, b in zip(offsets[:-1], offsets[1:])
    ]


def load_token_cache(cache_file: str | Path) -> Splits:
    import numpy as np

    with np.load(cache_file) as stored:
        return Splits(
            train=_unpack(stored["train_ids"], stored["train_labels"], stored["train_offsets"]),
            eval=_unpack(stored["eval_ids"], stored["eval_labels"], stored["eval_offsets"]),
        )


def cached_splits(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    cache_dir: str | Path,
    eval_rows: int | None = None,
    rows: Sequence[dict[str, Any]] | None = None,
) -> tuple[Splits, Path]:
    """Tokenized splits from the on-disk cache, building it on first use (atomically)."""
    import numpy as np

    key = token_cache_key(path, tokenizer, seq_len, seed, eval_rows)
    cache_file = Path(cache_dir) / f"tokens-{key}.npz"
    if cache_file.exists():
        return load_token_cache(cache_file), cache_file
    splits = load_splits(path, tokenizer, seq_len, seed, eval_rows, rows)
    arrays = {
        f"{name}_{k}": v
        for name, examples in (("train", splits.train), ("eval", splits.eval))
        for k, v in _pack(examples).items()
    }
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(f".{os.getpid()}.partial.npz")
    np.savez(partial, **arrays)
    partial.replace(cache_file)
    return splits, cache_file
