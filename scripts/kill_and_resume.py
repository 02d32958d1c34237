"""Kill `autotune run` with SIGKILL at random moments, resume it, and check nothing was lost.

    python scripts/kill_and_resume.py --model DIR --data FILE --trials 5 --kills 10 -- [run args]

After every kill: each trial that had finished is still there with the same values, and no probe
process outlives the killed run. After the final, uninterrupted run: the study holds exactly
--trials finished trials and none is left RUNNING. Exits non-zero with the reason otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path


def finished_values(storage: str, study: str) -> dict[int, tuple]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        loaded = optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        return {}
    return {
        t.number: tuple(t.values)
        for t in loaded.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    }


def probe_processes(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "autotune.training.child" in cmdline and marker in cmdline:
            pids.append(int(entry.name))
    return pids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--max-delay", type=float, default=10.0, help="seconds before a kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=".")
    parser.add_argument("run_args", nargs="*", help="more `autotune run` arguments")
    args = parser.parse_args()

    workdir = Path(args.workdir).resolve()
    storage = f"sqlite:///{workdir}/kill.db"
    study = "kill-resume"
    autotune = str(Path(sys.executable).parent / "autotune")
    command = [
        autotune,
        "run",
        "--model",
        args.model,
        "--data",
        args.data,
        "--budget",
        "8GB",
        "--trials",
        str(args.trials),
        "--storage",
        storage,
        "--study",
        study,
        *args.run_args,
    ]
    rng = random.Random(args.seed)
    seen: dict[int, tuple] = {}
    for kill in range(args.kills):
        process = subprocess.Popen(
            command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        delay = rng.uniform(0.3, args.max_delay)
        time.sleep(delay)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        now = finished_values(storage, study)
        lost = {n: v for n, v in seen.items() if now.get(n) != v}
        if lost:
            print(f"kill {kill + 1}: finished trials lost or changed: {sorted(lost)}")
            return 1
        deadline = time.time() + 5
        while probe_processes(str(workdir)) and time.time() < deadline:
            time.sleep(0.2)
        if probe_processes(str(workdir)):
            print(f"kill {kill + 1}: probes outlived the run: {probe_processes(str(workdir))}")
            return 1
        print(f"kill {kill + 1} after {delay:.1f} s: {len(now)} finished trials kept")
        seen = now

    final = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if final.returncode != 0:
        print(f"final run failed ({final.returncode}): {final.stderr.strip()[-500:]}")
        return 1
    import optuna

    from autotune.study import finished_trial_count

    loaded = optuna.load_study(study_name=study, storage=storage)
    running = loaded.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    count = finished_trial_count(loaded)
    now = finished_values(storage, study)
    lost = {n for n, v in seen.items() if now.get(n) != v}
    print(
        f"final: {count} finished trials, {len(running)} running, "
        f"{len(loaded.trials)} trial records, lost {sorted(lost)}"
    )
    if running or count != args.trials or lost:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
