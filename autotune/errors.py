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
