"""A local model's safetensors files checked from their headers alone, before any probe
loads them: a download cut short or stopped between shards, another file under the name."""

from __future__ import annotations

import json
from pathlib import Path

from autotune.errors import UsageError


def check_shards_present(index: Path) -> None:
    """Refuse a sharded model whose index names a shard the directory lacks (a download
    stopped between shards): every probe crashed loading it."""
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return  # transformers says what is wrong with the index itself
    missing = sorted(str(name) for name in shards if not (index.parent / str(name)).is_file())
    if missing:
        raise UsageError(
            f"{index} names {', '.join(missing[:3])}, which {index.parent} does not hold; "
            "download the model again"
        )


SAFETENSORS_MAX_HEADER_BYTES = 100_000_000
"""The longest header safetensors reads ("header too large" past it)."""


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's frame, read from its header alone (a download
    cut short, another file under its name), or None: an 8-byte header length, a JSON header
    of that length (at most SAFETENSORS_MAX_HEADER_BYTES), and the tensors' bytes it lists,
    which end where the file does (safetensors refuses a file they do not cover)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header_bytes = int.from_bytes(handle.read(8), "little")
        if size < 8 or header_bytes > size - 8:
            return f"{size:,} bytes, too short for the header it announces"
        if header_bytes > SAFETENSORS_MAX_HEADER_BYTES:
            return f"it announces a header of {header_bytes:,} bytes, more than safetensors reads"
        try:
            header = json.loads(handle.read(header_bytes))
            tensors_end = max(
                (
                    int(entry["data_offsets"][1])
                    for name, entry in header.items()
                    if name != "__metadata__"
                ),
                default=0,
            )
        except (UnicodeDecodeError, ValueError, AttributeError, TypeError, KeyError, IndexError):
            return "its header is not a safetensors header"
    data_bytes = size - 8 - header_bytes
    if tensors_end > data_bytes:
        return f"its tensors need {tensors_end:,} bytes after the header, it holds {data_bytes:,}"
    if tensors_end < data_bytes:
        return f"its tensors end {data_bytes - tensors_end:,} bytes before the file does"
    return None
