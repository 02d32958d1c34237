"""Host memory: what a recipe keeps off the GPU (offloaded activations, optimizer states on the
host) sits in pinned blocks, and has to fit the machine's RAM as its GPU peak fits the card."""

from __future__ import annotations

from pathlib import Path

HOST_MARGIN_FRACTION = 0.10
"""Left to the rest of the machine when the budget is the RAM available: the probe process's
own memory (its data, tokenizer, Python) and whatever else runs."""


PINNED_BLOCK_MIN_BYTES = 512
"""The smallest block CUDA's pinned host allocator hands out."""


def pinned_host_bytes(nbytes: float) -> int:
    """The pinned host block `nbytes` take: CUDA's host caching allocator rounds each request
    up to a power of two."""
    return 1 << (max(int(nbytes), PINNED_BLOCK_MIN_BYTES) - 1).bit_length()


def available_host_bytes() -> int:
    """RAM the kernel could give now without swapping: MemAvailable in /proc/meminfo, or
    psutil's figure where there is no /proc (psutil comes with accelerate)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import psutil  # type: ignore[import-untyped]

    return int(psutil.virtual_memory().available)


def host_budget(given_bytes: int | None) -> int:
    """The host memory budget: `given_bytes`, or the RAM available less HOST_MARGIN_FRACTION."""
    if given_bytes is not None:
        return given_bytes
    return int(available_host_bytes() * (1 - HOST_MARGIN_FRACTION))
