"""The objective: one trial's recipe predicted, probed or ruled out (over the budget, or a
combination of choices the device cannot run), and every outcome recorded."""

from __future__ import annotations

import contextlib
import math
import queue
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.architecture import dora_refusal
from autotune.distributed import cpu_threads_per_process
from autotune.errors import first_line, unwritable
from autotune.host_memory import host_budget
from autotune.margins import margin_for
from autotune.model_spec import ModelSpec
from autotune.probe import ProbeRunner
from autotune.probe_stop import stopped_by
from autotune.quality import quality_cost
from autotune.recipe import Recipe
from autotune.recipe_checks import fp16_moments_refusal
from autotune.study.coverage import SpacePoint, space_used_up
from autotune.study.records import (
    UNMEASURED_TOKENS_PER_SECOND,
    ProbeCrashed,
    TrialStatus,
    constraint_now,
    copy_measurement,
    mark_surplus,
    record_constraint,
    record_prediction,
    record_probe_place,
    record_probe_result,
    record_status,
    record_worker,
    repair_attrs,
    trial_record,
)
from autotune.study.seeding import fits_budget, nearest_fitting_params, trial_predictor
from autotune.study.settings import PreparedRun, gpu_groups, trials_dir_of
from autotune.study.storage import artifact_store
from autotune.study.storage_urls import TRIALS_DIR
from autotune.study.study_records import Confirmation, Noise, study_budgets
from autotune.study.workers import beyond_target, requeue_stopped_trial, worker_id
from autotune.training.io import ProbeRequest, ProbeResult
from autotune.units import format_bytes

if TYPE_CHECKING:  # a type only: the objective runs nothing of ranking
    from autotune.study.ranking import Promotion


@dataclass(frozen=True)
class TrialSummary:
    number: int
    label: str
    status: TrialStatus
    predicted_peak_bytes: int
    peak_memory_bytes: float | None = None
    memory_source: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    """Where the probe's time went: start, device_init, data, load, warmup, steps, eval, total."""
    tokens_per_second: float | None = None
    eval_loss: float | None = None
    reason: str = ""
    repair_of: int | None = None
    """The trial over the budget this one stands in for, as the nearest recipe that fits."""
    host_peak_bytes: int | None = None
    """Where the recipe offloads: the host memory its probe measured, all ranks together."""
    predicted_host_bytes: int = 0


@dataclass
class RunEvents:
    """Hooks a run calls as it goes (autotune.console shows them); the study prints nothing."""

    run_started: Callable[[PreparedRun], None] = lambda prepared: None
    """The inputs are checked; the study is about to start or resume."""
    resumed: Callable[[int, int, int], None] = lambda finished, target, queued: None
    """The study held trials before this run: its finished trials, the --trials it runs to
    and the trials queued to run (a stopped trial's retry, a baseline), before the first."""
    trials_left: Callable[[int], None] = lambda trials: None
    """The most trials this run can still add (coverage.trials_left): said once the study is
    open, before its first trial, and again as each trial ends, other workers' included."""
    trial_started: Callable[[int, str], None] = lambda number, label: None
    trial_finished: Callable[[TrialSummary], None] = lambda summary: None
    confirmed: Callable[[int, Confirmation], None] = lambda number, confirmation: None
    promoted: Callable[[int, Promotion], None] = lambda number, promotion: None
    """A promotion round's longer probe of a trial's recipe ended (`--promote`)."""
    noise_measured: Callable[[Noise], None] = lambda noise: None
    notes: list[str] = field(default_factory=list)


def loss_when_unmeasured(spec: ModelSpec) -> float:
    return math.log(spec.vocab_size)


def _attach_artifacts(trial: Any, recipe: Recipe, workdir: Path) -> None:
    """The trial's recipe and, where a probe ran, its log, for the dashboard's artifact view."""
    import optuna

    workdir.mkdir(parents=True, exist_ok=True)
    recipe_path = workdir / "recipe.yaml"
    recipe_path.write_text(recipe.to_yaml(), encoding="utf-8")
    store = artifact_store()
    for path in (recipe_path, workdir / "probe.log"):
        if path.exists():
            optuna.artifacts.upload_artifact(
                artifact_store=store,
                file_path=str(path),
                study_or_trial=trial,
                mimetype="text/plain",
            )


