"""Host memory in the replay (autotune.replay): what activation offload puts in pinned host
blocks, as CUDA's host caching allocator holds them.
"""

from __future__ import annotations

from typing import Any


class HostMemory:
    """Host memory that activation offload fills in the replay (autotune.training.offload): each
    saved tensor, from the forward that saves it until its graph is freed, in a pinned block of
    its size rounded up to a power of two (CUDA's host caching allocator). Backward's copy back
    is an empty device tensor the recorder follows; the meta device has no data to copy."""

    def __init__(self) -> None:
        self.bytes = 0
        self.peak_bytes = 0

    def hold(self, nbytes: int) -> None:
        """Bytes held in host memory from now on (a CPU-offload optimizer's)."""
        self.bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def offload_optimizer(self, params: list[Any], learning_rate: float) -> Any:
        """torchao's CPUOffloadOptimizer as it runs on CUDA, which the meta device cannot run:
        each tensor of HOST_MIN_ELEMENTS or more gets a pinned host copy and a pinned host
        gradient, and AdamW's two states beside them (host memory here), and its step on the
        host writes the GPU tensor in place; smaller ones keep a fused AdamW on the device."""
        import torch

        from autotune.host_memory import pinned_host_bytes
        from autotune.optimizers import HOST_MIN_ELEMENTS

        large = [p for p in params if p.numel() >= HOST_MIN_ELEMENTS]
        for param in large:
            nbytes = param.numel() * param.element_size()
            self.hold(2 * pinned_host_bytes(nbytes) + 2 * nbytes)
        small = [p for p in params if p.numel() < HOST_MIN_ELEMENTS]

        class Offloaded:
            device = torch.optim.AdamW(small, lr=learning_rate, fused=True) if small else None

            def step(self) -> None:
                if self.device is not None:
                    self.device.step()

            def zero_grad(self, set_to_none: bool = True) -> None:
                for param in params:
                    param.grad = None

        return Offloaded()

    def hooks(self) -> Any:
        import torch

        from autotune.host_memory import pinned_host_bytes
        from autotune.training.offload import is_weight

        memory = self

        class HostCopy:
            def __init__(self, tensor: Any) -> None:
                self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
                self.nbytes = pinned_host_bytes(tensor.numel() * tensor.element_size())
                memory.hold(self.nbytes)

            def __del__(self) -> None:
                memory.bytes -= self.nbytes

        def pack(tensor: Any) -> Any:
            return tensor if is_weight(tensor) else HostCopy(tensor)

        def unpack(packed: Any) -> Any:
            if isinstance(packed, torch.Tensor):
                return packed
            return torch.empty(packed.shape, dtype=packed.dtype, device=packed.device)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
