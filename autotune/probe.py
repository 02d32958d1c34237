"""Run one probe training in a child process, with a timeout, and bring back its result.

Whatever happens in the child (out of memory, NaN, a segfault, a hang) comes back as a
ProbeResult with a status and a reason; the study never crashes because a recipe did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from autotune.training.child import PARENT_ENV, STARTED_ENV
from autotune.training.io import ProbeRequest, ProbeResult

LOG_TAIL_CHARS = 400


class ProbeRunner(Protocol):
    def run(self, request: ProbeRequest, workdir: Path) -> ProbeResult:
        """Probe `request`, keeping its request, result and log files in `workdir`."""
        ...


def child_environment(request: ProbeRequest) -> dict[str, str]:
    env = dict(os.environ)
    env[STARTED_ENV] = repr(time.time())
    env[PARENT_ENV] = str(os.getpid())
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if request.visible_gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = request.visible_gpu
    if request.recipe.expandable_segments:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    return env


def _log_tail(log_path: Path) -> str:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-LOG_TAIL_CHARS:] if lines else ""


def _steps_logged(log_path: Path) -> int:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if line.startswith("step "))


class SubprocessProbeRunner:
    """Runs `python -m autotune.training.child` in its own process group."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds

    def run(self, request: ProbeRequest, workdir: Path) -> ProbeResult:
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        request_path = workdir / "request.json"
        result_path = workdir / "result.json"
        log_path = workdir / "probe.log"
        result_path.unlink(missing_ok=True)
        request_path.write_text(request.to_json(), encoding="utf-8")
        started = time.perf_counter()
        with log_path.open("w", encoding="utf-8") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "autotune.training.child",
                    str(request_path),
                    str(result_path),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_environment(request),
                start_new_session=True,
            )
            try:
                process.wait(timeout=self.timeout_seconds)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                return ProbeResult(
                    status="timeout",
                    device=request.device,
                    reason=f"no result within {self.timeout_seconds:g} s",
                    steps_done=_steps_logged(log_path),
                    seconds={"total": time.perf_counter() - started},
                )
            finally:
                # Also on Ctrl-C or kill of the parent's Python: no orphan keeps the GPU.
                if process.poll() is None:
                    _kill_group(process)
        if not result_path.exists():
            return ProbeResult(
                status="crash",
                device=request.device,
                reason=f"probe exited with code {process.returncode} without a result: "
                f"{_log_tail(log_path)}",
                steps_done=_steps_logged(log_path),
                seconds={"total": time.perf_counter() - started},
            )
        result = ProbeResult.from_json(result_path.read_text(encoding="utf-8"))
        result.seconds["total"] = time.perf_counter() - started
        return result


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
