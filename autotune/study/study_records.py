"""What a study stores about itself, beside its trials: the run that set it up, its data, the
confirmations of its frontier and its noise figure. Each has one writer and one reader here, and
no other module spells their attribute keys. (What a trial stores is in records; the choices a
study searches, in searched_choices.)
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

from autotune.units import format_bytes

_Record = TypeVar("_Record")

CONFIRM_SPEED_TOLERANCE = 0.15
"""A confirmed recipe's tokens/s may fall this much (relative) below its first probe's; faster
by more says the speed varies by more than this on the machine, which is no miss."""


def from_stored(cls: type[_Record], stored: dict[str, Any]) -> _Record:
    """A record from the dict a study stored: keys it does not know are left out, so a study
    written by another version still reads."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{key: value for key, value in stored.items() if key in known})


@dataclass(frozen=True)
class StudySetup:
    """The settings a study was started with, each stored as a study attribute of its name."""

    model: str = ""
    data_path: str = ""
    budget_bytes: int = 0
    """Read back (study_setup): the budget now, the latest of the study's budget history."""
    seq_len: int | None = None
    probe_steps: int | None = None
    device: str = ""
    space: str = ""
    """The space file's path."""
    seed: int | None = None
    vocab_size: int | None = None
    num_layers: int | None = None
    tie_word_embeddings: bool | None = None
    """Whether the output head is the input embedding (None: a study from before this record):
    a freeze recipe trains an untied head, which LLaMA-Factory's export must name."""
    freeze_layout: dict[str, Any] | None = None
    """Where the model keeps what a freeze recipe trains, by name (FreezeLayout.to_dict; None:
    a study from before this record, or a model without decoder blocks where autotune looks):
    the exports' freeze patterns name the model's own modules."""
    measured_under: dict[str, Any] = field(default_factory=dict)
    """What makes two trials' figures comparable (see run.measured_under); for a study from
    before this record, the seq_len and probe_steps it stored."""


MEASURED_UNDER_ATTR = "measured_under"


BUDGET_ATTR = "budget_bytes"
"""The setup's budget; once a run changes the budget, the latest change's (what a version from
before the budget history reads as the study's budget)."""
BUDGETS_ATTR = "budgets"
"""[[first_trial_number, budget_bytes], ...]: the budget history whole under one key, as versions
from before BUDGET_CHANGE_PREFIX stored and read it. Read as the history's start; each change
still writes it (as its run read it, with its change: of two at once, the later write wins)."""
BUDGET_CHANGE_PREFIX = "budget_change:"
"""Study attribute `budget_change:<written at, ns>:<random>`: [first_trial_number, budget_bytes,
written at (ns since the epoch)], one run's change of the budget under a key of its own, so two
runs changing it at once on one storage each keep theirs (one key read, changed and written
back loses one). Until a run changes it, the setup's budget_bytes is the only budget."""


TARGET_TRIALS_ATTR = "target_trials"
"""The --trials of the study's latest run: the finished trials it runs until."""


def record_target_trials(study: Any, trials: int) -> None:
    """Every run: a resume with another --trials moves the target."""
    study.set_user_attr(TARGET_TRIALS_ATTR, trials)


def target_trials(study: Any) -> int | None:
    """None for a study from before the target was stored."""
    return stored_count(study, TARGET_TRIALS_ATTR)


def stored_count(study: Any, key: str) -> int | None:
    """A study attribute that holds a count, None where it holds none."""
    stored = study.user_attrs.get(key)
    return stored if isinstance(stored, int) and not isinstance(stored, bool) else None


def record_setup(study: Any, setup: StudySetup) -> None:
    for name, value in dataclasses.asdict(setup).items():
        study.set_user_attr(name, value)


@dataclass(frozen=True)
class StudyBudgets:
    """Which budget held which trials: (first trial number, budget bytes), oldest first."""

    spans: tuple[tuple[int, int], ...]

    @property
    def current_bytes(self) -> int:
        """The study's budget now: the frontier, picks and export hold every trial to it."""
        return self.spans[-1][1]

    def held_to(self, number: int) -> int:
        """The budget trial `number` was held to when it ran."""
        held = self.spans[0][1]
        for first, budget in self.spans:
            if first <= number:
                held = budget
        return held


def study_budgets(study: Any) -> StudyBudgets:
    """The history from its start (the setup's budget, or a study's history from before
    BUDGET_CHANGE_PREFIX), then each run's change in the order they were written: a change
    from trial N on replaces what held trials N and later."""
    return _budgets_in(study.user_attrs)


def _budgets_in(attrs: dict[str, Any]) -> StudyBudgets:
    stored = attrs.get(BUDGETS_ATTR)
    spans = (
        [(int(first), int(budget)) for first, budget in stored]
        if stored
        else [(0, int(attrs.get(BUDGET_ATTR) or 0))]
    )
    changes = sorted(  # [first, budget, written at] each: in the order written
        (int(value[2]), key, int(value[0]), int(value[1]))
        for key, value in attrs.items()
        if key.startswith(BUDGET_CHANGE_PREFIX)
    )
    for _, _, first, budget in changes:
        spans = [span for span in spans if span[0] < first] + [(first, budget)]
    return StudyBudgets(tuple(spans))


