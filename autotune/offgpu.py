"""A long-lived child process that sees no GPU.

Work that imports bitsandbytes (the replay memory model; peft's check of a LoRA target set, as
peft imports it) must not run in a study's own process: importing bitsandbytes queries the GPU,
and the CUDA context that gives the study would take memory from the probes it measures. The
child imports torch and the rest once and serves every call of the process.

The child is started without the caller's main script: multiprocessing's spawn runs that script
again in every child it starts, so a script that calls `autotune.run` at its top level would
run a second study inside the worker (and print everything twice). The worker only runs
autotune's own functions, which it imports by their modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

Result = TypeVar("Result")

_WORKER: Any = None


def _start_worker(parent_pid: int) -> None:
    import os
    import signal

    # Ctrl-C reaches the whole process group: the run says it was interrupted, and this
    # worker ends at once without a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    from autotune.cpu_nf4 import quiet_kernel_hub_notice
    from autotune.lifetime import exit_with_parent

    exit_with_parent(parent_pid)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    quiet_kernel_hub_notice()


@contextmanager
def _without_main_script() -> Iterator[None]:
    """While a process is spawned: no main module for it to import and run again."""
    import sys
    import types

    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is None:
            del sys.modules["__main__"]
        else:
            sys.modules["__main__"] = main


def _stop_worker() -> None:
    """At the process's exit: end the child at once rather than wait for it. Its work is of no
    use once the process ends, and the exit would otherwise wait for the child to finish a call
    and unload torch, seconds in which a Ctrl-C printed a traceback of the pool's exit handler
    after the command had already said all it had to say."""
    worker = _WORKER
    if worker is None:
        return
    try:
        for process in list((getattr(worker, "_processes", None) or {}).values()):
            process.terminate()
        worker.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt:  # the command is over: nothing is left to interrupt
        pass


def run_off_gpu(function: Callable[..., Result], *args: Any) -> Result:
    """`function(*args)` in the child (both must pickle: a module-level function)."""
    global _WORKER
    if _WORKER is None:
        import multiprocessing
        import os
        import threading
        from concurrent.futures import ProcessPoolExecutor

        _WORKER = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(os.getpid(),),
        )
        # before the pool's own exit handler (which waits for its child): these run last
        # registered first, ahead of the atexit module's
        getattr(threading, "_register_atexit")(_stop_worker)  # noqa: B009 - private, untyped
        with _without_main_script():  # the first submit starts the worker process
            future = _WORKER.submit(function, *args)
        return future.result()
    return _WORKER.submit(function, *args).result()
