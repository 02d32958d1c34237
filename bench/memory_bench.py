"""Predicted vs measured peak memory over a grid of recipes on random-init real-shape models.

On a CUDA machine (one command, nothing to download):

    python bench/memory_bench.py --out bench/results/memory_h100.json

builds Qwen2-0.5B, Llama-3.2-1B and Qwen2-7B shaped models from bench/configs/ with random
weights (cached under bench/.models/), probes each recipe of the grid in its own process exactly
as `autotune run` does (max_memory_reserved over train and eval, plus the CUDA context), and
prints predicted against measured with the error. `--device cpu --shapes demo` runs the same
path on the CPU with the demo's tiny model, where "measured" is RSS growth (a smoke test only).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import MODELS_DIR, ROOT, long_rows, model_dir, write_results  # noqa: E402

from autotune.memory import estimate  # noqa: E402
from autotune.model_spec import load_model_spec  # noqa: E402
from autotune.probe import SubprocessProbeRunner  # noqa: E402
from autotune.recipe import Recipe  # noqa: E402
from autotune.training.io import ProbeRequest  # noqa: E402


def grid(shape: str) -> list[dict]:
    """Recipes across methods, quantization, precision, optimizers, batch, length, checkpointing."""
    lora = {"method": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
    recipes: list[dict] = []
    for seq_len in (512, 1024, 4096):
        for micro in (1, 4, 8):
            for checkpointing in (True, False):
                recipes.append(
                    {
                        **lora,
                        "lora_target_modules": ["q_proj", "v_proj"],
                        "micro_batch_size": micro,
                        "seq_len": seq_len,
                        "gradient_checkpointing": checkpointing,
                    }
                )
                recipes.append(
                    {
                        **lora,
                        "quantization": "nf4",
                        "micro_batch_size": micro,
                        "seq_len": seq_len,
                        "gradient_checkpointing": checkpointing,
                    }
                )
    for optimizer in ("adamw", "adamw_8bit"):
        for precision in ("bf16", "amp_bf16"):
            recipes.append(
                {
                    "method": "full",
                    "precision": precision,
                    "optimizer": optimizer,
                    "micro_batch_size": 2,
                    "seq_len": 1024,
                }
            )
    recipes.append(
        {
            "method": "freeze",
            "frozen_layers": 8,
            "micro_batch_size": 4,
            "seq_len": 1024,
            "gradient_checkpointing": False,
        }
    )
    recipes.append({**lora, "quantization": "int8", "micro_batch_size": 4, "seq_len": 1024})
    recipes.append(
        {
            **lora,
            "precision": "amp_bf16",
            "micro_batch_size": 4,
            "seq_len": 2048,
            "expandable_segments": True,
        }
    )
    if shape == "demo":
        return [
            {
                **r,
                "seq_len": min(r["seq_len"], 128),
                "frozen_layers": min(r.get("frozen_layers", 0), 2),
            }
            for r in recipes
        ]
    return recipes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="qwen2-0.5b,llama-3.2-1b,qwen2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per probe")
    parser.add_argument("--max-recipes", type=int, default=0, help="sample this many per shape")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "memory.json")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    args = parser.parse_args()

    workdir = args.models_dir / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    data = long_rows(workdir / "long.jsonl", rows=80)
    runner = SubprocessProbeRunner(args.timeout)
    budget = 10**15  # measure, do not cap: the card's own size is the only limit
    rows = []
    for shape in args.shapes.split(","):
        directory = model_dir(shape, args.models_dir)
        spec = load_model_spec(str(directory))
        recipes = grid(shape)
        if args.max_recipes:
            recipes = random.Random(0).sample(recipes, min(args.max_recipes, len(recipes)))
        for number, fields in enumerate(recipes):
            recipe = Recipe.from_dict({"model": str(directory), **fields})
            predicted = estimate(spec, recipe)
            request = ProbeRequest(
                recipe=recipe,
                data_path=str(data),
                steps=args.steps,
                device=args.device,
                budget_bytes=budget,
                seed=0,
            )
            result = runner.run(request, workdir / f"{shape}-{number:03d}")
            measured = result.peak_memory_bytes if result.status == "ok" else None
            error = (predicted.peak_bytes - measured) / measured if measured else None
            row = {
                "shape": shape,
                "recipe": recipe.label(),
                "seq_len": recipe.seq_len,
                "fields": fields,
                "status": result.status,
                "reason": result.reason,
                "predicted_peak_bytes": predicted.peak_bytes,
                "measured_peak_bytes": measured,
                "measured_allocated_bytes": result.peak_allocated_bytes,
                "cuda_context_bytes": result.cuda_context_bytes,
                "memory_source": result.memory_source,
                "error": error,
                "breakdown": predicted.breakdown,
            }
            rows.append(row)
            shown = f"{error:+.1%}" if error is not None else result.status
            print(
                f"{shape:>13} {recipe.label():<48} seq {recipe.seq_len:>5} predicted "
                f"{predicted.peak_bytes / 2**30:7.2f} GiB measured "
                f"{(measured or 0) / 2**30:7.2f} GiB  {shown}",
                flush=True,
            )
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    summary = {
        "recipes": len(rows),
        "measured": len(errors),
        "median_abs_error": statistics.median(errors) if errors else None,
        "max_abs_error": max(errors) if errors else None,
    }
    print(json.dumps(summary))
    write_results(args.out, "memory_bench.py", args.device, summary, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
