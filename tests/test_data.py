import pytest

from autotune.data import (
    IGNORE_INDEX,
    check_enough_rows,
    collate,
    detect_format,
    load_splits,
    read_rows,
    split_rows,
    step_batches,
    to_example,
    tokenize,
)
from autotune.errors import UsageError
from autotune.training.build import load_tokenizer
from tests.conftest import DEMO, write_jsonl

ROWS = {
    "input_output": {"input": "2+2?", "output": "4"},
    "alpaca": {"instruction": "Add.", "input": "2 and 2", "output": "4"},
    "chat": {
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    },
    "text": {"text": "two plus two is four"},
}


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_formats_are_detected_and_masked(kind, tmp_path):
    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    row = ROWS[kind]
    assert detect_format(row) == kind
    example = to_example(row)
    encoded = tokenize(example, tokenizer, seq_len=64)
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert trained == answer_ids + [tokenizer.eos_token_id]
    if kind == "text":
        assert example.prompt == ""
    else:
        assert encoded.labels[0] == IGNORE_INDEX  # the prompt carries no loss


def test_chat_uses_the_tokenizers_template():
    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    from autotune.data import chat_template_of

    example = to_example(ROWS["chat"], chat_template_of(tokenizer))
    assert example.prompt == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    plain = to_example(ROWS["chat"], None)
    assert plain.prompt == "<|user|>\n2+2?\n<|assistant|>\n"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"text": "ok"}\n{"text": \n', "line 2: not valid JSON"),
        (b'{"text": "ok"}\n{"prompt": "x"}\n', "line 2: no known fields"),
        (b'{"input": "q", "output": ""}\n', 'line 1: field "output" is empty'),
        (b'{"input": 3, "output": "a"}\n', 'line 1: field "input" must be a string'),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: not UTF-8"),
        (b"[1, 2]\n", "line 1: expected a JSON object"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "assistant answer"),
        (b"\n\n", "is empty"),
    ],
)
def test_bad_rows_name_the_line(tmp_path, content, needle):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=needle) as error:
        read_rows(path)
    assert str(path) in str(error.value)


def test_missing_data_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")


def test_split_is_deterministic_and_disjoint(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(50)]
    train, evaluation = split_rows(rows, seed=3)
    assert split_rows(rows, seed=3) == (train, evaluation)
    assert len(evaluation) == 5 and len(train) == 45
    assert not {r["text"] for r in train} & {r["text"] for r in evaluation}
    with pytest.raises(UsageError, match="fewer than one effective batch"):
        check_enough_rows(rows[:5], effective_batch_size=8, seed=0)
    small_train, small_eval = split_rows(rows, seed=3, eval_rows=3)
    assert len(small_eval) == 3 and len(small_train) == 47
    assert {r["text"] for r in small_eval} <= {r["text"] for r in evaluation}  # same order
    for bad in (0, 50):
        with pytest.raises(UsageError, match="--eval-rows"):
            split_rows(rows, seed=3, eval_rows=bad)


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
    from autotune.data import TokenizedExample

    batch = collate(
        [TokenizedExample([1, 2, 3], [IGNORE_INDEX, 2, 3]), TokenizedExample([4], [4])],
        pad_token_id=0,
    )
    assert batch["input_ids"] == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"][1] == [4, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][1] == [1, 0, 0]
