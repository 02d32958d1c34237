"""What the report says, computed before anything is drawn: the trials table, the readings of
the frontier, the time, the data and the parameter importances (no plotly here; tests check
this, and the page only draws it).
"""

from __future__ import annotations

import datetime
from typing import Any, NamedTuple

from autotune.fidelity import fidelity_reading, noise_groups_line
from autotune.quality import quality_reading
from autotune.report.card import PickCard, pick_cards, train_commands
from autotune.report.frame import MEASURED, probed_rows, trials_frame
from autotune.study.coverage import space_tried, untried_recipes
from autotune.study.overview import busy_seconds, finished_words
from autotune.study.ranking import (
    QualityRanking,
    pick_note,
    pick_number,
    quality_ranking,
    ranking_line,
)
from autotune.study.records import (
    OBJECTIVE_NAMES,
    TrialStatus,
    finished_trial_count,
    measured_points,
    trial_record,
    trial_status,
)
from autotune.study.searched_choices import space_choices
from autotune.study.study_records import (
    Noise,
    confirmed_in_place,
    data_stats,
    left_frontier,
    study_budgets,
    study_noise,
    study_setup,
    target_trials,
)
from autotune.study.unmeasured import not_searched
from autotune.training.io import CPU_MEMORY_SOURCE, PROBE_PHASES
from autotune.units import format_bytes


class ReportData(NamedTuple):
    frame: Any  # pandas.DataFrame, one row per trial
    frontier_numbers: list[int]
    budget_bytes: int
    memory_sources: list[str]
    study_name: str
    model: str
    data_text: str
    """The data's rows, token lengths and what truncation at seq_len cut."""
    readings: list[str]
    """One line per frontier recipe, compared with the QLoRA default where it was measured."""
    importances: dict[str, dict[str, float]]
    """Objective -> parameter -> importance (Optuna's evaluator), where it could be computed."""
    time_text: str = ""
    """Trials and probes an hour, and where the median probe's time went."""
    space_lines: tuple[str, ...] = ()
    """Choices of the space file the study left out, and why."""
    cards: tuple[PickCard, ...] = ()
    """The answer: one card per recipe the picks choose, balanced first."""
    commands: tuple[str, ...] = ()
    """How to train the balanced pick."""
    storage_url: str | None = None
    """The storage as commands name it (None: the default one)."""
    measured_count: int = 0
    """Measured trials: what the importances need MIN_MEASURED_FOR_IMPORTANCE of."""
    noise: Noise | None = None
    train_tokens: int | None = None
    """Non-padding tokens of one epoch of the study's training split (None: not recorded)."""
    quality_notes: tuple[str, ...] = ()
    """What the quality axis is and how far its ranking holds (quality_axis_notes)."""
    promoted_steps: tuple[int, ...] = ()
    """The probe length of each promotion round the study ran (--promote), shortest first."""
    left_frontier: tuple[str, ...] = ()
    """One line per measured recipe whose confirmation took it off the frontier, and why."""
    finished_text: str = ""
    """'12 of 20 trials finished': the finished trials and the latest run's --trials."""

    @property
    def on_cpu(self) -> bool:
        """Every probe ran on a CPU: measured memory is RSS growth, not GPU memory (the cards,
        tables and charts say so)."""
        return self.memory_sources == [CPU_MEMORY_SOURCE]


