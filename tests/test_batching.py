"""Batching: the examples of each step, and padded, padding-free and packed layouts of them
(padding-free and packed give the same loss as padded batches, with fewer tokens spent)."""

from __future__ import annotations

import pytest

from autotune.data.splits import load_splits
from autotune.data.tokens import IGNORE_INDEX, TokenizedExample
from autotune.recipe import Recipe
from autotune.training.batching import collate, collate_padding_free, pack_rows, step_batches
from autotune.training.build import build_model, load_tokenizer
from autotune.training.loop import model_inputs
from tests.conftest import DEMO, write_jsonl


def examples() -> list[TokenizedExample]:
    # different lengths, prompt tokens masked, answers of several tokens
    return [
        TokenizedExample(list(range(5, 17)), [IGNORE_INDEX] * 4 + list(range(9, 17))),
        TokenizedExample(list(range(30, 35)), [IGNORE_INDEX, IGNORE_INDEX, 32, 33, 34]),
        TokenizedExample(list(range(60, 80)), [IGNORE_INDEX] * 6 + list(range(66, 80))),
    ]


def loss_of(model, recipe, batch_examples):
    import torch

    batch, tokens = model_inputs(batch_examples, recipe, "cpu", pad_token_id=0)
    with torch.no_grad():
        return float(model(**batch).loss), tokens, batch


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_matches_padded_loss(tiny_model, attention):
    import torch

    fields = {
        "model": str(tiny_model),
        "method": "full",
        "precision": "fp32",
        "micro_batch_size": 3,
        "gradient_checkpointing": False,
        "attention": attention,
    }
    padded = Recipe.from_dict(fields)
    free = Recipe.from_dict({**fields, "batching": "padding_free"})
    assert free.label().endswith("padding-free")
    torch.manual_seed(0)
    model = build_model(padded, "cpu")
    model.eval()
    padded_loss, padded_tokens, padded_batch = loss_of(model, padded, examples())
    free_loss, free_tokens, free_batch = loss_of(model, free, examples())
    # Same real tokens, but padding-free computes no padding at all.
    assert padded_tokens == free_tokens == 12 + 5 + 20
    assert padded_batch["input_ids"].numel() == 3 * 20 > free_batch["input_ids"].numel() == 37
    assert free_loss == pytest.approx(padded_loss, rel=1e-4)
    # With positions that run on across the row, later sequences would attend to earlier ones.
    leaky = dict(free_batch, position_ids=torch.arange(37)[None])
    with torch.no_grad():
        assert float(model(**leaky).loss) != pytest.approx(padded_loss, rel=1e-4)


def test_padding_free_layout():
    flat = collate_padding_free(examples())
    starts = [i for i, position in enumerate(flat["position_ids"][0]) if position == 0]
    assert starts == [0, 12, 17] and len(flat["input_ids"][0]) == 37
    assert flat["position_ids"][0][:14] == list(range(12)) + [0, 1]
    # each sequence's first label is masked: nothing predicts it in a padded batch either
    assert [flat["labels"][0][i] for i in (0, 12, 17)] == [IGNORE_INDEX] * 3


def test_packed_rows_match_padded_loss_with_fewer_passes(tiny_model):
    import torch

    from autotune.training.loop import micro_batches

    fields = {
        "model": str(tiny_model),
        "method": "full",
        "precision": "fp32",
        "micro_batch_size": 1,
        "seq_len": 32,
        "gradient_checkpointing": False,
    }
    padded = Recipe.from_dict(fields)
    packed = Recipe.from_dict({**fields, "batching": "packed"})
    # 20 + 12 fill one 32-token row, 5 starts the next: two passes instead of three.
    rows = pack_rows(examples(), 32)
    assert [[len(e.input_ids) for e in row] for row in rows] == [[20, 12], [5]]
    assert len(micro_batches(examples(), packed)) == 2 < len(micro_batches(examples(), padded))
    torch.manual_seed(0)
    model = build_model(padded, "cpu")
    model.eval()
    padded_losses, packed_losses = [], []
    for recipe, losses in ((padded, padded_losses), (packed, packed_losses)):
        for micro in micro_batches(examples(), recipe):
            batch, tokens = model_inputs(micro, recipe, "cpu", pad_token_id=0)
            with torch.no_grad():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            # summed loss over every trained token, so passes of any shape add up the same
            shifted = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                batch["labels"][:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            losses.append(float(shifted))
    assert sum(packed_losses) == pytest.approx(sum(padded_losses), rel=1e-4)
    two_rows = model_inputs(
        micro_batches(
            examples(), Recipe.from_dict({**fields, "batching": "packed", "micro_batch_size": 2})
        )[0],
        packed,
        "cpu",
        pad_token_id=0,
    )[0]
    # the shorter row is padded with a sequence of its own: positions restart, no loss
    assert two_rows["input_ids"].shape == (2, 32)
    assert two_rows["position_ids"][1].tolist() == list(range(5)) + list(range(27))
    assert (two_rows["labels"][1][5:] == IGNORE_INDEX).all()


def test_step_batches_start_with_the_longest_and_repeat_by_seed(tmp_path):
    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "word " * n} for n in range(1, 41)])
    splits = load_splits(path, tokenizer, seq_len=16, seed=0)
    batches = step_batches(splits.train, steps=5, effective_batch_size=4, seed=0)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    longest = max(len(e.input_ids) for e in splits.train)
    assert all(len(e.input_ids) == longest == 16 for e in batches[0])  # truncated at seq_len
    assert batches == step_batches(splits.train, steps=5, effective_batch_size=4, seed=0)


def test_collate_pads_without_loss():
    batch = collate(
        [TokenizedExample([1, 2, 3], [IGNORE_INDEX, 2, 3]), TokenizedExample([4], [4])],
        pad_token_id=0,
    )
    assert batch["input_ids"] == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"][1] == [4, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][1] == [1, 0, 0]
