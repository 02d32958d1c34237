"""Token ids of examples: labels mask the prompt so the loss is on the answer; tables keep the
tokens of many examples as flat arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autotune.data.rows import Example

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt and padding), as torch's cross_entropy expects."""


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
    batch in parallel, in native code). The eos token ends each answer but one that ends its
    chat turn already (`Example.ends_turn`)."""
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
        answer_ids = answer_ids if example.ends_turn else answer_ids + eos
        # chat templates that write the bos token themselves (Gemma's, Mistral's) have it once
        start = [] if bos and prompt_ids[:1] == bos else bos
        tokenized.append(
            TokenizedExample(
                input_ids=(start + prompt_ids + answer_ids)[:seq_len],
                labels=([IGNORE_INDEX] * (len(start) + len(prompt_ids)) + answer_ids)[:seq_len],
            )
        )
    return tokenized


def chat_template_of(tokenizer: Any) -> Any:
    """A function rendering a message list with the tokenizer's own template, or None;
    `generation_prompt`: end with the header of an assistant turn to come."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

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

    @property
    def length_span(self) -> tuple[int, int] | None:
        """Tokens of the shortest and the longest example (None: no example)."""
        lengths = self.lengths
        return (int(lengths.min()), int(lengths.max())) if len(lengths) else None

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
