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

from autotune.distributed import deepspeed_installed
from autotune.formats import (
    accelerate_config,
    axolotl_config,
    hf_config,
    llamafactory_config,
    render,
)
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
    "max_grad_norm",
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
    faster = measured_figures(trial, dataclasses.replace(stand_in, speed_change=0.5))
    written = render("autotune", recipe("qlora"), faster)
    assert "(its speed varies by more than ±15% here)" in " ".join(written.split())
    assert "\\x" not in written
    assert yaml.safe_load(written)["measured"]["confirmation"]["verdict"].endswith("here)")


def test_render_puts_measured_figures_in_comments():
    text = render(
        "axolotl",
        recipe("qlora"),
        {
            "tokens_per_second": 1234.5,
            "peak_memory_bytes": 127873024,
            "predicted_peak_bytes": 710934528,
            "memory_margin": 0.173671,
        },
        data_path="d.jsonl",
        num_layers=28,
    )
    assert text.startswith("# QLoRA nf4 r16")
    assert "# measured tokens_per_second: 1234.5" in text
    # sizes and the margin as people read them, as the run's output and the report say them
    assert "# measured peak_memory: 121.9 MiB" in text
    assert "# predicted_peak: 678.0 MiB" in text  # a prediction is not called measured
    assert "# memory_margin: 17.4%" in text
    assert "127873024" not in text and "710934528" not in text and "0.173671" not in text
    assert "measured predicted" not in text
    assert yaml.safe_load(text)["base_model"] == "Qwen/Qwen2-7B"
    # a CPU probe measured its resident memory's growth, which the header says as the run does
    on_cpu = render(
        "hf",
        recipe("qlora"),
        {"peak_memory_bytes": 127873024, "memory_source": "cpu_peak_rss_delta"},
    )
    assert "# measured peak_memory: CPU RSS +121.9 MiB" in on_cpu
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


def test_llamafactory_trains_a_bf16_full_or_freeze_recipe_in_bf16_without_amp():
    """autotune's bf16 keeps the trained weights in bf16; LLaMA-Factory, unless told
    pure_bf16, upcasts them to fp32 (AMP): twice the weights, gradients and optimizer states the
    probe measured. pure_bf16 goes with bf16 off, as its web UI writes it (runner.py): its bf16
    beside it is TrainingArguments' autocast, which the probe never ran. A LoRA adapter is fp32
    in autotune (peft's default) and bf16 under pure_bf16, and amp_bf16 is AMP in both."""
    for fields in ({"method": "full"}, {"method": "freeze", "frozen_layers": 2}):
        bf16 = Recipe.from_dict({**fields, "precision": "bf16"})
        config = llamafactory_config(bf16, num_layers=4)
        assert config["pure_bf16"] is True and config["bf16"] is False and config["fp16"] is False
        assert "autocast" not in render("llamafactory", bf16, None, num_layers=4)
    # under ZeRO-2 bf16 picks DeepSpeed's bf16 mode (the probe's), which autocasts nothing
    zero2 = {"method": "full", "precision": "bf16", "distributed": "deepspeed_zero2", "num_gpus": 2}
    config = llamafactory_config(Recipe.from_dict(zero2), num_layers=4)
    assert config["pure_bf16"] is True and config["bf16"] is True
    for fields in (
        {"method": "full", "precision": "amp_bf16"},
        {"method": "lora", "lora_r": 8, "precision": "bf16"},
        {"method": "full", "precision": "fp32"},
        # LLaMA-Factory refuses pure_bf16 beside ZeRO-3 (its bf16 mode keeps bf16 weights)
        {"method": "full", "precision": "bf16", "distributed": "deepspeed_zero3", "num_gpus": 2},
    ):
        config = llamafactory_config(Recipe.from_dict(fields), num_layers=4)
        assert "pure_bf16" not in config and config["bf16"] is (fields["precision"] != "fp32")
    # where LLaMA-Factory has no key for half weights without AMP, the header says it autocasts
    lora = render("llamafactory", Recipe.from_dict({"method": "lora", "lora_r": 8}), None)
    assert "# precision bf16: LLaMA-Factory runs the forward under bf16 autocast" in lora
    fp16 = Recipe.from_dict({"method": "full", "precision": "fp16", "optimizer": "adamw_8bit"})
    assert "LLaMA-Factory runs the forward under fp16 autocast" in render(
        "llamafactory", fp16, None
    )
    amp = Recipe.from_dict({"method": "lora", "lora_r": 8, "precision": "amp_bf16"})
    assert "autocast" not in render("llamafactory", amp, None)


