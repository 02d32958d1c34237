"""Data rows: a file's rows checked, and turned into (prompt, answer) examples.

A data file is JSONL, CSV, Parquet or a datasets save_to_disk directory (read by
autotune.data.file_records). Rows may be {"input","output"}, {"instruction","input","output"}
(alpaca), {"messages":[...]} (chat) or {"text"}. Every row is checked before any probe runs; a
bad line is named.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.data.file_records import BadRow, read_records
from autotune.errors import UsageError, first_line

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


MAX_BAD_ROWS_SHOWN = 3


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
    return read_records(path)


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
