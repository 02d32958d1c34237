"""Exported configs use the option names their target tools document.

Hugging Face names are checked against the installed classes themselves. axolotl and
LLaMA-Factory are not installed here; their names are those of axolotl's config reference
(docs/config-reference.qmd: base_model, load_in_4bit, adapter, lora_target_linear,
unfrozen_parameters, chunked_cross_entropy, ...; its Liger integration's README:
plugins, liger_fused_linear_cross_entropy) and of LLaMA-Factory's argument dataclasses
(ModelArguments, with enable_liger_kernel,
DataArguments, FinetuningArguments, plus Seq2SeqTrainingArguments) and examples/train_*/*.yaml.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from autotune.formats import axolotl_config, hf_config, llamafactory_config, render
from autotune.recipe import Recipe
from autotune.training.build import load_dtype

AXOLOTL_KEYS = {
    "base_model",
    "load_in_8bit",
    "load_in_4bit",
    "datasets",
    "val_set_size",
    "output_dir",
    "sequence_len",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "num_epochs",
    "optimizer",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "warmup_ratio",
    "train_on_inputs",
    "gradient_checkpointing",
    "bf16",
    "fp16",
    "float16",  # axolotl: "use instead of fp16 when you don't want AMP"
    "adapter",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_linear",
    "peft_use_dora",
    "activation_offloading",
    "lora_target_modules",
    "unfrozen_parameters",
    "sdp_attention",
    "sample_packing",
    "flash_attention",
    "chunked_cross_entropy",
    "plugins",
    "liger_fused_linear_cross_entropy",
    "fsdp_version",
    "fsdp_config",
    "deepspeed",
}
AXOLOTL_DATASET_KEYS = {
    "path",
    "ds_type",
    "type",
    "field_messages",
    "roles_to_train",
    "train_on_eos",
}
LLAMAFACTORY_OWN_KEYS = {
    "model_name_or_path",
    "stage",
    "finetuning_type",
    "dataset",
    "template",
    "cutoff_len",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "quantization_bit",
    "use_dora",
    "quantization_method",
    "freeze_trainable_layers",
    "freeze_trainable_modules",
    "freeze_extra_modules",
    "disable_gradient_checkpointing",
    "flash_attn",
    "packing",
    "neat_packing",
    "enable_liger_kernel",
    "pure_bf16",
}
TRANSFORMERS_4_KEYS = {"warmup_ratio"}
"""TrainingArguments keys that LLaMA-Factory's transformers (4.55 to 5.6) take and 5.24 dropped."""
OPTIMIZER_NAMES = {"adamw_torch_fused", "adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit"}
"""Names transformers' TrainingArguments takes (checked against its OptimizerNames below)."""

RECIPES = {
    "qlora": {
        "method": "lora",
        "quantization": "nf4",
        "lora_r": 16,
        "optimizer": "paged_adamw_8bit",
    },
    "lora-qv-int8": {
        "method": "lora",
        "quantization": "int8",
        "lora_r": 8,
        "lora_target_modules": ["q_proj", "v_proj"],
        "precision": "amp_bf16",
    },
    "full-8bit": {"method": "full", "optimizer": "adamw_8bit", "precision": "fp16"},
    "ddp": {"method": "full", "distributed": "ddp", "num_gpus": 2},
    "fsdp": {"method": "full", "distributed": "fsdp", "num_gpus": 4},
    "zero3": {"method": "lora", "lora_r": 8, "distributed": "deepspeed_zero3", "num_gpus": 2},
    "freeze": {"method": "freeze", "frozen_layers": 20},
    "freeze-attention": {"method": "freeze", "frozen_layers": 20, "train_modules": "attention"},
    "freeze-mlp": {"method": "freeze", "frozen_layers": 20, "train_modules": "mlp"},
    "packed": {"method": "lora", "lora_r": 16, "batching": "packed"},
    "chunked": {"method": "lora", "quantization": "nf4", "loss": "chunked"},
    "fused": {"method": "full", "loss": "fused_linear"},
    "qdora": {"method": "lora", "quantization": "nf4", "use_dora": True},
    "offload": {"method": "full", "activation_offload": True},
    "cpu-offload-optimizer": {"method": "lora", "optimizer": "adamw_cpu_offload"},
}


