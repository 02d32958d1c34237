"""`autotune studies` and `autotune status` on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import optuna
import pytest

from autotune.api import list_studies, study_status
from autotune.pareto import PICK_POLICIES, frontier, pick
from autotune.state_text import status_text
from autotune.study import claim_once, measured_points, prepare_run, run_study
from autotune.study.overview import StudyOverview, finished_words, study_overview
from autotune.units import format_bytes
from tests.conftest import autotune_main
from tests.test_cli import autotune
from tests.test_distributed import postgres_url  # noqa: F401
from tests.test_study import FakeRunner, TimedRunner, settings_for, workspace  # noqa: F401


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, workspace):  # noqa: F811
    if request.param == "sqlite":
        return f"sqlite:///{workspace[0]}/overview.db"
    return request.getfixturevalue("postgres_url")


def test_studies_and_status_read_what_the_study_holds(workspace, storage_url):  # noqa: F811
    tmp_path = workspace[0]
    # a name of its own per storage: the PostgreSQL server lives for the whole module
    name = f"overview-{storage_url.split(':')[0]}"
    first = run_study(
        prepare_run(settings_for(workspace, storage=storage_url, study_name=name, trials=7)),
        TimedRunner(),
    )
    other = f"{name}-small"
    run_study(
        prepare_run(
            settings_for(
                workspace, storage=storage_url, study_name=other, trials=2, budget_bytes=10**9
            )
        ),
        FakeRunner(),
    )
    # one trial still running, as a worker elsewhere would hold it
    running = optuna.load_study(study_name=name, storage=storage_url).ask()
    # and a one-time job claimed, whose claim is a study of the storage but not one to list
    assert claim_once(optuna.load_study(study_name=name, storage=storage_url), "a job")

    overviews = {o.name: o for o in list_studies(storage_url)}
    assert {name, other} <= set(overviews) and not [n for n in overviews if "#claim:" in n]
    overview = overviews[name]
    assert (overview.finished, overview.running) == (7, 1)
    assert overview.budget_bytes == 10**10 and overview.model.endswith("config-only-model")
    points = measured_points(first)
    for policy in PICK_POLICIES:
        assert overview.picks[policy].trial == pick(points, policy).number
    assert overviews[other].budget_bytes == 10**9 and overviews[other].finished == 2

    status = study_status(storage_url, name)
    assert status.overview.running == 1 and [r.trial for r in status.running_trials] == [
        running.number
    ]
    assert [r.trial for r in status.frontier] == [p.number for p in frontier(points)]
    measured = sum(1 for t in first.trials if t.user_attrs.get("status") == "measured")
    assert status.measured == measured and 0 < status.probes <= 7
    assert status.probes_per_hour and status.probes_per_hour > 0

    listed = autotune("studies", "--storage", storage_url, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert f"{name}: model " in listed.stdout and f"budget {format_bytes(10**10)}" in listed.stdout
    assert "7 of 7 trials finished, 1 running" in listed.stdout
    balanced = overview.picks["balanced"]
    assert f"balanced   trial {balanced.trial}  {balanced.recipe}" in listed.stdout
    assert f"{other}: model " in listed.stdout
    shown = autotune("status", "--storage", storage_url, "--study", name, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"7 finished ({measured} measured), 1 running" in shown.stdout
    assert f"running: trial {running.number}" in shown.stdout
    assert "an hour" in shown.stdout and "frontier so far, fastest first:" in shown.stdout
    assert "next:" not in shown.stdout  # a trial still runs
    assert shown.stdout.count("tokens/s") == len(status.frontier)
    # the probes ran on the CPU: their memory is said to be the CPU's, not the GPU's
    assert shown.stdout.count("  CPU RSS +") == len(status.frontier)
    assert listed.stdout.count("  CPU RSS +") == listed.stdout.count("tokens/s")


def test_probes_an_hour_leave_out_the_pause_between_runs(workspace):  # noqa: F811
    import datetime
    import sqlite3

    tmp_path = workspace[0]
    first = run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
    assert study_overview(first, []).finished_words == "2 of 2 trials finished"
    run_study(prepare_run(settings_for(workspace, trials=4)), FakeRunner())
    # the second run a day after the first: four probes of a few seconds, two runs
    with sqlite3.connect(tmp_path / "study.db") as db:
        for column in ("datetime_start", "datetime_complete"):
            for trial_id, value in db.execute(f"SELECT trial_id, {column} FROM trials").fetchall():
                number = db.execute(
                    "SELECT number FROM trials WHERE trial_id = ?", (trial_id,)
                ).fetchone()[0]
                if value and number >= 2:
                    later = datetime.datetime.fromisoformat(value) + datetime.timedelta(days=1)
                    db.execute(
                        f"UPDATE trials SET {column} = ? WHERE trial_id = ?",
                        (later.isoformat(sep=" "), trial_id),
                    )
    status = study_status(f"sqlite:///{tmp_path}/study.db", "s")
    assert status.probes == 4
    # the resume's --trials is the target now
    assert status.overview.finished_words == "4 of 4 trials finished"
    assert "s: model " in status_text(status) and "4 of 4 trials finished" in status_text(status)
    # its trials are done: what to run next, on its storage
    url = f"sqlite:///{tmp_path}/study.db"
    assert status_text(status, url).endswith(
        f"its trials have finished; next:\n  autotune export --study s --storage {url} --output "
        "recipe.yaml  (the balanced recipe; --pick fastest, smallest or best-loss for another)\n"
        f"  autotune report --study s --storage {url}  (the HTML report)"
    )
    # a server's password is not printed, as nowhere else (the commands showed it)
    shown = status_text(status, "postgresql://me:hunter2@db/x")
    assert "hunter2" not in shown and "--storage 'postgresql://me:***@db/x'" in shown
    # over the day between the runs it would be 4 / 24 h; the probes took seconds
    assert status.probes_per_hour is not None and status.probes_per_hour > 100


def test_status_counts_the_noise_check_and_the_confirmations_with_the_trials(workspace):  # noqa: F811
    """Every probe the study ran is counted: the trials', the noise check's and the
    confirmations' (it counted only the trials', and so said fewer probes than ran)."""

    class Runner(FakeRunner):
        def __init__(self) -> None:
            super().__init__()
            self.workdirs: list[str] = []

        def run(self, request, workdir):
            self.workdirs.append(workdir.name)
            return super().run(request, workdir)

    runner = Runner()
    run_study(prepare_run(settings_for(workspace, trials=5, confirm_top=2)), runner)
    noise = sum(1 for name in runner.workdirs if name.startswith("noise-"))
    confirmed = sum(1 for name in runner.workdirs if name.startswith("confirm-"))
    trials = len(runner.workdirs) - noise - confirmed
    assert noise == 1 and confirmed >= 2 and trials >= 2
    status = study_status(f"sqlite:///{workspace[0]}/study.db", "s")
    assert (status.probes, status.noise_checks, status.confirmations) == (trials, 1, confirmed)
    rate = f"{status.probes_per_hour:.{1 if status.probes_per_hour < 10 else 0}f} an hour"
    assert (
        f"; {len(runner.workdirs)} probes ({trials} trials at {rate}, 1 noise check, "
        f"{confirmed} confirmations)\n" in status_text(status)
    )


def test_a_study_at_its_target_is_done_though_trials_wait_beyond_it(workspace):  # noqa: F811
    """A run of --trials 1 leaves the second baseline queued: the study did what it was asked,
    so status says what to run next and what the queued trial waits for."""
    tmp_path = workspace[0]
    run_study(prepare_run(settings_for(workspace, trials=1)), FakeRunner())
    url = f"sqlite:///{tmp_path}/study.db"
    status = study_status(url, "s")
    assert status.waiting >= 1 and status.overview.finished_words == "1 of 1 trial finished"
    shown = status_text(status, url)
    assert f"{status.waiting} queued (a run with a larger --trials starts them)" in shown
    assert "its trials have finished; next:" in shown


def test_status_of_a_missing_study_or_storage_is_one_line(workspace):  # noqa: F811
    tmp_path = workspace[0]
    for command in ("status", "studies"):  # they only read: no database appears
        missing = autotune(command, "--storage", f"sqlite:///{tmp_path}/none.db", cwd=tmp_path)
        assert missing.returncode == 2 and missing.stderr.count("\n") == 1
        assert "no SQLite database" in missing.stderr and not (tmp_path / "none.db").exists()
    run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
    url = f"sqlite:///{tmp_path}/study.db"
    wrong = autotune("status", "--storage", url, "--study", "nope", cwd=tmp_path)
    assert wrong.returncode == 2 and "no study 'nope'" in wrong.stderr
    empty = tmp_path / "empty.db"
    optuna.storages.RDBStorage(f"sqlite:///{empty}")
    none = autotune("studies", "--storage", f"sqlite:///{empty}", cwd=tmp_path)
    assert none.returncode == 0 and none.stdout.strip() == "no study in this storage yet"


def test_status_says_a_sampled_trial_is_having_its_memory_predicted(workspace):  # noqa: F811
    """Between the sampler's choice and the recorded recipe the memory model predicts the
    peak (seconds of replay on a large model): status said '(sampling)' all that while."""
    from autotune.state_text import status_text
    from autotune.study.overview import PREDICTING_WORDS

    settings = settings_for(workspace, trials=1)
    run_study(prepare_run(settings), FakeRunner())
    study = optuna.load_study(study_name="s", storage=settings.storage)
    sampled = study.ask()
    sampled.suggest_categorical("micro_batch_size", [1, 2, 4])
    choosing = study.ask()
    status = study_status(settings.storage, "s")
    recipes = {r.trial: r.recipe for r in status.running_trials}
    assert recipes == {sampled.number: PREDICTING_WORDS, choosing.number: ""}
    text = status_text(status)
    assert f"running: trial {sampled.number}  {PREDICTING_WORDS}  for " in text
    assert f"running: trial {choosing.number}  (sampling)  for " in text


def test_a_killed_runs_trial_left_running_counts_no_busy_time():
    """A run killed with kill -9 leaves its trial marked running until the next run fails it;
    counted up to now, a trial started two days ago made the report and status say '3 trials
    in 2880.0 min (0 an hour)'. A trial whose worker on this host lives still counts."""
    import datetime
    import subprocess
    import sys

    from autotune.study.overview import busy_seconds
    from autotune.study.records import record_worker
    from autotune.study.workers import worker_id

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    study = optuna.create_study(directions=["minimize"])
    orphan, live = study.ask(), study.ask()
    record_worker(orphan, worker_id().rpartition(":")[0] + f":{ended.pid}")
    record_worker(live, worker_id())
    trials = study.get_trials(deepcopy=False)
    now = max(t.datetime_start for t in trials) + datetime.timedelta(days=2)
    counted = busy_seconds(trials, now)
    live_start = next(t.datetime_start for t in trials if t.number == live.number)
    assert counted == pytest.approx((now - live_start).total_seconds(), abs=1.0)
    assert busy_seconds([t for t in trials if t.number == orphan.number], now) == 0.0


