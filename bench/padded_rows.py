"""What padded micro-batches change in a prediction, on a real model's config (no GPU, no data).

    python bench/padded_rows.py --out bench/results/padded_rows_cpu.json

predicts one recipe (LoRA r16 all-linear, bf16, no checkpointing; Qwen2-0.5B's config, seq 2048,
micro-batch 4 by default) by the replay (autotune.replay.replay) and by the formula
(autotune.memory.estimate) three ways: rows seq_len wide and unpadded (what `autotune estimate`,
which has no data, predicts), rows seq_len wide with shorter rows beside them (padding, so an
attention mask), and the rows a study's probe gets on data whose examples span --lengths tokens
(autotune.prediction.predict with those token lengths: padded rows as wide as the longest
example). A few seconds each on the CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import CONFIGS, write_results  # noqa: E402

from autotune.memory import estimate  # noqa: E402
from autotune.model_spec import load_model_spec  # noqa: E402
from autotune.prediction import predict  # noqa: E402
from autotune.recipe import Recipe  # noqa: E402
from autotune.replay import load_config, replay  # noqa: E402

RECIPE = {
    "method": "lora",
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_target_modules": "all-linear",
    "precision": "bf16",
    "gradient_checkpointing": False,
}
"""The recipe, less its model, seq_len and micro-batch size."""


def padded_rows(shape: str, seq_len: int, micro_batch: int, lengths: tuple[int, int]) -> dict:
    """Each way's predicted peak by both models, in bytes, and the recipe predicted."""
    fields = {**RECIPE, "seq_len": seq_len, "micro_batch_size": micro_batch}
    recipe = Recipe.from_dict({"model": shape, **fields})
    config, spec = load_config(str(CONFIGS[shape])), load_model_spec(str(CONFIGS[shape]))
    ways = {}
    for name, padded in (("full_rows", False), ("padded_full_width", True)):
        ways[name] = {
            "row_tokens": seq_len,
            "padded": padded,
            "replay_peak_bytes": replay(recipe, config, padded=padded).estimate().peak_bytes,
            "formula_peak_bytes": estimate(spec, recipe, padded=padded).peak_bytes,
        }
    data = {"token_lengths": list(lengths), "row_tokens": min(lengths[1], seq_len)}
    data["padded"] = lengths[0] < lengths[1]
    for model in ("replay", "formula"):
        predicted, used, _ = predict(
            spec, recipe, config, memory_model=model, token_lengths=lengths
        )
        assert used == model, f"{model} asked, {used} answered"
        data[f"{model}_peak_bytes"] = predicted.peak_bytes
    ways["data_rows"] = data
    return {"shape": shape, "fields": fields, "ways": ways}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(CONFIGS), default="qwen2-0.5b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument(
        "--lengths", type=int, nargs=2, default=(300, 1024), help="shortest, longest example"
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    record = padded_rows(args.shape, args.seq_len, args.micro_batch, tuple(args.lengths))
    gib = 2**30
    for name, way in record["ways"].items():
        print(
            f"{name:>18}: rows {way['row_tokens']} tokens, padded {way['padded']}: replay "
            f"{way['replay_peak_bytes'] / gib:.2f} GiB, formula "
            f"{way['formula_peak_bytes'] / gib:.2f} GiB"
        )
    if args.out:
        full, padded = record["ways"]["full_rows"], record["ways"]["padded_full_width"]
        summary = {  # what padding seq_len-wide rows adds to each model's peak
            f"{model}_padded_increase": padded[f"{model}_peak_bytes"] / full[f"{model}_peak_bytes"]
            - 1
            for model in ("replay", "formula")
        }
        write_results(args.out, "padded_rows.py", "cpu", summary, **record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
