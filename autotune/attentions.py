"""The attention implementations a recipe may name, each registered once: what the memory models
need to know of its kernels, and its name in other tools' configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AttentionKind:
    name: str
    """The recipe's `attention` value, also transformers' `attn_implementation`."""
    keeps_matrix: bool = False
    """The full attention matrix is kept for backward (eager)."""
    flash: bool = False
    """Flash attention's kernel: variable-length rows need no block-diagonal mask."""
    replayed_as: str = "sdpa"
    """The implementation the replay builds on the meta device (SDPA stands in for flash and
    picks its CUDA kernel as CUDA would)."""
    axolotl: dict[str, Any] = field(default_factory=dict)
    """Its flag in an axolotl config."""
    llamafactory: str = ""
    """Its `flash_attn` value in a LLaMA-Factory config."""


ATTENTIONS: dict[str, AttentionKind] = {
    kind.name: kind
    for kind in (
        AttentionKind("sdpa", axolotl={"sdp_attention": True}, llamafactory="sdpa"),
        AttentionKind("eager", keeps_matrix=True, replayed_as="eager", llamafactory="disabled"),
        AttentionKind(
            "flash_attention_2", flash=True, axolotl={"flash_attention": True}, llamafactory="fa2"
        ),
    )
}