def test_status_tells_a_killed_runs_trial_from_a_running_one(workspace):  # noqa: F811
    """A run killed with kill -9 leaves its trial marked running; status showed it running
    (for ever longer) until the next run, as if the study were still being worked on."""
    import subprocess
    import sys

    from autotune.state_text import status_text
    from autotune.study.records import record_worker
    from autotune.study.workers import worker_id

    settings = settings_for(workspace, trials=1)
    run_study(prepare_run(settings), FakeRunner())
    study = optuna.load_study(study_name="s", storage=settings.storage)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    killed, live = study.ask(), study.ask()
    record_worker(killed, worker_id().rpartition(":")[0] + f":{ended.pid}")
    record_worker(live, worker_id())
    status = study_status(settings.storage, "s")
    assert status.overview.running == 1
    assert {r.trial: r.run_ended for r in status.running_trials} == {
        killed.number: True,
        live.number: False,
    }
    text = status_text(status)
    assert "1 running, 1 interrupted, " in text
    assert f"running: trial {live.number}  " in text
    assert f"interrupted: trial {killed.number}  (sampling)  (its run on this host has" in text
    assert f"running: trial {killed.number}" not in text


def test_the_trials_target_reads_for_old_studies_and_past_it():
    # a study from before the target was stored has none; a run with a lower --trials is
    # not shown as more than all of its target
    assert finished_words(12, 20) == "12 of 20 trials finished"
    assert finished_words(1, None) == "1 trial finished"
    assert finished_words(25, 20) == "25 trials finished (--trials 20)"
    # short of the target with the whole space tried: done, not stopped short
    tried = "every one of the space's 4 recipes has been tried"
    assert finished_words(9, 40, 4) == f"9 trials finished (--trials 40): {tried}"
    assert finished_words(40, 40, 4) == "40 of 40 trials finished"
    # fewer of its space's recipes untried than the target's trials left: the most it reaches
    assert finished_words(3, 40, None, 1) == (
        "3 of at most 4 trials finished (--trials 40; 1 recipe of the space untried)"
    )
    assert finished_words(3, 5, None, 2) == "3 of 5 trials finished"  # the target is reached
    old = StudyOverview("s", "m", 2**30, 3, 0, {})
    assert old.target_trials is None and old.finished_words == "3 trials finished"


def test_export_to_a_file_says_how_to_train_the_recipe(workspace, monkeypatch, capsys):  # noqa: F811
    """The morning after a run: status says to export, and the export of a recipe to a file
    says the command that trains it on the study's data, as the run and the report say it;
    another format's config, which its own tool trains, gets no such line."""
    tmp_path, _, data = workspace
    storage = f"sqlite:///{tmp_path}/export.db"
    run_study(
        prepare_run(settings_for(workspace, storage=storage, study_name="night", trials=3)),
        FakeRunner(),
    )
    code, out, err = autotune_main(
        monkeypatch, capsys, "export", "--storage", storage, "--pick", "fastest", "-o", "f.yaml"
    )
    assert code == 0, err
    assert out.splitlines() == [
        "recipe (fastest): f.yaml",
        f"to train it: autotune train --recipe f.yaml --data {data} --output outputs/night",
    ]
    code, out, err = autotune_main(
        monkeypatch, capsys, "export", "--storage", storage, "--format", "hf", "-o", "hf.yaml"
    )
    assert code == 0, err
    assert out.splitlines() == ["recipe (balanced): hf.yaml"]
