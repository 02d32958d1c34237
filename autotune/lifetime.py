"""Nothing a run starts outlives it: every process the run starts (the probe server, its forked
probes, cold probes, the GPU-less worker) ends once its parent is gone, however the parent died
(kill -9, an out-of-memory kill, a closed terminal).

Two means: on Linux the kernel's parent-death signal (prctl PR_SET_PDEATHSIG), which fires at
once even while the child sits in a long import holding the GIL, but which follows the parent
*thread* that started the child, so it suits only children whose starting thread outlives them;
and a watch thread that compares the parent with the pid the parent passed down, a few times a
second, for the rest. The multiprocessing resource tracker ends on its own once the run and its
worker, the only holders of its pipe, are gone.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

PARENT_WATCH_INTERVAL_SECONDS = 0.2


def watch_parent(
    parent_pid: int, interval_seconds: float = PARENT_WATCH_INTERVAL_SECONDS
) -> threading.Thread:
    """A daemon thread that kills this process when `parent_pid` stops being its parent."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(interval_seconds)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signal_number: int) -> bool:
    """Have the kernel send `signal_number` to this process when the thread that started it
    ends (0: never); whether the platform has it (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal_number, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int) -> None:
    """Die at once when the parent dies (the kernel's signal); if it is already gone, now."""
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the signal was asked for
        os.kill(os.getpid(), signal.SIGKILL)


def exit_with_parent(parent_pid: int, starter_outlives_child: bool = False) -> None:
    """Watch `parent_pid` (the pid the parent passed down, so a parent that died before the
    watch started is caught at once) and die with it; where the parent's thread that started
    this process lives as long as it (a probe: its trial waits for it), also by the kernel's
    signal, which acts during imports too."""
    if starter_outlives_child:
        die_with_parent(parent_pid)
    watch_parent(parent_pid)
