"""Batches of training steps: which examples each optimizer step takes, and how a micro-batch
of them is laid out as model inputs (padded, padding-free or packed)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from autotune.data.tokens import IGNORE_INDEX, TokenizedExample, TokenTable


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
