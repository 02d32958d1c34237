"""Many workers on one study: a real PostgreSQL server, heartbeats, and the dashboard."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest

import autotune.study.storage as study_storage
from autotune.study import finished_trial_count, prepare_run, run_study
from tests.conftest import QUICK_CPU_RUN
from tests.test_study import (  # noqa: F401 - the fixtures
    FakeRunner,
    full_rows_workspace,
    settings_for,
    workspace,
)

AUTOTUNE = str(Path(sys.executable).parent / "autotune")
ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-pw"


def _binary(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on loopback, started from the distribution's binaries."""
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries are not installed (.ci/run installs them)")
    base = Path(tempfile.mkdtemp(prefix="autotune-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(base, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", _free_port()
    subprocess.run(
        [*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "autotune", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*run_as, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-o", options, "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://autotune:{PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


def test_two_workers_on_postgres_complete_a_study(tiny_model, qa_data, tmp_path, postgres_url):
    args = [
        AUTOTUNE,
        "run",
        "--model",
        str(tiny_model),
        "--data",
        str(qa_data),
        "--budget",
        "4GB",
        "--trials",
        "4",
        *QUICK_CPU_RUN,
        "--storage",
        postgres_url,
        "--study",
        "shared",
    ]
    workers = []
    for name in ("host-a", "host-b"):
        (tmp_path / name).mkdir()
        workers.append(
            subprocess.Popen(
                args,
                cwd=tmp_path / name,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    assert 4 <= finished_trial_count(study) <= 5  # at most one in flight past the target
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    # both took trials; a baseline that both workers enqueued at once may be left waiting
    ran = [t for t in study.trials if t.state != optuna.trial.TrialState.WAITING]
    assert len({t.user_attrs["worker"] for t in ran}) == 2
    written = [*outputs, *(p.read_text() for p in tmp_path.glob("host-*/reports/*"))]
    assert all(PASSWORD not in text for text in written)
    assert any("autotune:***@127.0.0.1" in text for text in outputs)


def test_dead_hosts_trial_goes_stale_and_is_retried(workspace, postgres_url, monkeypatch):  # noqa: F811
    monkeypatch.setattr(study_storage, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(study_storage, "STALE_AFTER_SECONDS", 2)
    settings = settings_for(workspace, storage=postgres_url, study_name="stale", trials=3)
    prepared = prepare_run(settings)
    study = run_study(
        prepare_run(settings_for(workspace, storage=postgres_url, study_name="stale", trials=1)),
        FakeRunner(),
    )
    trial = study.ask()
    trial.set_user_attr("worker", "host-that-died:4242")
    prepared.space.suggest(trial, prepared.settings.model, prepared.spec, 64)
    study._storage.record_heartbeat(trial._trial_id)
    time.sleep(3)
    study = run_study(prepared, FakeRunner())
    assert study.trials[trial.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == trial.number]
    assert [t.state for t in retries] == [optuna.trial.TrialState.COMPLETE]
    assert finished_trial_count(study) == 3


def _get_json(url: str, deadline_seconds: float = 30) -> dict:
    deadline = time.time() + deadline_seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def test_dashboard_shows_objectives_infeasible_trials_and_artifacts(full_rows_workspace):  # noqa: F811
    work = full_rows_workspace
    tmp_path, model, _ = work
    settings = settings_for(work, trials=8)
    prepared = prepare_run(settings)
    from autotune.memory import estimate

    sizes = sorted(
        estimate(prepared.spec, prepared.space.build(p, str(model), prepared.spec, 64)).peak_bytes
        for p in prepared.space.all_params()
    )
    settings = settings_for(work, trials=8, budget_bytes=sizes[len(sizes) // 2])
    run_study(prepare_run(settings), FakeRunner())
    port = _free_port()
    server = subprocess.Popen(
        [AUTOTUNE, "dashboard", "--storage", settings.storage, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["s"]
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}?after=0")
        assert detail["objective_names"] == ["peak_memory_bytes", "tokens_per_second", "eval_loss"]
        trials = detail["trials"]
        infeasible = [
            t
            for t in trials
            if t["user_attrs"]
            and any(
                a["key"] == "status" and a["value"] == "over_budget_predicted"
                for a in t["user_attrs"]
            )
        ]
        assert infeasible and all(t["constraints"][0] > 0 for t in infeasible)
        assert all(len(t["constraints"]) == 1 for t in trials)
        assert all(t["artifacts"] for t in trials)
    finally:
        server.terminate()
        server.wait(timeout=10)


def _dashboard_on(workspace, host: str, url_host: str):  # noqa: F811
    """Serve a one-trial study on `host`; its study list read at `url_host`, the port, and
    what the dashboard printed."""
    tmp_path, _, _ = workspace
    settings = settings_for(workspace, trials=1)
    run_study(prepare_run(settings), FakeRunner())
    port = _free_port()
    server = subprocess.Popen(
        [AUTOTUNE, "dashboard", "--storage", settings.storage]
        + ["--host", host, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        studies = _get_json(f"http://{url_host}:{port}/api/studies")
    finally:
        server.terminate()
        stdout, stderr = server.communicate(timeout=10)
    return studies, port, stdout, stderr


def test_dashboard_off_loopback_warns(workspace):  # noqa: F811
    _, _, _, stderr = _dashboard_on(workspace, "0.0.0.0", "127.0.0.1")
    assert "no authentication" in stderr


def test_dashboard_listens_on_an_ipv6_address(workspace):  # noqa: F811
    studies, port, stdout, stderr = _dashboard_on(workspace, "::1", "[::1]")
    assert [s["study_name"] for s in studies["study_summaries"]] == ["s"], stderr
    assert f"http://[::1]:{port}/dashboard" in stdout


def test_reading_commands_never_create_a_database(tmp_path):
    missing = tmp_path / "typo.db"
    for command in (["export"], ["report"], ["dashboard", "--port", str(_free_port())]):
        done = subprocess.run(
            [AUTOTUNE, *command, "--storage", f"sqlite:///{missing}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and "no SQLite database at" in done.stderr, done.stderr
        assert not missing.exists()


def test_a_connection_the_server_dropped_is_replaced(postgres_url):
    """While a probe runs for minutes the run's pooled connection sits idle; a server restart,
    or a firewall or pooler that ends idle connections, drops it. Its next use failed the run."""
    from sqlalchemy import create_engine, text

    storage = study_storage.make_storage(postgres_url)
    study_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "dropped")
    admin = create_engine(postgres_url)
    with admin.connect() as connection:
        dropped = connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> "
                "pg_backend_pid() AND backend_type = 'client backend' AND datname = 'postgres'"
            )
        ).all()
    admin.dispose()
    assert dropped  # the storage's pooled connection among them
    assert storage.get_study_name_from_id(study_id) == "dropped"
