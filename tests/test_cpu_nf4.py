"""bitsandbytes' NF4 path on CPUs with and without AVX512-BF16, forced either way on any CPU.

With the feature, an NF4 layer repacks its weight for a faster kernel in eval without grad, and
that kernel refuses output widths that are not multiples of 32: the architecture check leaves
such recipes out up front, and models whose widths fit run the packed path for real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from autotune.architecture import check_recipe, read_architecture
from autotune.cpu_nf4 import AVX512_BF16_ENV, cpu_packs_nf4, packed_nf4_misfits
from autotune.errors import UsageError
from autotune.probe import SubprocessProbeRunner
from autotune.replay import load_config
from autotune.space import SearchSpace
from autotune.study import prepare_run, supported_space
from tests.conftest import DEMO, ROOT, write_jsonl
from tests.test_probe import request_for
from tests.test_study import settings_for

CPU_HAS_AVX512_BF16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text(errors="replace")
PATHS = [
    pytest.param("0", id="plain-path"),
    pytest.param(
        "1",
        id="packed-path",
        marks=pytest.mark.skipif(
            not CPU_HAS_AVX512_BF16,
            reason="the packed kernel runs AVX512-BF16 instructions this CPU lacks",
        ),
    ),
]


def misaligned_model(tmp_path: Path) -> Path:
    """The demo model's config with an MLP width (176) the packed kernel refuses."""
    model = tmp_path / "misaligned"
    model.mkdir()
    config = json.loads((DEMO / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 176}))
    for item in (DEMO / "tokenizer").iterdir():
        shutil.copy(item, model / item.name)
    return model


def test_the_cpu_feature_is_read_from_the_cpu_unless_forced(monkeypatch):
    monkeypatch.delenv(AVX512_BF16_ENV, raising=False)
    assert cpu_packs_nf4() == CPU_HAS_AVX512_BF16
    for forced, packs in (("1", True), ("0", False)):
        monkeypatch.setenv(AVX512_BF16_ENV, forced)
        assert cpu_packs_nf4() is packs


def test_misfits_name_each_layer_width_once():
    shapes = [
        ("gate_proj", 176, 64),
        ("up_proj", 176, 64),
        ("q_proj", 64, 64),
        ("down_proj", 32, 96),
        ("x", 32, 3),
        ("wide", 288, 448),
    ]
    assert packed_nf4_misfits(shapes) == [
        "down_proj (96 inputs)",
        "gate_proj (176 outputs)",
        "up_proj (176 outputs)",
        "x (3 inputs)",
    ]


def test_nf4_on_a_packing_cpu_is_refused_for_widths_the_kernel_rejects(tmp_path, monkeypatch):
    from autotune.recipe import Recipe

    model = misaligned_model(tmp_path)
    architecture = read_architecture(load_config(str(model)))
    qlora = Recipe.from_dict({"model": str(model), "method": "lora", "quantization": "nf4"})
    monkeypatch.setenv(AVX512_BF16_ENV, "1")
    [problem] = architecture.recipe_problems(qlora, "cpu")
    assert problem.startswith("quantization nf4: bitsandbytes' NF4 kernel on this CPU")
    assert "gate_proj (176 outputs)" in problem and "up_proj (176 outputs)" in problem
    assert "q_proj" not in problem
    assert architecture.recipe_problems(qlora, "cuda") == []  # the CUDA kernel takes any width
    assert architecture.recipe_problems(qlora.replace(quantization="none"), "cpu") == []
    with pytest.raises(UsageError, match="gate_proj"):
        check_recipe(qlora, load_config(str(model)), "recipe.yaml", "cpu")
    # the demo model's widths fit the kernel
    demo = read_architecture(load_config(str(DEMO)))
    assert demo.recipe_problems(qlora.replace(model=str(DEMO)), "cpu") == []
    # without the feature nothing is refused
    monkeypatch.setenv(AVX512_BF16_ENV, "0")
    assert architecture.recipe_problems(qlora, "cpu") == []


def test_a_run_on_a_packing_cpu_leaves_nf4_out_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(AVX512_BF16_ENV, "1")
    model = misaligned_model(tmp_path)
    default = SearchSpace.load(ROOT / "autotune" / "search_spaces" / "default.yaml")
    space, unsupported = supported_space(default, read_architecture(load_config(str(model))), "cpu")
    # and the default space's CUDA-only loss and optimizer
    assert set(unsupported) == {"quantization", "loss", "optimizer"}
    assert "176 outputs" in unsupported["quantization"]["nf4"]
    quantization = space.choices_of("quantization")
    assert "nf4" not in quantization and "none" in quantization
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(30)])
    prepared = prepare_run(settings_for((tmp_path, model, data), space_path=DEMO_SPACE))
    assert "nf4" in prepared.unsupported_choices["quantization"]
    # the demo space's only other choice
    assert prepared.space.choices_of("quantization") == ("none",)
    # on CUDA the same space keeps NF4
    _, on_gpu = supported_space(default, read_architecture(load_config(str(model))), "cuda")
    assert "quantization" not in on_gpu  # (what it lacks is a package: liger, torchao)
    assert set(on_gpu) <= {"loss", "optimizer"}


