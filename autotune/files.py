"""Files written whole or not at all: the text goes to a temporary file beside the destination,
which then takes its place in one rename (os.replace), so a Ctrl-C or a full disk mid-write
leaves the file that was there as it was, and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path


def write_atomically(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path`, replacing it whole; its folder must exist. A new file has
    the mode a plain write would give it (0666 less the umask), a file replaced keeps its own;
    a symbolic link is followed (the file it names is replaced, the link stays). A device or a
    pipe (/dev/stdout) cannot be replaced: it is written as it is."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        path.write_text(text, encoding="utf-8")
        return path
    target = path.resolve() if path.is_symlink() else path
    # hidden, and unique to this write: two writers of one file never share a temporary one
    temporary = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write(text)
        if target.is_file():
            shutil.copymode(target, temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return path


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (nothing is created): where a file
    to be made under it would first meet the filesystem."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
