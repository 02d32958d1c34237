"""Surviving the night: kill -9 at random moments, interrupted trials, parallel workers."""

from __future__ import annotations

import dataclasses
import errno
import html
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml

from autotune.errors import UsageError, unwritable
from autotune.probe import ColdProcess, SubprocessProbeRunner
from autotune.probe_stop import STOP_PROBES, stop_handling_restored, terminate_as_ctrl_c
from autotune.recipe import Recipe
from autotune.study import (
    SPACE_CHOICES_ATTR,
    RunEvents,
    finished_trial_count,
    open_study,
    prepare_run,
    run_study,
    worker_id,
)
from autotune.study.settings import PreparedRun, RunSettings
from autotune.units import format_bytes
from tests.conftest import QUICK_CPU_RUN, write_jsonl
from tests.test_study import (  # noqa: F401 - the fixtures
    FakeRunner,
    full_rows_workspace,
    settings_for,
    workspace,
)

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
            "40",
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
    assert done.stdout.count("none alive 3 s later") == 10, done.stdout
    kills = re.findall(
        r"kill \d+ after ([\d.]+) s \((\d+) processes of the run, (\d+) probe server or "
        r"probes\): none alive",
        done.stdout,
    )
    # the kills hit a live run, half in its first 15 s (before the first probe), some while
    # probes ran
    assert len(kills) >= 8, done.stdout
    assert sum(float(delay) < 15 for delay, _, _ in kills) >= 4
    assert any(int(probing) > 0 for _, _, probing in kills), done.stdout
    assert "final: 40 finished trials, 0 running" in done.stdout


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

    events = RunEvents()
    study = run_study(prepare_run(settings), FakeRunner(), events)
    assert f"trial {trial.number} was interrupted earlier: marked failed" in events.notes[0]
    interrupted = study.trials[trial.number]
    assert interrupted.state == optuna.trial.TrialState.FAIL
    assert interrupted.user_attrs["status"] == "interrupted"
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == trial.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].user_attrs["recipe_label"] == recipe.label()
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert finished_trial_count(study) == 3


class StoppedRunner(FakeRunner):
    """A probe during which the user presses Ctrl-C."""

    def run(self, request, workdir):
        raise KeyboardInterrupt


def test_a_trial_stopped_by_ctrl_c_is_queued_again_and_measured_on_resume(workspace):  # noqa: F811
    settings = settings_for(workspace, trials=2)
    for _ in range(2):  # stopped twice, its retry too: still queued once more
        with pytest.raises(KeyboardInterrupt):
            run_study(prepare_run(settings), StoppedRunner())
    study = run_study(prepare_run(settings), FakeRunner())
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    stopped = [t for t in failed if t.user_attrs.get("status") == "interrupted"]
    assert len(stopped) == len(failed) == 2
    measured = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(measured) == finished_trial_count(study) == 2
    assert stopped[0].params in [t.params for t in measured]


class DiskFullAfterOne(FakeRunner):
    """Probes that write nothing once the first has run: the disk is full."""

    def run(self, request, workdir):
        if self.requests:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().run(request, workdir)


def test_a_full_disk_stops_the_run_and_queues_the_trial_it_stopped(workspace, caplog):  # noqa: F811
    settings = settings_for(workspace, trials=3)
    with pytest.raises(OSError) as stopped:
        run_study(prepare_run(settings), DiskFullAfterOne())
    assert unwritable(stopped.value) == (
        f"cannot write {Path('trials', 's', 'trial-0001')}: No space left on device"
    )
    assert "Traceback" not in caplog.text and "failed with" not in caplog.text
    study = open_study(settings.storage, "s", settings.seed)
    (failed,) = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert failed.user_attrs["status"] == "interrupted"
    assert "No space left on device" in failed.user_attrs["reason"]
    assert finished_trial_count(study) == 1  # the stopped trial is not counted as finished
    study = run_study(prepare_run(settings), FakeRunner())  # room again: the resume runs it
    measured = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert finished_trial_count(study) == len(measured) == 3
    assert failed.params in [t.params for t in measured]


def test_artifacts_that_cannot_be_written_do_not_undo_a_measurement(workspace, monkeypatch):  # noqa: F811
    def no_room(*args):
        raise OSError(errno.ENOSPC, "No space left on device", "trials/artifacts/x")

    monkeypatch.setattr("autotune.study.objective._attach_artifacts", no_room)
    events = RunEvents()
    study = run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner(), events)
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
    assert any("cannot write trials/artifacts/x" in note for note in events.notes)


class SleepingProbes(SubprocessProbeRunner):
    """Probes that are real children, each in a process group of its own, that never end."""

    def __init__(self) -> None:
        super().__init__(timeout_seconds=60.0, warm=False)
        self.children: list[subprocess.Popen] = []

    def _launch(self, request, request_path, result_path, log_path):
        child = subprocess.Popen(["sleep", "60"], start_new_session=True)
        self.children.append(child)
        return ColdProcess(child)


def test_ctrl_c_stops_every_workers_probe_and_queues_its_trial(
    workspace,  # noqa: F811
    stop_cleared_after,
):
    """Ctrl-C reaches the main thread alone; the probes of the other workers stop with it."""
    settings = settings_for(workspace, trials=2, workers=2)
    runner = SleepingProbes()
    pressed: list[float] = []

    def press_ctrl_c_once_both_probe() -> None:
        while len(runner.children) < 2:
            time.sleep(0.05)
        pressed.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c_once_both_probe, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_study(prepare_run(settings), runner)
    assert [child.poll() for child in runner.children] == [-signal.SIGKILL] * 2
    study = open_study(settings.storage, "s", settings.seed)

    def interrupted():
        failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
        return [t for t in failed if t.user_attrs.get("status") == "interrupted"]

    while len(interrupted()) < 2:  # recorded by the worker threads, ending meanwhile
        time.sleep(0.05)
    assert time.monotonic() - pressed[0] < 5.0  # not the probes' 60 s
    queued = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    retried = {t.system_attrs.get("failed_trial") for t in queued}
    assert {t.number for t in interrupted()} <= retried  # queued again, as with one worker


@pytest.fixture
def stop_cleared_after():
    """The stop a stopped run leaves (set, so that a worker yet to start its probe starts none)
    and SIGTERM's and SIGHUP's handling put back as they were after the test."""
    with stop_handling_restored():
        yield


class QuickProbes(SubprocessProbeRunner):
    """A probe runner's own checks (a stop left set) around FakeRunner's figures, no child."""

    def _run(self, request, request_path, result_path, log_path, timeout_seconds):
        return FakeRunner().run(request, request_path.parent)


def test_a_run_after_one_stopped_by_ctrl_c_probes(workspace):  # noqa: F811
    """A run of several workers that Ctrl-C stopped leaves its stop set; the next run of the
    same process (a notebook's, or a test's), of one worker, stopped at its first probe."""
    STOP_PROBES.set()  # as the stopped run left it
    try:
        study = run_study(prepare_run(settings_for(workspace, trials=2)), QuickProbes(60.0, False))
    except KeyboardInterrupt:  # ProbeStopped: not to end the test session as Ctrl-C does
        pytest.fail("the run stopped at its first probe, by the stop the earlier run left")
    assert finished_trial_count(study) == 2 and not STOP_PROBES.is_set()


