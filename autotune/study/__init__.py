"""The Optuna study: storage, sampler, objective, constraints and resume.

Each trial samples a recipe, predicts its memory, skips it as infeasible when the prediction
exceeds the budget, and otherwise probes it in a child process. Every outcome is recorded.
This package keeps one concept per module; its names are re-exported here,
imported on first use, so that reading a finished study (records, storage) does not load the
code that runs one.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = (
    "study_records",
    "searched_choices",
    "claims",
    "coverage",
    "records",
    "unmeasured",
    "ranking",
    "storage_urls",
    "sqlite_checks",
    "storage",
    "overview",
    "sampler",
    "settings",
    "pruning",
    "resumed",
    "prepare",
    "seeding",
    "workers",
    "objective",
    "confirm",
    "promotion",
    "run",
)
"""The package's modules, lowest first: a name is looked up in them in this order, so one that
lives in study_records, searched_choices, claims, coverage, records, unmeasured, ranking,
storage_urls, sqlite_checks, storage or overview never loads the modules that run a study."""


def __getattr__(name: str) -> Any:
    if name in _MODULES:  # `from autotune.study import storage` before it was imported
        return importlib.import_module(f"autotune.study.{name}")
    for module_name in _MODULES:
        module = importlib.import_module(f"autotune.study.{module_name}")
        if name in vars(module):
            value = vars(module)[name]
            globals()[name] = value
            return value
    raise AttributeError(f"module 'autotune.study' has no attribute {name!r}")
