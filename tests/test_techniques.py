"""Memory techniques beyond plain LoRA: DoRA and activation offload train on the CPU as the
recipe says, and both memory models price them."""

from __future__ import annotations

import pytest
import torch

from autotune.recipe import Recipe
from autotune.training.train import train
from tests.test_study import workspace  # noqa: F401 - the fixture
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
    from autotune.activation_memory import ADAPTER_BYTES, dora_weight_bytes
    from autotune.memory import estimate
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


def test_activation_offload_trains_to_the_same_losses(tiny_model, qa_data, tmp_path):
    """The saved tensors' round trip through host memory is exact: the same losses step by
    step as the run without it."""
    runs = {
        offload: train(
            lora_recipe(tiny_model, activation_offload=offload, gradient_checkpointing=False),
            qa_data,
            tmp_path / f"out-{offload}",
            max_steps=3,
        ).losses
        for offload in (False, True)
    }
    assert runs[True] == runs[False]
    assert runs[True][-1] < runs[True][0]


def test_offloaded_activations_are_saved_in_host_memory(tiny_model):
    """Under the hooks, what autograd saves is a host copy (not the tensor the op made), and
    weights stay as they are; backward gives the gradients of the step without them."""
    from autotune.training.offload import offloaded_forward

    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    recipe = Recipe.from_dict({"method": "full", "activation_offload": True})
    with offloaded_forward(recipe):
        hidden = layer(x)
        out = torch.tanh(hidden)
    # tanh saves its output: what backward reads is the host copy brought back, not the output
    assert out.grad_fn._saved_result.data_ptr() != out.data_ptr()
    assert torch.equal(out.grad_fn._saved_result, out)
    # the linear saves its weight (transposed), which stays the parameter's own storage
    assert hidden.grad_fn._saved_mat2.data_ptr() == layer.weight.data_ptr()
    plain = torch.tanh(layer(x))
    assert plain.grad_fn._saved_result.data_ptr() == plain.data_ptr()
    out.sum().backward()
    offloaded_grad = x.grad.clone()
    x.grad = None
    torch.tanh(layer(x)).sum().backward()
    assert torch.equal(offloaded_grad, x.grad)


def test_the_replay_counts_offloaded_activations_as_host_memory(cut_model):
    """The meta device has no data to copy: the replay's hooks count each saved tensor's
    pinned block in host memory and bring back an empty device tensor in backward."""
    from autotune.replay import load_config, replay
    from tests.conftest import cut_step

    config = load_config(str(cut_model))
    recipe = cut_step(cut_model, method="full", gradient_checkpointing=False)
    kept = replay(recipe, config, cublas_workspace_bytes=0)
    offloaded = replay(recipe.replace(activation_offload=True), config, cublas_workspace_bytes=0)
    assert kept.host_peak_bytes == 0 and offloaded.host_peak_bytes > 0
    assert offloaded.at_peak.get("activations", 0) < kept.at_peak["activations"]
    assert offloaded.estimate().host_bytes == offloaded.host_peak_bytes


def test_the_formula_prices_offloaded_activations_on_the_host():
    from autotune.memory import estimate
    from autotune.model_spec import load_model_spec
    from tests.conftest import SHAPE_CONFIGS

    spec = load_model_spec(str(SHAPE_CONFIGS / "qwen2-7b.json"))
    recipe = Recipe.from_dict(
        {"method": "lora", "quantization": "nf4", "micro_batch_size": 4, "loss": "chunked"}
    )
    for checkpointing in (True, False):
        kept = estimate(spec, recipe.replace(gradient_checkpointing=checkpointing))
        offloaded = estimate(
            spec, recipe.replace(gradient_checkpointing=checkpointing, activation_offload=True)
        )
        assert kept.host_bytes == 0
        # what left the GPU is on the host (in pinned blocks rounded up to powers of two)
        left = kept.breakdown["activations"] - offloaded.breakdown.get("activations", 0)
        assert 0 < left <= offloaded.host_bytes
        assert offloaded.peak_bytes < kept.peak_bytes


