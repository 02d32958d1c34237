"""Training data: JSONL rows -> (prompt, answer) -> token ids with the loss on answer tokens.

Rows may be {"input","output"}, {"instruction","input","output"} (alpaca), {"messages":[...]}
(chat) or {"text"}. Every row is checked before any probe runs; a bad line is named.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
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


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read and check every row of a JSONL file; any bad line stops with its line number."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"data file {path} does not exist")
    if path.is_dir():
        raise UsageError(f"data file {path} is a directory; give a .jsonl file")
    rows: list[dict[str, Any]] = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(f"{path} line {line_number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(
                    f"{path} line {line_number}: not valid JSON ({error.msg})"
                ) from None
            problem = _row_problem(row)
            if problem:
                raise UsageError(f"{path} line {line_number}: {problem}")
            rows.append(row)
    if not rows:
        raise UsageError(f"data file {path} is empty")
    return rows


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
    rows: Sequence[dict[str, Any]], seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train/eval split: the same data and seed give the same eval subset."""
    if len(rows) < 2:
        raise UsageError(f"the data has {len(rows)} row; at least 2 are needed (train and eval)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    eval_count = min(max(1, round(len(rows) * EVAL_FRACTION)), MAX_EVAL_ROWS)
    eval_rows = [rows[i] for i in sorted(order[:eval_count])]
    train_rows = [rows[i] for i in order[eval_count:]]
    return train_rows, eval_rows


def check_enough_rows(rows: Sequence[dict[str, Any]], effective_batch_size: int, seed: int) -> None:
    train_rows, _ = split_rows(rows, seed)
    if len(train_rows) < effective_batch_size:
        raise UsageError(
            f"the data has {len(train_rows)} training rows after the eval split, fewer than one "
            f"effective batch of {effective_batch_size}; add rows or lower effective_batch_size"
        )


def load_splits(path: str | Path, tokenizer: Any, seq_len: int, seed: int) -> Splits:
    rows = read_rows(path)
    train_rows, eval_rows = split_rows(rows, seed)
    template = chat_template_of(tokenizer)

    def encode(selected: list[dict[str, Any]]) -> list[TokenizedExample]:
        encoded = [tokenize(to_example(row, template), tokenizer, seq_len) for row in selected]
        return [e for e in encoded if e.trained_tokens > 0]

    splits = Splits(train=encode(train_rows), eval=encode(eval_rows))
    if not splits.train or not splits.eval:
        raise UsageError(
            f"{path}: no row keeps an answer token within seq_len {seq_len}; raise --seq-len"
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
