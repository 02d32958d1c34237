"""`run_study`: run or resume a study until it holds its trials, then confirm."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from autotune.data.token_cache import token_cache_key
from autotune.distributed import cpu_threads_per_process, format_gpu_counts
from autotune.errors import UsageError
from autotune.probe import ProbeRunner
from autotune.probe_stop import probes_stop_on_ctrl_c
from autotune.study.confirm import confirm_frontier, measure_noise
from autotune.study.coverage import (
    SpacePoint,
    record_space_tried,
    space_points,
    space_tried_words,
    space_used_up,
    trials_left,
)
from autotune.study.objective import RunEvents, make_objective
from autotune.study.promotion import promote
from autotune.study.records import (
    ProbeCrashed,
    baseline_attrs,
    finished_trial_count,
    trial_budget,
)
from autotune.study.resumed import held_choices, resumed_space
from autotune.study.searched_choices import SpaceChoices, record_space_choices, space_choices
from autotune.study.seeding import baseline_params, fits_budget
from autotune.study.settings import PreparedRun, tokenizer_for
from autotune.study.storage import open_study
from autotune.study.study_records import (
    StudySetup,
    record_data_stats,
    record_new_budget,
    record_setup,
    record_target_trials,
    study_budgets,
    study_setup,
)
from autotune.study.workers import fail_interrupted_trials
from autotune.units import count_of, format_bytes


def measured_under(prepared: PreparedRun) -> dict[str, Any]:
    """What makes two trials' figures comparable on one frontier: the same data and tokenizer
    (the token cache's key, which also covers seq_len, the split seed and size), the same
    model shape, probe length, kind of device, GPUs per probe and a CPU probe's threads (the
    cores shared among --workers, cpu_threads_per_process). The budget may change: a
    study resumed under another keeps the choices it started with and records which budget
    held which trials (record_run_budget)."""
    spec = json.dumps(dataclasses.asdict(prepared.spec), sort_keys=True, default=str)
    counts = prepared.settings.gpus_per_probe
    return {
        "data": Path(prepared.token_cache).name if prepared.token_cache else None,
        "model": hashlib.sha256(spec.encode()).hexdigest()[:16],
        "seq_len": prepared.settings.seq_len,
        "probe_steps": prepared.settings.probe_steps,
        "device": prepared.device.split(":")[0],
        "quality": prepared.settings.quality,
        # one count as an int, as studies stored it before ranges
        "gpus_per_probe": counts[0] if len(counts) == 1 else format_gpu_counts(counts),
        "cpu_threads": cpu_threads_per_process(prepared.device, prepared.settings.workers, 1),
    }


def _data_key(prepared: PreparedRun, seq_len: int, version: int | None = None) -> str:
    """The run's data key as measured_under records it, at `seq_len` (the key covers it) and
    the token cache's `version` (default: the current one)."""
    settings = prepared.settings
    versioned = {} if version is None else {"version": version}
    key = token_cache_key(
        settings.data_path,
        tokenizer_for(settings.model),
        seq_len,
        settings.seed,
        settings.eval_rows,
        **versioned,
    )
    return f"tokens-{key}"


_MEASURED_UNDER_WORDS = {
    "data": "the data, its tokenizer or its split (seed, --eval-rows)",
    "model": "the model's shape",
    "seq_len": "--seq-len",
    "probe_steps": "--probe-steps",
    "device": "the device",
    "quality": "--quality",
    "gpus_per_probe": "--gpus-per-probe",
    "cpu_threads": "the threads of each CPU probe (the cores shared among --workers)",
}