def recipe(name: str) -> Recipe:
    return Recipe.from_dict(
        {
            "model": "Qwen/Qwen2-7B",
            "micro_batch_size": 4,
            "gradient_accumulation_steps": 2,
            **RECIPES[name],
        }
    )


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_hf_keywords_construct_the_real_classes(name):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainingArguments

    config = hf_config(recipe(name))
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(config["training_arguments"]) <= fields
    assert config["training_arguments"]["optim"] in OPTIMIZER_NAMES
    from transformers.training_args import OptimizerNames

    assert OPTIMIZER_NAMES <= {o.value for o in OptimizerNames}
    if "lora_config" in config:
        lora = LoraConfig(**config["lora_config"])
        assert lora.r == recipe(name).lora_r
        assert lora.use_dora == (name == "qdora")
    if "bits_and_bytes_config" in config:
        bnb = BitsAndBytesConfig(**config["bits_and_bytes_config"])
        assert bnb.load_in_4bit == (recipe(name).quantization == "nf4")
    # TRL's SFTConfig fields (trl is not a dependency; its documented names): rows packed to
    # the recipe's seq_len (TRL's own default is 1024), named max_length as TRL names it now
    seq_len = recipe(name).seq_len
    assert config.get("sft_config") == (
        {"packing": True, "padding_free": True, "max_length": seq_len} if name == "packed" else None
    )
    assert config["max_length"] == seq_len and "max_seq_length" not in config
    # the part of the blocks that trains is autotune's key, as frozen_layers is
    assert config.get("train_modules") == RECIPES[name].get("train_modules")
    training = config["training_arguments"]
    assert training.get("use_liger_kernel", False) == (name == "fused")
    if name == "fused":
        # the keys transformers passes to liger-kernel's _apply_liger_kernel_to_instance
        assert training["liger_kernel_config"]["fused_linear_cross_entropy"] is True
        others = dict(training["liger_kernel_config"])
        others.pop("fused_linear_cross_entropy")
        assert not any(others.values())


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_axolotl_keys(name):
    config = axolotl_config(recipe(name), "data/train.jsonl", "chat", num_layers=28)
    assert set(config) <= AXOLOTL_KEYS
    assert all(set(d) <= AXOLOTL_DATASET_KEYS for d in config["datasets"])
    assert config["optimizer"] in OPTIMIZER_NAMES
    if name == "qlora":
        assert config["adapter"] == "qlora" and config["lora_target_linear"] is True
    assert config.get("sample_packing") == (True if name == "packed" else None)
    assert config.get("chunked_cross_entropy") == (True if name == "chunked" else None)
    if name == "fused":
        assert config["plugins"] == ["axolotl.integrations.liger.LigerPlugin"]
        assert config["liger_fused_linear_cross_entropy"] is True
    else:
        assert "liger_fused_linear_cross_entropy" not in config
    # axolotl's documented names (its config reference): peft_use_dora, activation_offloading
    assert config.get("peft_use_dora") == (True if name == "qdora" else None)
    assert config.get("activation_offloading") == (True if name == "offload" else None)
    # axolotl takes every `.` as a literal dot and matches at the start of the name
    if name == "freeze":
        patterns = config["unfrozen_parameters"]
        assert "^model.layers.20." in patterns and "^model.layers.27." in patterns
        assert "^model.layers.19." not in patterns
    if name == "freeze-attention":
        patterns = config["unfrozen_parameters"]
        assert "^model.layers.20.self_attn." in patterns
        assert not any("mlp" in p or "layers.19" in p for p in patterns)
    if name == "freeze-mlp":
        patterns = config["unfrozen_parameters"]
        assert "^model.layers.27.mlp." in patterns
        assert not any("self_attn" in p for p in patterns)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_llamafactory_keys(name):
    from transformers import Seq2SeqTrainingArguments

    config = llamafactory_config(recipe(name), num_layers=28)
    trainer_fields = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    assert set(config) <= LLAMAFACTORY_OWN_KEYS | trainer_fields | TRANSFORMERS_4_KEYS
    assert config["finetuning_type"] == recipe(name).method
    if name == "qlora":
        assert config["quantization_bit"] == 4 and config["lora_target"] == "all"
    if name == "lora-qv-int8":
        assert config["lora_target"] == "q_proj,v_proj" and config["quantization_bit"] == 8
    if name.startswith("freeze"):
        assert config["freeze_trainable_layers"] == 8
        # LLaMA-Factory's documented values: all, or the blocks' sub-module names
        modules = {"freeze": "all", "freeze-attention": "self_attn", "freeze-mlp": "mlp"}
        assert config["freeze_trainable_modules"] == modules[name]
    if name == "packed":
        assert config["packing"] is True and config["neat_packing"] is True
    assert config.get("enable_liger_kernel") == (True if name == "fused" else None)
    assert config.get("use_dora") == (True if name == "qdora" else None)  # its FinetuningArguments


