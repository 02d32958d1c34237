import pytest
import yaml

from autotune.errors import UsageError
from autotune.recipe import Recipe

QLORA = {
    "autotune_recipe": 1,
    "model": "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "method": "lora",
    "quantization": "nf4",
    "precision": "bf16",
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_modules": "all-linear",
    "frozen_layers": 0,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "gradient_checkpointing": True,
    "optimizer": "adamw",
    "learning_rate": 2.0e-4,
    "seq_len": 1024,
}


def test_design_example_loads_and_round_trips():
    recipe = Recipe.from_dict(QLORA)
    assert recipe.quantization == "nf4" and recipe.effective_batch_size == 16
    text = recipe.to_yaml(measured={"peak_memory_bytes": 123, "tokens_per_second": 4.5})
    assert Recipe.from_yaml(text) == recipe
    data = yaml.safe_load(text)
    assert list(data)[:3] == ["autotune_recipe", "model", "method"]
    assert data["measured"]["peak_memory_bytes"] == 123


def test_module_list_round_trips_as_yaml_list():
    recipe = Recipe.from_dict({**QLORA, "lora_target_modules": ["q_proj", "v_proj"]})
    assert recipe.lora_target_modules == ("q_proj", "v_proj")
    assert yaml.safe_load(recipe.to_yaml())["lora_target_modules"] == ["q_proj", "v_proj"]
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_full_recipe_has_no_lora_keys():
    recipe = Recipe.from_dict({"method": "full", "model": "m", "precision": "amp_bf16"})
    data = recipe.to_dict()
    assert not any(key.startswith("lora_") for key in data)
    assert Recipe.from_dict(data) == recipe


def test_all_problems_reported_at_once():
    with pytest.raises(UsageError) as error:
        Recipe.from_dict({**QLORA, "precision": "fp8", "micro_batch_size": 0, "optimizer": "sgd"})
    message = str(error.value)
    assert "precision" in message and "micro_batch_size" in message and "optimizer" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"method": "full"}, "given but method is full"),
        (
            {
                "method": "freeze",
                "lora_r": None,
                "lora_alpha": None,
                "lora_dropout": None,
                "lora_target_modules": None,
                "quantization": "none",
            },
            "frozen_layers >= 1",
        ),
        ({"frozen_layers": 2}, "frozen_layers is for method freeze"),
        ({"train_modules": "attention"}, "train_modules is for method freeze, not lora"),
        ({"train_modules": "heads"}, "train_modules 'heads' is not one of all, attention, mlp"),
        ({"use_dora": "yes"}, "use_dora must be true or false"),
        (
            {"optimizer": "adamw_cpu_offload", "precision": "amp_fp16"},
            "optimizer adamw_cpu_offload cannot run with amp_fp16's loss scaling",
        ),
        ({"activation_offload": 1}, "activation_offload must be true or false"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"lora_dropout": float("nan")}, "lora_dropout"),
        ({"bogus": 1}, "unknown keys bogus"),
        ({"lora_r": 100_000_000}, "lora_r must be an integer from 1 to 65536"),
        ({"micro_batch_size": 1_000_000_000}, "micro_batch_size must be an integer from 1"),
        ({"seq_len": 0}, "seq_len must be an integer from 1"),
        ({"seq_len": 1 << 30}, "seq_len must be an integer from 1"),
        ({"gradient_accumulation_steps": True}, "gradient_accumulation_steps must be"),
        ({"learning_rate": float("inf")}, "learning_rate must be a finite number above 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a finite number above 0"),
        ({"learning_rate": -1e-4}, "learning_rate must be a finite number above 0"),
        ({"lora_alpha": float("inf")}, "lora_alpha must be a positive finite number"),
        ({"model": [1, 2]}, "model must be a hub id or a directory"),
    ],
)
def test_contradictions(changes, needle):
    data = {k: v for k, v in {**QLORA, **changes}.items() if v is not None}
    with pytest.raises(UsageError, match=needle):
        Recipe.from_dict(data)


def test_quantized_full_is_rejected():
    with pytest.raises(UsageError, match="needs method lora"):
        Recipe.from_dict({"method": "full", "quantization": "nf4"})


@pytest.mark.parametrize(
    "changes",
    [
        {"method": ["lora"]},
        {"optimizer": ["adamw"], "precision": {"bf16": 1}},
        {"distributed": ["ddp"], "num_gpus": 2, "offload": ["optimizer"]},
        {"distributed": "ddp", "num_gpus": 2, "optimizer": ["adamw"]},
    ],
)
def test_a_named_choice_written_as_a_list_is_a_problem_not_a_crash(changes):
    # a YAML list or mapping where a name belongs cannot be looked up in a registry
    with pytest.raises(UsageError) as error:
        Recipe.from_dict({**QLORA, "quantization": "none", **changes})
    for name, value in changes.items():
        if isinstance(value, (list, dict)):
            assert f"{name} {changes[name]!r} is not one of" in str(error.value)


