"""What a training step holds at its memory peak, tensor by tensor, traced on the CPU.

    python bench/memory_trace.py --shape qwen2-7b --recipe recipe.yaml --seq-len 512

builds a model of the shape's architecture with its widths cut down to CPU size (`--hidden`,
`--intermediate`, `--layers`, `--heads`, `--kv-heads`, `--vocab`), runs one optimizer step of the
recipe with the probe's own loader, builder and step loop, then traces every tensor a second step
allocates (a torch dispatch mode: each storage counted once, from the op that made it until it is
released). It prints the traced peak of allocated bytes next to the memory model's allocated part
(its estimate less allocator overhead and CUDA context) for the same cut-down config, and the
tensors alive at the peak grouped by the op that made them: which buffers coexist at the peak,
which is what the memory model's phases have to get right.

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
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import CONFIGS  # noqa: E402

from autotune.recipe import Recipe  # noqa: E402


@dataclass(frozen=True)
class LiveTensor:
    nbytes: int
    op: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Trace:
    peak_bytes: int
    """Allocated bytes at the peak: what existed before the step plus what the step made."""
    before_bytes: int
    at_peak: list[LiveTensor] = field(default_factory=list)
    """Tensors the step made that were alive at the peak, largest first."""

    def by_op(self) -> list[tuple[str, str, int, int]]:
        """(op, dtype, bytes, count) of the tensors alive at the peak, largest total first."""
        groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for tensor in self.at_peak:
            group = groups[(tensor.op, tensor.dtype)]
            group[0] += tensor.nbytes
            group[1] += 1
        rows = [(op, dtype, total, count) for (op, dtype), (total, count) in groups.items()]
        return sorted(rows, key=lambda row: -row[2])


def allocation_tracer(existing: list) -> object:
    """A dispatch mode that follows every storage the ops under it allocate; storages of the
    `existing` tensors (weights, optimizer states) are known and not counted again; their
    bytes, each storage once, are `before`."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class AllocationTracer(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            known = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in existing}
            self.known = set(known)
            self.before = sum(known.values())
            self.live: dict[int, LiveTensor] = {}
            self.now = self.peak = 0
            self.at_peak: list[LiveTensor] = []

        def _released(self, key: int) -> None:
            tensor = self.live.pop(key, None)
            if tensor is not None:
                self.now -= tensor.nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            for tensor in tree_leaves(out):
                if not isinstance(tensor, torch.Tensor):
                    continue
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key in self.known or key in self.live or storage.nbytes() == 0:
                    continue
                self.live[key] = LiveTensor(
                    storage.nbytes(),
                    str(func.overloadpacket.__name__),
                    tuple(tensor.shape),
                    str(tensor.dtype).removeprefix("torch."),
                )
                self.now += storage.nbytes()
                weakref.finalize(storage, self._released, key)
                if self.now > self.peak:
                    self.peak = self.now
                    self.at_peak = list(self.live.values())
            return out

    return AllocationTracer()


def cut_config(
    shape: str,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    seq_len: int,
) -> dict:
    """The shape's config with its widths cut to CPU size (architecture kept)."""
    config = json.loads(CONFIGS[shape].read_text(encoding="utf-8"))
    config.update(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max(config.get("max_position_embeddings", 0), seq_len),
    )
    config.pop("head_dim", None)
    config.pop("layer_types", None)
    config.pop("max_window_layers", None)
    return config


def trace_step(recipe: Recipe, seed: int = 0) -> Trace:
    """Peak allocated memory of one optimizer step of `recipe` (the second one: the first makes
    the optimizer states), with the probe's loader, builder and step loop, on the CPU."""
    import torch

    from autotune.data.tokens import TokenizedExample
    from autotune.training.build import build_model, build_optimizer
    from autotune.training.loop import train_steps

    torch.manual_seed(seed)
    model = build_model(recipe, "cpu")
    optimizer = build_optimizer(model, recipe)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    examples = [
        TokenizedExample(
            input_ids=torch.randint(1, vocab, (recipe.seq_len,), generator=generator).tolist(),
            labels=torch.randint(1, vocab, (recipe.seq_len,), generator=generator).tolist(),
        )
        for _ in range(recipe.effective_batch_size)
    ]
    train_steps(model, optimizer, [examples], recipe, "cpu", 0)
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    existing = [*model.parameters(), *model.buffers(), *states]
    tracer = allocation_tracer(existing)
    with tracer:
        train_steps(model, optimizer, [examples], recipe, "cpu", 0)
    at_peak = sorted(tracer.at_peak, key=lambda t: -t.nbytes)
    return Trace(
        peak_bytes=tracer.before + tracer.peak, before_bytes=tracer.before, at_peak=at_peak
    )


def build_cut_model(config: dict, target: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
    model.save_pretrained(target)
    return target


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
            args.shape,
            hidden=args.hidden,
            intermediate=args.intermediate,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            vocab=args.vocab,
            seq_len=args.seq_len,
        )
        model_dir = build_cut_model(config, Path(scratch) / "model")
        recipe = Recipe.from_dict({**fields, "model": str(model_dir), "seq_len": args.seq_len})
        trace = trace_step(recipe)
        predicted = estimate(load_model_spec(str(model_dir)), recipe)
    parts = predicted.breakdown
    allocated = predicted.allocated_bytes
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
