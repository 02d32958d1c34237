"""Training data: JSONL rows -> (prompt, answer) -> token ids with the loss on answer tokens.

Rows may be {"input","output"}, {"instruction","input","output"} (alpaca), {"messages":[...]}
(chat) or {"text"}. Every row is checked before any probe runs; a bad line is named.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.errors import UsageError, first_line

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
                yield line_number, BadRow(
                    line_number, f"not valid JSON ({error.msg} column {error.colno})"
                )


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


@dataclass(frozen=True)
class DataScan:
    """One streaming pass over a data file: no row is kept, only what the checks need."""

    usable_rows: int
    bad: list[BadRow]
    formats: dict[str, int]


def _checked_records(path: str | Path) -> Iterator[dict[str, Any] | BadRow]:
    """Every row in file order, as the row or as the BadRow saying what is wrong with it."""
    try:
        for number, record in records(path):
            if isinstance(record, BadRow):
                yield record
                continue
            problem = _row_problem(record)
            yield BadRow(number, problem) if problem else record
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - pyarrow/datasets/csv errors: unreadable file
        raise UsageError(f"data file {path} cannot be read: {first_line(error)}") from None


def scan(path: str | Path) -> DataScan:
    """Count usable rows and formats and collect the bad rows, reading the file once."""
    usable, bad, formats = 0, [], {}  # type: tuple[int, list[BadRow], dict[str, int]]
    for record in _checked_records(path):
        if isinstance(record, BadRow):
            bad.append(record)
            continue
        usable += 1
        kind = detect_format(record)
        formats[kind] = formats.get(kind, 0) + 1
    return DataScan(usable, bad, formats)


def usable_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """The usable rows in file order, one at a time (bad ones left out)."""
    for record in _checked_records(path):
        if not isinstance(record, BadRow):
            yield record


def describe_bad_rows(path: str | Path, bad: list[BadRow]) -> str:
    shown = "; ".join(f"line {b.line}: {b.problem}" for b in bad[:MAX_BAD_ROWS_SHOWN])
    more = f"; and {len(bad) - MAX_BAD_ROWS_SHOWN} more" if len(bad) > MAX_BAD_ROWS_SHOWN else ""
    noun = "bad row" if len(bad) == 1 else "bad rows"
    return f"{path}: {len(bad)} {noun}: {shown}{more}"


def check_rows(path: str | Path, data_scan: DataScan, skip_bad_rows: bool) -> None:
    """Bad rows stop a run, naming their lines, unless skipped; no usable row stops it too."""
    if data_scan.bad and not skip_bad_rows:
        raise UsageError(
            describe_bad_rows(path, data_scan.bad) + " (fix them or pass --skip-bad-rows)"
        )
    if not data_scan.usable_rows:
        raise UsageError(
            f"data file {path} is empty"
            if not data_scan.bad
            else f"data file {path} has no usable row: " + describe_bad_rows(path, data_scan.bad)
        )


def checked_scan(path: str | Path, skip_bad_rows: bool = False) -> DataScan:
    """scan() then check_rows(): the scan of a file a run may use."""
    data_scan = scan(path)
    check_rows(path, data_scan, skip_bad_rows)
    return data_scan


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
    def has_answer_tokens(self) -> bool:
        """Whether truncation left any answer token (they come last: the last label says)."""
        return bool(self.labels) and self.labels[-1] != IGNORE_INDEX


def tokenize(example: Example, tokenizer: Any, seq_len: int) -> TokenizedExample:
    """Token ids truncated to seq_len; labels mask the prompt so the loss is on the answer."""
    return tokenize_many([example], tokenizer, seq_len)[0]


def tokenize_many(
    examples: Sequence[Example], tokenizer: Any, seq_len: int
) -> list[TokenizedExample]:
    """tokenize() for many examples with two batched tokenizer calls (fast tokenizers encode a
    batch in parallel, in native code)."""
    if not examples:
        return []
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = (
        [tokenizer.bos_token_id]
        if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None
        else []
    )
    tokenized = []
    for example, prompt_ids, answer_ids in zip(examples, prompts, answers):
        prompt_ids = prompt_ids if example.prompt else []
        answer_ids = answer_ids + eos
        tokenized.append(
            TokenizedExample(
                input_ids=(bos + prompt_ids + answer_ids)[:seq_len],
                labels=([IGNORE_INDEX] * (len(bos) + len(prompt_ids)) + answer_ids)[:seq_len],
            )
        )
    return tokenized


def chat_template_of(tokenizer: Any) -> Any:
    """A function rendering a message list with the tokenizer's own template, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return render


