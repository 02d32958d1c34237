"""The losses a recipe may name, each registered once: how the step computes it, what the
memory models need to know of it, and its keys in other tools' configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LossKind:
    name: str
    """The recipe's `loss` value."""
    chunked: bool = False
    """The head and the cross-entropy run per chunk of tokens under checkpointing
    (training.loss.CHUNK_TOKENS), so only one chunk's logits are alive at a time."""
    fused: bool = False
    """Liger's fused linear cross-entropy: a Triton kernel for CUDA GPUs with liger-kernel,
    which the replay cannot run on the meta device."""
    trainer: dict[str, Any] = field(default_factory=dict)
    """transformers' TrainingArguments keywords that give it."""
    axolotl: dict[str, Any] = field(default_factory=dict)
    llamafactory: dict[str, Any] = field(default_factory=dict)
    autotune_only_in: tuple[str, ...] = ()
    """Export formats that have no equivalent (their config trains with the standard loss)."""


LOSSES: dict[str, LossKind] = {
    kind.name: kind
    for kind in (
        LossKind("standard"),
        LossKind(
            "chunked",
            chunked=True,
            # axolotl chunks logits the model has already made in full: less saved, same loss
            axolotl={"chunked_cross_entropy": True},
            autotune_only_in=("hf", "llamafactory"),
        ),
        LossKind(
            "fused_linear",
            fused=True,
            # Liger's fused linear cross-entropy alone, as autotune runs it (the default also
            # swaps RoPE, RMSNorm and SwiGLU for Liger's kernels)
            trainer={
                "use_liger_kernel": True,
                "liger_kernel_config": {
                    "fused_linear_cross_entropy": True,
                    "cross_entropy": False,
                    "rope": False,
                    "rms_norm": False,
                    "swiglu": False,
                },
            },
            axolotl={
                "plugins": ["axolotl.integrations.liger.LigerPlugin"],
                "liger_fused_linear_cross_entropy": True,
            },
            # LLaMA-Factory's switch patches in all of Liger's kernels for the model's family
            llamafactory={"enable_liger_kernel": True},
        ),
    )
}
DEFAULT_LOSS = "standard"
