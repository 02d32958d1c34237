"""The ways a recipe may batch sequences, each registered once: how a step's rows are made, what
the memory model needs to know of them, and their names in other tools' configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BatchingKind:
    name: str
    """The recipe's `batching` value."""
    packs_rows: bool = False
    """A step's sequences are packed into seq_len rows; a micro-batch is micro_batch_size rows."""
    one_row: bool = False
    """A micro-batch's sequences end to end in one row (padding-free)."""
    sft_config: dict[str, Any] | None = None
    """TRL's SFTConfig keywords that give it (None: the default padded batches)."""
    axolotl: dict[str, Any] = field(default_factory=dict)
    llamafactory: dict[str, Any] = field(default_factory=dict)

    @property
    def masks_rows(self) -> bool:
        """Several sequences may share a row, so attention needs a block-diagonal mask."""
        return self.packs_rows or self.one_row

    def masks(self, micro_batch_size: int) -> bool:
        """A micro-batch of this size has rows of several sequences (packed rows; a padding-free
        row of more than one), so attention gets a block-diagonal mask: a padding-free
        micro-batch of one sequence is an ordinary causal row."""
        return self.packs_rows or (self.one_row and micro_batch_size > 1)

    def pads(self, micro_batch_size: int) -> bool:
        """A micro-batch of this size is right-padded to its longest row, so rows of different
        lengths give it padding and an attention mask (one sequence a row, several rows)."""
        return not self.masks_rows and micro_batch_size > 1


BATCHINGS: dict[str, BatchingKind] = {
    kind.name: kind
    for kind in (
        BatchingKind("padded"),
        BatchingKind("padding_free", one_row=True, sft_config={"padding_free": True}),
        BatchingKind(
            "packed",
            packs_rows=True,
            sft_config={"packing": True, "padding_free": True},
            axolotl={"sample_packing": True},
            # neat packing keeps attention inside each packed sequence
            llamafactory={"packing": True, "neat_packing": True},
        ),
    )
}