_last_change_ns = 0


def record_new_budget(study: Any, budget_bytes: int, first_trial_number: int) -> None:
    """The study's budget becomes `budget_bytes` from trial `first_trial_number` on (a run
    resumed under another --budget): a key of its own, the history's source of truth; then
    BUDGETS_ATTR and BUDGET_ATTR, which older versions read, as this run reads the history with
    its change (a start that holds changes already reads back as the changes give it)."""
    global _last_change_ns
    # later than this process's previous change even where the clock reads the same
    _last_change_ns = max(time.time_ns(), _last_change_ns + 1)
    key = f"{BUDGET_CHANGE_PREFIX}{_last_change_ns}:{secrets.token_hex(4)}"
    change = [first_trial_number, budget_bytes, _last_change_ns]
    study.set_user_attr(key, change)
    history = _budgets_in({**study.user_attrs, key: change})
    study.set_user_attr(BUDGETS_ATTR, [list(span) for span in history.spans])
    study.set_user_attr(BUDGET_ATTR, history.current_bytes)


def study_setup(study: Any) -> StudySetup:
    attrs = study.user_attrs
    # the budget now: the history's latest (the setup's own attribute is the budget it started
    # with until a run changes it, then the latest change as the run that wrote it last read it)
    setup = dataclasses.replace(
        from_stored(StudySetup, attrs), budget_bytes=_budgets_in(attrs).current_bytes
    )
    if MEASURED_UNDER_ATTR not in attrs:
        # Studies from before the record compared only what they stored of these.
        earlier = {k: attrs[k] for k in ("seq_len", "probe_steps") if k in attrs}
        setup = dataclasses.replace(setup, measured_under=earlier)
    return setup


DATA_STATS_ATTR = "data_stats"
FORMATS_KEY = "formats"
"""In the data stats: usable rows per format (data.rows.DataScan.formats)."""
FIRST_FORMAT_KEY = "first_row_format"
"""In the data stats: the first usable row's format."""


def record_data_stats(study: Any, stats: dict[str, Any]) -> None:
    """The data's rows, formats, token lengths and what truncation cut (data.data_stats),
    every run."""
    study.set_user_attr(DATA_STATS_ATTR, stats)


def data_stats(study: Any) -> dict[str, Any]:
    return dict(study.user_attrs.get(DATA_STATS_ATTR) or {})


def stored_data_formats(study: Any) -> tuple[str | None, dict[str, int]] | None:
    """The first usable row's format and the rows per format, as the run's data preparation
    found them (None: a study from before they were stored)."""
    stats = data_stats(study)
    if FORMATS_KEY not in stats:
        return None
    return stats.get(FIRST_FORMAT_KEY), dict(stats[FORMATS_KEY] or {})


@dataclass(frozen=True)
class Confirmation:
    """A frontier recipe probed again with twice the steps and another seed."""

    status: str
    """The probe's status: ok, oom, nan, timeout or crash."""
    reason: str
    steps: int
    seed: int
    peak_memory_bytes: int | None
    tokens_per_second: float | None
    eval_loss: float | None
    speed_change: float
    """Tokens/s relative to the first probe, minus one (-1.0 where that measured none)."""
    held_up: bool
    """Finished, within the budget and not slower than the first probe by more than the speed
    tolerance (holds_up)."""
    over_budget: bool | None = None
    """It finished with its peak over the study's budget (measured on CUDA only); None in a
    study from before this field, where a miss that is not the speed's is the peak's."""
    in_place_of: int | None = None
    """The trial whose confirmation took it off the frontier, whose pick (`pick`) chose this
    recipe next: confirmed in its place, beyond --confirm. None for one of the top --confirm."""
    pick: str = ""

    def ran_faster(self) -> bool:
        """It finished faster than the first probe by more than the speed tolerance: the speed
        varies by more than that here (on a CPU it always does), and the first probe's figure,
        which the picks and the export rest on, is not overstated. It holds up."""
        return self.status == "ok" and self.speed_change > CONFIRM_SPEED_TOLERANCE

    def peak_over_budget(self) -> bool:
        if self.status != "ok" or self.held_up:
            return False
        if self.over_budget is not None:
            return self.over_budget
        return abs(self.speed_change) <= CONFIRM_SPEED_TOLERANCE

    def removal(self) -> str | None:
        """Why the recipe leaves the frontier, or None where it stays: the longer probe ran out
        of memory, went over the budget or hit a non-finite loss, which training it would meet
        too. A speed off the first probe is chance (on a CPU it always is), and a timeout or a
        crash says nothing sure about the recipe: neither removes it."""
        if self.status == "oom":
            return f"its confirmation ran out of memory ({self.reason})"
        if self.status == "nan":
            return f"its confirmation had a non-finite loss ({self.reason})"
        if self.peak_over_budget():
            return (
                f"its confirmation peaked at {format_bytes(self.peak_memory_bytes or 0)}, "
                "over the budget"
            )
        return None

    def words(self) -> str:
        """The verdict and what it rests on, for people."""
        if self.status != "ok":
            return f"did not hold up: {self.status}: {self.reason}"
        tokens = f"{self.tokens_per_second or 0:,.0f} tok/s"
        speed = f"{tokens}, {self.speed_change:+.0%} off the first probe"
        if self.held_up and self.ran_faster():
            return (
                f"held up: {tokens}, {self.speed_change:.0%} faster than the first probe (its "
                f"speed varies by more than ±{CONFIRM_SPEED_TOLERANCE:.0%} here)"
            )
        if self.held_up:
            return f"held up: {speed}"
        if self.peak_over_budget():
            return f"did not hold up: {speed}, but its peak went over the budget"
        return f"did not hold up: {speed} (it holds down to {-CONFIRM_SPEED_TOLERANCE:.0%})"


