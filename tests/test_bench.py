"""The GPU benchmarks' code path, run on the CPU with the demo's tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_memory_bench_cpu_path(tmp_path):
    out = tmp_path / "memory.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "memory_bench.py"),
            "--device",
            "cpu",
            "--shapes",
            "demo",
            "--max-recipes",
            "2",
            "--steps",
            "1",
            "--out",
            str(out),
            "--models-dir",
            str(tmp_path / "models"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["summary"]["recipes"] == 2
    for row in results["rows"]:
        assert row["status"] == "ok", row["reason"]
        assert row["predicted_peak_bytes"] == sum(row["breakdown"].values())
        assert row["measured_peak_bytes"] > 0 and row["memory_source"] == "cpu_peak_rss_delta"
    assert "bench/memory_bench.py --device cpu" in results["command"]