def check_comparable(study: Any, prepared: PreparedRun) -> None:
    """Refuse to resume a study under settings that would put figures measured differently
    on one frontier; a study from before this record is checked on what it stored."""
    current = measured_under(prepared)
    stored = study_setup(study).measured_under
    changed = [key for key in current if key in stored and stored[key] != current[key]]
    if "data" in changed and stored["data"] == _data_key(prepared, prepared.settings.seq_len, 2):
        changed.remove("data")  # the same data, keyed as studies made before version 3 were
    if {"data", "seq_len"} <= set(changed) and stored["data"] == _data_key(
        prepared, stored["seq_len"]
    ):
        changed.remove("data")  # the data's key changed with --seq-len alone
    if not changed:
        return
    shown = []
    for key in changed:
        if key in ("data", "model"):
            shown.append(f"{_MEASURED_UNDER_WORDS[key]} changed")
        else:
            was, now = (
                "every core" if value is None and key == "cpu_threads" else value
                for value in (stored[key], current[key])
            )
            shown.append(f"{_MEASURED_UNDER_WORDS[key]} was {was}, now {now}")
    raise UsageError(
        f"study {prepared.study_name} was measured under other settings ({'; '.join(shown)}), "
        "so its trials and this run's would not be comparable; run with its settings, or "
        "start a new study with --study NAME"
    )


def record_run_budget(study: Any, budget_bytes: int, events: RunEvents) -> None:
    """A resumed run under another --budget, once every check has passed: the budget becomes
    the study's from this run's first trial on, so status, studies, the report and export say
    it and hold every trial to it (records.constraint_now); a note says what the earlier
    trials were held to. The history is kept for trials from before each trial stored the
    budget its constraint is relative to (records.trial_budget)."""
    from optuna.trial import TrialState

    earlier = study_budgets(study)
    previous = earlier.current_bytes
    if not previous or previous == budget_bytes:
        return
    trials = study.get_trials(deepcopy=False)
    # a queued trial (a retry, a baseline, a nearest fit) runs under this run's budget
    first = min((t.number for t in trials if t.state == TrialState.WAITING), default=len(trials))
    record_new_budget(study, budget_bytes, first)
    held = list(
        dict.fromkeys(
            trial_budget(t, earlier) for t in trials if t.number < first and t.state.is_finished()
        )
    )
    note = f"budget now {format_bytes(budget_bytes)}, was {format_bytes(previous)}"
    if held:
        runs = (
            format_bytes(held[0])
            if len(held) == 1
            else f"their runs' budgets ({', '.join(map(format_bytes, held))})"
        )
        note += (
            f"; the {count_of(finished_trial_count(study), 'trial')} before this run were held "
            f"to {runs} and are held to {format_bytes(budget_bytes)} on the frontier"
        )
        smaller = [format_bytes(budget) for budget in held if budget < budget_bytes]
        if smaller:
            note += (
                f"; those ruled out under {', '.join(smaller)} stay ruled out (a new study, "
                "--study NAME, searches them)"
            )
    events.notes.append(note)


def _note_space_tried(
    study: Any, points: frozenset[SpacePoint] | None, target: int, events: RunEvents
) -> bool:
    """Where the study holds fewer than `target` finished trials but every recipe of its space
    has been tried, record so (status and the report say it) and say it in one note."""
    finished = finished_trial_count(study)
    if points is None or finished >= target or not space_used_up(study, points):
        return False
    record_space_tried(study, len(points))
    events.notes.append(
        f"{space_tried_words(len(points))}; the study stops at "
        f"{count_of(finished, 'finished trial')} (--trials {target}): more would only repeat them"
    )
    return True


