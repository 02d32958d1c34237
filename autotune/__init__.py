"""autotune: find the fastest way to fine-tune a causal LM within the GPU memory you have.

Heavy libraries (torch, transformers, optuna, plotly) are imported where they are used, so that
importing this package and `autotune --help` stay instant. The Python API (autotune.api: `run`,
`estimate`, `train`, ...) is reachable from here and loads on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

API_NAMES = (
    "run",
    "RunResult",
    "RunSettings",
    "estimate",
    "MemoryPrediction",
    "train",
    "TrainResult",
    "inspect_data",
    "export_recipe",
    "write_study_report",
    "StudyReport",
)
"""What `autotune.<name>` gives from autotune.api."""


def __getattr__(name: str) -> Any:
    if name in API_NAMES:
        from autotune import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
