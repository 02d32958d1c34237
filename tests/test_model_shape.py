"""A model config whose shape is no model's (a width of 1e12, no layers, heads that do not divide
the width) is refused in one line by estimate and run, and real models' configs pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from autotune.model_spec import MAX_PARAMS, ModelSpec, load_model_spec
from tests.conftest import (
    DEMO,
    SHAPE_CONFIGS,
    assert_refused_before_tokenizing,
    autotune_main,
    write_jsonl,
)

DEMO_CONFIG = json.loads((DEMO / "config.json").read_text())
LORA_RECIPE = "method: lora\nquantization: none\nlora_r: 8\nseq_len: 256\n"


def model_with(folder: Path, **changes: object) -> Path:
    """The demo model's config and tokenizer in `folder`, its config changed by `changes`."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**DEMO_CONFIG, **changes}))
    for item in (DEMO / "tokenizer").iterdir():
        shutil.copy(item, folder / item.name)
    return folder


ABSURD_SHAPES = [
    ({"hidden_size": 10**12}, "hidden_size 1000000000000 is not a plausible width"),
    ({"hidden_size": 1e12}, "hidden_size must be an integer of at least 1, got 1000000000000.0"),
    ({"num_hidden_layers": -3}, "num_hidden_layers must be an integer of at least 1, got -3"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer of at least 1, got 0"),
    ({"num_hidden_layers": 4.0}, "num_hidden_layers must be an integer of at least 1, got 4.0"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers 1000000 is not a plausible depth"),
    ({"vocab_size": 0}, "vocab_size must be an integer of at least 1, got 0"),
    ({"vocab_size": 10**9}, "vocab_size 1000000000 is not a plausible vocabulary"),
    (
        {"num_attention_heads": 5, "num_key_value_heads": 5},
        "num_attention_heads 5 does not divide hidden_size 64",
    ),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4"),
    (
        {"num_local_experts": 4, "num_experts_per_tok": 8},
        "num_experts_per_tok 8 exceeds the model's 4 experts",
    ),
    (
        # every field within its bounds, the whole past ten trillion parameters
        {
            "hidden_size": 100_000,
            "num_hidden_layers": 4000,
            "num_attention_heads": 100,
            "num_key_value_heads": 100,
            "intermediate_size": 400_000,
        },
        "parameters is not plausible (at most 10,000,000,000,000)",
    ),
]


@pytest.mark.parametrize("changes, refusal", ABSURD_SHAPES)
def test_estimate_refuses_an_absurd_config_in_one_line(
    tmp_path, monkeypatch, capsys, changes, refusal
):
    # a width of 10**12 was priced at 22575259229901824 GiB with exit code 0; 5 heads of a
    # 64-wide model, and 3 key/value heads of 4, at a figure for a model that cannot run
    model = model_with(tmp_path / "model", **changes)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LORA_RECIPE)
    for memory_model in ("formula", "replay"):
        code, out, err = autotune_main(
            monkeypatch,
            capsys,
            *("estimate", "--model", str(model), "--recipe", str(recipe)),
            *("--memory-model", memory_model),
        )
        assert code == 2 and out == "", (memory_model, out, err)
        assert err.count("\n") == 1 and err.startswith("autotune: error: "), err
        assert err.startswith(f"autotune: error: {model / 'config.json'}: ") and refusal in err


def test_run_refuses_an_absurd_config_before_its_data_is_tokenized(tmp_path, monkeypatch, capsys):
    model = model_with(tmp_path / "model", hidden_size=10**12)
    data = write_jsonl(tmp_path / "ok.jsonl", [{"text": f"row {i}"} for i in range(30)])
    assert_refused_before_tokenizing(
        model, data, "hidden_size 1000000000000 is not a plausible width"
    )
    code, _, err = autotune_main(
        monkeypatch,
        capsys,
        *("run", "--model", str(model), "--data", str(data), "--budget", "4GB"),
        *("--device", "cpu"),
    )
    assert code == 2 and err.count("\n") == 1
    assert "hidden_size 1000000000000 is not a plausible width" in err
    assert not (tmp_path / "trials").exists()


@pytest.mark.parametrize(
    "family",
    ["llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3", "gpt2", "mixtral", "phi3", "falcon"],
)
def test_real_families_configs_pass(family):
    # transformers' default config of each family is one of its released models' shape
    from transformers import AutoConfig

    spec = ModelSpec.from_config_dict(AutoConfig.for_model(family).to_dict(), family)
    assert 10**8 < spec.total_params < MAX_PARAMS


def test_released_and_test_configs_pass():
    for path in [*SHAPE_CONFIGS.glob("*.json"), DEMO / "config.json"]:
        spec = load_model_spec(str(path))
        assert spec.total_params > 0


def test_heads_that_do_not_divide_the_width_pass_where_head_dim_gives_their_width():
    # Gemma's and multi-head latent attention's heads are as wide as their config says
    config = {**DEMO_CONFIG, "num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": 16}
    assert ModelSpec.from_config_dict(config).q_dim == 80
