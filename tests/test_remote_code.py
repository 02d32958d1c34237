"""Code a model ships runs only with --trust-remote-code; transformers never asks on a terminal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from autotune.errors import UsageError
from autotune.model_spec import load_model_spec
from autotune.remote_code import TRUST_ENV, allow_remote_code, remote_code_allowed
from tests.conftest import DEMO
from tests.test_cli import autotune


def model_with_code(tmp_path: Path, model_type: str) -> Path:
    model = tmp_path / model_type
    model.mkdir()
    config = json.loads((DEMO / "config.json").read_text())
    config.update(
        model_type=model_type,
        auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.X"},
    )
    (model / "config.json").write_text(json.dumps(config))
    # code that must never run without the option: it would leave this file behind
    ran = tmp_path / "code-ran"
    (model / "configuration_x.py").write_text(
        f"open({str(ran)!r}, 'w').close()\nfrom transformers import PretrainedConfig\n"
        "class XConfig(PretrainedConfig):\n    model_type = 'x'\n"
    )
    for item in (DEMO / "tokenizer").iterdir():
        shutil.copy(item, model / item.name)
    return model


def test_a_model_that_needs_its_own_code_is_refused_without_the_option(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_ENV, raising=False)
    model = model_with_code(tmp_path, "my_custom_lm")
    with pytest.raises(UsageError, match="--trust-remote-code"):
        load_model_spec(str(model))
    # an auto_map beside a type transformers knows: built from transformers' own code
    assert load_model_spec(str(model_with_code(tmp_path, "qwen2"))).num_layers == 4
    allow_remote_code(True)
    try:
        assert remote_code_allowed()
        assert load_model_spec(str(model)).num_layers == 4
    finally:
        allow_remote_code(False)
    assert not (tmp_path / "code-ran").exists()


def test_the_commands_refuse_it_in_one_line_and_run_no_code(tmp_path):
    model = model_with_code(tmp_path, "my_custom_lm")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\nlora_r: 8\nseq_len: 64\n")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(30)))
    for args in (
        ["estimate", "--model", str(model), "--recipe", str(recipe)],
        ["run", "--model", str(model), "--data", str(data), "--budget", "4GB", "--device", "cpu"],
    ):
        done = autotune(*args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "pass --trust-remote-code" in lines[0], done.stderr
    assert not (tmp_path / "code-ran").exists()
