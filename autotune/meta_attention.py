"""The GPU memory of CUDA's SDPA kernels in the replay (autotune.replay): autograd functions
that allocate on the meta device what the flash and memory-efficient kernels allocate.
"""

from __future__ import annotations

from typing import Any


def attention_functions() -> tuple[Any, Any]:
    """Autograd functions with the memory of CUDA's flash and memory-efficient SDPA kernels."""
    import torch

    def like_flash_output(q: Any, v: Any) -> Any:
        # (batch, seq, heads, dim) in memory, seen as (batch, heads, seq, dim)
        b, h, s, _ = q.shape
        return q.new_empty((b, s, h, v.shape[-1])).transpose(1, 2)

    class Kernel(torch.autograd.Function):
        lse_multiple = 1

        @classmethod
        def forward(cls, ctx, query, key, value, bias=None):  # noqa: ANN001
            out = like_flash_output(query, value)
            b, h, s, _ = query.shape
            padded = -(-s // cls.lse_multiple) * cls.lse_multiple
            lse = query.new_empty((b, h, padded), dtype=torch.float32)
            # the additive mask (the memory-efficient kernel's bias) is kept for backward
            ctx.save_for_backward(query, key, value, out, lse, bias)
            return out

        @staticmethod
        def backward(ctx, grad):  # noqa: ANN001
            query, key, value, out, lse, _ = ctx.saved_tensors
            accumulator = None
            if query.dtype != torch.float32:
                accumulator = query.new_empty(query.shape, dtype=torch.float32)
            delta = lse.new_empty(lse.shape)
            grad_query = torch.empty_like(query)
            if key.shape[1] != query.shape[1]:
                # grouped-query heads: gradients per query head, then summed per key head
                expanded = (query.shape[0], query.shape[1], key.shape[2], key.shape[3])
                grad_key_heads = key.new_empty(expanded)
                grad_value_heads = value.new_empty(expanded)
                grad_key, grad_value = torch.empty_like(key), torch.empty_like(value)
                del grad_key_heads, grad_value_heads
            else:
                grad_key, grad_value = torch.empty_like(key), torch.empty_like(value)
            del accumulator, delta
            return grad_query, grad_key, grad_value, None

    class Flash(Kernel):
        lse_multiple = 1

    class Efficient(Kernel):
        lse_multiple = 32

    return Flash, Efficient
