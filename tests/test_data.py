import codecs
import gzip

import pytest

from autotune.data.rows import Example, checked_scan, detect_format, to_example
from autotune.data.splits import check_enough_rows, eval_indices, load_splits
from autotune.data.tokens import IGNORE_INDEX, tokenize
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
    from autotune.data.tokens import chat_template_of

    example = to_example(ROWS["chat"], chat_template_of(tokenizer))
    assert example.prompt == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    plain = to_example(ROWS["chat"], None)
    assert plain.prompt == "<|user|>\n2+2?\n<|assistant|>\n"


def trained_ids(row, tokenizer, seq_len=64):
    from autotune.data.tokens import chat_template_of

    encoded = tokenize(to_example(row, chat_template_of(tokenizer)), tokenizer, seq_len)
    return [label for label in encoded.labels if label != IGNORE_INDEX]


def test_a_chat_row_trains_its_templates_end_of_turn_and_no_eos():
    """Generation with the chat template stops on <|im_end|>: the loss must teach it, and no
    <|endoftext|> (the tokenizer's eos) follows a turn the template has ended."""
    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tokenizer.eos_token_id
    chat = trained_ids(ROWS["chat"], tokenizer)
    assert chat == tokenizer("4<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert chat[-2] == end_of_turn and tokenizer.eos_token_id not in chat
    # rows without a chat turn still end with eos, with the same tokenizer
    for kind in ("input_output", "alpaca", "text"):
        assert trained_ids(ROWS[kind], tokenizer)[-1] == tokenizer.eos_token_id
    # a template that does not render the answer after the prompt: the answer and eos
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    answer = tokenizer("4", add_special_tokens=False)["input_ids"]
    assert trained_ids(ROWS["chat"], tokenizer) == answer + [tokenizer.eos_token_id]


def test_a_template_that_writes_the_bos_token_has_it_once():
    """Gemma's and Mistral's templates start with {{ bos_token }}, and their tokenizers add one."""
    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    tokenizer.bos_token, tokenizer.add_bos_token = "<|endoftext|>", True
    bos = tokenizer.bos_token_id
    plain = tokenize(to_example(ROWS["input_output"]), tokenizer, 64)
    assert plain.input_ids[0] == bos and plain.input_ids[1] != bos
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    from autotune.data.tokens import chat_template_of

    chat = tokenize(to_example(ROWS["chat"], chat_template_of(tokenizer)), tokenizer, 64)
    assert chat.input_ids[:2] == [bos, tokenizer.convert_tokens_to_ids("<|im_start|>")]


def test_caches_of_the_old_chat_tokenization_are_not_reused(tmp_path):
    from autotune.data.token_cache import token_cache_key

    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    data = write_jsonl(tmp_path / "chat.jsonl", [ROWS["chat"]] * 4)
    old = token_cache_key(data, tokenizer, 32, 0, version=3)
    assert token_cache_key(data, tokenizer, 32, 0) != old


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (
            b'{"text": "ok"}\n{"text": \n',
            r"line 2: not valid JSON \(Expecting value at the end of the line\)",
        ),
        # a line cut short was said to go wrong at its column 1
        (
            b'{"text": "ok"}\n{"input": "a",\n',
            r"line 2: not valid JSON \(Expecting property name enclosed in double quotes at the "
            r"end of the line\)",
        ),
        (
            b'{"text": "ok"}\n{"text": "a\x01b"}\n',
            r"line 2: not valid JSON \(Invalid control character at column 12\)",
        ),
        (b'{"text": "ok"}\n{"prompt": "x"}\n', "line 2: no known fields"),
        # it said "no known fields" of a row whose "input" it knows
        (b'{"text": "ok"}\n{"input": "x"}\n', 'line 2: field "output" is missing'),
        (b'{"input": "q", "output": ""}\n', 'line 1: field "output" is empty'),
        (b'{"input": 3, "output": "a"}\n', 'line 1: field "input" must be a string'),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: not UTF-8"),
        (b"[1, 2]\n", "line 1: expected a JSON object"),
        # stopped the whole check with no line named
        (
            b'{"text": "ok"}\n{"text": ' + b"[" * 10**5 + b"]" * 10**5 + b"}\n",
            "line 2: JSON nested",
        ),
        # half of a UTF-16 pair is valid JSON but no text: the tokenizer crashed on it
        (b'{"text": "ok"}\n{"text": "a\\ud800b"}\n', r"line 2: a \\ud800-\\udfff escape without"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "assistant answer"),
        (b"\n\n", "is empty"),
        # a file none of whose lines is JSONL says what it is (each line was a bad row)
        (gzip.compress(b'{"text": "ok"}\n'), "is gzip-compressed: decompress it first"),
        ('{"text": "ok"}\n'.encode("utf-16"), "is UTF-16 text: save it as UTF-8"),
        (b'[\n  {"text": "ok"}\n]\n', "is a JSON array; autotune reads JSONL"),
        (b'[{"text": "ok"}, {"text": "ok"}]', "is a JSON array; autotune reads JSONL"),
    ],
)
def test_bad_rows_name_the_line(tmp_path, content, needle):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=needle) as error:
        checked_scan(path)
    assert str(path) in str(error.value)


