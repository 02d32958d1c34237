"""Headless Chromium, for a PNG of the main chart and for checking that a report renders."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HEADLESS_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(args: list[str], timeout_seconds: float) -> subprocess.CompletedProcess:
    """Chromium with `args`, in a session of its own whose every process (its zygotes,
    renderers, crash handlers) is killed if this one is stopped (Ctrl-C, SIGTERM) or times out:
    killed alone, Chromium left them writing the screenshot after the command had ended."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium or Chrome found on PATH")
    command = [chromium, *HEADLESS_FLAGS]
    with tempfile.TemporaryDirectory(prefix="autotune-chromium-") as profile:
        process = subprocess.Popen(
            [*command, f"--user-data-dir={profile}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout_seconds)
        except BaseException:  # a timeout, Ctrl-C or SIGTERM (as Ctrl-C): none of it stays
            _kill_session(process)
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _kill_session(process: subprocess.Popen) -> None:
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def rendered_dom(
    html_path: Path, timeout_seconds: float = 120, width: int = 1280, height: int = 900
) -> str:
    """The page's DOM after its scripts ran (plotly draws its SVG then), in a window of
    `width` x `height` pixels."""
    done = _run(
        [
            f"--window-size={width},{height}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            html_path.resolve().as_uri(),
        ],
        timeout_seconds,
    )
    return done.stdout


def screenshot(
    html_path: Path,
    png_path: Path,
    width: int = 1000,
    height: int = 650,
    timeout_seconds: float = 120,
) -> Path:
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            f"--screenshot={png_path.resolve()}",
            f"--window-size={width},{height}",
            "--virtual-time-budget=10000",
            html_path.resolve().as_uri(),
        ],
        timeout_seconds,
    )
    if not png_path.exists():
        raise RuntimeError(f"Chromium wrote no screenshot to {png_path}")
    return png_path
