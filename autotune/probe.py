"""Run one probe training in a child process, with a timeout, and bring back its result.

Whatever happens in the child (out of memory, NaN, a segfault, a hang) comes back as a
ProbeResult with a status and a reason; the study never crashes because a recipe did.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

from autotune.probe_ranks import RankProcesses, launch_ranks, log_tail, merged_result
from autotune.probe_stop import RUNNING_PROBES, STOP_POLL_SECONDS, STOP_PROBES, ProbeStopped
from autotune.training.child import PARENT_ENV, STARTED_ENV
from autotune.training.io import ProbeRequest, ProbeResult
from autotune.training.zygote import READY


def _wait_unless_stopped(
    process: ColdProcess | ForkedProcess | RankProcesses, timeout_seconds: float
) -> bool:
    """process.wait(timeout_seconds), raising ProbeStopped as soon as STOP_PROBES is set."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        if STOP_PROBES.is_set():
            raise ProbeStopped
        left_seconds = deadline - time.monotonic()
        if process.wait(max(0.0, min(left_seconds, STOP_POLL_SECONDS))):
            return True
        if left_seconds <= STOP_POLL_SECONDS:
            return False


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


def _steps_logged(log_path: Path) -> int:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    return sum(1 for line in text.splitlines() if line.startswith("step "))


