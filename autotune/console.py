"""What `autotune run` and `autotune train` show on the terminal: the run's events as a progress
bar with a line per trial, and the results. rich loads when a console is made.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from autotune.study.objective import RunEvents, TrialSummary
from autotune.study.records import TrialStatus
from autotune.units import count_of, format_bytes

if TYPE_CHECKING:
    from autotune.api import MemoryPrediction, RunResult
    from autotune.study.overview import MeasuredRecipe, StudyOverview, StudyStatus
    from autotune.study.ranking import Promotion
    from autotune.study.settings import PreparedRun
    from autotune.study.study_records import Confirmation, Noise


def make_console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


def progress_bar(console: Any, transient: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )


def tokenize_progress(data_path: Path) -> Callable[[int, int], None]:
    """Progress lines while a large dataset is tokenized (by a run into its cache, by `data
    inspect` to count its lengths; small ones are quick)."""
    from autotune.data.splits import TOKENIZE_PROGRESS_ROWS

    def show(done: int, total: int) -> None:
        if total >= TOKENIZE_PROGRESS_ROWS:
            make_console(stderr=True).print(f"tokenizing {data_path}: {done:,} of {total:,} rows")

    return show


SIZING_PROGRESS_SECONDS = 2.0
"""Sizing the space shows progress lines once it has taken this long (a tiny model's replays
are done sooner)."""


def sizing_progress() -> Callable[[int, int], None]:
    """Progress lines while a run replays the recipes the formula puts over the budget, each
    choice's least, before the space is searched (budget_fit)."""
    import time

    started: list[float] = []

    def show(done: int, total: int) -> None:
        if not done:
            started[:] = [time.perf_counter()]
        elif started and time.perf_counter() - started[0] >= SIZING_PROGRESS_SECONDS:
            make_console(stderr=True).print(
                f"sizing the space: {done} of {total} recipes predicted as their trials would be"
            )

    return show


def run_headline(prepared: PreparedRun) -> str:
    """Where a run's probes train and the budget they are held to: per GPU, and on the CPU
    with the gloo processes that stand in for a probe's GPUs, where probes train on several."""
    from autotune.distributed import format_gpu_counts
    from autotune.study.records import smallest_recipe_words

    gpus = prepared.settings.largest_probe_gpus
    where, per_gpu = prepared.device, ""
    if gpus > 1:
        per_gpu = " per GPU"
        if not prepared.device.startswith("cuda"):
            counts = format_gpu_counts(prepared.settings.gpus_per_probe)
            where += f" (gloo processes stand in for each probe's {counts} GPUs)"
    return (
        f"on {where}; budget {format_bytes(prepared.settings.budget_bytes)}{per_gpu}; "
        f"{smallest_recipe_words(prepared.smallest_peak_model, 'in the space')} "
        f"{format_bytes(prepared.smallest_peak_bytes)}{per_gpu} by the "
        f"{prepared.smallest_peak_model} on the data's rows, with its margin, as a trial of it is "
        "held to the budget"
    )


