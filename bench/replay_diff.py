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

Then the allocator model alone: the probe's own requests and frees, in the GPU's order, through
autotune.allocator, once with each new segment at the address the driver gave it and once in
the order of reservation (what a replay, which sees no address, assumes). Where the first
matches the GPU's peak, the allocator's rules are not what parts the replay from the GPU: the
order or the sizes of the replay's requests are.

Then the blocks alive at each side's allocated peak, told apart by size: those only the GPU
held (a tensor the replay does not make, or frees earlier) and those only the replay held (with
the phase that allocated them), largest first, and both allocated peaks. A miss of allocated
memory, not of the allocator's overhead, shows here as a block size to look for.

With `--requests N`, then both streams of large-pool requests (over 1 MiB, the pool that
reserves the large segments) side by side from their first difference, N of them: each
request's bytes, the sizes of the large blocks freed since the one before, and the Python
frames that made the replay's (a snapshot recorded without stacks names no code; the replay's
frames, where both streams still agree, tell which code made the GPU's). A block allocated and
freed before the next large request leaves its pool as it found it and is left out; `--after K`
looks for the first difference from the K-th request on (past one already explained).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared import CONFIGS, ROOT  # noqa: E402

GROW = ("segment_alloc", "segment_map")
SHRINK = ("segment_free", "segment_unmap")
LARGE_REQUEST_BYTES = 2**20
"""Requests over this are served from the large pool (the allocator's small-request bound)."""

Event = tuple[str, int, str]
"""("alloc", bytes requested, where it was made) or ("free", index of its alloc event, "")."""
Step = tuple[tuple[int, ...], int, str]
"""A large request: the large blocks' bytes freed since the one before (sorted), its bytes
(rounded as the allocator serves them), where it was made."""
UNSEEN_FRAMES = (
    "/torch/",
    "/copy.py",
    "autotune/meta_recorder.py",
    "autotune/allocator.py",
    "replay_diff.py",
)
"""Frames left out of a replay request's place: dispatch, deep copies and the recording."""


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


def trace_through_model(snapshot: dict, addresses: bool) -> int:
    """The peak of reserved bytes autotune.allocator reaches on the snapshot's own requests and
    frees, in its order; `addresses`: each new segment ordered among equal free blocks by the
    address the trace gives it, else by when it was reserved."""
    from autotune.allocator import CachingAllocator

    events = [e for trace in snapshot.get("device_traces", []) for e in trace]
    settings = snapshot.get("allocator_settings") or {}
    allocator = CachingAllocator(expandable_segments=bool(settings.get("expandable_segments")))
    live: dict[int, Any] = {}
    segment_address: int | None = None
    for index, event in enumerate(events):
        action, address = event.get("action"), event.get("addr", -index)
        if action == "segment_alloc":
            segment_address = address
        elif action in SHRINK:  # only empty_cache() gives memory back (no OOM here)
            allocator.empty_cache()
        elif action == "alloc":
            where = segment_address if addresses else None
            live[address] = allocator.malloc(int(event.get("size", 0)), address=where)
            segment_address = None
        elif action == "free_completed" and address in live:
            allocator.free(live.pop(address))
    return allocator.peak_reserved_bytes


def gpu_live_at_peak(snapshot: dict) -> tuple[list[int], int, int]:
    """The bytes of each block alive when the probe's allocated bytes peaked (largest first),
    that peak, and how many frees named a block the trace never allocated (more than none: the
    trace's ring buffer dropped its start, and blocks from before it are missing)."""
    events = [e for trace in snapshot.get("device_traces", []) for e in trace]

    def walk(stop: int) -> tuple[dict[int, int], int, int, int]:
        live: dict[int, int] = {}
        allocated = peak = peak_index = unknown = 0
        for index, event in enumerate(events[:stop]):
            action, address = event.get("action"), event.get("addr", index)
            if action == "alloc":
                live[address] = int(event.get("size", 0))
                allocated += live[address]
                if allocated > peak:
                    peak, peak_index = allocated, index + 1
            elif action == "free_completed":
                if address in live:
                    allocated -= live.pop(address)
                else:
                    unknown += 1
        return live, peak, peak_index, unknown

    _, peak, peak_index, unknown = walk(len(events))
    live, _, _, _ = walk(peak_index)
    return sorted(live.values(), reverse=True), peak, unknown


