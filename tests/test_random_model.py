"""Random-init models and real configs cut to CPU widths (autotune.random_model)."""

from __future__ import annotations

import json

from autotune.random_model import CPU_WIDTHS, cut_config
from tests.conftest import SHAPE_CONFIGS

WIDTHS = {**CPU_WIDTHS, "seq_len": 128}


def test_a_cut_config_keeps_the_architecture_at_cpu_widths():
    path = SHAPE_CONFIGS / "qwen2-0.5b.json"
    real = json.loads(path.read_text(encoding="utf-8"))
    cut = cut_config(path, **WIDTHS)
    widths = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
    }
    assert {k: cut[k] for k in widths} == widths
    assert cut["max_position_embeddings"] == real["max_position_embeddings"]  # already long enough
    unchanged = set(real) - set(widths)
    assert {k: cut[k] for k in unchanged} == {k: real[k] for k in unchanged}


def test_a_cut_config_drops_fields_that_follow_the_real_widths():
    config = {
        "model_type": "qwen3",
        "head_dim": 128,
        "layer_types": ["full_attention"] * 28,
        "max_window_layers": 28,
        "max_position_embeddings": 64,
    }
    cut = cut_config(config, **WIDTHS)
    assert not {"head_dim", "layer_types", "max_window_layers"} & set(cut)
    assert cut["max_position_embeddings"] == 128  # long enough for seq_len
    assert config["head_dim"] == 128  # the caller's dict is left as it was
