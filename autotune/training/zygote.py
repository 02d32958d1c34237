"""Warm probe processes: import the heavy libraries once, then fork one fresh process per probe.

`python -m autotune.training.zygote` imports torch, transformers and the probe code (on a
machine without a GPU also peft and bitsandbytes), prints one JSON line saying it is ready, then
reads one JSON line per probe from stdin: {"request", "result", "log", "exit", "env"}. For each it
forks a child that runs exactly what `python -m autotune.training.child` runs, in a new session
with the given environment and its output in the log, and answers {"pid": N}. When the child
ends, its exit status is written to the "exit" file.

Each probe is still a process of its own, with its own CUDA context and memory, killed as a
group on timeout: an out-of-memory error, a crash or a leak in one cannot reach the next. What
the fork saves is the interpreter start and the imports (seconds per probe).

CUDA must never be initialised here, or the forked children could not use it. torch is told to
ask NVML, not the CUDA runtime, whether a GPU is there; peft and bitsandbytes are left to the
children on a GPU machine, because importing bitsandbytes queries the device; and the server
refuses to serve (the runner then starts probes cold) if anything initialised CUDA anyway.
When stdin closes (the study ended or died) the server kills the probes still running and exits
at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from autotune.files import write_atomically

READY = "ready"


def preload() -> str | None:
    """Import what every probe needs; the reason this process cannot fork probes, or None."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import autotune.data.splits  # noqa: F401
    import autotune.data.token_cache  # noqa: F401
    import autotune.training.batching  # noqa: F401
    import autotune.training.build  # noqa: F401
    import autotune.training.child  # noqa: F401
    import autotune.training.loop  # noqa: F401

    if not torch.cuda.is_available():
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    if torch.cuda.is_initialized():
        return "CUDA was initialised while importing the libraries"
    return None


class Reaper:
    """Collects every forked probe on SIGCHLD and writes its exit status where the runner looks.

    A signal handler rather than a thread: forking a process that has threads is unsafe.
    """

    def __init__(self) -> None:
        self.exit_paths: dict[int, str] = {}
        self.unclaimed: dict[int, int] = {}
        signal.signal(signal.SIGCHLD, lambda *_: self.reap())

    def add(self, pid: int, exit_path: str) -> None:
        if pid in self.unclaimed:
            write_exit(exit_path, self.unclaimed.pop(pid))
        else:
            self.exit_paths[pid] = exit_path

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            exit_path = self.exit_paths.pop(pid, None)
            if exit_path is None:
                self.unclaimed[pid] = code
            else:
                write_exit(exit_path, code)


def write_exit(exit_path: str, code: int) -> None:
    write_atomically(exit_path, str(code))


def run_child(order: dict, server_pid: int) -> int:
    """In the forked process: become the probe `python -m autotune.training.child` would be."""
    from autotune.training import child

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    os.environ.clear()
    os.environ.update(order["env"])
    # the server's pid as it was before the fork: if the server is already gone, the child's
    # parent is not it, and the child's watch ends it at once
    os.environ[child.PARENT_ENV] = str(server_pid)
    os.environ[child.FORKED_ENV] = "1"
    log = os.open(order["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return child.main([order["request"], order["result"]])


def serve(lines, answer) -> None:
    reaper = Reaper()
    for line in lines:
        if not line.strip():
            continue
        order = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        server_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_child(order, server_pid)
            except BaseException:  # noqa: BLE001 - the child must never return into the loop
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        reaper.add(pid, order["exit"])
        answer({"pid": pid})
    # End of input: the study closed it, or died. A probe still running would otherwise run on
    # until this server's exit (seconds of tearing down torch) fired its parent-death signal.
    for pid in list(reaper.exit_paths):
        for kill in (os.killpg, os.kill):  # its session's processes; itself, if just forked
            try:  # and not yet the leader of a session of its own
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def main() -> int:
    def answer(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    from autotune.lifetime import die_with_parent, set_parent_death_signal
    from autotune.training.child import PARENT_ENV

    # While the libraries load, the kernel kills this server with the study (the study's thread
    # that started it waits for it to be ready); from the first fork on, the end of stdin says
    # the study is gone, and the signal is cleared, since the thread may end before the server.
    if os.environ.get(PARENT_ENV):
        die_with_parent(int(os.environ[PARENT_ENV]))
    try:
        refused = preload()
    except Exception as error:  # noqa: BLE001 - reported to the runner, which starts cold
        refused = f"{type(error).__name__}: {error}"
    set_parent_death_signal(0)
    if refused:
        answer({"refused": refused})
        return 1
    answer({READY: os.getpid()})
    serve(sys.stdin, answer)
    sys.stdout.flush()
    os._exit(0)  # nothing left to write: skip the seconds of unloading torch


if __name__ == "__main__":
    sys.exit(main())