def test_an_exported_confirmation_says_which_trial_it_stood_in_for():
    """A recipe confirmed beyond --confirm, in place of a pick whose confirmation took it off
    the frontier: the export's confirmation block names that trial and the pick."""
    from types import SimpleNamespace

    from autotune.export import measured_figures
    from autotune.study.study_records import Confirmation

    stand_in = Confirmation(
        status="ok",
        reason="",
        steps=6,
        seed=1,
        peak_memory_bytes=10**9,
        tokens_per_second=900.123456,
        eval_loss=2.0123456,
        speed_change=-0.1,
        held_up=True,
        in_place_of=3,
        pick="balanced",
    )
    trial = SimpleNamespace(number=5, values=[10**9, 1000.123456, 2.0123456], user_attrs={})
    measured = measured_figures(trial, stand_in)
    block = yaml.safe_load(render("autotune", recipe("qlora"), measured))["measured"]
    # the confirmation's figures as rounded as the probe's beside them
    assert (block["tokens_per_second"], block["eval_loss"]) == (1000.12, 2.01235)
    confirmed = block["confirmation"]
    assert (confirmed["tokens_per_second"], confirmed["eval_loss"]) == (900.12, 2.01235)
    assert block["confirmation"]["in_place_of"] == 3
    assert block["confirmation"]["pick"] == "balanced"
    text = render("axolotl", recipe("qlora"), measured, data_path="d.jsonl", num_layers=28)
    said = f"# confirmation: {stand_in.words()} (in place of trial 3 as the balanced pick)"
    assert said in text
    top = measured_figures(trial, dataclasses.replace(stand_in, in_place_of=None, pick=""))
    assert "in_place_of" not in top["confirmation"]
    text = render("axolotl", recipe("qlora"), top, data_path="d.jsonl", num_layers=28)
    assert f"# confirmation: {stand_in.words()}\n" in text
    # a verdict is written as people read it: "±15%", not YAML's escape "\xB115%"
    missed = measured_figures(trial, dataclasses.replace(stand_in, held_up=False, speed_change=0.5))
    written = render("autotune", recipe("qlora"), missed)
    assert "(it holds within ±15%)" in " ".join(written.split()) and "\\x" not in written
    assert yaml.safe_load(written)["measured"]["confirmation"]["verdict"].endswith("±15%)")


def test_render_puts_measured_figures_in_comments():
    text = render(
        "axolotl",
        recipe("qlora"),
        {"tokens_per_second": 1234.5, "predicted_peak_bytes": 99},
        data_path="d.jsonl",
        num_layers=28,
    )
    assert text.startswith("# QLoRA nf4 r16")
    assert "# measured tokens_per_second: 1234.5" in text
    assert "# predicted_peak_bytes: 99" in text  # a prediction is not called measured
    assert "measured predicted" not in text
    assert yaml.safe_load(text)["base_model"] == "Qwen/Qwen2-7B"
    assert Recipe.from_yaml(render("autotune", recipe("qlora"), None)) == recipe("qlora")