def report_data(
    study: Any,
    recipe_path: str | None = None,
    exported: bool = True,
    storage_url: str | None = None,
    ranking: QualityRanking | None = None,
) -> ReportData:
    """Everything the page shows; `recipe_path` is where the balanced recipe was exported
    (or, not `exported`, where `autotune export` would write it); `ranking` is the study's
    quality ranking where the caller built it (else it is built here)."""
    points = measured_points(study)
    if ranking is None:
        ranking = quality_ranking(study, points)
    frame = trials_frame(study, points, ranking)
    setup = study_setup(study)
    choices = space_choices(study)
    stats = data_stats(study)
    noise = study_noise(study)
    train_tokens = stats.get("train_tokens")
    sources = sorted({s for s in frame.get("memory_source", []) if s}) if len(frame) else []
    measured = int((frame["status"] == MEASURED).sum()) if len(frame) else 0
    in_place = confirmed_in_place(study)
    commands: tuple[str, ...] = ()
    if recipe_path is not None:
        commands = tuple(
            train_commands(study.study_name, setup.data_path, recipe_path, exported, storage_url)
        )
    return ReportData(
        data_text=data_description(stats, setup.seq_len),
        readings=frontier_readings(
            frame,
            setup.budget_bytes,
            noise,
            pick_number("best-loss", points, ranking) if points else None,
            pick_note("best-loss", points, ranking) if points else None,
        ),
        quality_notes=quality_axis_notes(
            frame,
            setup.measured_under.get("quality", "eval_loss"),
            noise,
            ranking,
            setup.probe_steps,
        ),
        promoted_steps=ranking.steps[1:],
        left_frontier=tuple(
            f"Trial {number} ({trial_record(study.trials[number]).label}) left "
            f"the frontier: {why}; the picks and the export are chosen without it."
            + (f" In its place, {in_place[number]}." if number in in_place else "")
            for number, why in sorted(left_frontier(study).items())
        ),
        importances=objective_importances(study) if measured >= MIN_MEASURED_FOR_IMPORTANCE else {},
        cards=tuple(pick_cards(frame, points, ranking, noise, train_tokens)),
        commands=commands,
        storage_url=storage_url,
        measured_count=measured,
        finished_text=finished_words(
            finished_trial_count(study),
            target_trials(study),
            space_tried(study),
            untried_recipes(study),
        ),
        noise=noise,
        train_tokens=train_tokens,
        time_text=time_description(
            frame, busy_seconds(study.get_trials(deepcopy=False), datetime.datetime.now())
        ),
        space_lines=tuple(
            not_searched(
                choices.unsupported,
                choices.ruled_out,
                choices.ruled_out_models,
                choices.over_budget,
                choices.kept_out,
                sized_under_named(study, choices.budget_bytes),
            )
            if choices
            else ()
        ),
        frame=frame,
        frontier_numbers=sorted(int(n) for n in frame.loc[frame["on_frontier"], "trial"])
        if len(frame)
        else [],
        budget_bytes=setup.budget_bytes,
        memory_sources=sources,
        study_name=study.study_name,
        model=setup.model,
    )


def sized_under_named(study: Any, sized_under: int | None) -> int | None:
    """The budget the study's space choices were sized under (`sized_under`, the study's
    budget where none was stored), where its runs held several budgets, so its not-searched
    lines name the budget that ruled each choice out; None where one budget held them all."""
    budget = sized_under or study_setup(study).budget_bytes
    held = {span_budget for _, span_budget in study_budgets(study).spans}
    return budget if held - {budget} else None


def data_description(stats: dict[str, Any], seq_len: int | None) -> str:
    if not stats.get("token_length_percentiles"):
        return ""
    lengths = ", ".join(f"{k} {v}" for k, v in stats["token_length_percentiles"].items())
    skipped = f" ({stats['skipped_rows']} bad rows skipped)" if stats.get("skipped_rows") else ""
    return (
        f"Data: {stats['rows']} rows{skipped}; tokens per row {lengths}; "
        f"{stats['truncated_share']:.1%} longer than seq_len {seq_len} and "
        f"truncated; {stats['rows_without_answer_tokens']} lose their whole answer."
    )


def time_description(frame: Any, busy_seconds: float) -> str:
    """'Time: 40 trials in 58.0 min while trials ran (41 an hour), 16 probed (17 an hour);
    median probe 104.2 s: start 0.1 s, ..., eval 3.5 s.' `busy_seconds` is the wall time
    during which some trial ran (overview.busy_seconds), as `autotune status` counts it: parallel
    workers count together, and a study resumed later is timed without the pause."""
    finished = frame[frame["trial_seconds"].notna()] if len(frame) else frame
    probed = probed_rows(finished)
    busy_hours = busy_seconds / 3600
    if not len(probed) or not busy_hours:
        return ""
    phases = ", ".join(
        f"{phase} {probed[f'seconds_{phase}'].median():.1f} s"
        for phase in PROBE_PHASES
        if f"seconds_{phase}" in probed.columns and probed[f"seconds_{phase}"].notna().any()
    )
    return (
        f"Time: {len(finished)} trials in {60 * busy_hours:.1f} min while trials ran "
        f"({len(finished) / busy_hours:.0f} an hour), {len(probed)} probed "
        f"({len(probed) / busy_hours:.0f} an hour); median probe "
        f"{probed['seconds_total'].median():.1f} s: {phases}."
    )


def quality_axis_notes(
    frame: Any,
    metric: str,
    noise: Noise | None,
    ranking: QualityRanking,
    probe_steps: int | None = None,
) -> tuple[str, ...]:
    """What the quality axis is, on which probe lengths its ranking of the frontier rests
    (--promote), which frontier recipes the measured noise cannot tell apart on it, and how far
    a probe's ranking on it was measured to hold (bench/fidelity_bench.py) beside the study's
    `probe_steps`."""
    lines = [quality_reading(metric)]
    front = frame[frame["on_frontier"] & (frame["status"] == MEASURED)] if len(frame) else frame
    numbers = [int(t) for t in front["trial"]] if len(front) else []
    if numbers:
        lines.append(ranking_line(ranking, numbers))
    if noise and numbers:
        lines.append(noise_groups_line(ranking.ladders_of(numbers), noise.eval_loss_difference))
    lines.append(fidelity_reading(probe_steps))
    return tuple(line for line in lines if line)


