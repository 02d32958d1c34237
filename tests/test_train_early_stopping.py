"""`autotune train --eval-steps N`: eval during training, early stopping, the best weights kept."""

from __future__ import annotations

import subprocess

import pytest
import torch

from autotune.data.splits import eval_indices
from autotune.errors import UsageError
from autotune.training.early_stopping import BEST_CHECKPOINT, EarlyStopping
from autotune.training.train import train
from tests.conftest import write_jsonl
from tests.test_train import AUTOTUNE, adapter_weights, lora_recipe

EVAL_ROWS = 8


@pytest.fixture()
def conflicting_data(tmp_path):
    """The same question in every row; the held-out rows answer it one way, the training rows
    another. Training first learns what the answers share (eval loss falls), then the training
    rows' answer (eval loss rises): an honest overfit, with the split autotune itself draws."""
    held_out = eval_indices(40, 0, EVAL_ROWS)
    rows = [
        {
            "input": f"Name a colour ({i}).",
            "output": "blue blue blue blue" if i in held_out else "red red red red",
        }
        for i in range(40)
    ]
    return write_jsonl(tmp_path / "conflict.jsonl", rows)


def test_early_stopping_counts_evaluations_without_improvement():
    stopper = EarlyStopping(patience=2)
    assert stopper.observe(10, 3.0) and stopper.observe(20, 2.5)
    assert not stopper.observe(30, 2.5)  # equal is no improvement
    assert not stopper.should_stop
    assert not stopper.observe(40, 2.7) and stopper.should_stop
    assert (stopper.best_step, stopper.best_loss) == (20, 2.5)
    restored = EarlyStopping(patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored == stopper
    never = EarlyStopping(patience=0)
    for step in range(1, 10):
        never.observe(step, float(step))
    assert not never.should_stop and never.best_step == 1


def test_a_run_whose_eval_loss_rises_stops_and_keeps_its_best_step(
    tiny_model, conflicting_data, tmp_path
):
    evaluations = []
    out = tmp_path / "out"
    report = train(
        lora_recipe(tiny_model),
        conflicting_data,
        out,
        max_steps=30,
        eval_rows=EVAL_ROWS,
        eval_steps=1,
        early_stopping_patience=3,
        on_eval=lambda step, loss, best: evaluations.append((step, loss, best)),
    )
    losses = [loss for _, loss, _ in evaluations]
    assert report.stopped_early and report.steps < 30
    best = min(range(len(losses)), key=losses.__getitem__)
    assert report.best_step == evaluations[best][0] and evaluations[best][2]
    assert report.eval_loss == pytest.approx(losses[best])
    assert losses[best] < losses[0]  # it learned something first ...
    assert report.steps == report.best_step + 3  # ... then three evaluations were worse
    assert all(loss > losses[best] for loss in losses[best + 1 :])
    assert report.evaluations == [(step, loss) for step, loss, _ in evaluations]

    # the saved adapter is the best step's, not the last step's
    saved = adapter_weights(out)
    kept = torch.load(out / BEST_CHECKPOINT / "state.pt", weights_only=True)
    last = torch.load(out / f"checkpoint-{report.steps}" / "state.pt", weights_only=True)
    assert kept["step"] == report.best_step
    for name, value in kept["trainable"].items():
        key = name.replace(".default", "")
        assert torch.equal(saved[key], value)
    assert any(
        not torch.equal(kept["trainable"][name], value) for name, value in last["trainable"].items()
    )


def test_patience_zero_never_stops_but_keeps_the_best(tiny_model, conflicting_data, tmp_path):
    report = train(
        lora_recipe(tiny_model),
        conflicting_data,
        tmp_path / "out",
        max_steps=8,
        eval_rows=EVAL_ROWS,
        eval_steps=3,  # steps 3, 6 and the end (8) are scored
        early_stopping_patience=0,
    )
    assert report.steps == 8 and not report.stopped_early
    assert [step for step, _ in report.evaluations] == [3, 6, 8]
    assert report.best_step == min(report.evaluations, key=lambda e: e[1])[0]


def test_bad_evaluation_options_are_refused(tiny_model, qa_data, tmp_path):
    recipe = lora_recipe(tiny_model)
    for options, needle in (
        ({"eval_steps": 0}, "--eval-steps must be at least 1"),
        ({"early_stopping_patience": 2}, "needs --eval-steps"),
        ({"eval_steps": 5, "early_stopping_patience": -1}, "0 \\(never stop\\) or more"),
    ):
        with pytest.raises(UsageError, match=needle):
            train(recipe, qa_data, tmp_path / "out", max_steps=1, **options)


def test_cli_evaluates_names_the_best_step_and_merges(tiny_model, qa_data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(lora_recipe(tiny_model).to_yaml())
    base = [AUTOTUNE, "train", "--recipe", str(recipe), "--data", str(qa_data), "--device", "cpu"]
    done = subprocess.run(
        [*base, "--output", str(tmp_path / "out"), "--max-steps", "4", "--eval-steps", "2"]
        + ["--merge", "--merge-dtype", "fp32"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "step 2: eval loss" in done.stdout and "step 4: eval loss" in done.stdout
    assert "4/4" in done.stdout  # the progress bar, started with training
    assert "the best eval loss" in done.stdout
    assert "merged model (loads without peft) in" in done.stdout
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
    for args, needle in (
        (["--merge-dtype", "fp16"], "--merge-dtype needs --merge"),
        (["--merge", "--merge-dtype", "q4"], "--merge-dtype must be one of"),
        (["--eval-steps", "0"], "--eval-steps must be at least 1"),
        (["--early-stopping-patience", "2"], "needs --eval-steps"),
    ):
        done = subprocess.run(
            [*base, "--output", str(tmp_path / "bad"), *args], capture_output=True, text=True
        )
        assert done.returncode == 2, done.stderr
        assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_resumed_run_keeps_counting_and_keeps_its_best(tiny_model, conflicting_data, tmp_path):
    from tests.test_train import _Stop, _stop_after

    recipe = lora_recipe(tiny_model)
    options = {"max_steps": 30, "eval_rows": EVAL_ROWS, "eval_steps": 1, "save_every_steps": 1}
    straight = train(recipe, conflicting_data, tmp_path / "straight", **options)
    assert straight.stopped_early and straight.best_step is not None
    dies_after = straight.best_step + 1  # past the best, one evaluation without improvement
    with pytest.raises(_Stop):
        train(
            recipe,
            conflicting_data,
            tmp_path / "resumed",
            on_step=lambda step, loss: _stop_after(step, dies_after),
            **options,
        )
    resumed = train(recipe, conflicting_data, tmp_path / "resumed", resume=True, **options)
    assert resumed.resumed_from_step == dies_after
    assert (resumed.steps, resumed.best_step, resumed.stopped_early) == (
        straight.steps,
        straight.best_step,
        True,
    )
    assert [s for s, _ in resumed.evaluations] == [s for s, _ in straight.evaluations]
    assert [v for _, v in resumed.evaluations] == pytest.approx(
        [v for _, v in straight.evaluations], rel=1e-4
    )
    a, b = adapter_weights(tmp_path / "straight"), adapter_weights(tmp_path / "resumed")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_resume_of_a_run_that_stopped_early_writes_no_nan(tiny_model, conflicting_data, tmp_path):
    """`--resume` of a run that had stopped early trains no step: no training loss was
    measured, which train_metrics.json says as null (it wrote NaN, which no JSON reader takes)
    and the command's lines do not show as "nan"."""
    import json

    recipe = lora_recipe(tiny_model)
    out = tmp_path / "out"
    options = {"max_steps": 30, "eval_rows": EVAL_ROWS, "eval_steps": 1}
    stopped = train(recipe, conflicting_data, out, early_stopping_patience=1, **options)
    assert stopped.stopped_early and stopped.train_loss is not None
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe.to_yaml())
    done = subprocess.run(
        [AUTOTUNE, "train", "--recipe", str(recipe_file), "--data", str(conflicting_data)]
        + ["--output", str(out), "--device", "cpu", "--resume", "--max-steps", "30"]
        + ["--eval-rows", str(EVAL_ROWS), "--eval-steps", "1", "--early-stopping-patience", "1"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"trained 0 steps after step {stopped.steps}" in done.stdout
    assert "nan" not in done.stdout.lower()

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    metrics = json.loads((out / "train_metrics.json").read_text(), parse_constant=refuse)
    assert metrics["train_loss"] is None and metrics["tokens_per_second"] is None
    assert (metrics["steps"], metrics["resumed_from_step"]) == (stopped.steps, stopped.steps)
    assert metrics["stopped_early"] and metrics["best_step"] == stopped.best_step
    assert metrics["eval_loss"] == pytest.approx(stopped.eval_loss)
