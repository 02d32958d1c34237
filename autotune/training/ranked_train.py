"""`autotune train` of a recipe on several GPUs: one process (rank) per GPU, started, watched
and ended by the probes' launcher (autotune/probe_ranks.py), each running the same training
(autotune/training/train.py's run_training) on its share of every step.

The launcher writes the checked plan to <output>/ranks/request.json and starts `python -m
autotune.training.ranked_train REQUEST RESULT` once per rank. Rank 0 alone writes the run's
files (checkpoints, the best weights, the model or adapter, the monitor's records) and its
progress, which the launcher relays to the console; it also runs --merge after the others are
done. A rank that fails, is killed or exits without its result ends the others at once, and
the run fails in one line naming it. On CUDA rank r trains on the r-th of the GPUs given, over
nccl; on the CPU the ranks are gloo processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from autotune.errors import TrainingFailed, UsageError, first_line
from autotune.files import write_atomically
from autotune.recipe import Recipe
from autotune.training.train_plan import (
    RANKS_DIR,
    TrainCallbacks,
    TrainPlan,
    TrainReport,
    report_json,
)

PROGRESS_NAME = "progress.jsonl"


def chosen_gpus(gpus: tuple[str, ...], recipe: Recipe) -> tuple[str, ...]:
    """The CUDA devices a run trains on: those --gpus names, else the first num_gpus."""
    return gpus or tuple(str(g) for g in range(recipe.num_gpus))


def check_ranked(recipe: Recipe, device: str, gpus: tuple[str, ...]) -> None:
    """Refuse, in one line, what a distributed `autotune train` does not run."""
    from autotune.distributed import cpu_ranks_refusal, probe_refusal

    refusal = probe_refusal(recipe)  # DeepSpeed's strategies, where it is not installed
    if refusal:
        raise UsageError(f"autotune train cannot run this recipe: {refusal}")
    if not device.startswith("cuda"):
        if gpus:
            raise UsageError(f"--gpus {','.join(gpus)} needs CUDA, but the device is {device}")
        from autotune.training.deepspeed_engine import cpu_refusal

        refusal = cpu_refusal(recipe) or cpu_ranks_refusal(recipe.num_gpus)
        if refusal:
            raise UsageError(f"autotune train cannot run this recipe: {refusal}")
        return
    import torch

    wanted = chosen_gpus(gpus, recipe)
    if len(wanted) != recipe.num_gpus:
        raise UsageError(
            f"the recipe trains on {recipe.num_gpus} GPUs, but --gpus names {len(wanted)}"
        )
    count = torch.cuda.device_count()
    missing = [g for g in wanted if not (g.isdigit() and int(g) < count)]
    if not gpus and missing:
        raise UsageError(
            f"the recipe trains on {recipe.num_gpus} GPUs, but this machine has {count or 'none'}"
        )
    if missing or len(set(wanted)) != len(wanted):
        raise UsageError(
            f"--gpus {','.join(wanted)}: this machine has GPUs 0-{count - 1}, each named once"
            if count
            else f"the recipe trains on {recipe.num_gpus} GPUs, but this machine has none"
        )


def agreed(value: float, place: Any) -> float:
    """Rank 0's `value`, on every rank (one decision for all: an early stop, a best step)."""
    if place.world_size == 1:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=place.device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def over_ranks(value: float, how: str, place: Any) -> float:
    """`value` combined over the ranks: "sum", "max" or "mean" (every rank calls it)."""
    if place.world_size == 1:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=place.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM)
    return float(tensor.item()) / (place.world_size if how == "mean" else 1)


def save_model(model: Any, recipe: Recipe, output_dir: Path, place: Any) -> None:
    """Save the adapter (LoRA) or the model: on several ranks, FSDP's shards or ZeRO-3's
    partitions gathered to rank 0's CPU (every rank calls this) and saved from there; DDP's
    module and DeepSpeed's, unwrapped."""
    if place.world_size == 1:
        model.save_pretrained(output_dir)
        return
    from autotune.training.checkpoints import full_model_state

    state = full_model_state(model, trainable_only=recipe.method == "lora")
    if place.rank == 0:
        module = getattr(model, "module", model)  # DDP and DeepSpeed wrap it; FSDP2 does not
        module.save_pretrained(output_dir, state_dict=state)


def _plan_json(plan: TrainPlan) -> str:
    fields = dataclasses.asdict(plan)
    fields.update(
        recipe=plan.recipe.to_yaml(),
        data_path=str(plan.data_path),
        output_dir=str(plan.output_dir),
        token_cache=str(plan.token_cache),
    )
    return json.dumps(fields)


