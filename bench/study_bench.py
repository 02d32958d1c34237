"""A whole study as a user runs it, timed: trials per hour, the frontier, speed-up over the default.

On a CUDA machine (random-init Qwen2-7B shape, 24 GB budget, seq 1024, 20-step probes):

    python bench/study_bench.py --out bench/results/study_h100.json

Nothing is downloaded: the model is built from bench/configs/qwen2-7b.json and the data is
generated from a seed. The results file is written after every trial; a study cut short (say by
`--timeout-minutes`) goes on with `--study-name NAME` and the same `--workdir`, and its rates
count each trial's own duration, so they do not depend on how the calls were split. Once every
trial is done, `--confirm N` re-probes the top N frontier recipes and probes the QLoRA default
again with another seed: the run-to-run noise the eval-loss differences are read against.
`--shape demo --device cpu --trials 4 --probe-steps 2 --seq-len 64`
runs the same path on the CPU (a smoke test; its figures say nothing about GPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import MODELS_DIR, ROOT, long_rows, model_dir, write_results  # noqa: E402

from autotune.pareto import frontier  # noqa: E402
from autotune.probe import SubprocessProbeRunner  # noqa: E402
from autotune.report import probed_rows, trial_seconds, trials_frame  # noqa: E402
from autotune.space import SPACES_DIR  # noqa: E402
from autotune.study import (  # noqa: E402
    RunEvents,
    RunSettings,
    TrialSummary,
    confirmations,
    finished_trial_count,
    measured_points,
    open_study,
    prepare_run,
    quality_ranking,
    run_study,
    study_noise,
)
from autotune.training.io import PROBE_PHASES  # noqa: E402
from autotune.units import parse_bytes  # noqa: E402


def summarize(study, target_trials: int, wall_seconds: float) -> tuple[dict, list[dict]]:
    """Rates over the trials' own durations, so a study resumed across several calls is timed
    as one run: each trial counts from its start to its end, probe and bookkeeping included."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    measured = measured_points(study)
    frame = trials_frame(study, measured, quality_ranking(study, measured))
    # trials that ran a probe of their own, as the report counts them (not duplicates)
    probed = probed_rows(frame[frame["trial_seconds"].notna()])
    hours = frame["trial_seconds"].sum() / 3600
    default = next((t for t in trials if t.user_attrs.get("baseline") == "qlora_default"), None)
    default_speed = default_loss = None
    if default and default.user_attrs.get("status") == "measured":
        default_speed, default_loss = default.values[1], default.values[2]
    noise = study_noise(study)
    points = frontier(measured)
    fastest = max(points, key=lambda p: p.tokens_per_second, default=None)
    by_number = {t.number: t for t in trials}
    confirmed = {number: dataclasses.asdict(c) for number, c in confirmations(study).items()}
    summary = {
        "study": study.study_name,
        "complete": finished_trial_count(study) >= target_trials,
        "trials": len(trials),
        "probed_trials": len(probed),
        "trial_hours": round(hours, 4),
        "wall_seconds_this_call": round(wall_seconds, 1),
        "trials_per_hour": round(len(trials) / hours, 1) if hours else None,
        "probes_per_hour": round(len(probed) / hours, 1) if hours else None,
        "median_seconds_per_probe": round(probed["trial_seconds"].median(), 1)
        if len(probed)
        else None,
        "default_tokens_per_second": default_speed,
        "fastest_tokens_per_second": fastest.tokens_per_second if fastest else None,
        "speedup_over_default": round(fastest.tokens_per_second / default_speed, 2)
        if fastest and default_speed
        else None,
        "median_seconds_per_phase": {
            phase: round(probed[f"seconds_{phase}"].median(), 2)
            for phase in (*PROBE_PHASES, "total")
            if f"seconds_{phase}" in probed.columns and probed[f"seconds_{phase}"].notna().any()
        },
        "noise": dataclasses.asdict(noise) if noise else None,
        "confirmations": confirmed,
    }
    noise_loss = noise.eval_loss_difference if noise else None
    rows = []
    for point in sorted(points, key=lambda p: -p.tokens_per_second):
        difference = point.eval_loss - default_loss if default_loss is not None else None
        rows.append(
            {
                "trial": point.number,
                "recipe": by_number[point.number].user_attrs["recipe_label"],
                "peak_memory_bytes": point.peak_memory_bytes,
                "tokens_per_second": point.tokens_per_second,
                "speedup_over_default": round(point.tokens_per_second / default_speed, 2)
                if default_speed
                else None,
                "eval_loss": point.eval_loss,
                "eval_loss_minus_default": difference,
                "within_noise": abs(difference) <= noise_loss
                if difference is not None and noise_loss is not None
                else None,
            }
        )
    return summary, rows