class TokenTable(Sequence[TokenizedExample]):
    """Tokenized examples as three flat arrays (ids, labels, offsets), not Python lists.

    The token cache stores a table as .npy files and probes open them memory-mapped, so a large
    dataset is neither held as Python objects nor copied into each probe; an example becomes
    Python lists only when a batch takes it.
    """

    def __init__(self, ids: Any, labels: Any, offsets: Any) -> None:
        self.ids, self.labels, self.offsets = ids, labels, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return TokenizedExample(self.ids[start:end].tolist(), self.labels[start:end].tolist())

    @property
    def lengths(self) -> Any:
        import numpy as np

        return np.diff(self.offsets)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    def __eq__(self, other: object) -> bool:
        import numpy as np

        if not isinstance(other, TokenTable):
            return NotImplemented
        return all(
            np.array_equal(a, b)
            for a, b in (
                (self.ids, other.ids),
                (self.labels, other.labels),
                (self.offsets, other.offsets),
            )
        )

    __hash__ = None  # type: ignore[assignment]


class TokenTableBuilder:
    """Appends examples as 4-byte integers, so building a table holds no per-token objects."""

    def __init__(self) -> None:
        from array import array

        self.ids, self.labels, self.ends = array("i"), array("i"), array("q", [0])

    def append(self, example: TokenizedExample) -> None:
        self.ids.extend(example.input_ids)
        self.labels.extend(example.labels)
        self.ends.append(len(self.ids))

    def __len__(self) -> int:
        return len(self.ends) - 1

    def build(self) -> TokenTable:
        import numpy as np

        return TokenTable(
            np.frombuffer(self.ids, dtype=np.int32),
            np.frombuffer(self.labels, dtype=np.int32),
            np.frombuffer(self.ends, dtype=np.int64),
        )


@dataclass(frozen=True)
class Splits:
    train: TokenTable
    eval: TokenTable


def eval_row_count(row_count: int, eval_rows: int | None = None) -> int:
    """Rows held out for eval: `eval_rows`, or a tenth of the data and at most MAX_EVAL_ROWS."""
    if row_count < 2:
        raise UsageError(f"the data has {row_count} row; at least 2 are needed (train and eval)")
    if eval_rows is not None and not 1 <= eval_rows < row_count:
        raise UsageError(
            f"--eval-rows {eval_rows} must be at least 1 and less than the {row_count} rows"
        )
    return eval_rows or min(max(1, round(row_count * EVAL_FRACTION)), MAX_EVAL_ROWS)


def eval_indices(row_count: int, seed: int, eval_rows: int | None = None) -> set[int]:
    """Deterministic split: the same data and seed give the same eval subset of row indices."""
    order = list(range(row_count))
    random.Random(seed).shuffle(order)
    return set(order[: eval_row_count(row_count, eval_rows)])


