"""Several runs on one study: which worker a trial belongs to, trials of dead workers, the
target met exactly, one-time jobs claimed once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from autotune.study import storage as study_storage
from autotune.study.claims import Claim, claim_of, claim_study_name, record_claim, unsaid_since
from autotune.study.records import (
    TrialStatus,
    finished_trial_count,
    gone_from_this_host,
    record_status,
    trial_record,
    worker_id,
)


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
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial_record(trial).worker
        started = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
        dead = gone_from_this_host(worker) or (
            not worker and time.time() - started > study_storage.STALE_AFTER_SECONDS
        )
        if not dead:
            continue
        try:
            record_status(
                trial, TrialStatus.INTERRUPTED, f"worker {worker or '?'} died", storage=storage
            )
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker finished or failed it meanwhile
        failed.append(trial.number)
        retry = getattr(storage, "get_heartbeat_stale_trial_callback", lambda: None)()
        if retry is not None:
            retry(study, copy.deepcopy(storage.get_trial(trial._trial_id)))
    return failed


def requeue_stopped_trial(trial: Any, reason: str = "stopped by Ctrl-C") -> None:
    """A trial this process stopped (Ctrl-C, a file it could not write): recorded as
    interrupted and queued once more (however often it was stopped before), so that a resumed
    run measures it and the study's count of finished trials takes its retry in its place."""
    import optuna

    record_status(trial, TrialStatus.INTERRUPTED, reason)
    study = trial.study
    optuna.storages.RetryHeartbeatStaleTrialCallback()(
        study, study._storage.get_trial(trial._trial_id)
    )


TARGET_POLL_SECONDS = 5.0
"""How often a trial that may be one too many looks again at the trials running ahead of it."""


def beyond_target(
    study: Any, number: int, target: int, running_here: set[int] | None = None
) -> bool:
    """Whether trial `number`, just started, would make the study hold more than `target`
    trials. While the finished trials and those running ahead of it (started before it, by
    this or another run) reach the target, it waits for those to end: when one fails (its
    worker died, here at once, elsewhere once its heartbeat is stale) this trial runs in its
    place; when they finish, it is one too many. A trial of this very process that none of
    its threads runs (`running_here` says which do) will never end, and is not waited for."""
    from optuna.trial import TrialState

    me = worker_id()
    while True:
        finished = finished_trial_count(study)
        if finished >= target:
            return True
        ahead = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.number < number
            and not (
                running_here is not None
                and trial_record(t).worker == me
                and t.number not in running_here
            )
        ]
        if finished + len(ahead) < target:
            return False
        time.sleep(TARGET_POLL_SECONDS)
        fail_interrupted_trials(study)


CLAIM_STALE_SECONDS = 2 * 3600.0
"""A claim this old is free whoever made it: its job (one probe) has long ended or died."""

CLAIM_UNSAID_SECONDS = 60.0
"""A claim whose holder is unsaid this long after a run first found it so is free: its creator
says who it is right after creating it, so it died in between."""


def claim_once(study: Any, job: str, done: Callable[[], bool] | None = None) -> bool:
    """Whether this process takes the one-time `job` of the study (a confirmation, the noise
    probe), so that two runs on one study never both do it. The claim is the creation of a
    study named after the job (claims.CLAIM_SEPARATOR), which the storage lets exactly
    one run do. A claim stands unless its run, on this host, is gone, or it is older than
    CLAIM_STALE_SECONDS, or it still says no holder CLAIM_UNSAID_SECONDS after a run first
    found it so (its creator died before saying who it is); then the job's next claim (its
    generation + 1) is free, and again exactly one run creates it. The holder records the
    job's result, then releases the claim (release_claim), so a run that claims after it finds
    the result through `done`, read again once the claim is taken."""
    import optuna

    storage = study._storage
    me = Claim(worker_id(), time.time())
    generation = 0
    while True:
        name = claim_study_name(study.study_name, job, generation)
        try:
            claim_id = storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], name)
        except optuna.exceptions.DuplicatedStudyError:
            pass
        else:
            record_claim(storage, claim_id, me)
            if _taken_over(storage, study.study_name, job, generation):
                generation += 1  # too slow to say who it is: another run took it over
                continue
            if done is not None and done():  # its last holder finished it and let it go
                release_claim(study, job)
                return False
            return True
        if _taken_over(storage, study.study_name, job, generation):
            generation += 1  # the later generation is the one that counts
            continue
        try:
            claim_id = storage.get_study_id_from_name(name)
            holder = claim_of(storage, claim_id)
            if holder is None:  # its creator is about to say who it is, or died in between
                if me.at - unsaid_since(storage, claim_id, me.at) < CLAIM_UNSAID_SECONDS:
                    return False
                generation += 1
                continue
        except KeyError:  # released by its holder since: this generation is free again
            continue
        if holder.worker == me.worker:
            return True
        fresh = me.at - float(holder.at) < CLAIM_STALE_SECONDS
        if fresh and not gone_from_this_host(str(holder.worker)):
            return False
        generation += 1


def _taken_over(storage: Any, study_name: str, job: str, generation: int) -> bool:
    """Whether the job's claim of the next generation exists: this one's was taken over."""
    try:
        storage.get_study_id_from_name(claim_study_name(study_name, job, generation + 1))
    except KeyError:
        return False
    return True


def release_claim(study: Any, job: str) -> None:
    """Delete the claims of `job` (every generation), once its holder has recorded its result:
    the storage keeps no claim of an ended job (the dashboard lists every study)."""
    storage = study._storage
    generation = 0
    while True:
        name = claim_study_name(study.study_name, job, generation)
        try:
            storage.delete_study(storage.get_study_id_from_name(name))
        except KeyError:
            if generation > 0:
                return  # generation 0 may be gone already: a later one is what was held
        generation += 1
