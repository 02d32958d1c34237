"""Memory and throughput of one recipe on one GPU and spread over N, measured and predicted.

On a machine with N GPUs (random-init Qwen2-0.5B shape, seq 1024, 10-step probes; minutes):

    python bench/multi_gpu_bench.py --gpus 4 --out bench/results/multi_gpu.json

probes a full fine-tune (bf16, AdamW, the effective batch fixed) on one GPU, then under DDP,
FSDP2 and DeepSpeed ZeRO-2 and ZeRO-3 (where deepspeed is installed) on `--gpus` GPUs, one
process per GPU as `autotune run --gpus-per-probe` does, and prints each probe's peak per GPU
(the largest over ranks) beside the replay's and the formula's prediction, its tokens/s over
all ranks and its speed-up over one GPU. `--shape demo --device cpu
--gpus 2 --steps 2 --seq-len 32` runs the same path on the CPU, gloo processes standing in for
the GPUs (a smoke test; its figures say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import MODELS_DIR, ROOT, bench_inputs, write_results  # noqa: E402

from autotune.data.token_cache import cached_splits  # noqa: E402
from autotune.distributed import cpu_ranks_refusal, probe_refusal  # noqa: E402
from autotune.memory import estimate  # noqa: E402
from autotune.model_spec import load_model_spec  # noqa: E402
from autotune.prediction import predict  # noqa: E402
from autotune.probe import SubprocessProbeRunner  # noqa: E402
from autotune.recipe import Recipe  # noqa: E402
from autotune.replay import load_config  # noqa: E402
from autotune.training.build import load_tokenizer  # noqa: E402
from autotune.training.io import ProbeRequest  # noqa: E402
from autotune.units import parse_bytes  # noqa: E402

STRATEGIES = ("none", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2-0.5b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--gpus", type=int, default=2, help="GPUs (ranks) of the distributed probes"
    )
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="comma-separated, none first (DeepSpeed's left out where it is not installed)",
    )
    parser.add_argument("--budget", default="80GB", help="per GPU")
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--effective-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multi_gpu.json")
    args = parser.parse_args()
    refusal = cpu_ranks_refusal(args.gpus) if args.device == "cpu" else ""
    if refusal:  # as run and train refuse it
        print(f"multi_gpu_bench.py: --gpus {args.gpus} on --device cpu: {refusal}", file=sys.stderr)
        return 2

    directory, workdir, data = bench_inputs(
        args.shape, args.models_dir, args.device, "multi_gpu", rows=8 * args.effective_batch
    )
    spec = load_model_spec(str(directory))
    config = load_config(str(directory))
    _, cache = cached_splits(data, load_tokenizer(str(directory)), args.seq_len, 0, workdir / "c")
    runner = SubprocessProbeRunner(args.timeout, warm=False)
    rows: list[dict] = []
    strategies = [s for s in args.strategies.split(",") if not probe_refusal(_probed(s))]
    for strategy in strategies:
        gpus = 1 if strategy == "none" else args.gpus
        recipe = Recipe.from_dict(
            {
                "model": str(directory),
                "method": "full",
                "seq_len": args.seq_len,
                "micro_batch_size": args.micro_batch,
                "gradient_accumulation_steps": args.effective_batch // (args.micro_batch * gpus),
                "distributed": strategy,
                "num_gpus": gpus,
            }
        )
        replayed, used, _ = predict(spec, recipe, config)
        request = ProbeRequest(
            recipe=recipe,
            data_path=str(data),
            steps=args.steps,
            device=args.device,
            budget_bytes=parse_bytes(args.budget),
            seed=0,
            token_cache=str(cache),
        )
        result = runner.run(request, workdir / strategy)
        rows.append(
            {
                "strategy": strategy,
                "label": recipe.label(),
                "num_gpus": gpus,
                "status": result.status,
                "reason": result.reason,
                "peak_memory_bytes_per_gpu": result.peak_memory_bytes,
                "predicted_peak_bytes_per_gpu": replayed.peak_bytes,
                "memory_model": used,
                "formula_peak_bytes_per_gpu": estimate(spec, recipe).peak_bytes,
                "tokens_per_second": result.tokens_per_second,
                "trained_tokens": result.trained_tokens,
                "eval_loss": result.eval_loss,
                "seconds": result.seconds,
            }
        )
        print(
            f"{recipe.label():<28} {result.status:<5} "
            f"{(result.peak_memory_bytes or 0) / 2**30:7.2f} GiB/GPU "
            f"(predicted {replayed.peak_bytes / 2**30:6.2f}, {used})  "
            f"{(result.tokens_per_second or 0):>10,.0f} tok/s",
            flush=True,
        )
        write_results(args.out, "multi_gpu_bench.py", args.device, {}, rows=rows)
    single = rows[0]
    summary = {
        row["strategy"]: {
            "memory_per_gpu_vs_one_gpu": _ratio(row, single, "peak_memory_bytes_per_gpu"),
            "predicted_memory_per_gpu_vs_one_gpu": _ratio(
                row, single, "predicted_peak_bytes_per_gpu"
            ),
            "speed_up": _ratio(row, single, "tokens_per_second"),
        }
        for row in rows
    }
    write_results(args.out, "multi_gpu_bench.py", args.device, summary, rows=rows)
    print(summary, flush=True)
    return 0


def _probed(strategy: str) -> Recipe:
    return Recipe(distributed=strategy, num_gpus=1 if strategy == "none" else 2)


def _ratio(row: dict, single: dict, key: str) -> float | None:
    if not row.get(key) or not single.get(key):
        return None
    return round(row[key] / single[key], 4)


if __name__ == "__main__":
    sys.exit(main())
