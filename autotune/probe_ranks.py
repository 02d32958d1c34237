"""A probe of a distributed recipe: one process per GPU (rank), started together, judged together.
`autotune train` starts a distributed recipe's ranks the same way (training/ranked_train.py).

Every rank is `python -m autotune.training.child` with torch's launcher variables (RANK,
WORLD_SIZE, LOCAL_RANK) and a file rendezvous in the probe's folder, so each joins one real
process group (nccl on CUDA, gloo on the CPU). All ranks share one process group of the OS,
led by rank 0 and apart from the study's, so one signal ends them all; each also dies with the
study process (autotune/lifetime.py). A rank that exits without its result, or with a failure,
fails the whole probe at once: the others are killed rather than left waiting in a collective.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from autotune.training.io import ProbeRequest, ProbeResult

RENDEZVOUS_NAME = "rendezvous"
"""The file torch.distributed's FileStore meets in, inside the probe's folder."""

RANK_POLL_SECONDS = 0.1
LOG_TAIL_CHARS = 400


_WARNING_LINE = re.compile(r"^\S.*:\d+: \w*Warning: ")
"""The first line of what Python's warnings print (file:line: Category: message); the
indented line after it is the source line that warned."""


def log_tail(log_path: Path) -> str:
    """The last line of a log that is not a library's warning, what a one-line failure quotes
    of it."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines: list[str] = []
    warned = False
    for line in text.strip().splitlines():
        if warned and line.startswith(" "):
            continue
        warned = bool(_WARNING_LINE.match(line))
        if line.strip() and not warned:
            lines.append(line)
    return lines[-1][-LOG_TAIL_CHARS:] if lines else ""


def _of_rank(path: Path, rank: int) -> Path:
    """Rank 0's file is `path`; rank r's is named <stem>.rank<r><suffix> beside it."""
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def rank_result_path(result_path: Path, rank: int) -> Path:
    return _of_rank(result_path, rank)


def rank_log_path(log_path: Path, rank: int) -> Path:
    return _of_rank(log_path, rank)


def result_status(path: Path) -> str:
    """The `status` of a rank's result file (a probe's or a training's: "ok" when it went
    well)."""
    return str(json.loads(path.read_text(encoding="utf-8")).get("status"))


OWN_FAILURES = ("oom", "nan", "usage")
"""Written failures that are the rank's own, never a peer's doing."""


