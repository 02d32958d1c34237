"""The replay memory model against real CPU steps, over a seeded sample of combined recipes.

    python bench/replay_combos.py --count 100 --seed 0 --out bench/results/replay_combos_cpu.json

draws recipes as a study samples them (Optuna's random sampler over `SearchSpace.suggest`) from
the default space widened to every choice the dimension table (autotune/dimensions.py) allows,
on Qwen2-0.5B's architecture cut to CPU widths (the test suite's `cut_model`) at seq 128. Each
recipe's second optimizer step is traced on the CPU tensor by tensor (autotune.step_trace) and
replayed on the meta device (autotune.replay, no cuBLAS workspace: the CPU has none); where the
replay refuses, the formula (autotune.memory.estimate) that studies then use is compared (the
choices it refuses are CUDA-only or several GPUs, not drawn here; the formula's ratio is
recorded beside every row). It prints the predicted/traced ratio of allocated peaks, the
replay being rounded to 512-byte blocks (the tests allow 0.5%): under below 0.995, over above
1.05. The traced examples are all seq_len long, as the replay's rows are; a padded recipe of
several rows a micro-batch is also traced with its other rows 3/4 as long, as real data of
mixed lengths gives the probe's micro-batches (padding, and an attention mask), against the
replay told its rows are padded (padded_rows_ratio).

What the CPU trace cannot speak for, and how each is handled:
- SDPA's CPU kernels differ from CUDA's (which the replay emulates): in bf16 or fp16 both run
  a flash kernel (with a mask, CUDA's memory-efficient one keeps the same output, log-sum-exp
  and additive mask), whose outputs the trace sees (marked); fp32 attention, which CUDA runs in
  other kernels, is compared as eager (marked);
- dropout keeps an fp32 mask on the CPU where CUDA keeps one byte: the traced step runs it
  through torch.native_dropout, CUDA's dropout, whose CPU kernel returns a one-byte mask too
  (marked);
- bitsandbytes' int8 matmul trains through another autograd function on the CPU: the step is
  sent through the CUDA one (MatMul8bitLt) with bitsandbytes' CPU kernels, as
  tests/test_replay.py does; with one micro-batch a step the trace runs each step in its own loop
  where the replay keeps the previous step's graph until the next loss (marked, over only);
- activation offload's host copies are host memory on a GPU but CPU memory here: the trace
  leaves them out, as the replay counts them apart, and follows each copy back to the device
  (on the CPU the host copy itself) as a tensor of its own;
- paged optimizer states live outside the CUDA allocator: the replay's paged bytes are added
  back, as the CPU keeps them with the other states;
- packed rows are replayed as rows of several sequences (a block-diagonal mask); the traced
  full-length examples fill a row each, with no mask: packed recipes may read over;
- the loss is not checked for being finite: pure fp16 weights under torch's AdamW turn NaN
  after a step on random weights (its eps is 0 in fp16), and memory does not depend on values;
- CUDA-only choices (Liger's fused loss, torchao's CPU-offload optimizer, flash-attention 2)
  and several GPUs are not drawn; DoRA over an int8 base does not train on the CPU
  (bitsandbytes' CPU int8 matmul finds the weight's scales, SCB, unset): untraced.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import CONFIGS, write_results  # noqa: E402

from autotune.dimensions import DIMENSIONS  # noqa: E402
from autotune.recipe import Recipe  # noqa: E402
from autotune.step_trace import under_traced  # noqa: E402

CUDA_ONLY = {"loss": ("fused_linear",), "optimizer": ("adamw_cpu_offload",)}
ONE_GPU = ("distributed", "num_gpus", "offload")
"""Dimensions left at their defaults: several GPUs are not traced here."""
OVER = 0.05


def sweep_space() -> Any:
    """The default space with each closed dimension widened to every choice the table allows
    (CUDA-only ones left out) and dropout searched between none and the default's."""
    from autotune.recipe import load_yaml
    from autotune.space import DEFAULT_SPACE, SearchSpace

    data = load_yaml(DEFAULT_SPACE.read_text(encoding="utf-8"), str(DEFAULT_SPACE))
    for dimension in DIMENSIONS:
        if dimension.allowed is None or dimension.name in ONE_GPU:
            continue
        left_out = CUDA_ONLY.get(dimension.name, ())
        data[dimension.name] = [c for c in dimension.allowed if c not in left_out]
    data["attention"] = ["sdpa", "eager"]
    data["lora_dropout"] = [0.0, 0.05]
    return SearchSpace.from_dict(data, "replay_combos sweep space")


def sample_recipes(count: int, seed: int, model: str, seq_len: int) -> list[Recipe]:
    import optuna

    from autotune.model_spec import load_model_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = sweep_space()
    spec = load_model_spec(model)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.suggest(study.ask(), model, spec, seq_len) for _ in range(count)]