def test_an_escaped_surrogate_pair_is_text(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "smile \\ud83d\\ude00"}\n{"text": "ok"}\n')
    assert checked_scan(path).usable_rows == 2


@pytest.mark.parametrize(
    ("name", "content"),
    [("data.jsonl", b'{"input": "q", "output": "a"}\n'), ("data.csv", b"input,output\nq,a\n")],
)
def test_a_utf8_byte_order_mark_is_read_as_text(tmp_path, name, content):
    # Windows editors and spreadsheets' "CSV UTF-8" start the file with one: the first JSONL
    # row was not valid JSON, and every CSV row lost its first column's name
    path = tmp_path / name
    path.write_bytes(codecs.BOM_UTF8 + content + content.splitlines(keepends=True)[-1])
    scanned = checked_scan(path)
    assert scanned.usable_rows == 2 and scanned.formats == {"input_output": 2}


@pytest.mark.parametrize("lines", [2, 1])
def test_jsonl_rows_that_are_one_line_lists_are_bad_rows_not_a_json_array(tmp_path, lines):
    # a first line that is a list of message objects called the file "a JSON array", and its
    # advice (jq -c '.[]') would split each conversation into its messages
    import json

    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    path = write_jsonl(tmp_path / "data.jsonl", [messages] * lines)
    with pytest.raises(UsageError) as error:
        checked_scan(path)
    assert "JSON array" not in str(error.value)
    assert f"line {lines}: expected a JSON object, got list" in str(error.value)
    pretty = tmp_path / "pretty.json"  # a pretty-printed array of rows is still one
    pretty.write_text(json.dumps([{"messages": messages}] * 2, indent=2))
    with pytest.raises(UsageError, match="is a JSON array; autotune reads JSONL"):
        checked_scan(pretty)


