"""Data rows: read from a file, checked, and turned into (prompt, answer) examples.

A data file is JSONL, CSV, Parquet or a datasets save_to_disk directory. Rows may be
{"input","output"}, {"instruction","input","output"} (alpaca), {"messages":[...]} (chat) or
{"text"}. Every row is checked before any probe runs; a bad line is named.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.errors import UsageError, first_line
from autotune.units import count_of

PLAIN_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
"""How chat rows are rendered when the tokenizer has no chat template of its own."""


@dataclass(frozen=True)
class Example:
    """One sample: prompt text (no loss) and answer text (loss); text rows have no prompt.

    `ends_turn`: the answer ends with the chat template's own end of turn (`<|im_end|>` in
    ChatML), as the template renders it, so no eos token is appended after it."""

    prompt: str
    answer: str
    ends_turn: bool = False


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
    if kind == "unknown" and "input" in row:
        return 'field "output" is missing (an "input" row needs its answer)'
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


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
"""A \\ud800-\\udfff escape: half of a UTF-16 pair, text only with its other half."""
_LONE_SURROGATE = r"a \ud800-\udfff escape without its pair (half a character, no text)"


def _has_lone_surrogate(record: Any) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # Windows editors write one
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_number, BadRow(line_number, "not UTF-8 text")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield (
                    line_number,
                    BadRow(line_number, f"not valid JSON ({error.msg} column {error.colno})"),
                )
                continue
            except RecursionError:  # Python's parser gives up near a thousand levels
                yield line_number, BadRow(line_number, "JSON nested too deeply to read")
                continue
            if _SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(record):
                yield line_number, BadRow(line_number, _LONE_SURROGATE)
                continue
            yield line_number, record


def _csv_records(path: Path) -> Iterator[tuple[int, Any]]:
    """The rows of a CSV file; the last one a bad row where a quote opened in it is never
    closed, which had the reader take every line after it, to the end, as one value."""
    held: tuple[int, Any] | None = None
    for start, record in _csv_rows(path):
        if held is not None:
            yield held
        held, held_start = record, start
    if held is None:
        return
    end = held[0]
    opened = _unclosed_quote_line(path, held_start) if end > held_start else None
    if opened is not None:
        after = count_of(end - opened, "line")
        problem = (
            f"a quote opened here is never closed: it and the {after} after it were read as "
            "one value"
        )
        held = (opened, BadRow(opened, problem))
    yield held


def _unclosed_quote_line(path: Path, start: int) -> int | None:
    """The line of the row whose quoted value the CSV text, from line `start` on, never
    closes (the lenient reader ends the value at the end of the file and says nothing); None
    where every quote closes. Blank lines before the row, which the reader skips, count."""
    import csv
    import itertools

    with path.open(encoding="utf-8-sig", newline="", errors="replace") as handle:
        reader = csv.reader(itertools.islice(handle, start - 1, None), strict=True)
        row_start = start
        try:
            for _ in reader:
                row_start = start + reader.line_num
        except csv.Error as error:
            return row_start if "unexpected end of data" in str(error) else None
    return None


def _csv_rows(path: Path) -> Iterator[tuple[int, tuple[int, Any]]]:
    """(first line, (last line, row or BadRow)) of each row of a CSV file."""
    import csv

    # utf-8-sig: UTF-8 that may start with a byte-order mark (spreadsheets' "CSV UTF-8")
    with path.open(encoding="utf-8-sig", newline="", errors="strict") as handle:
        reader = csv.DictReader(handle)
        try:
            reader.fieldnames  # noqa: B018 - reads the header, which may span lines
            start = reader.line_num + 1
            for row in reader:
                start, first = reader.line_num + 1, start
                if any((cell or "").strip() for cell in row.get(None) or ()):
                    # DictReader files cells past the header's under None; empty ones (a
                    # spreadsheet's trailing commas) say nothing and are dropped
                    cells = len(reader.fieldnames or ()) + len(row[None])
                    bad = BadRow(
                        reader.line_num,
                        f"{cells} cells, but the header names {len(reader.fieldnames or ())} "
                        "(a comma in a value that is not quoted?)",
                    )
                    yield first, (reader.line_num, bad)
                    continue
                yield first, (reader.line_num, _decode_cells(row))
        except UnicodeDecodeError:
            line = reader.line_num + 1
            yield line, (line, BadRow(line, "not UTF-8 text"))


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


def check_data_path(path: str | Path) -> None:
    """Refuse, in one line and without reading its rows, a data path that holds no rows to
    read: missing, a directory datasets did not save, a pipe or a device, a text file that is
    not text or JSONL."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file {path} does not exist")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise UsageError(
                f"data path {path} is a directory but not a datasets save_to_disk directory"
            )
        return
    if not path.is_file():  # reading a pipe with no writer waits for ever, /dev/zero never ends
        raise UsageError(
            f"data path {path} is not a regular file (a pipe or a device); it is read more "
            "than once: save the data to a file"
        )
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".pq"):
        _check_text_file(path, is_csv=suffix == ".csv")