class ConsoleReporter(RunEvents):
    """A run's events on the terminal: its setup, then a progress bar over the trials with a
    line per finished trial, confirmation and noise measurement. Use it in a `with` block, so
    the bar ends however the run does; `show_result` prints what the run made."""

    def __init__(self, console: Any = None) -> None:
        super().__init__(
            run_started=self._run_started,
            trials_left=self._trials_left,
            trial_started=self._trial_started,
            trial_finished=self._trial_finished,
            confirmed=self._confirmed,
            promoted=self._promoted,
            noise_measured=self._noise_measured,
        )
        self.console = console or make_console()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> ConsoleReporter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _run_started(self, prepared: PreparedRun) -> None:
        from autotune.study.records import not_searched
        from autotune.study.storage import redact_url

        settings = prepared.settings
        if prepared.skipped_rows:
            self.console.print(f"skipped {prepared.skipped_rows} bad rows of {settings.data_path}")
        self.console.print(
            f"study [bold]{prepared.study_name}[/] in {redact_url(prepared.storage)} "
            + run_headline(prepared)
        )
        for line in not_searched(
            prepared.unsupported_choices, prepared.ruled_out_choices, prepared.ruled_out_models
        ):
            self.console.print(line)
        self._progress = progress_bar(self.console, transient=True)
        self._progress.start()
        # its total unknown until the study is open (trials_left)
        self._task = self._progress.add_task("trials", total=None)

    def _trials_left(self, trials: int) -> None:
        """The bar's total: this run's trials so far and the most it can still add, which
        the space's untried recipes and the study's finished trials bound, not --trials."""
        if self._progress is not None:  # its count: this run's trials that have ended
            done = next(task.completed for task in self._progress.tasks if task.id == self._task)
            self._progress.update(self._task, total=done + trials)

    def _trial_started(self, number: int, label: str) -> None:
        if self._progress is not None:  # None once the run ended: after Ctrl-C, another
            # worker's trial still ends, and is recorded and shown
            self._progress.update(self._task, description=f"trial {number}: {label}")

    def _trial_finished(self, summary: TrialSummary) -> None:
        from autotune.training.io import PROBE_PHASES

        if self._progress is not None:
            self._progress.advance(self._task)
        if summary.status == TrialStatus.MEASURED:
            memory = measured_memory(summary.peak_memory_bytes or 0, summary.memory_source)
            text = (
                f"[green]measured[/] {memory} "
                f"(predicted GPU {format_bytes(summary.predicted_peak_bytes)}), "
                f"{summary.tokens_per_second:,.0f} tok/s, eval loss {summary.eval_loss:.4f}"
            )
            if summary.host_peak_bytes is not None:
                text += (
                    f", host {format_bytes(summary.host_peak_bytes)} "
                    f"(predicted {format_bytes(summary.predicted_host_bytes)})"
                )
            if summary.reason:
                text += f"; [red]does not fit[/]: {summary.reason}"
        else:
            text = f"[yellow]{summary.status}[/]: {summary.reason}"
        if summary.repair_of is not None:
            text += f" (nearest recipe that fits, for trial {summary.repair_of})"
        self.console.print(f"trial {summary.number:>3} {summary.label}: {text}")
        if summary.seconds:
            phases = (*PROBE_PHASES, "total")
            self.console.print(
                "      time: "
                + ", ".join(
                    f"{p} {summary.seconds[p]:.1f}s" for p in phases if p in summary.seconds
                ),
                style="dim",
            )

    def _confirmed(self, number: int, confirmation: Confirmation) -> None:
        from rich.markup import escape

        verdict, _, detail = confirmation.words().partition(": ")
        colour = "green" if confirmation.held_up else "red"
        in_place = ""
        if confirmation.in_place_of is not None:  # beyond --confirm: its pick's recipe left
            in_place = (
                f", in place of trial {confirmation.in_place_of} as the {confirmation.pick} pick"
            )
        self.console.print(
            f"confirm trial {number} ({confirmation.steps} steps, seed "
            f"{confirmation.seed}){in_place}: [{colour}]{verdict}[/]: {escape(detail)}"
        )
        removal = confirmation.removal()
        if removal:  # the frontier, the picks and the export go on without it
            self.console.print(
                f"trial {number} [red]left the frontier[/]: {escape(removal)}; the picks and "
                "the exported recipe are chosen without it"
            )

    def _promoted(self, number: int, promotion: Promotion) -> None:
        from rich.markup import escape

        if promotion.eval_loss is not None and promotion.status == "ok":
            outcome = f"eval loss {promotion.eval_loss:.4f}"
        else:
            outcome = f"[yellow]{promotion.status}[/]: {escape(promotion.reason)}"
        self.console.print(
            f"promote trial {number} (round {promotion.round}, {promotion.steps} steps): {outcome}"
        )

    def _noise_measured(self, noise: Noise) -> None:
        self.console.print(
            f"noise: trial {noise.trial} again with seed {noise.seed}: eval loss moved "
            f"{noise.eval_loss_difference:.4f}, tokens/s "
            f"{(noise.tokens_per_second_change or 0):+.1%}"
        )

    def show_result(self, result: RunResult) -> None:
        """The run's notes, its frontier as a table, and where the report and recipe went (where
        none was exported, the command ends saying why: nothing_measured_line)."""
        from rich.markup import escape

        for note in result.notes:
            self.console.print(note)
        self.console.print(frontier_table(result))
        self.console.print(f"report: {result.report_path}")
        if result.recipe_path is not None:
            picked = ""  # which frontier row the recipe and its memory line are
            if result.recipe is not None and result.recipe_trial is not None:
                picked = f" (trial {result.recipe_trial}: {result.recipe.label()})"
            self.console.print(f"recipe (balanced): {result.recipe_path}{escape(picked)}")
            if result.recipe_fit:
                self.console.print(f"memory of trial {result.recipe_trial}: {result.recipe_fit}")
            # one line however narrow the terminal: a copied command must not carry a newline
            self.console.print(f"to train it: {escape(train_command(result))}", soft_wrap=True)