def test_sigterm_stops_a_run_as_ctrl_c_does(workspace, stop_cleared_after):  # noqa: F811
    """A batch system's time limit or `kill` sends SIGTERM: every probe stops and its trial is
    queued again, as on Ctrl-C, instead of the run dying with its trials marked running."""
    terminate_as_ctrl_c()
    settings = settings_for(workspace, trials=2, workers=2)
    runner = SleepingProbes()

    def terminate_once_both_probe() -> None:
        while len(runner.children) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_both_probe, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_study(prepare_run(settings), runner)
    assert [child.poll() for child in runner.children] == [-signal.SIGKILL] * 2
    study = open_study(settings.storage, "s", settings.seed)
    deadline = time.monotonic() + 10
    while study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
        assert time.monotonic() < deadline  # the worker threads record theirs as they end
        time.sleep(0.05)
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert [t.user_attrs.get("status") for t in failed] == ["interrupted"] * 2
    queued = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert {t.number for t in failed} <= {t.system_attrs.get("failed_trial") for t in queued}


class TerminatedProbes(SleepingProbes):
    """Probes a service manager or batch system ends with SIGTERM (it signals every process of
    the run at once, the probes among them)."""

    def _launch(self, request, request_path, result_path, log_path):
        child = subprocess.Popen(["sh", "-c", "kill -TERM $$"], start_new_session=True)
        self.children.append(child)
        return ColdProcess(child)


def test_a_probe_ended_by_sigterm_is_interrupted_not_a_crash(workspace):  # noqa: F811
    """The probe died before the run's own SIGTERM handler ran: its trial was recorded as a
    crash (the recipe blamed, the trial counted as finished) instead of queued again."""
    settings = settings_for(workspace, trials=2)
    with pytest.raises(KeyboardInterrupt):
        run_study(prepare_run(settings), TerminatedProbes())
    study = open_study(settings.storage, "s", settings.seed)
    (stopped,) = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert stopped.user_attrs["status"] == "interrupted"
    assert finished_trial_count(study) == 0
    queued = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert stopped.number in {t.system_attrs.get("failed_trial") for t in queued}


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


def test_four_workers_finish_exactly_the_requested_trials(workspace, monkeypatch):  # noqa: F811
    # the fake probes train nothing: four at once on fewer cores measure no shared machine
    monkeypatch.setattr("autotune.distributed.usable_cpu_cores", lambda: 4)
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


def _space_file(tmp_path: Path, line: str, replacement: str) -> Path:
    demo = (ROOT / "autotune" / "search_spaces" / "demo.yaml").read_text(encoding="utf-8")
    assert line in demo
    path = tmp_path / f"space-{len(list(tmp_path.glob('space-*')))}.yaml"
    path.write_text(demo.replace(line, replacement))
    return path


def test_a_resumed_study_refuses_a_space_without_its_choices(workspace):  # noqa: F811
    """Optuna samples a dimension from one fixed set of choices for the life of a study: a run
    whose space lost one of them is refused before any trial, in one line."""
    run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
    space = _space_file(workspace[0], "micro_batch_size: [1, 2, 4]", "micro_batch_size: [1, 2]")
    smaller = settings_for(workspace, trials=5, space_path=space)
    runner = FakeRunner()
    with pytest.raises(
        UsageError, match=r"searches choices this run's space does not: micro_batch_size 4 \(not in"
    ):
        run_study(prepare_run(smaller), runner)
    assert runner.requests == []
    study = optuna.load_study(study_name="s", storage=smaller.storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 2 and "FAIL" not in states


def test_a_resumed_study_says_which_new_choices_it_leaves_out(workspace):  # noqa: F811
    run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
    space = _space_file(workspace[0], "lora_r: [4, 8]", "lora_r: [4, 8, 16]")
    larger = settings_for(workspace, trials=6, space_path=space)
    events = RunEvents()
    started: list[PreparedRun] = []
    events.run_started = started.append
    runner = FakeRunner()
    study = run_study(prepare_run(larger), runner, events)
    # said once, in the run's opening lines, not again in a note
    assert started[0].kept_out_choices == {"lora_r": ["16"]}
    assert not any("lora_r 16" in note for note in events.notes), events.notes
    assert finished_trial_count(study) == 6
    assert {r.recipe.lora_r for r in runner.requests} <= {4, 8, None}


def test_a_study_holding_a_choice_the_model_cannot_run_is_refused_with_why(tmp_path, monkeypatch):
    """A Gemma 2 study started (before the architecture check) with SDPA, which Gemma 2's code
    refuses: resuming it says so instead of failing in Optuna."""
    from tests.test_architecture import config_dir

    monkeypatch.chdir(tmp_path)
    model = config_dir(tmp_path, "gemma2")
    data = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(30)])
    settings = settings_for(
        (tmp_path, model, data), space_path=ROOT / "autotune" / "search_spaces" / "default.yaml"
    )
    prepared = prepare_run(settings)
    assert "sdpa" in prepared.unsupported_choices["attention"]
    old = open_study(settings.storage, "s")
    old.set_user_attr(
        SPACE_CHOICES_ATTR, {**prepared.fitting_choices, "attention": ["eager", "sdpa"]}
    )
    old.enqueue_trial({"attention": "sdpa"})  # not a new study: it holds a trial
    # the run's space is the study's: the line says where it runs, not to resume it with it
    with pytest.raises(UsageError) as error:
        run_study(prepared, FakeRunner())
    said = str(error.value)
    assert re.search(
        r"^study s searches choices that cannot run here: attention sdpa \(Gemma2ForCausalLM "
        r"has no SDPA.*\); resume it where they run, or start a new study with --study$",
        said,
    ), said
    assert "with the space it searches" not in said


@pytest.mark.parametrize(
    ("change", "needle", "unsaid"),
    [
        ({"seq_len": 48}, "--seq-len was 64, now 48", "the data"),
        ({"probe_steps": 5}, "--probe-steps was 3, now 5", "the data"),
        ({"seed": 1}, "the data, its tokenizer or its split", "--seq-len"),
        ({"eval_rows": 5}, "the data, its tokenizer or its split", "--seq-len"),
    ],
)
def test_a_resume_under_other_settings_is_refused(workspace, change, needle, unsaid):  # noqa: F811
    first = prepare_run(settings_for(workspace, trials=1))
    run_study(first, FakeRunner())
    changed = prepare_run(settings_for(workspace, trials=2, **change))
    with pytest.raises(UsageError, match="was measured under other settings") as error:
        run_study(changed, FakeRunner())
    assert needle in str(error.value) and "--study NAME" in str(error.value)
    assert unsaid not in str(error.value)  # only what changed is named
    # the same settings resume
    assert (
        finished_trial_count(
            run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
        )
        == 2
    )


def test_a_resume_on_changed_data_is_refused(workspace):  # noqa: F811
    tmp_path, _, data = workspace
    run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    write_jsonl(data, [{"text": f"other row {i}"} for i in range(30)])
    with pytest.raises(UsageError, match="the data, its tokenizer or its split"):
        run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())


def test_a_study_made_when_the_data_key_held_the_file_name_resumes(workspace):  # noqa: F811
    """Studies made before token cache version 3 stored a data key that held the file's name:
    the same data still resumes them; other data is still refused."""
    from autotune.data.token_cache import token_cache_key
    from autotune.study.settings import tokenizer_for
    from autotune.study.study_records import record_setup, study_setup

    tmp_path, model, data = workspace
    settings = settings_for(workspace, trials=1)
    run_study(prepare_run(settings), FakeRunner())
    study = open_study(settings.storage, "s")
    old_key = token_cache_key(data, tokenizer_for(str(model)), 64, 0, None, version=2)
    setup = study_setup(study)
    record_setup(
        study,
        dataclasses.replace(
            setup, measured_under={**setup.measured_under, "data": f"tokens-{old_key}"}
        ),
    )
    assert (
        finished_trial_count(
            run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
        )
        == 2
    )
    write_jsonl(data, [{"text": f"other row {i}"} for i in range(30)])
    with pytest.raises(UsageError, match="the data, its tokenizer or its split"):
        run_study(prepare_run(settings_for(workspace, trials=3)), FakeRunner())