def frontier_readings(
    frame: Any,
    budget_bytes: int,
    noise: Noise | None = None,
    best_loss: int | None = None,
    best_loss_note: str | None = None,
) -> list[str]:
    """'fastest under 24 GB: LoRA r16 q/v bf16 mb4 — 5.9x the QLoRA default, +0.030 eval loss',
    with the eval-loss noise of one recipe probed twice, so a difference can be told from chance.
    The best eval loss is trial `best_loss`, the best-loss pick (ranking.pick_number), with
    `best_loss_note` where the noise decided it; without one, the frontier's lowest."""
    if not len(frame):
        return []
    front = frame[frame["on_frontier"]]
    default = frame[(frame["baseline"] == "qlora_default") & (frame["status"] == MEASURED)]
    budget = f"{budget_bytes / 1e9:g} GB"
    roles = {
        "fastest": front.sort_values("tokens_per_second", ascending=False),
        "smallest": front.sort_values("peak_memory_bytes"),
        "best eval loss": front[front["trial"] == best_loss]
        if best_loss is not None
        else front.sort_values("eval_loss"),
    }
    lines = []
    for role, ordered in roles.items():
        if not len(ordered):
            continue
        row = ordered.iloc[0]
        line = (
            f"{role} under {budget}: {row['recipe']} (trial {row['trial']}) — "
            f"{format_bytes(row['peak_memory_bytes'])}, {row['tokens_per_second']:,.0f} tok/s, "
            f"eval loss {row['eval_loss']:.4f}"
        )
        if row["predicted_with_margin_bytes"]:
            line += (
                f" (predicted {format_bytes(row['predicted_with_margin_bytes'])} with its "
                f"{100 * row['memory_margin']:.1f}% margin, "
                f"{format_bytes(budget_bytes - row['predicted_with_margin_bytes'])} to spare)"
            )
        if len(default) and int(default.iloc[0]["trial"]) != int(row["trial"]):
            base = default.iloc[0]
            difference = row["eval_loss"] - base["eval_loss"]
            line += (
                f"; {row['tokens_per_second'] / base['tokens_per_second']:.1f}x the QLoRA "
                f"default, {difference:+.4f} eval loss"
            )
            if noise:
                within = abs(difference) <= noise.eval_loss_difference
                line += " (within noise)" if within else " (beyond noise)"
        if role == "best eval loss" and best_loss_note:
            line += f"; {best_loss_note}"
        lines.append(line)
    if noise:
        lines.append(
            f"Noise: trial {noise.trial} probed again with seed {noise.seed} moved eval "
            f"loss by {noise.eval_loss_difference:.4f}, tokens/s by "
            f"{_percent(noise.tokens_per_second_change)} and peak memory by "
            f"{_percent(noise.peak_memory_change)}; eval-loss differences smaller than that "
            "are chance."
        )
    return lines


def _percent(change: float | None) -> str:
    return "n/a" if change is None else f"{change:+.1%}"


MIN_MEASURED_FOR_IMPORTANCE = 10
"""Measured trials before importances are shown: from fewer, which parameter 'matters' is
mostly which happened to vary with chance."""


def objective_importances(study: Any) -> dict[str, dict[str, float]]:
    """Parameter importances per objective (Optuna's default evaluator), each over the
    measured trials alone and their own values of that objective; empty where it cannot say."""
    import warnings

    import optuna

    from autotune.study.records import DIRECTIONS

    measured = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if trial_status(t) == TrialStatus.MEASURED
    ]
    result: dict[str, dict[str, float]] = {}
    for index, (name, direction) in enumerate(zip(OBJECTIVE_NAMES, DIRECTIONS)):
        # A study of this objective alone: trials predicted over the budget or failed carry
        # stand-in values that would explain nothing but themselves.
        single = optuna.create_study(direction=optuna.study.StudyDirection[direction.upper()])
        single.add_trials(
            optuna.trial.create_trial(
                params=t.params, distributions=t.distributions, value=t.values[index]
            )
            for t in measured
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = optuna.importance.get_param_importances(single)
        except (RuntimeError, ValueError, ZeroDivisionError):
            continue
        # a parameter the measured trials all share was not searched: nothing to explain
        varied = {p for p in scores if len({repr(t.params.get(p)) for t in measured}) > 1}
        if varied:
            result[name] = {p: v for p, v in scores.items() if p in varied}
    return result
