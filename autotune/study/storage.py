"""Where studies live: Optuna storages (SQLite, PostgreSQL, MySQL), opening and loading studies,
artifacts, and storage URLs printed without their secrets.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from autotune.errors import UsageError, first_line
from autotune.study.claims import is_claim_study
from autotune.study.records import DIRECTIONS, OBJECTIVE_NAMES, ProbeCrashed

TRIALS_DIR = Path("trials")
HEARTBEAT_SECONDS = 10
"""How often a running trial tells the storage it is alive (RDB storages)."""
STALE_AFTER_SECONDS = 40
"""A running trial silent this long belongs to a dead worker: it is failed and retried once."""
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")
"""The databases a study can live in (a URL's scheme, before any +driver)."""
CONNECT_TIMEOUT_SECONDS = 30
"""How long a connection to a database server may take (PostgreSQL, MySQL)."""
DEFAULT_STORAGE = f"sqlite:///{TRIALS_DIR}/autotune.db"
ARTIFACTS_DIR = TRIALS_DIR / "artifacts"
"""Each trial's recipe YAML and probe log, as Optuna artifacts optuna-dashboard shows."""


SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "key")
"""Query parameters of a storage URL that are masked like its password (any key containing one)."""
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>.*)@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&][^=&#]*(?:" + "|".join(SECRET_QUERY_KEYS) + r")[^=&#]*=)(?P<value>[^&#]*)",
    re.IGNORECASE,
)


def _url_secrets(url: str) -> list[str]:
    """The password and the secret query values of a storage URL, as written and decoded, and
    each '@'-separated piece of the password: a driver that ends the password at its first '@'
    prints the rest as part of the host."""
    from urllib.parse import unquote, unquote_plus

    secrets = []
    match = _USERINFO.match(url)
    if match and ":" in match["userinfo"]:
        password = match["userinfo"].split(":", 1)[1]
        secrets += [password, *(p for p in password.split("@") if len(p) > 1)]
    secrets += [m["value"] for m in _QUERY_SECRET.finditer(unquote(url))]
    secrets += [m["value"] for m in _QUERY_SECRET.finditer(url)]
    secrets += [unquote(s) for s in secrets] + [unquote_plus(s) for s in secrets]
    return sorted({s for s in secrets if s}, key=len, reverse=True)


def redact_url(url: str) -> str:
    """A storage URL with its password and secret query parameters replaced by ***, safe for
    output, logs and reports. The user part ends at the *last* '@': a password holding an
    unescaped '@' is masked whole (SQLAlchemy's parser would end it at the first '@' and print
    the rest as the host), and an empty user keeps its password masked too."""
    match = _USERINFO.match(url)
    if match and ":" in match["userinfo"]:
        user = match["userinfo"].split(":", 1)[0]
        url = f"{match['scheme']}{user}:***@" + url[match.end() :]
    url = _QUERY_SECRET.sub(lambda m: m["key"] + "***", url)
    # a key written percent-encoded (?pass%77ord=) is a secret key too
    return re.sub(
        r"([?&])([^=&#]*%[^=&#]*)=([^&#]*)",
        lambda m: f"{m[1]}{m[2]}=***" if _QUERY_SECRET.match(f"?{unquote(m[2])}=") else m[0],
        url,
    )


def without_secrets(text: str, url: str) -> str:
    """`text` (a driver's error, say) with every secret of the storage URL `url` masked, and
    any user part left in it (word@host) too."""
    for secret in _url_secrets(url):
        text = text.replace(secret, "***")
    return re.sub(r"[^\s'\"@]+@", "***@", text)


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


def check_storage_url(url: str) -> None:
    """Refuse, in one line, a --storage that is no database URL autotune keeps studies in: a
    file's path, another kind of URL, or a SQLite database in memory (lost at the end)."""
    if "://" not in url:  # a file's path: say how to name it, not SQLAlchemy's parse error
        raise UsageError(
            f"--storage {url} is not a database URL; for a SQLite file write sqlite:///{url}"
        )
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in STORAGE_SCHEMES:  # SQLAlchemy's words: "Can't load plugin: ...journal"
        also = "; write postgresql://" if scheme == "postgres" else ""
        raise UsageError(
            f"--storage {redact_url(url)}: autotune keeps studies in sqlite:///PATH, "
            f"postgresql://USER:PASSWORD@HOST/DATABASE or mysql://...{also}"
        )
    database = url.split("://", 1)[1].lstrip("/").split("?")[0]
    if scheme == "sqlite" and database in ("", ":memory:"):
        raise UsageError(
            f"--storage {url} names no file, so its SQLite database would live in memory and "
            "be lost when the command ends; write sqlite:///PATH"
        )
    path = sqlite_file(url)
    if path is not None and path.parts[:1] == ("~",):
        raise UsageError(
            f"--storage {url}: SQLite does not expand ~ (it would open a folder named ~ here); "
            f"write the path out, sqlite:///{path.expanduser()}"
        )


