"""Random-init causal LMs built from a config: the demo, the tests and the GPU benchmarks use them.

A model built this way has the real architecture's shapes, so it behaves like the trained model
for memory and speed; its loss is meaningless until trained, which is all a probe needs.
A real architecture's config cut to CPU widths (cut_config) gives a model with that
architecture's code paths at a size the CPU tests and traces can run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

CPU_WIDTHS = {
    "hidden": 128,
    "intermediate": 256,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "vocab": 4096,
}
"""The widths the CPU tests and the replay benches cut a real architecture to (cut_config's
keywords, seq_len apart): a training step of it traces in seconds."""
WIDTH_FIELDS = {
    "hidden": "hidden_size",
    "intermediate": "intermediate_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "vocab": "vocab_size",
}
"""cut_config's keywords -> the config fields they set."""


def width_fields(widths: dict[str, int]) -> dict[str, int]:
    """`widths` (as CPU_WIDTHS) as the config fields they set."""
    return {WIDTH_FIELDS[name]: value for name, value in widths.items()}


def _config_values(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    """A copy of the config's fields, from a dict or a config.json."""
    if isinstance(config, dict):
        return dict(config)
    values: dict[str, Any] = json.loads(Path(config).read_text(encoding="utf-8"))
    return values


def cut_config(
    config: dict[str, Any] | str | Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    seq_len: int,
) -> dict[str, Any]:
    """The config with its widths cut to CPU size, its architecture kept: a real model's code
    paths (attention, MLP, norms, tied head) at a size a CPU step traces in seconds."""
    values = _config_values(config)
    widths = dict(
        hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads
    )
    values.update(width_fields({**widths, "vocab": vocab}))
    values["max_position_embeddings"] = max(values.get("max_position_embeddings", 0), seq_len)
    # fields that follow the real widths or depth, which the cut config would contradict
    for name in ("head_dim", "layer_types", "max_window_layers"):
        values.pop(name, None)
    return values


def build_random_model(
    config: dict[str, Any] | str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    dtype: str = "bfloat16",
    device: str = "cpu",
) -> Path:
    """Save a random-init model (config + safetensors weights) and, if given, a tokenizer.

    `device="cuda"` initialises the weights on the GPU, which turns minutes of CPU work for a
    7B shape into seconds; the saved files are the same kind either way.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = _config_values(config)
    model_type = values.pop("model_type")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(model_type, **values), dtype=getattr(torch, dtype)
        )
    model.save_pretrained(out_dir)
    del model
    if tokenizer_dir is not None:
        for item in Path(tokenizer_dir).iterdir():
            if item.is_file():
                shutil.copy2(item, out_dir / item.name)
    return out_dir


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="config.json with model_type and the shape fields")
    parser.add_argument("out_dir")
    parser.add_argument("--tokenizer", help="directory whose tokenizer files are copied along")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to initialise: cpu or cuda")
    args = parser.parse_args()
    print(
        build_random_model(args.config, args.out_dir, args.tokenizer, args.seed, device=args.device)
    )


if __name__ == "__main__":
    main()