def _plan_of(text: str) -> TrainPlan:
    fields = json.loads(text)
    fields.update(
        recipe=Recipe.from_yaml(fields["recipe"]),
        data_path=Path(fields["data_path"]),
        output_dir=Path(fields["output_dir"]),
        token_cache=Path(fields["token_cache"]),
        gpus=tuple(fields["gpus"]),
    )
    return TrainPlan(**fields)


def _report_of(fields: dict[str, Any]) -> TrainReport:
    fields.update(
        output_dir=Path(fields["output_dir"]),
        merged_dir=Path(fields["merged_dir"]) if fields["merged_dir"] else None,
        evaluations=[(int(step), float(loss)) for step, loss in fields["evaluations"]],
    )
    return TrainReport(**fields)


class _ProgressRelay:
    """Rank 0's progress lines, handed to the console's callbacks as they come."""

    def __init__(self, path: Path, callbacks: TrainCallbacks) -> None:
        self.path, self.callbacks, self.offset = path, callbacks, 0

    def poll(self) -> None:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                text = handle.read().decode("utf-8")
        except FileNotFoundError:
            return
        complete = text[: text.rfind("\n") + 1]
        self.offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            kind, *values = json.loads(line)
            callback = getattr(self.callbacks, f"on_{kind}")
            if callback is not None:
                callback(*values)


def _progress_writer(path: Path) -> TrainCallbacks:
    def write(kind: str) -> Any:
        def record(*values: Any) -> None:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps([kind, *values]) + "\n")

        return record

    return TrainCallbacks(write("start"), write("step"), write("eval"))


def train_on_ranks(plan: TrainPlan, callbacks: TrainCallbacks) -> TrainReport:
    """Train `plan` as its recipe's num_gpus ranks; rank 0's report, or a one-line failure."""
    from autotune.probe_ranks import rank_result_path, start_ranks
    from autotune.training.child import PARENT_ENV

    folder = plan.output_dir / RANKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    request_path, result_path = folder / "request.json", folder / "result.json"
    log_path, progress_path = folder / "train.log", folder / PROGRESS_NAME
    progress_path.unlink(missing_ok=True)
    request_path.write_text(_plan_json(plan), encoding="utf-8")
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if plan.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(chosen_gpus(plan.gpus, plan.recipe))
    world = plan.recipe.num_gpus
    ranks = start_ranks(
        "autotune.training.ranked_train", world, request_path, result_path, log_path, env
    )
    relay = _ProgressRelay(progress_path, callbacks)
    try:
        ranks.wait(math.inf, relay.poll)  # a hung rank ends with its collective's timeout
    finally:  # also on Ctrl-C: no rank outlives the run
        if ranks.exit_code() is None:
            ranks.kill()
    relay.poll()
    report: dict[str, Any] = {}
    for rank in ranks.failure_order():
        path = rank_result_path(result_path, rank)
        if not path.exists():
            raise TrainingFailed(ranks.silent_reason(rank, log_path))
        outcome = json.loads(path.read_text(encoding="utf-8"))
        if outcome["status"] == "usage":
            raise UsageError(outcome["reason"])
        if outcome["status"] != "ok":
            raise TrainingFailed(f"rank {rank} of {world} failed: {outcome['reason']}")
        if rank == 0:  # rank 0 alone reports; the others' results only say they succeeded
            report = outcome["report"]
    return _report_of(report)


def main(argv: list[str]) -> NoReturn:
    """One rank: train, then write its outcome (ok with rank 0's report, usage or crash)."""
    from autotune.training.child import PARENT_ENV
    from autotune.training.loop import is_out_of_memory
    from autotune.training.ranks import end_rank
    from autotune.training.train import run_training

    request_path, result_path = map(Path, argv)
    if os.environ.get(PARENT_ENV):
        from autotune.lifetime import exit_with_parent

        exit_with_parent(int(os.environ[PARENT_ENV]), starter_outlives_child=True)
    plan = _plan_of(request_path.read_text(encoding="utf-8"))
    rank = int(os.environ["RANK"])
    callbacks = _progress_writer(request_path.with_name(PROGRESS_NAME))
    outcome: dict[str, Any] = {"status": "crash", "reason": ""}
    try:
        report = run_training(plan, callbacks if rank == 0 else TrainCallbacks())
        outcome = {"status": "ok", "report": json.loads(report_json(report)) if rank == 0 else {}}
    except UsageError as error:
        outcome = {"status": "usage", "reason": str(error)}
    except BaseException as error:  # noqa: BLE001 - every failure must become an outcome
        traceback.print_exc()
        what = "out of memory" if is_out_of_memory(error) else type(error).__name__
        outcome = {"status": "crash", "reason": f"{what}: {first_line(error, 300, '')}"}
    finally:
        # first: the launcher judges the ranks by their results
        write_atomically(result_path, json.dumps(outcome))
        end_rank()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
