"""The probe's child process: `python -m autotune.training.child REQUEST.json RESULT.json`.

It loads the model as the recipe says, runs the probe steps and the eval, and always writes a
result: measured figures on success, a classified failure (oom, nan, crash) otherwise. Running
in its own process keeps a crash, a leak or CUDA state of one recipe away from the next.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any

from autotune.errors import first_line
from autotune.training.io import ProbeRequest, ProbeResult

STARTED_ENV = "AUTOTUNE_PROBE_STARTED_AT"
"""Wall-clock time the parent launched the child, to measure interpreter and import start-up."""
FORKED_ENV = "AUTOTUNE_PROBE_FORKED"
"""Set by the warm probe server (autotune.training.zygote) in the processes it forks."""
PARENT_ENV = "AUTOTUNE_PROBE_PARENT_PID"
"""The study process; when it dies (kill -9 included) the probe stops too, freeing the GPU."""
MEMORY_HISTORY_ENV = "AUTOTUNE_MEMORY_HISTORY"
"""Set to 1: a CUDA probe records every allocation and free of the caching allocator and dumps
them (torch.cuda.memory._dump_snapshot) next to its result file, as memory_snapshot.pickle."""
MEMORY_SNAPSHOT_NAME = "memory_snapshot.pickle"


def records_memory_history(request: ProbeRequest) -> bool:
    return os.environ.get(MEMORY_HISTORY_ENV) == "1" and request.device.startswith("cuda")


def probe_tokenizer(request: ProbeRequest) -> Any:
    """The recipe's tokenizer, padding with the id the study checked against the model's
    vocab_size (the request's), so a probe feeds the model no id past its embeddings."""
    from autotune.training.build import load_tokenizer

    tokenizer = load_tokenizer(request.recipe.model)
    if request.pad_token_id is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(request.pad_token_id)
    return tokenizer


def run_probe(request: ProbeRequest, result: ProbeResult, meter_holder: list) -> None:
    from autotune.data.splits import load_splits
    from autotune.data.token_cache import load_token_cache
    from autotune.training.batching import step_batches
    from autotune.training.build import (
        build_optimizer,
        load_model,
        prepare_model,
    )
    from autotune.training.host_held import HOST_HELD, offloads
    from autotune.training.loop import (
        MemoryMeter,
        StepRecord,
        tokens_per_second,
        train_steps,
        warmup_steps,
    )
    from autotune.training.ranks import (
        distribute_model,
        evaluate_on_ranks,
        join_process_group,
        rank_share,
        train_with_engine,
    )

    recipe = request.recipe
    HOST_HELD.reset()
    phase_started = time.perf_counter()
    place = join_process_group(recipe, request.device)
    device = place.device

    def lap(name: str) -> None:
        nonlocal phase_started
        now = time.perf_counter()
        result.seconds[name] = now - phase_started
        phase_started = now

    if records_memory_history(request):
        import torch

        # from the first allocation on, the context's own tensor included; sizes and order
        # only (no stack per event), so a 7B probe's trace stays a few MB
        torch.cuda.init()
        torch.cuda.memory._record_memory_history(context=None, max_entries=2_000_000)
    meter = MemoryMeter(device)
    meter_holder.append(meter)
    result.memory_source = meter.source
    result.cuda_context_bytes = meter.context_bytes or None
    result.budget_enforced = meter.enforce_budget(request.budget_bytes)
    lap("device_init")

    tokenizer = probe_tokenizer(request)
    if request.token_cache and os.path.exists(request.token_cache):
        splits = load_token_cache(request.token_cache)
    else:
        splits = load_splits(
            request.data_path, tokenizer, recipe.seq_len, request.seed, request.eval_rows
        )
    batches = rank_share(
        step_batches(splits.train, request.steps, recipe.effective_batch_size, request.seed), place
    )
    lap("data")

    model, result.weights = load_model(recipe, device, request.weight_cache)
    lap("load")
    model = distribute_model(prepare_model(model, recipe), recipe, place)
    model, optimizer = train_with_engine(model, build_optimizer(model, recipe), recipe, place)
    lap("prepare")

    def progress(step: int, record: StepRecord) -> None:
        result.steps_done = step + 1
        print(
            f"step {step + 1}/{request.steps}: {record.tokens} tokens in {record.seconds:.3f} s, "
            f"loss {record.loss:.4f}",
            flush=True,
        )
        if step + 1 in request.eval_at_steps and step + 1 < request.steps:
            # between steps, outside their timing
            result.eval_losses[str(step + 1)] = evaluate_on_ranks(
                model, splits.eval, recipe, place, tokenizer.pad_token_id
            )

    def count_host_states() -> None:
        HOST_HELD.count_states(model, optimizer, device)

    records = train_steps(
        model,
        optimizer,
        batches,
        recipe,
        device,
        tokenizer.pad_token_id,
        progress,
        after_update=count_host_states if offloads(recipe) else None,
    )
    warmup = warmup_steps(len(records))
    result.seconds["warmup"] = sum(r.seconds for r in records[:warmup])
    result.seconds["steps"] = sum(r.seconds for r in records[warmup:])
    result.step_seconds = [round(r.seconds, 5) for r in records]
    phase_started = time.perf_counter()
    result.tokens_per_second = tokens_per_second(records)
    result.trained_tokens = sum(r.tokens for r in records)
    result.train_loss = records[-1].loss

    result.eval_loss = evaluate_on_ranks(model, splits.eval, recipe, place, tokenizer.pad_token_id)
    if request.steps in request.eval_at_steps:
        result.eval_losses[str(request.steps)] = result.eval_loss
    if request.quality != "eval_loss":
        from autotune.quality import generation_score

        result.quality_score = generation_score(
            model, splits.eval, tokenizer, request.quality, device
        )
    lap("eval")


def record_host_memory(request: ProbeRequest, result: ProbeResult, meter: Any) -> None:
    """Where the recipe offloads: the host peak its offloading held, and the growth of the
    process's peak resident set beside it."""
    from autotune.training.host_held import HOST_HELD, offloads

    if offloads(request.recipe):
        result.host_peak_bytes = HOST_HELD.peak_bytes
        result.host_rss_growth_bytes = meter.rss_growth_bytes()


def share_cpu_threads(request: ProbeRequest, result: ProbeResult) -> None:
    """On the CPU, train with the request's threads, where it gives them (its share of the
    cores among the processes that train at once), and record the count trained with."""
    if not request.device.startswith("cpu"):
        return
    import torch

    if request.cpu_threads is not None:
        torch.set_num_threads(request.cpu_threads)
    result.cpu_threads = torch.get_num_threads()


def main(argv: list[str]) -> int:
    request_path, result_path = argv
    if os.environ.get(PARENT_ENV):
        from autotune.lifetime import exit_with_parent

        # the trial's thread (or the probe server) waits for this process: the kernel's
        # signal is safe here, and acts while torch imports
        exit_with_parent(int(os.environ[PARENT_ENV]), starter_outlives_child=True)
    with open(request_path, encoding="utf-8") as handle:
        request = ProbeRequest.from_json(handle.read())
    result = ProbeResult(
        status="crash", device=request.device, forked=os.environ.get(FORKED_ENV) == "1"
    )
    launched = float(os.environ.get(STARTED_ENV, time.time()))
    result.seconds["start"] = time.time() - launched
    meters: list = []
    try:
        share_cpu_threads(request, result)
        run_probe(request, result, meters)
        result.status = "ok"
    except BaseException as error:  # noqa: BLE001 - every failure must become a result
        from autotune.training.loop import NonFiniteLoss, is_out_of_memory

        traceback.print_exc()
        first = first_line(error, 300, fallback="")
        if isinstance(error, NonFiniteLoss):
            result.status = "nan"
        elif is_out_of_memory(error):
            result.status = "oom"
        else:
            result.status = "crash"
        result.reason = f"{type(error).__name__}: {first}"
    finally:
        if meters:
            result.peak_memory_bytes, result.peak_allocated_bytes = meters[0].peak_bytes()
            record_host_memory(request, result, meters[0])

            if records_memory_history(request):
                import torch

                snapshot = os.path.join(os.path.dirname(result_path), MEMORY_SNAPSHOT_NAME)
                torch.cuda.memory._dump_snapshot(snapshot)
        result.write(result_path)  # first: the launcher judges the ranks by their results
        if request.recipe.num_gpus > 1:
            from autotune.training.ranks import end_rank

            end_rank()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
