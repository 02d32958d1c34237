"""The precisions a recipe may name, each registered once: the dtype weights are stored in, the
dtype matrix multiplies run in, and what follows from the two (autocast, loss scaling, bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
"""Bytes per element of the torch dtypes (by name) a precision uses."""


@dataclass(frozen=True)
class PrecisionKind:
    name: str
    """The recipe's `precision` value."""
    weight_dtype: str
    """The torch dtype (its name) weights are stored in."""
    compute_dtype: str
    """The torch dtype matrix multiplies run in (and a k-bit base is loaded in)."""

    @property
    def autocast(self) -> bool:
        """Weights kept wider than the compute: torch.autocast casts their uses."""
        return self.weight_dtype != self.compute_dtype

    @property
    def scales_loss(self) -> bool:
        """fp16 autocast needs a gradient scaler (fp32 master weights, fp16 gradients)."""
        return self.autocast and self.compute_dtype == "float16"

    def load_dtype(self, quantized: bool) -> str:
        """The dtype from_pretrained loads the model in: a k-bit base's unquantized weights in
        the compute dtype (bitsandbytes computes in it), other weights in their own."""
        return self.compute_dtype if quantized else self.weight_dtype

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.weight_dtype]

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]


PRECISIONS: dict[str, PrecisionKind] = {
    kind.name: kind
    for kind in (
        PrecisionKind("bf16", "bfloat16", "bfloat16"),
        PrecisionKind("fp16", "float16", "float16"),
        PrecisionKind("fp32", "float32", "float32"),
        PrecisionKind("amp_bf16", "float32", "bfloat16"),
        PrecisionKind("amp_fp16", "float32", "float16"),
    )
}