def _study_with_a_rival(workspace, monkeypatch, rival_pid: int):  # noqa: F811
    """A study holding one finished trial and a trial started first by another run (process
    `rival_pid` on this host), still running; trials look again at it five times a second."""
    import autotune.study.workers

    monkeypatch.setattr(autotune.study.workers, "TARGET_POLL_SECONDS", 0.2)
    run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    study = open_study(f"sqlite:///{workspace[0]}/study.db", "s")
    rival = study.ask()
    host = worker_id().rsplit(":", 1)[0]
    rival.set_user_attr("worker", f"{host}:{rival_pid}")
    return study, rival


def test_a_run_that_starts_a_trial_beyond_the_target_gives_it_up(
    workspace,  # noqa: F811
    monkeypatch,
):
    # a live process, not this one
    study, rival = _study_with_a_rival(workspace, monkeypatch, os.getppid())
    # the rival ends while this run's trial waits for it
    ends = threading.Timer(1.5, lambda: study.tell(rival, state=optuna.trial.TrialState.FAIL))
    ends.start()
    runner = FakeRunner()
    study = run_study(prepare_run(settings_for(workspace, trials=2)), runner)
    ends.join()
    surplus = [t for t in study.trials if t.user_attrs.get("surplus")]
    assert len(surplus) == 1 and surplus[0].state == optuna.trial.TrialState.PRUNED
    assert surplus[0].number > rival.number
    assert finished_trial_count(study) == 2  # the rival's trial was the second
    # no trial was probed (trial probes use the run's seed; confirmations and noise the next)
    assert all(request.seed != 0 for request in runner.requests)


def test_a_trial_waiting_on_a_rival_that_dies_runs_in_its_place(
    workspace,  # noqa: F811
    monkeypatch,
):
    rival_run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    threading.Thread(target=rival_run.wait, daemon=True).start()  # reaped when it ends
    study, rival = _study_with_a_rival(workspace, monkeypatch, rival_run.pid)
    runner = FakeRunner()
    study = run_study(prepare_run(settings_for(workspace, trials=2)), runner)
    assert study.trials[rival.number].state == optuna.trial.TrialState.FAIL
    assert not [t for t in study.trials if t.user_attrs.get("surplus")]
    assert finished_trial_count(study) == 2
    assert any(request.seed == 0 for request in runner.requests)  # a trial was probed


CLAIMER = """
import sys, time
import optuna
from autotune.study import claim_once
study = optuna.load_study(study_name="s", storage=sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all ask at the same moment
print(claim_once(study, "race"))  # a job no run of the study has
"""


JOURNAL_CLAIMER = CLAIMER.replace(
    "storage=sys.argv[1]",
    "storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(sys.argv[1]))",
)


def _claim_race(script: str, storage: str, runs: int = 3) -> list[str]:
    start = time.time() + 4
    claimers = [
        subprocess.Popen(
            [sys.executable, "-c", script, storage, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(runs)
    ]
    answers = [claimer.communicate(timeout=90) for claimer in claimers]
    assert all(claimer.returncode == 0 for claimer in claimers), answers
    return sorted(out.strip() for out, _ in answers)


def _set_claim(study, job: str, worker: str, at: float) -> None:
    """Stands for a claim another run made: its claim study, holding `worker`."""
    from autotune.study.claims import Claim, claim_study_name, record_claim

    storage = study._storage
    for generation in itertools.count():  # the job's next claim
        name = claim_study_name(study.study_name, job, generation)
        if name not in [s.study_name for s in storage.get_all_studies()]:
            break
    claim_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], name)
    record_claim(storage, claim_id, Claim(worker, at))


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_of_runs_claiming_one_confirmation_at_once_exactly_one_takes_it(workspace, kind):  # noqa: F811
    if kind == "sqlite":
        storage, script = f"sqlite:///{workspace[0]}/study.db", CLAIMER
        run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    else:
        storage, script = str(workspace[0] / "journal.log"), JOURNAL_CLAIMER
        backend = optuna.storages.journal.JournalFileBackend(storage)
        optuna.create_study(study_name="s", storage=optuna.storages.JournalStorage(backend))
    assert _claim_race(script, storage) == ["False", "False", "True"]
    # the winner is dead now: of the runs that find its claim, exactly one takes it over
    assert _claim_race(script, storage) == ["False", "False", "True"]


def test_a_claim_of_a_dead_run_on_this_host_is_taken_over(workspace):  # noqa: F811
    from autotune.study import claim_once

    run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    study = open_study(f"sqlite:///{workspace[0]}/study.db", "s")
    host = worker_id().rsplit(":", 1)[0]
    now = time.time()
    _set_claim(study, "noise", f"{host}:{_dead_pid()}", now)
    assert claim_once(study, "noise")
    assert claim_once(study, "noise")  # its own claim stands for the run that holds it
    _set_claim(study, "noise", f"{host}:{os.getppid()}", now)  # alive: its claim stands
    assert not claim_once(study, "noise")
    _set_claim(study, "noise", "another-host:1", now)
    assert not claim_once(study, "noise")  # cannot be checked: it stands until it is stale
    _set_claim(study, "noise", "another-host:1", now - 3 * 3600)
    assert claim_once(study, "noise")


def _study_for_claims(paths):
    run_study(prepare_run(settings_for(paths, trials=1)), FakeRunner())
    return open_study(f"sqlite:///{paths[0]}/study.db", "s")


def test_a_claim_whose_creator_died_before_saying_who_holds_it_is_taken_over(
    workspace,  # noqa: F811
    monkeypatch,
):
    from autotune.study import claim_once, workers
    from autotune.study.claims import claim_of, claim_study_name

    study = _study_for_claims(workspace)
    storage = study._storage
    # its creator died between creating the claim and recording its holder
    storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], claim_study_name("s", "noise"))
    monkeypatch.setattr(workers, "CLAIM_UNSAID_SECONDS", 1.0)
    assert not claim_once(study, "noise")  # maybe its creator is about to say who it is
    assert not claim_once(study, "noise")  # the grace counts from when a run first found it
    time.sleep(1.2)
    assert claim_once(study, "noise")
    taken = claim_of(storage, storage.get_study_id_from_name(claim_study_name("s", "noise", 1)))
    assert taken is not None and taken.worker == worker_id()


def test_a_claim_taken_over_before_its_creator_said_who_holds_it_is_not_held(
    workspace,  # noqa: F811
    monkeypatch,
):
    from autotune.study import claim_once, workers

    study = _study_for_claims(workspace)
    record = workers.record_claim

    def late(storage, claim_id, claim):  # another run gave up waiting and took it over first
        monkeypatch.setattr(workers, "record_claim", record)
        _set_claim(study, "noise", "another-host:1", time.time())
        record(storage, claim_id, claim)

    monkeypatch.setattr(workers, "record_claim", late)
    assert not claim_once(study, "noise")


