"""Claims of a study's one-time jobs (workers.claim_once): which run took one, held in a study of
its own in the same storage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from autotune.study.study_records import from_stored

CLAIM_SEPARATOR = "#claim:"
"""A one-time job of study S (see workers.claim_once) is claimed by creating the Optuna study
`S#claim:JOB` in the same storage: study names are unique in every Optuna storage, so of two
runs creating it at once exactly one succeeds. Its user attribute `claim` says who holds it;
while that is unsaid, `unsaid_since` says when a run first found it so (the storage keeps no
study's creation time)."""


@dataclass(frozen=True)
class Claim:
    """Which run took a one-time job of the study, and when."""

    worker: str = ""
    """records.worker_id() of the run: host:pid."""
    at: float = 0.0
    """Epoch seconds."""


def claim_study_name(study_name: str, job: str, generation: int = 0) -> str:
    """A claim's study; a claim whose run died is followed by the next generation's."""
    name = f"{study_name}{CLAIM_SEPARATOR}{job}"
    return f"{name}#{generation}" if generation else name


def is_claim_study(study_name: str) -> bool:
    """Whether a study of the storage only records a claim (listings leave it out)."""
    return CLAIM_SEPARATOR in study_name


def claim_of(storage: Any, claim_study_id: int) -> Claim | None:
    """None while the claim's creator has not yet said who it is."""
    holder = storage.get_study_user_attrs(claim_study_id).get("claim")
    return from_stored(Claim, holder) if isinstance(holder, dict) else None


def record_claim(storage: Any, claim_study_id: int, claim: Claim) -> None:
    storage.set_study_user_attr(claim_study_id, "claim", dataclasses.asdict(claim))


def unsaid_since(storage: Any, claim_study_id: int, now: float) -> float:
    """When a run first found the claim with no holder: `now`, recorded, if none did before.
    Raises KeyError if the claim was deleted (released) meanwhile."""
    seen = storage.get_study_user_attrs(claim_study_id).get("unsaid_since")
    if isinstance(seen, (int, float)):
        return float(seen)
    storage.set_study_user_attr(claim_study_id, "unsaid_since", now)
    return now
