"""Several runs on one study: which worker a trial belongs to, trials of dead workers, the
target met exactly, one-time jobs claimed once.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from autotune.study.records import CLAIM_PREFIX, finished_trial_count


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_interrupted_trials(study: Any) -> list[int]:
    """Fail the RUNNING trials whose worker is gone, and enqueue each once more.

    A worker on this host that no longer exists (killed, rebooted) is known dead at once; trials
    of other hosts are left to the storage's heartbeat, which fails them once stale.
    """
    import copy

    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    storage = study._storage
    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
        dead = (worker_host == host and pid.isdigit() and not _process_alive(int(pid))) or (
            not worker and time.time() - started > storage.STALE_AFTER_SECONDS
        )
        if not dead:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "status", "interrupted")
            storage.set_trial_user_attr(trial._trial_id, "reason", f"worker {worker or '?'} died")
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker finished or failed it meanwhile
        failed.append(trial.number)
        retry = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
        if retry is not None:
            retry(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return failed


def beyond_target(study: Any, number: int, target: int) -> bool:
    """Whether trial `number`, just started, would make the study hold more than `target`
    trials: the finished ones and those running that started before it already reach it. Of
    two runs that start the last trial at once, the later-numbered one yields."""
    from optuna.trial import TrialState

    ahead = sum(
        1
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.number < number
    )
    return finished_trial_count(study) + ahead >= target
CLAIM_SETTLE_SECONDS = 1.0
"""How long a claim is left before it is read back: longer than the gap between another
run's reading that nothing is claimed and its writing its own claim."""


def claim_once(study: Any, job: str, settle_seconds: float | None = None) -> bool:
    """Whether this process takes the one-time `job` of the study (a confirmation, the noise
    probe), claimed through the storage so that two runs on one study never both do it. A
    claim stands unless its run, on this host, is gone; the last writer of concurrent claims
    wins, and each reads the claim back after `settle_seconds`."""
    attr = CLAIM_PREFIX + job
    me = worker_id()
    holder = study.user_attrs.get(attr)
    if holder == me:
        return True
    if holder is not None:
        host, _, pid = str(holder).rpartition(":")
        if host != socket.gethostname() or not pid.isdigit() or _process_alive(int(pid)):
            return False
    study.set_user_attr(attr, me)
    time.sleep(CLAIM_SETTLE_SECONDS if settle_seconds is None else settle_seconds)
    return study.user_attrs.get(attr) == me
