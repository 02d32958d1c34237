"""Code a model ships with itself (`auto_map` in its config) runs only when the user says so.

transformers asks on a terminal ("Do you wish to run the custom code? [y/N]") when it is not
told; autotune always tells it: `trust_remote_code` is False unless `--trust-remote-code` was
given, and a model that cannot be built without its own code is refused in one line. The
choice travels to the probes and workers in the environment they inherit.
"""

from __future__ import annotations

import os
from typing import Any

from autotune.errors import UsageError

TRUST_ENV = "AUTOTUNE_TRUST_REMOTE_CODE"
OPTION = "--trust-remote-code"


def allow_remote_code(allowed: bool) -> None:
    """Set the choice for this process and every process it starts."""
    os.environ[TRUST_ENV] = "1" if allowed else "0"


def remote_code_allowed() -> bool:
    return os.environ.get(TRUST_ENV) == "1"


def check_remote_code(config: dict[str, Any], model: str) -> None:
    """Refuse a model whose config needs its own code (an `auto_map` and a model type this
    transformers does not know) unless the user allowed it; with a known type transformers
    builds the model from its own code and the shipped code never runs."""
    if not config.get("auto_map") or remote_code_allowed():
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return
    raise UsageError(
        f"model {model!r} runs code it ships (auto_map in its config), which autotune does not "
        f"run unless you pass {OPTION}; read that code first"
    )
