"""What a model's code can run: LoRA targets and attention implementations, checked before any
probe, in `estimate`, `train` and the study's search space."""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.architecture import check_recipe, read_architecture
from autotune.errors import UsageError
from autotune.offgpu import run_off_gpu
from autotune.recipe import Recipe
from autotune.replay import load_config
from autotune.report import render_html, report_data
from autotune.space import SearchSpace
from autotune.study import (
    ProbeCrashed,
    _ReportedCrashes,
    describe_unsupported,
    prepare_run,
    run_study,
    supported_space,
)
from tests.conftest import DEMO, ROOT, write_jsonl
from tests.test_study import FakeRunner, settings_for

AUTOTUNE = str(Path(sys.executable).parent / "autotune")
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
}
"""Fields every family below reads; each keeps its own block layout and attention code."""


def config_dir(tmp_path: Path, model_type: str) -> Path:
    """A directory with only a config.json of `model_type` (and the demo tokenizer)."""
    directory = tmp_path / model_type
    directory.mkdir()
    fields = dict(SMALL, model_type=model_type)
    if model_type == "gpt_neox":
        fields.pop("num_key_value_heads")
    (directory / "config.json").write_text(json.dumps(fields), encoding="utf-8")
    for item in (DEMO / "tokenizer").iterdir():
        shutil.copy(item, directory / item.name)
    return directory


def test_linear_names_and_attention_come_from_the_model_code(tmp_path):
    qwen2 = read_architecture(load_config(str(DEMO)))
    assert qwen2.name == "Qwen2ForCausalLM"
    assert set(qwen2.linear_names) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert "sdpa" not in qwen2.attention_refusals
    assert "eager" not in qwen2.attention_refusals

    neox = read_architecture(load_config(str(config_dir(tmp_path, "gpt_neox"))))
    assert "query_key_value" in neox.linear_names and "lm_head" not in neox.linear_names
    assert neox.missing_targets(("q_proj", "v_proj")) == ("q_proj", "v_proj")
    assert neox.missing_targets("all-linear") == ()

    gemma2 = read_architecture(load_config(str(config_dir(tmp_path, "gemma2"))))
    assert "sdpa" in gemma2.attention_refusals and "eager" not in gemma2.attention_refusals
    recipe = Recipe.from_dict({"method": "lora", "lora_target_modules": ["q_proj", "v_proj"]})
    assert gemma2.recipe_problems(recipe) == [
        f"attention sdpa: {gemma2.attention_refusals['sdpa']}"
    ]
    assert gemma2.recipe_problems(recipe.replace(attention="eager")) == []


def test_estimate_and_train_refuse_a_recipe_the_model_cannot_run(tmp_path):
    neox = config_dir(tmp_path, "gpt_neox")
    recipe = tmp_path / "qv.yaml"
    recipe.write_text(
        f"model: {neox}\nmethod: lora\nlora_target_modules: [q_proj, v_proj]\nseq_len: 64\n"
    )
    result = subprocess.run(
        [AUTOTUNE, "estimate", "--model", str(neox), "--recipe", str(recipe)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "q_proj, v_proj" in result.stderr and "query_key_value" in result.stderr
    # the layer the model has is fine: the replay runs the model's own code
    own = tmp_path / "qkv.yaml"
    own.write_text(f"model: {neox}\nmethod: lora\nlora_target_modules: [query_key_value]\n")
    result = subprocess.run(
        [AUTOTUNE, "estimate", "--model", str(neox), "--recipe", str(own), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["memory_model"] == "replay"
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(8)])
    result = subprocess.run(
        [
            AUTOTUNE,
            "train",
            "--recipe",
            str(recipe),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "out"),
            "--max-steps",
            "1",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "query_key_value" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("model_type", "dimension", "dropped", "kept"),
    [
        ("gpt_neox", "lora_target_modules", {"qv", "attention"}, {"all-linear"}),
        ("gemma2", "attention", {"sdpa"}, {"eager"}),
    ],
)
def test_the_search_space_keeps_what_the_model_can_run(
    tmp_path, monkeypatch, model_type, dimension, dropped, kept
):
    monkeypatch.chdir(tmp_path)
    model = config_dir(tmp_path, model_type)
    default = SearchSpace.load(ROOT / "autotune" / "search_spaces" / "default.yaml")
    architecture = read_architecture(load_config(str(model)))
    space, unsupported = supported_space(default, architecture)
    assert set(unsupported[dimension]) == dropped
    assert set(space.choices()[dimension]) == kept
    untouched = [name for name in default.choices() if name != dimension]
    assert all(space.choices()[n] == default.choices()[n] for n in untouched)
    # the same through the run's preparation, which the CLI prints and the study records
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(30)])
    settings = settings_for(
        (tmp_path, model, data), space_path=ROOT / "autotune" / "search_spaces" / "default.yaml"
    )
    prepared = prepare_run(settings)
    # on the CPU, the default space's CUDA-only loss and optimizer are left out too
    _, here = supported_space(default, architecture, "cpu")
    assert set(here) - set(unsupported) == {"loss", "optimizer"}
    assert prepared.unsupported_choices == here and here[dimension] == unsupported[dimension]
    assert set(prepared.space.choices()[dimension]) == kept
    fewer = dataclasses.replace(prepared.settings, trials=2)
    study = run_study(dataclasses.replace(prepared, settings=fewer), FakeRunner())
    page = render_html(report_data(study))
    assert "Not searched, they cannot run here: " + html.escape(describe_unsupported(here)) in page


