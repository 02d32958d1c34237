"""A large JSONL through the study's data preparation: time and peak memory, no GPU needed.

    python bench/data_bench.py --size-mb 1024 --out bench/results/data_1gb.json

writes a JSONL of about `--size-mb` megabytes (input/output rows of random words, from a seed),
then does what `autotune run` does before its first probe: one streaming pass that checks every
row, the token-length figures over the first rows, and the tokenization into the on-disk token
cache. It prints the seconds of each phase, the peak resident memory of the process and the
cache's size. Rows are read and tokenized a chunk at a time and tokens are kept as 4-byte
integers, so the peak stays near the size of the token arrays whatever the file's size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import MODELS_DIR, ROOT, TOKENIZER, WORDS, write_results  # noqa: E402

from autotune.data.rows import checked_scan, usable_rows  # noqa: E402
from autotune.data.summary import length_stats  # noqa: E402
from autotune.data.token_cache import cached_splits  # noqa: E402
from autotune.training.build import load_tokenizer  # noqa: E402


def write_rows(path: Path, size_bytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    rows = 0
    with path.open("w", encoding="utf-8") as handle:
        while handle.tell() < size_bytes:
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400)))
            handle.write(json.dumps({"input": question, "output": answer}) + "\n")
            rows += 1
    return rows


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=MODELS_DIR / "data-bench")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data.json")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / "large.jsonl"
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    rows = write_rows(data, int(args.size_mb * 1e6))
    seconds["write"] = time.perf_counter() - started
    tokenizer = load_tokenizer(str(TOKENIZER))
    baseline = peak_rss_bytes()

    started = time.perf_counter()
    data_scan = checked_scan(data)
    seconds["check"] = time.perf_counter() - started
    started = time.perf_counter()
    length_stats(itertools.islice(usable_rows(data), 2000), tokenizer, args.seq_len)
    seconds["length_stats"] = time.perf_counter() - started
    cache_dir = args.workdir / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(
            f"tokenized {done:,} of {total:,} rows, peak RSS {peak_rss_bytes() / 2**30:.2f} GiB",
            flush=True,
        )

    splits, cache = cached_splits(
        data,
        tokenizer,
        args.seq_len,
        0,
        cache_dir,
        row_count=data_scan.usable_rows,
        progress=progress,
    )
    seconds["tokenize"] = time.perf_counter() - started
    summary = {
        "file_bytes": data.stat().st_size,
        "rows": rows,
        "usable_rows": data_scan.usable_rows,
        "train_tokens": splits.train.tokens,
        "cache_bytes": sum(f.stat().st_size for f in cache.iterdir()),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_before_reading_bytes": baseline,  # libraries and tokenizer loaded
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    print(json.dumps(summary, indent=1))
    write_results(args.out, "data_bench.py", "cpu", summary)
    data.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
