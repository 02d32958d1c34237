"""A long-lived child process that sees no GPU.

Work that imports bitsandbytes (the replay memory model; peft's check of a LoRA target set, as
peft imports it) must not run in a study's own process: importing bitsandbytes queries the GPU,
and the CUDA context that gives the study would take memory from the probes it measures. The
child imports torch and the rest once and serves every call of the process.
"""

from __future__ import annotations

from collections.abc import Callable
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


def run_off_gpu(function: Callable[..., Result], *args: Any) -> Result:
    """`function(*args)` in the child (both must pickle: a module-level function)."""
    global _WORKER
    if _WORKER is None:
        import atexit
        import multiprocessing
        import os
        from concurrent.futures import ProcessPoolExecutor

        _WORKER = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(os.getpid(),),
        )
        atexit.register(_WORKER.shutdown, cancel_futures=True)
    return _WORKER.submit(function, *args).result()
