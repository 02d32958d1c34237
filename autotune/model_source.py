"""Where a model comes from: a local directory (with the weights a run or train loads, whole) or a
hub id that is in the Hugging Face cache or whose hub can be reached, each refused in one line
before anything loads.
"""

from __future__ import annotations

from pathlib import Path

from autotune.errors import UsageError, first_line
from autotune.safetensors_frame import check_shards_present, safetensors_problem


def is_local_model(model: str) -> bool:
    return Path(model).expanduser().exists()


def check_model_reference(model: str) -> None:
    """A local path must exist; anything else must look like a hub id ("org/name")."""
    if not model.strip():  # Path("") is the current directory, which exists
        raise UsageError(f"model {model!r} names nothing; give a model directory or a hub id")
    if is_local_model(model):
        return
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or not model
    if looks_like_path:
        raise UsageError(f"model path {model!r} does not exist")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError as error:
        raise UsageError(
            f"model {model!r} is neither an existing directory nor a hub id: {first_line(error)}"
        ) from None
    check_hub_reachable(model)


WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin")
"""Files one of which a local model that trains must hold: the weight files transformers' PyTorch
models load (model.safetensors, pytorch_model.bin, or their shards); TensorFlow's and Flax's
(.h5, .msgpack) are not."""


def check_local_weights(model: str) -> None:
    """A local model directory that a run or train is to load must hold weights; `estimate`
    needs its config alone. Refused before the study, not by every probe's crash."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return  # a hub id: the files are fetched (or found missing) by the probes
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_FILE_PATTERNS):
        raise UsageError(
            f"model directory {path} has no weights (model.safetensors, pytorch_model.bin or "
            "their shards); run and train load them, only `autotune estimate` needs just "
            "config.json"
        )
    for index in path.glob("*.safetensors.index.json"):
        check_shards_present(index)
    for weights in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise UsageError(
                f"{weights} is not a whole safetensors file ({problem}); download or save the "
                "model again"
            )


HUB_CONNECT_TIMEOUT_SECONDS = 5.0
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
"""Where one is set (either case), the hub is reached through a proxy: not checked directly."""
_HUB_REACHABLE: dict[str, str] = {}


def check_hub_reachable(model: str) -> None:
    """Fail fast, in one line, when a hub id can neither be fetched nor read from the local
    cache: without this the hub client retries for half a minute over a dozen log lines."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    if any(os.environ.get(name) or os.environ.get(name.lower()) for name in PROXY_VARIABLES):
        return  # the hub client goes through the proxy; a direct connection proves nothing
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return
    endpoint = constants.ENDPOINT
    if endpoint not in _HUB_REACHABLE:
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection(
                (parts.hostname or "", port), timeout=HUB_CONNECT_TIMEOUT_SECONDS
            ).close()
            _HUB_REACHABLE[endpoint] = ""
        except OSError as error:
            _HUB_REACHABLE[endpoint] = str(error) or type(error).__name__
    if _HUB_REACHABLE[endpoint]:
        raise UsageError(
            f"model {model!r} is not a local directory nor in the Hugging Face cache, and the "
            f"hub ({endpoint}) cannot be reached: {_HUB_REACHABLE[endpoint]}"
        )
