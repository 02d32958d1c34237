"""A memory budget as people give it: a size ("24GB"), the name of a common card ("rtx4090"), or
"auto", the free memory of the GPU the probes will use, read through NVML.

A budget bounds everything a probe holds on its GPU, its own CUDA context included: predictions
add the context to each recipe's peak, and a probe caps its allocator at the budget less its
context. So a card's budget is its memory (for "auto", what NVML reports free, which reading
through NVML takes none of) less only BUDGET_MARGIN of the card, kept for the driver's own
reservations and for other processes that grow while the study runs.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from autotune.errors import UsageError
from autotune.units import format_bytes, parse_memory_size

MiB = 2**20

CARD_MEMORY_BYTES = {
    name: mib * MiB
    for name, mib in {
        "t4": 15360,
        "l4": 23034,
        "a10g": 23028,
        "a10": 23028,
        "l40s": 46068,
        "v100-16gb": 16384,
        "v100-32gb": 32768,
        "a100-40gb": 40960,
        "a100-80gb": 81920,
        "h100-80gb": 81559,
        "h200": 143771,
        "rtx3060": 12288,
        "rtx3070": 8192,
        "rtx3080": 10240,
        "rtx3090": 24576,
        "rtx4060ti-16gb": 16380,
        "rtx4070": 12282,
        "rtx4080": 16376,
        "rtx4090": 24564,
        "rtx5090": 32607,
    }.items()
}
"""Each card's total memory as nvidia-smi reports it (below the maker's "GB" on cards that keep
some for ECC). docs/study.md lists them."""

BUDGET_MARGIN = 0.03
"""Share of the card kept free for the driver and for other processes' changes."""


AUTO_STEP_BYTES = 256 * 2**20
"""An auto budget is rounded down to this."""

LARGEST_BUDGET_BYTES = 2**40
"""A GPU budget (each GPU's) above 1 TiB is a unit mistaken (24TB for 24GB): the largest
cards hold a few hundred GB."""


class Budget(NamedTuple):
    bytes: int
    note: str
    """How a card name or "auto" became the size ("" for a size given as one)."""


def card_budget_bytes(memory_bytes: int, *, free_bytes: int | None = None) -> int:
    """What a probe, CUDA context included, can have of a card of `memory_bytes` (of which
    `free_bytes` are free now, where measured)."""
    available = memory_bytes if free_bytes is None else free_bytes
    return int(available - BUDGET_MARGIN * memory_bytes)


def _how(memory_bytes: int) -> str:
    return (
        f"less a {BUDGET_MARGIN:.0%} margin ({format_bytes(BUDGET_MARGIN * memory_bytes)}); "
        "the budget includes the probe's CUDA context"
    )


def resolve_budget(text: str, gpu: str | None = None) -> Budget:
    """A budget from a size, a card name or "auto" (the free memory of GPU `gpu`, default the
    first the probes will see)."""
    name = str(text).strip().lower()
    if name == "auto":
        return auto_budget(gpu)
    if name in CARD_MEMORY_BYTES:
        memory = CARD_MEMORY_BYTES[name]
        size = card_budget_bytes(memory)
        return Budget(
            size, f"budget {format_bytes(size)}: {name}'s {format_bytes(memory)}, {_how(memory)}"
        )
    try:
        size = parse_memory_size(text)
    except UsageError as error:
        raise UsageError(
            f"{error}; or name a card ({', '.join(CARD_MEMORY_BYTES)}) or write auto"
        ) from None
    if size > LARGEST_BUDGET_BYTES:
        raise UsageError(
            f"budget {text!r} is {format_bytes(size)}, over the "
            f"{format_bytes(LARGEST_BUDGET_BYTES)} autotune takes for one GPU (the largest cards "
            "hold a few hundred GB); the budget is each GPU's memory, e.g. 24GB"
        )
    return Budget(size, "")


def parse_budget(text: str) -> int:
    return resolve_budget(text).bytes


def _probe_gpu(gpu: str | None) -> int:
    """The NVML index of the GPU the probes will use: `gpu`, else the first of
    CUDA_VISIBLE_DEVICES, else 0."""
    chosen = gpu if gpu is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    try:
        return int(chosen.strip())
    except ValueError:
        raise UsageError(
            f"--budget auto reads a GPU by index; {chosen!r} is not one (give --budget a size)"
        ) from None


def auto_budget(gpu: str | None = None) -> Budget:
    """The free memory of the probes' GPU, less BUDGET_MARGIN of the card."""
    index = _probe_gpu(gpu)
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # noqa: BLE001 - no library, no driver or no GPU: all say none
        raise UsageError(
            f"--budget auto needs an NVIDIA GPU and its driver, and NVML found none ({error}); "
            "give a size such as 24GB or a card name such as rtx4090"
        ) from None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if not 0 <= index < count:
            raise UsageError(f"--budget auto: no GPU {index} (NVML sees {count})")
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
    finally:
        pynvml.nvmlShutdown()
    name = name.decode() if isinstance(name, bytes) else str(name)
    # whole steps, so that the same free memory gives the same budget (and study name) again
    size = card_budget_bytes(int(memory.total), free_bytes=int(memory.free))
    size -= size % AUTO_STEP_BYTES
    if size <= 0:
        raise UsageError(
            f"--budget auto: GPU {index} ({name}) has {format_bytes(memory.free)} free, too "
            "little to train in; free it or give a size"
        )
    return Budget(
        size,
        f"budget {format_bytes(size)}: GPU {index} ({name}) has {format_bytes(memory.free)} "
        f"free of {format_bytes(memory.total)}, {_how(int(memory.total))}",
    )