def trial_rows(study) -> list[dict]:
    """Every finished trial: what it was, what became of it and where its time went."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        if not trial.datetime_complete:
            continue
        attrs = trial.user_attrs
        rows.append(
            {
                "trial": trial.number,
                "recipe": attrs.get("recipe_label"),
                "baseline": attrs.get("baseline"),
                "status": attrs.get("status"),
                "predicted_peak_bytes": attrs.get("predicted_peak_bytes"),
                "memory_model": attrs.get("memory_model"),
                "peak_memory_bytes": attrs.get("probe_peak_memory_bytes"),
                "tokens_per_second": attrs.get("probe_tokens_per_second"),
                "eval_loss": attrs.get("probe_eval_loss"),
                "trial_seconds": round(trial_seconds(trial), 2),
                "seconds": {
                    k.removeprefix("probe_seconds_"): v
                    for k, v in attrs.items()
                    if k.startswith("probe_seconds_")
                },
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2-7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", default="24GB")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--probe-steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--space", type=Path, default=SPACES_DIR / "default.yaml")
    parser.add_argument(
        "--confirm",
        type=int,
        default=1,
        help="frontier recipes re-probed once all trials are done (0: none, and no noise probe)",
    )
    parser.add_argument(
        "--timeout-minutes", type=float, default=0, help="start no trial after this long"
    )
    parser.add_argument(
        "--study-name", help="resume this study from --workdir (default: a new one, timestamped)"
    )
    parser.add_argument(
        "--weight-cache", action="store_true", help="QLoRA probes read the base from an NF4 copy"
    )
    parser.add_argument("--workdir", type=Path, default=MODELS_DIR / "study")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "study.json")
    args = parser.parse_args()

    started = time.perf_counter()
    # Recipes stored in the study name the model relative to the repository, so a study
    # resumed on another machine (or another checkout) finds it again.
    os.chdir(ROOT)
    directory = model_dir(args.shape, args.models_dir, args.device)
    model = os.path.relpath(directory, ROOT) if directory.is_relative_to(ROOT) else str(directory)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = long_rows(args.workdir / "long.jsonl", rows=240)
    study_name = args.study_name or f"bench-{args.shape}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    settings = RunSettings(
        model=model,
        data_path=data,
        budget_bytes=parse_bytes(args.budget),
        space_path=args.space,
        trials=args.trials,
        probe_steps=args.probe_steps,
        seq_len=args.seq_len,
        device=args.device,
        study_name=study_name,
        storage=f"sqlite:///{args.workdir.resolve()}/bench.db",
        confirm_top=0,  # confirmations and the noise probe only once every trial is done
        weight_cache=args.weight_cache,
        timeout_seconds=60 * args.timeout_minutes or None,
    )
    prepared = prepare_run(settings)
    study = open_study(prepared.storage, study_name, settings.seed)

    def write() -> None:
        summary, front = summarize(study, args.trials, time.perf_counter() - started)
        write_results(
            args.out,
            "study_bench.py",
            args.device,
            summary,
            frontier=front,
            trials=trial_rows(study),
        )

    def finished(trial: TrialSummary) -> None:
        speed = f"{trial.tokens_per_second:,.0f} tok/s" if trial.tokens_per_second else ""
        stands_in = f", for trial {trial.repair_of}" if trial.repair_of is not None else ""
        print(
            f"trial {trial.number:>3} {trial.label:<52} {trial.status:<22} {speed:>12} "
            f"({trial.seconds.get('total', 0):.0f} s probe{stands_in})",
            flush=True,
        )
        write()  # a run cut short still leaves its results (this trial lands in the next write)

    runner = SubprocessProbeRunner(1800)
    try:
        run_study(prepared, runner, RunEvents(trial_finished=finished))
        late = args.timeout_minutes and time.perf_counter() - started > 60 * args.timeout_minutes
        if finished_trial_count(study) >= args.trials and args.confirm and not late:
            confirming = dataclasses.replace(settings, confirm_top=args.confirm)
            run_study(dataclasses.replace(prepared, settings=confirming), runner)
    finally:
        runner.close()
    write()
    summary, front = summarize(study, args.trials, time.perf_counter() - started)
    print(json.dumps({k: v for k, v in summary.items() if k != "confirmations"}, indent=1))
    for row in front:
        versus = ""
        if row["eval_loss_minus_default"] is not None:
            noise = {True: "within noise", False: "beyond noise", None: "noise unmeasured"}
            versus = (
                f" ({row['speedup_over_default']}x the default, eval loss "
                f"{row['eval_loss_minus_default']:+.4f}: {noise[row['within_noise']]})"
            )
        print(
            f"trial {row['trial']:>3} {row['recipe']:<48} {row['peak_memory_bytes'] / 2**30:6.2f}"
            f" GiB {row['tokens_per_second']:>9,.0f} tok/s  eval loss {row['eval_loss']:.4f}"
            + versus
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
