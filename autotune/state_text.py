"""What the commands that read a study or predict a recipe print: `autotune studies`,
`autotune status` and `autotune estimate`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from autotune.training.io import measured_memory
from autotune.units import count_of, format_bytes

if TYPE_CHECKING:
    from autotune.api import MemoryPrediction
    from autotune.study.overview import MeasuredRecipe, StudyOverview, StudyStatus


def _recipe_line(recipe: MeasuredRecipe) -> str:
    host = (
        f" (host {format_bytes(recipe.host_peak_bytes)})"
        if recipe.host_peak_bytes is not None
        else ""
    )
    memory = measured_memory(recipe.peak_memory_bytes, recipe.memory_source)
    return (
        f"trial {recipe.trial}  {recipe.recipe}  {memory}{host}  "
        f"{recipe.tokens_per_second:,.0f} tokens/s  eval loss {recipe.eval_loss:.4f}"
    )


def studies_text(studies: list[StudyOverview]) -> str:
    """`autotune studies`: each study's lines, one after the other."""
    lines = [line for study in studies for line in overview_lines(study)]
    return "\n".join(lines) or "no study in this storage yet"


def overview_lines(study: StudyOverview) -> list[str]:
    """A heading line for the study, then its current pick per policy."""
    budget = format_bytes(study.budget_bytes) if study.budget_bytes else "?"
    lines = [
        f"{study.name}: model {study.model or '?'}, budget {budget}; "
        f"{study.finished_words}, {study.running} running"
    ]
    if not study.picks:
        lines.append("  nothing measured within the budget yet")
    width = max(map(len, study.picks), default=0)
    for policy, recipe in study.picks.items():
        lines.append(f"  {policy:<{width}}  {_recipe_line(recipe)}")
        if policy in study.pick_notes:
            lines.append(f"  {'':<{width}}  ({study.pick_notes[policy]})")
    return lines


def _queued_words(status: StudyStatus) -> str:
    """What the trials queued in a study that did what it was asked wait for."""
    if status.overview.space_recipes_tried is not None:  # more trials would only repeat
        return " (the space is tried: no run starts them)"
    return " (a run with a larger --trials starts them)"


def _probes_words(status: StudyStatus) -> str:
    """The probes the study ran: its trials' (with their probes an hour) and, once they have
    run, the noise check's and the confirmations'."""
    per_hour = status.probes_per_hour
    rate = f"{per_hour:.{1 if per_hour < 10 else 0}f} an hour" if per_hour else ""
    extra = [
        count_of(count, noun)
        for count, noun in (
            (status.noise_checks, "noise check"),
            (status.confirmations, "confirmation"),
        )
        if count
    ]
    if not extra:
        return count_of(status.probes, "probe") + (f", {rate}" if rate else "")
    trials = count_of(status.probes, "trial") + (f" at {rate}" if rate else "")
    total = status.probes + status.noise_checks + status.confirmations
    return f"{count_of(total, 'probe')} ({', '.join([trials, *extra])})"


def status_text(status: StudyStatus, storage_url: str | None = None) -> str:
    """`autotune status`: trials done and running, probes an hour, the frontier so far; for a
    study whose trials have all finished, the commands that take its answer (on
    `storage_url`, None: the default storage; its password not shown)."""
    from autotune.report.card import export_command, study_command
    from autotune.study.storage_urls import redact_url
    from autotune.units import format_duration

    storage_url = redact_url(storage_url) if storage_url else None

    study = status.overview
    # queued trials a run left beyond its target (the baselines of a run of --trials 1) wait for
    # a run with a larger --trials: the study has done what it was asked
    done = (
        not study.running
        and not status.running_trials
        and (
            study.space_recipes_tried is not None
            or (study.target_trials is not None and study.finished >= study.target_trials)
        )
    )
    ended = [r for r in status.running_trials if r.run_ended]
    lines = [
        *overview_lines(study)[:1],
        f"trials: {study.finished} finished ({status.measured} measured), {study.running} "
        f"running{f', {len(ended)} interrupted' if ended else ''}, {status.waiting} queued"
        f"{_queued_words(status) if done and status.waiting else ''}; {_probes_words(status)}",
    ]
    lines += [
        f"running: trial {r.trial}  {r.recipe or '(sampling)'}  for {format_duration(r.seconds)}"
        if not r.run_ended
        else f"interrupted: trial {r.trial}  {r.recipe or '(sampling)'}  (its run on this host "
        "has ended; the next run queues it again)"
        for r in status.running_trials
    ]
    lines.append(
        "frontier so far, fastest first:" if status.frontier else "frontier: nothing measured yet"
    )
    lines += [f"  {_recipe_line(r)}" for r in status.frontier]
    lines += [
        f"trial {number} left the frontier: {why}"
        + (
            f"; in its place, {status.confirmed_in_place[number]}"
            if number in status.confirmed_in_place
            else ""
        )
        for number, why in sorted(status.left_frontier.items())
    ]
    if done and status.frontier:
        lines += [
            "its trials have finished; next:",
            f"  {export_command(study.name, storage_url, 'balanced', 'recipe.yaml')}"
            "  (the balanced recipe; --pick fastest, smallest or best-loss for another)",
            f"  {study_command('report', study.name, storage_url)}  (the HTML report)",
        ]
    return "\n".join(lines)


def show_estimate(predicted: MemoryPrediction, as_json: bool, budget_bytes: int | None) -> bool:
    """`autotune estimate`'s answer: the breakdown and the peak with its margin, or JSON. False
    where a budget was given and the peak with its margin does not fit it, else True."""
    from autotune.margins import fit_words

    result, used, margin = predicted.estimate, predicted.memory_model, predicted.margin
    fits = budget_bytes is None or predicted.peak_with_margin_bytes <= budget_bytes
    if as_json:
        figures = {
            **result.as_json(),
            "memory_model": used,
            "margin": margin.fraction,
            "peak_bytes_with_margin": predicted.peak_with_margin_bytes,
            "num_gpus": predicted.num_gpus,  # the bytes are each GPU's where several
        }
        if budget_bytes is not None:  # what the table's last line says
            figures["budget_bytes"] = budget_bytes
            figures["fits"] = fits
        print(json.dumps(figures))
        return fits
    if predicted.fallback_reason:
        print(f"memory model: {used} ({predicted.fallback_reason})")
    for name, size in result.breakdown.items():
        print(f"{name:>28}  {format_bytes(size):>12}")
    # a study's prediction of the same recipe, on its data's shorter rows, can be lower
    rows = f", every row {predicted.row_tokens} tokens" if predicted.row_tokens else ""
    print(
        f"{predicted.peak_name:>28}  {format_bytes(result.peak_bytes):>12}  "
        f"({result.peak_bytes} bytes, {used}{rows})"
    )
    print(
        f"{'with margin':>28}  {format_bytes(predicted.peak_with_margin_bytes):>12}  "
        f"(+{100 * margin.fraction:.1f}%: {margin.why})"
    )
    if result.paged_bytes:
        print(
            f"{'paged optimizer states':>28}  {format_bytes(result.paged_bytes):>12}  "
            "(unified memory, outside the peak: paged to the host when the GPU runs short)"
        )
    if result.host_bytes:
        host = "host memory per GPU" if predicted.num_gpus > 1 else "host memory"
        print(
            f"{host:>28}  {format_bytes(result.host_bytes):>12}  "
            "(offloaded off the GPU, outside the peak: held to the study's --host-budget)"
        )
    if budget_bytes is not None:
        context = result.cuda_context_bytes
        print(fit_words(result.peak_bytes, margin, budget_bytes, predicted.num_gpus, context))
    return fits
