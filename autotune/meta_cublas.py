"""cuBLAS's workspaces as the replay (autotune.replay) takes them: one per thread's handle, from
the caching allocator, the first time that thread multiplies, after that matmul's output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any


def cublas_workspace(nbytes: int) -> Any:
    """The workspace cuBLAS takes from the caching allocator for a thread's handle (the
    forward's, backward's), the first time that thread multiplies."""
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, device="meta")


class CublasWorkspaces:
    """cuBLAS's workspaces, one per thread that multiplies, each taken from the caching
    allocator (and passed to `track`) at that thread's first matmul, after its output, and kept;
    `thread` names the thread the replay runs as (the forward's, backward's). Backward's first
    matmul comes after the loss's first gradients (a chunked loss's recomputed logits, the
    head's gradient). The replay takes the forward's by the forward's start at the latest
    (`take`): in the transformers that measured the H200 rows (5.17) the rotary embedding
    multiplies on cuBLAS right after the embedding's output (5.24's multiplies elementwise). A
    QDoRA model's first matmul comes earlier, in DoRA's init (`lora_B @ lora_A`, amid its
    dequantized weights). Each is made and tracked inside `scope` (the replay counts them in a
    part of their own)."""

    def __init__(
        self,
        nbytes: int,
        track: Callable[[Any], None],
        thread: Callable[[], str],
        scope: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ):
        self.nbytes = nbytes
        self.track = track
        self.thread = thread
        self.scope = scope
        self.held: dict[str, Any] = {}

    def take(self, thread: str) -> None:
        if thread not in self.held:
            with self.scope():
                self.held[thread] = cublas_workspace(self.nbytes)
                self.track(self.held[thread])

    def multiplied(self) -> None:
        self.take(self.thread())