def unmatched(
    gpu: list[int], replayed: list[tuple[int, str]], shown: int = 12
) -> tuple[list[str], list[str]]:
    """The block sizes alive at one side's allocated peak and not the other's, largest first:
    (GPU only, replay only with the phases that allocated them)."""

    def size_text(size: int) -> str:
        return f"{size / 2**20:.2f} MiB" if size >= 2**20 // 100 else f"{size} B"

    gpu_sizes, replay_sizes = Counter(gpu), Counter(size for size, _ in replayed)
    phases: dict[int, set[str]] = {}
    for size, phase in replayed:
        phases.setdefault(size, set()).add(phase)
    gpu_lines = [
        f"{count} x {size_text(size)}"
        for size, count in sorted((gpu_sizes - replay_sizes).items(), reverse=True)
    ]
    replay_lines = [
        f"{count} x {size_text(size)} ({', '.join(sorted(phases[size]))})"
        for size, count in sorted((replay_sizes - gpu_sizes).items(), reverse=True)
    ]
    return gpu_lines[:shown], replay_lines[:shown]


def gpu_requests(snapshot: dict) -> list[Event]:
    """The probe's allocations and frees, in order, from a torch.cuda.memory snapshot's trace
    (each frame the trace recorded, if it recorded any, as the place)."""
    events: list[Event] = []
    live: dict[int, int] = {}
    for entry in (e for trace in snapshot.get("device_traces", []) for e in trace):
        action, address = entry.get("action"), entry.get("addr", len(events))
        if action == "alloc":
            live[address] = len(events)
            frames = entry.get("frames") or []
            where = " | ".join(f"{f['filename']}:{f['line']}:{f['name']}" for f in frames[:3])
            events.append(("alloc", int(entry.get("size", 0)), where))
        elif action == "free_completed" and address in live:
            events.append(("free", live.pop(address), ""))
    return events


def replay_requests(recipe: Any, config: Any) -> tuple[Any, list[Event]]:
    """The replay of `recipe` and every request and free it made of the allocator model, in
    order, each request with the first frames outside torch that made it."""
    from autotune.allocator import CachingAllocator
    from autotune.replay import replay

    events: list[Event] = []
    index: dict[int, int] = {}
    malloc, free = CachingAllocator.malloc, CachingAllocator.free

    def place() -> str:
        frame, frames = sys._getframe(2), []
        while frame is not None and len(frames) < 3:
            name = frame.f_code.co_filename
            if not any(part in name for part in UNSEEN_FRAMES):
                short = name.split("site-packages/")[-1].removeprefix(f"{ROOT}/")
                frames.append(f"{short}:{frame.f_lineno}:{frame.f_code.co_name}")
            frame = frame.f_back
        return " | ".join(frames)

    def recorded_malloc(self: Any, nbytes: int, address: int | None = None) -> Any:
        block = malloc(self, nbytes, address)
        index[id(block)] = len(events)
        events.append(("alloc", nbytes, place()))
        return block

    def recorded_free(self: Any, block: Any) -> None:
        if id(block) in index:
            events.append(("free", index.pop(id(block)), ""))
        free(self, block)

    CachingAllocator.malloc, CachingAllocator.free = recorded_malloc, recorded_free  # type: ignore[method-assign]
    try:
        return replay(recipe, config), events
    finally:
        CachingAllocator.malloc, CachingAllocator.free = malloc, free  # type: ignore[method-assign]


def large_steps(events: list[Event]) -> list[Step]:
    """The large-pool requests of `events`, each with the large blocks freed since the one
    before; a block freed before the next large request is made is left out (its pool is as
    it was)."""
    from autotune.allocator import rounded_bytes

    def large(event: Event) -> bool:
        return event[0] == "alloc" and rounded_bytes(event[1]) > LARGE_REQUEST_BYTES

    transient, last = set(), None
    for index, event in enumerate(events):
        if large(event):
            last = index
        elif event[0] == "free" and event[1] == last:
            transient.add(last)
    steps: list[Step] = []
    freed: list[int] = []
    for index, (action, value, where) in enumerate(events):
        if index in transient or (action == "free" and value in transient):
            continue
        if action == "alloc" and large(events[index]):
            steps.append((tuple(sorted(freed)), rounded_bytes(value), where))
            freed = []
        elif action == "free" and large(events[value]):
            freed.append(rounded_bytes(events[value][1]))
    return steps


