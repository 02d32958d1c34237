#!/usr/bin/env bash
# The checks to run first on a lent CUDA machine, as one command inside 9 minutes (560 s):
#
#   here:   make gpu-wheels      (the wheels that machine lacks, into .wheels/)
#   there:  bash bench/gpu_session.sh      (the device tool, carrying .wheels)
#
# Side by side, on the one GPU (each probe measures its own process's peak, so they do not
# disturb each other's memory figures; tokens/s of either are not clean):
# 1. the GPU tests (`pytest -m gpu` on the files that carry the mark: fused loss, CPU-offload
#    optimizer, CUDA probes, budget caps), 400 s at most, each failure written as it happens;
#    those never yet seen to pass on a GPU first (test_techniques, test_probe, test_host_held,
#    test_loss), then test_gpu.py's, then any other file with the mark (the limit once cut the
#    last two in pytest's own order, so they had never run on a GPU);
# 2. memory_bench's unmeasured grid on three shapes (going on from this GPU's committed results
#    file), most wanted recipes first (the held-out QLoRA rows, int8 at micro-batch 2, fused
#    against foreach AdamW, ...), starting no probe after 5 minutes, each probe's allocations
#    recorded (torch.cuda.memory snapshots), packed into two .tar.xz files;
# 3. bench/replay_diff.py on the two held-out rows' snapshots (the blocks alive at the GPU's
#    allocated peak that the replay does not hold), into replay_diff.txt;
# 4. on a card of 120000 MiB or more, beside 1 and 2: bench/export_bench.py (the held-out
#    Qwen2-7B and Llama-3.2-1B rows as the plain loop, the probe and the hf export under
#    transformers' Trainer run them; the loop's and the Trainer's snapshots).
# Logs and results go to $OUT (what the device tool brings back), else bench/results/gpu-session/;
# commit the results file under bench/results/ and rescore it (bench/README.md, memory_bench.py).
# SHAPES, EXPORT_SHAPES (none: no export_bench), DEVICE, DEADLINE_MINUTES, HELD_OUT (probe names),
# RESUME (memory_bench's results file to go on from; empty: none),
# MODELS_DIR and WHEELS override the defaults
# (tests/test_bench.py runs it on the CPU with the demo shape).
set -uo pipefail
OUT=${OUT:-bench/results/gpu-session}
SHAPES=${SHAPES:-llama-3.2-1b,qwen2-7b,qwen2-0.5b}
DEVICE=${DEVICE:-cuda}
DEADLINE_MINUTES=${DEADLINE_MINUTES:-5}
HELD_OUT=${HELD_OUT:-qwen2-7b-unmeasured-000-0,llama-3.2-1b-unmeasured-001-0}
WHEELS=${WHEELS:-.wheels}
MODELS_DIR=${MODELS_DIR:-bench/.models}
EXPORT_SHAPES=${EXPORT_SHAPES:-qwen2-7b,llama-3.2-1b}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile "$WHEELS"/*.whl 2>&1 | tail -2
fi
# the tests run the `autotune` command beside the interpreter
bin=$(python3 -c 'import sys, os; print(os.path.dirname(sys.executable))')
if [ ! -x "$bin/autotune" ]; then
    python3 -m pip install --quiet --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -2
fi
if [ ! -x "$bin/autotune" ]; then
    printf '#!%s\nimport sys\nfrom autotune.cli import main\nsys.exit(main())\n' \
        "$bin/python3" >"$bin/autotune" && chmod +x "$bin/autotune"
fi
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "optuna",
             "sqlalchemy", "plotly", "liger_kernel", "torchao", "triton"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # noqa: BLE001 - a machine report, every failure said
        print(name, "FAILED:", type(error).__name__, error)
PY
} 2>&1 | tee "$OUT/machine.txt"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE '[a-z][0-9]{2,3}' | head -1 \
    | tr 'A-Z' 'a-z')
gpu=${gpu:-gpu}
# The files in the order their GPU tests run, each once (pytest would run a file named twice
# twice): those never yet seen to pass on a GPU, test_gpu.py, then every other file that
# carries the gpu mark (a new one is not missed; a file since gone is left out)
gpu_test_files=()
for file in tests/test_techniques.py tests/test_probe.py tests/test_host_held.py \
    tests/test_loss.py tests/test_gpu.py $(grep -lE 'mark\.gpu\b' tests/test_*.py | sort); do
    case " ${gpu_test_files[*]} " in
        *" $file "*) ;;
        *) if [ -f "$file" ]; then gpu_test_files+=("$file"); fi ;;
    esac
done
# -v and each failure's traceback as it happens (tests/conftest.py), a stack dump of a test
# still running after 150 s: the timeout cuts pytest off before its summary
AUTOTUNE_TEST_FAILURES_AT_ONCE=1 timeout 400 python3 -m pytest -m gpu "${gpu_test_files[@]}" \
    -v --tb=short -rs \
    --durations=15 -p no:cacheprovider -o addopts="" -o faulthandler_timeout=150 \
    >"$OUT/gpu_tests.log" 2>&1 &
tests=$!
# 4. beside them where the card holds both (memory_bench draws recipes up to 79 GiB): the
#    exported recipes under transformers' Trainer and a plain loop against the probe
#    (bench/export_bench.py). Both benches' models are built first, once (two builds of one
#    shape into one folder race; two folders would hold the 7B shape twice on a 64 GiB disk).
python3 - "$MODELS_DIR" "$DEVICE" "$SHAPES,$EXPORT_SHAPES" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from shared import CONFIGS, model_dir
for shape in dict.fromkeys(sys.argv[3].split(",")):
    if shape in CONFIGS:
        model_dir(shape, Path(sys.argv[1]), sys.argv[2])
PY
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 \
    | grep -oE '(^|, )[0-9]+' | head -1 | grep -oE '[0-9]+')
exports=
if [ "${total_mib:-0}" -ge 120000 ] && [ "$EXPORT_SHAPES" != none ]; then
    timeout 400 python3 bench/export_bench.py --device "$DEVICE" --shapes "$EXPORT_SHAPES" \
        --models-dir "$MODELS_DIR" --deadline-minutes "$DEADLINE_MINUTES" --timeout 150 \
        --snapshots "$OUT/export-snapshots" --out "$OUT/export_$gpu.json" \
        >"$OUT/export_bench.log" 2>&1 &
    exports=$!
else
    echo "export_bench not run: ${total_mib:-?} MiB card (it runs beside memory_bench from 120000)"
fi
# the grid's rows this GPU already measured (committed under bench/results/) are kept, the rest
# probed: each session goes on where the last one stopped
resume=()
resume_file=${RESUME-bench/results/memory_unmeasured_$gpu.json}
if [ -n "$resume_file" ] && [ -f "$resume_file" ]; then
    resume=(--resume "$resume_file")
fi
timeout 400 python3 bench/memory_bench.py --grid unmeasured --device "$DEVICE" \
    --shapes "$SHAPES" --deadline-minutes "$DEADLINE_MINUTES" --timeout 100 "${resume[@]}" \
    --models-dir "$MODELS_DIR" \
    --snapshots "$OUT/snapshots" --out "$OUT/memory_unmeasured_$gpu.json" 2>&1 \
    | tee "$OUT/memory_bench.log" | tail -40
wait "$tests"
tail -40 "$OUT/gpu_tests.log"
if [ -n "$exports" ]; then
    wait "$exports"
    tail -20 "$OUT/export_bench.log"
    # one log for both benches: no more than 8 files come back from $OUT
    { echo "== bench/export_bench.py"; cat "$OUT/export_bench.log"; } >>"$OUT/memory_bench.log"
    rm -f "$OUT/export_bench.log"
fi
python3 - "$OUT" "$gpu" "$HELD_OUT" <<'PY' 2>&1 | tee "$OUT/replay_diff.txt"
import json, subprocess, sys
from pathlib import Path
out, gpu, held_out = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
rows = json.loads((out / f"memory_unmeasured_{gpu}.json").read_text())["rows"]
runs = []
for row in rows:
    snapshot = out / "snapshots" / f"{row['probe']}.pickle"
    if row["probe"] in held_out and snapshot.exists():
        command = [sys.executable, "bench/replay_diff.py", str(snapshot), "--shape",
                   row["shape"], "--fields", json.dumps(row["fields"])]
        runs.append((row["probe"], subprocess.Popen(command, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True)))
for probe, process in runs:
    try:
        text = process.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        text = "timed out"
    print(f"== {probe}\n{text}")
if not runs:
    print("no snapshot of", ", ".join(held_out))
PY
# What comes back from $OUT is 8 files, 16 MiB each at most: machine.txt, the two logs, the two
# results files, replay_diff.txt, and the snapshots in two packs (where any were recorded): the
# two held-out rows', then the rest, export_bench's under export-snapshots/
(
    cd "$OUT" || exit 0
    heldout=$(compgen -G 'snapshots/*-00[01]-0.pickle')
    if [ -n "$heldout" ]; then
        tar -cf - $heldout | xz -T0 -6 >snapshots_heldout.tar.xz
        rm -f $heldout
    fi
    rest=$(compgen -G 'snapshots/*.pickle'; compgen -G 'export-snapshots/*.pickle')
    if [ -n "$rest" ]; then
        tar -cf - $rest | xz -T0 -6 >snapshots_rest.tar.xz
    fi
)
rm -rf "$OUT/snapshots" "$OUT/export-snapshots"
ls -la "$OUT"
