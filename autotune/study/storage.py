"""Where studies live: Optuna storages (SQLite, PostgreSQL, MySQL) opened, studies created and
loaded, artifacts; a URL's checks are storage_urls' and sqlite_checks'.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from autotune.errors import UsageError, first_line
from autotune.study.claims import is_claim_study
from autotune.study.records import DIRECTIONS, OBJECTIVE_NAMES, ProbeCrashed
from autotune.study.sqlite_checks import (
    check_not_foreign,
    check_sqlite_place,
    check_writable,
    empty_sqlite,
)
from autotune.study.storage_urls import (
    DEFAULT_STORAGE,
    TRIALS_DIR,
    check_storage_url,
    redact_url,
    sqlite_file,
    without_secrets,
)

HEARTBEAT_SECONDS = 10
"""How often a running trial tells the storage it is alive (RDB storages)."""
STALE_AFTER_SECONDS = 40
"""A running trial silent this long belongs to a dead worker: it is failed and retried once."""
CONNECT_TIMEOUT_SECONDS = 30
"""How long a connection to a database server may take (PostgreSQL, MySQL)."""
ARTIFACTS_DIR = TRIALS_DIR / "artifacts"
"""Each trial's recipe YAML and probe log, as Optuna artifacts optuna-dashboard shows."""


class _ReportedCrashes(logging.Filter):
    """Drops Optuna's warnings for a trial whose probe crashed: the run already printed the
    trial and the probe's own error, and the traceback Optuna adds is of the objective raising
    ProbeCrashed, which says nothing more. A trial stopped by Ctrl-C likewise: the run says it
    was interrupted; and one stopped by a file it could not write (a full disk), which the run
    names in one line. A failure of anything else keeps its traceback."""

    def __init__(self) -> None:
        super().__init__()
        self.crashed: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        trial = message.split(" failed with ", 1)[0]
        if isinstance(error, (ProbeCrashed, KeyboardInterrupt, OSError)):
            self.crashed.add(trial)
            return False
        return not (" failed with value " in message and trial in self.crashed)


def _quiet_optuna() -> None:
    """Optuna marks heartbeats, group sampling and metric names experimental; users need not
    see that on every run, nor a second report of a crashed probe."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optimize_logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _ReportedCrashes) for f in optimize_logger.filters):
        optimize_logger.addFilter(_ReportedCrashes())


def make_trials_dir() -> None:
    """trials/, readable by its owner only where this run creates it: it holds the token
    cache (the training data), probe logs and the study database."""
    try:
        TRIALS_DIR.mkdir(mode=0o700, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"cannot create {TRIALS_DIR.resolve()}: {error.strerror or error}; a run keeps its "
            "files under trials/ in the current directory: start it from a writable one"
        ) from None


def make_storage(url: str) -> Any:
    _quiet_optuna()
    check_storage_url(url)
    if url == DEFAULT_STORAGE:
        make_trials_dir()
    path = sqlite_file(url)
    if path is not None:
        check_sqlite_place(url)
        check_not_foreign(url)
        folder = path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a read-only or another user's directory
            raise UsageError(
                f"cannot open storage {redact_url(url)}: cannot create {error.filename or folder}:"
                f" {error.strerror or error}"
            ) from None
    for attempt in range(3):
        try:
            return _open_storage(url)
        except Exception as error:  # noqa: BLE001 - driver errors vary; all mean "cannot open"
            # Two workers creating a new database at once race on its tables; the loser retries.
            if "already exists" in str(error) and attempt < 2:
                time.sleep(0.5 + attempt)
                continue
            raise UsageError(
                f"cannot open storage {redact_url(url)}: {without_secrets(first_line(error), url)}"
            ) from None
    raise AssertionError("unreachable")


def _open_storage(url: str) -> Any:
    import optuna

    sqlite = url.startswith("sqlite")
    # SQLite serialises writers; a long lock timeout lets a few local workers share it. A
    # database server that does not answer (a firewall that drops, a wrong port) is given up
    # after a while, where the driver would wait for ever, unless the URL sets its own.
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if sqlite else {}
    if not sqlite:
        # A connection the server dropped while a probe ran (a restart, a firewall or pooler
        # that ends idle connections) is found dead and replaced before it is used.
        engine_kwargs["pool_pre_ping"] = True
        if "connect_timeout=" not in url:
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
    storage = optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=STALE_AFTER_SECONDS,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=1
        ),
    )
    if sqlite:
        _serialise_sqlite_transactions(storage.engine)
    return storage


def _serialise_sqlite_transactions(engine: Any) -> None:
    """Make every SQLite transaction take the write lock when it begins (BEGIN IMMEDIATE).

    Optuna reads a trial's state and then writes it (e.g. WAITING -> RUNNING when a worker
    takes an enqueued trial). SQLite ignores SELECT ... FOR UPDATE, so two workers could both
    read WAITING and both run the trial; an immediate transaction closes that gap.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


