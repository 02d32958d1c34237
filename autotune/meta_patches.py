"""Attributes of the libraries the replay runs (torch, transformers, peft, bitsandbytes),
replaced while a replay or trace runs and put back after, as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

_ABSENT = object()


@contextlib.contextmanager
def patched(patches: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
    """Each (owner, name, replacement) set while this lasts; then each original put back, last
    first, and an attribute the owner did not have removed again."""
    saved = [(owner, name, getattr(owner, name, _ABSENT)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in reversed(saved):
            if original is not _ABSENT:
                setattr(owner, name, original)
            elif hasattr(owner, name):
                delattr(owner, name)
