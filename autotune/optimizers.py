"""The optimizers a recipe may name, each registered once: what its states cost the memory
model, whether they are paged, its name in other tools' configs, and how it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from autotune.cuda_only import cuda_only_refusal

EIGHT_BIT_MIN_ELEMENTS = 4096
"""bitsandbytes' 8-bit optimizers keep fp32 states for tensors smaller than this
(min_8bit_size): norm weights and biases."""

PAGED_MIN_ELEMENTS = 100_000
"""bitsandbytes' paged optimizers put the states of tensors this large or larger in CUDA
unified memory (cudaMallocManaged): outside torch's caching allocator, and moved to the host
when the GPU runs short, so they count against no budget; smaller ones stay on the device.
On a GPU larger than the budget they stay resident, so a probe there does not pay the paging
that a card of the budget's size would."""


HOST_MIN_ELEMENTS = 4096
"""torchao's CPUOffloadOptimizer keeps tensors smaller than this (minimal_size) and their
states on the GPU, with an ordinary AdamW: norm weights and biases."""

MAX_GRAD_NORM = 0.0
"""Gradient clipping before each optimizer step: none. No probe and no `autotune train` clips
the gradients, so the exports write this max-norm (max_grad_norm, DeepSpeed's
gradient_clipping; 0 turns clipping off), where the Trainer-based tools clip at 1.0 unless told:
clipping changes the update, and so the loss curve."""


@dataclass(frozen=True)
class OptimizerKind:
    name: str
    """The recipe's `optimizer` value."""
    state_bytes: Callable[[int, int], int]
    """Bytes of state per trained element of a tensor: (the tensor's elements, the trained
    weights' bytes per element) -> bytes."""
    build: Callable[[list[Any], float], Any]
    """(trainable parameters, learning rate) -> the torch optimizer (imports lazily)."""
    trainer_name: str
    """Its name for transformers' TrainingArguments `optim` (axolotl and LLaMA-Factory too)."""
    implementation: str
    """The code that runs it, as a person would write it."""
    paged: bool = False
    """States of tensors of PAGED_MIN_ELEMENTS or more live in unified memory."""
    step_temporaries: bool = False
    """The step makes temporaries as large as the gradients (torch's foreach AdamW)."""
    fused: bool = False
    """One fused kernel updates every tensor in place (torch's fused AdamW)."""
    bitsandbytes: bool = False
    """It needs bitsandbytes."""
    weight_dtype_moments: bool = False
    """Its moments are kept in the trained weights' dtype (torch's AdamW): fp16 weights get
    fp16 moments, whose second moment underflows (recipe_checks.fp16_moments_refusal)."""
    host_states: bool = False
    """The states of tensors of HOST_MIN_ELEMENTS or more, a host copy of those tensors and of
    their gradients live in host memory and the step runs on the CPU (torchao's
    CPUOffloadOptimizer): CUDA only, and autotune-only in the exports (their tools have no
    such optimizer)."""


def fused_kernel_devices() -> tuple[str, ...]:
    """The device types torch's fused optimizers run on."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch that moved it: the devices it has long supported
        return ("cuda", "cpu")
    return tuple(_get_fused_kernels_supported_devices())


def _fused_adamw(params: list[Any], learning_rate: float) -> Any:
    """torch's AdamW with its fused kernel, where every parameter is on a device that has it
    (transformers' Trainer default, adamw_torch_fused); the foreach path elsewhere."""
    import torch

    devices = fused_kernel_devices()
    fused = all(p.is_floating_point() and p.device.type in devices for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, fused=fused or None)


def _foreach_adamw(params: list[Any], learning_rate: float) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, foreach=True)


def _bitsandbytes(class_name: str) -> Callable[[list[Any], float], Any]:
    def build(params: list[Any], learning_rate: float) -> Any:
        import bitsandbytes as bnb

        optimizer_class = getattr(bnb.optim, class_name)
        return optimizer_class(params, lr=learning_rate, weight_decay=0.0)

    return build


def _cpu_offload_adamw(params: list[Any], learning_rate: float) -> Any:
    """torchao's CPUOffloadOptimizer around torch's AdamW (fused on the CPU): each large
    tensor's step on a pinned host copy, copied back to the GPU after the step."""
    import torch
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(
        params,
        torch.optim.AdamW,
        minimal_size=HOST_MIN_ELEMENTS,
        lr=learning_rate,
        weight_decay=0.0,
    )


def optimizer_refusal(optimizer: str, device: str | None) -> str:
    """Why `optimizer` cannot run on `device` ("" when it can, or when no device is named):
    torchao's CPU-offload optimizer moves CUDA parameters' steps to the host."""
    if not OPTIMIZERS[optimizer].host_states or device is None:
        return ""
    return cuda_only_refusal(
        device, "torchao's CPU-offload optimizer", "torchao", "offload", "adamw"
    )


def _two_moments(elements: int, trainable_bytes: int) -> int:
    return 2 * trainable_bytes


def _two_8bit_moments(elements: int, trainable_bytes: int) -> int:
    return 2 * (1 if elements >= EIGHT_BIT_MIN_ELEMENTS else 4)


OPTIMIZERS: dict[str, OptimizerKind] = {
    kind.name: kind
    for kind in (
        OptimizerKind(
            "adamw",
            _two_moments,
            _fused_adamw,
            "adamw_torch_fused",
            "torch.optim.AdamW(fused=True)",
            fused=True,
            weight_dtype_moments=True,
        ),
        OptimizerKind(
            "adamw_foreach",
            _two_moments,
            _foreach_adamw,
            "adamw_torch",
            "torch.optim.AdamW(foreach=True)",
            step_temporaries=True,
            weight_dtype_moments=True,
        ),
        OptimizerKind(
            "adamw_8bit",
            _two_8bit_moments,
            _bitsandbytes("AdamW8bit"),
            "adamw_bnb_8bit",
            "bitsandbytes.optim.AdamW8bit",
            bitsandbytes=True,
        ),
        OptimizerKind(
            "paged_adamw_8bit",
            _two_8bit_moments,
            _bitsandbytes("PagedAdamW8bit"),
            "paged_adamw_8bit",
            "bitsandbytes.optim.PagedAdamW8bit",
            paged=True,
            bitsandbytes=True,
        ),
        OptimizerKind(
            "adamw_cpu_offload",
            _two_moments,
            _cpu_offload_adamw,
            "adamw_torch_fused",
            "torchao.optim.CPUOffloadOptimizer(torch.optim.AdamW)",
            host_states=True,
            weight_dtype_moments=True,
        ),
    )
}
DEFAULT_OPTIMIZER = "adamw"
