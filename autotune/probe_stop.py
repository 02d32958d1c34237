"""Ctrl-C while probes run in worker threads (`run --workers N`): every probe stops at once.

The signal reaches the main thread alone, and each probe runs in a process group of its own,
which the terminal's Ctrl-C does not reach either; without this the run would wait for the
other workers' probes to end.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_PROBES = threading.Event()
"""Set on Ctrl-C while probes run in worker threads (`--workers`), which the signal does not
reach: each running probe is killed and its `run` raises ProbeStopped."""

STOP_POLL_SECONDS = 0.2
"""How often a probe's wait looks at STOP_PROBES."""


class ProbeStopped(KeyboardInterrupt):
    """A probe killed because Ctrl-C stopped the run: its trial is interrupted, as the probe of
    the thread the signal reached."""


STOPPED_PROBES_WAIT_SECONDS = 10.0
"""How long a run stopped by Ctrl-C waits for its other threads' probes to be killed."""


class _RunningProbes:
    """How many probes this process's threads are running now."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = threading.Condition()

    @contextmanager
    def one(self) -> Iterator[None]:
        with self.changed:
            self.count += 1
        try:
            yield
        finally:
            with self.changed:
                self.count -= 1
                self.changed.notify_all()

    def wait_until_none(self, timeout_seconds: float) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.count == 0, timeout_seconds)


RUNNING_PROBES = _RunningProbes()


@contextmanager
def probes_stop_on_ctrl_c() -> Iterator[None]:
    """Within: Ctrl-C also stops the probes of other threads (STOP_PROBES) and, once they are
    killed, interrupts this thread as usual. Left as is where this is not the main thread or
    Ctrl-C is handled otherwise; a stop left by an earlier run of this process is cleared
    either way, so it stops none of this run's probes."""
    STOP_PROBES.clear()  # set by an earlier run of this process that Ctrl-C stopped
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return

    def stop(signum: int, frame: object) -> None:
        STOP_PROBES.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    try:
        yield
    except KeyboardInterrupt:
        # Stays set: a thread that has yet to start its probe must not start it.
        RUNNING_PROBES.wait_until_none(STOPPED_PROBES_WAIT_SECONDS)
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Terminated(KeyboardInterrupt):
    """Ctrl-C's interruption, raised by a termination signal (TERMINATION_SIGNALS)."""


TERMINATED_BY: list[signal.Signals] = []
"""The termination signal that stopped this process, once one did (the CLI's exit code and
words: typer turns every interruption into exit code 130)."""


TERMINATION_SIGNALS = ("SIGTERM", "SIGHUP")
"""Signals that end a run as Ctrl-C does: a batch system's time limit or `kill` (SIGTERM), a
closed terminal (SIGHUP). Left to the default, they would end the process where it stands:
its running trials marked running until a later run found them, no word said."""


def stopped_by() -> str:
    """What stopped this process: the termination signal's name, or Ctrl-C."""
    return TERMINATED_BY[0].name if TERMINATED_BY else "Ctrl-C"


def interruption(words: str) -> tuple[str, int]:
    """A command's words on Ctrl-C ("autotune: interrupted; ...") and exit code 130, or, where
    a termination signal stopped it, "stopped by SIGTERM" and 128 + the signal's number."""
    if not TERMINATED_BY:
        return words, 130
    return words.replace("interrupted", f"stopped by {stopped_by()}", 1), 128 + TERMINATED_BY[0]


def terminate_as_ctrl_c() -> None:
    """Have SIGTERM and SIGHUP stop this process as Ctrl-C does (KeyboardInterrupt in the main
    thread, every probe of other threads stopped too), so a stopped run queues its running
    trials again and says so. A signal already ignored (`nohup` ignores SIGHUP) stays ignored.
    Call from the main thread."""

    def stop(signum: int, frame: object) -> None:
        STOP_PROBES.set()  # the probes of other threads, whatever handles SIGINT now
        TERMINATED_BY.append(signal.Signals(signum))
        raise Terminated(signum)

    for name in TERMINATION_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:
            signal.signal(number, stop)


@contextmanager
def stop_handling_restored() -> Iterator[None]:
    """Within: a command may have SIGTERM and SIGHUP stop this process as Ctrl-C does
    (terminate_as_ctrl_c) and be stopped; after, both are handled as they were before and no
    stop or termination is left over, so a caller of the command in this same process (a test,
    a notebook calling the CLI's main) is left as it was."""
    numbers = [getattr(signal, name) for name in TERMINATION_SIGNALS if hasattr(signal, name)]
    handlers = {number: signal.getsignal(number) for number in numbers}
    try:
        yield
    finally:
        for number, handler in handlers.items():
            if handler is not None and signal.getsignal(number) is not handler:
                signal.signal(number, handler)  # changed only where changing it was allowed
        STOP_PROBES.clear()
        TERMINATED_BY.clear()
