"""The optimizers a recipe may name, each registered once: what its states cost the memory
model, whether they are paged, its name in other tools' configs, and how it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EIGHT_BIT_MIN_ELEMENTS = 4096
"""bitsandbytes' 8-bit optimizers keep fp32 states for tensors smaller than this
(min_8bit_size): norm weights and biases."""

PAGED_MIN_ELEMENTS = 100_000
"""bitsandbytes' paged optimizers put the states of tensors this large or larger in CUDA
unified memory (cudaMallocManaged): outside torch's caching allocator, and moved to the host
when the GPU runs short, so they count against no budget; smaller ones stay on the device.
On a GPU larger than the budget they stay resident, so a probe there does not pay the paging
that a card of the budget's size would."""


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
    paged: bool = False
    """States of tensors of PAGED_MIN_ELEMENTS or more live in unified memory."""
    step_temporaries: bool = False
    """The step makes temporaries as large as the gradients (torch's foreach AdamW)."""
    bitsandbytes: bool = False
    """It needs bitsandbytes."""


def _torch_adamw(params: list[Any], learning_rate: float) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)


def _bitsandbytes(class_name: str) -> Callable[[list[Any], float], Any]:
    def build(params: list[Any], learning_rate: float) -> Any:
        import bitsandbytes as bnb

        optimizer_class = getattr(bnb.optim, class_name)
        return optimizer_class(params, lr=learning_rate, weight_decay=0.0)

    return build


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
            _torch_adamw,
            "adamw_torch",
            step_temporaries=True,
        ),
        OptimizerKind(
            "adamw_8bit",
            _two_8bit_moments,
            _bitsandbytes("AdamW8bit"),
            "adamw_bnb_8bit",
            bitsandbytes=True,
        ),
        OptimizerKind(
            "paged_adamw_8bit",
            _two_8bit_moments,
            _bitsandbytes("PagedAdamW8bit"),
            "paged_adamw_8bit",
            paged=True,
            bitsandbytes=True,
        ),
    )
}
DEFAULT_OPTIMIZER = "adamw"