def test_an_ended_job_leaves_no_claim_and_is_not_taken_again(workspace):  # noqa: F811
    from autotune.study import claim_once
    from autotune.study.study_records import confirmation_job, confirmations, study_noise

    run_study(prepare_run(settings_for(workspace, trials=3)), FakeRunner())
    study = open_study(f"sqlite:///{workspace[0]}/study.db", "s")
    assert confirmations(study) and study_noise(study) is not None
    storage = study._storage
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]
    number = next(iter(confirmations(study)))
    # a run that read "not confirmed" just before the holder recorded it and let it go
    assert not claim_once(study, confirmation_job(number), done=lambda: True)
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]


def test_a_claim_released_while_it_is_read_is_claimed_again(workspace):  # noqa: F811
    from autotune.study import claim_once

    run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    study = open_study(f"sqlite:///{workspace[0]}/study.db", "s")
    _set_claim(study, "race", "another-host:1", time.time())  # held elsewhere, alive
    storage = study._storage
    lookup = storage.get_study_id_from_name

    def released_first(name):  # its holder deletes it just before it is read
        if name == "s#claim:race":
            storage.get_study_id_from_name = lookup
            storage.delete_study(lookup(name))
            raise KeyError(name)
        return lookup(name)

    storage.get_study_id_from_name = released_first
    assert claim_once(study, "race")


def test_claims_are_not_studies_to_report_or_to_name(workspace):  # noqa: F811
    from autotune.study import claim_once
    from autotune.study.settings import study_file_name
    from autotune.study.storage import load_existing_study

    run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    storage = f"sqlite:///{workspace[0]}/study.db"
    assert claim_once(open_study(storage, "s"), "zzz")  # its study is the storage's newest
    assert load_existing_study(storage, None).study_name == "s"
    with pytest.raises(UsageError, match="#claim:"):
        study_file_name("s#claim:noise")


def test_a_running_trial_with_no_worker_is_failed_once_stale(workspace, monkeypatch):  # noqa: F811
    import autotune.study.storage
    from autotune.study import fail_interrupted_trials

    run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    study = open_study(f"sqlite:///{workspace[0]}/study.db", "s")
    orphan = study.ask()  # started by something that never said which worker it is
    assert fail_interrupted_trials(study) == []  # fresh: left alone
    monkeypatch.setattr(autotune.study.storage, "STALE_AFTER_SECONDS", 0)
    assert fail_interrupted_trials(study) == [orphan.number]
    assert study.trials[orphan.number].user_attrs["status"] == "interrupted"


def test_a_resume_under_another_budget_makes_it_the_studys_budget(workspace):  # noqa: F811
    """Status, studies, the report and export read the study's budget: after a resume under
    another --budget they say the one that run held its trials to, as the run itself did."""
    from autotune.export import recipe_yaml
    from autotune.report import report_data
    from autotune.study.study_records import study_setup

    run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
    events = RunEvents()
    smaller = prepare_run(settings_for(workspace, trials=3, budget_bytes=5 * 10**9))
    study = run_study(smaller, FakeRunner(), events)
    assert study_setup(study).budget_bytes == 5 * 10**9
    assert report_data(study).budget_bytes == 5 * 10**9
    exported = yaml.safe_load(recipe_yaml(study, "balanced")[1])
    assert "fits 4.66 GiB with" in exported["measured"]["predicted_fit"]
    assert [n for n in events.notes if n.startswith("budget now 4.66 GiB, was 9.31 GiB")] == [
        "budget now 4.66 GiB, was 9.31 GiB; the 2 trials before this run were held to 9.31 GiB "
        "and are held to 4.66 GiB on the frontier"
    ]


def test_a_resume_refused_after_the_budget_check_keeps_the_studys_budget(workspace):  # noqa: F811
    """The space check comes after the budget's: a run it refuses changes nothing."""
    from autotune.study.study_records import study_setup

    run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
    space = _space_file(workspace[0], "micro_batch_size: [1, 2, 4]", "micro_batch_size: [1, 2]")
    refused = settings_for(workspace, trials=3, space_path=space, budget_bytes=5 * 10**9)
    with pytest.raises(UsageError, match="searches choices this run's space does not"):
        run_study(prepare_run(refused), FakeRunner())
    study = optuna.load_study(study_name="s", storage=refused.storage)
    assert study_setup(study).budget_bytes == 10**10
    from autotune.study.study_records import study_budgets

    assert study_budgets(study).spans == ((0, 10**10),)


def test_a_trial_over_a_smaller_resumed_budget_leaves_the_frontier(full_rows_workspace):  # noqa: F811
    """A trial that fit the budget of its run but not the smaller one the study was resumed
    under is neither a measured point, on the frontier, feasible in the report nor exported;
    and after a second change the note names each run's budget."""
    work = full_rows_workspace
    from autotune.export import recipe_yaml
    from autotune.report import report_data
    from autotune.study.records import measured_points, trial_record

    study = run_study(prepare_run(settings_for(work, trials=3)), FakeRunner())
    # on CPU a trial is held to its predicted peak (no margin here)
    peaks = {t.number: trial_record(t).predicted_peak_bytes for t in study.trials}
    largest = max(peaks, key=lambda number: peaks[number])
    assert {p.number for p in measured_points(study)} == set(peaks)
    assert recipe_yaml(study, "fastest")[0] == Recipe.from_dict(
        study.trials[largest].user_attrs["recipe"]
    )
    smaller = max(peak for number, peak in peaks.items() if number != largest)
    resumed = run_study(
        prepare_run(settings_for(work, trials=4, budget_bytes=smaller)), FakeRunner()
    )
    points = {p.number for p in measured_points(resumed)}
    assert largest not in points and set(peaks) - {largest} <= points
    frame = report_data(resumed).frame.set_index("trial")
    assert not frame.loc[largest, "feasible"] and not frame.loc[largest, "on_frontier"]
    assert frame.loc[sorted(points), "feasible"].all()
    assert recipe_yaml(resumed, "fastest")[0] != Recipe.from_dict(
        resumed.trials[largest].user_attrs["recipe"]
    )
    events = RunEvents()
    larger = prepare_run(settings_for(work, trials=4, budget_bytes=2 * 10**9))
    run_study(larger, FakeRunner(), events)
    held = format_bytes(smaller)
    assert (
        f"budget now 1.86 GiB, was {held}; the 4 trials before this run were held to their "
        f"runs' budgets (9.31 GiB, {held}) and are held to 1.86 GiB on the frontier; those "
        f"ruled out under {held} stay ruled out (a new study, --study NAME, searches them)"
    ) in events.notes


def _budget_no_full_fine_tune_fits(work) -> tuple[int, int]:
    """A budget that rules out method full alone of the methods (on rows as wide as seq_len),
    and the formula's least peak of a full fine-tune."""
    from autotune.memory import estimate

    roomy = prepare_run(settings_for(work, budget_bytes=10**12))
    least: dict[str, int] = {}
    for params in roomy.space.all_params():
        recipe = roomy.space.build(params, str(work[1]), roomy.spec, 64)
        method = params["method"]
        least[method] = min(least.get(method, 2**62), estimate(roomy.spec, recipe).peak_bytes)
    others = max(peak for method, peak in least.items() if method != "full")
    assert least["full"] > others
    return (least["full"] + others) // 2, least["full"]


def _shown_run(work, budget_bytes: int, trials: int) -> tuple[list[str], FakeRunner, optuna.Study]:
    """The lines a run prints, its probes and its study."""
    import io

    from rich.console import Console

    from autotune.console import ConsoleReporter

    out, runner = io.StringIO(), FakeRunner()
    with ConsoleReporter(Console(file=out, width=1000)) as reporter:
        settings = settings_for(work, trials=trials, budget_bytes=budget_bytes)
        study = run_study(prepare_run(settings), runner, reporter)
    return out.getvalue().splitlines(), runner, study


