#!/usr/bin/env bash
# The checks to run first on a lent CUDA machine, as one command inside 8 minutes:
#
#   here:   make gpu-wheels      (the wheels that machine lacks, into .wheels/)
#   there:  bash bench/gpu_session.sh      (the device tool, carrying .wheels)
#
# 1. the GPU tests (`pytest -m gpu tests`: fused loss, CUDA probes, budget caps), 2.5 min at most;
# 2. memory_bench's unmeasured grid (fused against foreach AdamW, the chunked loss, int8 at
#    micro-batch 2) on three shapes, stopping its grid after 4 minutes.
# Logs and results go to $OUT (what the device tool brings back), else bench/results/gpu-session/;
# commit the results file under bench/results/ and rescore it (bench/README.md, memory_bench.py).
set -uo pipefail
OUT=${OUT:-bench/results/gpu-session}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if compgen -G ".wheels/*.whl" >/dev/null; then
    python3 -m pip install --quiet --no-index --no-deps .wheels/*.whl 2>&1 | tail -2
fi
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch, transformers, peft, bitsandbytes, optuna; print(*(f"{m.__name__} {m.__version__}" for m in (torch, transformers, peft, bitsandbytes, optuna)))'
} 2>&1 | tee "$OUT/machine.txt"
timeout 150 python3 -m pytest -m gpu tests -q -p no:cacheprovider -o addopts="" 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -25
timeout 330 python3 bench/memory_bench.py --grid unmeasured \
    --shapes qwen2-0.5b,llama-3.2-1b,qwen2-7b --deadline-minutes 4 --timeout 200 \
    --out "$OUT/memory_unmeasured_h100.json" 2>&1 | tee "$OUT/memory_bench.log" | tail -30
