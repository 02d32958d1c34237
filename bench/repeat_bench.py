"""How far two probes of the same recipe agree, and how fast recipes are against the default.

On a CUDA machine (random-init Qwen2-7B shape, 24 GB budget, seq 1024, 20-step probes):

    python bench/repeat_bench.py --out bench/results/repeat_h100.json

probes each named recipe `--repeat` times with the same seed (the same probe again: how far the
measurement itself moves) for each of `--seeds` seeds (the data order and the adapter's
initialisation change; the lengths do not, every sample is seq_len long) and prints tokens/s,
peak memory and eval loss with their spread: the run-to-run noise a frontier difference has to
beat. Each probe's step times are kept, with their coefficient of variation after warm-up.
`--shape demo --device cpu --steps 2 --seq-len 64` runs the same path on
the CPU (a smoke test; its figures say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import MODELS_DIR, ROOT, bench_inputs, write_results  # noqa: E402

from autotune.data.token_cache import cached_splits  # noqa: E402
from autotune.memory import estimate  # noqa: E402
from autotune.model_spec import load_model_spec  # noqa: E402
from autotune.probe import SubprocessProbeRunner  # noqa: E402
from autotune.recipe import Recipe  # noqa: E402
from autotune.training.build import load_tokenizer  # noqa: E402
from autotune.training.io import ProbeRequest  # noqa: E402
from autotune.units import parse_bytes  # noqa: E402

LORA = {"method": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
RECIPES = {
    # the common default the speed-up is quoted against (the study's qlora_default baseline)
    "qlora-default": {**LORA, "quantization": "nf4", "micro_batch_size": 1},
    "qlora-mb4": {**LORA, "quantization": "nf4", "micro_batch_size": 4},
    "lora-qv-mb2": {**LORA, "lora_target_modules": ["q_proj", "v_proj"], "micro_batch_size": 2},
    "lora-all-mb2": {**LORA, "micro_batch_size": 2},
}


def spread(values: list[float]) -> float | None:
    """(max - min) / mean: how far the repeats of one recipe are apart."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    return (max(values) - min(values)) / statistics.mean(values)


def step_time_variation(step_seconds: list[float]) -> float | None:
    """Standard deviation over mean of the step times after warm-up."""
    from autotune.training.loop import warmup_steps

    measured = step_seconds[warmup_steps(len(step_seconds)) :]
    if len(measured) < 2:
        return None
    return statistics.stdev(measured) / statistics.mean(measured)


def worst(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def summarize(label: str, results: dict[int, list]) -> dict:
    """Spreads within each seed (the same probe repeated) and across seeds (first probe each)."""
    ok = {seed: [r for r in probes if r.status == "ok"] for seed, probes in results.items()}
    firsts = [probes[0] for probes in ok.values() if probes]
    every = [r for probes in ok.values() for r in probes]
    losses = [r.eval_loss for r in firsts]
    return {
        "label": label,
        "probes": sum(len(p) for p in results.values()),
        "ok": len(every),
        "median_tokens_per_second": statistics.median([r.tokens_per_second for r in every])
        if every
        else None,
        "tokens_per_second_spread_same_seed": worst(
            [spread([r.tokens_per_second for r in p]) for p in ok.values()]
        ),
        "peak_memory_spread_same_seed": worst(
            [spread([r.peak_memory_bytes for r in p]) for p in ok.values()]
        ),
        "tokens_per_second_spread_across_seeds": spread([r.tokens_per_second for r in firsts]),
        "peak_memory_spread_across_seeds": spread([r.peak_memory_bytes for r in firsts]),
        "eval_loss_spread_abs": max(losses) - min(losses) if len(losses) > 1 else None,
        "median_step_time_variation": statistics.median(
            [v for r in every if (v := step_time_variation(r.step_seconds)) is not None]
            or [float("nan")]
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", default="24GB")
    parser.add_argument("--recipes", default="lora-qv-mb2,lora-all-mb2", help=", ".join(RECIPES))
    parser.add_argument("--repeat", type=int, default=2, help="probes with the same seed")
    parser.add_argument("--seeds", type=int, default=2, help="seeds, each probed --repeat times")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "repeat.json")
    args = parser.parse_args()

    directory, workdir, data = bench_inputs(
        args.shape, args.models_dir, args.device, "repeat", rows=240
    )
    spec = load_model_spec(str(directory))
    tokenizer = load_tokenizer(str(directory))
    runner = SubprocessProbeRunner(args.timeout)
    rows: list[dict] = []
    summary: dict[str, dict] = {}
    for name in args.recipes.split(","):
        recipe = Recipe.from_dict(
            {"model": str(directory), "seq_len": args.seq_len, **RECIPES[name.strip()]}
        )
        predicted = estimate(spec, recipe).peak_bytes
        results: dict[int, list] = {}
        for seed in range(args.seeds):
            _, cache = cached_splits(data, tokenizer, recipe.seq_len, seed, workdir / "cache")
            for attempt in range(args.repeat):
                request = ProbeRequest(
                    recipe=recipe,
                    data_path=str(data),
                    steps=args.steps,
                    device=args.device,
                    budget_bytes=parse_bytes(args.budget),
                    seed=seed,
                    token_cache=str(cache),
                )
                result = runner.run(request, workdir / f"{name}-{seed}-{attempt}")
                results.setdefault(seed, []).append(result)
                rows.append(
                    {
                        "recipe": name,
                        "label": recipe.label(),
                        "seed": seed,
                        "attempt": attempt,
                        "status": result.status,
                        "reason": result.reason,
                        "forked": result.forked,
                        "tokens_per_second": result.tokens_per_second,
                        "peak_memory_bytes": result.peak_memory_bytes,
                        "predicted_peak_bytes": predicted,
                        "eval_loss": result.eval_loss,
                        "seconds": result.seconds,
                        "step_seconds": result.step_seconds,
                        "step_time_variation": step_time_variation(result.step_seconds),
                    }
                )
                print(
                    f"{name:<14} seed {seed} #{attempt}: {result.status:<4} "
                    f"{(result.tokens_per_second or 0):>9,.0f} tok/s  "
                    f"{(result.peak_memory_bytes or 0) / 2**30:6.2f} GiB "
                    f"(predicted {predicted / 2**30:6.2f})  eval loss {result.eval_loss or 0:.4f}  "
                    f"({result.seconds.get('total', 0):.0f} s)",
                    flush=True,
                )
                write_results(args.out, "repeat_bench.py", args.device, summary, rows=rows)
        summary[name] = summarize(recipe.label(), results)
        print(summary[name], flush=True)
    write_results(args.out, "repeat_bench.py", args.device, summary, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