def run_study(prepared: PreparedRun, runner: ProbeRunner, events: RunEvents | None = None) -> Any:
    """Run (or resume) the study until it holds `trials` finished trials or time runs out."""
    events = events or RunEvents()
    settings = prepared.settings
    study = open_study(prepared.storage, prepared.study_name, settings.seed)
    new_study = not study.get_trials(deepcopy=False)
    if not new_study:
        check_comparable(study, prepared)
    if new_study and prepared.fitting_choices:
        record_space_choices(
            study,
            SpaceChoices(
                prepared.fitting_choices,
                prepared.ruled_out_choices,
                prepared.unsupported_choices,
                prepared.ruled_out_models,
                budget_bytes=settings.budget_bytes,
            ),
        )
    # A resumed study keeps the choices it searched (Optuna refuses other ones); a dimension
    # its earlier space fixed, this run's may search
    choices = space_choices(study)
    if choices:
        space, searched, notes = resumed_space(prepared, choices, held_choices(study))
        # the headline says what the study leaves out, and what it samples that cannot fit
        prepared = dataclasses.replace(
            prepared,
            space=space,
            ruled_out_choices=searched.ruled_out,
            unsupported_choices=searched.unsupported,
            over_budget_choices=searched.over_budget,
            kept_out_choices=searched.kept_out,
        )
        events.notes.extend(notes)
        if searched != choices:
            record_space_choices(study, searched)
    events.run_started(prepared)
    if new_study:
        record_setup(
            study,
            StudySetup(
                model=settings.model,
                data_path=str(settings.data_path),
                budget_bytes=settings.budget_bytes,
                seq_len=settings.seq_len,
                probe_steps=settings.probe_steps,
                device=prepared.device,
                space=prepared.space.source,
                seed=settings.seed,
                vocab_size=prepared.spec.vocab_size,
                num_layers=prepared.spec.num_layers,
                tie_word_embeddings=prepared.spec.tie_word_embeddings,
                freeze_layout=prepared.freeze_layout,
                measured_under=measured_under(prepared),
            ),
        )
        for name, params in baseline_params(prepared.space, fits_budget(prepared)):
            study.enqueue_trial(params, user_attrs=baseline_attrs(name), skip_if_exists=True)
    record_data_stats(study, prepared.data_stats)
    record_target_trials(study, settings.trials)
    points = space_points(prepared.space)
    interrupted = fail_interrupted_trials(study)
    if interrupted:
        events.notes.append(
            f"trial{'s' if len(interrupted) > 1 else ''} {', '.join(map(str, interrupted))} "
            f"{'were' if len(interrupted) > 1 else 'was'} interrupted earlier: marked failed and "
            "queued to run again"
        )
    if not new_study:
        record_run_budget(study, settings.budget_bytes, events)
    finished = finished_trial_count(study)
    left = trials_left(study, points, settings.trials)
    if not new_study:
        from optuna.trial import TrialState

        # no more of the queued trials run than the trials left (baselines past --trials wait)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        events.resumed(finished, settings.trials, min(len(waiting), left))
    events.trials_left(left)
    if not left:
        if not _note_space_tried(study, points, settings.trials, events):
            events.notes.append(
                f"study {prepared.study_name} already holds {finished} finished trials "
                f"(--trials {settings.trials}); raise --trials to run more"
            )
        promote(prepared, runner, study, events)
        measure_noise(prepared, runner, study, events)
        confirm_frontier(prepared, runner, study, events)
        return study

    def stop_at_target(study: Any, trial: Any) -> None:
        # Other workers or commands may feed the same study: stop at the shared total, or
        # once the space's every recipe is tried (the sampler could only repeat them).
        left = trials_left(study, points, settings.trials)
        events.trials_left(left)
        if not left:
            study.stop()

    n_jobs = max(settings.workers, len(settings.gpus) // settings.largest_probe_gpus or 1)
    with probes_stop_on_ctrl_c():
        # Ctrl-C reaches this thread alone: other workers' probes are stopped with it, and
        # their trials queued again as its own is (else Optuna waits for them to end)
        study.optimize(
            make_objective(prepared, runner, events, points),
            n_trials=settings.trials - finished,
            timeout=settings.timeout_seconds,
            n_jobs=n_jobs,
            catch=(ProbeCrashed,),
            callbacks=[stop_at_target],
            gc_after_trial=False,
        )
    _note_space_tried(study, points, settings.trials, events)
    promote(prepared, runner, study, events)
    # the noise first: the best-loss pick the confirmations choose reads it
    measure_noise(prepared, runner, study, events)
    confirm_frontier(prepared, runner, study, events)
    return study