def make_objective(
    prepared: PreparedRun,
    runner: ProbeRunner,
    events: RunEvents,
    space_points: frozenset[SpacePoint] | None = None,
) -> Callable:
    """The objective of a study searching `prepared.space`; with its `space_points`
    (coverage.space_points), a trial that starts once every one has been tried is given up."""
    settings, spec, space = prepared.settings, prepared.spec, prepared.space
    budget = settings.budget_bytes
    unmeasured_loss = loss_when_unmeasured(spec)
    trials_dir = trials_dir_of(prepared)
    gpu_pool: queue.Queue[str] | None = None
    groups = gpu_groups(settings, prepared.device)
    if groups:
        gpu_pool = queue.Queue()
        for group in groups:
            gpu_pool.put(group)

    host_budget_bytes = host_budget(settings.host_budget_bytes)
    predict_trial = trial_predictor(prepared)
    fits = fits_budget(prepared, predict_trial)  # a repair's prediction is its trial's

    running_here: set[int] = set()  # the trials this process's threads are running now

    def objective(trial: Any) -> tuple[float, float, float]:
        running_here.add(trial.number)
        try:
            return run_trial(trial)
        except KeyboardInterrupt:
            requeue_stopped_trial(trial, f"stopped by {stopped_by()}")
            raise
        except OSError as error:
            # A full disk or a read-only trials/: the run stops (the CLI says why in one line),
            # and the trial runs again in the next run rather than counting as failed.
            if error.filename is None:  # a write that failed after its file was opened
                error.filename = str(trials_dir / f"trial-{trial.number:04d}")
            with contextlib.suppress(Exception):  # a database on that full disk: the next
                # run finds the trial's worker gone and queues it again then
                requeue_stopped_trial(trial, unwritable(error) or first_line(error))
            raise
        finally:
            running_here.discard(trial.number)

    def run_trial(trial: Any) -> tuple[float, float, float]:
        record_worker(trial, worker_id())
        used_up = space_used_up(trial.study, space_points)
        if used_up or beyond_target(trial.study, trial.number, settings.trials, running_here):
            # Another run or worker on this study took the last slot or tried the space's last
            # recipe first: give this one up uncounted.
            import optuna

            mark_surplus(trial)
            trial.study.stop()
            raise optuna.TrialPruned(
                "every recipe of the space has been tried"
                if used_up
                else "the study reached its target of trials"
            )
        recipe = space.suggest(trial, settings.model, spec, settings.seq_len)
        prediction, memory_model = predict_trial(recipe)
        margin = margin_for(settings.memory_margin, memory_model, recipe.quantization)
        margined_peak = margin.estimate_bytes(prediction)
        host_bytes = prediction.host_bytes * recipe.num_gpus  # every rank on this machine
        workdir = trials_dir / f"trial-{trial.number:04d}"

        def record(
            status: TrialStatus,
            reason: str,
            values: tuple[float, ...] | None = None,
            result: ProbeResult | None = None,
        ) -> None:
            """Status and reason on the trial, its artifacts, and the event the CLI shows."""
            record_status(trial, status, reason)
            try:
                _attach_artifacts(trial, recipe, workdir)
            except OSError as error:  # the figures stand; a full disk stops the next probe
                events.notes.append(
                    f"trial {trial.number}'s recipe and probe log are not among the dashboard's "
                    f"artifacts: {unwritable(error) or first_line(error)}"
                )
            measured = status == TrialStatus.MEASURED and values is not None
            events.trial_finished(
                TrialSummary(
                    number=trial.number,
                    label=recipe.label(),
                    status=status,
                    predicted_peak_bytes=prediction.peak_bytes,
                    peak_memory_bytes=result.peak_memory_bytes if result else None,
                    memory_source=result.memory_source if result else "",
                    seconds=dict(result.seconds) if result else {},
                    tokens_per_second=values[1] if measured and values else None,
                    eval_loss=values[2] if measured and values else None,
                    reason=reason,
                    repair_of=trial_record(trial).repair_of,
                    host_peak_bytes=result.host_peak_bytes if result else None,
                    predicted_host_bytes=host_bytes,
                )
            )

        earlier = _earlier_trial_with_params(trial)
        if earlier is not None:
            # The sampler proposed a recipe already tried: reuse its figures instead of paying
            # for another probe, and keep it off the frontier so no recipe shows twice.
            copy_measurement(earlier, trial)
            # held to this run's budget, as this trial is (the earlier one may have run under
            # another)
            budgets = study_budgets(trial.study)
            record_constraint(trial, constraint_now(earlier, budgets), budgets.current_bytes)
            record(TrialStatus.DUPLICATE, f"same recipe as trial {earlier.number}")
            return tuple(earlier.values)
        record_prediction(
            trial,
            recipe,
            prediction.peak_bytes,
            prediction.breakdown,
            memory_model,
            margin.fraction,
            host_bytes,
        )
        events.trial_started(trial.number, recipe.label())

        def finish(
            status: TrialStatus,
            values: tuple[float, float, float],
            constraint: float,
            reason: str = "",
            result: ProbeResult | None = None,
        ) -> tuple[float, float, float]:
            record_constraint(trial, constraint, budget)
            record(status, reason, values, result)
            return values

        # the space's choices together name a recipe that cannot train (anywhere, or on this
        # device though it runs each choice): refused as `train` and a probe refuse it
        refusal = fp16_moments_refusal(recipe) or dora_refusal(recipe, prepared.device)
        if refusal:
            return finish(
                TrialStatus.REFUSED,
                (float(prediction.peak_bytes), UNMEASURED_TOKENS_PER_SECOND, unmeasured_loss),
                1.0,
                refusal,
            )

        if margined_peak > budget:
            nearest = nearest_fitting_params(space, trial.params, fits)
            if nearest is not None and trial_record(trial).repair_of is None:
                # Probe the closest recipe that fits next: the sampler asked for this region.
                trial.study.enqueue_trial(
                    nearest, user_attrs=repair_attrs(trial.number), skip_if_exists=True
                )
            return finish(
                TrialStatus.OVER_BUDGET_PREDICTED,
                (float(prediction.peak_bytes), UNMEASURED_TOKENS_PER_SECOND, unmeasured_loss),
                (margined_peak - budget) / budget,
                f"predicted {format_bytes(prediction.peak_bytes)}"
                + (f" + {100 * margin.fraction:.1f}% margin" if margin.fraction else "")
                + f" > budget {format_bytes(budget)}",
            )

        if host_bytes > host_budget_bytes:
            ranks = f" ({recipe.num_gpus} ranks)" if recipe.num_gpus > 1 else ""
            return finish(
                TrialStatus.OVER_BUDGET_PREDICTED,
                (float(prediction.peak_bytes), UNMEASURED_TOKENS_PER_SECOND, unmeasured_loss),
                (host_bytes - host_budget_bytes) / host_budget_bytes,
                f"predicted host memory {format_bytes(host_bytes)}{ranks} > host budget "
                f"{format_bytes(host_budget_bytes)}",
            )

        gpu = gpu_pool.get() if gpu_pool else None
        try:
            request = probe_request(prepared, recipe, settings.probe_steps, settings.seed, gpu)
            record_probe_place(trial, str(workdir), gpu)
            result = runner.run(request, workdir)
        finally:
            if gpu_pool is not None and gpu is not None:
                gpu_pool.put(gpu)
        record_probe_result(trial, result)

        if result.status == "ok":
            measured = float(result.peak_memory_bytes or 0)
            # On CUDA the measured peak is what the budget bounds; a CPU run's RSS is not GPU
            # memory, so there feasibility rests on the prediction.
            bound = measured if prepared.device.startswith("cuda") else margined_peak
            quality = quality_cost(settings.quality, result.eval_loss or 0.0, result.quality_score)
            constraint, reason = (bound - budget) / budget, ""
            held = result.host_peak_bytes or 0
            if held > host_budget_bytes:  # does not fit the machine, as over the card would not
                constraint = max(constraint, (held - host_budget_bytes) / host_budget_bytes)
                reason = (
                    f"measured host memory {format_bytes(held)} > host budget "
                    f"{format_bytes(host_budget_bytes)}"
                )
            return finish(
                TrialStatus.MEASURED,
                (measured, float(result.tokens_per_second or 0.0), quality),
                constraint,
                reason,
                result=result,
            )
        if result.status == "crash":
            record(TrialStatus.CRASH, result.reason)
            raise ProbeCrashed(result.reason)
        # Out of memory, NaN loss and timeout are properties of the recipe: infeasible.
        memory = float(
            max(
                result.peak_memory_bytes or 0,
                prediction.peak_bytes,
                budget if result.status == "oom" else 0,
            )
        )
        return finish(
            TrialStatus(result.status),
            (memory, UNMEASURED_TOKENS_PER_SECOND, unmeasured_loss),
            1.0,
            result.reason,
            result,
        )

    return objective