DEMO_SPACE = ROOT / "autotune" / "search_spaces" / "demo.yaml"


@pytest.mark.parametrize("forced", PATHS)
def test_nf4_eval_takes_the_forced_path(tiny_model, monkeypatch, forced):
    """In this process: the eval repacks the NF4 weights exactly when the path is on."""
    from autotune.recipe import Recipe
    from autotune.training.build import load_model, prepare_model
    from autotune.training.loop import evaluate

    monkeypatch.setenv(AVX512_BF16_ENV, forced)
    recipe = Recipe.from_dict(
        {"model": str(tiny_model), "method": "lora", "quantization": "nf4", "lora_r": 4}
    )
    model = prepare_model(load_model(recipe, "cpu")[0], recipe)
    tokens = list(range(1, 17))
    example = _example(tokens)
    loss = evaluate(model, [example], recipe, "cpu", 0)
    assert 4.0 < loss < 7.5
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers
    packed = {bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers}
    assert packed == {forced == "1"}


def _example(tokens: list[int]):
    from autotune.data.tokens import TokenizedExample

    return TokenizedExample(input_ids=tokens, labels=tokens)


@pytest.mark.parametrize("forced", PATHS)
def test_an_nf4_probe_measures_on_either_path(tiny_model, qa_data, tmp_path, monkeypatch, forced):
    monkeypatch.setenv(AVX512_BF16_ENV, forced)
    result = SubprocessProbeRunner(timeout_seconds=300, warm=False).run(
        request_for(tiny_model, qa_data, quantization="nf4"), tmp_path / "probe"
    )
    assert result.status == "ok", result.reason
    assert 4.0 < result.eval_loss < 7.5


def test_without_the_packed_path_any_width_probes(tmp_path, qa_data, monkeypatch):
    """The refusal is the packed kernel's alone: with it off, the misaligned model trains."""
    from autotune.random_model import build_random_model

    monkeypatch.setenv(AVX512_BF16_ENV, "0")
    source = misaligned_model(tmp_path)
    model = build_random_model(source / "config.json", tmp_path / "built", DEMO / "tokenizer")
    result = SubprocessProbeRunner(timeout_seconds=300, warm=False).run(
        request_for(model, qa_data, quantization="nf4"), tmp_path / "probe"
    )
    assert result.status == "ok", result.reason


@pytest.mark.skipif(not CPU_HAS_AVX512_BF16, reason="the packed kernel needs AVX512-BF16")
def test_the_packed_kernel_still_refuses_the_widths_the_check_refuses(
    tmp_path, qa_data, monkeypatch
):
    """What the refusal guards against, on a CPU that has the packed path: the probe's eval
    stops in bitsandbytes. If a bitsandbytes release lifts the limit, this test says so."""
    from autotune.random_model import build_random_model

    monkeypatch.setenv(AVX512_BF16_ENV, "1")
    source = misaligned_model(tmp_path)
    model = build_random_model(source / "config.json", tmp_path / "built", DEMO / "tokenizer")
    result = SubprocessProbeRunner(timeout_seconds=300, warm=False).run(
        request_for(model, qa_data, quantization="nf4"), tmp_path / "probe"
    )
    assert result.status == "crash"
    assert "divisible by block_n" in result.reason


@pytest.mark.skipif(not CPU_HAS_AVX512_BF16, reason="the packed kernel needs AVX512-BF16")
def test_nf4_training_goes_on_after_an_eval(tiny_model, qa_data, tmp_path, monkeypatch):
    """`autotune train --eval-steps` on a QLoRA recipe: the eval packed the NF4 weights, and
    the next training step ran the packed inference kernel ("a view of a leaf Variable that
    requires grad is being used in an in-place operation")."""
    from autotune.recipe import Recipe
    from autotune.training.train import train

    monkeypatch.setenv(AVX512_BF16_ENV, "1")
    recipe = Recipe.from_dict(
        {
            "model": str(tiny_model),
            "method": "lora",
            "quantization": "nf4",
            "lora_r": 4,
            "micro_batch_size": 2,
            "seq_len": 48,
        }
    )
    report = train(recipe, qa_data, tmp_path / "out", max_steps=3, eval_steps=1)
    assert report.steps == 3
