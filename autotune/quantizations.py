"""How a recipe may quantize its frozen base, each way registered once: what a quantized linear
holds per weight, the bitsandbytes settings that load it, and its name in labels and exports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

INT8_BYTES_PER_PARAM = 6.5
"""What bitsandbytes int8 (LLM.int8) linears hold per weight while training, for the formula
(measured on H100 with bitsandbytes 0.50: 5.9 bytes on Llama-3.2-1B, 6.6 on Qwen2-7B before
allocator overhead; the per-row fp32 scales included). Most of it is not per weight but per
token: the matmuls' inputs, which MatMul8bitLt keeps on the graph (autotune.meta_int8)."""

NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""4-bit codes, one 8-bit absmax per 64-weight block, one fp32 constant per 256 absmax blocks
(bitsandbytes double quantization)."""


@dataclass(frozen=True)
class QuantizationKind:
    name: str
    """The recipe's `quantization` value."""
    bits: int | None
    """Bits per quantized weight (None: the base is not quantized)."""
    linear_bytes_per_param: float
    """What a block linear holds per weight while training (the memory model)."""
    bitsandbytes_config: Callable[[Any], dict[str, Any]] | None
    """BitsAndBytesConfig's keyword arguments, given the compute dtype (a torch dtype or its
    name); None where nothing is quantized."""
    adapter_name: str
    """What a LoRA recipe on this base is called in its label."""
    replay_refusal: str = ""
    """Why the replay cannot predict it faithfully ("" where it can)."""
    cpu_dora_refusal: str = ""
    """Why DoRA over this base cannot train on the CPU ("" where it can)."""


def _nf4(compute_dtype: Any) -> dict[str, Any]:
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": compute_dtype,
    }


QUANTIZATIONS: dict[str, QuantizationKind] = {
    kind.name: kind
    for kind in (
        QuantizationKind("none", None, 0.0, None, "LoRA"),
        QuantizationKind(
            "int8",
            8,
            INT8_BYTES_PER_PARAM,
            lambda compute_dtype: {"load_in_8bit": True},
            "LoRA int8",
            # bitsandbytes 0.50's CPU int8 matmul under peft's DoRA layer (a probe crashes)
            cpu_dora_refusal="bitsandbytes' CPU int8 matmul finds its weight scales (SCB) unset",
        ),
        QuantizationKind("nf4", 4, NF4_BYTES_PER_PARAM, _nf4, "QLoRA nf4"),
    )
}
