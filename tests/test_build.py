"""A recipe becomes the model it describes: quantization, adapters, frozen blocks, checkpointing."""

from __future__ import annotations

import pytest

from autotune.recipe import Recipe
from autotune.training.build import build_model, build_optimizer
from autotune.training.freeze import decoder_blocks


def build(tiny_model, **fields):
    recipe = Recipe.from_dict({"model": str(tiny_model), "method": "lora", **fields})
    return recipe, build_model(recipe, "cpu")


def checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize(
    ("quantization", "layer_class"), [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")]
)
def test_quantized_lora(tiny_model, quantization, layer_class):
    _, model = build(tiny_model, quantization=quantization, lora_r=4)
    classes = {type(m).__name__ for m in model.modules()}
    assert layer_class in classes
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert model.training and checkpointing_on(model)


def test_lora_targets_and_no_checkpointing(tiny_model):
    _, model = build(
        tiny_model, lora_r=4, lora_target_modules=["q_proj", "v_proj"], gradient_checkpointing=False
    )
    trainable = {
        n.split(".lora_")[0].rsplit(".", 1)[-1]
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"q_proj", "v_proj"}
    assert not checkpointing_on(model)


def test_freeze_freezes_the_lowest_blocks_and_embeddings(tiny_model):
    recipe, model = build(tiny_model, method="freeze", frozen_layers=3)
    blocks = list(decoder_blocks(model))
    assert not any(p.requires_grad for b in blocks[:3] for p in b.parameters())
    assert all(p.requires_grad for p in blocks[3].parameters())
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.get_output_embeddings().weight.requires_grad  # untied head trains
    assert build_optimizer(model, recipe).param_groups[0]["lr"] == recipe.learning_rate


@pytest.mark.parametrize(("modules", "trained"), [("attention", "self_attn"), ("mlp", "mlp")])
def test_freeze_trains_one_sub_module_of_the_blocks_above(tiny_model, modules, trained):
    _, model = build(tiny_model, method="freeze", frozen_layers=2, train_modules=modules)
    blocks = list(decoder_blocks(model))
    assert not any(p.requires_grad for b in blocks[:2] for p in b.parameters())
    for block in blocks[2:]:
        names = {n for n, p in block.named_parameters() if p.requires_grad}
        assert names and all(n.startswith(f"{trained}.") for n in names)
        assert names == {f"{trained}.{n}" for n, _ in getattr(block, trained).named_parameters()}
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.get_output_embeddings().weight.requires_grad
    assert model.model.norm.weight.requires_grad


def test_precisions_store_weights_as_asked(tiny_model):
    import torch

    _, bf16 = build(tiny_model, method="full", precision="bf16")
    _, amp = build(tiny_model, method="full", precision="amp_bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert next(amp.parameters()).dtype == torch.float32


def test_eight_bit_optimizers(tiny_model):
    recipe, model = build(tiny_model, lora_r=4, optimizer="adamw_8bit")
    assert type(build_optimizer(model, recipe)).__name__ == "AdamW8bit"


def test_attention_implementation_follows_the_recipe(tiny_model):
    _, model = build(tiny_model, lora_r=4, attention="eager")
    assert model.get_base_model().config._attn_implementation == "eager"


def test_kbit_preparation_upcasts_what_peft_does_but_the_stacked_experts(tmp_path):
    """Under QLoRA a mixture's routed experts (stacked 3-D weights, never quantized) stay in
    bf16; router, norms and head go to fp32 as peft's preparation takes them; on a dense
    model the result is peft's own. The formula prices the weights as built."""
    import torch
    from peft import prepare_model_for_kbit_training

    from autotune.memory import estimate
    from autotune.model_spec import load_model_spec
    from autotune.random_model import build_random_model
    from autotune.training.build import load_model, prepare_kbit_base
    from tests.test_replay import MIXTRAL_CUT

    mixtral = build_random_model(MIXTRAL_CUT, tmp_path / "mixtral")
    recipe, model = build(
        mixtral, quantization="nf4", lora_r=4, lora_target_modules=["q_proj", "v_proj"]
    )
    half = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert half == {"gate_up_proj", "down_proj"}
    router = model.get_base_model().model.layers[0].mlp.gate.weight
    assert router.dtype == torch.float32
    assert model.get_base_model().lm_head.weight.dtype == torch.float32
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() * b.element_size() for b in model.buffers())
    priced = estimate(load_model_spec(str(mixtral)), recipe).breakdown["weights"]
    assert priced == pytest.approx(frozen, rel=0.01)

    dense = tmp_path / "dense"
    qwen2 = {k: v for k, v in MIXTRAL_CUT.items() if "expert" not in k}
    build_random_model({**qwen2, "model_type": "qwen2"}, dense)
    dense_recipe = recipe.replace(model=str(dense))
    ours = prepare_kbit_base(load_model(dense_recipe, "cpu")[0])
    peft_s = prepare_model_for_kbit_training(
        load_model(dense_recipe, "cpu")[0], use_gradient_checkpointing=False
    )
    assert [(n, p.dtype, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.dtype, p.requires_grad) for n, p in peft_s.named_parameters()
    ]