class RankProcesses:
    """The ranks of one probe (or one `autotune train` run), in one process group of the OS."""

    def __init__(self, processes: list[subprocess.Popen], result_path: Path) -> None:
        self.processes = processes
        self.result_path = result_path
        self.first_failed: int | None = None
        """The rank whose failure ended the probe (the others were killed after it)."""

    def failed_rank(self) -> int | None:
        """A rank that failed, while others may still run: one that ended without a good
        result, or wrote a failure (it may hang leaving its process group). Where several did
        between two looks, the cause comes first: a failure of the rank's own that it wrote
        (out of memory, NaN, bad input), then a rank that left no result (killed, or died),
        then a written crash, which may follow from a peer's death (a broken connection)."""
        own, silent, crashed = [], [], []
        for rank, process in enumerate(self.processes):
            code = process.poll()
            path = rank_result_path(self.result_path, rank)
            status = result_status(path) if path.exists() else None
            if status in OWN_FAILURES:
                own.append(rank)
            elif code is None:
                if status not in (None, "ok"):
                    crashed.append(rank)
            elif status is None or (status == "ok" and code != 0):
                silent.append(rank)
            elif status != "ok":
                crashed.append(rank)
        return next(iter(own + silent + crashed), None)

    def wait(self, timeout_seconds: float, on_poll: Callable[[], None] | None = None) -> bool:
        """True once every rank ended or one failed; False at the timeout. `on_poll` is called
        between looks (to relay progress)."""
        deadline = time.monotonic() + timeout_seconds
        while any(p.poll() is None for p in self.processes):
            self.first_failed = self.failed_rank()
            if self.first_failed is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            if on_poll is not None:
                on_poll()
            time.sleep(RANK_POLL_SECONDS)
        self.first_failed = self.failed_rank()  # all ended since the last look
        return True

    def failure_order(self) -> list[int]:
        """The ranks, the one whose failure ended the run first (its failure, not the kill of
        the others, is the news)."""
        order = list(range(len(self.processes)))
        if self.first_failed is not None:
            order.remove(self.first_failed)
            order.insert(0, self.first_failed)
        return order

    def silent_reason(self, rank: int, log_path: Path) -> str:
        """Why `rank` left no result: how it ended, and the tail of its log."""
        code, log = self.processes[rank].returncode, rank_log_path(log_path, rank)
        ended = f"rank {rank} of {len(self.processes)}"
        if code and code < 0:  # from outside (a user, the OOM killer): its log did not see why
            return f"{ended} was killed by signal {-code} without a result (its log: {log})"
        return f"{ended} exited with {code} without a result: {log_tail(log)}"

    def exit_code(self) -> int | None:
        codes = [p.poll() for p in self.processes]
        if any(code is None for code in codes):
            return None
        return next((code for code in codes if code), 0)

    def kill(self) -> None:
        try:
            os.killpg(self.processes[0].pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for process in self.processes:
            process.wait()


def launch_ranks(
    request: ProbeRequest, request_path: Path, result_path: Path, log_path: Path, env: dict
) -> RankProcesses:
    """Start the recipe's num_gpus ranks of the probe child, rank 0 leading a new process
    group."""
    return start_ranks(
        "autotune.training.child",
        request.recipe.num_gpus,
        request_path,
        result_path,
        log_path,
        env,
    )


def start_ranks(
    module: str, world: int, request_path: Path, result_path: Path, log_path: Path, env: dict
) -> RankProcesses:
    """Start `world` ranks of `python -m module REQUEST RESULT`, each with its own result and
    log file and the rendezvous beside the result, rank 0 leading a new process group."""
    rendezvous = result_path.with_name(RENDEZVOUS_NAME)
    rendezvous.unlink(missing_ok=True)  # a FileStore left by an earlier run would not meet
    for rank in range(world):
        rank_result_path(result_path, rank).unlink(missing_ok=True)
    processes: list[subprocess.Popen] = []
    for rank in range(world):
        rank_env = {
            **env,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            RENDEZVOUS_ENV: str(rendezvous),
        }
        with rank_log_path(log_path, rank).open("w", encoding="utf-8") as log:
            # a new group led by rank 0 (a group cannot span sessions, so no new session)
            leader = processes[0].pid if processes else 0
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        module,
                        str(request_path),
                        str(rank_result_path(result_path, rank)),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=rank_env,
                    process_group=leader,
                )
            )
    return RankProcesses(processes, result_path)


RENDEZVOUS_ENV = "AUTOTUNE_RENDEZVOUS_FILE"


def merged_result(ranks: RankProcesses) -> ProbeResult:
    """One result of the ranks': the first failure (naming its rank), or the figures of all:
    the peak memory the largest of any rank, tokens/s and trained tokens summed over ranks
    (they step together), host memory summed (the ranks share the host), the losses rank 0's."""
    results: list[ProbeResult] = []
    order = ranks.failure_order()
    for rank in order:
        path = rank_result_path(ranks.result_path, rank)
        if not path.exists():
            log_path = ranks.result_path.with_name("probe.log")
            return ProbeResult(
                status="crash", device="", reason=ranks.silent_reason(rank, log_path)
            )
        result = ProbeResult.from_json(path.read_text(encoding="utf-8"))
        if result.status != "ok":
            result.reason = f"rank {rank} of {len(order)}: {result.reason}"
            return result
        results.append(result)
    merged = results[order.index(0)]
    peaks = [r.peak_memory_bytes for r in results if r.peak_memory_bytes is not None]
    merged.peak_memory_bytes = max(peaks) if peaks else None
    allocated = [r.peak_allocated_bytes for r in results if r.peak_allocated_bytes is not None]
    merged.peak_allocated_bytes = max(allocated) if allocated else None
    merged.tokens_per_second = sum(r.tokens_per_second or 0.0 for r in results)
    merged.trained_tokens = sum(r.trained_tokens for r in results)
    merged.budget_enforced = all(r.budget_enforced for r in results)
    for name in ("host_peak_bytes", "host_rss_growth_bytes"):  # every rank on this machine
        held = [getattr(r, name) for r in results if getattr(r, name) is not None]
        setattr(merged, name, sum(held) if held else None)
    return merged