def test_missing_data_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        checked_scan(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name, refusal", [("nope.jsonl", "does not exist"), ("a.gz", "gzip")])
def test_a_data_path_that_holds_no_rows_is_refused_before_the_model_loads(
    tmp_path, tiny_model, monkeypatch, name, refusal
):
    """A typo in --data was said after the model's classes were imported and its config read
    (seconds on a laptop, more for a large model's remote code)."""
    import autotune.study.prepare as prepare
    from autotune.api import run

    if name.endswith(".gz"):
        (tmp_path / name).write_bytes(gzip.compress(b'{"text": "a"}\n'))
    loaded: list[str] = []
    monkeypatch.setattr(prepare, "load_config", lambda model: loaded.append(model))
    with pytest.raises(UsageError, match=refusal):
        run(model=str(tiny_model), data_path=tmp_path / name, budget_bytes=4 << 30)
    assert loaded == []


def test_split_is_deterministic_and_disjoint(tmp_path):
    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    rows = [{"text": f"row {i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    held_out = eval_indices(50, seed=3)
    assert eval_indices(50, seed=3) == held_out and len(held_out) == 5
    splits = load_splits(path, tokenizer, seq_len=16, seed=3)
    assert splits == load_splits(path, tokenizer, seq_len=16, seed=3)

    def encoded(indices):
        return [tokenize(to_example(rows[i]), tokenizer, 16) for i in sorted(indices)]

    # Both splits keep file order; together they hold every row once.
    assert list(splits.eval) == encoded(held_out)
    assert list(splits.train) == encoded(set(range(50)) - held_out)
    with pytest.raises(UsageError, match="fewer than one effective batch"):
        check_enough_rows(5, effective_batch_size=8)
    small = eval_indices(50, seed=3, eval_rows=3)
    assert len(small) == 3 and small <= held_out  # the same order, cut shorter
    for bad in (0, 50):
        with pytest.raises(UsageError, match="--eval-rows"):
            eval_indices(50, seed=3, eval_rows=bad)


def test_tokenizing_streams_rows_and_keeps_tokens_compact(tmp_path):
    import tracemalloc

    import numpy as np

    from autotune.data.token_cache import cached_splits

    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    words = "alpha beta gamma delta epsilon zeta theta kappa".split()

    def measured(row_count: int):
        rows = [
            {"input": " ".join(words[(i + j) % 8] for j in range(40)), "output": " ".join(words)}
            for i in range(row_count)
        ]
        path = write_jsonl(tmp_path / f"d{row_count}.jsonl", rows)
        tracemalloc.start()
        try:
            splits = load_splits(path, tokenizer, seq_len=256, seed=0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(splits.train) + len(splits.eval) == row_count
        return path, splits, peak, splits.train.tokens + splits.eval.tokens

    _, _, small_peak, small_tokens = measured(3000)
    path, splits, large_peak, large_tokens = measured(9000)
    # Rows are read and tokenized a chunk at a time and tokens kept as 4-byte integers (ids and
    # labels): each further token costs 8 bytes, 16 with the arrays' growth slack. Rows or
    # tokens held as Python objects would cost over 70 bytes per token.
    assert large_peak - small_peak < 20 * (large_tokens - small_tokens)
    # The cache is memory-mapped by every probe rather than read into each one.
    cached, cache = cached_splits(path, tokenizer, 256, 0, tmp_path / "cache")
    assert isinstance(cached.train.ids, np.memmap) and cached == splits
    assert {f.name for f in cache.iterdir()} == {
        f"{split}_{part}.npy"
        for split in ("train", "eval")
        for part in ("ids", "labels", "offsets")
    }


def test_token_ids_past_the_models_vocabulary_are_refused():
    # a tokenizer larger than the config's vocab_size failed every probe with an index error
    import numpy as np

    from autotune.data.splits import Splits, check_token_ids
    from autotune.data.tokens import TokenTable

    def table(ids):
        return TokenTable(np.array(ids, np.int32), np.array(ids, np.int32), np.array([0, len(ids)]))

    splits = Splits(train=table([5, 99]), eval=table([7]))
    check_token_ids(splits, vocab_size=100, model="m")  # ids 0 to 99 fit
    with pytest.raises(
        UsageError, match="gives token id 99, but its config.json has vocab_size 90"
    ):
        check_token_ids(splits, vocab_size=90, model="m")
    # the padding needs no check: load_tokenizer pads below vocab_size (the test below)


def test_a_pad_token_past_the_models_vocabulary_pads_with_one_within(
    tmp_path, tiny_model, monkeypatch
):
    # an added [PAD] at id vocab_size was refused though every id of the data fits
    import json
    import shutil

    from transformers import AutoTokenizer

    from autotune.recipe import Recipe
    from autotune.study import RunSettings, prepare_run
    from autotune.study.objective import probe_request
    from autotune.training.child import probe_tokenizer
    from autotune.training.train import train

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    added = AutoTokenizer.from_pretrained(str(model))
    added.add_special_tokens({"pad_token": "[PAD]"})
    added.save_pretrained(str(model))
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    assert added.pad_token_id == vocab_size
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i} of {i * 7}"} for i in range(30)])
    settings = RunSettings(
        model=str(model),
        data_path=data,
        budget_bytes=10**10,
        space_path=DEMO.parent / "autotune" / "search_spaces" / "demo.yaml",
        seq_len=32,
        device="cpu",
    )
    prepared = prepare_run(settings)
    assert prepared.pad_token_id == added.eos_token_id < vocab_size
    recipe = Recipe.from_dict(
        {"model": str(model), "method": "full", "micro_batch_size": 4, "seq_len": 32}
    )
    request = probe_request(prepared, recipe, steps=1, seed=0)
    assert probe_tokenizer(request).pad_token_id == prepared.pad_token_id
    report = train(recipe, data, tmp_path / "out", max_steps=1)  # padded rows fed the model
    assert report.steps == 1
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 40}))
    with pytest.raises(UsageError, match="gives token id [0-9]+, but its config.json has vocab"):
        prepare_run(settings)  # the data's own ids past the vocabulary are still refused


def test_a_tokenizer_without_pad_or_eos_pads_with_a_token_of_its_own(tmp_path):
    # pad_token fell back to eos alone: with neither, a padded micro-batch met None and failed
    import json
    import shutil

    from autotune.training.batching import collate

    folder = tmp_path / "tokenizer"
    shutil.copytree(DEMO / "tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    named = ("eos_token", "pad_token", "bos_token", "unk_token")
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **dict.fromkeys(named)}))
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.eos_token_id is None and tokenizer.pad_token_id == 0
    short, long = (tokenize(Example("", text), tokenizer, 16) for text in ("a", "a b c d"))
    assert collate([short, long], tokenizer.pad_token_id)["input_ids"][0][-1] == 0


def test_too_few_rows_name_the_file():
    # the message said "the data has 1 row" (which file?) and "1 training rows"
    with pytest.raises(UsageError, match=r"^d.jsonl has 1 usable row; at least 2 are needed"):
        check_enough_rows(1, 4, source="d.jsonl")
    with pytest.raises(UsageError, match=r"^d.jsonl has 1 training row after the eval split"):
        check_enough_rows(2, 4, source="d.jsonl")


def test_a_token_cache_that_cannot_be_written_leaves_no_partial_copy(tmp_path, monkeypatch):
    """A full disk while the cache is written: its half-written copy stayed, holding space a
    resumed run then lacked."""
    import errno

    import numpy as np

    from autotune.data.token_cache import cached_splits

    written = []

    def save_until_full(path, array):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        path.write_bytes(b"x")

    monkeypatch.setattr(np, "save", save_until_full)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(20)])
    tokenizer = load_tokenizer(str(DEMO / "tokenizer"))
    with pytest.raises(OSError, match="No space left"):
        cached_splits(path, tokenizer, 64, 0, tmp_path / "cache")
    assert written and list((tmp_path / "cache").iterdir()) == []
