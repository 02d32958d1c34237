"""Random-init causal LMs built from a config: the demo, the tests and the GPU benchmarks use them.

A model built this way has the real architecture's shapes, so it behaves like the trained model
for memory and speed; its loss is meaningless until trained, which is all a probe needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


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

    values: dict[str, Any] = (
        dict(config)
        if isinstance(config, dict)
        else json.loads(Path(config).read_text(encoding="utf-8"))
    )
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
