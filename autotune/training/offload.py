"""Activation offload: the tensors a forward saves for backward kept in host memory.

Each tensor autograd saves is copied to host memory (pinned on CUDA, so the copies back can
overlap) and the device copy dropped; backward brings each back when its node runs, so the
device holds one node's saved tensors at a time instead of the whole forward's. This is torch's
`save_on_cpu` except that parameters and their views stay where they are: they are alive
anyway, and copying them would put the weights in host memory once per use and copy each back
in backward. The loss and
gradients are exactly those of the step without offload.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from autotune.recipe import Recipe
from autotune.training.host_held import HOST_HELD, host_block_bytes


def is_weight(tensor: Any) -> bool:
    """A parameter, or a view of one (a linear saves its weight transposed): it stays where it
    is, alive anyway; copying it would put the weights in host memory once per use."""
    import torch

    return isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter)


class _HostCopy:
    """A saved tensor's host copy, counted in HOST_HELD from its making until autograd frees
    it (when backward has used it, or the graph is dropped)."""

    __slots__ = ("device", "host", "nbytes")

    def __init__(self, device: Any, host: Any) -> None:
        self.device, self.host = device, host
        self.nbytes = host_block_bytes(host)
        HOST_HELD.hold_activation(self.nbytes)

    def __del__(self) -> None:
        HOST_HELD.free_activation(self.nbytes)


def _host_hooks() -> Any:
    """Pack and unpack hooks that hold saved tensors in host memory (pinned where CUDA is),
    each copy counted in HOST_HELD while it lives."""
    import torch

    pin = torch.cuda.is_available()

    def pack(tensor: Any) -> Any:
        if is_weight(tensor):
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
        host.copy_(tensor)
        return _HostCopy(tensor.device, host)

    def unpack(packed: Any) -> Any:
        if isinstance(packed, torch.Tensor):
            return packed
        return packed.host.to(packed.device, non_blocking=pin)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


host_hooks: Callable[[], Any] = _host_hooks
"""The saved-tensor hooks an offloaded forward runs under (the replay puts its own here: the
meta device has no data to copy to the host)."""


@contextlib.contextmanager
def offloaded_forward(recipe: Recipe) -> Iterator[None]:
    """Run the forward under it: with the recipe's activation_offload, and while autograd
    records, what the forward saves for backward goes to host memory."""
    import torch

    if not (recipe.activation_offload and torch.is_grad_enabled()):
        yield
        return
    with host_hooks():
        yield
