"""What a probe costs before it trains: cold (new interpreter) against warm (forked) starts.

    python bench/probe_start_bench.py --out bench/results/probe_start_<gpu>.json

runs the same short probe `--probes` times with each kind of start, on `--shape` (default: the
demo's tiny model, so the fixed costs show rather than the training), and prints the median
seconds of each phase: start (interpreter up), device_init, data, load, warm-up, steps, eval and
the total the study waits for. `--device cpu` runs it without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import MODELS_DIR, ROOT, bench_inputs, write_results  # noqa: E402

from autotune.data.token_cache import cached_splits  # noqa: E402
from autotune.probe import SubprocessProbeRunner  # noqa: E402
from autotune.recipe import Recipe  # noqa: E402
from autotune.training.build import load_tokenizer  # noqa: E402
from autotune.training.io import PROBE_PHASES, ProbeRequest  # noqa: E402

PHASES = (*PROBE_PHASES, "total")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="demo")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--quantization", default="nf4", choices=("none", "int8", "nf4"))
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument(
        "--weight-cache",
        action="store_true",
        help="also time warm probes that read the base from an NF4 copy (nf4 only)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "probe_start.json")
    args = parser.parse_args()

    directory, workdir, data = bench_inputs(
        args.shape, args.models_dir, args.device, "probe-start", rows=40
    )
    _, cache = cached_splits(data, load_tokenizer(str(directory)), args.seq_len, 0, workdir)
    recipe = Recipe.from_dict(
        {
            "model": str(directory),
            "method": "lora",
            "lora_r": 16,
            "quantization": args.quantization,
            "micro_batch_size": 1,
            "seq_len": args.seq_len,
        }
    )
    request = ProbeRequest(
        recipe=recipe,
        data_path=str(data),
        steps=args.steps,
        device=args.device,
        budget_bytes=10**15,
        seed=0,
        token_cache=str(cache),
    )
    rows = []
    summary = {}
    kinds = {"cold": request, "warm": request}
    if args.weight_cache and args.quantization == "nf4":
        copies = workdir / "weights"
        shutil.rmtree(copies, ignore_errors=True)  # the first probe writes the copy afresh
        kinds["warm_nf4_copy"] = dataclasses.replace(request, weight_cache=str(copies))
    for kind, kind_request in kinds.items():
        runner = SubprocessProbeRunner(900, warm=kind != "cold")
        # the first warm probe also waits for the server's imports (and writes the NF4 copy);
        # the rest fork from it
        results = [
            runner.run(kind_request, workdir / f"{kind}-{number}")
            for number in range(args.probes + 1)
        ]
        runner.close()
        for number, result in enumerate(results):
            assert result.status == "ok", result.reason
            rows.append(
                {
                    **result.seconds,
                    "launch": kind,
                    "probe": number,
                    "forked": result.forked,
                    "weights": result.weights,
                }
            )
            print(
                f"{kind} {number}: "
                + " ".join(f"{p} {result.seconds.get(p, 0):.2f}" for p in PHASES),
                flush=True,
            )
        summary[kind] = {
            p: round(statistics.median(r.seconds.get(p, 0) for r in results[1:]), 3) for p in PHASES
        }
    summary["seconds_saved_per_probe"] = round(
        summary["cold"]["total"] - summary["warm"]["total"], 2
    )
    if "warm_nf4_copy" in summary:
        summary["load_seconds_saved_by_nf4_copy"] = round(
            summary["warm"]["load"] - summary["warm_nf4_copy"]["load"], 2
        )
    print(f"{'phase':<12}" + "".join(f"{kind + ' s':>20}" for kind in kinds))
    for phase in PHASES:
        print(f"{phase:<12}" + "".join(f"{summary[kind][phase]:>20.2f}" for kind in kinds))
    write_results(args.out, "probe_start_bench.py", args.device, summary, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