@pytest.mark.parametrize("fmt", ["hf", "axolotl", "llamafactory", "accelerate"])
def test_another_format_s_export_read_as_a_recipe_says_what_it_is(fmt):
    """train and estimate given an hf/axolotl/... export: one line naming the format and the
    export that writes a recipe, not its every key listed as unknown."""
    from autotune.errors import UsageError

    text = render(fmt, recipe("qlora"), None, data_path="d.jsonl", num_layers=28)
    with pytest.raises(UsageError) as refused:
        Recipe.from_yaml(text, "exported.yaml")
    assert str(refused.value) == (
        f"exported.yaml: an `autotune export --format {fmt}` configuration, not a recipe; "
        "`autotune export` without --format writes the recipe that train and estimate read"
    )


def test_an_axolotl_export_of_mixed_data_says_axolotl_reads_one_format():
    mixed = {"alpaca": 60, "chat": 60, "text": 60}
    text = render("axolotl", recipe("qlora"), None, data_format="alpaca", data_formats=mixed)
    assert "# the data mixes formats (alpaca 60, chat 60, text 60)" in text
    assert yaml.safe_load(text)["datasets"][0]["type"] == "alpaca"
    one = render("axolotl", recipe("qlora"), None, data_format="chat", data_formats={"chat": 9})
    assert "mixes formats" not in one


def test_an_axolotl_export_of_chat_data_trains_the_end_of_turn():
    text = render("axolotl", recipe("qlora"), None, data_format="chat", data_formats={"chat": 9})
    assert yaml.safe_load(text)["datasets"][0]["train_on_eos"] == "turn"
    assert 'eot_tokens: ["<|im_end|>"]' in text
    assert "eot_tokens" not in render("axolotl", recipe("qlora"), None, data_format="alpaca")


def test_a_llamafactory_export_names_the_template_that_renders_the_data_as_autotune_did():
    from autotune.data.rows import to_example

    def exported(data_format):
        text = render("llamafactory", recipe("qlora"), None, data_format=data_format)
        return yaml.safe_load(text).get("template"), text

    # chat: no template, so LLaMA-Factory parses the tokenizer's chat template, as autotune does
    template, text = exported("chat")
    assert template is None and "template left out" in text
    # alpaca: LLaMA-Factory's alpaca template (its format_user slot, llamafactory 0.9.x) gives an
    # input-less row autotune's prompt; its system line is said in the header
    template, text = exported("alpaca")
    llamafactory_user = "### Instruction:\n{{content}}\n\n### Response:\n"
    row = {"instruction": "Add 2 and 2.", "output": "4"}
    assert template == "alpaca"
    assert llamafactory_user.replace("{{content}}", row["instruction"]) == to_example(row).prompt
    assert "system line" in text
    assert exported("input_output")[0] == exported("text")[0] == "empty"  # not Human:/Assistant:


@pytest.mark.parametrize("fmt", ["hf", "axolotl", "llamafactory"])
def test_a_loss_a_format_has_no_option_for_is_named_autotune_only(fmt):
    text = render(fmt, recipe("chunked"), None, num_layers=28)
    assert ("loss chunked is autotune-only" in text) == (fmt != "axolotl")
    assert "autotune-only" not in render(fmt, recipe("fused"), None, num_layers=28)
    assert "autotune-only" not in render(fmt, recipe("qlora"), None, num_layers=28)


@pytest.mark.parametrize("fmt", ["hf", "axolotl", "llamafactory"])
def test_activation_offload_is_named_autotune_only_where_a_format_has_no_option(fmt):
    text = render(fmt, recipe("offload"), None, num_layers=28)
    assert ("activation_offload is autotune-only" in text) == (fmt != "axolotl")
    assert "autotune-only" not in render(fmt, recipe("qdora"), None, num_layers=28)


@pytest.mark.parametrize("fmt", ["hf", "axolotl", "llamafactory"])
def test_the_cpu_offload_optimizer_is_named_autotune_only(fmt):
    text = render(fmt, recipe("cpu-offload-optimizer"), None, num_layers=28)
    assert "optimizer adamw_cpu_offload is autotune-only" in text