def compared_as(recipe: Recipe) -> tuple[Recipe, list[str]]:
    """The recipe the CPU trace can speak for, and what was changed or marked to get it."""
    notes = []
    if recipe.attention == "sdpa" and not _half_attention(recipe):
        recipe = recipe.replace(attention="eager")
        notes.append("sdpa compared as eager")
    elif recipe.attention == "sdpa":
        notes.append("sdpa: the CPU's flash kernel")
    if recipe.method == "lora" and recipe.lora_dropout > 0:
        notes.append("dropout via native_dropout")
    if recipe.quantization == "int8":
        notes.append("int8 via MatMul8bitLt")
        if recipe.gradient_accumulation_steps == 1:
            notes.append("int8 one micro-batch: trace drops the last step's graph")
    if recipe.activation_offload:
        notes.append("host copies left out")
    return recipe, notes


def _half_attention(recipe: Recipe) -> bool:
    """Attention in bf16 or fp16, where CUDA and the CPU both run a flash kernel (or, with a
    mask, kernels that keep the same tensors: output, log-sum-exp, the additive mask); fp32
    attention (fp32 weights, or a k-bit base's fp32 activations) takes CUDA's memory-efficient
    or math kernel and the CPU's flash one."""
    from autotune.precisions import PRECISIONS

    return recipe.quantization == "none" and PRECISIONS[recipe.precision].compute_bytes == 2


@contextlib.contextmanager
def cuda_like_cpu_step(recipe: Recipe) -> Iterator[None]:
    """bitsandbytes' int8 matmul through its CUDA autograd function, dropout through CUDA's op
    (a one-byte mask), and activation offload's host copies made outside the tracer (host memory
    on a GPU)."""
    import bitsandbytes
    import bitsandbytes.autograd._functions as functions
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch.utils._python_dispatch import _disable_current_modes

    from autotune.training import offload

    saved_matmul, saved_hooks = bitsandbytes.matmul, offload.host_hooks
    saved_dropout = F.dropout

    def cuda_matmul(A, B, out=None, state=None, threshold=0.0, bias=None):  # noqa: ANN001, N803
        state = state or functions.MatmulLtState()
        state.threshold = threshold
        return functions.MatMul8bitLt.apply(A, B, out, bias, state)

    def untraced_hooks() -> Any:
        pack_unpack = saved_hooks()
        pack, unpack = pack_unpack.pack_hook, pack_unpack.unpack_hook

        def quiet_pack(tensor: Any) -> Any:
            with _disable_current_modes():
                return pack(tensor)

        def copy_back(packed: Any) -> Any:
            # on the CPU the copy "back" is the host copy itself; CUDA's is a new device tensor
            unpacked = unpack(packed)
            return unpacked if isinstance(packed, torch.Tensor) else unpacked.clone()

        return torch.autograd.graph.saved_tensors_hooks(quiet_pack, copy_back)

    def one_byte_mask_dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002, ANN001
        return torch.native_dropout(input, p, training)[0] if training and p > 0 else input

    if recipe.quantization == "int8":
        bitsandbytes.matmul = cuda_matmul
    offload.host_hooks = untraced_hooks
    F.dropout = one_byte_mask_dropout
    try:
        yield
    finally:
        bitsandbytes.matmul, offload.host_hooks = saved_matmul, saved_hooks
        F.dropout = saved_dropout


def measure(recipe: Recipe, config: Any, spec: Any) -> dict[str, Any]:
    from autotune.batchings import BATCHINGS
    from autotune.memory import estimate

    compared, notes = compared_as(recipe)
    row: dict[str, Any] = {"sampled": recipe.label(), "fields": _fields(recipe), "notes": notes}
    started = time.perf_counter()
    try:
        trace = _trace(compared)
    except Exception as error:  # noqa: BLE001 - a recipe the CPU cannot train is reported
        row.update(model="-", untraced=f"{type(error).__name__}: {error}"[:300])
        return row
    row["traced_bytes"] = trace.peak_bytes
    row["at_peak"] = [list(r) for r in trace.by_op()[:8]]
    predicted = _predicted(compared, config, spec, row)
    row["predicted_bytes"] = predicted
    row["ratio"] = predicted / trace.peak_bytes
    # the formula's figure beside it, for the record: studies use it where the replay refuses
    row["formula_ratio"] = (
        estimate(spec, compared).allocated_without_cublas_bytes / trace.peak_bytes
    )
    if BATCHINGS[compared.batching].pads(compared.micro_batch_size):
        # a step whose micro-batches are padded, against the prediction told so
        padded_predicted = _predicted(compared, config, spec, {}, padded=True)
        row["padded_rows_ratio"] = padded_predicted / _trace(compared, padded=True).peak_bytes
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _predicted(
    recipe: Recipe, config: Any, spec: Any, row: dict[str, Any], padded: bool = False
) -> int:
    """The replay's allocated peak (paged states added back), or the formula's where the replay
    refuses or fails (the model used and why noted in `row`)."""
    from autotune.memory import estimate
    from autotune.prediction import not_replayable
    from autotune.replay import replay

    refusal = not_replayable(recipe)
    if refusal:
        row.update(model="formula", refusal=refusal)
        return estimate(spec, recipe, padded=padded).allocated_without_cublas_bytes
    try:
        result = replay(recipe, config, cublas_workspace_bytes=0, padded=padded)
    except Exception as error:  # noqa: BLE001 - reported: a replay that cannot run
        row.update(model="replay", error=f"replay: {type(error).__name__}: {error}"[:300])
        predicted = estimate(spec, recipe, padded=padded).allocated_without_cublas_bytes
        row["formula_bytes"] = predicted
        return predicted
    row["model"] = "replay"
    return result.peak_allocated_bytes + result.paged_bytes


