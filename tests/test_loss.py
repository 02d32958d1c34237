"""The chunked loss gives the standard loss and gradients; fused_linear is refused off CUDA."""

from __future__ import annotations

import pytest

from autotune.architecture import loss_refusal
from autotune.data.tokens import IGNORE_INDEX, TokenizedExample
from autotune.recipe import Recipe
from autotune.training import loss as loss_module


def _examples(vocab: int) -> list[TokenizedExample]:
    import torch

    generator = torch.Generator().manual_seed(0)
    examples = []
    for length, prompt in ((23, 5), (17, 3), (9, 0)):
        ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        examples.append(TokenizedExample(input_ids=ids, labels=labels))
    return examples


def _loss_and_gradients(model, recipe, examples, device="cpu"):
    from autotune.training.loop import _autocast, micro_batches, model_inputs

    model.zero_grad(set_to_none=True)
    (micro,) = micro_batches(examples, recipe)
    batch, _ = model_inputs(micro, recipe, device, 0)
    with _autocast(recipe, device):
        loss = loss_module.causal_lm_loss(model, batch, recipe)
    loss.backward()
    gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), gradients


@pytest.mark.parametrize("batching", ["padded", "padding_free", "packed"])
@pytest.mark.parametrize(
    "fields",
    [
        {"method": "lora", "lora_dropout": 0.0, "precision": "fp32"},
        {"method": "full", "precision": "fp32", "gradient_checkpointing": False},
        {"method": "lora", "lora_dropout": 0.0, "precision": "amp_bf16"},
    ],
)
def test_chunked_loss_gives_the_standard_loss_and_gradients(
    tiny_model, monkeypatch, batching, fields
):
    import torch

    from autotune.training.build import build_model

    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 7)  # several chunks, the last one short
    recipe = Recipe.from_dict(
        {
            "model": str(tiny_model),
            "micro_batch_size": 3,
            "seq_len": 32,
            "batching": batching,
            **fields,
        }
    )
    torch.manual_seed(0)
    model = build_model(recipe, "cpu")
    examples = _examples(model.config.vocab_size)
    standard, standard_gradients = _loss_and_gradients(model, recipe, examples)
    chunked, chunked_gradients = _loss_and_gradients(
        model, recipe.replace(loss="chunked"), examples
    )
    tolerance = 1e-2 if fields["precision"] == "amp_bf16" else 1e-5
    assert chunked == pytest.approx(standard, rel=tolerance)
    assert chunked_gradients.keys() == standard_gradients.keys() and standard_gradients
    for name, gradient in standard_gradients.items():
        torch.testing.assert_close(
            chunked_gradients[name], gradient, rtol=tolerance, atol=tolerance * 1e-2, msg=name
        )