def _tiny_llama():
    """A one-block Llama config of width 16, for models built on the CPU in a moment."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "llama",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=32,
    )


def test_hf_export_loads_the_weights_in_the_dtype_the_probe_trained():
    """TrainingArguments' bf16 is autocast alone: the weights' dtype is from_pretrained's, and
    left out it is the checkpoint's (fp32 for many), not the recipe's bf16."""
    from transformers import AutoModelForCausalLM

    for precision, dtype in (("bf16", "bfloat16"), ("amp_bf16", "float32"), ("fp16", "float16")):
        config = hf_config(Recipe.from_dict({"method": "full", "precision": precision}))
        assert config["dtype"] == dtype
    # a k-bit base's unquantized weights load in the compute dtype, as the probe loads them
    qlora = Recipe.from_dict({"method": "lora", "quantization": "nf4", "precision": "amp_bf16"})
    assert hf_config(qlora)["dtype"] == str(load_dtype(qlora)).removeprefix("torch.") == "bfloat16"
    # from_pretrained's keyword, as transformers names it
    tiny = _tiny_llama()
    model = AutoModelForCausalLM.from_config(tiny, dtype=config["dtype"])
    assert str(next(model.parameters()).dtype) == "torch.float16"


TRAINED = (
    {"method": "full"},
    {"method": "full", "optimizer": "adamw_8bit"},  # fp16 weights take 8-bit moments
    {"method": "freeze", "frozen_layers": 1, "optimizer": "adamw_8bit"},
    {"method": "lora", "lora_r": 8},
    {"method": "lora", "lora_r": 8, "quantization": "nf4"},
    {"method": "lora", "lora_r": 8, "quantization": "int8"},
)
STRATEGIES = (
    {},
    {"distributed": "fsdp", "num_gpus": 2},
    {"distributed": "deepspeed_zero2", "num_gpus": 2},
)


def _exportable(fields: dict) -> list[Recipe]:
    """The recipe of `fields` in every precision that validates (fp16 weights refuse torch's
    AdamW, a k-bit base FSDP, DeepSpeed amp_fp16)."""
    from autotune.errors import UsageError
    from autotune.precisions import PRECISIONS

    recipes = []
    for precision in PRECISIONS:
        try:
            recipes.append(Recipe.from_dict({**fields, "precision": precision, "model": "m"}))
        except UsageError:
            continue
    return recipes


@pytest.mark.parametrize(
    "trained, strategy",
    [(t, s) for t in TRAINED for s in STRATEGIES if _exportable({**t, **s})],
    ids=lambda fields: "-".join(str(v) for v in fields.values()) or "one",
)
def test_trainer_exports_autocast_where_the_probe_did_and_nowhere_else(
    trained, strategy, monkeypatch
):
    """The probe runs a bf16/fp16 recipe's half weights without autocast, an amp_* one under it
    (build.autocast_dtype). Trainer's bf16/fp16 are accelerate's mixed_precision, which wraps the
    forward in autocast: a QLoRA recipe exported with bf16 on kept a bf16 copy of its fp32 head
    through the loss, a peak the study never measured. Under DeepSpeed they choose its 16-bit
    mode instead, as the probe's DeepSpeed config does; accelerate autocasts nothing there."""
    from transformers import TrainingArguments

    from autotune.formats import accelerate_config
    from autotune.training.build import autocast_dtype, compute_dtype
    from autotune.training.deepspeed_engine import probe_config

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    recipes = _exportable({**trained, **strategy})
    assert {r.precision for r in recipes} >= {"bf16", "fp32", "amp_bf16"}
    for recipe_ in recipes:
        config = hf_config(recipe_)
        flags = {k: config["training_arguments"][k] for k in ("bf16", "fp16")}
        args = TrainingArguments(output_dir="out", use_cpu=True, **flags)
        mixed = accelerate_config(recipe_)["mixed_precision"]
        assert mixed == args.mixed_precision, recipe_.label()  # launched, the same precision
        header = render("hf", recipe_, None)
        said = "false: the weights load in" in header
        if strategy.get("distributed") == "deepspeed_zero2":
            deepspeed = probe_config(recipe_)
            if recipe_.precision != "amp_bf16":  # the header says DeepSpeed's bf16 mode differs
                assert (args.bf16, args.fp16) == (
                    deepspeed["bf16"]["enabled"],
                    deepspeed["fp16"]["enabled"],
                ), recipe_.label()
            else:
                assert "not the autocast over fp32 weights autotune measured" in header
            assert not said
            continue
        autocast = autocast_dtype(recipe_)
        assert (args.mixed_precision != "no") == (autocast is not None), recipe_.label()
        if autocast is not None:  # amp_*: autocast in the probe's compute dtype, as before
            names = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}
            assert args.mixed_precision == names[str(autocast)], recipe_.label()
        # the header says why the flags are off where the weights are half
        assert said == (autocast is None and recipe_.precision != "fp32"), recipe_.label()
        # the weights load in the probe's dtype, whatever the flags
        assert config["dtype"] == str(load_dtype(recipe_)).removeprefix("torch.")
        bitsandbytes = config.get("bits_and_bytes_config")
        if bitsandbytes and "bnb_4bit_compute_dtype" in bitsandbytes:
            compute = str(compute_dtype(recipe_)).removeprefix("torch.")
            assert bitsandbytes["bnb_4bit_compute_dtype"] == compute, recipe_.label()


