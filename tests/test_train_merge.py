"""`autotune train --merge`: the base with the adapter merged, a plain Hugging Face model."""

from __future__ import annotations

import json

import pytest
import torch

from autotune.errors import UsageError
from autotune.recipe import Recipe
from autotune.training.merge import MERGED_DIR
from autotune.training.train import train
from tests.test_train import lora_recipe


def test_merged_model_loads_plain_and_gives_the_adapter_s_logits(tiny_model, qa_data, tmp_path):
    out = tmp_path / "out"
    report = train(lora_recipe(tiny_model), qa_data, out, max_steps=3, merge_dtype="fp32")
    assert report.merged_dir == out / MERGED_DIR
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(str(report.merged_dir)).eval()
    assert not any("lora" in name for name in merged.state_dict())
    assert merged.dtype == torch.float32
    assert "quantization_config" not in json.loads((report.merged_dir / "config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(report.merged_dir))
    texts = ["Add 3 and 6.\nThe sum is 9.", "Counting: 1 2 3."]
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = adapted(**inputs).logits
        got = merged(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-3)
    # the merge changed the weights: the adapter is not a no-op here
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(**inputs).logits, got, atol=1e-4)


def test_merge_in_half_precision(tiny_model, qa_data, tmp_path):
    recipe = lora_recipe(tiny_model)
    report = train(recipe, qa_data, tmp_path / "out", max_steps=1, merge_dtype="bf16")
    from transformers import AutoModelForCausalLM

    assert report.merged_dir is not None
    merged = AutoModelForCausalLM.from_pretrained(str(report.merged_dir))
    assert merged.dtype == torch.bfloat16


def test_merge_is_refused_where_there_is_no_adapter_or_dtype(tiny_model, qa_data, tmp_path):
    freeze = Recipe.from_dict(
        {"model": str(tiny_model), "method": "freeze", "frozen_layers": 2, "seq_len": 48}
    )
    with pytest.raises(UsageError, match="no adapter to merge"):
        train(freeze, qa_data, tmp_path / "a", max_steps=1, merge_dtype="bf16")
    with pytest.raises(UsageError, match="--merge-dtype must be one of bf16, fp16, fp32"):
        train(lora_recipe(tiny_model), qa_data, tmp_path / "b", max_steps=1, merge_dtype="int8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused first


def test_a_qlora_adapter_is_merged_into_the_dequantized_base(tiny_model, qa_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autotune.training.build import load_model

    recipe = lora_recipe(tiny_model, quantization="nf4", precision="bf16")
    out = tmp_path / "out"
    report = train(recipe, qa_data, out, max_steps=3, merge_dtype="fp32")
    assert report.merged_dir is not None and "dequantized" in (report.merge_note or "")
    config = json.loads((report.merged_dir / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model
    merged = AutoModelForCausalLM.from_pretrained(str(report.merged_dir)).eval()
    assert merged.dtype == torch.float32
    quantized, _ = load_model(recipe, "cpu")  # what the adapter trained against
    trained = PeftModel.from_pretrained(quantized, str(out)).eval()
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    on_original = PeftModel.from_pretrained(original, str(out)).eval()
    inputs = AutoTokenizer.from_pretrained(str(out))("Add 3 and 6.\n", return_tensors="pt")
    with torch.no_grad():
        got = merged(**inputs).logits
        off_trained = (got - trained(**inputs).logits.float()).abs().max()
        off_original = (got - on_original(**inputs).logits).abs().max()
    # bf16 compute in the quantized model; the original weights are further off than that
    assert off_trained < 2e-2 and off_trained < off_original / 4
