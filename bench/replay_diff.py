"""Where the replay memory model and a real GPU probe part ways: their segment reservations side
by side, from the caching allocator's own record of the probe.

On a CUDA machine, record a probe's allocations (memory_bench's `--snapshots DIR` does it for
every recipe it probes; any probe does with AUTOTUNE_MEMORY_HISTORY=1, next to its result file):

    python bench/memory_bench.py --grid holdout --snapshots $OUT/snapshots --out $OUT/holdout.json

then, anywhere (no GPU):

    python bench/replay_diff.py SNAPSHOT --shape qwen2-0.5b --fields '{"method": "freeze", ...}'

prints each segment the GPU reserved (bytes, and the request that made it reserve) next to the
replay's, marks the first that differ, and both peaks of reserved bytes. A segment the GPU
reserved and the replay did not is an allocation the replay does not make, or makes at
another moment or size: the request's size says which tensor to look for.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import CONFIGS  # noqa: E402

GROW = ("segment_alloc", "segment_map")
SHRINK = ("segment_free", "segment_unmap")


def gpu_reservations(snapshot: dict) -> tuple[list[tuple[int, int]], int]:
    """(bytes reserved, bytes of the request that made it) per segment the probe reserved, in
    order, and the peak of reserved bytes, from a torch.cuda.memory snapshot's trace."""
    events = [e for trace in snapshot.get("device_traces", []) for e in trace]
    reservations: list[tuple[int, int]] = []
    reserved = peak = 0
    waiting: list[int] = []  # reservations whose request is the next alloc
    for event in events:
        action, size = event.get("action"), int(event.get("size", 0))
        if action in GROW:
            reservations.append((size, 0))
            waiting.append(len(reservations) - 1)
            reserved += size
            peak = max(peak, reserved)
        elif action in SHRINK:
            reserved -= size
        elif action == "alloc" and waiting:
            for index in waiting:
                reservations[index] = (reservations[index][0], size)
            waiting.clear()
    return reservations, peak


def side_by_side(gpu: list[tuple[int, int]], replayed: list[tuple[int, int]]) -> list[str]:
    mib = 2**20
    lines, first = [], None
    for index in range(max(len(gpu), len(replayed))):
        g = gpu[index] if index < len(gpu) else None
        r = replayed[index] if index < len(replayed) else None
        differs = g is None or r is None or g[0] != r[0]
        if differs and first is None:
            first = index
        cell = [
            f"{x[0] / mib:10.2f} MiB (for {x[1] / mib:9.2f} MiB)" if x else " " * 31 for x in (g, r)
        ]
        mark = "  <- first difference" if index == first else ""
        lines.append(f"{index:4d}  {cell[0]}  {cell[1]}{mark}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshot", type=Path, help="memory_snapshot.pickle of a probe")
    parser.add_argument("--shape", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--fields", required=True, help="the probe's recipe fields, as JSON")
    args = parser.parse_args()

    from autotune.recipe import Recipe
    from autotune.replay import load_config, replay

    with args.snapshot.open("rb") as handle:
        snapshot = pickle.load(handle)
    gpu, gpu_peak = gpu_reservations(snapshot)
    recipe = Recipe.from_dict({"model": args.shape, **json.loads(args.fields)})
    result = replay(recipe, load_config(str(CONFIGS[args.shape])))
    print(f"{'':4}  {'GPU reserved':<31}  replay reserved")
    print("\n".join(side_by_side(gpu, result.reservations)))
    gib, replayed = 2**30, result.peak_reserved_bytes
    print(
        f"peak reserved: GPU {gpu_peak / gib:.3f} GiB, replay {replayed / gib:.3f} GiB "
        f"({replayed / gpu_peak - 1:+.1%})"
        if gpu_peak
        else "the snapshot holds no segment reservation"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
