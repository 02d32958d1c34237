"""Choices that run only on CUDA with an optional package: why they cannot run elsewhere."""

from __future__ import annotations

import importlib.util


def cuda_only_refusal(device: str, what: str, package: str, extra: str, instead: str) -> str:
    """Why `what` cannot run on `device` ("" when it can): it needs a CUDA GPU and the optional
    `package` (installed with autotune's `extra`); off CUDA, the reason names `instead`."""
    if not device.startswith("cuda"):
        return f"{what} needs a CUDA GPU; use {instead}"
    if importlib.util.find_spec(package.replace("-", "_")) is None:
        return f"the {package} package is not installed (pip install 'autotune[{extra}]')"
    return ""
