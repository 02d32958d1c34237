"""What `pip install .` gets, and the lock that `make setup` and CI install from."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.!+-]+", version), f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_pins_every_dependency_within_the_ranges_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [
        Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]
    ]
    pins = _pins()
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in {LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )
    # one pin for CPU and CUDA builds alike
    assert "+" not in pins["torch"]


def test_the_wheel_carries_the_search_spaces_and_the_installed_package_loads_them(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("autotune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "autotune/search_spaces/default.yaml" in names
    assert "autotune/search_spaces/demo.yaml" in names
    assert "autotune/memory_margins.json" in names
    site = tmp_path / "site"
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    # from elsewhere, with the installed copy first on the path and no source tree in sight
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import autotune.space as s; space = s.SearchSpace.load(); "
        "print(s.DEFAULT_SPACE); print(len(space.choices())); "
        "from autotune.margins import memory_margin; print(memory_margin('replay', 'nf4').fraction)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr
    default_path, dimensions, margin = loaded.stdout.split()
    assert float(margin) > 0  # the margin table ships with the package
    assert Path(default_path).is_relative_to(site) and Path(default_path).is_file()
    assert int(dimensions) > 5
    helped = subprocess.run(
        [sys.executable, "-m", "autotune.cli", "run", "--help"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert helped.returncode == 0, helped.stderr
    assert "--budget" in helped.stdout
