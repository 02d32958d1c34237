"""`autotune train`: the real fine-tune from a recipe, checkpoints, resume, saved artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autotune.errors import UsageError
from autotune.recipe import Recipe
from autotune.training.train import train

AUTOTUNE = str(Path(sys.executable).parent / "autotune")


def lora_recipe(model: Path, **changes) -> Recipe:
    base = {
        "model": str(model),
        "method": "lora",
        "lora_r": 4,
        "lora_dropout": 0.0,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "seq_len": 48,
        "learning_rate": 5e-3,
        "precision": "fp32",
    }
    return Recipe.from_dict({**base, **changes})


def adapter_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_lora_adapter_loads_with_peft_and_generates(tiny_model, qa_data, tmp_path):
    report = train(lora_recipe(tiny_model), qa_data, tmp_path / "out", max_steps=4)
    assert report.steps == 4 and len(report.losses) == 4
    assert report.tokens_per_second > 0 and report.eval_loss > 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model = PeftModel.from_pretrained(base, str(tmp_path / "out"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    inputs = tokenizer("Add 3 and 6.\n", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 5
    assert any(
        v.abs().sum() > 0 for k, v in adapter_weights(tmp_path / "out").items() if "lora_B" in k
    )  # B starts at zero: training moved it


def test_resume_continues_exactly(tiny_model, qa_data, tmp_path):
    recipe = lora_recipe(tiny_model)
    straight = train(recipe, qa_data, tmp_path / "straight", max_steps=4)
    with pytest.raises(_Stop):  # the run dies after step 2, once its checkpoint is written
        train(
            recipe,
            qa_data,
            tmp_path / "resumed",
            max_steps=4,
            save_every_steps=2,
            on_step=lambda step, loss: _stop_after(step, 2),
        )
    resumed = train(recipe, qa_data, tmp_path / "resumed", max_steps=4, resume=True)
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-4)
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # the speed is the median of the run's own steps after its warm-up
    assert (straight.timed_steps, resumed.timed_steps) == (3, 1)
    last = train(recipe, qa_data, tmp_path / "resumed", max_steps=5, resume=True)
    assert last.resumed_from_step == 4 and last.steps == 5
    # one step, the warm-up: no speed rather than the cold step's
    assert last.tokens_per_second is None and last.timed_steps == 0


def test_a_resume_with_no_step_left_is_refused_and_keeps_the_run_s_files(
    tiny_model, qa_data, tmp_path
):
    """--resume with a --max-steps the checkpoint has reached would train nothing, show a bar
    past its end (5/3) and write the finished run's metrics again without a step (a NaN train
    loss, no tokens/s): it is refused in one line instead, and the run's files stay as they were."""
    recipe = lora_recipe(tiny_model)
    out = tmp_path / "out"
    train(recipe, qa_data, out, max_steps=2)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for max_steps in (2, 1):
        with pytest.raises(
            UsageError, match=f"trained 2 steps already, and --max-steps {max_steps}"
        ):
            train(recipe, qa_data, out, max_steps=max_steps, resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    resumed = train(recipe, qa_data, out, max_steps=3, resume=True)  # one step left: trained
    assert resumed.resumed_from_step == 2 and resumed.steps == 3


def test_a_run_tokenizes_its_data_once_and_keeps_it_while_it_may_go_on(
    tiny_model, qa_data, tmp_path, monkeypatch
):
    """The peak prediction (a padded recipe reads the data's lengths) and the training share one
    tokenization, kept in --output's token cache while the run may be continued: a run into an
    output a stopped run left its cache in finds it and tokenizes nothing; a finished run
    removes it (its --output holds what it trained, not its training data)."""
    import autotune.data.splits as splits
    import autotune.training.train as train_module
    from autotune import api
    from autotune.training.train_data import TOKEN_CACHE_DIR

    tokenized: list[int] = []
    tokenize_many = splits.tokenize_many

    def counting(examples, tokenizer, seq_len):
        tokenized.append(len(examples))
        return tokenize_many(examples, tokenizer, seq_len)

    monkeypatch.setattr(splits, "tokenize_many", counting)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(lora_recipe(tiny_model).to_yaml())
    assert lora_recipe(tiny_model).batching == "padded"
    progress: list[tuple[int, int]] = []

    def train_into(output: Path, **options):
        return api.train(
            recipe_path,
            qa_data,
            output,
            device="cpu",
            tokenize_progress=lambda done, total: progress.append((done, total)),
            **options,
        )

    first = train_into(tmp_path / "out", max_steps=1)
    assert sum(tokenized) == 40 and progress == [(40, 40)]  # the 40 rows, once
    assert first.predicted is not None
    assert not (tmp_path / "out" / TOKEN_CACHE_DIR).exists()  # finished: its data goes

    def stopped_once_tokenized(plan, callbacks):
        raise KeyboardInterrupt

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patched:
        patched.setattr(train_module, "run_training", stopped_once_tokenized)
        with pytest.raises(KeyboardInterrupt):
            train_into(stopped, max_steps=1)
    assert sum(tokenized) == 80 and len(list((stopped / TOKEN_CACHE_DIR).iterdir())) == 1
    again = train_into(stopped, max_steps=1)  # no --overwrite needed: it holds only the cache
    assert again.report.steps == 1 and again.predicted == first.predicted
    assert sum(tokenized) == 80 and progress == [(40, 40)] * 2  # nothing tokenized again
    assert not (stopped / TOKEN_CACHE_DIR).exists()


def test_the_end_of_train_says_why_it_has_no_speed(tmp_path):
    from rich.console import Console

    from autotune.api import TrainResult
    from autotune.train_console import show_trained
    from autotune.training.train_plan import TrainReport

    console = Console(record=True, width=200)
    one_step = TrainReport(5, 4, None, 2**20, "cpu_rss_growth", 1.5, 1.6, tmp_path, False)
    show_trained(console, TrainResult(one_step, None, {"tokens_per_second": 900.0}))
    timed = TrainReport(9, 4, 1234.0, 2**20, "cpu_rss_growth", 1.5, 1.6, tmp_path, False)
    timed.timed_steps = 4
    show_trained(console, TrainResult(timed, None, {}))
    text = console.export_text()
    assert "tokens/s not measured: its one step was the warm-up; probe measured 900" in text
    assert "tokens/s 1,234 (median of 4 steps after warm-up)" in text
    # a resumed run says the steps it trained itself, and where the training stands
    assert "trained 1 step after step 4, to step 5; eval loss 1.5000" in text
    assert "trained 5 steps after step 4, to step 9" in text
    fresh = TrainReport(3, 0, 1234.0, 2**20, "cpu_rss_growth", 1.5, 1.6, tmp_path, False)
    show_trained(console, TrainResult(fresh, None, {}))
    assert "trained 3 steps; eval loss 1.5000" in console.export_text()


class _Stop(Exception):
    pass


def _stop_after(step: int, last: int) -> None:
    if step >= last:
        raise _Stop


def test_full_model_is_saved_for_freeze(tiny_model, qa_data, tmp_path):
    recipe = Recipe.from_dict(
        {
            "model": str(tiny_model),
            "method": "freeze",
            "frozen_layers": 2,
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "seq_len": 48,
            "learning_rate": 1e-3,
        }
    )
    (tmp_path / "freeze.yaml").write_text(recipe.to_yaml())
    # on the command line, in a process that has not imported DeepSpeed: saving a whole model
    # imports it (accelerate's unwrapping), and its device detection printed a warning on
    # stdout that it could not find a GPU (the run was on the CPU)
    environment = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run(
        [AUTOTUNE, "train", "--recipe", "freeze.yaml", "--data", str(qa_data)]
        + ["--output", "out", "--max-steps", "2", "--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
    )
    assert done.returncode == 0, done.stderr
    assert "trained 2 steps" in done.stdout
    assert "Setting accelerator" not in done.stdout + done.stderr
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    frozen = "model.layers.0.mlp.up_proj.weight"
    trainable = "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(trained.state_dict()[frozen], original.state_dict()[frozen])
    assert not torch.equal(trained.state_dict()[trainable], original.state_dict()[trainable])


@pytest.mark.parametrize(
    ("modules", "trained", "frozen"),
    [
        ("attention", "self_attn.q_proj", "mlp.up_proj"),
        ("mlp", "mlp.up_proj", "self_attn.q_proj"),
    ],
)
def test_freeze_of_attention_or_mlp_trains_only_those(
    tiny_model, qa_data, tmp_path, modules, trained, frozen
):
    recipe = Recipe.from_dict(
        {
            "model": str(tiny_model),
            "method": "freeze",
            "frozen_layers": 2,
            "train_modules": modules,
            "micro_batch_size": 2,
            "seq_len": 48,
            "learning_rate": 5e-3,
            "lr_schedule": "constant",
            "precision": "fp32",
        }
    )
    report = train(recipe, qa_data, tmp_path / "out", max_steps=6)
    # a random model's loss starts near ln(vocabulary) and falls as the trained half learns
    assert all(torch.isfinite(torch.tensor(report.losses)))
    assert report.losses[-1] < report.losses[0]
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    before = AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict()
    assert not torch.equal(
        after[f"model.layers.3.{trained}.weight"], before[f"model.layers.3.{trained}.weight"]
    )
    assert torch.equal(
        after[f"model.layers.3.{frozen}.weight"], before[f"model.layers.3.{frozen}.weight"]
    )
    assert torch.equal(
        after["model.layers.3.input_layernorm.weight"],
        before["model.layers.3.input_layernorm.weight"],
    )


def test_resume_without_checkpoint_and_unwritable_output(tiny_model, qa_data, tmp_path):
    with pytest.raises(UsageError, match="no checkpoint"):
        train(lora_recipe(tiny_model), qa_data, tmp_path / "empty", max_steps=1, resume=True)
    assert not (tmp_path / "empty").exists()  # a refused --resume leaves nothing behind
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match="not writable"):
        train(lora_recipe(tiny_model), qa_data, blocker / "out", max_steps=1)


def test_data_refused_while_predicting_leaves_no_output_behind(tiny_model, tmp_path):
    """`autotune train` predicts a padded recipe's peak from its data's lengths, tokenizing
    it: data that tokenizes to nothing is refused there, and the --output it made goes too."""
    from autotune.api import train as train_with_recipe

    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text(
        "".join(f'{{"input": "{"word " * 80}{i}", "output": "a{i}"}}\n' for i in range(8))
    )
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(lora_recipe(tiny_model, batching="padded", seq_len=16).to_yaml())
    with pytest.raises(UsageError, match="truncated to nothing"):
        train_with_recipe(recipe_path, long_prompts, tmp_path / "out", device="cpu", max_steps=1)
    assert not (tmp_path / "out").exists()


def test_data_refused_once_tokenized_leaves_no_output_behind(tiny_model, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(f'{{"input": "q{i}", "output": "a{i}"}}\n' for i in range(4)))
    with pytest.raises(UsageError, match="fewer than one effective batch"):
        train(lora_recipe(tiny_model), few, tmp_path / "out", max_steps=1)
    assert not (tmp_path / "out").exists()


def test_cli_bad_input(tiny_model, qa_data, tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(f"model: {tiny_model}\nmethod: lora\nrank: 8\n")
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"model: {tiny_model}\nlora_r: 8\n")
    good = tmp_path / "good.yaml"
    good.write_text(lora_recipe(tiny_model).to_yaml())
    blocker = tmp_path / "file"
    blocker.write_text("")
    unweighted_model = tmp_path / "unweighted"  # config and tokenizer, no weights
    weights_only = tmp_path / "weights-only"  # config and weights, no tokenizer
    for folder, keep in ((unweighted_model, "token"), (weights_only, "")):
        folder.mkdir()
        for item in tiny_model.iterdir():
            if item.name == "config.json" or ("token" in item.name) == bool(keep):
                (folder / item.name).write_bytes(item.read_bytes())
    unweighted = tmp_path / "unweighted.yaml"
    unweighted.write_text(lora_recipe(unweighted_model).to_yaml())
    untokenized = tmp_path / "untokenized.yaml"
    untokenized.write_text(lora_recipe(weights_only).to_yaml())
    listed = tmp_path / "listed.yaml"
    listed.write_text("model: [1, 2]\nmethod: lora\n")
    cases = [
        (["--recipe", str(untokenized)], "cannot load the tokenizer"),
        (["--recipe", str(unweighted)], "has no weights"),
        (["--recipe", str(listed)], "model must be a hub id or a directory"),
        (["--recipe", str(unknown)], "unknown keys rank"),
        (["--recipe", str(missing)], "missing required key method"),
        (["--recipe", str(good), "--output", str(blocker / "out")], "not writable"),
        (["--recipe", str(good), "--epochs", "1", "--max-steps", "3"], "not both"),
        (["--recipe", str(good), "--output", str(tiny_model)], "inside the model's directory"),
        (["--recipe", str(good), "--save-steps", "0"], "--save-steps must be at least 1"),
        (["--recipe", str(good), "--epochs", "nan"], "--epochs must be a positive finite number"),
        (["--recipe", str(good), "--epochs", "inf"], "positive finite number, got inf"),
        (["--recipe", str(good), "--epochs", "0"], "positive finite number, got 0"),
        (["--recipe", str(good), "--max-steps", "0"], "--max-steps must be at least 1, got 0"),
        # the data given as --output: "output directory ... is not writable: File exists"
        (["--recipe", str(good), "--output", str(qa_data)], f"--output {qa_data} is a file"),
        (["--recipe", str(good), "--epochs", "1e308"], "--epochs must be at most 10,000"),
        (["--recipe", str(good), "--seed", "-1"], "--seed must be from 0 to 4294967295"),
    ]
    for args, needle in cases:
        done = subprocess.run(
            [AUTOTUNE, "train", "--data", str(qa_data), *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert done.returncode == 2, done.stderr
        assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_bad_input_shows_no_progress_bar(tiny_model, qa_data, tmp_path):
    """The bar starts with training: input refused before then prints its one line alone."""
    good = tmp_path / "good.yaml"
    good.write_text(lora_recipe(tiny_model).to_yaml())
    cases = [
        (["--data", str(qa_data), "--seed", "-1"], "--seed must be from 0 to 4294967295"),
        (["--data", str(tmp_path / "absent.jsonl")], "absent.jsonl"),
    ]
    for args, needle in cases:
        done = subprocess.run(
            [AUTOTUNE, "train", "--recipe", str(good), *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_output_is_never_the_model_and_never_a_stranger_s_files(tiny_model, qa_data, tmp_path):
    import shutil

    recipe = lora_recipe(tiny_model)
    model_copy = tmp_path / "model"
    shutil.copytree(tiny_model, model_copy)
    before = {p.name: p.read_bytes() for p in model_copy.iterdir() if p.is_file()}
    own = lora_recipe(model_copy)
    for output in (model_copy, model_copy / "runs" / "a"):
        for overwrite in (False, True):
            with pytest.raises(UsageError, match="inside the model's directory"):
                train(own, qa_data, output, max_steps=1, overwrite=overwrite)
    assert {p.name: p.read_bytes() for p in model_copy.iterdir() if p.is_file()} == before

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "README.md").write_text("mine")
    (stranger / "adapter_config.json").write_text("{}")
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty .*README.md.* add --overwrite"):
        train(recipe, qa_data, stranger, max_steps=1)
    assert (stranger / "adapter_config.json").read_text() == "{}"
    train(recipe, qa_data, stranger, max_steps=1, overwrite=True)
    assert (stranger / "notes.txt").read_text() == "mine"  # only same-named files replaced
    assert (stranger / "adapter_config.json").read_text() != "{}"

    # an earlier run: resume it or start it again, never silently
    with pytest.raises(UsageError, match="earlier autotune train run; add --resume"):
        train(recipe, qa_data, stranger, max_steps=1)
    again = train(recipe, qa_data, stranger, max_steps=2, overwrite=True)
    assert again.resumed_from_step == 0 and again.steps == 2


def test_a_checkpoint_that_would_run_code_is_refused(tiny_model, qa_data, tmp_path):
    recipe = lora_recipe(tiny_model)
    train(recipe, qa_data, tmp_path / "out", max_steps=2)
    [checkpoint] = list((tmp_path / "out").glob("checkpoint-*"))
    state = torch.load(checkpoint / "state.pt", weights_only=True)  # what autotune writes
    assert isinstance(state["rng"]["cpu"], torch.Tensor)
    marker = tmp_path / "code-ran"
    state["payload"] = _RunsCode(str(marker))
    torch.save(state, checkpoint / "state.pt")
    with pytest.raises(UsageError, match="holds more than tensors and plain values") as error:
        train(recipe, qa_data, tmp_path / "out", max_steps=4, resume=True)
    assert "\n" not in str(error.value)
    assert not marker.exists()


class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_the_end_of_train_ignores_a_hand_edited_measured_block(tmp_path):
    # the recipe's measured: figures are not checked on read; one edited into text or a
    # negative number must not fail the run after it trained, nor print as measured
    from rich.console import Console

    from autotune.api import TrainResult
    from autotune.train_console import show_trained
    from autotune.training.train_plan import TrainReport

    report = TrainReport(2, 0, 100.0, 2**20, "cuda_max_reserved", 1.5, 1.6, tmp_path, True)
    console = Console(record=True, width=200)
    edited = {"peak_memory_bytes": "abc", "tokens_per_second": -5}
    show_trained(console, TrainResult(report, None, edited))
    text = console.export_text()
    assert f"saved to {tmp_path}" in text and "probe measured" not in text
    show_trained(console, TrainResult(report, None, {"peak_memory_bytes": 2**21}))
    assert "probe measured 2.0 MiB" in console.export_text()


@pytest.mark.parametrize("damage", ["intermediate_size", "weights"])
def test_weights_that_do_not_fit_the_config_are_one_line(tiny_model, qa_data, tmp_path, damage):
    # a config edited after the weights were saved, or a truncated weight file, crashed train
    # with transformers' RuntimeError or safetensors' own error
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    if damage == "intermediate_size":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
        needle = "their shapes differ from those its config.json gives"
    else:
        (model / "model.safetensors").write_bytes(b"cut short")
        needle = "Error while deserializing header"
    with pytest.raises(UsageError, match="cannot load the weights of model") as error:
        train(lora_recipe(model), qa_data, tmp_path / "out", max_steps=1)
    assert needle in str(error.value)


def test_a_resume_with_another_effective_batch_is_refused_in_one_line(
    tiny_model, qa_data, tmp_path, monkeypatch
):
    """A checkpoint's step counts batches of its size: another num_gpus (or micro-batch) would
    skip or repeat rows. It is refused before the model is built (a big one loads for
    minutes). The same batch split otherwise resumes."""
    import autotune.training.build

    recipe = lora_recipe(tiny_model)  # 2 x 2 = 4 sequences a step
    train(recipe, qa_data, tmp_path / "out", max_steps=2)
    built = []
    build_model = autotune.training.build.build_model

    def counted(*args, **kwargs):
        built.append(args)
        return build_model(*args, **kwargs)

    monkeypatch.setattr(autotune.training.build, "build_model", counted)
    state = torch.load(tmp_path / "out" / "checkpoint-2" / "state.pt", weights_only=True)
    assert state["extra"] == {"effective_batch_size": 4, "distributed": "none"}
    with pytest.raises(UsageError) as refused:
        train(
            recipe.replace(micro_batch_size=4), qa_data, tmp_path / "out", max_steps=4, resume=True
        )
    assert str(refused.value).startswith(
        f"--resume: {tmp_path / 'out' / 'checkpoint-2'} trained on 4 sequences a step and this "
        "recipe on 8 (8 per GPU x 1 GPU)"
    )
    assert built == []
    split = recipe.replace(micro_batch_size=1, gradient_accumulation_steps=4)
    resumed = train(split, qa_data, tmp_path / "out", max_steps=3, resume=True)
    assert resumed.resumed_from_step == 2 and resumed.steps == 3 and len(built) == 1


def test_a_resume_with_a_recipe_that_trains_other_weights_is_refused_in_one_line(
    tiny_model, qa_data, tmp_path
):
    """Another LoRA rank (or method, optimizer) under --resume failed loading the checkpoint,
    in a traceback (a size mismatch, a missing weight, an optimizer group of another size)."""
    recipe = lora_recipe(tiny_model)
    train(recipe, qa_data, tmp_path / "out", max_steps=1)
    with pytest.raises(UsageError) as refused:
        train(recipe.replace(lora_r=8), qa_data, tmp_path / "out", max_steps=2, resume=True)
    assert str(refused.value).startswith(
        f"--resume: {tmp_path / 'out'} holds a training of another recipe (lora_r 4, now 8); "
        "resume with the recipe that wrote it"
    )
    resumed = train(recipe, qa_data, tmp_path / "out", max_steps=2, resume=True)
    assert resumed.resumed_from_step == 1


@pytest.mark.parametrize(
    "change, said",
    [
        ({"seq_len": 64}, "seq_len 48, now 64"),
        ({"learning_rate": 1e-3}, "learning_rate 0.005, now 0.001"),
        ({"lora_alpha": 16}, "lora_alpha 8, now 16"),
    ],
)
def test_a_resume_that_would_not_continue_its_run_is_refused_in_one_line(
    tiny_model, qa_data, tmp_path, change, said
):
    """A checkpoint loads under another seq_len, learning rate or LoRA scale, but the run is
    not continued: its step counts batches of other rows, its optimizer keeps the old
    learning rate (the new one was not trained with, unsaid), its adapter was trained at
    another scale. A change of memory and speed alone (checkpointing) resumes."""
    recipe = lora_recipe(tiny_model)
    train(recipe, qa_data, tmp_path / "out", max_steps=1)
    with pytest.raises(UsageError) as refused:
        train(recipe.replace(**change), qa_data, tmp_path / "out", max_steps=2, resume=True)
    assert str(refused.value).startswith(
        f"--resume: {tmp_path / 'out'} holds a training of another recipe ({said}); "
    )
    assert (tmp_path / "out" / "checkpoint-1").is_dir()
    lighter = recipe.replace(gradient_checkpointing=not recipe.gradient_checkpointing)
    assert train(lighter, qa_data, tmp_path / "out", max_steps=2, resume=True).steps == 2


def test_a_deepspeed_accelerator_the_user_named_is_kept(monkeypatch):
    """train names the device to DeepSpeed (so it does not print its search for a GPU), but a
    DS_ACCELERATOR the user set is theirs: it was overwritten."""
    import os

    from autotune.training.deepspeed_engine import name_deepspeed_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    name_deepspeed_accelerator("cpu")
    assert os.environ["DS_ACCELERATOR"] == "xpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    name_deepspeed_accelerator("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu"
