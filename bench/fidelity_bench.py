"""Does a short probe's eval loss rank recipes the way a long training run does?

On the CPU, with a small Llama-architecture model pretrained here on real text:

    nice -n 19 python bench/fidelity_bench.py --out bench/results/fidelity_cpu.json

1. pretrains the model (bench/fidelity_model.py: hidden 128, 3 layers, a 1,024-token
   byte-level BPE; 0.7M parameters: what two shared CPU cores train in minutes) on the Python
   standard library's sources (`sysconfig`'s stdlib directory), cached under
   `bench/.models/fidelity/`;
2. builds the fine-tuning task from other real text, held apart from the pretraining text:
   functions of installed third-party packages (bench/fidelity_tasks.py). `--task code` (the
   default; numpy, optuna and networkx): the docstring summary as the prompt (`input`), the
   function's code without its docstring as the answer (`output`); `--task summary` (sympy
   and pandas): the code as the prompt, the docstring summary as the answer. Each task's
   rows, token cache and runs sit in their own directory next to the one pretrained model;
3. probes each recipe with autotune's own probe (a child process per probe, the study's token
   cache, so every probe evaluates on the same rows) at `--probe-steps` (20, 40, 80) with
   `--seeds` seeds (data order and adapter initialisation change), and fine-tunes it with
   autotune's own training (`autotune.training.train.train`, cosine schedule with warm-up) for
   `--long-steps` steps (400: 20 times the 20-step probe's tokens);
4. reports Spearman's rho between the probes' and the long runs' eval-loss rankings at each
   probe length, each recipe's spread across seeds, and what successive halving (all recipes
   at the shortest probe, the better half promoted to the next length) ranks, also against
   plain probes that spend the same probe steps (bench/fidelity_summary.py).

Every probe's and long run's result is cached under the cache directory: a rerun continues.
`--model <hub id or path>` skips the pretraining and measures that model (on CUDA: `--device
cuda`); `--model-size bigger` pretrains a 2.9M-parameter model instead (hidden 256, 4
layers; its own cache); `--toy` cuts every size so the pipeline runs end to end in a minute
(the CPU test);
`--summarize FILE` recomputes a results file's summary from its rows without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity_model import MODEL_SIZES, PRETRAIN_CONFIG, TOY, TOY_HEADS, pretrain  # noqa: E402
from fidelity_summary import print_table, summarize, summarize_file  # noqa: E402
from fidelity_tasks import TASK_PACKAGES, TASK_SHAPES, stdlib_texts, task_rows  # noqa: E402
from shared import MODELS_DIR, ROOT, write_results  # noqa: E402

from autotune.fidelity import spearman_rho  # noqa: E402, F401 - the CPU test checks rho with it

LORA = {"method": "lora", "lora_alpha_over_r": 2, "lora_dropout": 0.0}
RECIPES: dict[str, dict] = {
    "lora-r4-qv": {**LORA, "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"]},
    "lora-r16-all": {**LORA, "lora_r": 16},
    "lora-r16-all-lr1e-4": {**LORA, "lora_r": 16, "learning_rate": 1e-4},
    "dora-r16-all": {**LORA, "lora_r": 16, "use_dora": True},
    "lora-r64-all": {**LORA, "lora_r": 64, "learning_rate": 3e-4},
    "qlora-nf4-r16-all": {**LORA, "lora_r": 16, "quantization": "nf4"},
    "lora-int8-r16-all": {**LORA, "lora_r": 16, "quantization": "int8"},
    "freeze-half-attention": {
        "method": "freeze",
        "frozen_layers_fraction": 0.5,
        "train_modules": "attention",
        "learning_rate": 3e-4,
    },
    "freeze-half-mlp": {
        "method": "freeze",
        "frozen_layers_fraction": 0.5,
        "train_modules": "mlp",
        "learning_rate": 3e-4,
    },
    "full": {"method": "full", "learning_rate": 3e-4},
    "full-lr3e-5": {"method": "full", "learning_rate": 3e-5},
}
"""Recipes that differ in what changes quality; LoRA learning rate 1e-3 unless given."""


def cached(path: Path, run) -> dict:
    """The result stored at `path`, or run() stored there first: a rerun continues."""
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    result = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result), encoding="utf-8")
    return result


def recipe_for(name: str, model: str, seq_len: int, batch: int, precision: str):
    from autotune.model_spec import load_model_spec
    from autotune.recipe import Recipe
    from autotune.space import frozen_layer_count

    fields = {"learning_rate": 1e-3, **RECIPES[name]}
    if "frozen_layers_fraction" in fields:
        fraction = fields.pop("frozen_layers_fraction")
        fields["frozen_layers"] = frozen_layer_count(load_model_spec(model), fraction)
    if "lora_alpha_over_r" in fields:
        fields["lora_alpha"] = fields.pop("lora_alpha_over_r") * fields["lora_r"]
    return Recipe.from_dict(
        {
            **fields,
            "model": model,
            "seq_len": seq_len,
            "micro_batch_size": batch,
            "precision": precision,
            "gradient_checkpointing": False,
        }
    )


def probe_rows(runner, recipe, data: Path, cache: Path, steps, seed, device, eval_rows, workdir):
    """One probe of the longest length, its eval loss measured at each length on the way: the
    probe's learning rate is constant and its batches a prefix of a longer probe's, so that is
    what the shorter probes with this seed measure."""
    from autotune.training.io import ProbeRequest

    request = ProbeRequest(
        recipe=recipe,
        data_path=str(data),
        steps=max(steps),
        device=device,
        budget_bytes=10**15,
        seed=seed,
        token_cache=str(cache),
        eval_rows=eval_rows,
        eval_at_steps=tuple(steps),
    )
    result = runner.run(request, workdir)
    return {
        "status": result.status,
        "reason": result.reason,
        "eval_losses": result.eval_losses,
        "trained_tokens": result.trained_tokens,
        "seconds": round(result.seconds.get("total", 0.0), 2),
    }


def long_row(
    recipe, data: Path, steps: int, device: str, eval_rows: int, out_dir: Path, seed: int
) -> dict:
    from autotune.training.train import train

    started = time.perf_counter()
    try:
        report = train(
            recipe,
            data,
            out_dir,
            max_steps=steps,
            overwrite=True,
            device=device,
            seed=seed,
            save_every_steps=10**9,
            eval_rows=eval_rows,
            logging_steps=10**9,
        )
    except Exception as error:  # noqa: BLE001 - a recipe that fails is a row, not a stop
        return {"status": "crash", "reason": f"{type(error).__name__}: {error}"[:300]}
    return {
        "status": "ok",
        "eval_loss": report.eval_loss,
        "train_loss": report.train_loss,
        "steps": report.steps,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or path: measure it instead of pretraining")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=", ".join(RECIPES))
    parser.add_argument("--probe-steps", default="20,40,80")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--long-steps", type=int, default=400)
    parser.add_argument(
        "--long-seeds",
        type=int,
        default=2,
        help="long runs per recipe; the probes are ranked against seed 0's (the same eval rows)",
    )
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--pretrain-bytes", type=int, default=2_000_000)
    parser.add_argument(
        "--task",
        choices=sorted(TASK_PACKAGES),
        default="code",
        help="code: docstring summary -> the function's code; summary: code -> docstring summary",
    )
    parser.add_argument(
        "--task-packages",
        help="packages the task's functions come from (default: "
        + "; ".join(f"{task}: {packages}" for task, packages in TASK_PACKAGES.items())
        + ")",
    )
    parser.add_argument(
        "--model-size",
        choices=list(MODEL_SIZES),
        default="small",
        help="the pretrained model's size (small: 0.7M parameters); each its own cache",
    )
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--eval-rows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4, help="rows per optimizer step")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--toy", action="store_true", help="tiny sizes: the CPU test")
    parser.add_argument("--cache", type=Path, default=MODELS_DIR / "fidelity")
    parser.add_argument("--out", type=Path, help="default: bench/results/fidelity.json")
    parser.add_argument(
        "--summarize",
        type=Path,
        metavar="FILE",
        help="recompute the summary of the results file FILE from its rows, run nothing, and "
        "write it to --out if given, else back to FILE",
    )
    args = parser.parse_args()
    if args.summarize is not None:
        if not args.summarize.is_file():
            print(f"--summarize: no results file {args.summarize}", file=sys.stderr)
            return 2
        summary = summarize_file(args.summarize, args.out)
        print(json.dumps({k: summary[k] for k in ("rho", "halving", "halving_at_equal_steps")}))
        return 0
    out_path = args.out or ROOT / "bench/results/fidelity.json"

    from autotune.data.token_cache import cached_splits
    from autotune.probe import SubprocessProbeRunner
    from autotune.training.build import load_tokenizer

    probe_steps = [int(s) for s in args.probe_steps.split(",")]
    names = [n.strip() for n in args.recipes.split(",")]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        print(
            f"--recipes: unknown {', '.join(unknown)} (known: {', '.join(RECIPES)})",
            file=sys.stderr,
        )
        return 2
    if args.model and args.model_size != "small":
        print("--model-size: only for the pretrained model, not with --model", file=sys.stderr)
        return 2
    packages = args.task_packages or TASK_PACKAGES[args.task]
    cache = args.cache
    if args.model_size != "small":
        cache = cache / f"model-{args.model_size}"
    pretraining: dict = {}
    if args.model:
        model = args.model
        cache = cache / model.replace("/", "--")
    else:
        size = MODEL_SIZES[args.model_size]
        config = {**PRETRAIN_CONFIG, **size, **(TOY | TOY_HEADS if args.toy else {})}
        model_dir = cache / "model"
        texts = stdlib_texts(args.pretrain_bytes)
        pretraining = pretrain(model_dir, config, texts, args.pretrain_steps, args.seq_len)
        print(f"pretrained model: {pretraining}", flush=True)
        model = str(model_dir)
    # the model is shared; each task's rows, token cache and runs have their own directory
    work = cache if args.task == "code" else cache / args.task
    data = work / "task.jsonl"
    if not data.exists():
        rows = task_rows(packages.split(","), args.rows, seed=0, task=args.task)
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    # one eval split for every probe and long run: seed 0's, as a study's token cache holds
    _, token_cache = cached_splits(
        data, load_tokenizer(model), args.seq_len, 0, work / "tokens", args.eval_rows
    )
    precision = "bf16" if args.device.startswith("cuda") else "fp32"
    recipes = {n: recipe_for(n, model, args.seq_len, args.batch, precision) for n in names}
    runner = SubprocessProbeRunner(args.timeout)
    probes: dict[str, dict] = {}
    longs: dict[str, dict] = {}

    def write() -> dict:
        summary = summarize(probes, longs, probe_steps, args.seeds)
        summary["pretraining"] = pretraining
        summary["task"] = f"{args.rows} rows from {packages}: {TASK_SHAPES[args.task]}"
        summary["versions"] = versions()
        write_results(
            out_path,
            "fidelity_bench.py",
            args.device,
            summary,
            probes=[{"key": k, **v} for k, v in probes.items()],
            long_runs=[{"recipe": k, **v} for k, v in longs.items()],
        )
        return summary

    def probe(name: str, seed: int) -> None:
        workdir = work / "runs" / name / f"seed-{seed}"
        row = cached(
            workdir / "row.json",
            lambda: probe_rows(
                runner,
                recipes[name],
                data,
                token_cache,
                probe_steps,
                seed,
                args.device,
                args.eval_rows,
                workdir,
            ),
        )
        for steps in probe_steps:
            loss = row["eval_losses"].get(str(steps))
            probes[f"{name}/{steps}/{seed}"] = {
                "status": row["status"] if loss is not None else "crash",
                "reason": row["reason"],
                "eval_loss": loss,
            }
        losses = ", ".join(f"{k}: {v:.4f}" for k, v in row["eval_losses"].items())
        print(f"{name:<24} seed {seed}: {row['status']:<5} eval loss {losses}", flush=True)

    # seed 0 at every length, then the long runs, then the other seeds: an interrupted run
    # still has a ranking to compare
    for name in names:
        probe(name, 0)
        write()
    long_runs: dict[str, dict[int, dict]] = {}

    def long_run(name: str, seed: int) -> None:
        workdir = work / "runs" / name / ("long" if seed == 0 else f"long-seed-{seed}")
        row = cached(
            workdir / "row.json",
            lambda: long_row(
                recipes[name],
                data,
                args.long_steps,
                args.device,
                args.eval_rows,
                workdir / "out",
                seed,
            ),
        )
        runs = long_runs.setdefault(name, {})
        runs[seed] = row
        # seed 0's run is what the probes are ranked against: the same eval rows (another
        # seed of `autotune train` also draws another eval split)
        longs[name] = {
            **runs[min(runs)],
            "other_seeds": {s: r.get("eval_loss") for s, r in runs.items() if s != min(runs)},
        }
        print(f"{name:<24} long seed {seed}: eval loss {row.get('eval_loss') or 0:.4f}", flush=True)
        write()

    for name in names:
        long_run(name, 0)
    for seed in range(1, args.seeds):
        for name in names:
            probe(name, seed)
            write()
    for seed in range(1, args.long_seeds):
        for name in names:
            long_run(name, seed)
    runner.close()
    summary = write()
    print_table(summary, probes, longs, names, probe_steps, args.seeds)
    return 0


def versions() -> dict:
    import platform

    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