class ColdProcess:
    """A probe started as a new interpreter: `python -m autotune.training.child`."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process

    def wait(self, timeout_seconds: float) -> bool:
        try:
            self.process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            return False
        return True

    def exit_code(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        _kill_group(self.process.pid)
        self.process.wait()


class ForkedProcess:
    """A probe forked by the probe server; it ends when the server writes its exit file."""

    def __init__(self, pid: int, exit_path: Path, server: ProbeServer) -> None:
        self.pid = pid
        self.exit_path = exit_path
        self.server = server
        self.server_process = server.process

    def wait(self, timeout_seconds: float) -> bool:
        deadline = time.monotonic() + timeout_seconds
        pause = 0.01
        while not self.exit_path.exists():
            if not self.server.alive():
                return True  # its children stop with it
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.2)
        return True

    def exit_code(self) -> int | None:
        """Its exit status; where the server died before writing it, the server's (the
        probe ended with it)."""
        try:
            return int(self.exit_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return self.server_process.poll() if self.server_process else None

    def kill(self) -> None:
        _kill_group(self.pid)
        self.wait(10)


class ProbeServer:
    """Client of `python -m autotune.training.zygote`, which forks probes with warm imports.

    Started on first use; if it cannot start or refuses (a library initialised CUDA while
    loading), probes start cold instead and nothing else changes.
    """

    START_TIMEOUT_SECONDS = 300.0
    ANSWER_TIMEOUT_SECONDS = 30.0

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.unavailable = ""
        self.lock = threading.Lock()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _read(self, timeout_seconds: float) -> dict | None:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_seconds)
        line = self.process.stdout.readline() if ready else ""
        return json.loads(line) if line.strip() else None

    def _start(self) -> bool:
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        env[PARENT_ENV] = str(os.getpid())
        self.process = subprocess.Popen(
            [sys.executable, "-m", "autotune.training.zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
            start_new_session=True,
        )
        answer = self._read(self.START_TIMEOUT_SECONDS)
        if not answer or READY not in answer:
            self.unavailable = (answer or {}).get("refused", "the probe server did not start")
            self.close()
            return False
        return True

    def fork(self, order: dict[str, object], exit_path: Path) -> ForkedProcess | None:
        """A probe forked from the warm server, or None to start it cold."""
        with self.lock:
            if self.unavailable:
                return None
            if not self.alive() and not self._start():
                return None
            try:
                assert self.process is not None and self.process.stdin is not None
                self.process.stdin.write(json.dumps(order) + "\n")
                self.process.stdin.flush()
                answer = self._read(self.ANSWER_TIMEOUT_SECONDS)
            except (OSError, ValueError):
                answer = None
            if not answer or "pid" not in answer:
                self.close()  # started again for the next probe
                return None
            return ForkedProcess(int(answer["pid"]), exit_path, self)

    def close(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        try:
            if process.stdin is not None:
                process.stdin.close()  # the server exits at end of input
            process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            _kill_group(process.pid)
            process.wait()


def warm_probes_wanted() -> bool:
    """Fork probes from a warm server unless AUTOTUNE_WARM_PROBES=0."""
    return os.environ.get("AUTOTUNE_WARM_PROBES", "1") != "0"


class SubprocessProbeRunner:
    """Runs each probe in a process of its own, in its own process group.

    With `warm` (the default) probes are forked from a server that has imported torch and
    transformers once (autotune.training.zygote); otherwise each starts a new interpreter.
    """

    def __init__(
        self, timeout_seconds: float, warm: bool | None = None, timed_steps: int | None = None
    ) -> None:
        self.timeout_seconds = timeout_seconds
        self.timed_steps = timed_steps
        """The steps `timeout_seconds` is for; a probe of more steps (a confirmation, a
        promoted probe) gets a timeout in proportion. None: the same timeout for every probe."""
        self.server = ProbeServer() if (warm_probes_wanted() if warm is None else warm) else None
        if self.server is not None:
            atexit.register(self.server.close)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def _launch(
        self, request: ProbeRequest, request_path: Path, result_path: Path, log_path: Path
    ) -> ColdProcess | ForkedProcess:
        env = child_environment(request)
        if self.server is not None:
            exit_path = log_path.with_name("exit_code")
            exit_path.unlink(missing_ok=True)
            order: dict[str, object] = {
                "request": str(request_path),
                "result": str(result_path),
                "log": str(log_path),
                "exit": str(exit_path),
                "env": env,
            }
            forked = self.server.fork(order, exit_path)
            if forked is not None:
                return forked
        with log_path.open("w", encoding="utf-8") as log:
            return ColdProcess(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "autotune.training.child",
                        str(request_path),
                        str(result_path),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            )

    def timeout_for(self, request: ProbeRequest) -> float:
        """Seconds `request` may take: the timeout, scaled up for a probe of more steps."""
        if not self.timed_steps or request.steps <= self.timed_steps:
            return self.timeout_seconds
        return self.timeout_seconds * request.steps / self.timed_steps

    def run(self, request: ProbeRequest, workdir: Path) -> ProbeResult:
        workdir = workdir.resolve()
        timeout_seconds = self.timeout_for(request)
        workdir.mkdir(parents=True, exist_ok=True)
        request_path = workdir / "request.json"
        result_path = workdir / "result.json"
        log_path = workdir / "probe.log"
        result_path.unlink(missing_ok=True)
        request_path.write_text(request.to_json(), encoding="utf-8")
        with RUNNING_PROBES.one():
            if STOP_PROBES.is_set():
                raise ProbeStopped  # a worker that took a trial after Ctrl-C: start no probe
            return self._run(request, request_path, result_path, log_path, timeout_seconds)

    def _run(
        self,
        request: ProbeRequest,
        request_path: Path,
        result_path: Path,
        log_path: Path,
        timeout_seconds: float,
    ) -> ProbeResult:
        started = time.perf_counter()
        process: ColdProcess | ForkedProcess | RankProcesses
        if request.recipe.num_gpus > 1:
            process = launch_ranks(
                request, request_path, result_path, log_path, child_environment(request)
            )
        else:
            process = self._launch(request, request_path, result_path, log_path)
        try:
            if not _wait_unless_stopped(process, timeout_seconds):
                process.kill()
                return ProbeResult(
                    status="timeout",
                    device=request.device,
                    reason=f"no result within {timeout_seconds:g} s",
                    steps_done=_steps_logged(log_path),
                    seconds={"total": time.perf_counter() - started},
                )
        finally:
            # Also on Ctrl-C (ProbeStopped included) or kill of the parent's Python: no orphan
            # keeps the GPU.
            if process.exit_code() is None:
                process.kill()
        if not result_path.exists() and process.exit_code() in TERMINATED_EXIT_CODES:
            raise ProbeStopped  # its trial is interrupted and queued again, not a crash
        if isinstance(process, RankProcesses):
            result = merged_result(process)
            result.device = request.device
            result.steps_done = result.steps_done or _steps_logged(log_path)
            result.seconds["total"] = time.perf_counter() - started
            return result
        if not result_path.exists():
            return ProbeResult(
                status="crash",
                device=request.device,
                reason=f"probe exited with code {process.exit_code()} without a result: "
                f"{log_tail(log_path)}",
                steps_done=_steps_logged(log_path),
                seconds={"total": time.perf_counter() - started},
            )
        result = ProbeResult.from_json(result_path.read_text(encoding="utf-8"))
        result.seconds["total"] = time.perf_counter() - started
        return result


TERMINATED_EXIT_CODES = {-signal.SIGTERM, -signal.SIGHUP, -signal.SIGINT}
"""A probe (or the server that forked it) ended by a termination signal the run did not send
(it kills with SIGKILL): a service manager or batch system stopping every process of the run at
once, the probe's first. Not the recipe's doing."""


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
