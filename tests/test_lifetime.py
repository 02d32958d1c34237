"""Nothing a run starts outlives it: each kind of process the run starts dies with it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _kill_script():
    spec = importlib.util.spec_from_file_location(
        "kill_and_resume", ROOT / "scripts" / "kill_and_resume.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KILL = _kill_script()


def run_parent(code: str, marker: str, ready_processes: int, timeout_seconds: float = 120):
    """Start `code` as a parent process whose descendants carry `marker`; return it once
    `ready_processes` processes (itself included) carry it."""
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, KILL.MARKER_ENV: marker},
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + timeout_seconds
    while len(KILL.processes_of_run(marker)) < ready_processes:
        assert parent.poll() is None, "the parent ended early"
        assert time.time() < deadline, KILL.processes_of_run(marker)
        time.sleep(0.1)
    return parent


def kill_and_count_survivors(parent: subprocess.Popen, marker: str, within_seconds: float = 10.0):
    """Kill the parent; the processes of its run still alive `within_seconds` later (a child
    that watches its parent ends at once, but a loaded machine may take seconds to reap it)."""
    before = KILL.processes_of_run(marker)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + within_seconds
    left = KILL.processes_of_run(marker)
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = KILL.processes_of_run(marker)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return before, left


def parent_of_one_child(child_code: str, marker: str):
    """A parent process that starts `child_code` (given the parent's pid as argv[1]) and
    sleeps; returned once both carry `marker`."""
    return run_parent(
        f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {child_code!r}, str(os.getpid())])
        time.sleep(600)
        """,
        marker,
        ready_processes=2,
    )


@pytest.mark.parametrize("kernel_signal", [True, False], ids=["kernel-signal", "watch-thread"])
def test_a_child_dies_with_its_parent(kernel_signal):
    marker = f"lifetime-child-{kernel_signal}"
    parent = parent_of_one_child(
        "import sys, time; from autotune.lifetime import exit_with_parent; "
        f"exit_with_parent(int(sys.argv[1]), {kernel_signal}); time.sleep(600)",
        marker,
    )
    time.sleep(1.0)  # the child is past its start
    before, left = kill_and_count_survivors(parent, marker)
    assert len(before) == 2 and left == {}


def test_a_child_whose_parent_died_before_it_watched_dies_at_once():
    marker = "lifetime-late"
    parent = parent_of_one_child(
        "import sys, time; time.sleep(1.5); from autotune.lifetime import exit_with_parent; "
        "exit_with_parent(int(sys.argv[1]), True); print('survived'); time.sleep(600)",
        marker,
    )
    before, left = kill_and_count_survivors(parent, marker)
    assert len(before) == 2 and left == {}


def test_the_probe_server_dies_with_the_run_while_it_loads_and_while_it_serves():
    for phase, wait_ready in (("loading", False), ("serving", True)):
        marker = f"lifetime-zygote-{phase}"
        parent = run_parent(
            f"""
            from autotune.probe import ProbeServer
            import time
            server = ProbeServer()
            if {wait_ready}:
                assert server._start()
                print("ready", flush=True)
            else:
                server._start()
            time.sleep(600)
            """,
            marker,
            ready_processes=2,
        )
        if wait_ready:
            assert parent.stdout.readline().strip() == "ready"
        before, left = kill_and_count_survivors(parent, marker)
        assert any("autotune.training.zygote" in c for c in before.values()), phase
        assert left == {}, phase


def test_the_gpu_less_worker_and_the_resource_tracker_die_with_the_run():
    marker = "lifetime-worker"
    parent = run_parent(
        """
        import os, time
        from autotune.offgpu import run_off_gpu
        print(run_off_gpu(os.getpid), flush=True)
        time.sleep(600)
        """,
        marker,
        ready_processes=3,
    )
    worker_pid = int(parent.stdout.readline())
    before, left = kill_and_count_survivors(parent, marker)
    assert worker_pid in before
    assert any("resource_tracker" in c for c in before.values())
    assert left == {}


def test_the_gpu_less_worker_does_not_run_the_callers_script_again(tmp_path):
    """multiprocessing's spawn runs the parent's main script again in a child it starts: a
    script calling autotune at its top level would run twice, once inside the worker."""
    runs = tmp_path / "runs.txt"
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os
            from autotune.offgpu import run_off_gpu
            with open({str(runs)!r}, "a") as runs:
                runs.write(f"{{os.getpid()}}\\n")
            print(run_off_gpu(os.getpid), os.getpid())
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    worker, parent = done.stdout.split()
    assert worker != parent
    assert runs.read_text().split() == [parent]


def _worker_script(script: str) -> tuple[subprocess.Popen, int]:
    """`script`, which prints the GPU-less worker's pid first, in a session of its own with
    Ctrl-C handled as on a terminal: the process and the worker's pid."""
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert parent.stdout is not None
    return parent, int(parent.stdout.readline())


def test_ctrl_c_ends_the_gpu_less_worker_without_a_traceback():
    """Ctrl-C reaches the run's whole process group: the run reports it once, the worker
    ends quietly."""
    parent, worker_pid = _worker_script(
        """
        import os, time
        from autotune.offgpu import run_off_gpu
        try:  # the pid is printed inside it: Ctrl-C, sent once it is read, lands here
            print(run_off_gpu(os.getpid), flush=True)
            time.sleep(600)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        """
    )
    os.killpg(parent.pid, signal.SIGINT)
    out, err = parent.communicate(timeout=60)
    assert out.strip() == "interrupted" and parent.returncode == 0
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)


def test_a_run_ends_without_waiting_for_the_gpu_less_worker():
    """The process's exit waited for the worker to end its call (here one of ten minutes; at
    the end of a run, its unloading of torch, seconds): a Ctrl-C then, after the command had
    printed all it had to say, printed a traceback of the pool's exit handler."""
    parent, worker_pid = _worker_script(
        """
        import os, time
        from autotune import offgpu
        print(offgpu.run_off_gpu(os.getpid), flush=True)
        offgpu._WORKER.submit(time.sleep, 600)  # still at work as the script ends
        """
    )
    try:
        parent.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(parent.pid, signal.SIGINT)  # Ctrl-C while the exit waits
    out, err = parent.communicate(timeout=60)
    assert parent.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)


def test_the_probe_server_kills_its_running_probes_at_the_end_of_its_input(tmp_path, monkeypatch):
    """The run closed the server's input (it ended or died): a probe still running is killed
    then, not left training until the server's own exit fires its parent-death signal."""
    from autotune.training import zygote

    def probe_that_runs_on(order, server_pid):
        os.setsid()  # as a real probe: a session of its own
        time.sleep(60)
        return 0

    monkeypatch.setattr(zygote, "run_child", probe_that_runs_on)
    exit_path = tmp_path / "exit_code"
    answers = []

    def orders():
        yield json.dumps({"exit": str(exit_path)})
        pid = answers[0]["pid"]
        while os.getpgid(pid) != pid:  # the probe is in its session: then the input ends
            time.sleep(0.01)

    handler = signal.getsignal(signal.SIGCHLD)
    try:
        started = time.monotonic()
        zygote.serve(orders(), answers.append)
        while not exit_path.exists() and time.monotonic() - started < 10:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGCHLD, handler)
    assert "pid" in answers[0]
    assert exit_path.read_text() == str(-signal.SIGKILL)
    assert time.monotonic() - started < 10
