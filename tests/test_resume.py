"""Surviving the night: kill -9 at random moments, interrupted trials, parallel workers."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from autotune.errors import UsageError
from autotune.study import finished_trial_count, prepare_run, run_study, worker_id
from tests.conftest import QUICK_CPU_RUN
from tests.test_study import FakeRunner, settings_for, workspace  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


def test_kill_nine_at_random_points_loses_nothing(tiny_model, qa_data, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "kill_and_resume.py"),
            "--model",
            str(tiny_model),
            "--data",
            str(qa_data),
            "--trials",
            "4",
            "--kills",
            "10",
            "--max-delay",
            "20",
            "--seed",
            "3",
            "--workdir",
            str(tmp_path),
            "--",
            *QUICK_CPU_RUN,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("kill ") == 10
    assert "final: 4 finished trials, 0 running" in done.stdout


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_trial_of_a_dead_worker_is_failed_and_retried(workspace):  # noqa: F811
    settings = settings_for(workspace, trials=3)
    prepared = prepare_run(settings)
    study = run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    host = worker_id().rsplit(":", 1)[0]
    trial = study.ask()
    trial.set_user_attr("worker", f"{host}:{_dead_pid()}")
    recipe = prepared.space.suggest(trial, prepared.settings.model, prepared.spec, 64)
    assert study.trials[trial.number].state == optuna.trial.TrialState.RUNNING

    study = run_study(prepare_run(settings), FakeRunner())
    interrupted = study.trials[trial.number]
    assert interrupted.state == optuna.trial.TrialState.FAIL
    assert interrupted.user_attrs["status"] == "interrupted"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == trial.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].user_attrs["recipe_label"] == recipe.label()
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert finished_trial_count(study) == 3


def test_a_live_workers_trial_is_left_alone(workspace):  # noqa: F811
    study = run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    trial = study.ask()
    trial.set_user_attr("worker", worker_id())  # this very process: alive
    run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
    assert study.trials[trial.number].state == optuna.trial.TrialState.RUNNING


class SlowRunner(FakeRunner):
    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.most_active = 0
        self.lock = threading.Lock()

    def run(self, request, workdir):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(0.3)
        with self.lock:
            self.active -= 1
        return super().run(request, workdir)


def test_four_workers_finish_exactly_the_requested_trials(workspace):  # noqa: F811
    runner = SlowRunner()
    study = run_study(prepare_run(settings_for(workspace, trials=12, workers=4)), runner)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == 12
    assert finished_trial_count(study) == 12
    assert runner.most_active > 1


def test_two_commands_share_one_study(workspace):  # noqa: F811
    settings = settings_for(workspace, trials=10)
    threads = [
        threading.Thread(target=run_study, args=(prepare_run(settings), SlowRunner()))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    study = optuna.load_study(study_name="s", storage=settings.storage)
    assert 10 <= finished_trial_count(study) <= 11  # at most one in flight past the target
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


@pytest.mark.parametrize(("gpus", "needle"), [(("0",), "needs CUDA")])
def test_gpus_need_cuda(workspace, gpus, needle):  # noqa: F811
    with pytest.raises(UsageError, match=needle):
        prepare_run(settings_for(workspace, gpus=gpus))


def test_gpus_must_exist(workspace, monkeypatch):  # noqa: F811
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match="names 5, but this machine has GPUs 0-1"):
        prepare_run(settings_for(workspace, device="cuda", gpus=("0", "5")))
    with pytest.raises(UsageError, match="lists a GPU twice"):
        prepare_run(settings_for(workspace, device="cuda", gpus=("1", "1")))
    prepared = prepare_run(settings_for(workspace, device="cuda", gpus=("0", "1")))
    assert prepared.device == "cuda"
