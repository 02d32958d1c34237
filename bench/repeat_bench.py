"""How far two probes of the same recipe agree, and how fast recipes are against the default.

On a CUDA machine (random-init Qwen2-7B shape, 24 GB budget, seq 1024, 20-step probes):

    python bench/repeat_bench.py --out bench/results/repeat_h100.json

probes each named recipe `--repeat` times with a different seed each time (the data order and
the adapter's initialisation change; the lengths do not, every sample is seq_len long) and
prints tokens/s, peak memory and eval loss with their spread: the run-to-run noise a frontier
difference has to beat. `--shape demo --device cpu --steps 2 --seq-len 64` runs the same path on
the CPU (a smoke test; its figures say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import MODELS_DIR, ROOT, long_rows, model_dir, write_results  # noqa: E402

from autotune.data import cached_splits  # noqa: E402
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", default="24GB")
    parser.add_argument("--recipes", default="lora-qv-mb2,lora-all-mb2", help=", ".join(RECIPES))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "repeat.json")
    args = parser.parse_args()

    directory = model_dir(args.shape, args.models_dir, args.device)
    workdir = args.models_dir / "repeat"
    workdir.mkdir(parents=True, exist_ok=True)
    data = long_rows(workdir / "long.jsonl", rows=240)
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
        results = []
        for seed in range(args.repeat):
            _, cache = cached_splits(data, tokenizer, recipe.seq_len, seed, workdir / "cache")
            request = ProbeRequest(
                recipe=recipe,
                data_path=str(data),
                steps=args.steps,
                device=args.device,
                budget_bytes=parse_bytes(args.budget),
                seed=seed,
                token_cache=str(cache),
            )
            result = runner.run(request, workdir / f"{name}-{seed}")
            results.append(result)
            rows.append(
                {
                    "recipe": name,
                    "label": recipe.label(),
                    "seed": seed,
                    "status": result.status,
                    "reason": result.reason,
                    "tokens_per_second": result.tokens_per_second,
                    "peak_memory_bytes": result.peak_memory_bytes,
                    "predicted_peak_bytes": predicted,
                    "eval_loss": result.eval_loss,
                    "seconds": result.seconds,
                }
            )
            print(
                f"{name:<14} seed {seed}: {result.status:<4} "
                f"{(result.tokens_per_second or 0):>9,.0f} tok/s  "
                f"{(result.peak_memory_bytes or 0) / 2**30:6.2f} GiB "
                f"(predicted {predicted / 2**30:6.2f})  eval loss {result.eval_loss or 0:.4f}  "
                f"({result.seconds.get('total', 0):.0f} s)",
                flush=True,
            )
            write_results(args.out, "repeat_bench.py", args.device, summary, rows=rows)
        ok = [r for r in results if r.status == "ok"]
        summary[name] = {
            "label": recipe.label(),
            "probes": len(results),
            "ok": len(ok),
            "median_tokens_per_second": statistics.median([r.tokens_per_second for r in ok])
            if ok
            else None,
            "tokens_per_second_spread": spread([r.tokens_per_second for r in ok]),
            "peak_memory_spread": spread([r.peak_memory_bytes for r in ok]),
            "eval_loss_spread_abs": max(r.eval_loss for r in ok) - min(r.eval_loss for r in ok)
            if len(ok) > 1
            else None,
        }
        print(summary[name], flush=True)
    write_results(args.out, "repeat_bench.py", args.device, summary, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