def holds_up(finished: bool, fits: bool, speed_change: float) -> bool:
    """The confirmation's verdict (Confirmation.held_up): it finished, its peak fits the budget
    and its tokens/s fell no more than the tolerance below the first probe's. Faster by more is
    the speed's noise (Confirmation.ran_faster), not a miss."""
    return finished and fits and speed_change >= -CONFIRM_SPEED_TOLERANCE


def _stored_confirmation(stored: dict[str, Any]) -> Confirmation:
    """A confirmation as a study stored it. Versions before holds_up recorded one that ran
    faster beyond the tolerance as not held up; it held up, unless its peak went over the
    budget (over_budget; a study from before that field took a speed miss for the speed's)."""
    confirmation = from_stored(Confirmation, stored)
    if confirmation.held_up or confirmation.over_budget or not confirmation.ran_faster():
        return confirmation
    return dataclasses.replace(confirmation, held_up=True)


CONFIRMATION_PREFIX = "confirmation:"
"""Study attribute `confirmation:N`: trial N's confirmation. Also the name of its claim."""


def confirmation_job(number: int) -> str:
    """The one-time job (see workers.claim_once) and attribute of trial `number`'s confirmation."""
    return f"{CONFIRMATION_PREFIX}{number}"


def record_confirmation(study: Any, number: int, confirmation: Confirmation) -> None:
    study.set_user_attr(confirmation_job(number), dataclasses.asdict(confirmation))


def confirmations(study: Any) -> dict[int, Confirmation]:
    """Trial number -> what its longer, reseeded re-probe measured and whether it held up."""
    return {
        int(key.removeprefix(CONFIRMATION_PREFIX)): _stored_confirmation(value)
        for key, value in study.user_attrs.items()
        if key.startswith(CONFIRMATION_PREFIX)
    }


def left_frontier(study: Any) -> dict[int, str]:
    """Trial number -> why its confirmation took it off the frontier (Confirmation.removal):
    records.measured_points leaves these trials out, so every reader agrees."""
    removed = {number: c.removal() for number, c in confirmations(study).items()}
    return {number: why for number, why in removed.items() if why}


def confirmed_in_place(study: Any) -> dict[int, str]:
    """Trial number of one that left the frontier -> what the confirmation of the recipe its
    pick chose next found (Confirmation.in_place_of), in words for status and the report to
    put after "in its place, ": "trial 5, which the balanced pick chose next, was confirmed:
    held up: ..."."""
    return {
        c.in_place_of: (
            f"trial {number}, which the {c.pick} pick chose next, was confirmed: {c.words()}"
        )
        for number, c in sorted(confirmations(study).items())
        if c.in_place_of is not None
    }


@dataclass(frozen=True)
class Noise:
    """One measured recipe probed again with the same steps and another seed: how far its
    figures move when only chance changes."""

    trial: int
    seed: int
    steps: int
    eval_loss: float
    eval_loss_difference: float
    """|eval loss now - eval loss first|: a smaller difference between two recipes is chance."""
    tokens_per_second_change: float | None
    peak_memory_change: float | None
    """Relative to the first probe, minus one; None where either measured none."""


NOISE_ATTR = "noise"
NOISE_FAILED_ATTR = "noise_failed"  # the noise probe's status where it did not end ok
"""Study attribute holding the Noise. Also the name of its claim."""


def record_noise(study: Any, noise: Noise) -> None:
    study.set_user_attr(NOISE_ATTR, dataclasses.asdict(noise))


def study_noise(study: Any) -> Noise | None:
    """None until the noise probe has run."""
    stored = study.user_attrs.get(NOISE_ATTR)
    return from_stored(Noise, stored) if stored else None


def noise_probed(study: Any) -> bool:
    """Whether the study's noise probe has run, ended ok (its Noise) or not."""
    return study_noise(study) is not None or NOISE_FAILED_ATTR in study.user_attrs