def test_a_study_searches_dora_and_offload_and_holds_offload_to_the_host_budget(
    workspace,  # noqa: F811 - the fixture imported above
):
    """A space with both switches completes; with a host budget below what offload needs, the
    offloaded trials are ruled out before any probe, with the reason."""
    import re

    from autotune.study import prepare_run, run_study
    from tests.test_study import DEMO_SPACE, FakeRunner, settings_for

    tmp_path, _, _ = workspace
    space = tmp_path / "techniques.yaml"
    text = DEMO_SPACE.read_text()
    for key, choices in (
        ("method", "[lora]"),
        ("micro_batch_size", "[1]"),
        ("optimizer", "[adamw]"),
    ):
        text = re.sub(rf"^{key}: .*$", f"{key}: {choices}", text, flags=re.M)
    space.write_text(text + "use_dora: [false, true]\nactivation_offload: [false, true]\n")
    runner = FakeRunner()
    settings = settings_for(workspace, space_path=space, trials=10, host_budget_bytes=1)
    study = run_study(prepare_run(settings), runner)
    assert len(study.trials) == 10
    recipes = {t.number: Recipe.from_dict(t.user_attrs["recipe"]) for t in study.trials}
    assert {r.use_dora for r in recipes.values()} == {False, True}
    offloaded = [t for t in study.trials if recipes[t.number].activation_offload]
    assert offloaded
    for trial in offloaded:
        assert trial.user_attrs["status"] == "over_budget_predicted"
        assert re.fullmatch(
            r"predicted host memory .* > host budget .*", trial.user_attrs["reason"]
        )
    assert not any(r.recipe.activation_offload for r in runner.requests)
    assert any(not r.recipe.activation_offload for r in runner.requests)


def test_estimate_shows_the_host_memory_of_an_offloaded_recipe(tmp_path):
    import json

    from typer.testing import CliRunner

    from autotune.cli import app
    from tests.conftest import SHAPE_CONFIGS

    recipe = tmp_path / "offload.yaml"
    recipe.write_text(
        Recipe.from_dict(
            {"method": "lora", "quantization": "nf4", "activation_offload": True}
        ).to_yaml()
    )
    model = str(SHAPE_CONFIGS / "qwen2-7b.json")
    args = ["estimate", "-m", model, "-r", str(recipe), "--memory-model", "formula"]
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert "host memory" in shown.output
    figures = json.loads(CliRunner().invoke(app, [*args, "--json"]).output)
    assert figures["host_peak_bytes"] > 0


def test_a_study_on_the_cpu_leaves_the_cpu_offload_optimizer_out_with_its_reason(tmp_path):
    import re

    from autotune.architecture import read_architecture
    from autotune.optimizers import optimizer_refusal
    from autotune.replay import load_config
    from autotune.space import SearchSpace
    from autotune.study import supported_space
    from tests.conftest import DEMO, ROOT

    text = (ROOT / "autotune" / "search_spaces" / "demo.yaml").read_text(encoding="utf-8")
    text = re.sub(r"^optimizer: .*$", "optimizer: [adamw, adamw_cpu_offload]", text, flags=re.M)
    path = tmp_path / "space.yaml"
    path.write_text(text, encoding="utf-8")
    architecture = read_architecture(load_config(str(DEMO)))
    space, unsupported = supported_space(SearchSpace.load(path), architecture, "cpu")
    assert space.choices_of("optimizer") == ("adamw",)
    assert "CUDA" in unsupported["optimizer"]["adamw_cpu_offload"]
    assert optimizer_refusal("adamw_cpu_offload", None) == ""  # an estimate runs nowhere
    assert optimizer_refusal("adamw", "cpu") == ""


def test_both_memory_models_put_the_cpu_offload_optimizer_s_states_on_the_host(cut_model):
    """The GPU keeps the parameters, their gradients and the small tensors' states; the host
    the large tensors' copies, gradients and states. The replay emulates torchao's optimizer
    (it needs CUDA tensors) and agrees with the formula on the host bytes."""
    from autotune.memory import estimate
    from autotune.model_spec import load_model_spec
    from autotune.replay import load_config, replay
    from tests.conftest import cut_step

    recipe = cut_step(cut_model, method="full", gradient_checkpointing=True)
    offloaded = recipe.replace(optimizer="adamw_cpu_offload")
    spec = load_model_spec(str(cut_model))
    on_gpu, on_host = estimate(spec, recipe), estimate(spec, offloaded)
    assert on_gpu.host_bytes == 0 and on_host.host_bytes > on_gpu.breakdown["optimizer_states"]
    assert on_host.breakdown["optimizer_states"] < on_gpu.breakdown["optimizer_states"] / 10
    config = load_config(str(cut_model))
    kept = replay(recipe, config, cublas_workspace_bytes=0)
    moved = replay(offloaded, config, cublas_workspace_bytes=0)
    assert moved.host_peak_bytes == on_host.host_bytes
    assert moved.peak_allocated_bytes < kept.peak_allocated_bytes


