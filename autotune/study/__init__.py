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

_MODULE_OF = {
    "CONFIRM_SPEED_TOLERANCE": "confirm",
    "confirm_frontier": "confirm",
    "measure_noise": "confirm",
    "RunEvents": "objective",
    "TrialSummary": "objective",
    "_attach_artifacts": "objective",
    "_earlier_trial_with_params": "objective",
    "_record_constraint": "objective",
    "loss_when_unmeasured": "objective",
    "make_objective": "objective",
    "probe_request": "objective",
    "prepare_run": "prepare",
    "budget_fit": "pruning",
    "resumed_space": "pruning",
    "supported_space": "pruning",
    "CLAIM_PREFIX": "records",
    "CONFIRMATION_PREFIX": "records",
    "CONSTRAINT_KEY": "records",
    "DIRECTIONS": "records",
    "MEASURED_UNDER_ATTR": "records",
    "NOISE_ATTR": "records",
    "OBJECTIVE_NAMES": "records",
    "PROBE_FAILURE_WORDS": "records",
    "SPACE_CHOICES_ATTR": "records",
    "SURPLUS_ATTR": "records",
    "UNMEASURED_TOKENS_PER_SECOND": "records",
    "ProbeCrashed": "records",
    "confirmations": "records",
    "describe_ruled_out": "records",
    "describe_unsupported": "records",
    "finished_trial_count": "records",
    "measured_points": "records",
    "not_searched": "records",
    "nothing_measured_line": "records",
    "recipe_of": "records",
    "_MEASURED_UNDER_WORDS": "run",
    "check_comparable": "run",
    "measured_under": "run",
    "run_study": "run",
    "REPAIR_DIMENSIONS": "seeding",
    "baseline_params": "seeding",
    "fits_budget": "seeding",
    "nearest_fitting_params": "seeding",
    "trial_predictor": "seeding",
    "BASELINES": "settings",
    "LENGTH_STATS_ROWS": "settings",
    "REPLAY_BAND": "settings",
    "STUDY_FILE_NAME_CHARS": "settings",
    "BudgetFit": "settings",
    "PreparedRun": "settings",
    "RunSettings": "settings",
    "check_workers": "settings",
    "default_study_name": "settings",
    "resolve_device": "settings",
    "study_file_name": "settings",
    "tokenizer_for": "settings",
    "trials_dir_of": "settings",
    "_QUERY_SECRET": "storage",
    "_USERINFO": "storage",
    "ARTIFACTS_DIR": "storage",
    "DEFAULT_STORAGE": "storage",
    "HEARTBEAT_SECONDS": "storage",
    "SECRET_QUERY_KEYS": "storage",
    "STALE_AFTER_SECONDS": "storage",
    "TRIALS_DIR": "storage",
    "_open_storage": "storage",
    "_quiet_optuna": "storage",
    "_ReportedCrashes": "storage",
    "_serialise_sqlite_transactions": "storage",
    "_url_secrets": "storage",
    "artifact_store": "storage",
    "existing_storage_url": "storage",
    "load_existing_study": "storage",
    "make_storage": "storage",
    "make_trials_dir": "storage",
    "open_study": "storage",
    "redact_url": "storage",
    "without_secrets": "storage",
    "CLAIM_SETTLE_SECONDS": "workers",
    "_process_alive": "workers",
    "beyond_target": "workers",
    "claim_once": "workers",
    "fail_interrupted_trials": "workers",
    "worker_id": "workers",
}

__all__ = sorted(name for name in _MODULE_OF if not name.startswith("_"))


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'autotune.study' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"autotune.study.{module}"), name)
    globals()[name] = value
    return value
