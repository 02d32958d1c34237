"""What `autotune run` and `autotune train` show on the terminal: the run's events as a progress
bar with a line per trial, and the results. rich loads when a console is made.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from autotune.study.objective import RunEvents, TrialSummary
from autotune.study.records import TrialStatus
from autotune.training.io import measured_memory
from autotune.units import format_bytes

if TYPE_CHECKING:
    from autotune.api import RunResult
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


Display = TypeVar("Display", bound="ProgressDisplay")


class ProgressDisplay:
    """What a command shows with a progress bar: the bar shows from `_show_progress` on, and a
    `with` block stops it however the block ends (an error, Ctrl-C), so no bar is left drawn."""

    _progress: Any = None
    """The rich Progress while the bar shows, else None."""
    _task: Any = None

    def _show_progress(
        self, console: Any, description: str, total: int | None, transient: bool
    ) -> None:
        self._progress = progress_bar(console, transient)
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self: Display) -> Display:
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
                f"sizing the space: {done} of the {total} recipes that decide what the budget "
                "rules out predicted as their trials would be (the least of each choice the "
                "formula puts over the budget, and of the whole space)"
            )

    return show


def run_headline(prepared: PreparedRun) -> str:
    """Where a run's probes train and the budget they are held to: per GPU, and on the CPU
    with the gloo processes that stand in for a probe's GPUs, where probes train on several."""
    from autotune.distributed import format_gpu_counts
    from autotune.study.unmeasured import smallest_recipe_words

    gpus = prepared.settings.largest_probe_gpus
    where, per_gpu = prepared.device, ""
    if gpus > 1:
        per_gpu = " per GPU"
        if not prepared.device.startswith("cuda"):
            counts = format_gpu_counts(prepared.settings.gpus_per_probe)
            where += f" (gloo processes stand in for each probe's {counts} GPUs)"
    model = prepared.smallest_peak_model
    return (
        f"on {where}; budget {format_bytes(prepared.settings.budget_bytes)}{per_gpu}; "
        f"{smallest_recipe_words(model, 'in the space')} needs "
        f"{format_bytes(prepared.smallest_peak_bytes)}{per_gpu} with its margin (the {model}'s "
        "prediction on the data's rows, as its trial is held to the budget)"
    )


class ConsoleReporter(RunEvents, ProgressDisplay):
    """A run's events on the terminal: its setup, then a progress bar over the trials with a
    line per finished trial, confirmation and noise measurement. Use it in a `with` block, so
    the bar ends however the run does; `show_result` prints what the run made."""

    def __init__(self, console: Any = None) -> None:
        super().__init__(
            run_started=self._run_started,
            resumed=self._resumed,
            trials_left=self._trials_left,
            trial_started=self._trial_started,
            trial_finished=self._trial_finished,
            confirmed=self._confirmed,
            promoted=self._promoted,
            noise_measured=self._noise_measured,
        )
        self.console = console or make_console()

    def _run_started(self, prepared: PreparedRun) -> None:
        from autotune.study.storage_urls import redact_url
        from autotune.study.unmeasured import not_searched

        settings = prepared.settings
        if prepared.skipped_rows:
            self.console.print(f"skipped {prepared.skipped_rows} bad rows of {settings.data_path}")
        self.console.print(
            f"study [bold]{prepared.study_name}[/] in {redact_url(prepared.storage)} "
            + run_headline(prepared)
        )
        for line in not_searched(
            prepared.unsupported_choices,
            prepared.ruled_out_choices,
            prepared.ruled_out_models,
            prepared.over_budget_choices,
            prepared.kept_out_choices,
        ):
            self.console.print(line)
        # its total unknown until the study is open (trials_left)
        self._show_progress(self.console, "trials", None, transient=True)

    def _resumed(self, finished: int, target: int, queued: int) -> None:
        """Said before the first trial: the same command resumes a study, and only this line
        tells a resumed run from a new one."""
        self.console.print(
            f"resuming: {finished} of {target} trials finished"
            + (f", {queued} queued to run" if queued else "")
        )

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
    from autotune.report.card import study_train_command

    return study_train_command(result.study, str(result.recipe_path))


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