@pytest.mark.parametrize(
    ("model_type", "head_fields"),
    [
        ("gemma2", {"final_logit_softcapping": 3.0}),
        ("cohere", {"logit_scale": 0.25}),
        ("granite", {"logits_scaling": 4.0}),
    ],
)
def test_chunked_loss_follows_what_the_head_does_to_the_logits(
    monkeypatch, model_type, head_fields
):
    """Gemma 2 soft-caps its logits, Cohere scales them, Granite divides them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 7)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        **head_fields,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    recipe = Recipe.from_dict({"method": "full", "precision": "fp32", "micro_batch_size": 3})
    examples = _examples(config.vocab_size)
    standard, standard_gradients = _loss_and_gradients(model, recipe, examples)
    chunked, chunked_gradients = _loss_and_gradients(
        model, recipe.replace(loss="chunked"), examples
    )
    assert chunked == pytest.approx(standard, rel=1e-5)
    for name, gradient in standard_gradients.items():
        torch.testing.assert_close(
            chunked_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name
        )


def test_chunked_loss_under_no_grad_is_the_evaluation_loss(tiny_model):
    from autotune.training.build import build_model
    from autotune.training.loop import evaluate

    recipe = Recipe.from_dict(
        {"model": str(tiny_model), "method": "lora", "micro_batch_size": 2, "seq_len": 32}
    )
    model = build_model(recipe, "cpu")
    examples = _examples(model.config.vocab_size)
    standard = evaluate(model, examples, recipe, "cpu", 0)
    chunked = evaluate(model, examples, recipe.replace(loss="chunked"), "cpu", 0)
    assert chunked == pytest.approx(standard, rel=1e-5)


def test_fused_linear_is_refused_off_cuda_and_without_liger(monkeypatch):
    assert "CUDA" in loss_refusal("fused_linear", "cpu")
    assert loss_refusal("chunked", "cpu") == loss_refusal("standard", "cpu") == ""
    assert loss_refusal("fused_linear", None) == ""  # an estimate runs nowhere
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert "liger-kernel" in loss_refusal("fused_linear", "cuda")


@pytest.mark.parametrize("memory_model", ["formula", "replay"])
def test_estimate_of_qwen2_7b_qlora_holds_4_gib_less_with_the_chunked_loss(tmp_path, memory_model):
    """QLoRA r16 all-linear, micro-batch 4, seq 1024, checkpointing: the standard loss holds
    12 bytes per logit of a 150k vocabulary (about 7 GB), the chunked one a chunk's worth."""
    import json
    import shutil

    from tests.conftest import SHAPE_CONFIGS
    from tests.test_cli import autotune

    model = tmp_path / "qwen2-7b"
    model.mkdir()
    shutil.copy(SHAPE_CONFIGS / "qwen2-7b.json", model / "config.json")
    peaks = {}
    for loss in ("standard", "chunked"):
        recipe = tmp_path / f"{loss}.yaml"
        recipe.write_text(
            "method: lora\nquantization: nf4\nlora_r: 16\nlora_target_modules: all-linear\n"
            f"micro_batch_size: 4\nseq_len: 1024\ngradient_checkpointing: true\nloss: {loss}\n"
        )
        done = autotune(
            "estimate", "-m", str(model), "-r", str(recipe), "--json",
            "--memory-model", memory_model, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        printed = json.loads(done.stdout)
        assert printed["memory_model"] == memory_model
        peaks[loss] = printed["peak_bytes"]
    assert peaks["standard"] - peaks["chunked"] >= 4 * 2**30


def test_a_study_on_the_cpu_leaves_the_fused_loss_out_with_its_reason(tmp_path):
    from autotune.architecture import read_architecture
    from autotune.replay import load_config
    from autotune.space import SearchSpace
    from autotune.study import supported_space
    from tests.conftest import DEMO, ROOT

    text = (ROOT / "autotune" / "search_spaces" / "demo.yaml").read_text(encoding="utf-8")
    path = tmp_path / "space.yaml"
    path.write_text(text + "\nloss: [standard, fused_linear, chunked]\n", encoding="utf-8")
    architecture = read_architecture(load_config(str(DEMO)))
    space, unsupported = supported_space(SearchSpace.load(path), architecture, "cpu")
    assert space.choices_of("loss") == ("standard", "chunked")
    assert "CUDA" in unsupported["loss"]["fused_linear"]
    assert SearchSpace.load(path).searched("loss")
    only_fused = tmp_path / "fused.yaml"
    only_fused.write_text(text + "\nloss: fused_linear\n", encoding="utf-8")
    space, unsupported = supported_space(SearchSpace.load(only_fused), architecture, "cpu")
    assert space.choices_of("loss") == ("standard",) and not space.searched("loss")


def test_a_recipe_names_its_loss():
    from autotune.errors import UsageError

    chunked = Recipe.from_dict({"method": "lora", "loss": "chunked"})
    assert Recipe.from_yaml(chunked.to_yaml()) == chunked
    assert chunked.label().endswith("chunked-loss")
    assert "loss" not in Recipe.from_dict({"method": "lora"}).label()
    with pytest.raises(UsageError, match="loss 'fused' is not one of standard, chunked"):
        Recipe.from_dict({"method": "lora", "loss": "fused"})


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["chunked", "fused_linear"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_on_cuda_the_chunked_and_fused_losses_give_the_standard_loss_and_gradients(
    tiny_model, monkeypatch, loss, method
):
    import torch

    from autotune.training.build import build_model

    if loss == "fused_linear":
        pytest.importorskip("liger_kernel")
    monkeypatch.setattr(loss_module, "CHUNK_TOKENS", 7)
    recipe = Recipe.from_dict(
        {"model": str(tiny_model), "method": method, "precision": "fp32", "micro_batch_size": 3}
    )
    if method == "lora":
        recipe = recipe.replace(lora_dropout=0.0)
    torch.manual_seed(0)
    model = build_model(recipe, "cuda")
    examples = _examples(model.config.vocab_size)
    standard, standard_gradients = _loss_and_gradients(model, recipe, examples, "cuda")
    other, other_gradients = _loss_and_gradients(model, recipe.replace(loss=loss), examples, "cuda")
    assert other == pytest.approx(standard, rel=1e-4)
    assert other_gradients.keys() == standard_gradients.keys() and standard_gradients
    for name, gradient in standard_gradients.items():
        torch.testing.assert_close(other_gradients[name], gradient, rtol=1e-3, atol=1e-5, msg=name)
