"""`autotune train`: the real fine-tune with a recipe, on the probe's model builder and step loop.

Checkpoints hold the trainable weights, optimizer and scheduler state and the step, so `--resume`
continues where a run stopped. The result is a peft adapter (LoRA) or a full model directory.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autotune.cpu_nf4 import unpack_cpu_nf4
from autotune.data.splits import check_seed
from autotune.errors import UsageError
from autotune.files import write_atomically
from autotune.recipe import Recipe
from autotune.recipe_checks import fp16_moments_refusal
from autotune.training.checkpoints import (
    BATCH_KEY,
    STRATEGY_KEY,
    check_resumable,
    check_steps_left,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from autotune.training.early_stopping import (
    EarlyStopping,
    check_evaluation,
    forget_best,
    restore_best,
    save_best,
)
from autotune.training.merge import check_merge, merge_adapter, merge_note
from autotune.training.monitor import check_report_to, open_monitor
from autotune.training.output_dir import RUN_MARKER, check_output_dir, check_same_training
from autotune.training.schedule import lr_factor
from autotune.training.train_data import (
    TOKEN_CACHE_DIR,
    holds_only_token_cache,
    tokenize_for_training,
)
from autotune.training.train_plan import (
    TrainCallbacks,
    TrainPlan,
    TrainReport,
    check_length,
    report_json,
)
from autotune.units import count_of

__all__ = ["TrainCallbacks", "TrainPlan", "TrainReport", "run_training", "train"]


def _epoch_batches(
    example_count: int, effective_batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """The example indices of each step of an epoch; examples are read only when trained on."""
    order = list(range(example_count))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [
        order[i : i + effective_batch_size]
        for i in range(0, len(order) - effective_batch_size + 1, effective_batch_size)
    ]


def train(
    recipe: Recipe,
    data_path: Path,
    output_dir: Path,
    *,
    epochs: float | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    budget_bytes: int | None = None,
    device: str = "cpu",
    gpus: tuple[str, ...] = (),
    seed: int = 0,
    save_every_steps: int = 100,
    skip_bad_rows: bool = False,
    eval_rows: int | None = None,
    eval_steps: int | None = None,
    early_stopping_patience: int | None = None,
    merge_dtype: str | None = None,
    report_to: str = "none",
    logging_steps: int = 10,
    predicted_peak_bytes: int | None = None,
    predict_peak: Callable[[tuple[int, int] | None], int | None] | None = None,
    tokenize_progress: Callable[[int, int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[int, float, bool], None] | None = None,
) -> TrainReport:
    """Fine-tune with `recipe` and save the adapter or model to `output_dir`.

    With `eval_steps`, the held-out split is scored every `eval_steps` optimizer steps and at
    the end; the run stops after `early_stopping_patience` evaluations without a better eval
    loss (default 3; 0 never stops) and the best weights are the ones saved. With `merge_dtype`
    (LoRA recipes), the base with the adapter merged is saved too, in `output_dir`/merged.
    With `report_to` tensorboard or wandb, train loss, learning rate, tokens/s and peak memory
    (beside `predicted_peak_bytes`, else `predict_peak((shortest, longest) training example)`)
    are logged every `logging_steps` steps, eval losses as they come. The data is tokenized
    once, into --output's token cache (train_data.py; `tokenize_progress(done, total)`).
    `on_eval(step, eval_loss, is_best)` is called after each evaluation. A recipe on several
    GPUs trains as that many ranks of one process group, on `gpus` (CUDA indices; the first
    num_gpus where none are given) or as gloo processes on the CPU (ranked_train.py)."""
    check_length(epochs, max_steps, save_every_steps)
    check_seed(seed)
    check_report_to(report_to)
    if logging_steps < 1:
        raise UsageError(f"--logging-steps must be at least 1, got {logging_steps}")
    patience = check_evaluation(eval_steps, early_stopping_patience)
    if merge_dtype is not None:
        check_merge(recipe, merge_dtype)
    if not recipe.model:
        raise UsageError("the recipe names no model; add `model:` or export it from a study")
    cannot_train = fp16_moments_refusal(recipe)
    if cannot_train:
        raise UsageError(f"recipe: {cannot_train}")
    if recipe.num_gpus > 1:
        from autotune.training.ranked_train import check_ranked

        check_ranked(recipe, device, gpus)
    elif gpus:
        raise UsageError(
            f"--gpus is for a recipe on several GPUs; this one trains on one (choose it with "
            f"CUDA_VISIBLE_DEVICES={gpus[0]})"
        )
    from autotune.data.rows import checked_scan

    data_scan = checked_scan(data_path, skip_bad_rows)
    created = not output_dir.exists()
    check_output_dir(output_dir, recipe.model, resume, overwrite)
    resumed_checkpoint = latest_checkpoint(output_dir) if resume else None
    if resumed_checkpoint is not None:  # before any rank builds the model
        check_same_training(output_dir, recipe)
        check_resumable(resumed_checkpoint, recipe)
        check_steps_left(resumed_checkpoint, max_steps)
    if overwrite and not resume:
        for old in checkpoints(output_dir):  # a new run: no old step may be resumed later
            shutil.rmtree(old)
        forget_best(output_dir)
    callbacks = TrainCallbacks(on_start, on_step, on_eval)
    try:
        splits, token_cache = tokenize_for_training(
            recipe, data_path, output_dir, seed, eval_rows, data_scan.usable_rows, tokenize_progress
        )
        if predicted_peak_bytes is None and predict_peak is not None:
            predicted_peak_bytes = predict_peak(splits.train.length_span)
        plan = TrainPlan(
            recipe=recipe,
            data_path=data_path,
            output_dir=output_dir,
            device=device,
            token_cache=token_cache,
            gpus=gpus,
            epochs=epochs,
            max_steps=max_steps,
            resume=resume,
            budget_bytes=budget_bytes,
            seed=seed,
            save_every_steps=save_every_steps,
            eval_rows=eval_rows,
            eval_steps=eval_steps,
            patience=patience,
            merge_dtype=merge_dtype,
            report_to=report_to,
            logging_steps=logging_steps,
            predicted_peak_bytes=predicted_peak_bytes,
        )
        if recipe.num_gpus > 1:
            from autotune.training.ranked_train import train_on_ranks

            report = train_on_ranks(plan, callbacks)
        else:
            report = run_training(plan, callbacks)
    except UsageError:  # input found unusable once read (too few rows): no --output left
        if created and output_dir.is_dir() and holds_only_token_cache(output_dir):
            shutil.rmtree(output_dir)
        raise
    # the tokenized data stays only while a stopped run may continue: a finished --output holds
    # what it trained, not its training data (an upload of the folder would carry it)
    shutil.rmtree(output_dir / TOKEN_CACHE_DIR, ignore_errors=True)
    return report


def run_training(plan: TrainPlan, callbacks: TrainCallbacks) -> TrainReport:
    """The training of a checked plan: in this process, or in each rank of a distributed
    recipe (it joins the process group; rank 0 alone writes files and calls `callbacks`)."""
    import torch

    from autotune.data.token_cache import load_token_cache
    from autotune.model_spec import load_model_spec
    from autotune.training.build import (
        build_model,
        build_optimizer,
        load_tokenizer,
        unloadable_weights,
    )
    from autotune.training.deepspeed_engine import name_deepspeed_accelerator
    from autotune.training.loop import MemoryMeter, timed_steps, tokens_per_second, train_steps
    from autotune.training.ranked_train import agreed, over_ranks, save_model
    from autotune.training.ranks import (
        distribute_model,
        evaluate_on_ranks,
        join_process_group,
        rank_share,
        train_with_engine,
    )

    recipe, output_dir, seed = plan.recipe, plan.output_dir, plan.seed
    if recipe.expandable_segments:
        # Read when the CUDA allocator starts, which is at the first allocation below.
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    place = join_process_group(recipe, plan.device)
    device = place.device
    name_deepspeed_accelerator(device)
    writer = place.rank == 0
    on_start, on_step, on_eval = (
        (callbacks.on_start, callbacks.on_step, callbacks.on_eval) if writer else (None,) * 3
    )
    meter = MemoryMeter(device)
    budget_enforced = meter.enforce_budget(plan.budget_bytes) if plan.budget_bytes else False
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(recipe.model, load_model_spec(recipe.model).vocab_size)
    splits = load_token_cache(plan.token_cache)  # tokenized and checked by train()
    steps_per_epoch = len(splits.train) // recipe.effective_batch_size
    if steps_per_epoch < 1:
        raise UsageError(
            f"{plan.data_path} has {count_of(len(splits.train), 'training row')}, fewer than "
            f"one effective batch of {recipe.effective_batch_size}"
        )
    total_steps = plan.max_steps or max(1, math.ceil(steps_per_epoch * (plan.epochs or 1.0)))
    try:
        model = build_model(recipe, device)
    except Exception as error:  # noqa: BLE001 - no weights, unreadable or mismatched files
        problem = unloadable_weights(error)
        if problem is None:
            raise
        raise UsageError(f"cannot load the weights of model {recipe.model!r}: {problem}") from None
    model = distribute_model(model, recipe, place)  # before the optimizer (FSDP2's shards)
    client_optimizer = build_optimizer(model, recipe)
    # a ZeRO recipe trains through DeepSpeed's engine, stepping the client optimizer on its
    # partitions with the same parameter groups, so the schedule sets their learning rate
    model, optimizer = train_with_engine(model, client_optimizer, recipe, place)
    scheduler = torch.optim.lr_scheduler.LambdaLR(client_optimizer, lr_factor(recipe, total_steps))
    stopper = EarlyStopping(plan.patience) if plan.patience is not None else None
    start_step = 0
    checkpoint = latest_checkpoint(output_dir) if plan.resume else None
    if plan.resume and checkpoint is None:
        raise UsageError(f"--resume: no checkpoint in {output_dir}")
    if checkpoint is not None:  # train() has checked that this run can continue it
        start_step, extra = load_checkpoint(model, optimizer, scheduler, checkpoint, device)
        if stopper is not None and "early_stopping" in extra:
            stopper.load_state_dict(extra["early_stopping"])
    if writer:
        write_atomically(output_dir / RUN_MARKER, recipe.to_yaml())
    if on_start:
        on_start(start_step, total_steps)

    monitor = open_monitor(plan.report_to, output_dir, recipe) if writer else None

    def log_step(at_step: int, record: Any, loss: float) -> None:
        if monitor is None or (at_step % plan.logging_steps and at_step != total_steps):
            return
        scalars = {
            "train/loss": loss,
            "train/learning_rate": scheduler.get_last_lr()[0],
            "train/tokens_per_second": record.tokens / record.seconds,
            "memory/peak_bytes": meter.peak_bytes()[0],
        }
        if plan.predicted_peak_bytes is not None:
            scalars["memory/predicted_peak_bytes"] = plan.predicted_peak_bytes
        monitor.log(at_step, scalars)

    def evaluated() -> float:
        # rank 0's loss decides for all, so that they stop and keep the same step
        eval_loss = evaluate_on_ranks(model, splits.eval, recipe, place, tokenizer.pad_token_id)
        if recipe.quantization == "nf4" and device == "cpu":  # training goes on after it
            unpack_cpu_nf4(model)
        return agreed(eval_loss, place)

    def run_eval(at_step: int) -> None:
        assert stopper is not None
        eval_loss = evaluated()
        if monitor is not None:
            monitor.log(at_step, {"eval/loss": eval_loss})
        is_best = stopper.observe(at_step, eval_loss)
        if is_best:
            save_best(model, output_dir, at_step, eval_loss)
        if on_eval:
            on_eval(at_step, eval_loss, is_best)

    def checkpoint_at(at_step: int) -> None:
        extra: dict[str, Any] = {
            BATCH_KEY: recipe.effective_batch_size,
            STRATEGY_KEY: recipe.distributed,
        }
        if stopper:
            extra["early_stopping"] = stopper.state_dict()
        save_checkpoint(model, optimizer, scheduler, at_step, output_dir, device, extra=extra)

    def stopping() -> bool:
        return stopper is not None and stopper.should_stop

    records = []
    losses: list[float] = []
    step = start_step
    best_step: int | None = None
    try:
        while step < total_steps and not stopping():
            epoch, offset = divmod(step, steps_per_epoch)
            batches = _epoch_batches(len(splits.train), recipe.effective_batch_size, seed, epoch)
            chunk_indices = batches[offset : offset + (total_steps - step)]
            # Lazy, so that an evaluation that stops the run takes effect before the next step;
            # each rank trains on its share of every step's sequences.
            chunk = (
                rank_share([[splits.train[i] for i in indices]], place)[0]
                for indices in chunk_indices
                if not stopping()
            )

            def after_step(index: int, record: Any, first: int = step) -> None:
                current = first + index + 1
                # the mean of the ranks' losses: what their averaged gradients descend
                loss = over_ranks(record.loss, "mean", place)
                losses.append(loss)
                log_step(current, record, loss)  # with the learning rate this step used
                scheduler.step()
                if plan.eval_steps and current % plan.eval_steps == 0:
                    run_eval(current)
                if (
                    current % plan.save_every_steps == 0
                    and current < total_steps
                    and not stopping()
                ):
                    checkpoint_at(current)
                if on_step:
                    on_step(current, loss)

            done = train_steps(
                model, optimizer, chunk, recipe, device, tokenizer.pad_token_id, after_step
            )
            records += done
            step += len(done)
        if stopper is not None and stopper.last_step != step:
            run_eval(step)  # the end is scored too, so that it can be the best
        checkpoint_at(step)  # the last trained state, for --resume, whatever is kept as best
        if stopper is not None:
            best_step = restore_best(model, output_dir)
            eval_loss = stopper.best_loss
        else:
            eval_loss = evaluated()
            if monitor is not None:
                monitor.log(step, {"eval/loss": eval_loss})
    finally:
        if monitor is not None:
            monitor.close()
    save_model(model, recipe, output_dir, place)
    peak = int(over_ranks(meter.peak_bytes()[0], "max", place))
    merged_dir = None
    if writer:
        tokenizer.save_pretrained(output_dir)
        if plan.merge_dtype is not None:
            del model, optimizer  # the merge loads the base afresh
            merged_dir = merge_adapter(recipe, output_dir, plan.merge_dtype, device)
    timed = timed_steps(records)  # the same on every rank, which step together
    report = TrainReport(
        steps=step,
        resumed_from_step=start_step,
        # summed over the ranks
        tokens_per_second=over_ranks(tokens_per_second(records), "sum", place) if timed else None,
        timed_steps=timed,
        peak_memory_bytes=peak,
        memory_source=meter.source,
        eval_loss=eval_loss,
        # no step trained here (a resume of a run that stopped early or ended): none measured
        train_loss=statistics.fmean(losses[-10:]) if losses else None,
        output_dir=output_dir,
        budget_enforced=budget_enforced,
        losses=losses,
        best_step=best_step,
        stopped_early=stopper is not None and stopper.should_stop,
        evaluations=list(stopper.history) if stopper else [],
        merged_dir=merged_dir,
        merge_note=merge_note(recipe) if merged_dir else None,
        monitor_location=monitor.location if monitor else None,
    )
    if writer:
        (output_dir / "train_metrics.json").write_text(report_json(report), encoding="utf-8")
    return report
