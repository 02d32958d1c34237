"""What the benchmarks share: real-shape configs, cached random-init models, long-row data."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {
    "qwen2-0.5b": ROOT / "bench" / "configs" / "qwen2-0.5b.json",
    "llama-3.2-1b": ROOT / "bench" / "configs" / "llama-3.2-1b.json",
    "qwen2-7b": ROOT / "bench" / "configs" / "qwen2-7b.json",
    "qwen1.5-moe-a2.7b": ROOT / "bench" / "configs" / "qwen1.5-moe-a2.7b.json",
    "demo": ROOT / "demo" / "config.json",
}
TOKENIZER = ROOT / "demo" / "tokenizer"
MODELS_DIR = ROOT / "bench" / ".models"
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone".split()


def long_rows(path: Path, rows: int, seed: int = 0) -> Path:
    """Text rows far longer than any seq_len, so every sample is truncated to exactly seq_len."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(6000))
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def model_dir(shape: str, models_dir: Path, device: str = "cpu") -> Path:
    """A random-init model of `shape` with the demo tokenizer, built once and cached; on the
    GPU when the benchmark's `device` is one (far faster for the 7B shape)."""
    target = models_dir / shape
    if not (target / "config.json").exists() or not any(target.glob("*.safetensors")):
        print(f"building random-init {shape} in {target}", flush=True)
        started = time.perf_counter()
        # in a child process, so that this process holds no GPU memory while probes measure theirs
        subprocess.run(
            [
                sys.executable,
                "-m",
                "autotune.random_model",
                str(CONFIGS[shape]),
                str(target),
                "--tokenizer",
                str(TOKENIZER),
                "--device",
                "cuda" if device.startswith("cuda") else "cpu",
            ],
            check=True,
            cwd=ROOT,
        )
        print(f"built {shape} in {time.perf_counter() - started:.0f} s", flush=True)
    return target


def bench_inputs(
    shape: str, models_dir: Path, device: str, name: str, rows: int
) -> tuple[Path, Path, Path]:
    """What a probing benchmark starts from: the model of `shape` (built once), its work folder
    `name` under `models_dir`, and `rows` long rows there. Returns (model dir, work dir, data)."""
    directory = model_dir(shape, models_dir, device)
    workdir = models_dir / name
    workdir.mkdir(parents=True, exist_ok=True)
    return directory, workdir, long_rows(workdir / "long.jsonl", rows=rows)


def gpu_name(device: str) -> str:
    if not device.startswith("cuda"):
        return ""
    import torch

    return torch.cuda.get_device_name(0)


def write_results(out: Path, script: str, device: str, summary: dict, **fields: Any) -> Path:
    """A results file that says what made it: command, date, machine and GPU; then its summary
    and `fields` (tables of rows, the sizes it ran at, ...)."""
    import datetime
    import platform

    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(["python", f"bench/{script}", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": platform.platform(),
        "device": device,
        "gpu": gpu_name(device),
        "summary": summary,
        **fields,
    }
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return out
