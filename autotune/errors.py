"""The one exception type that means "the user gave us something we cannot use", and the other
errors the CLI ends with in one line (error_line): a failed training, a place that cannot be
written, a storage that went away. Anything else is a bug.
"""

from __future__ import annotations

from pathlib import Path


class UsageError(Exception):
    """Bad input from a person: a budget, a path, a file, a flag. The message is one line."""

    @classmethod
    def collect(cls, problems: list[str], what: str) -> UsageError:
        """One error that lists every problem found in `what`, so a user fixes them all at once."""
        return cls(f"{what}: " + "; ".join(problems))


def check_distinct_outputs(
    outputs: dict[str, object], inputs: dict[str, object] | None = None
) -> None:
    """Refuse, before anything is written, a command's output (by flag: "--output", "--csv";
    None: not asked) that is a directory, that is another of its outputs (the second written
    would replace the first, and both would be said written), or that is one of the files it
    reads (by what it is: "the study's storage (--storage)"), which writing would destroy, that
    is an existing file autotune did not write, or whose folder cannot be written."""

    def place(path: object) -> Path:
        return Path(str(path)).expanduser().resolve()

    read = {place(path): what for what, path in (inputs or {}).items() if path is not None}
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        if place(path).is_dir():
            raise UsageError(f"{flag} {path} is a directory; give a file name")
        if place(path) in read:
            raise UsageError(
                f"{flag} {path} is {read[place(path)]}, which writing it would replace: give "
                "another file"
            )
        if place(path) in seen:
            raise UsageError(
                f"{seen[place(path)]} and {flag} are both {path}; the second would overwrite the "
                "first: give each its own file"
            )
        seen[place(path)] = flag
        _check_not_another_file(flag, path, place(path))
        _check_folder_writable(flag, place(path))


def _check_not_another_file(flag: str, path: object, place: Path) -> None:
    """Refuse an output that would replace a file autotune did not write (a model's weights, a
    data file, a page of the user's): an export, report, CSV or chart it wrote may be replaced."""
    from autotune.own_files import written_by_autotune

    if not place.is_file():
        return
    try:
        ours = written_by_autotune(place)
    except OSError:  # unreadable: not known to be autotune's
        ours = False
    if not ours:
        raise UsageError(
            f"{flag} {path} exists and is not a file autotune wrote (an export, report, trials "
            "CSV or chart); remove it or choose another path"
        )


def _check_folder_writable(flag: str, path: Path) -> None:
    """Refuse an output whose folder cannot be made or written, read from the nearest folder
    that exists (nothing is created): a run found it out when its study had ended."""
    import os

    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path} cannot be written: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be written: {folder} is not writable")


class TrainingFailed(Exception):
    """A run that started and failed for a reason that is not the user's input (a rank of a
    distributed training died; a study none of whose trials measured a recipe to export). The
    CLI prints its one-line message and exits with code 1."""


UNWRITABLE_ERRNOS = frozenset({"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM"})
"""What an OSError raised while writing says of the place, not of the program: the disk or
quota is full, or the directory is read-only or another user's."""


def unwritable(error: BaseException) -> str | None:
    """The one line for a file that could not be written for want of room or permission
    (`cannot write PATH: No space left on device`), or None for any other error."""
    import errno

    if not isinstance(error, OSError) or errno.errorcode.get(error.errno or 0) not in (
        UNWRITABLE_ERRNOS
    ):
        return None
    return f"cannot write {error.filename or 'a file'}: {error.strerror or error}"


def lost_storage(error: BaseException) -> BaseException | None:
    """The database error, in `error` or what it was raised from or while handling, that says
    the study's storage went away (a server stopped, a network that broke); None for any other
    error. Optuna raises errors of its own while it tries to record the loss."""
    import sys

    exc = sys.modules.get("sqlalchemy.exc")
    lost_types = (exc.OperationalError, exc.InterfaceError) if exc else ()
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if lost_types and isinstance(cause, lost_types):
            return cause
        seen.add(id(cause))
        # `raise ... from None` says the error it was raised while handling is no part of it
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return None


def error_line(error: BaseException, kept: str = "") -> tuple[str, int]:
    """The CLI's one line for `error` and its exit code: 2 for the user's input or a place
    that cannot be written, 1 for a training that failed or a storage that went away; code 0
    for any other error, a bug, whose traceback shows. `kept` says what the stopped command
    leaves (`; finished trials are kept in the study`)."""
    if isinstance(error, UsageError):
        return str(error), 2
    if isinstance(error, TrainingFailed):
        return str(error), 1
    unwritable_words = unwritable(error)
    if unwritable_words:
        return unwritable_words + kept, 2
    lost = lost_storage(error)
    if lost is not None:
        return f"lost the study's storage: {first_line(lost)}{kept}", 1
    return "", 0


FIRST_LINE_CHARS = 200


def first_line(
    error: BaseException, limit: int = FIRST_LINE_CHARS, fallback: str | None = None
) -> str:
    """The first line of an exception's message, at most `limit` characters: what a one-line
    error quotes of a library's (the exception's type name, or `fallback`, when it says
    nothing). A first line that ends in a colon announces the next, which is joined to it
    ("Validation error for field 'hidden_size': TypeError: ... expected int, got str"). A
    longer line keeps its whole sentences that fit (peft's "Module 'out_proj' is incompatible
    with Mamba-based models ... Incompatible modules: {'conv1d', 'out_proj'}."), else its
    whole words, ending in "...", never a word cut in two."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if fallback is None else fallback
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:
        first = f"{first} {lines[1]}"
    return shortened(first, limit)


def shortened(text: str, limit: int = FIRST_LINE_CHARS) -> str:
    """`text`, or where longer than `limit` characters its sentences that fit (where they
    make half of it), else its words that fit and "..."."""
    if len(text) <= limit:
        return text
    sentence_ends = [
        index + 1
        for index, char in enumerate(text[:limit])
        if char in ".!?" and text[index + 1 : index + 2] == " "
    ]
    if sentence_ends and sentence_ends[-1] >= limit // 2:
        return text[: sentence_ends[-1]]
    words = text[: limit - 3].rsplit(" ", 1)[0] if " " in text[: limit - 3] else text[: limit - 3]
    return words.rstrip(" ,;:") + "..."
