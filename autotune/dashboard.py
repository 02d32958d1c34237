"""`autotune dashboard`: optuna-dashboard on a study storage, with each trial's artifacts.

Objective names, constraints in the format optuna-dashboard 0.21 reads, and the recipe/log
artifacts are written by the study as it runs; this module only serves them.
"""

from __future__ import annotations

import ipaddress
import socket

from autotune.errors import UsageError
from autotune.study.storage import artifact_store, existing_storage_url, make_storage
from autotune.study.storage_urls import redact_url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except (OSError, ValueError):
            return False


def address(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets as URLs write it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serve(storage_url: str | None, host: str, port: int) -> None:
    """Block serving the dashboard until interrupted."""
    from optuna_dashboard import run_server

    url = existing_storage_url(storage_url)
    if not 0 < port < 65536:
        raise UsageError(f"--port {port} is not a TCP port")
    storage = make_storage(url)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UsageError(f"cannot listen on {address(host, port)}: {error.strerror}") from None
    print(f"dashboard for {redact_url(url)} at http://{address(host, port)}/dashboard", flush=True)
    run_server(storage, host=host, port=port, artifact_store=artifact_store())