def test_missing_method_and_bad_files(tmp_path):
    with pytest.raises(UsageError, match="missing required key method"):
        Recipe.from_dict({"model": "m"})
    with pytest.raises(UsageError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nlora_r: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML") as error:
        Recipe.load(bad)
    # where and what, in one line
    assert "(line 3 column 1: expected ',' or ']', but got '<stream end>')" in str(error.value)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    # PyYAML keeps the last value silently: an edit to the first lora_r would not count
    twice = tmp_path / "twice.yaml"
    twice.write_text(yaml.safe_dump(QLORA, sort_keys=False) + "lora_r: 4\n")
    with pytest.raises(UsageError) as error:
        Recipe.load(twice)
    assert "line 17 column 1: key lora_r given twice (first on line 6)" in str(error.value)


def test_measured_block_is_ignored_on_read():
    recipe = Recipe.from_dict({**QLORA, "measured": {"eval_loss": 1.0}})
    assert recipe == Recipe.from_dict(QLORA)


def test_label_names_the_strategy():
    frozen = {"method": "freeze", "frozen_layers": 2, "precision": "bf16", "micro_batch_size": 4}
    assert Recipe.from_dict(frozen).label() == "freeze 2 bf16 mb4 gc"
    assert (
        Recipe.from_dict({**frozen, "train_modules": "mlp"}).label() == "freeze 2 mlp bf16 mb4 gc"
    )
    assert "train_modules" not in Recipe.from_dict(frozen).to_dict()
    assert Recipe.from_dict({**frozen, "train_modules": "mlp"}).to_dict()["train_modules"] == "mlp"
    assert Recipe.from_dict(QLORA).label() == "QLoRA nf4 r16 all-linear bf16 mb4 gc"


def test_dora_and_offload_are_written_only_when_on():
    """Recipes from before the switches read, write and hash as they did."""
    assert not {"use_dora", "activation_offload"} & set(Recipe.from_dict(QLORA).to_dict())
    switched = Recipe.from_dict({**QLORA, "use_dora": True, "activation_offload": True})
    assert switched.to_dict()["use_dora"] is True
    assert switched.to_dict()["activation_offload"] is True
    assert Recipe.from_yaml(switched.to_yaml()) == switched
    assert switched.label() == "QDoRA nf4 r16 all-linear bf16 mb4 gc offload"
    with pytest.raises(UsageError, match="use_dora is for method lora, not full"):
        Recipe.from_dict({"method": "full", "use_dora": True})


def test_fp16_weights_with_torch_adamw_are_refused_for_what_the_moments_do(tmp_path):
    """torch's AdamW keeps fp16 weights' moments in fp16. After a step of gradients under
    about 5e-3, the second moment (0.001 x grad^2) is 0: the foreach step divides by it and by
    eps 1e-8, 0 in fp16 too (infinite weights, a NaN loss next), and the fused kernel, which
    computes in fp32, stores it back as 0. `train` refuses a full or freeze recipe that trains
    fp16 weights with it; LoRA (fp32 adapters), 8-bit moments, fp32 weights (amp_fp16) and
    DeepSpeed (fp32 master weights and moments) train."""
    import torch

    for kind in ({"foreach": True}, {"fused": True}):
        weight = torch.nn.Parameter(torch.full((4,), 0.02, dtype=torch.float16))
        weight.grad = torch.full((4,), 1e-3, dtype=torch.float16)
        optimizer = torch.optim.AdamW([weight], lr=1e-5, weight_decay=0.0, **kind)
        optimizer.step()
        assert (optimizer.state[weight]["exp_avg_sq"] == 0).all(), kind
        # foreach: m / (0 + 0) makes the weights infinite (0 / 0, NaN, where a gradient is 0)
        assert weight.isfinite().all() != ("foreach" in kind), kind
    from autotune.recipe_checks import fp16_moments_refusal
    from autotune.training.train import train

    for fields in (
        {"method": "full"},
        {"method": "freeze", "frozen_layers": 1, "optimizer": "adamw_foreach"},
    ):
        recipe = Recipe.from_dict({**fields, "precision": "fp16", "model": "m"})  # it reads
        assert "'s AdamW moments in fp16" in fp16_moments_refusal(recipe)
        with pytest.raises(UsageError, match="keeps method .*'s AdamW moments in fp16"):
            train(recipe, tmp_path / "data.jsonl", tmp_path / "out", max_steps=1)  # before files
        assert not (tmp_path / "out").exists()
    for fields in (
        {"method": "lora", "precision": "fp16"},
        {"method": "full", "precision": "fp16", "optimizer": "adamw_8bit"},
        {"method": "full", "precision": "amp_fp16"},
        {"method": "full", "precision": "fp16", "distributed": "deepspeed_zero2", "num_gpus": 2},
    ):
        assert fp16_moments_refusal(Recipe.from_dict(fields)) == "", fields