def test_hf_export_quantizes_with_the_compute_dtype_the_probe_ran():
    """The probe's BitsAndBytesConfig computes a k-bit base in the recipe's compute dtype
    (build.quantization_config): an fp32 QLoRA recipe's 4-bit matmuls run in fp32. The hf export
    wrote bfloat16 for every precision without fp16, activations of half the bytes measured."""
    from autotune.training.build import quantization_config

    for precision in ("fp32", "bf16", "fp16", "amp_bf16", "amp_fp16"):
        fields = {"method": "lora", "lora_r": 8, "quantization": "nf4", "precision": precision}
        recipe_ = Recipe.from_dict({**fields, "model": "m"})
        exported = hf_config(recipe_)["bits_and_bytes_config"]
        probed = quantization_config(recipe_).to_dict()
        assert exported["bnb_4bit_compute_dtype"] == probed["bnb_4bit_compute_dtype"], precision


def test_a_trainer_run_from_the_hf_export_trains_bf16_weights_without_autocast(tmp_path):
    """transformers' Trainer, given the hf export's TrainingArguments and a model loaded in its
    `dtype`, trains the bf16 weights outside autocast and in bf16, as the probe does; the bf16:
    true the export wrote before ran every block under autocast."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    recipe_ = Recipe.from_dict(
        {"method": "full", "micro_batch_size": 2, "optimizer": "adamw", "model": "m"}
    )
    config = hf_config(recipe_, output_dir=str(tmp_path))
    tiny = _tiny_llama()
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 2
    quiet = {"use_cpu": True, "max_steps": 1, "report_to": [], "save_strategy": "no"}

    def autocast_seen(training: dict) -> list[bool]:
        model = AutoModelForCausalLM.from_config(tiny, dtype=config["dtype"])
        seen: list[bool] = []
        block = model.model.layers[0]
        block.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        args = TrainingArguments(**{**training, **quiet})
        Trainer(model=model, args=args, train_dataset=rows).train()
        assert next(model.parameters()).dtype == torch.bfloat16
        return seen

    training = config["training_arguments"]
    assert training["bf16"] is False and TrainingArguments(**training, use_cpu=True).bf16 is False
    assert autocast_seen(training) and not any(autocast_seen(training))
    assert all(autocast_seen({**training, "bf16": True}))  # what bf16: true ran


def test_a_trainer_run_from_the_hf_export_clips_no_gradient_as_autotune_trains(
    tmp_path, monkeypatch
):
    """autotune's probes and `autotune train` clip no gradient; transformers' Trainer clips to
    its max_grad_norm, 1.0 unless told, through accelerate's clip_grad_norm_. A Trainer run from
    the hf export's TrainingArguments asks for no finite max-norm (transformers 5 still takes
    the norm for its log, with an infinite one: a scale of 1); the export before, without the
    key, clipped to 1.0 every optimizer step."""
    import math

    import accelerate
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    max_norms: list[float] = []
    clip = accelerate.Accelerator.clip_grad_norm_

    def recorded(self, parameters, max_norm, *args, **kwargs):
        max_norms.append(max_norm)
        return clip(self, parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", recorded)
    recipe_ = Recipe.from_dict(
        {"method": "full", "micro_batch_size": 2, "optimizer": "adamw", "model": "m"}
    )
    training = hf_config(recipe_, output_dir=str(tmp_path))["training_arguments"]
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 4
    quiet = {"use_cpu": True, "max_steps": 2, "report_to": [], "save_strategy": "no"}

    def clipped_to(arguments: dict) -> list[float]:
        """The finite max-norms the Trainer's steps clipped the gradients to."""
        max_norms.clear()
        model = AutoModelForCausalLM.from_config(_tiny_llama())
        args = TrainingArguments(**{**arguments, **quiet})
        Trainer(model=model, args=args, train_dataset=rows).train()
        assert len(max_norms) == 2  # one norm per optimizer step
        return [norm for norm in max_norms if not math.isinf(norm)]

    assert TrainingArguments(**training, use_cpu=True).max_grad_norm == 0
    assert clipped_to(training) == []
    without = {k: v for k, v in training.items() if k != "max_grad_norm"}
    assert clipped_to(without) == [1.0, 1.0]  # the Trainer's default


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_trainer_based_export_turns_gradient_clipping_off(name):
    """The axolotl and LLaMA-Factory exports hand max_grad_norm 0 to TrainingArguments (axolotl
    passes it on where set, LLaMA-Factory's are Seq2SeqTrainingArguments); a DeepSpeed export
    writes gradient_clipping 0, which the Trainer checks against max_grad_norm; the accelerate
    export's DeepSpeedPlugin takes it. Each header says so."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers import Seq2SeqTrainingArguments

    recipe_ = recipe(name)
    axolotl = axolotl_config(recipe_, num_layers=28)
    llamafactory = llamafactory_config(recipe_, num_layers=28)
    assert axolotl["max_grad_norm"] == llamafactory["max_grad_norm"] == 0
    assert Seq2SeqTrainingArguments(output_dir="o", max_grad_norm=0.0).max_grad_norm == 0
    deepspeed = hf_config(recipe_)["training_arguments"].get("deepspeed")
    if deepspeed is not None:
        assert deepspeed["gradient_clipping"] == 0
    if isinstance(axolotl.get("deepspeed"), dict):  # with offload, the config itself
        assert axolotl["deepspeed"]["gradient_clipping"] == 0
    accelerate = accelerate_config(recipe_).get("deepspeed_config")
    if accelerate is not None:
        assert DeepSpeedPlugin(**accelerate).gradient_clipping == 0
    for fmt in ("hf", "axolotl", "llamafactory"):
        assert "# max_grad_norm: 0.0: no gradient clipping" in render(fmt, recipe_, None)
    accelerate_header = render("accelerate", recipe_, None)
    assert (
        "# no gradient clipping, as autotune trained: give the launched script's Trainer "
        "max_grad_norm: 0.0" in accelerate_header
    )


@pytest.mark.skipif(not deepspeed_installed(), reason="deepspeed is not installed")
def test_the_deepspeed_configs_the_trainer_finalizes_from_the_exports_clip_nothing():
    """transformers fills a DeepSpeed config's "auto" gradient_clipping with max_grad_norm and
    refuses a config whose value differs from it: the hf export's config (0) matches its
    TrainingArguments, and the JSON axolotl and LLaMA-Factory ship ("auto") takes their 0."""
    import copy

    from transformers import Seq2SeqTrainingArguments, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    zero2 = Recipe.from_dict(
        {"method": "full", "model": "m", "distributed": "deepspeed_zero2", "num_gpus": 2}
    )
    training = dict(hf_config(zero2)["training_arguments"])
    exported = HfTrainerDeepSpeedConfig(copy.deepcopy(training.pop("deepspeed")))
    exported.trainer_config_process(TrainingArguments(**training, use_cpu=True))
    assert exported.mismatches == [] and exported.config["gradient_clipping"] == 0
    shipped = HfTrainerDeepSpeedConfig(
        {"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}
    )
    keys = llamafactory_config(zero2)
    shipped.trainer_config_process(
        Seq2SeqTrainingArguments(output_dir="o", use_cpu=True, max_grad_norm=keys["max_grad_norm"])
    )
    assert shipped.config["gradient_clipping"] == 0


def test_axolotl_and_llamafactory_exports_autocast_only_where_they_have_no_key_without():
    """axolotl's float16 ("No AMP") trains fp16 weights without autocast; its bfloat16, also
    documented "No AMP", turns TrainingArguments' bf16 on (_configure_precision_settings), so a
    bf16 recipe keeps bf16 and the header says axolotl autocasts. The amp_* flags are as
    before."""
    for fields in TRAINED:
        for recipe_ in _exportable(fields):
            axolotl = axolotl_config(recipe_, "train.jsonl")
            header = render("axolotl", recipe_, None)
            said = "axolotl runs the forward under bf16 autocast" in header
            assert said == (recipe_.precision == "bf16"), recipe_.label()
            float16 = recipe_.precision == "fp16"  # fp16 weights: float16, no AMP
            assert axolotl.get("float16", False) == float16, recipe_.label()
            assert axolotl["fp16"] == (recipe_.precision == "amp_fp16"), recipe_.label()
            assert axolotl["bf16"] == (recipe_.precision in ("bf16", "amp_bf16"))
            assert "fp16 autocast" not in header
    # DeepSpeed's fp16 mode (the probe's) is axolotl's fp16; it autocasts nothing there
    zero2 = Recipe.from_dict(
        {
            "method": "full",
            "precision": "fp16",
            "optimizer": "adamw_8bit",
            "distributed": "deepspeed_zero2",
            "num_gpus": 2,
        }
    )
    assert axolotl_config(zero2)["fp16"] is True and "float16" not in axolotl_config(zero2)
    assert "autocast" not in render("axolotl", zero2, None)


def test_a_launch_line_overrides_an_accelerate_config_s_mixed_precision_where_flags_are_off():
    """accelerate launch hands its config file's mixed_precision to the Trainer, which takes it
    where its bf16/fp16 are off: LLaMA-Factory's fsdp2_config.yaml says bf16."""
    fsdp = {"method": "full", "distributed": "fsdp", "num_gpus": 2}
    for fmt in ("hf", "llamafactory"):
        line = render(fmt, Recipe.from_dict(fsdp), None, num_layers=4)
        assert "accelerate launch --num_processes 2 --mixed_precision no " in line
        amp = render(fmt, Recipe.from_dict({**fsdp, "precision": "amp_bf16"}), None)
        assert "accelerate launch --num_processes 2 " in amp and "--mixed_precision" not in amp
    # fp32 weights train without autocast too: LLaMA-Factory's bf16 config autocast them
    for fmt in ("hf", "llamafactory"):
        fp32 = render(fmt, Recipe.from_dict({**fsdp, "precision": "fp32"}), None, num_layers=4)
        assert "accelerate launch --num_processes 2 --mixed_precision no " in fp32, fmt
    # LoRA under LLaMA-Factory keeps bf16 on (no key without AMP): no override against it
    lora = Recipe.from_dict({**fsdp, "method": "lora", "lora_r": 8})
    assert "--mixed_precision" not in render("llamafactory", lora, None)


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
