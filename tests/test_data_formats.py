"""Data in every supported container, bad-row policy, inspection and truncation checks."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.data.rows import checked_scan, scan, usable_rows
from autotune.data.splits import load_splits
from autotune.data.summary import summarize
from autotune.errors import UsageError
from autotune.probe import SubprocessProbeRunner
from autotune.recipe import Recipe
from autotune.study import RunSettings, prepare_run
from autotune.training.build import load_tokenizer
from autotune.training.io import ProbeRequest
from tests.conftest import DEMO, write_jsonl

AUTOTUNE = str(Path(sys.executable).parent / "autotune")
ROWS = [
    {"instruction": "Add.", "input": "2 and 2", "output": "4"},
    {"input": "Capital of Peru?", "output": "Lima"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"text": "plain text row"},
] * 5


def as_csv(path: Path, rows: list[dict]) -> Path:
    fields = ["instruction", "input", "output", "messages", "text"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if k == "messages" else v for k, v in row.items()})
    return path


def as_parquet(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    frame = pd.DataFrame(
        [{**r, "messages": json.dumps(r["messages"])} if "messages" in r else r for r in rows]
    )
    frame.to_parquet(path)
    return path


def as_datasets_dir(path: Path, rows: list[dict]) -> Path:
    from datasets import Dataset

    Dataset.from_list(
        [{"text": r.get("text") or r.get("output") or "chat"} for r in rows]
    ).save_to_disk(str(path))
    return path


def test_csv_reads_like_jsonl(tmp_path):
    jsonl_rows = list(usable_rows(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    csv = as_csv(tmp_path / "d.csv", ROWS)
    assert not scan(csv).bad and list(usable_rows(csv)) == jsonl_rows


def test_parquet_rows(tmp_path):
    path = as_parquet(tmp_path / "d.parquet", ROWS)
    rows = list(usable_rows(path))
    assert not scan(path).bad and len(rows) == len(ROWS)
    assert rows[0]["instruction"] == "Add." and rows[3]["text"] == "plain text row"


def test_datasets_directory(tmp_path):
    path = as_datasets_dir(tmp_path / "saved", ROWS)
    rows = list(usable_rows(path))
    assert not scan(path).bad and len(rows) == len(ROWS) and rows[0] == {"text": "4"}


def test_a_plain_directory_is_refused(tmp_path):
    with pytest.raises(UsageError, match="not a datasets save_to_disk directory"):
        checked_scan(tmp_path)


def test_a_csv_quote_never_closed_is_a_bad_row_not_the_rest_of_the_file(tmp_path):
    # the reader took every line after a stray quote, to the end, as one value: a run trained
    # on one row where the file had thousands, and said nothing
    stray = tmp_path / "stray.csv"
    stray.write_text('text\nfirst row\n"a stray quote\nthird row\nfourth row\n')
    found = scan(stray)
    assert found.usable_rows == 1
    assert [(bad.line, bad.problem) for bad in found.bad] == [
        (
            3,
            "a quote opened here is never closed: it and the 2 lines after it were read as one "
            "value",
        )
    ]
    closed = tmp_path / "closed.csv"  # a quoted value over lines, the file's last, is a row
    closed.write_text('text\nfirst\n"two\nlines"\n')
    assert [row["text"] for row in usable_rows(closed)] == ["first", "two\nlines"]
    assert not scan(closed).bad


def test_a_csv_quote_never_closed_is_placed_on_its_own_line(tmp_path):
    # a blank line before the row (which the reader skips) was taken for the row's first line,
    # and so was the line after the header's first where the header spans lines
    blank = tmp_path / "blank.csv"
    blank.write_text('text\nfirst row\n\n"a stray quote\nlast row\n')
    assert [(bad.line, bad.problem) for bad in scan(blank).bad] == [
        (
            4,
            "a quote opened here is never closed: it and the 1 line after it were read as one "
            "value",
        )
    ]
    header = tmp_path / "header.csv"
    header.write_text('"te\nxt"\n"a stray quote\nlast row\n')
    assert [bad.line for bad in scan(header).bad] == [3]


def test_a_pipe_is_refused_not_waited_on(tmp_path):
    # `data inspect` and `run` on a pipe no program writes waited for ever (and on /dev/zero
    # read until memory ran out): the data is read more than once, so it must be a file
    import os
    import threading

    from autotune.data.rows import check_data_path

    pipe = tmp_path / "rows.jsonl"
    os.mkfifo(pipe)
    said: list[str] = []

    def check() -> None:
        try:
            check_data_path(pipe)
        except UsageError as error:
            said.append(str(error))

    checking = threading.Thread(target=check, daemon=True)
    checking.start()
    checking.join(timeout=10)
    if checking.is_alive():  # it waits for a writer: open and close one so that it ends
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        checking.join(timeout=10)
    assert said == [
        f"data path {pipe} is not a regular file (a pipe or a device); it is read more than "
        "once: save the data to a file"
    ]


def test_bad_rows_are_counted_named_and_skippable(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"text": "ok"}\n{"text": ""}\n{"text": "fine"}\nnot json\n'
        b'{"input": 1, "output": "x"}\n{"text": "caf\xe9"}\n{"text": "last"}\n'
    )
    with pytest.raises(UsageError) as error:
        checked_scan(path)
    message = str(error.value)
    assert '4 bad rows: line 2: field "text" is empty; line 4: not valid JSON' in message
    assert "and 1 more" in message and "--skip-bad-rows" in message
    assert checked_scan(path, skip_bad_rows=True).usable_rows == 3
    assert [r["text"] for r in usable_rows(path)] == ["ok", "fine", "last"]


def test_csv_bad_row_line_numbers_count_the_header(tmp_path):
    rows = [{"input": "q", "output": "a"}, {"input": "q2", "output": ""}]
    bad = scan(as_csv(tmp_path / "d.csv", rows)).bad
    assert [(b.line, b.problem) for b in bad] == [
        (3, 'field "output" is missing (an "input" row needs its answer)')  # an empty cell
    ]


def test_summary_with_tokenizer(tmp_path):
    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    rows = [{"input": "word " * n, "output": "done"} for n in range(1, 41)]
    summary = summarize(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, seq_len=16)
    assert summary.rows == 40 and summary.formats == {"input_output": 40}
    percentiles = summary.token_length_percentiles
    assert percentiles["p50"] <= percentiles["p90"] <= percentiles["max"]
    assert 0 < summary.truncated_share < 1
    assert 0 < summary.rows_without_answer_tokens < 40


def test_summary_reports_its_progress(tmp_path, monkeypatch):
    """`data inspect --model` on a large file tokenized every row saying nothing (200,000 rows:
    38 s here); it reports as a run's tokenization does."""
    import autotune.data.summary

    monkeypatch.setattr(autotune.data.summary, "TOKENIZE_PROGRESS_ROWS", 4)
    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(10)] + [{}])
    reported: list[tuple[int, int]] = []
    summarize(path, tokenizer, seq_len=16, progress=lambda *done: reported.append(done))
    assert reported == [(4, 10), (8, 10)]  # the bad row is not tokenized