def test_a_choice_a_smaller_resumed_budget_rules_out_is_said_to_be_searched_unprobed(
    full_rows_workspace,  # noqa: F811
):
    """Resumed under a budget no full fine-tune fits, the study still samples method full
    (Optuna keeps its choices): the run's opening lines and the report say so rather than that
    it is not searched, its trials are held over the budget and no probe trains it; resumed
    again under the first budget, nothing is said of it."""
    from autotune.report import report_data
    from autotune.study.records import TrialStatus, trial_status

    work = full_rows_workspace
    budget, full_peak = _budget_no_full_fine_tune_fits(work)
    first = run_study(prepare_run(settings_for(work, trials=4, budget_bytes=10**12)), FakeRunner())
    assert "full" in {t.params["method"] for t in first.trials}
    lines, runner, study = _shown_run(work, budget, 14)
    said = [line for line in lines if "no recipe with them fits the budget" in line]
    assert len(said) == 1, lines
    assert said[0].startswith(
        "searched by the study, but no recipe with them fits the budget (predicted): method "
        f"full ({format_bytes(full_peak)} at least by the formula)"
    )
    assert said[0].endswith(
        "trials with them are held over the budget and run no probe (a new study, --study "
        "NAME, leaves them out)"
    )
    assert not any(line.startswith("not searched") for line in lines), lines
    full = [t for t in study.trials[4:] if t.params["method"] == "full"]
    assert full, "the resumed study sampled no full fine-tune"
    assert all(trial_status(t) == TrialStatus.OVER_BUDGET_PREDICTED for t in full)
    assert runner.requests and all(r.recipe.method != "full" for r in runner.requests)
    # the report names the budget, as the study's runs held two
    assert report_data(study).space_lines == (
        said[0].replace("fits the budget", f"fits the budget of {format_bytes(budget)}"),
    )
    lines, _, study = _shown_run(work, 10**12, 15)
    assert not any("no recipe with them fits" in line for line in lines), lines
    assert report_data(study).space_lines == ()


def test_a_choice_a_larger_resumed_budget_fits_is_not_said_to_be_over_it(
    full_rows_workspace,  # noqa: F811
):
    """A study sized under a budget no full fine-tune fits, resumed under one it fits, does not
    search method full (Optuna keeps its choices): the run and the report say that, not that
    no recipe with it fits the budget, and no probe trains it."""
    from autotune.report import report_data

    work = full_rows_workspace
    budget, _ = _budget_no_full_fine_tune_fits(work)
    lines, _, _ = _shown_run(work, budget, 3)
    assert any(
        line.startswith(
            "not searched, no recipe with them fits the budget (predicted): method full ("
        )
        for line in lines
    ), lines
    lines, runner, study = _shown_run(work, 10**12, 8)
    kept = [line for line in lines if line.startswith("not searched")]
    assert len(kept) == 1 and kept[0].startswith(
        "not searched, the study keeps the choices it searches, though a recipe with them fits "
        "the budget now: method full"
    ), lines
    assert kept[0].endswith("(a new study, --study NAME, searches them)")
    # the report names the budget, as the study's runs held two
    assert report_data(study).space_lines == (
        kept[0].replace("fits the budget", f"fits the budget of {format_bytes(10**12)}"),
    )
    assert runner.requests and all(r.recipe.method != "full" for r in runner.requests)
    # back under the first budget, method full is ruled out again, and the study records it
    lines, _, study = _shown_run(work, budget, 9)
    ruled = [line for line in lines if line.startswith("not searched")]
    assert len(ruled) == 1 and ruled[0].startswith(
        "not searched, no recipe with them fits the budget (predicted): method full ("
    ), lines
    assert report_data(study).space_lines == (
        ruled[0].replace("fits the budget", f"fits the budget of {format_bytes(budget)}"),
    )
    assert set(study.user_attrs["ruled_out_choices"]["method"]) == {"full"}


def test_a_resume_names_once_in_its_report_each_choice_its_budget_rules_out_with_the_budget(
    full_rows_workspace,  # noqa: F811
):
    """A study sized under a budget that fits everything, on a space without method full,
    resumed under a budget no full fine-tune (nor micro_batch_size 4) fits, on a space that
    lists full: its report, HTML included, names full (which the study never held) as not
    searched and micro_batch_size 4 (which it searches) as over the budget, each once, with
    the budget that ruled it out, since the study's runs held two budgets. Resumed once more
    under the first budget, neither is said to be ruled out: full fits now, and is said to be
    kept out."""
    from autotune.report import render_html, report_data

    work = full_rows_workspace
    budget, full_peak = _budget_no_full_fine_tune_fits(work)
    no_full = _space_file(work[0], "method: [lora, freeze, full]", "method: [lora, freeze]")
    run_study(
        prepare_run(settings_for(work, trials=3, budget_bytes=10**12, space_path=no_full)),
        FakeRunner(),
    )
    lines, runner, study = _shown_run(work, budget, 6)
    assert runner.requests and all(r.recipe.micro_batch_size != 4 for r in runner.requests)
    space_lines = report_data(study).space_lines
    within = f"no recipe with them fits the budget of {format_bytes(budget)} (predicted): "
    assert [line.split(": ")[0] + ": " for line in space_lines] == [
        f"not searched, {within}",
        f"searched by the study, but {within}",
    ], space_lines
    assert space_lines[0] == (
        f"not searched, {within}method full ({format_bytes(full_peak)} at least by the formula)"
    )
    assert space_lines[1].startswith(f"searched by the study, but {within}micro_batch_size 4 (")
    said = " ".join(space_lines)
    assert said.count("method full") == 1 and said.count("micro_batch_size 4") == 1
    page = render_html(report_data(study))
    for line in space_lines:
        assert page.count(html.escape(line[0].upper() + line[1:])) == 1
    assert page.count("method full (") == 1 and page.count("micro_batch_size 4 (") == 1
    # the run's opening lines say the same choices, under this run's budget, which they name
    assert [line for line in lines if line.startswith(("not searched", "searched by"))] == [
        line.replace(f" of {format_bytes(budget)}", "") for line in space_lines
    ]
    lines, _, study = _shown_run(work, 10**12, 8)
    assert report_data(study).space_lines == (
        "not searched, the study keeps the choices it searches, though a recipe with them fits "
        f"the budget of {format_bytes(10**12)} now: method full (a new study, --study NAME, "
        "searches them)",
    )
    assert not any("no recipe with them fits" in line for line in lines), lines


def test_a_choice_a_resumed_space_adds_that_cannot_run_here_is_named_in_the_report(workspace):  # noqa: F811
    """A resumed space that adds attention flash_attention_2, which cannot run on this CPU, to
    a dimension the study searches: the run's opening lines and its report name it once as not
    searched, with why (the report said nothing of it)."""
    from autotune.report import report_data

    demo = (ROOT / "autotune" / "search_spaces" / "demo.yaml").read_text(encoding="utf-8")
    two = workspace[0] / "two-attentions.yaml"
    two.write_text(demo + "attention: [eager, sdpa]\n")
    run_study(prepare_run(settings_for(workspace, trials=2, space_path=two)), FakeRunner())
    three = workspace[0] / "three-attentions.yaml"
    three.write_text(demo + "attention: [eager, sdpa, flash_attention_2]\n")
    prepared = prepare_run(settings_for(workspace, trials=3, space_path=three))
    why = prepared.unsupported_choices["attention"]["flash_attention_2"]
    study = run_study(prepared, FakeRunner())
    assert report_data(study).space_lines == (
        f"not searched, they cannot run here: attention flash_attention_2 ({why})",
    )