OPTUNA_TABLES = frozenset({"studies", "trials", "version_info"})
"""Tables every Optuna storage has: a SQLite file with tables and none of these is another
program's database."""


SQLITE_URL = re.compile(r"sqlite(\+\w+)?:///(?P<database>[^?]*)")
"""A SQLite storage URL, its driver named or not, and its file as SQLAlchemy reads it."""


def sqlite_file(url: str | None) -> Path | None:
    """The file of a sqlite:/// (or sqlite+DRIVER:///) storage URL (the default one for
    None), percent-escapes decoded as SQLAlchemy decodes them; None for a server."""
    match = SQLITE_URL.match(url or DEFAULT_STORAGE)
    if match is None:
        return None
    return Path(unquote(match["database"]))


def sqlite_tables(path: Path) -> list[str] | None:
    """The tables of the SQLite database in `path`, read without writing it; None where it is
    no SQLite database (opening it says why)."""
    import sqlite3
    from urllib.parse import quote

    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
        ) as connection:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return sorted(name for (name,) in rows)
    except sqlite3.Error:
        return None


def _check_not_foreign(url: str) -> None:
    """Refuse a SQLite file that is another program's database: Optuna would add its tables
    to it (a command that only reads too)."""
    path = sqlite_file(url)
    tables = sqlite_tables(path) if path is not None and path.is_file() else None
    if tables and not OPTUNA_TABLES & set(tables):
        shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        raise UsageError(
            f"--storage {redact_url(url)} is another program's SQLite database (tables: "
            f"{shown}), not a study storage; give a new file for autotune's studies"
        )


SQLITE_HEADER = b"SQLite format 3\x00"
"""How every SQLite database file begins (an empty file is one too: SQLite makes it one)."""


def _check_sqlite_place(url: str) -> None:
    """Refuse, in one line, a SQLite study file that is a directory, that lies under a file
    rather than a folder, or that is a file of another kind (SQLAlchemy's words: "unable to
    open database file", "file is not a database")."""
    path = sqlite_file(url)
    if path is None:
        return
    if path.is_dir():
        raise UsageError(
            f"--storage {redact_url(url)} names the directory {path}; give a file in it, "
            f"e.g. sqlite:///{path / 'autotune.db'}"
        )
    from autotune.files import nearest_existing

    folder = nearest_existing(path.parent)
    if folder.exists() and not folder.is_dir():
        raise UsageError(
            f"--storage {redact_url(url)} cannot be made: {folder} is a file, not a folder"
        )
    if path.is_file():
        try:
            with path.open("rb") as handle:
                start = handle.read(len(SQLITE_HEADER))
        except OSError:
            return  # unreadable: opening it says why
        if not SQLITE_HEADER.startswith(start):  # b"" or a header half written: SQLite's
            raise UsageError(
                f"--storage {redact_url(url)}: {path} is not a SQLite database; give a new file "
                "for autotune's studies"
            )


def make_storage(url: str) -> Any:
    _quiet_optuna()
    check_storage_url(url)
    if url == DEFAULT_STORAGE:
        make_trials_dir()
    path = sqlite_file(url)
    if path is not None:
        _check_sqlite_place(url)
        _check_not_foreign(url)
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


def _check_writable(url: str) -> None:
    """Refuse a read-only SQLite study file (or folder: SQLite writes its journal beside it)
    before the run: the first trial it recorded failed as a storage that went away."""
    import os

    path = sqlite_file(url)
    for place in (path, path.parent) if path is not None else ():
        if place.exists() and not os.access(place, os.W_OK):
            raise UsageError(
                f"cannot write the study's storage {path}: {place} is read-only; a run records "
                "its trials there: give a --storage it can write"
            )


def check_sqlite_storage(url: str) -> None:
    """Refuse, before a run reads its data, a SQLite study file it could not make or write, or
    that is no study storage (found when the study opened, minutes later at 7B)."""
    _check_sqlite_place(url)
    _check_writable(url)
    _check_not_foreign(url)


def open_study(storage_url: str, study_name: str, seed: int = 0) -> Any:
    """Create the study or load it to resume; refuse one that has other objectives."""
    import optuna

    from autotune.study.sampler import BudgetedSampler

    _check_writable(storage_url)
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


def empty_sqlite(url: str) -> bool:
    """The storage is a SQLite file without a table (an empty file too), which a command that
    only reads must leave so: Optuna would write its tables into it to find no study there."""
    path = sqlite_file(url)
    return path is not None and path.is_file() and sqlite_tables(path) == []


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