def records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, row or BadRow) of a JSONL, CSV or Parquet file or a datasets dir."""
    path = Path(path)
    check_data_path(path)
    if path.is_dir():
        return _datasets_records(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _parquet_records(path)
    if suffix == ".csv":
        return _csv_records(path)
    return _jsonl_records(path)


def _holds_json_array(path: Path) -> bool:
    """Whether a file that starts with `[` is one JSON array of rows and not JSONL whose rows
    are bad: pretty-printed (its first line is no JSON value alone), or on one line, the file's
    only one, as a list of rows (objects of a known format). JSONL whose rows are one-line
    lists (a conversation's messages, say) is bad rows, named by line: `jq -c '.[]'` would
    split each row."""
    with path.open("rb") as handle:
        lines = (line for line in handle if line.strip())
        first = next(lines, b"")
        only_line = next(lines, None) is None
    try:
        value = json.loads(first.removeprefix(codecs.BOM_UTF8))
    except (ValueError, RecursionError):
        return True
    return (
        only_line
        and isinstance(value, list)
        and any(isinstance(item, dict) and detect_format(item) != "unknown" for item in value)
    )


_NOT_TEXT = {
    b"\x1f\x8b": "gzip-compressed: decompress it first (gunzip)",
    b"BZh": "bzip2-compressed: decompress it first (bunzip2)",
    b"\xfd7zXZ\x00": "xz-compressed: decompress it first (unxz)",
    b"\x28\xb5\x2f\xfd": "zstd-compressed: decompress it first (unzstd)",
    b"PK\x03\x04": "a zip archive: extract the data file from it",
    codecs.BOM_UTF16_LE: "UTF-16 text: save it as UTF-8",
    codecs.BOM_UTF16_BE: "UTF-16 text: save it as UTF-8",
}
"""How a data file starts that no row of it could be read after, and what to do."""


def _check_text_file(path: Path, is_csv: bool) -> None:
    """Refuse, in one line, a JSONL or CSV file whose every line would be a bad row: one
    compressed, in UTF-16, or (JSONL) one JSON array rather than an object per line."""
    with path.open("rb") as handle:
        start = handle.read(4096)
    for magic, what in _NOT_TEXT.items():
        if start.startswith(magic):
            raise UsageError(f"data file {path} is {what}")
    if (
        not is_csv
        and start.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")
        and (_holds_json_array(path))
    ):
        raise UsageError(
            f"data file {path} is a JSON array; autotune reads JSONL, one JSON object per "
            f"line (convert it with: jq -c '.[]' {path} > data.jsonl)"
        )


@dataclass(frozen=True)
class DataScan:
    """One streaming pass over a data file: no row is kept, only what the checks need."""

    usable_rows: int
    bad: list[BadRow]
    formats: dict[str, int]
    """Usable rows per format (data.formats.detect_format)."""
    first_format: str | None = None
    """The format of the first usable row (None: no usable row)."""


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
    first_format = None
    for record in _checked_records(path):
        if isinstance(record, BadRow):
            bad.append(record)
            continue
        usable += 1
        kind = detect_format(record)
        formats[kind] = formats.get(kind, 0) + 1
        first_format = first_format or kind
    return DataScan(usable, bad, formats, first_format)


def usable_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """The usable rows in file order, one at a time (bad ones left out)."""
    for record in _checked_records(path):
        if not isinstance(record, BadRow):
            yield record


def _bad_rows_words(bad: list[BadRow]) -> str:
    shown = "; ".join(f"line {b.line}: {b.problem}" for b in bad[:MAX_BAD_ROWS_SHOWN])
    more = f"; and {len(bad) - MAX_BAD_ROWS_SHOWN} more" if len(bad) > MAX_BAD_ROWS_SHOWN else ""
    noun = "bad row" if len(bad) == 1 else "bad rows"
    return f"{len(bad)} {noun}: {shown}{more}"


def describe_bad_rows(path: str | Path, bad: list[BadRow]) -> str:
    return f"{path}: {_bad_rows_words(bad)}"


def check_usable(path: str | Path, usable_rows: int, bad: list[BadRow]) -> None:
    """A file without a row to train on is refused, saying why: empty, or every row bad."""
    if usable_rows:
        return
    if not bad:
        raise UsageError(f"data file {path} is empty")
    raise UsageError(f"data file {path} has no row to train on: {_bad_rows_words(bad)}")


def check_rows(path: str | Path, data_scan: DataScan, skip_bad_rows: bool) -> None:
    """Bad rows stop a run, naming their lines, unless skipped; no usable row stops it too."""
    if data_scan.bad and not skip_bad_rows:
        raise UsageError(
            describe_bad_rows(path, data_scan.bad) + " (fix them or pass --skip-bad-rows)"
        )
    check_usable(path, data_scan.usable_rows, data_scan.bad)


def checked_scan(path: str | Path, skip_bad_rows: bool = False) -> DataScan:
    """scan() then check_rows(): the scan of a file a run may use."""
    data_scan = scan(path)
    check_rows(path, data_scan, skip_bad_rows)
    return data_scan


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
    if chat_template is None:
        prompt = "".join(PLAIN_CHAT_TEMPLATE.format(**m) for m in history) + "<|assistant|>\n"
        return Example(prompt=prompt, answer=answer)
    prompt = chat_template(history, generation_prompt=True)
    whole = chat_template(messages, generation_prompt=False)
    if whole.startswith(prompt) and answer.strip() in whole[len(prompt) :]:
        # the answer as the template renders it, through its end of turn: what inference stops on
        return Example(prompt=prompt, answer=whole[len(prompt) :], ends_turn=True)
    return Example(prompt=prompt, answer=answer)  # a template that rewrites the history