def test_a_trial_under_the_old_budget_numbered_past_a_change_is_held_to_it(workspace):  # noqa: F811
    """The budget history is keyed by trial number: a resume whose first trial is a queued
    one numbered below a trial finished under the old budget (or a second worker still under
    the old budget) puts that trial in the new budget's span. It is held to the budget its
    constraint was measured against, which it stores: over the smaller budget now, it is
    neither a measured point nor feasible in the report."""
    from autotune.report import report_data
    from autotune.study.records import measured_points, trial_record
    from autotune.study.study_records import record_new_budget

    study = run_study(prepare_run(settings_for(workspace, trials=3)), FakeRunner())
    peaks = {t.number: trial_record(t).predicted_peak_bytes for t in study.trials}
    largest = max(peaks, key=lambda number: peaks[number])
    smaller = max(peak for number, peak in peaks.items() if number != largest)
    assert {p.number for p in measured_points(study)} == set(peaks)
    # the spans a resume under `smaller` records when its first trial is numbered `largest`
    record_new_budget(study, smaller, largest)
    study = optuna.load_study(study_name="s", storage=settings_for(workspace).storage)
    assert largest not in {p.number for p in measured_points(study)}
    assert not report_data(study).frame.set_index("trial").loc[largest, "feasible"]


def test_the_report_counts_probes_an_hour_as_status_does_with_two_workers(workspace):  # noqa: F811
    """Two workers probe at once: the report summed the trials' durations (twice the wall
    time), so its probes an hour was half the figure `autotune status` gave for the study."""
    from autotune.report import report_data
    from autotune.study.overview import study_status
    from tests.test_study import TimedRunner

    class SlowTimedRunner(TimedRunner):
        def run(self, request, workdir):
            time.sleep(0.3)
            return super().run(request, workdir)

    settings = settings_for(workspace, trials=6, workers=2)
    run_study(prepare_run(settings), SlowTimedRunner())
    status = study_status(settings.storage, "s")
    study = optuna.load_study(study_name="s", storage=settings.storage)
    data = report_data(study)
    assert data.frame["trial_seconds"].sum() / 3600 > status.probes / status.probes_per_hour
    text = data.time_text  # the trials overlapped: their durations add to more than wall time
    assert status.probes_per_hour and f"{status.probes} probed " in text
    assert f"({status.probes_per_hour:.0f} an hour)" in text


def test_only_the_records_modules_spell_attribute_keys():
    """A study's or a trial's attribute is written under a key that records or study_records
    names (the study's budget included), so that its one reader finds it."""
    records = {ROOT / "autotune" / "study" / name for name in ("records.py", "study_records.py")}
    spelled = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in sorted((ROOT / "autotune").rglob("*.py"))
        if path not in records
        for line in path.read_text(encoding="utf-8").splitlines()
        if re.search(r"set_user_attr\(\s*[\"']", line)
    ]
    assert spelled == []


def test_a_trials_constraint_is_held_to_the_studys_budget_now():
    """Each trial's stored constraint is relative to its run's budget: read against the
    budget now, a fit under a larger one is checked again, a fit under a smaller one stays, a
    trial ruled out stays ruled out, and a study without the history reads as stored."""
    from types import SimpleNamespace

    from autotune.study.records import constraint_now
    from autotune.study.study_records import StudyBudgets, study_budgets

    budgets = StudyBudgets(((0, 10**10), (3, 10**9), (5, 3 * 10**9)))
    assert [budgets.held_to(n) for n in (0, 2, 3, 4, 5, 9)] == [10**10] * 2 + [10**9] * 2 + [
        3 * 10**9
    ] * 2

    def trial(number: int, constraint: float) -> SimpleNamespace:
        return SimpleNamespace(
            number=number, constraints={"memory_over_budget": constraint}, user_attrs={}
        )

    assert constraint_now(trial(0, -0.8), budgets) == pytest.approx(-1 / 3)  # 2 GB of 3
    assert constraint_now(trial(1, -0.5), budgets) == pytest.approx(2 / 3)  # 5 GB of 3
    assert constraint_now(trial(3, -0.5), budgets) == pytest.approx(-5 / 6)  # 0.5 GB of 3
    assert constraint_now(trial(4, 0.5), budgets) == 0.5  # ruled out under 1 GB stays out
    assert constraint_now(trial(6, 0.1), budgets) == 0.1
    old = SimpleNamespace(user_attrs={"budget_bytes": 10**9})
    assert study_budgets(old).spans == ((0, 10**9),)
    assert constraint_now(trial(2, -0.5), study_budgets(old)) == -0.5


class ReadBeforeTheOtherWrote:
    """A run's view of a study: its attributes as read before another run wrote; what it
    writes goes to the study."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.user_attrs = study.user_attrs

    def set_user_attr(self, key: str, value: object) -> None:
        self.study.set_user_attr(key, value)


def test_two_runs_changing_the_budget_at_once_keep_both_changes(tmp_path):
    """Two runs resumed under other budgets at the same moment: both read the study's
    attributes, then both write. One history read, changed and written back lost the first
    run's change; a key per change keeps both, and a study from before (its whole history
    under one key) reads on."""
    from autotune.study.study_records import (
        StudySetup,
        record_new_budget,
        record_setup,
        study_budgets,
        study_setup,
    )

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    record_setup(study, StudySetup(budget_bytes=8 * 10**9))

    first, second = ReadBeforeTheOtherWrote(study), ReadBeforeTheOtherWrote(study)
    record_new_budget(first, 4 * 10**9, 5)
    record_new_budget(second, 2 * 10**9, 7)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 's.db'}")
    assert study_budgets(study).spans == ((0, 8 * 10**9), (5, 4 * 10**9), (7, 2 * 10**9))
    assert study_setup(study).budget_bytes == 2 * 10**9
    # a later change from an earlier trial replaces what held the trials from there on
    record_new_budget(study, 3 * 10**9, 6)
    assert study_budgets(study).spans == ((0, 8 * 10**9), (5, 4 * 10**9), (6, 3 * 10**9))

    old = optuna.create_study()
    old.set_user_attr("budget_bytes", 10**9)
    old.set_user_attr("budgets", [[0, 4 * 10**9], [3, 10**9]])
    assert study_budgets(old).spans == ((0, 4 * 10**9), (3, 10**9))
    record_new_budget(old, 2 * 10**9, 9)
    assert study_budgets(old).spans == ((0, 4 * 10**9), (3, 10**9), (9, 2 * 10**9))


def test_an_older_version_reads_the_budget_now_in_force_after_a_change(tmp_path):
    """Versions from before the per-change keys read the history under `budgets` (or only
    `budget_bytes`, before the history): a change kept in its own key alone left them holding
    the study to its first budget. Each change also writes those, and this version's history
    reads the same with them, two runs at once included (the later legacy write wins)."""
    from autotune.study.study_records import (
        StudySetup,
        record_new_budget,
        record_setup,
        study_budgets,
        study_setup,
    )

    url = f"sqlite:///{tmp_path / 's.db'}"
    record_setup(optuna.create_study(storage=url, study_name="s"), StudySetup(budget_bytes=8))

    def older_readers() -> tuple[int, list[list[int]] | None]:
        # what each older version reads from the storage: budget_bytes, and the history
        attrs = optuna.load_study(study_name="s", storage=url).user_attrs
        return attrs["budget_bytes"], attrs.get("budgets")

    assert older_readers() == (8, None)  # unchanged: the setup's budget alone
    record_new_budget(optuna.load_study(study_name="s", storage=url), 4, 5)
    assert older_readers() == (4, [[0, 8], [5, 4]])
    study = optuna.load_study(study_name="s", storage=url)
    assert study_budgets(study).spans == ((0, 8), (5, 4))

    first, second = ReadBeforeTheOtherWrote(study), ReadBeforeTheOtherWrote(study)
    record_new_budget(second, 2, 9)
    record_new_budget(first, 3, 7)  # written last, though its change is the earlier
    assert older_readers() == (3, [[0, 8], [5, 4], [7, 3]])  # its view, as last written
    study = optuna.load_study(study_name="s", storage=url)
    assert study_budgets(study).spans == ((0, 8), (5, 4), (7, 3))  # the changes' own order
    assert study_setup(study).budget_bytes == 3


def test_a_database_storage_that_cannot_be_opened_is_said_before_the_data_is_read(
    workspace,  # noqa: F811
    monkeypatch,
):
    """A wrong host or password was said only after the data was tokenized and the space
    sized (minutes on a large model), under the run's opening line."""

    def read_data(*args, **kwargs):
        raise AssertionError("the data was read before the storage was opened")

    monkeypatch.setattr("autotune.study.prepare.checked_scan", read_data)
    url = "postgresql://me:pw@127.0.0.1:1/none"
    with pytest.raises(UsageError, match=r"cannot open storage postgresql://me:\*\*\*@127"):
        prepare_run(settings_for(workspace, storage=url))