def test_a_model_with_everything_supported_keeps_the_space():
    default = SearchSpace.load(ROOT / "autotune" / "search_spaces" / "default.yaml")
    space, unsupported = supported_space(default, read_architecture(load_config(str(DEMO))))
    # flash_attention_2 is not in the default space, so nothing is refused
    assert unsupported == {} and space == default


def test_optuna_does_not_repeat_a_crashed_or_stopped_probe_with_a_traceback():
    def record(message: str, error: BaseException | None) -> logging.LogRecord:
        exc_info = (type(error), error, None) if error else None
        return logging.LogRecord("optuna", logging.WARNING, __file__, 1, message, None, exc_info)

    quiet = _ReportedCrashes()
    crash = ProbeCrashed("OSError: no weights")
    assert not quiet.filter(record("Trial 3 failed with parameters: {} because ...", crash))
    assert not quiet.filter(record("Trial 3 failed with value None.", None))
    stopped = KeyboardInterrupt()  # Ctrl-C: the run says it was interrupted
    assert not quiet.filter(record("Trial 5 failed with parameters: {} because ...", stopped))
    assert not quiet.filter(record("Trial 5 failed with value None.", None))
    bug = ValueError("a bug in the objective")
    assert quiet.filter(record("Trial 4 failed with parameters: {} because ...", bug))
    assert quiet.filter(record("Trial 4 failed with value None.", None))


def test_peft_refusals_on_a_mixture_of_experts_leave_lora_out_where_nothing_runs(tmp_path):
    """peft puts all-linear LoRA on Mixtral's stacked expert weights too, and refuses dropout
    there: the recipe is refused, the space keeps the target sets that run, and a space whose
    only LoRA cannot run searches its other methods."""
    mixtral = read_architecture(load_config(str(config_dir(tmp_path, "mixtral"))))
    assert "peft refuses it" in mixtral.lora_refusal("all-linear", 0.05)
    assert mixtral.lora_refusal("all-linear", 0.0) == ""
    assert mixtral.lora_refusal(("q_proj", "v_proj"), 0.05) == ""
    # where a GPU is, a study asks peft in the process that sees none: the same answer
    config = load_config(str(tmp_path / "mixtral"))
    config.num_experts_per_tok = 1  # another config, so neither cache answers
    in_worker = read_architecture(config, run=run_off_gpu)
    assert in_worker.lora_refusal("all-linear", 0.05) == mixtral.lora_refusal("all-linear", 0.05)
    recipe = Recipe.from_dict({"method": "lora", "lora_dropout": 0.05})
    assert mixtral.recipe_problems(recipe)[0].startswith("lora_target_modules all-linear: peft")

    default = SearchSpace.load(ROOT / "autotune" / "search_spaces" / "default.yaml")
    space, unsupported = supported_space(default, mixtral)
    assert set(unsupported["lora_target_modules"]) == {"all-linear"}
    assert set(space.choices_of("lora_target_modules")) == {"qv", "attention"}
    assert "lora" in space.choices_of("method")

    only_all_linear = default.restricted({"lora_target_modules": ["all-linear"]})
    space, unsupported = supported_space(only_all_linear, mixtral)
    assert "lora" not in space.choices_of("method")
    assert space.choices_of("quantization") == ("none",)
    assert set(unsupported["method"]) == {"lora"}
    no_other_method = only_all_linear.restricted({"method": ["lora"]})
    with pytest.raises(UsageError, match="no LoRA target set runs on MixtralForCausalLM"):
        supported_space(no_other_method, mixtral)