def open_study(storage_url: str, study_name: str, seed: int = 0) -> Any:
    """Create the study or load it to resume; refuse one that has other objectives."""
    import optuna

    from autotune.study.sampler import BudgetedSampler

    check_writable(storage_url)
    storage = make_storage(storage_url)
    # the trials' constraints under the study's budget now, which a resume may have changed
    sampler = BudgetedSampler(
        optuna.samplers.TPESampler(
            multivariate=True, group=True, constant_liar=True, seed=seed, n_startup_trials=5
        )
    )
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=study_name,
            directions=[optuna.study.StudyDirection[d.upper()] for d in DIRECTIONS],
            sampler=sampler,
            load_if_exists=True,
        )
    except ValueError as error:
        raise UsageError(f"study {study_name!r}: {error}") from None
    directions = [d.name.lower() for d in study.directions]
    if directions != list(DIRECTIONS) or (
        study.metric_names and list(study.metric_names) != list(OBJECTIVE_NAMES)
    ):
        raise UsageError(
            f"study {study_name!r} exists in {redact_url(storage_url)} with other objectives "
            f"({', '.join(study.metric_names or directions)}); choose another --study name"
        )
    study.set_metric_names(list(OBJECTIVE_NAMES))
    return study


def existing_storage_url(storage_url: str | None, allow_empty: bool = False) -> str:
    """The storage to read: the given URL, or the default one if a run has created it; an
    empty SQLite file holds no study (refused unless `allow_empty`: see empty_sqlite)."""
    url = storage_url or DEFAULT_STORAGE
    check_storage_url(url)
    path = sqlite_file(url)
    # a command that only reads must not create an empty SQLite database where none was
    if path is not None and not path.exists():
        raise UsageError(
            f"no study storage at {url}; run `autotune run` first or pass --storage"
            if url == DEFAULT_STORAGE
            else f"no SQLite database at {path}; check --storage"
        )
    if not allow_empty and empty_sqlite(url):
        raise UsageError(f"storage {redact_url(url)} holds no study yet")
    return url


def load_existing_study(storage_url: str | None, study_name: str | None) -> Any:
    """A study to export or report on; without a name, the storage's only (or newest) study."""
    import optuna

    url = existing_storage_url(storage_url)
    storage = make_storage(url)
    names = [
        summary.study_name
        for summary in optuna.get_all_study_summaries(storage)
        if not is_claim_study(summary.study_name)
    ]
    if study_name is None:
        if not names:
            raise UsageError(f"storage {redact_url(url)} holds no study yet")
        study_name = names[-1]
    elif study_name not in names:
        raise UsageError(
            f"no study {study_name!r} in {redact_url(url)}; it holds: {', '.join(names) or 'none'}"
        )
    return optuna.load_study(study_name=study_name, storage=storage)


def artifact_store() -> Any:
    import optuna

    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return optuna.artifacts.FileSystemArtifactStore(base_path=str(ARTIFACTS_DIR))
