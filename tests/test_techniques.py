"""Memory techniques beyond plain LoRA: DoRA and activation offload train on the CPU as the
recipe says, and both memory models price them."""

from __future__ import annotations

import torch

from autotune.recipe import Recipe
from autotune.training.train import train
from tests.test_train import adapter_weights, lora_recipe


def test_a_dora_recipe_trains_its_magnitudes_and_its_loss_falls(tiny_model, qa_data, tmp_path):
    report = train(
        lora_recipe(tiny_model, use_dora=True, lr_schedule="constant"),
        qa_data,
        tmp_path / "out",
        max_steps=6,
    )
    assert all(torch.isfinite(torch.tensor(report.losses)))
    assert report.losses[-1] < report.losses[0]
    weights = adapter_weights(tmp_path / "out")
    magnitudes = {k: v for k, v in weights.items() if "lora_magnitude_vector" in k}
    assert magnitudes  # peft saved DoRA's magnitudes with the adapter
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict()
    # a magnitude starts as its base weight's row norms (B is zero at first): training moved it
    name = next(k for k in magnitudes if ".q_proj." in k)
    layer = name.split(".q_proj.")[0].removeprefix("base_model.model.")
    start = torch.linalg.norm(base[f"{layer}.q_proj.weight"].float(), dim=1)
    assert magnitudes[name].shape == start.shape
    assert not torch.allclose(magnitudes[name].float(), start)


def test_the_formula_prices_dora_s_magnitudes_and_merged_weight():
    from autotune.memory import ADAPTER_BYTES, dora_weight_bytes, estimate
    from autotune.model_spec import load_model_spec
    from tests.conftest import SHAPE_CONFIGS

    spec = load_model_spec(str(SHAPE_CONFIGS / "qwen2-7b.json"))
    lora = Recipe.from_dict(
        {"method": "lora", "quantization": "nf4", "loss": "chunked", "micro_batch_size": 4}
    )
    dora = lora.replace(use_dora=True)
    plain, with_dora = estimate(spec, lora).breakdown, estimate(spec, dora).breakdown
    magnitudes = spec.num_layers * sum(
        spec.linear_shapes()[t][1] for t in spec.target_linears("all-linear")
    )
    state_bytes = 2 * ADAPTER_BYTES  # fused AdamW's two fp32 states
    assert with_dora["optimizer_states"] - plain["optimizer_states"] == magnitudes * state_bytes
    # the widest input (down_proj's) makes the largest identity and merged weight
    fan_in, fan_out = spec.linear_shapes()["down_proj"]
    assert dora_weight_bytes(spec, dora) >= ADAPTER_BYTES * fan_in * (fan_in + 3 * fan_out)
    # with the chunked loss, DoRA's merged weight is the larger of the two
    assert with_dora["logits_and_loss"] == dora_weight_bytes(spec, dora)
    assert dora_weight_bytes(spec, lora) == 0