def test_freeze_finds_each_family_blocks_or_is_left_out_in_one_line(tmp_path):
    """Freezing finds the decoder blocks where each family keeps them (GPT-NeoX's gpt_neox.layers,
    Falcon's transformer.h: a probe of either crashed on model.layers); OPT keeps them under
    model.decoder, and MPT's blocks name their MLP ffn: those recipes are refused in one line,
    and a study leaves freeze out."""
    neox = read_architecture(load_config(str(config_dir(tmp_path, "gpt_neox"))))
    assert neox.freeze_refusals == {}
    opt = read_architecture(load_config(str(config_dir(tmp_path, "opt"))))
    freeze = Recipe.from_dict({"method": "freeze", "frozen_layers": 1, "attention": "eager"})
    assert opt.recipe_problems(freeze) == [
        "method freeze (train_modules all): OPTForCausalLM has no list of decoder blocks named "
        "layers, h, blocks"
    ]
    mpt = read_architecture(load_config(str(config_dir(tmp_path, "mpt"))))
    assert set(mpt.freeze_refusals) == {"mlp"}
    assert mpt.recipe_problems(freeze.replace(train_modules="mlp"))[0].startswith(
        "method freeze (train_modules mlp): MptBlock has no mlp module"
    )
    # a hybrid's blocks differ: every one must have what is trained (LFM2's convolution blocks
    # have no attention; Qwen3-Next's linear attention is its blocks' attention)
    hybrids = {
        "lfm2": {"layer_types": ["full_attention", "conv"]},
        "qwen3_next": {"layer_types": ["full_attention", "linear_attention"], "head_dim": 16},
    }
    for model_type, fields in hybrids.items():
        config = load_config(str(config_dir(tmp_path, model_type)))
        for name, value in fields.items():
            setattr(config, name, value)
        refusals = read_architecture(config).freeze_refusals
        assert set(refusals) == ({"attention"} if model_type == "lfm2" else set())
    default = SearchSpace.load(ROOT / "autotune" / "search_spaces" / "default.yaml")
    space, unsupported = supported_space(default.restricted({"attention": ["eager"]}), opt)
    assert "freeze" in default.choices_of("method")
    assert "freeze" not in space.choices_of("method") and set(unsupported["method"]) == {"freeze"}
    with pytest.raises(UsageError, match="no method of the space runs on OPTForCausalLM"):
        supported_space(default.restricted({"method": ["freeze"]}), opt)
    # the default space searches train_modules: MPT's freeze trains all or attention, and the
    # study says once why not mlp (its trials were each refused)
    assert default.choices_of("train_modules") == ("all", "attention", "mlp")
    space, unsupported = supported_space(default, mpt)
    assert unsupported["train_modules"] == {"mlp": mpt.freeze_refusals["mlp"]}
    assert space.choices_of("train_modules") == ("all", "attention")
    assert "freeze" in space.choices_of("method")


def test_dora_over_an_int8_base_is_refused_on_the_cpu_where_bitsandbytes_crashes():
    """A DoRA step over an int8 base stops on the CPU in bitsandbytes' int8 matmul (its weight
    scales unset): refused before a probe loads anything; on CUDA, and other bases, it runs."""
    architecture = read_architecture(load_config(str(DEMO)))
    dora = Recipe.from_dict(
        {"model": "m", "method": "lora", "use_dora": True, "quantization": "int8"}
    )
    (problem,) = architecture.recipe_problems(dora, "cpu")
    assert problem.startswith("use_dora with quantization int8 on the CPU: ")
    assert architecture.recipe_problems(dora, "cuda") == []
    assert architecture.recipe_problems(dora.replace(use_dora=False), "cpu") == []
    assert architecture.recipe_problems(dora.replace(quantization="none"), "cpu") == []
    with pytest.raises(UsageError, match="use_dora with quantization int8 on the CPU"):
        check_recipe(dora, load_config(str(DEMO)), "recipe.yaml", "cpu")


def test_peft_refusal_of_a_mamba_hybrid_keeps_its_whole_sentences(tmp_path):
    """peft refuses all-linear LoRA on Falcon-H1's Mamba layers in one line longer than a
    one-line error quotes: the refusal keeps the sentences that name the modules, whole,
    never a word cut in two."""
    from transformers import FalconH1Config

    from autotune.errors import FIRST_LINE_CHARS, first_line

    config = FalconH1Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        mamba_d_ssm=64,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_chunk_size=64,
    )
    refusal = read_architecture(config).lora_refusal("all-linear", 0.0)
    peft_says = refusal.removeprefix("peft refuses it: ")
    assert peft_says != refusal and "\n" not in refusal
    assert len(peft_says) <= FIRST_LINE_CHARS
    assert "is incompatible with Mamba-based models" in peft_says
    named = peft_says.rsplit("Incompatible modules: ", 1)[1]  # a set: either order
    assert named in ("{'conv1d', 'out_proj'}.", "{'out_proj', 'conv1d'}.")
    # a line without a sentence that fits keeps its whole words
    words = first_line(ValueError("incompatible " * 40))
    assert words.endswith("incompatible...") and len(words) <= FIRST_LINE_CHARS