def request_diff(gpu: list[Step], replayed: list[Step], shown: int, after: int = 0) -> list[str]:
    """Both large-request streams side by side from their first difference at or after the
    `after`-th request (three agreeing ones before it), `shown` rows, each marked where the
    two differ in bytes or in what was freed before."""
    count = min(len(gpu), len(replayed))
    first = next((k for k in range(after, count) if gpu[k][:2] != replayed[k][:2]), None)
    if first is None:
        return [f"the {count} large requests from the {after}-th on agree"]

    def cell(step: Step) -> str:
        freed = ",".join(f"{size / 2**20:.2f}" for size in step[0])
        return f"{step[1] / 2**20:10.2f} MiB freed [{freed}]"

    lines = [f"first difference at large request {first} (GPU {len(gpu)}, replay {count})"]
    for k in range(max(after, first - 3), min(first + shown, count)):
        mark = "<-" if gpu[k][:2] != replayed[k][:2] else "  "
        lines.append(f"{k:6d}  {cell(gpu[k]):<44} {cell(replayed[k]):<44} {mark} {replayed[k][2]}")
    return lines


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
    parser.add_argument(
        "--requests", type=int, default=0, help="large requests shown from the first difference"
    )
    parser.add_argument("--after", type=int, default=0, help="look from this large request on")
    args = parser.parse_args()

    from autotune.recipe import Recipe
    from autotune.replay import load_config, replay

    with args.snapshot.open("rb") as handle:
        snapshot = pickle.load(handle)
    gpu, gpu_peak = gpu_reservations(snapshot)
    recipe = Recipe.from_dict({"model": args.shape, **json.loads(args.fields)})
    config = load_config(str(CONFIGS[args.shape]))
    requests: list[Event] = []
    if args.requests:
        result, requests = replay_requests(recipe, config)
    else:
        result = replay(recipe, config)
    print(f"{'':4}  {'GPU reserved':<31}  replay reserved")
    print("\n".join(side_by_side(gpu, result.reservations)))
    gib, replayed = 2**30, result.peak_reserved_bytes
    print(
        f"peak reserved: GPU {gpu_peak / gib:.3f} GiB, replay {replayed / gib:.3f} GiB "
        f"({replayed / gpu_peak - 1:+.1%})"
        if gpu_peak
        else "the snapshot holds no segment reservation"
    )
    if gpu_peak:
        placed, ordered = (trace_through_model(snapshot, flag) for flag in (True, False))
        print(
            f"the allocator model on the GPU's requests: {placed / gib:.3f} GiB "
            f"({placed / gpu_peak - 1:+.2%}) with the trace's segment addresses, "
            f"{ordered / gib:.3f} GiB ({ordered / gpu_peak - 1:+.2%}) in order of reservation"
        )
    live, gpu_allocated, unknown = gpu_live_at_peak(snapshot)
    gpu_only, replay_only = unmatched(live, result.live_at_peak)
    print("blocks alive at the allocated peak, on one side only:")
    print("  GPU only:    " + ("; ".join(gpu_only) or "none"))
    print("  replay only: " + ("; ".join(replay_only) or "none"))
    if unknown:
        print(f"  ({unknown} frees of blocks the trace lost at its start: the GPU side is partial)")
    replay_allocated = result.peak_allocated_bytes
    print(
        f"peak allocated: GPU {gpu_allocated / gib:.3f} GiB, replay {replay_allocated / gib:.3f}"
        f" GiB ({replay_allocated / gpu_allocated - 1:+.1%})"
        if gpu_allocated
        else "the snapshot holds no allocation"
    )
    if args.requests:
        print("large requests, GPU and replay (bytes, and the large blocks freed before them):")
        gpu_steps, replay_steps = large_steps(gpu_requests(snapshot)), large_steps(requests)
        print("\n".join(request_diff(gpu_steps, replay_steps, args.requests, args.after)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