def test_llamafactory_trains_a_bf16_full_or_freeze_recipe_in_bf16():
    """autotune's bf16 keeps the trained weights in bf16; LLaMA-Factory, unless told
    pure_bf16, upcasts them to fp32 (AMP): twice the weights, gradients and optimizer states the
    probe measured. A LoRA adapter is fp32 in both (peft's default), and amp_bf16 is AMP in both."""
    for fields in ({"method": "full"}, {"method": "freeze", "frozen_layers": 2}):
        config = llamafactory_config(
            Recipe.from_dict({**fields, "precision": "bf16"}), num_layers=4
        )
        assert config["pure_bf16"] is True and config["bf16"] is True
    for fields in (
        {"method": "full", "precision": "amp_bf16"},
        {"method": "lora", "lora_r": 8, "precision": "bf16"},
        {"method": "full", "precision": "fp32"},
        # LLaMA-Factory refuses pure_bf16 beside ZeRO-3 (its bf16 mode keeps bf16 weights)
        {"method": "full", "precision": "bf16", "distributed": "deepspeed_zero3", "num_gpus": 2},
    ):
        assert "pure_bf16" not in llamafactory_config(Recipe.from_dict(fields), num_layers=4)


def test_hf_export_loads_the_weights_in_the_dtype_the_probe_trained():
    """TrainingArguments' bf16 is autocast alone: the weights' dtype is from_pretrained's, and
    left out it is the checkpoint's (fp32 for many), not the recipe's bf16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for precision, dtype in (("bf16", "bfloat16"), ("amp_bf16", "float32"), ("fp16", "float16")):
        config = hf_config(Recipe.from_dict({"method": "full", "precision": precision}))
        assert config["dtype"] == dtype
    # a k-bit base's unquantized weights load in the compute dtype, as the probe loads them
    qlora = Recipe.from_dict({"method": "lora", "quantization": "nf4", "precision": "amp_bf16"})
    assert hf_config(qlora)["dtype"] == str(load_dtype(qlora)).removeprefix("torch.") == "bfloat16"
    # from_pretrained's keyword, as transformers names it
    tiny = AutoConfig.for_model(
        "llama",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=32,
    )
    model = AutoModelForCausalLM.from_config(tiny, dtype=config["dtype"])
    assert str(next(model.parameters()).dtype) == "torch.float16"


def test_trainer_exports_turn_the_loss_scaler_on_only_where_trained_weights_are_fp32():
    """Trainer's and accelerate's fp16 is autocast with a loss scaler, which refuses fp16
    gradients: an fp16 full or freeze recipe exported with fp16 on crashed at its first
    clipped step. Such a recipe trains its fp16 weights without a scaler, as the probe does."""
    import torch

    from autotune.formats import accelerate_config

    weights = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    weights.grad = torch.ones(2, dtype=torch.float16)
    optimizer = torch.optim.SGD([weights], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones((), dtype=torch.float16))  # as Trainer scales its loss
    with pytest.raises(ValueError, match="FP16 gradients"):  # why: the scaler refuses them
        scaler.unscale_(optimizer)

    for precision in ("bf16", "fp16", "fp32", "amp_bf16", "amp_fp16"):
        for fields in (
            {"method": "full"},
            {"method": "freeze", "frozen_layers": 1},
            {"method": "lora", "lora_r": 8},
        ):
            recipe_ = Recipe.from_dict({**fields, "precision": precision})
            config = hf_config(recipe_)
            scaled = config["training_arguments"]["fp16"]
            fp32_trained = fields["method"] == "lora" or config["dtype"] == "float32"
            assert scaled == (precision in ("fp16", "amp_fp16") and fp32_trained), (
                precision,
                fields,
            )
            mixed = accelerate_config(recipe_)["mixed_precision"]
            assert (mixed == "fp16") == scaled, (precision, fields, mixed)
            # axolotl's fp16 is the same scaler; its float16 is fp16 weights without AMP
            axolotl = axolotl_config(recipe_, "train.jsonl")
            assert axolotl["fp16"] == scaled, (precision, fields)
            assert axolotl.get("float16", False) == (precision == "fp16" and not scaled)


def _llamafactory_trainable(names: list[str], config: dict, num_layers: int = 4) -> set[str]:
    """The parameters LLaMA-Factory's freeze tuning trains, as its _setup_freeze_tuning
    (src/llamafactory/model/adapter.py, hiyouga/LLaMA-Factory ff6d4d12) picks them: the last
    freeze_trainable_layers blocks' modules, and freeze_extra_modules, by substring."""
    import re

    count = config["freeze_trainable_layers"]
    layers = range(max(0, num_layers - count), num_layers)
    top_level = {n.split(".")[-2] for n in names if re.search(r"\.\d+\.", n) is None}
    picked = []
    for module in config["freeze_trainable_modules"].split(","):
        picked += [f".{i}.{module if module != 'all' else ''}" for i in layers]
    extra = config.get("freeze_extra_modules")
    for module in extra.split(",") if extra else []:
        if module not in top_level:  # its own check: "Module ... is not found"
            raise ValueError(f"Module {module} is not found")
        picked.append(module)
    return {n for n in names if any(p in n for p in picked)}