@pytest.mark.gpu
def test_the_cpu_offload_optimizer_trains_on_cuda_with_its_states_on_the_host(
    tiny_model, qa_data, tmp_path
):
    pytest.importorskip("torchao")
    from autotune.training.build import build_model, build_optimizer

    recipe = lora_recipe(tiny_model, optimizer="adamw_cpu_offload", lr_schedule="constant")
    optimizer = build_optimizer(build_model(recipe, "cuda"), recipe)
    assert type(optimizer).__name__ == "CPUOffloadOptimizer"
    report = train(recipe, qa_data, tmp_path / "out", max_steps=6)
    assert report.losses[-1] < report.losses[0]


def test_bottleneck_adapters_are_left_out_with_their_reason(tmp_path):
    """The adapters library's newest release pins transformers 4.57: a recipe or a space that
    asks for them is refused in one line that says so, not as an unknown method."""
    import re

    from autotune.errors import UsageError
    from autotune.space import SearchSpace
    from tests.test_study import DEMO_SPACE

    with pytest.raises(UsageError, match="method bottleneck is left out: .*transformers 4.57"):
        Recipe.from_dict({"method": "bottleneck"})
    space = tmp_path / "space.yaml"
    text = re.sub(r"^method: .*$", "method: [lora, bottleneck]", DEMO_SPACE.read_text(), flags=re.M)
    space.write_text(text)
    with pytest.raises(UsageError, match="bottleneck is left out: .*adapters library"):
        SearchSpace.load(space)


def test_train_refuses_the_cpu_offload_optimizer_off_cuda(tiny_model, qa_data, tmp_path):
    from autotune.api import train as train_recipe
    from autotune.errors import UsageError

    path = tmp_path / "recipe.yaml"
    path.write_text(lora_recipe(tiny_model, optimizer="adamw_cpu_offload").to_yaml())
    with pytest.raises(UsageError, match="optimizer adamw_cpu_offload: .*needs a CUDA GPU"):
        train_recipe(path, qa_data, tmp_path / "out", device="cpu", max_steps=1)


def test_the_default_space_fits_micro_batch_8_of_qwen2_7b_in_24gb_through_the_new_techniques():
    """Before the default space searched them, no recipe of micro-batch 8 fit Qwen2-7B in 24 GB
    (tests/test_study.py keeps that space); the chunked loss and activation offload make room."""
    import time

    from autotune.model_spec import load_model_spec
    from autotune.space import SPACES_DIR, SearchSpace
    from autotune.study import BudgetQuery, budget_fit
    from tests.conftest import SHAPE_CONFIGS

    model = str(SHAPE_CONFIGS / "qwen2-7b.json")
    spec = load_model_spec(model)
    space = SearchSpace.load(SPACES_DIR / "default.yaml")
    assert space.searched("use_dora") and space.searched("activation_offload")
    started = time.perf_counter()
    fit = budget_fit(BudgetQuery(space, model, spec, 1024, 24 * 10**9, margin=0.0))
    print(f"budget_fit of the default space: {time.perf_counter() - started:.1f} s")
    assert 8 in fit.choices["micro_batch_size"]
    assert set(fit.choices["loss"]) == {"standard", "chunked", "fused_linear"}
    assert set(fit.choices["activation_offload"]) == {False, True}


def test_dora_with_dropout_keeps_each_adapted_weight_in_fp32_for_backward():
    """With dropout peft's DoRA recomputes the base output from the dropped-out input with the
    fp32 base weight, which that linear saves: without checkpointing every block's adapted
    weights in fp32 (the replay of Qwen2-0.5B QDoRA without checkpointing shows 1.4 GiB more)."""
    from autotune.memory import estimate
    from autotune.model_spec import load_model_spec
    from tests.conftest import SHAPE_CONFIGS

    spec = load_model_spec(str(SHAPE_CONFIGS / "qwen2-0.5b.json"))
    base = Recipe.from_dict(
        {"method": "lora", "quantization": "nf4", "gradient_checkpointing": False}
    )

    def activations(**fields):
        return estimate(spec, base.replace(**fields)).breakdown["activations"]

    dropout_cost = {
        dora: activations(use_dora=dora, lora_dropout=0.05)
        - activations(use_dora=dora, lora_dropout=0.0)
        for dora in (False, True)
    }
    shapes = spec.linear_shapes()
    fp32_weights = 4 * spec.num_layers * sum(a * b for a, b in shapes.values())
    assert dropout_cost[True] - dropout_cost[False] == fp32_weights
