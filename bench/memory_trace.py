"""What a training step holds at its memory peak, tensor by tensor, traced on the CPU.

    python bench/memory_trace.py --shape qwen2-7b --recipe recipe.yaml --seq-len 512

builds a model of the shape's architecture with its widths cut down to CPU size (`--hidden`,
`--intermediate`, `--layers`, `--heads`, `--kv-heads`, `--vocab`), runs one optimizer step of the
recipe with the probe's own loader, builder and step loop, then traces every tensor a second step
allocates (autotune.step_trace: a torch dispatch mode, each storage counted once, from the op that
made it until it is released). It prints the traced peak of allocated bytes next to the memory
model's allocated part (its estimate less allocator overhead and CUDA context) for the same
cut-down config, and the tensors alive at the peak grouped by the op that made them: which buffers
coexist at the peak, which is what the memory model's phases have to get right.

What this cannot show: the caching allocator's reserved-minus-allocated (no CUDA here), and
kernels whose CPU versions allocate differently from CUDA's (dropout keeps an fp32 mask on the
CPU where CUDA keeps one byte; SDPA's CPU kernels; bitsandbytes' CPU paths). Use recipes without
dropout and with `attention: eager` where a byte-for-byte comparison matters.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import CONFIGS  # noqa: E402

from autotune.random_model import build_random_model, cut_config  # noqa: E402
from autotune.recipe import Recipe  # noqa: E402
from autotune.step_trace import trace_step  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2-0.5b", choices=sorted(CONFIGS))
    parser.add_argument("--recipe", type=Path, help="recipe YAML (default: LoRA q/v, mb1, gc)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--top", type=int, default=12, help="op groups to list")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    from autotune.memory import UNALLOCATED_PARTS, estimate
    from autotune.model_spec import load_model_spec

    fields = (
        Recipe.load(args.recipe).to_dict()
        if args.recipe
        else {
            "method": "lora",
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_dropout": 0.0,
            "lora_target_modules": ["q_proj", "v_proj"],
            "gradient_checkpointing": True,
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
        }
    )
    with tempfile.TemporaryDirectory() as scratch:
        config = cut_config(
            CONFIGS[args.shape],
            hidden=args.hidden,
            intermediate=args.intermediate,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            vocab=args.vocab,
            seq_len=args.seq_len,
        )
        model_dir = build_random_model(config, Path(scratch) / "model")
        recipe = Recipe.from_dict({**fields, "model": str(model_dir), "seq_len": args.seq_len})
        trace = trace_step(recipe)
        predicted = estimate(load_model_spec(str(model_dir)), recipe)
    parts = predicted.breakdown
    allocated = predicted.allocated_without_cublas_bytes  # the CPU has no cuBLAS
    mib = 2**20
    print(
        f"{args.shape} cut to hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
        f"{recipe.label()} seq {recipe.seq_len}"
    )
    print(
        f"traced peak allocated {trace.peak_bytes / mib:9.1f} MiB "
        f"({trace.before_bytes / mib:.1f} MiB before the step)"
    )
    error = allocated / trace.peak_bytes - 1
    shown = [f"{k} {v / mib:.1f}" for k, v in parts.items() if v and k not in UNALLOCATED_PARTS]
    print(f"model's allocated     {allocated / mib:9.1f} MiB ({error:+.1%}): " + ", ".join(shown))
    print("alive at the peak, by the op that made them:")
    for op, dtype, total, count in trace.by_op()[: args.top]:
        print(f"  {total / mib:9.2f} MiB  {count:4d} x {op} ({dtype})")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "command": "python bench/memory_trace.py " + " ".join(sys.argv[1:]),
                    "recipe": recipe.label(),
                    "traced_peak_bytes": trace.peak_bytes,
                    "model_allocated_bytes": allocated,
                    "at_peak": [list(row) for row in trace.by_op()],
                },
                indent=1,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