def test_the_sampler_reads_a_trial_over_a_smaller_resumed_budget_as_infeasible(
    full_rows_workspace,  # noqa: F811
    monkeypatch,
):
    """What TPE reads when it splits the trials (its infeasible score, as its split computes
    it): resumed under the same budget, every trial as it stored it; resumed under a smaller
    one, the trials that fit the old budget and not the new one are infeasible, and their
    stored constraints are still what their run measured."""
    work = full_rows_workspace
    from optuna.samplers._tpe import sampler as tpe

    from autotune.study.records import trial_record

    seen: list[dict[int, float]] = []
    split = tpe._split_trials

    def spy(study, trials, n_below):
        finished = (t for t in trials if t.state.is_finished())
        seen.append({t.number: tpe._get_infeasible_trial_score(t) for t in finished})
        return split(study, trials, n_below)

    monkeypatch.setattr(tpe, "_split_trials", spy)
    study = run_study(prepare_run(settings_for(work, trials=6)), FakeRunner())
    stored = {t.number: tpe._get_infeasible_trial_score(t) for t in study.trials}
    seen.clear()
    run_study(prepare_run(settings_for(work, trials=7)), FakeRunner())
    assert seen and all(view == {n: stored[n] for n in view} for view in seen)
    assert set(seen[-1]) >= set(range(6))
    # on CPU a trial is held to its predicted peak (no margin here)
    peaks = {t.number: trial_record(t).predicted_peak_bytes for t in study.trials}
    largest = max(peaks.values())
    smaller = max(peak for peak in peaks.values() if peak < largest)
    over = {number for number, peak in peaks.items() if peak > smaller}
    assert over and all(stored[number] == 0 for number in over)
    seen.clear()
    resumed = run_study(
        prepare_run(settings_for(work, trials=8, budget_bytes=smaller)), FakeRunner()
    )
    assert seen and all(view[number] > 0 for view in seen for number in over)
    assert all(view[n] == stored[n] for view in seen for n in set(stored) - over if n in view)
    assert all(max(resumed.trials[n].constraints.values()) <= 0 for n in over)


def test_a_trial_over_the_budget_now_moves_the_samplers_proposals():
    """Ten trials, the best three with a recipe that fit the study's first budget (8 GB) and
    not its budget now (4 GB): TPE reading their stored constraints proposes mostly that
    recipe again; reading them under the budget now, it proposes the others."""
    from autotune.study.records import DIRECTIONS, record_constraint
    from autotune.study.sampler import BudgetedSampler
    from autotune.study.study_records import StudySetup, record_new_budget, record_setup

    choices = ["a", "b", "c", "big"]
    old_budget = 8 * 10**9

    def proposals(budgeted: bool) -> list[str]:
        tpe = optuna.samplers.TPESampler(
            multivariate=True, group=True, constant_liar=True, seed=0, n_startup_trials=5
        )
        study = optuna.create_study(
            directions=list(DIRECTIONS), sampler=BudgetedSampler(tpe) if budgeted else tpe
        )
        record_setup(study, StudySetup(budget_bytes=old_budget))
        for number in range(10):
            choice = "big" if number < 3 else choices[number % 3]
            study.enqueue_trial({"x": choice})
            trial = study.ask()
            trial.suggest_categorical("x", choices)
            peak = 6e9 if choice == "big" else 3e9
            record_constraint(trial, (peak - old_budget) / old_budget, old_budget)
            study.tell(trial, [peak, 2000.0 if choice == "big" else 1000.0 + number, 2.5])
        record_new_budget(study, 4 * 10**9, 10)
        proposed = []
        for _ in range(20):
            trial = study.ask()
            proposed.append(trial.suggest_categorical("x", choices))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return proposed

    as_stored, held = proposals(budgeted=False), proposals(budgeted=True)
    assert as_stored.count("big") > 10
    assert held.count("big") < as_stored.count("big") / 2


def test_status_and_the_progress_bar_count_the_same_untried_recipes_after_a_resume(workspace):  # noqa: F811
    """A resume under a smaller budget whose space searches lora_dropout too: its recipes are
    points with a dropout, which none of the earlier trials is. The bar counted all 4 untried
    while status subtracted the 2 earlier trials' recipes from the space's count (2 untried):
    both now say the figure the run bounds its trials by, as each trial ends."""
    from autotune.api import study_status
    from tests.test_study import TINY_SPACE

    space = workspace[0] / "tiny.yaml"
    tiny = TINY_SPACE.replace("lora_r: [4, 8]", "lora_r: [4]")  # two recipes
    space.write_text(tiny)
    first = settings_for(workspace, space_path=space, trials=2, confirm_top=0)
    run_study(prepare_run(first), FakeRunner())
    space.write_text(tiny.replace("lora_dropout: 0.0", "lora_dropout: [0.0, 0.1]"))
    events = RunEvents()
    bar: list[int] = []  # the most trials the run could still add, as the bar was told
    said: list[tuple[int | None, str]] = []  # status, read from the storage as each trial ends

    def trials_left(left: int) -> None:
        bar.append(left)

    def trial_finished(summary: object) -> None:
        overview = study_status(first.storage, "s").overview
        said.append((overview.space_recipes_untried, overview.finished_words))

    events.trials_left = trials_left
    events.trial_finished = trial_finished
    resumed = dataclasses.replace(first, trials=100, budget_bytes=5 * 10**9)
    study = run_study(prepare_run(resumed), FakeRunner(), events)
    assert bar[0] == 4 and bar[-1] == 0
    # each trial ends before the bar is told again: status says what the bar was last told
    assert [untried for untried, _ in said] == bar[: len(said)]
    assert (
        said[0][1]
        == "2 of at most 6 trials finished (--trials 100; 4 recipes of the space untried)"
    )
    overview = study_status(first.storage, "s").overview
    assert overview.space_recipes_untried == 0
    assert overview.finished == finished_trial_count(study) == 2 + len(said)


