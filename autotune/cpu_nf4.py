"""What bitsandbytes' NF4 layers ask of a model on a CPU with AVX512-BF16.

On such a CPU, a `Linear4bit` that runs without grad and outside training mode (a probe's eval,
`autotune train`'s eval) repacks its weight for a faster kernel, which takes only output widths
that are multiples of 32 and input widths that are whole quantization blocks (64); any other
layer stops the run (`AssertionError: N must be divisible by block_n`, or a reshape error). The
architecture check refuses such recipes up
front, and the probe's child applies the same answer to every NF4 layer it loads, so the two
never disagree (and a test can force either path on any CPU with AUTOTUNE_CPU_AVX512_BF16).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

AVX512_BF16_ENV = "AUTOTUNE_CPU_AVX512_BF16"
"""1 or 0: take (or do not take) bitsandbytes' packed NF4 path on the CPU whatever the CPU says.
Forcing it on where the CPU lacks AVX512-BF16 runs instructions the CPU does not have."""
PACKED_OUT_FEATURES_MULTIPLE = 32
"""bitsandbytes' block_n: the packed kernel's output-width granule."""
PACKED_IN_FEATURES_MULTIPLE = 64
"""The NF4 quantization block (bitsandbytes' and transformers' default blocksize): the repack
lays the scales out as (outputs, inputs / block), so the input width must be whole blocks."""


def cpu_packs_nf4() -> bool:
    """Whether bitsandbytes' NF4 layers take the packed AVX512-BF16 path on this CPU."""
    forced = os.environ.get(AVX512_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return "avx512_bf16" in line.split(":", 1)[-1].split()
        return False
    from bitsandbytes.functional import has_avx512bf16  # what bitsandbytes itself asks

    return bool(has_avx512bf16())


def packed_nf4_misfits(shapes: Iterable[tuple[str, int, int]]) -> list[str]:
    """'gate_proj (176 outputs)' for each (name, out_features, in_features) the packed kernel
    refuses; sorted, each name once."""
    misfits = set()
    for name, out_features, in_features in shapes:
        if out_features % PACKED_OUT_FEATURES_MULTIPLE:
            misfits.add(f"{name} ({out_features} outputs)")
        elif in_features % PACKED_IN_FEATURES_MULTIPLE:
            misfits.add(f"{name} ({in_features} inputs)")
    return sorted(misfits)


def nf4_cpu_refusal(shapes: Iterable[tuple[str, int, int]]) -> str:
    """Why NF4 cannot run on this CPU for a model whose quantized linear layers have `shapes`
    ("" when it can)."""
    misfits = packed_nf4_misfits(shapes)
    if not misfits or not cpu_packs_nf4():
        return ""
    return (
        "bitsandbytes' NF4 kernel on this CPU (AVX512-BF16) needs output widths that are "
        f"multiples of {PACKED_OUT_FEATURES_MULTIPLE} and input widths that are multiples of "
        f"{PACKED_IN_FEATURES_MULTIPLE}; the model has {', '.join(misfits)}"
    )


KERNEL_HUB_LOGGER = "bitsandbytes.backends.cpu.ops"
"""Where bitsandbytes warns, on every import on such a CPU, that it could not fetch a faster CPU
kernel from the `kernels` hub; it falls back to its own, and a user has nothing to act on."""


def quiet_kernel_hub_notice() -> None:
    """Keep bitsandbytes' kernel-hub notice out of this process's output (a probe's log keeps
    it); call before bitsandbytes is imported."""
    import logging

    logging.getLogger(KERNEL_HUB_LOGGER).setLevel(logging.ERROR)


def apply_cpu_nf4_path(model: Any) -> None:
    """Make every NF4 layer of `model` take the path cpu_packs_nf4() names."""
    packs = cpu_packs_nf4()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = packs


def unpack_cpu_nf4(model: Any) -> None:
    """Undo the packing an eval did to `model`'s NF4 weights on an AVX512-BF16 CPU (as
    bitsandbytes does itself before saving them): the packed layout serves passes without grad
    only, and a training step after the eval (`autotune train --eval-steps`) ran its inference
    kernel and failed ("a view of a leaf Variable that requires grad is being used in an
    in-place operation"). The next eval packs them again."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state: Any = getattr(weight, "quant_state", None)
        if weight is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, state
            )
