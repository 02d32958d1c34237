"""Host memory a probe's offloading holds, counted from the tensors it holds there.

Three things put a recipe's memory on the host: activation offload (its saved-tensor hooks
add each host copy as they make it and take it off when autograd frees it), torchao's
CPU-offload optimizer (a pinned host copy of each large parameter and of its gradient, and
the AdamW states beside them) and FSDP's CPU offload (the parameter shards, their gradients
and the optimizer states on the host). The states are counted after each optimizer step, the
activations as they come and go; the peak is of their sum. A pinned tensor counts the block
CUDA's host caching allocator gave it (its size rounded up to a power of two), as the memory
models price it.

This is what the study holds to --host-budget, next to the prediction. The process's peak
resident set grows by this and by everything else a probe loads (libraries, data, the model
as it is read), so its growth (`rss_growth_bytes`) is kept beside it as a coarse check.
"""

from __future__ import annotations

import resource
from typing import Any

from autotune.host_memory import pinned_host_bytes
from autotune.optimizers import OPTIMIZERS
from autotune.recipe import Recipe


def offloads(recipe: Recipe) -> bool:
    """The recipe keeps some of its training in host memory: what a probe of it counts."""
    return (
        recipe.activation_offload
        or OPTIMIZERS[recipe.optimizer].host_states
        or recipe.offload != "none"
    )


def host_block_bytes(tensor: Any) -> int:
    """The host memory `tensor`'s storage takes: its bytes, in a pinned block if pinned."""
    nbytes = int(tensor.untyped_storage().nbytes())
    return pinned_host_bytes(nbytes) if tensor.is_pinned() else nbytes


class HostHeld:
    """Bytes this process's offloading holds in host memory now, and their peak."""

    def __init__(self) -> None:
        self.activation_bytes = 0
        """Offloaded activations alive now (freed as backward consumes them)."""
        self.state_bytes = 0
        """Host parameters, gradients and optimizer states at the latest count."""
        self.peak_bytes = 0

    def reset(self) -> None:
        self.activation_bytes = self.state_bytes = self.peak_bytes = 0

    def _moved(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.activation_bytes + self.state_bytes)

    def hold_activation(self, nbytes: int) -> None:
        self.activation_bytes += nbytes
        self._moved()

    def free_activation(self, nbytes: int) -> None:
        self.activation_bytes -= nbytes

    def count_states(self, model: Any, optimizer: Any, device: str) -> None:
        """Count what the model and optimizer keep on the host (after an optimizer step, when
        the states exist and the gradients have not been let go)."""
        self.state_bytes = host_state_bytes(model, optimizer, device)
        self._moved()


HOST_HELD = HostHeld()
"""The probe process's count (a probe is one process; the offload hooks add to it)."""


def local_shard(tensor: Any) -> Any:
    """A DTensor's shard on this rank; any other tensor as it is."""
    return getattr(tensor, "_local_tensor", tensor)


def optimizer_state_tensors(optimizer: Any) -> list[Any]:
    """The tensors of a torch optimizer's per-parameter states (each DTensor's shard on this
    rank); a storage may appear more than once, so counts go by storage."""
    import torch

    return [
        local_shard(value)
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]


def host_state_bytes(model: Any, optimizer: Any, device: str) -> int:
    """Host bytes of the training's parameters, gradients and optimizer states that live off
    `device`: torchao's CPU-offload optimizer's host copies, gradients and states; on a GPU
    also any parameter, gradient or state on the CPU (FSDP's offloaded shards, ZeRO-Offload's
    fp32 partitions and states). On the CPU
    only the former: there every tensor is in host memory, offloaded or not."""
    tensors: dict[int, Any] = {}

    def add(tensor: Any) -> None:
        if tensor is not None and tensor.device.type == "cpu":
            tensors.setdefault(tensor.untyped_storage()._cdata, tensor)

    for host in getattr(optimizer, "param_d2h_map", {}).values():  # torchao's layout
        add(host)
        add(host.grad)
    for inner in getattr(optimizer, "optim_dict", {}).values():
        for tensor in optimizer_state_tensors(inner):
            add(tensor)
    if not device.startswith("cpu"):
        for param in model.parameters():
            add(local_shard(param))
            add(local_shard(param.grad) if param.grad is not None else None)
        if hasattr(optimizer, "state"):
            for tensor in optimizer_state_tensors(optimizer):
                add(tensor)
        # DeepSpeed's ZeRO optimizer wraps the client's, which steps its fp32 partitions (on
        # the host under ZeRO-Offload)
        inner = getattr(optimizer, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            for param in group["params"]:
                add(param)
                add(param.grad)
        if hasattr(inner, "state"):
            for tensor in optimizer_state_tensors(inner):
                add(tensor)
    return sum(host_block_bytes(t) for t in tensors.values())


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