def train_command(result: RunResult) -> str:
    """The `autotune train` command of the recipe the run exported, on the study's data (the
    report's balanced card gives the same)."""
    from autotune.report.card import train_commands
    from autotune.study.study_records import study_setup

    data_path = study_setup(result.study).data_path
    return train_commands(result.study.study_name, data_path, str(result.recipe_path), True, None)[
        -1
    ]


def measured_memory(peak_bytes: float, memory_source: str) -> str:
    """A probe's measured peak as it was measured: a CPU probe's is the growth of its resident
    memory, not GPU memory."""
    from autotune.training.io import CPU_MEMORY_SOURCE

    memory = format_bytes(peak_bytes)
    return f"CPU RSS +{memory}" if memory_source == CPU_MEMORY_SOURCE else memory


def frontier_table(result: RunResult) -> Any:
    from rich.table import Table

    from autotune.study.records import trial_record

    ranking = result.ranking
    promoted = len(ranking.steps) > 1  # --promote ran: the longer probes' eval loss too
    table = Table(title="Pareto frontier (measured, within budget)")
    records = {p.number: trial_record(result.study.trials[p.number]) for p in result.frontier}
    hosts = {n: r.probe.host_peak_bytes if r.probe else None for n, r in records.items()}
    sources = {n: r.probe.memory_source if r.probe else "" for n, r in records.items()}
    columns = ["trial", "recipe", "peak memory", "tokens/s", "eval loss"]
    if promoted:
        columns[-1] += f" ({ranking.steps[0]} steps)"
        columns.append("longer probe eval loss")
    if any(h is not None for h in hosts.values()):  # a frontier recipe offloads
        columns.insert(3, "host peak")
    for column in columns:
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for point in result.frontier:
        host = hosts[point.number]
        cells = [
            str(point.number),
            records[point.number].label,
            measured_memory(point.peak_memory_bytes, sources[point.number]),
            f"{point.tokens_per_second:,.0f}",
            f"{point.eval_loss:.4f}",
        ]
        if "host peak" in columns:
            cells.insert(3, format_bytes(host) if host is not None else "")
        longer = ranking.longest(point.number)
        if promoted:
            cells.append(f"{longer[1]:.4f} ({longer[0]} steps)" if longer else "")
        table.add_row(*cells)
    return table


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
    lines += [f"  {p:<{width}}  {_recipe_line(r)}" for p, r in study.picks.items()]
    return lines


def status_text(status: StudyStatus, storage_url: str | None = None) -> str:
    """`autotune status`: trials done and running, probes an hour, the frontier so far; for a
    study whose trials have all finished, the commands that take its answer (on
    `storage_url`, None: the default storage)."""
    from autotune.report.card import export_command, study_command
    from autotune.units import format_duration

    study = status.overview
    done = (
        not study.running
        and not status.waiting
        and not status.running_trials
        and (
            study.space_recipes_tried is not None
            or (study.target_trials is not None and study.finished >= study.target_trials)
        )
    )
    per_hour = status.probes_per_hour
    rate = f", {per_hour:.{1 if per_hour < 10 else 0}f} an hour" if per_hour else ""
    ended = [r for r in status.running_trials if r.run_ended]
    lines = [
        *overview_lines(study)[:1],
        f"trials: {study.finished} finished ({status.measured} measured), {study.running} "
        f"running{f', {len(ended)} interrupted' if ended else ''}, {status.waiting} queued; "
        f"{count_of(status.probes, 'probe')}{rate}",
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


def show_estimate(predicted: MemoryPrediction, as_json: bool, budget_bytes: int | None) -> None:
    """`autotune estimate`'s answer: the breakdown and the peak with its margin, or JSON."""
    from autotune.margins import fit_words

    result, used, margin = predicted.estimate, predicted.memory_model, predicted.margin
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
            figures["fits"] = predicted.peak_with_margin_bytes <= budget_bytes
        print(json.dumps(figures))
        return
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
        print(
            f"{'host memory per GPU':>28}  {format_bytes(result.host_bytes):>12}  "
            "(offloaded off the GPU, outside the peak: held to the study's --host-budget)"
        )
    if budget_bytes is not None:
        print(fit_words(result.peak_bytes, margin, budget_bytes, predicted.num_gpus))