def check_enough_rows(
    row_count: int, effective_batch_size: int, eval_rows: int | None = None
) -> None:
    train_rows = row_count - eval_row_count(row_count, eval_rows)
    if train_rows < effective_batch_size:
        raise UsageError(
            f"the data has {train_rows} training rows after the eval split, fewer than one "
            f"effective batch of {effective_batch_size}; add rows or lower effective_batch_size"
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
    held_out = eval_indices(row_count, seed, eval_rows)
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
        if progress and done % TOKENIZE_PROGRESS_ROWS < TOKENIZE_CHUNK_ROWS:
            progress(done, row_count)
    if progress:
        progress(row_count, row_count)
    emptied = [name for name, split in (("training", train), ("eval", evaluation)) if not split]
    if emptied:
        raise UsageError(
            f"{path}: every {' and '.join(emptied)} row is truncated to nothing at seq_len "
            f"{seq_len} (the answer starts later); raise --seq-len"
        )
    return Splits(train=train.build(), eval=evaluation.build())


def step_batches(
    examples: TokenTable, steps: int, effective_batch_size: int, seed: int
) -> list[list[TokenizedExample]]:
    """The examples of each optimizer step, the same for every recipe given the seed.

    Step 0 holds the longest examples, so the first (warm-up) step meets the worst-case memory.
    Only the examples taken are materialised.
    """
    import numpy as np

    longest = np.argsort(-examples.lengths, kind="stable")[:effective_batch_size]
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    batches = [[examples[int(i)] for i in longest]]
    cursor = 0
    for _ in range(steps - 1):
        batch = []
        for _ in range(effective_batch_size):
            batch.append(examples[order[cursor % len(order)]])
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


def collate_padding_free(examples: Sequence[TokenizedExample]) -> dict[str, list[list[int]]]:
    """All examples end to end in one row, positions restarting at each; no padding at all.

    The first label of each example is masked: in a padded batch no token predicts it (the
    model shifts labels by one), and here it would be predicted from the previous example.
    The restarting positions are what keeps attention inside each example.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for e in examples:
        input_ids += e.input_ids
        labels += [IGNORE_INDEX] + e.labels[1:]
        position_ids += range(len(e.input_ids))
    return {"input_ids": [input_ids], "labels": [labels], "position_ids": [position_ids]}


def pack_rows(examples: Sequence[TokenizedExample], seq_len: int) -> list[list[TokenizedExample]]:
    """Examples grouped into rows of at most seq_len tokens: first fit, longest first."""
    rows: list[list[TokenizedExample]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        size = len(example.input_ids)
        for index, free in enumerate(room):
            if size <= free:
                rows[index].append(example)
                room[index] -= size
                break
        else:
            rows.append([example])
            room.append(seq_len - size)
    return rows


def collate_packed(
    rows: Sequence[Sequence[TokenizedExample]], pad_token_id: int
) -> dict[str, list[list[int]]]:
    """Packed rows, each laid out as collate_padding_free does, right-padded to the longest.

    The padding of a row gets positions of its own (a sequence of its own, with no loss), so
    no real token attends to it and it attends to none.
    """
    flats = [collate_padding_free(row) for row in rows]
    width = max(len(f["input_ids"][0]) for f in flats)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for flat in flats:
        pad = width - len(flat["input_ids"][0])
        batch["input_ids"].append(flat["input_ids"][0] + [pad_token_id] * pad)
        batch["labels"].append(flat["labels"][0] + [IGNORE_INDEX] * pad)
        batch["position_ids"].append(flat["position_ids"][0] + list(range(pad)))
    return batch


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
    data_scan = scan(path)
    summary = DataSummary(
        str(path), data_scan.usable_rows, data_scan.formats, data_scan.bad, seq_len
    )
    if tokenizer is None or not data_scan.usable_rows:
        return summary
    rows = itertools.islice(usable_rows(path), max_rows)
    return dataclasses.replace(summary, **length_stats(rows, tokenizer, seq_len))


def length_stats(rows: Iterable[dict[str, Any]], tokenizer: Any, seq_len: int) -> dict[str, Any]:
    """Token-length percentiles before truncation, the share truncated at seq_len, and the rows
    whose answer is cut off entirely."""
    template = chat_template_of(tokenizer)
    lengths, empty = [], 0
    for row in rows:
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


TOKEN_CACHE_VERSION = 2


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


TABLE_FILES = ("ids", "labels", "offsets")


def load_token_cache(cache_dir: str | Path) -> Splits:
    """The splits of a token cache directory, memory-mapped: pages are shared between probes."""
    import numpy as np

    cache_dir = Path(cache_dir)

    def table(name: str) -> TokenTable:
        return TokenTable(
            *(np.load(cache_dir / f"{name}_{part}.npy", mmap_mode="r") for part in TABLE_FILES)
        )

    return Splits(train=table("train"), eval=table("eval"))


def cached_splits(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    seed: int,
    cache_dir: str | Path,
    eval_rows: int | None = None,
    row_count: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Splits, Path]:
    """Tokenized splits from the on-disk cache, building it on first use (atomically)."""
    import shutil

    import numpy as np

    key = token_cache_key(path, tokenizer, seq_len, seed, eval_rows)
    cache = Path(cache_dir) / f"tokens-{key}"
    if not cache.is_dir():
        splits = load_splits(path, tokenizer, seq_len, seed, eval_rows, row_count, progress)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name, table in (("train", splits.train), ("eval", splits.eval)):
            for part in TABLE_FILES:
                np.save(partial / f"{name}_{part}.npy", getattr(table, part))
        try:
            partial.rename(cache)
        except OSError:  # another worker finished the same cache first
            shutil.rmtree(partial, ignore_errors=True)
    return load_token_cache(cache), cache
