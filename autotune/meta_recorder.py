"""Every storage the replay (autotune.replay) makes on the meta device, put in order through
the caching allocator model (autotune.allocator), and counted by the phase that made it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from autotune.allocator import CachingAllocator
from autotune.tied_gradients import SharedShapes, sums_in_place
from autotune.training.host_held import local_shard


class Recorder:
    """Follows every meta storage the ops under it allocate, allocating and freeing it in the
    caching allocator model when it is made and released; counts what is alive by phase."""

    def __init__(self, allocator: CachingAllocator) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        self.allocator = allocator
        self.phase = "weights"
        self.live: dict[int, tuple[Any, str]] = {}
        self.by_phase: dict[str, int] = defaultdict(int)
        self.at_peak: dict[str, int] = {}
        self.events: list[tuple[int, int, str]] = []
        """(storage key, block bytes, phase) of each allocation, and (key, 0, "") of each
        release, in order: what was alive at the peak is read back from it (`live_at_peak`)."""
        self.peak_event = 0
        """How many events had happened when the allocated peak was last reached."""
        self.paused = False
        self.kernels: dict[Any, Any] = {}
        """Ops run by a replacement that allocates (and tracks) what CUDA's kernel does
        (autotune.meta_cuda's, autotune.meta_bitsandbytes', autotune.meta_int8's)."""
        self.tied: SharedShapes = frozenset()
        """The model's tied parameters, whose gradients autograd sums in place on CUDA
        (autotune.tied_gradients); in the gradients phase (backward) it sums any tensor's so."""
        recorder = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                from torch.utils._pytree import tree_leaves

                backward = recorder.phase == "gradients"
                if sums_in_place(func, args, kwargs, recorder.tied, backward):
                    return args[0].add_(args[1])
                kernel = recorder.kernels.get(func)
                if kernel is not None:
                    return kernel(*args, **(kwargs or {}))
                out = func(*args, **(kwargs or {}))
                for tensor in tree_leaves(out):
                    recorder.track(tensor)
                return out

        self.mode = Mode()

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        """What is made under it is counted in `phase`, whatever phase the replay is in."""
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = outer

    def track(self, tensor: Any) -> None:
        import torch

        if self.paused or not isinstance(tensor, torch.Tensor) or tensor.device.type != "meta":
            return
        tensor = local_shard(tensor)  # a DTensor's shard (FSDP2)
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or storage.nbytes() == 0:
            return
        block = self.allocator.malloc(storage.nbytes())
        self.live[key] = (block, self.phase)
        self.by_phase[self.phase] += block.size
        self.events.append((key, block.size, self.phase))
        weakref.finalize(storage, self._release, key)
        if self.allocator.allocated_bytes >= self.allocator.peak_allocated_bytes:
            self.at_peak = dict(self.by_phase)
            self.peak_event = len(self.events)

    def release(self, tensor: Any) -> None:
        """`tensor`'s storage gave its bytes back without dying (FSDP2's resize to 0)."""
        self._release(local_shard(tensor).untyped_storage()._cdata)

    def _release(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            block, phase = entry
            self.by_phase[phase] -= block.size
            self.events.append((key, 0, ""))
            self.allocator.free(block)

    def live_at_peak(self) -> list[tuple[int, str]]:
        """(block bytes, phase) of each block alive at the allocated peak, largest first."""
        live: dict[int, tuple[int, str]] = {}
        for key, size, phase in self.events[: self.peak_event]:
            if size:
                live[key] = (size, phase)
            else:
                live.pop(key, None)
        return sorted(live.values(), reverse=True)

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        self.paused = True
        try:
            yield
        finally:
            self.paused = False
