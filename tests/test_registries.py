"""The registries of names a recipe chooses (optimizers, precisions, quantizations) are the one
place each is declared: the recipe schema, the memory model, the export formats and the builder
all read them."""

import dataclasses

import pytest
import torch

from autotune.attentions import ATTENTIONS
from autotune.batchings import BATCHINGS
from autotune.data.tokens import TokenizedExample
from autotune.formats import axolotl_config, hf_config, llamafactory_config
from autotune.memory import estimate, weight_bytes_per_param
from autotune.model_spec import ModelSpec
from autotune.optimizers import OPTIMIZERS, OptimizerKind
from autotune.precisions import PRECISIONS
from autotune.quantizations import QUANTIZATIONS
from autotune.recipe import Recipe
from autotune.training.build import (
    autocast_dtype,
    build_optimizer,
    compute_dtype,
    quantization_config,
    storage_dtype,
)
from autotune.training.loop import micro_batches, model_inputs

SPEC = ModelSpec.from_config_dict(
    {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
    }
)


def _sgd(params, learning_rate):
    return torch.optim.SGD(params, lr=learning_rate, momentum=0.9)


SGD = OptimizerKind(
    "sgd_momentum",
    state_bytes=lambda elements, trainable_bytes: trainable_bytes,  # one momentum buffer
    build=_sgd,
    trainer_name="sgd",
    implementation="torch.optim.SGD(momentum=0.9)",
)


def test_a_registered_optimizer_is_known_everywhere(monkeypatch):
    with pytest.raises(Exception, match="optimizer 'sgd_momentum' is not one of"):
        Recipe.from_dict({"method": "full", "optimizer": "sgd_momentum"})
    monkeypatch.setitem(OPTIMIZERS, SGD.name, SGD)
    recipe = Recipe.from_dict({"method": "full", "optimizer": "sgd_momentum", "precision": "fp32"})
    adamw = dataclasses.replace(recipe, optimizer="adamw")
    states = estimate(SPEC, recipe).breakdown["optimizer_states"]
    assert states == 4 * SPEC.total_params
    assert estimate(SPEC, adamw).breakdown["optimizer_states"] == 2 * states
    assert hf_config(recipe)["training_arguments"]["optim"] == "sgd"
    assert axolotl_config(recipe)["optimizer"] == "sgd"
    assert llamafactory_config(recipe)["optim"] == "sgd"
    assert "sgd_momentum" in recipe.label() and not recipe.uses_bitsandbytes
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, recipe)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == recipe.learning_rate


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_prices_its_states(name):
    recipe = Recipe.from_dict({"method": "full", "optimizer": name})
    result = estimate(SPEC, recipe)
    kind = OPTIMIZERS[name]
    assert result.breakdown["optimizer_states"] + result.paged_bytes > 0
    # with short sequences the optimizer step is the peak: its temporaries count where made
    step = estimate(SPEC, dataclasses.replace(recipe, seq_len=8)).breakdown
    assert (step.get("optimizer_step_temporaries", 0) > 0) == kind.step_temporaries
    assert recipe.uses_bitsandbytes == kind.bitsandbytes


@pytest.mark.parametrize("name", sorted(PRECISIONS))
def test_every_precision_is_read_alike_by_the_builder_the_memory_model_and_the_exports(name):
    kind = PRECISIONS[name]
    recipe = Recipe.from_dict({"method": "full", "precision": name})
    assert storage_dtype(recipe).itemsize == kind.weight_bytes == weight_bytes_per_param(recipe)
    assert compute_dtype(recipe).itemsize == kind.compute_bytes
    assert (autocast_dtype(recipe) is not None) == kind.autocast == name.startswith("amp_")
    config = hf_config(recipe)
    flags = config["training_arguments"]
    # the weights load in the recipe's dtype; Trainer's bf16/fp16 are autocast, on where the
    # builder autocasts alone (a bf16 recipe trains its bf16 weights without it)
    assert config["dtype"] == str(storage_dtype(recipe)).removeprefix("torch.")
    assert (flags["bf16"], flags["fp16"]) == (
        autocast_dtype(recipe) == torch.bfloat16,
        autocast_dtype(recipe) == torch.float16,
    )


