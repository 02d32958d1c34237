"""A SQLite study file checked before it is opened: one that can be made and written, no folder,
no other program's database; and an empty one, which a command that only reads leaves empty."""

from __future__ import annotations

import contextlib
from pathlib import Path

from autotune.errors import UsageError
from autotune.study.storage_urls import redact_url, sqlite_file

OPTUNA_TABLES = frozenset({"studies", "trials", "version_info"})
"""Tables every Optuna storage has: a SQLite file with tables and none of these is another
program's database."""


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


def check_not_foreign(url: str) -> None:
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


def check_sqlite_place(url: str) -> None:
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


def check_writable(url: str) -> None:
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
    check_sqlite_place(url)
    check_writable(url)
    check_not_foreign(url)


def empty_sqlite(url: str) -> bool:
    """The storage is a SQLite file without a table (an empty file too), which a command that
    only reads must leave so: Optuna would write its tables into it to find no study there."""
    path = sqlite_file(url)
    return path is not None and path.is_file() and sqlite_tables(path) == []