@pytest.mark.parametrize("train_modules", ["all", "attention", "mlp"])
@pytest.mark.parametrize("tied", [False, True])
def test_llamafactory_freeze_trains_what_autotune_trained_but_the_final_norm(train_modules, tied):
    """LLaMA-Factory's freeze trains the chosen blocks' modules and freeze_extra_modules;
    autotune's also trains the final norm and an untied head. The head is named (a tied one is
    no parameter of its own there, and refused); the final norm cannot be, and the header says
    so."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    from autotune.training.build import prepare_model
    from tests.conftest import DEMO

    fields = json.loads((DEMO / "config.json").read_text())
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **{**fields, "tie_word_embeddings": tied})
    model = AutoModelForCausalLM.from_config(config)
    recipe = Recipe.from_dict(
        {"method": "freeze", "frozen_layers": 1, "train_modules": train_modules}
    )
    prepare_model(model, recipe)
    names = [name for name, _ in model.named_parameters()]
    ours = {name for name, p in model.named_parameters() if p.requires_grad}
    exported = llamafactory_config(recipe, num_layers=4, tied_head=tied)
    theirs = _llamafactory_trainable(names, exported)
    assert ours - theirs == {"model.norm.weight"} and theirs <= ours
    assert ("lm_head.weight" in theirs) == (not tied)
    text = render("llamafactory", recipe, None, num_layers=4, tied_head=tied)
    assert "LLaMA-Factory cannot train model.norm alone" in text
    assert "did not record whether the output head is tied" not in text
    unknown = render("llamafactory", recipe, None, num_layers=4)
    assert "did not record whether the output head is tied" in unknown
    assert "freeze_extra_modules" not in yaml.safe_load(unknown)


def test_an_axolotl_export_of_amp_says_axolotl_loads_half_weights():
    """axolotl's bf16 sets the dtype the model loads in (resolve_dtype: torch_dtype bfloat16,
    axolotl-ai-cloud/axolotl 067b021c), with no key for fp32 weights under autocast: an
    amp_bf16 recipe's fp32 weights would load in bf16, and the header says so."""
    full_amp = Recipe.from_dict({"method": "full", "precision": "amp_bf16"})
    amp = render("axolotl", full_amp, None)
    assert yaml.safe_load(amp)["bf16"] is True
    assert (
        "# precision amp_bf16: axolotl loads the weights in bfloat16 (bf16: true sets its model "
        "dtype; it has no key for float32 weights under autocast), less memory than autotune "
        "measured" in amp
    )
    assert "loads the weights in" not in render(
        "axolotl", Recipe.from_dict({"method": "full"}), None
    )
    # a k-bit base's other weights are loaded in the compute dtype by autotune too
    qlora_amp = recipe("qlora").replace(precision="amp_bf16")
    assert "loads the weights in" not in render("axolotl", qlora_amp, None)
    assert "loads the weights in" not in render("hf", full_amp, None)


TINY_FAMILIES = {
    "qwen2": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4},
    "falcon": {"hidden_size": 64, "num_attention_heads": 4},
    "gpt2": {"n_embd": 64, "n_head": 4, "n_positions": 64},
}
"""Families whose blocks name their parts apart: Qwen2 self_attn/mlp, GPT-NeoX attention/mlp,
Falcon self_attention/mlp, GPT-2 attn/mlp (with a tied head, and position embeddings that
train)."""


