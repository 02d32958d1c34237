"""A data file's records as read, numbered: JSONL lines, CSV rows (a quote never closed found),
Parquet and datasets rows; each the record, or the BadRow saying why it cannot be read."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.units import count_of


@dataclass(frozen=True)
class BadRow:
    line: int
    """1-based line (JSONL, CSV with its header as line 1) or row number (Parquet, datasets)."""
    problem: str


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
                # the parser counts the line's newline as a line of its own: a line cut short
                # was "line 2 column 1" to it
                cut = error.pos >= len(line.rstrip("\r\n"))
                where = "at the end of the line" if cut else f"column {error.pos + 1}"
                yield line_number, BadRow(line_number, f"not valid JSON ({error.msg} {where})")
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


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, row or BadRow) of a JSONL, CSV or Parquet file or a datasets dir."""
    if path.is_dir():
        return _datasets_records(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _parquet_records(path)
    if suffix == ".csv":
        return _csv_records(path)
    return _jsonl_records(path)
