"""bitsandbytes' int8 matmul (LLM.int8, `MatMul8bitLt`) as its CUDA kernels allocate, for the
replay (autotune.replay) on the meta device, whose bitsandbytes fakes make only each op's outputs.

What CUDA allocates per quantized linear (bitsandbytes 0.50, backends/cuda and backends/default):
- `int8_vectorwise_quant` (the fp16 input, and each weight at load): fp32 row scales, the int8
  rows; with an outlier threshold, `A.abs()` (fp16) and its `>= threshold` mask (bool) while the
  outlier columns are found, then their indices (int64);
- `int8_scaled_mm`: the cuBLASLt product as int32 accumulators, dequantized into fp16, then cast
  to the input's dtype (a third copy when that is not fp16);
- `int8_mixed_scaled_mm` (threshold > 0): the input's outlier columns copied out (`subA`), the
  weight's columns (int8, then dequantized to fp32 and cast), the int8 product, and the product
  plus the outliers' (`addmm`, a new output).
`MatMul8bitLt` keeps `subA` and its input on `ctx` attributes, not saved tensors: checkpointing
does not drop them and backward does not free them; they live as long as the graph does.

Which columns hold an outlier (|x| >= 6, transformers' `llm_int8_threshold`) depends on the data,
which the replay does not have; a column counts once any row of the batch crosses the threshold.
LLM.int8's authors saw such outlier features emerge in every layer from about 6.7B parameters on
(Dettmers et al., 2022), and the H100 int8 rows agree: with the probe's loop replayed (it keeps
each micro-batch's graph, and so these inputs, until the next loss is made), Llama-3.2-1B and
Qwen2-0.5B allocated what the replay without outlier columns allocates (-0.7%, +0.0%), and
Qwen2-7B 13.6 GB more: the outlier copies of 37% of every linear's input bytes. The replay takes
no outlier column below that size and that share from it on (measured on one model; at
micro-batch 2 the same share gives 36.0 GiB, where a later H100 run of that recipe reached 37.1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

OUTLIER_EMERGENCE_PARAMS = 6.7e9
"""Model size from which the replay gives bitsandbytes' int8 matmuls outlier columns."""

OUTLIER_COLUMN_SHARE = 0.37
"""Share of each quantized linear's input columns that are outlier columns from that size on
(fitted to the Qwen2-7B H100 row, LoRA int8 r16 all-linear mb 4 seq 1024)."""


def outlier_column_share(parameters: int) -> float:
    """The share of input columns replayed as outlier columns in a model of `parameters`."""
    return OUTLIER_COLUMN_SHARE if parameters >= OUTLIER_EMERGENCE_PARAMS else 0.0


def int8_cuda_kernels(
    track: Callable[[Any], None], parameters: int
) -> dict[Any, Callable[..., Any]]:
    """Replacements for bitsandbytes' int8 ops on meta tensors, by op: each makes (and passes
    to `track`, in CUDA's order) every tensor the CUDA path makes, and returns its outputs.
    With an outlier threshold, `outlier_column_share` of a model of `parameters` are outlier
    columns."""
    import bitsandbytes  # noqa: F401 - defines the ops
    import torch

    ops = torch.ops.bitsandbytes
    share = outlier_column_share(parameters)

    def new(shape: Any, dtype: Any, device: Any) -> Any:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        track(tensor)
        return tensor

    def vectorwise_quant(A: Any, threshold: float = 0.0) -> Any:  # noqa: N803
        rows, columns = A.numel() // A.shape[-1], A.shape[-1]
        row_stats = new(rows, torch.float32, A.device)
        out_row = new(A.shape, torch.int8, A.device)
        outlier_cols = None
        if threshold > 0.0:
            magnitude = new(A.shape, A.dtype, A.device)
            outliers = new(A.shape, torch.bool, A.device)
            del magnitude
            new((), torch.bool, A.device)  # outliers.any()
            new(columns, torch.bool, A.device)  # outliers.any(dim=0)
            outlier_cols = new(round(share * columns), torch.int64, A.device)
            del outliers
        return out_row, row_stats, outlier_cols

    def scaled_mm(
        A: Any,  # noqa: N803
        B: Any,  # noqa: N803
        row_stats: Any,
        col_stats: Any,
        bias: Any = None,
        dtype: Any = None,
    ) -> Any:
        shape = (*A.shape[:-1], B.shape[0])
        accumulators = new(shape, torch.int32, A.device)
        if A.shape[-1] % 4:  # cuBLASLt cannot: an fp32 matmul, then cast and copied in
            product = new(shape, torch.float32, A.device)
            new(shape, torch.int32, A.device)
            del product
        half = new(shape, torch.float16, A.device)
        del accumulators
        dtype = dtype or torch.float16
        return half if dtype == torch.float16 else new(shape, dtype, A.device)

    def mixed_scaled_mm(
        A: Any,  # noqa: N803
        CA: Any,  # noqa: N803
        CB: Any,  # noqa: N803
        SCA: Any,  # noqa: N803
        SCB: Any,  # noqa: N803
        outlier_cols: Any = None,
        bias: Any = None,
    ) -> Any:
        count = 0 if outlier_cols is None else outlier_cols.numel()
        sub_weight = None
        if count:
            sub_input = new((A.shape[0], count), A.dtype, A.device)
            columns = new((CB.shape[0], count), torch.int8, CB.device)
            scaled = new(columns.shape, torch.float32, CB.device)  # CB * SCB
            sub_weight = new(columns.shape, torch.float32, CB.device)  # * 1/127
            del columns, scaled
            if A.dtype != torch.float32:
                sub_weight = new(sub_weight.shape, A.dtype, CB.device)
        else:
            sub_input = new(0, A.dtype, A.device)
        output = scaled_mm(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
        if sub_weight is not None:
            output = new(output.shape, output.dtype, output.device)  # output.addmm(...)
        return output, sub_input

    return {
        ops.int8_vectorwise_quant.default: vectorwise_quant,
        ops.int8_scaled_mm.default: scaled_mm,
        ops.int8_mixed_scaled_mm.default: mixed_scaled_mm,
    }