def _earlier_trial_with_params(trial: Any) -> Any | None:
    from optuna.trial import TrialState

    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.params == trial.params and other.number != trial.number:
            return other
    return None


def probe_request(
    prepared: PreparedRun, recipe: Recipe, steps: int, seed: int, visible_gpu: str | None = None
) -> ProbeRequest:
    """A probe of `recipe` on the study's data, device, budget, eval rows and caches."""
    settings = prepared.settings
    return ProbeRequest(
        recipe=recipe,
        data_path=str(settings.data_path),
        steps=steps,
        device=prepared.device,
        budget_bytes=settings.budget_bytes,
        seed=seed,
        # a probe on fewer GPUs than its group (--gpus-per-probe a range) sees the first ones
        visible_gpu=",".join(visible_gpu.split(",")[: recipe.num_gpus]) if visible_gpu else None,
        token_cache=prepared.token_cache,
        eval_rows=settings.eval_rows,
        quality=settings.quality,
        pad_token_id=prepared.pad_token_id,
        weight_cache=str((TRIALS_DIR / "cache").resolve()) if settings.weight_cache else None,
        # every probe of the run, a confirmation alone too, as its trials trained
        cpu_threads=cpu_threads_per_process(prepared.device, settings.workers, recipe.num_gpus),
    )
