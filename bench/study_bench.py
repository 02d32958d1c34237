"""A whole study as a user runs it, timed: trials per hour, the frontier, speed-up over the default.

On a CUDA machine (random-init Qwen2-7B shape, 24 GB budget, seq 1024, 20-step probes):

    python bench/study_bench.py --out bench/results/study_h100.json

Nothing is downloaded: the model is built from bench/configs/qwen2-7b.json and the data is
generated from a seed. `--shape demo --device cpu --trials 4 --probe-steps 2 --seq-len 64`
runs the same path on the CPU (a smoke test; its figures say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import MODELS_DIR, ROOT, long_rows, model_dir, write_results  # noqa: E402

from autotune.pareto import frontier  # noqa: E402
from autotune.probe import SubprocessProbeRunner  # noqa: E402
from autotune.study import RunSettings, measured_points, prepare_run, run_study  # noqa: E402
from autotune.units import parse_bytes  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", default="24GB")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--probe-steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "default.yaml")
    parser.add_argument("--confirm", type=int, default=0)
    parser.add_argument(
        "--timeout-minutes", type=float, default=0, help="start no trial after this long"
    )
    parser.add_argument("--workdir", type=Path, default=MODELS_DIR / "study")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "study.json")
    args = parser.parse_args()

    directory = model_dir(args.shape, args.models_dir, args.device)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = long_rows(args.workdir / "long.jsonl", rows=240)
    study_name = f"bench-{args.shape}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    settings = RunSettings(
        model=str(directory),
        data_path=data,
        budget_bytes=parse_bytes(args.budget),
        space_path=args.space,
        trials=args.trials,
        probe_steps=args.probe_steps,
        seq_len=args.seq_len,
        device=args.device,
        study_name=study_name,
        storage=f"sqlite:///{args.workdir.resolve()}/bench.db",
        confirm_top=args.confirm,
        timeout_seconds=60 * args.timeout_minutes or None,
    )
    started = time.perf_counter()
    study = run_study(prepare_run(settings), SubprocessProbeRunner(1800))
    hours = (time.perf_counter() - started) / 3600
    trials = study.trials
    probed = [t for t in trials if "probe_status" in t.user_attrs]
    default = next((t for t in trials if t.user_attrs.get("baseline") == "qlora_default"), None)
    default_speed = (
        default.values[1] if default and default.user_attrs.get("status") == "measured" else None
    )
    front = frontier(measured_points(study))
    fastest = front[0] if front else None
    phases: dict[str, list[float]] = {}
    for trial in probed:
        for key, value in trial.user_attrs.items():
            if key.startswith("probe_seconds_"):
                phases.setdefault(key.removeprefix("probe_seconds_"), []).append(value)
    summary = {
        "trials": len(trials),
        "probed_trials": len(probed),
        "hours": round(hours, 3),
        "trials_per_hour": round(len(trials) / hours, 1) if hours else None,
        "probes_per_hour": round(len(probed) / hours, 1) if hours else None,
        "default_tokens_per_second": default_speed,
        "fastest_tokens_per_second": fastest.tokens_per_second if fastest else None,
        "speedup_over_default": round(fastest.tokens_per_second / default_speed, 2)
        if fastest and default_speed
        else None,
        "median_seconds_per_phase": {k: round(statistics.median(v), 2) for k, v in phases.items()},
    }
    rows = [
        {
            "trial": p.number,
            "recipe": trials[p.number].user_attrs["recipe_label"],
            "peak_memory_bytes": p.peak_memory_bytes,
            "tokens_per_second": p.tokens_per_second,
            "eval_loss": p.eval_loss,
        }
        for p in front
    ]
    print(json.dumps(summary, indent=1))
    for row in rows:
        print(
            f"trial {row['trial']:>3} {row['recipe']:<48} {row['peak_memory_bytes'] / 2**30:6.2f}"
            f" GiB {row['tokens_per_second']:>9,.0f} tok/s  eval loss {row['eval_loss']:.4f}"
        )
    write_results(args.out, "study_bench.py", args.device, summary, frontier=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