def test_every_answer_truncated_is_refused(tmp_path):
    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"input": "a long question " * 5, "output": "x"}] * 3)
    with pytest.raises(UsageError, match="truncated to nothing at seq_len 4"):
        load_splits(path, tokenizer, 4, 0)


def test_run_stops_on_bad_rows_unless_skipped(tmp_path, tiny_model):
    rows = [{"text": f"row {i}"} for i in range(30)] + [{"text": ""}, {"output": 3}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    settings = RunSettings(
        model=str(tiny_model),
        data_path=data,
        budget_bytes=10**10,
        space_path=DEMO / ".." / "autotune" / "search_spaces" / "demo.yaml",
        seq_len=32,
        device="cpu",
    )
    with pytest.raises(UsageError, match="2 bad rows"):
        prepare_run(settings)
    from dataclasses import replace

    assert prepare_run(replace(settings, skip_bad_rows=True)).skipped_rows == 2


def tiny_lora(model: Path) -> Recipe:
    return Recipe.from_dict(
        {
            "model": str(model),
            "method": "lora",
            "lora_r": 4,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "seq_len": 32,
        }
    )


def test_probe_trains_on_parquet(tmp_path, tiny_model):
    data = as_parquet(tmp_path / "d.parquet", ROWS * 2)
    recipe = tiny_lora(tiny_model)
    result = SubprocessProbeRunner(300).run(
        ProbeRequest(
            recipe=recipe, data_path=str(data), steps=2, device="cpu", budget_bytes=10**10, seed=0
        ),
        tmp_path / "probe",
    )
    assert result.status == "ok", result.reason
    assert result.eval_loss > 0


def test_inspect_command(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS + [{"text": ""}])
    done = subprocess.run(
        [AUTOTUNE, "data", "inspect", str(data), "--model", str(tiny_model), "--seq-len", "8"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "20 rows (alpaca 5, chat 5, input_output 5, text 5)" in done.stdout
    assert "1 bad row: line 21" in done.stdout
    assert "tokens per row: p50" in done.stdout and "longer than seq_len 8" in done.stdout


def test_token_cache_is_reused_and_keyed_by_content(tmp_path):
    from autotune.data.token_cache import cached_splits, token_cache_key

    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first, cache_file = cached_splits(data, tokenizer, 32, 0, tmp_path / "cache")
    assert cache_file.is_dir()
    again, same_file = cached_splits(data, tokenizer, 32, 0, tmp_path / "cache")
    assert same_file == cache_file and again == first == load_splits(data, tokenizer, 32, 0)
    key = token_cache_key(data, tokenizer, 32, 0)
    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(data.read_bytes())  # the same content under another name: the same cache
    assert cached_splits(moved, tokenizer, 32, 0, tmp_path / "cache")[1] == cache_file
    assert token_cache_key(moved.rename(moved.with_suffix(".csv")), tokenizer, 32, 0) != key
    assert token_cache_key(data, tokenizer, 64, 0) != key
    assert token_cache_key(data, tokenizer, 32, 1) != key
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert token_cache_key(data, tokenizer, 32, 0) != key
    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    write_jsonl(data, ROWS + [{"text": "one more row"}])
    assert token_cache_key(data, tokenizer, 32, 0) != key


def test_probe_reads_the_studys_token_cache(tmp_path, tiny_model):
    from autotune.data.token_cache import cached_splits

    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 2)
    _, cache_file = cached_splits(data, load_tokenizer(str(tiny_model)), 32, 0, tmp_path / "c")
    recipe = tiny_lora(tiny_model)
    # The data file named in the request no longer exists: only the cache can feed the probe.
    data.unlink()
    result = SubprocessProbeRunner(300).run(
        ProbeRequest(
            recipe=recipe,
            data_path=str(data),
            steps=2,
            device="cpu",
            budget_bytes=10**10,
            seed=0,
            token_cache=str(cache_file),
        ),
        tmp_path / "probe",
    )
    assert result.status == "ok", result.reason


def test_a_csv_row_with_more_cells_than_the_header_is_bad(tmp_path):
    # an unquoted comma split the answer and the cells past the header were dropped unsaid
    path = tmp_path / "d.csv"
    path.write_text('input,output\nq1,"a, quoted"\nq2,a2, and more\nq3,a3,,\n')
    data_scan = scan(path)
    assert data_scan.usable_rows == 2  # a spreadsheet's trailing empty cells are no problem
    assert [(b.line, b.problem) for b in data_scan.bad] == [
        (3, "3 cells, but the header names 2 (a comma in a value that is not quoted?)")
    ]