def _trace(recipe: Recipe, padded: bool = False) -> Any:
    """The traced step, whatever its loss: pure fp16 weights under torch's AdamW turn NaN after
    one step on the CPU's random weights (AdamW's eps of 1e-8 is 0 in fp16), and what a step
    allocates does not depend on the values (int8's outlier columns aside, whose base weights
    stay finite); with `padded`, each micro-batch's other rows 3/4 as long (trace_step)."""
    import types

    from autotune.step_trace import trace_step
    from autotune.training import loop

    saved = loop.math
    loop.math = types.SimpleNamespace(isfinite=lambda value: True)  # type: ignore[assignment]
    try:
        with cuda_like_cpu_step(recipe):
            return trace_step(recipe, padded=padded)
    finally:
        loop.math = saved


def _fields(recipe: Recipe) -> dict[str, Any]:
    fields = recipe.to_dict()
    return {k: v for k, v in fields.items() if k not in ("model", "learning_rate")}


def verdict(row: dict[str, Any]) -> str:
    """ok, under (below the traced peak), over (5% above it), error (the replay failed) or
    untraced (the CPU could not train the step)."""
    if "untraced" in row:
        return "untraced"
    if "error" in row:
        return "error"
    if under_traced(row["ratio"]):
        return "under"
    return "over" if row["ratio"] > 1 + OVER else "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="recipes to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()

    import torch

    from autotune.model_spec import load_model_spec
    from autotune.random_model import CPU_WIDTHS, build_random_model, cut_config
    from autotune.replay import load_config

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        config_dict = cut_config(CONFIGS["qwen2-0.5b"], **CPU_WIDTHS, seq_len=args.seq_len)
        model = str(build_random_model(config_dict, Path(scratch) / "model"))
        config, spec = load_config(model), load_model_spec(model)
        for index, recipe in enumerate(sample_recipes(args.count, args.seed, model, args.seq_len)):
            row = measure(recipe, config, spec)
            row["verdict"] = verdict(row)
            rows.append(row)
            ratio = f"{row['ratio']:.4f}" if "ratio" in row else "   -  "
            if "padded_rows_ratio" in row:
                ratio += f" (padded rows {row['padded_rows_ratio']:.4f})"
            print(
                f"{index:3d} {row['verdict']:5s} {ratio} {row.get('model', '-'):7s} "
                f"{row['sampled']}  {'; '.join(row['notes'])} "
                f"{row.get('error', row.get('untraced', ''))}",
                flush=True,
            )
    verdicts = ("ok", "under", "over", "error", "untraced")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in verdicts}
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    padded = [r["padded_rows_ratio"] for r in rows if "padded_rows_ratio" in r]
    counts["padded_rows_under"] = sum(under_traced(ratio) for ratio in padded)
    print(
        f"{len(rows)} recipes: {counts['ok']} within -0.5%..+5%, {counts['under']} under, "
        f"{counts['over']} over 5%, {counts['error']} replay errors, "
        f"{counts['untraced']} the CPU could not train; "
        f"ratio min {min(ratios):.4f} max {max(ratios):.4f}"
    )
    if padded:
        print(
            f"with padded micro-batches: {counts['padded_rows_under']} of {len(padded)} under, "
            f"ratio min {min(padded):.4f} max {max(padded):.4f}"
        )
    if args.out:
        write_results(
            args.out,
            "replay_combos.py",
            "cpu",
            counts,
            model=f"qwen2-0.5b cut to {', '.join(f'{k} {v}' for k, v in CPU_WIDTHS.items())}",
            seq_len=args.seq_len,
            rows=rows,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