@pytest.mark.parametrize("name", sorted(QUANTIZATIONS))
def test_every_quantization_is_read_alike_by_the_loader_and_the_exports(name):
    kind = QUANTIZATIONS[name]
    recipe = Recipe.from_dict({"method": "lora", "lora_r": 8, "quantization": name})
    config = quantization_config(recipe)
    hf = hf_config(recipe).get("bits_and_bytes_config")
    axolotl = axolotl_config(recipe)
    factory = llamafactory_config(recipe)
    if kind.bits is None:
        assert config is None and hf is None and "quantization_bit" not in factory
        assert not axolotl["load_in_4bit"] and not axolotl["load_in_8bit"]
        return
    assert {4: config.load_in_4bit, 8: config.load_in_8bit}[kind.bits]
    assert hf[f"load_in_{kind.bits}bit"] and axolotl[f"load_in_{kind.bits}bit"]
    assert factory["quantization_bit"] == kind.bits
    assert recipe.label().startswith(kind.adapter_name)


def test_adamw_is_torchs_fused_kernel_where_the_device_has_it():
    fused = Recipe.from_dict({"method": "full"})
    foreach = dataclasses.replace(fused, optimizer="adamw_foreach")
    model = torch.nn.Linear(8, 8)
    assert build_optimizer(model, fused).defaults["fused"] is True
    assert build_optimizer(model, foreach).defaults["foreach"] is True
    with torch.device("meta"):  # no fused kernel checks pass there: the foreach default
        assert not build_optimizer(torch.nn.Linear(8, 8), fused).defaults["fused"]
    # the step of the foreach path holds a copy of the gradients the fused kernel does not
    short = {"seq_len": 8}
    step_peak = estimate(SPEC, dataclasses.replace(foreach, **short)).breakdown
    fused_peak = estimate(SPEC, dataclasses.replace(fused, **short)).breakdown
    assert step_peak["optimizer_step_temporaries"] == 2 * SPEC.total_params
    assert fused_peak["optimizer_step_temporaries"] == 0
    assert hf_config(fused)["training_arguments"]["optim"] == "adamw_torch_fused"


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_every_attention_is_read_alike_by_the_memory_model_and_the_exports(name):
    kind = ATTENTIONS[name]
    recipe = Recipe.from_dict({"method": "lora", "lora_r": 8, "attention": name})
    assert hf_config(recipe)["attn_implementation"] == name
    assert (
        llamafactory_config(recipe)["flash_attn"]
        == kind.llamafactory
        in {
            "sdpa",
            "disabled",
            "fa2",
        }
    )
    axolotl = axolotl_config(recipe)
    assert {k for k in ("sdp_attention", "flash_attention") if axolotl.get(k)} == set(kind.axolotl)
    # only an implementation that keeps the matrix pays for it, per head and token pair
    sdpa = estimate(SPEC, dataclasses.replace(recipe, attention="sdpa"))
    grown = estimate(SPEC, recipe).breakdown["activations"] - sdpa.breakdown["activations"]
    assert (grown > 0) == kind.keeps_matrix


@pytest.mark.parametrize("name", sorted(BATCHINGS))
def test_every_batching_is_read_alike_by_the_loop_the_memory_model_and_the_exports(name):
    kind = BATCHINGS[name]
    recipe = Recipe.from_dict({"method": "lora", "lora_r": 8, "batching": name})
    sft = None if kind.sft_config is None else {**kind.sft_config, "max_length": recipe.seq_len}
    assert hf_config(recipe).get("sft_config") == sft
    assert bool(axolotl_config(recipe).get("sample_packing")) == kind.packs_rows
    assert bool(llamafactory_config(recipe).get("packing")) == kind.packs_rows
    examples = [TokenizedExample([1, 2, 3], [-100, 2, 3]) for _ in range(4)]
    inputs, tokens = model_inputs(micro_batches(examples, recipe)[0], recipe, "cpu", 0)
    assert tokens == 3 * min(len(examples), recipe.micro_batch_size * (4 if kind.packs_rows else 1))
    assert ("attention_mask" in inputs) == (not kind.masks_rows)
