"""`autotune train --report-to`: the run's numbers in TensorBoard or W&B, as it goes."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest

from autotune.errors import UsageError
from autotune.training import monitor
from autotune.training.schedule import lr_factor
from autotune.training.train import train
from tests.test_train import AUTOTUNE, lora_recipe


def test_tensorboard_event_files_hold_the_logged_scalars(tiny_model, qa_data, tmp_path):
    pytest.importorskip("tensorboard", reason="the monitor extra (tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    recipe = lora_recipe(tiny_model)
    report = train(
        recipe,
        qa_data,
        out,
        max_steps=5,
        eval_steps=2,
        report_to="tensorboard",
        logging_steps=2,
        predicted_peak_bytes=123_000_000,
    )
    assert report.monitor_location == str(out / monitor.TENSORBOARD_DIR)
    events = EventAccumulator(str(out / monitor.TENSORBOARD_DIR))
    events.Reload()

    def series(tag: str) -> list[tuple[int, float]]:
        return [(event.step, event.value) for event in events.Scalars(tag)]

    logged = [2, 4, 5]  # every 2 steps, and the last
    assert [step for step, _ in series("train/loss")] == logged
    assert [v for _, v in series("train/loss")] == pytest.approx(
        [report.losses[s - 1] for s in logged], rel=1e-5
    )
    evaluations = series("eval/loss")
    assert [s for s, _ in evaluations] == [s for s, _ in report.evaluations] == [2, 4, 5]
    assert [v for _, v in evaluations] == pytest.approx([v for _, v in report.evaluations], 1e-5)
    assert all(v > 0 for _, v in series("train/tokens_per_second"))
    factor = lr_factor(recipe, 5)  # the learning rate each logged step trained with
    assert [v for _, v in series("train/learning_rate")] == pytest.approx(
        [recipe.learning_rate * factor(s - 1) for s in logged], rel=1e-5
    )
    assert all(v >= 0 for _, v in series("memory/peak_bytes"))
    assert series("memory/predicted_peak_bytes") == [(s, 123_000_000) for s in logged]


def test_report_to_refuses_unknown_names_and_missing_libraries(monkeypatch):
    with pytest.raises(UsageError, match="must be one of none, tensorboard, wandb"):
        monitor.check_report_to("mlflow")
    monitor.check_report_to("none")
    monkeypatch.setattr(monitor.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match=r"needs the tensorboard package \(pip install"):
        monitor.check_report_to("tensorboard")
    with pytest.raises(UsageError, match=r"needs the wandb package \(pip install wandb\)$"):
        monitor.check_report_to("wandb")


def test_wandb_goes_offline_without_a_network(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(monitor.socket, "create_connection", unreachable)
    assert monitor.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert monitor.wandb_mode() == "disabled"


def test_cli_report_to_a_missing_library_fails_in_one_line(tiny_model, qa_data, tmp_path):
    missing = [n for n in ("tensorboard", "wandb") if importlib.util.find_spec(n) is None]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(lora_recipe(tiny_model).to_yaml())
    cases = [(["--report-to", "mlflow"], "must be one of")]
    cases += [(["--report-to", n], f"needs the {n}") for n in missing]
    cases += [(["--logging-steps", "0"], "--logging-steps must be at least 1")]
    for args, needle in cases:
        done = subprocess.run(
            [AUTOTUNE, "train", "--recipe", str(recipe), "--data", str(qa_data)]
            + ["--output", str(tmp_path / "out"), *args],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2, done.stderr
        assert needle in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written
