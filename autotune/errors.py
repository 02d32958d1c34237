"""The one exception type that means "the user gave us something we cannot use".

The CLI prints its message as a single line and exits with code 2; anything else is a bug.
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from a person: a budget, a path, a file, a flag. The message is one line."""

    @classmethod
    def collect(cls, problems: list[str], what: str) -> UsageError:
        """One error that lists every problem found in `what`, so a user fixes them all at once."""
        return cls(f"{what}: " + "; ".join(problems))


class TrainingFailed(Exception):
    """A run that started and failed for a reason that is not the user's input (a rank of a
    distributed training died). The CLI prints its one-line message and exits with code 1."""


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


FIRST_LINE_CHARS = 200


def first_line(
    error: BaseException, limit: int = FIRST_LINE_CHARS, fallback: str | None = None
) -> str:
    """The first line of an exception's message, at most `limit` characters: what a one-line
    error quotes of a library's (the exception's type name, or `fallback`, when it says
    nothing). A first line that ends in a colon announces the next, which is joined to it
    ("Validation error for field 'hidden_size': TypeError: ... expected int, got str")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__ if fallback is None else fallback
    first = lines[0]
    if first.endswith(":") and len(lines) > 1:
        first = f"{first} {lines[1]}"
    return first[:limit]
