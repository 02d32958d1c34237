"""Kill `autotune run` with SIGKILL at random moments, resume it, and check nothing was lost.

    python scripts/kill_and_resume.py --model DIR --data FILE --trials 5 --kills 10 -- [run args]

After every kill: no process the run started (probe server, probes, the GPU-less worker, the
resource tracker) is alive --grace seconds later, and each trial that had finished is still
there with the same values. After the final, uninterrupted run: the study holds exactly
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


MARKER_ENV = "AUTOTUNE_KILL_AND_RESUME_RUN"
"""Set in each run's environment, which every process it starts inherits: after the run is
killed (and its orphans reparented away from it), its descendants are still found by it."""
EARLY_SECONDS = 15.0
"""Half the kills fall in a run's first seconds (loading, the probe server starting, before any
probe), half after (during probes)."""


def processes_of_run(marker: str) -> dict[int, str]:
    """pid -> command line of each live process (zombies left out) started by the run."""
    found = {}
    needle = f"{MARKER_ENV}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            found[int(entry.name)] = cmdline
    return found


def kill_delay(rng: random.Random, kill: int, max_delay: float) -> float:
    early = min(EARLY_SECONDS, max_delay)
    if kill % 2 == 0 or max_delay <= early:
        return rng.uniform(0.3, early)
    return rng.uniform(early, max_delay)


PROBE_WAIT_SECONDS = 300.0
"""How long the last kill waits for a probe where no earlier kill met one (on a loaded machine
a run can take longer than --max-delay to reach its first probe)."""


def probing_count(processes: dict[int, str]) -> int:
    return sum("autotune.training.child" in c or "zygote" in c for c in processes.values())


def wait_for_probes(marker: str, process: subprocess.Popen, rng: random.Random) -> None:
    """Sleep until the run started as `marker` runs a probe (or ended, or the wait ran out),
    then a moment more, into the probe."""
    waited = time.perf_counter()
    while time.perf_counter() - waited < PROBE_WAIT_SECONDS and process.poll() is None:
        if probing_count(processes_of_run(marker)):
            time.sleep(rng.uniform(0.2, 2.0))
            return
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--max-delay", type=float, default=10.0, help="seconds before a kill")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--grace", type=float, default=3.0, help="seconds after a kill by which all must be gone"
    )
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
    killed_probing = False
    for kill in range(args.kills):
        marker = f"{os.getpid()}-{kill}"
        process = subprocess.Popen(
            command,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, MARKER_ENV: marker},
        )
        started = time.perf_counter()
        if kill == args.kills - 1 and not killed_probing:
            wait_for_probes(marker, process, rng)  # at least one kill lands among probes
        else:
            time.sleep(kill_delay(rng, kill, args.max_delay))
        delay = time.perf_counter() - started
        at_kill = processes_of_run(marker)
        probing = probing_count(at_kill)
        killed_probing = killed_probing or probing > 0
        ended = process.poll() is not None
        if not ended:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        time.sleep(args.grace)
        left = processes_of_run(marker)
        if left:
            print(f"kill {kill + 1}: {len(left)} processes outlived the run by {args.grace:g} s:")
            for pid, cmdline in left.items():
                print(f"  {pid} {cmdline[:200]}")
                os.kill(pid, signal.SIGKILL)
            return 1
        now = finished_values(storage, study)
        lost = {n: v for n, v in seen.items() if now.get(n) != v}
        if lost:
            print(f"kill {kill + 1}: finished trials lost or changed: {sorted(lost)}")
            return 1
        state = (
            "the run had ended"
            if ended
            else f"{len(at_kill) - 1} processes of the run, {probing} probe server or probes"
        )
        print(
            f"kill {kill + 1} after {delay:.1f} s ({state}): none alive {args.grace:g} s "
            f"later, {len(now)} finished trials kept"
        )
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