def _axolotl_unfrozen(names: list[str], patterns: list[str]) -> set[str]:
    """The parameters axolotl's freeze_layers_except leaves trainable: its LayerNamePattern
    (src/axolotl/utils/freeze.py, axolotl-ai-cloud/axolotl 107c67ae) turns every `.` not followed
    by `+` into a literal dot and matches at the start of the name."""
    import re

    compiled = [re.compile(re.sub(r"\.(?!\+)", "\\.", pattern)) for pattern in patterns]
    return {name for name in names if any(c.match(name) for c in compiled)}


@pytest.mark.parametrize("model_type", sorted(TINY_FAMILIES))
@pytest.mark.parametrize("train_modules", ["all", "attention", "mlp"])
def test_freeze_exports_name_the_parameters_training_unfreezes(model_type, train_modules):
    """The exports' freeze patterns come from the layout a study stores of its model, which
    training's own freeze selection gives: a GPT-NeoX or GPT-2 recipe exported Llama's
    model.layers/self_attn names, which match none of their parameters. (LLaMA-Factory cannot
    name a module whose name is inside others', Llama's final norm: its header says so.)"""
    import json
    import re

    from transformers import AutoConfig, AutoModelForCausalLM

    from autotune.architecture import read_architecture
    from autotune.training.build import prepare_model
    from autotune.training.freeze import FreezeLayout

    fields = {"num_hidden_layers": 3, "vocab_size": 256, **TINY_FAMILIES[model_type]}
    config = AutoConfig.for_model(model_type, **fields)
    architecture = read_architecture(config)
    assert architecture is not None and architecture.freeze_layout is not None
    layout = FreezeLayout.from_dict(json.loads(json.dumps(architecture.freeze_layout.to_dict())))
    recipe = Recipe.from_dict(
        {"method": "freeze", "frozen_layers": 1, "train_modules": train_modules}
    )
    model = AutoModelForCausalLM.from_config(config)
    prepare_model(model, recipe)
    names = [name for name, _ in model.named_parameters()]
    ours = {name for name, p in model.named_parameters() if p.requires_grad}
    assert ours and len(ours) < len(names)

    axolotl = axolotl_config(recipe, "train.jsonl", freeze_layout=layout)
    assert _axolotl_unfrozen(names, axolotl["unfrozen_parameters"]) == ours
    hf = hf_config(recipe, freeze_layout=layout)["trainable_parameters"]
    assert {name for name in names if any(re.match(p, name) for p in hf)} == ours
    llamafactory = llamafactory_config(recipe, freeze_layout=layout)
    unnamed = {n for n in ours if n.rpartition(".")[0] in layout.ambiguous_outside}
    assert _llamafactory_trainable(names, llamafactory, 3) == ours - unnamed
    assert bool(unnamed) == (model_type == "qwen2")  # model.norm, in every block's norms
    text = render("llamafactory", recipe, None, freeze_layout=layout)
    assert ("cannot train model.norm alone" in text) == (model_type == "qwen2")
    assert "did not record whether the output head is tied" not in text


@pytest.mark.parametrize("fmt", ["hf", "axolotl"])
def test_a_study_without_a_layout_exports_its_tied_head_untouched_and_says_names_are_assumed(fmt):
    """A study from before layouts were stored records tie_word_embeddings: a tied head is the
    input embedding, so no pattern names lm_head (with remove_duplicate=False it would unfreeze
    the embedding); the Llama names are said to be assumed."""

    def patterns(text: str) -> list[str]:
        body = yaml.safe_load(text)
        found = body["unfrozen_parameters"] if fmt == "axolotl" else body["trainable_parameters"]
        return list(found)

    tied = render(fmt, recipe("freeze"), None, num_layers=28, tied_head=True)
    untied = render(fmt, recipe("freeze"), None, num_layers=28, tied_head=False)
    assert not any("lm_head" in p for p in patterns(tied))
    assert any("lm_head" in p for p in patterns(untied))
    assert "named as the Llama family names them" in tied
