"""bitsandbytes' 4-bit matmul and quantize ops as their CUDA kernels allocate, and its caches
kept apart, for the replay (autotune.replay); its int8 matmul is autotune.meta_int8's."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

GEMM_4BIT_FUSED_MAX_ROWS = 1536
"""Rows past which bitsandbytes' 4-bit matmul on CUDA dequantizes the weight and runs
F.linear instead of its fused kernel (bitsandbytes.backends.cuda.ops, any architecture); at
or under it the choice depends on the GPU and the fused kernel is assumed."""


def bitsandbytes_cuda_kernels(
    track: Callable[[Any], None], multiplied: Callable[[], None] = lambda: None
) -> dict[Any, Callable[..., Any]]:
    """Replacements for bitsandbytes' 4-bit matmul and quantize ops on meta tensors, by op
    (none before bitsandbytes is imported): each makes (and passes to `track`) what the CUDA
    kernel makes, and returns its outputs; the 4-bit matmul's F.linear path runs on cuBLAS and
    calls `multiplied` after its output (meta_cublas.CublasWorkspaces')."""
    import torch

    def gemm_4bit(
        A: Any,  # noqa: N803 (bitsandbytes' names)
        B: Any,  # noqa: N803
        shapeB: Any,  # noqa: N803
        absmax: Any,
        blocksize: int,
        quant_type: str,
        bias: Any = None,
        absmax_8bit: Any = None,
        absmax_code: Any = None,
        absmax_offset: Any = None,
    ) -> Any:
        """bitsandbytes' 4-bit matmul (a QLoRA base layer's forward without autograd) as CUDA
        runs it: past GEMM_4BIT_FUSED_MAX_ROWS rows, the nested absmax dequantized to fp32
        and offset (two blocks), the whole weight dequantized into the input's dtype, then
        F.linear; all alive until the output is made (on Qwen2-7B's MLP: 2 x 4.05 MiB and
        129.5 MiB beside a 148 MiB output at 4096 rows). The meta kernel makes the output only."""
        if A.numel() // max(A.shape[-1], 1) <= GEMM_4BIT_FUSED_MAX_ROWS:
            out = fused(
                A,
                B,
                shapeB,
                absmax,
                blocksize,
                quant_type,
                bias=bias,
                absmax_8bit=absmax_8bit,
                absmax_code=absmax_code,
                absmax_offset=absmax_offset,
            )
            track(out)
            return out
        temporaries = []
        if absmax_8bit is not None:
            temporaries.append(torch.empty_like(absmax_8bit, dtype=torch.float32))
            temporaries.append(temporaries[0] + absmax_offset)
        temporaries.append(torch.empty(tuple(shapeB), dtype=A.dtype, device=A.device))
        for tensor in temporaries:
            track(tensor)
        out = torch.nn.functional.linear(A, temporaries[-1], bias)
        track(out)
        multiplied()
        return out

    def absmax_first(op: Any) -> Callable[..., Any]:
        """bitsandbytes' quantize ops as CUDA runs them: the absmax allocated before the
        quantized weight, though returned after it (a replay tracking the outputs in the order
        returned would place the two the other way round in a weight-loading segment)."""

        def run(*args: Any, **kwargs: Any) -> Any:
            out, absmax = op(*args, **kwargs)
            track(absmax)
            track(out)
            return out, absmax

        return run

    kernels: dict[Any, Callable[..., Any]] = {}
    ops: Any = getattr(torch.ops, "bitsandbytes", None)  # once bitsandbytes is imported
    fused: Any = getattr(getattr(ops, "gemm_4bit", None), "default", None)
    if fused is not None:
        kernels[fused] = gemm_4bit
    for name in ("quantize_4bit", "quantize_blockwise"):
        quantize: Any = getattr(getattr(ops, name, None), "default", None)
        if quantize is not None:
            kernels[quantize] = absmax_first(quantize)
    return kernels


@contextlib.contextmanager
def fresh_bitsandbytes_caches() -> Iterator[None]:
    """bitsandbytes keeps the code map of blockwise quantization in a module dict once made
    (on the device of its first use): empty it for the replay, so the replay makes and keeps it
    as a fresh probe process does, and put back what this process had."""
    import bitsandbytes.functional as bnb_functional

    cached = getattr(bnb_functional, "name2qmap", {})
    kept = dict(cached)
    cached.clear()
    try:
        yield
    finally:
        cached.clear()
        cached.update(kept)