def _tiny_space_run(workspace, dropout: str, trials: int, name: str = "s"):  # noqa: F811
    """A study `name` on the tiny space (lora_r 4: two recipes, micro_batch_size 1 and 2)
    whose lora_dropout line is `dropout`, run with --trials `trials`; its settings."""
    from tests.test_study import TINY_SPACE

    space = workspace[0] / "tiny.yaml"
    space.write_text(
        TINY_SPACE.replace("lora_r: [4, 8]", "lora_r: [4]").replace("lora_dropout: 0.0", dropout)
    )
    settings = settings_for(
        workspace, space_path=space, trials=trials, confirm_top=0, study_name=name
    )
    run_study(prepare_run(settings), FakeRunner())
    return settings


def test_a_resume_whose_space_searches_a_dimension_the_study_fixed_searches_it(workspace):  # noqa: F811
    """The study's first space fixed lora_dropout ([0.0]) and it tried both its recipes; the
    resumed run's space searches lora_dropout 0.0, 0.05, 0.1, which Optuna takes as a new
    parameter: the run searches them and says so (it said they were not searched), the study
    records them, and status no longer says its space was tried whole (6 recipes now)."""
    from autotune.api import list_studies, study_status
    from autotune.state_text import status_text, studies_text
    from autotune.study import space_choices

    first = _tiny_space_run(workspace, "lora_dropout: [0.0]", trials=40)
    assert "every one of the space's 2 recipes has been tried" in status_text(
        study_status(first.storage, "s")
    )
    space = Path(first.space_path)
    space.write_text(
        space.read_text().replace("lora_dropout: [0.0]", "lora_dropout: [0.0, 0.05, 0.1]")
    )
    events = RunEvents()
    said: list[str] = []  # status as each of the resumed run's trials ends (before it counts)
    events.trial_finished = lambda summary: said.append(
        status_text(study_status(first.storage, "s"))
    )
    runner = FakeRunner()
    study = run_study(prepare_run(first), runner, events)
    assert not any("not searched" in note for note in events.notes), events.notes
    assert (
        "study s searches lora_dropout 0.0, 0.05, 0.1 from this run on; its earlier trials ran "
        "with one value of it" in events.notes
    )
    assert {r.recipe.lora_dropout for r in runner.requests} == {0.0, 0.05, 0.1}
    assert space_choices(study).fitting["lora_dropout"] == [0.0, 0.05, 0.1]
    assert (
        "2 of at most 8 trials finished (--trials 40; 6 recipes of the space untried)" in (said[0])
    )
    assert not any("has been tried" in text for text in said)
    assert "8 trials finished (--trials 40): every one of the space's 6 recipes" in studies_text(
        list_studies(first.storage)
    )


def test_a_dimension_the_budget_left_one_choice_of_is_new_to_a_resumed_study(workspace):  # noqa: F811
    """A study whose budget left lora_dropout a single choice (0.0) never sampled it (a
    dimension with one value is fixed), so Optuna takes it as a new parameter: resumed with
    0.0 and 0.1 fitting, it searches both (0.1 was said not searched, and left out), and a
    space listing 0.05 and 0.1 is not refused as dropping 0.0."""
    from autotune.study import space_choices

    def narrowed(name: str, dropout: str) -> RunSettings:
        """A study `name` whose space searched lora_dropout but stored 0.0 alone, as a budget
        that ruled the others out stores it; the space file now lists `dropout`."""
        settings = _tiny_space_run(workspace, "lora_dropout: 0.0", trials=2, name=name)
        study = open_study(settings.storage, name)
        stored = {**space_choices(study).fitting, "lora_dropout": [0.0]}
        study.set_user_attr(SPACE_CHOICES_ATTR, stored)
        space = Path(settings.space_path)
        space.write_text(space.read_text().replace("lora_dropout: 0.0", dropout))
        return dataclasses.replace(settings, trials=6)

    events = RunEvents()
    started: list[PreparedRun] = []
    events.run_started = started.append
    runner = FakeRunner()
    study = run_study(prepare_run(narrowed("s", "lora_dropout: [0.0, 0.1]")), runner, events)
    assert started[0].kept_out_choices == {}
    assert (
        "study s searches lora_dropout 0.0, 0.1 from this run on; its earlier trials ran with "
        "one value of it" in events.notes
    )
    assert {r.recipe.lora_dropout for r in runner.requests} == {0.0, 0.1}
    assert space_choices(study).fitting["lora_dropout"] == [0.0, 0.1]
    runner = FakeRunner()
    study = run_study(prepare_run(narrowed("t", "lora_dropout: [0.05, 0.1]")), runner)
    assert {r.recipe.lora_dropout for r in runner.requests} == {0.05, 0.1}
    assert space_choices(study).fitting["lora_dropout"] == [0.05, 0.1]


def test_a_resume_whose_space_fixes_a_dimension_the_study_searches_is_refused(workspace):  # noqa: F811
    """The study searched lora_dropout 0.0 and 0.1; a space that fixes it at 0.0 would leave
    0.1 out (the run searched both again and said nothing): refused in one line, naming it."""
    first = _tiny_space_run(workspace, "lora_dropout: [0.0, 0.1]", trials=2)
    space = Path(first.space_path)
    space.write_text(space.read_text().replace("lora_dropout: [0.0, 0.1]", "lora_dropout: 0.0"))
    runner = FakeRunner()
    with pytest.raises(UsageError, match=r"space does not: lora_dropout 0\.1 \(not in "):
        run_study(prepare_run(dataclasses.replace(first, trials=4)), runner)
    assert runner.requests == []


def test_a_resume_whose_space_lists_the_studys_choices_in_another_order_runs(workspace):  # noqa: F811
    """Optuna holds a parameter's choices in the order its trials were sampled from: a space
    file listing them in another order resumes (it failed in Optuna at the first trial)."""
    first = _tiny_space_run(workspace, "lora_dropout: [0.0, 0.1]", trials=2)
    space = Path(first.space_path)
    space.write_text(space.read_text().replace("[0.0, 0.1]", "[0.1, 0.0]"))
    events = RunEvents()
    study = run_study(prepare_run(dataclasses.replace(first, trials=4)), FakeRunner(), events)
    assert finished_trial_count(study) == 4 and not events.notes


def test_a_resume_whose_study_sampled_other_choices_than_it_stored_is_refused(workspace):  # noqa: F811
    """A study whose stored space lacks a dimension its trials sampled (as one stored by an
    older autotune might): its choices are what Optuna holds the run to, so a space with
    others is refused in one line (the first trial raised in Optuna)."""
    first = _tiny_space_run(workspace, "lora_dropout: [0.0, 0.1]", trials=2)
    study = open_study(first.storage, "s")
    stored = dict(study.user_attrs[SPACE_CHOICES_ATTR])
    del stored["lora_dropout"]
    study.set_user_attr(SPACE_CHOICES_ATTR, stored)
    space = Path(first.space_path)
    space.write_text(space.read_text().replace("[0.0, 0.1]", "[0.0, 0.05, 0.1]"))
    runner = FakeRunner()
    with pytest.raises(
        UsageError,
        match=r"sampled lora_dropout from 0\.0, 0\.1, which this run would sample from "
        r"0\.0, 0\.05, 0\.1; Optuna samples",
    ):
        run_study(prepare_run(dataclasses.replace(first, trials=4)), runner)
    assert runner.requests == []
