"""autotune from Python: `autotune.run` returns the study, its frontier, the report and the recipe;
the command line's options read their help and defaults from the settings they set."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import typer

import autotune
from autotune.options import field_docs
from autotune.pareto import frontier
from autotune.recipe import Recipe
from autotune.study import RunEvents, RunSettings, TrialStatus, measured_points, trial_status
from tests.conftest import DEMO, ROOT
from tests.test_study import FakeRunner, settings_for, workspace  # noqa: F401 - a fixture


def _readme_example() -> str:
    """The first Python block under the README's "Python API" heading."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


README_EXAMPLE = _readme_example()
"""The README's example of the Python API, run verbatim by test_the_readme_example_runs."""


def count_quality_rankings(monkeypatch) -> list[int]:
    """Wrap quality_ranking wherever autotune's modules hold it; each call appends to the list."""
    import autotune.console
    import autotune.export
    import autotune.report.data
    import autotune.study.ranking

    original = autotune.study.ranking.quality_ranking
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("autotune") and getattr(module, "quality_ranking", None) is original:
            monkeypatch.setattr(module, "quality_ranking", counting)
    return calls


def test_run_returns_the_study_its_frontier_report_and_recipe(workspace, monkeypatch):  # noqa: F811
    rankings = count_quality_rankings(monkeypatch)
    heard: list[int] = []
    result = autotune.run(
        settings_for(workspace),
        events=RunEvents(trial_finished=lambda summary: heard.append(summary.number)),
        runner=FakeRunner(),
    )
    study = result.study
    assert sorted(heard) == [t.number for t in study.trials] and len(heard) == 6
    assert result.frontier == frontier(measured_points(study)) and result.frontier
    for point in result.frontier:
        trial = study.trials[point.number]
        assert trial_status(trial) == TrialStatus.MEASURED
        assert (point.peak_memory_bytes, point.tokens_per_second, point.eval_loss) == tuple(
            trial.values
        )
    # written where the command line writes them, relative to the working directory
    assert result.report_path == Path("reports/s.html")
    assert "Plotly.newPlot" in result.report_path.read_text()
    assert result.recipe_path == Path("reports/s-recipe.yaml")
    assert Recipe.load(result.recipe_path) == result.recipe
    picked = Recipe.load_measured(result.recipe_path)[1]["trial"]
    assert picked in {p.number for p in result.frontier}
    assert result.recipe == Recipe.from_dict(study.trials[picked].user_attrs["recipe"])
    # one quality ranking for the top recipes the study's run confirms, and one that the pick,
    # the recipe file and the report share
    assert len(rankings) == 2
    assert result.ranking.ladders.keys() == {p.number for p in measured_points(study)}
    # the settings' fields as keywords; a resumed study says so in the notes
    again = autotune.run(
        runner=FakeRunner(), **{**vars(settings_for(workspace)), "report_path": Path("r.html")}
    )
    assert again.report_path == Path("r.html") and again.report_path.exists()
    assert any("already holds 6 finished trials" in note for note in again.notes)
    fewer = autotune.run(runner=FakeRunner(), **{**vars(settings_for(workspace)), "trials": 2})
    assert any("already holds 6 finished trials (--trials 2)" in n for n in fewer.notes)


def test_a_run_with_nothing_measured_writes_no_recipe(workspace):  # noqa: F811
    result = autotune.run(settings_for(workspace, trials=2), runner=FakeRunner(fail={"": "crash"}))
    assert result.frontier == [] and result.recipe is None and result.recipe_path is None
    assert result.report_path.exists() and not Path("reports/s-recipe.yaml").exists()


def test_option_help_and_defaults_are_the_settings_fields():
    from autotune.cli import app

    docs = field_docs(RunSettings)
    assert set(docs) == {f.name for f in dataclasses.fields(RunSettings)}  # every field has one
    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    options = {p.opts[0]: p for p in commands["run"].params}
    assert options["--budget"].help == docs["budget_bytes"]
    assert options["--confirm"].help == docs["confirm_top"]
    assert options["--confirm"].default == RunSettings.confirm_top == 3
    assert options["--probe-timeout"].default == "15m"  # RunSettings' 900 seconds, as written
    assert options["--gpus"].default is None and options["--timeout"].default is None
    estimate = {p.opts[0]: p for p in commands["estimate"].params}
    assert estimate["--memory-model"].help == docs["memory_model"]
    export = {p.opts[0]: p for p in commands["export"].params}
    assert export["--study"].help == docs["study_name"]


def test_the_run_command_s_defaults_are_the_settings_defaults():
    from autotune.cli import app
    from autotune.options import settings_from_options

    run = typer.main.get_command(app).commands["run"]
    given = ["--model", "m", "--data", "d.jsonl", "--budget", "4GB"]
    assert settings_from_options(run.make_context("run", list(given)).params) == RunSettings(
        model="m", data_path=Path("d.jsonl"), budget_bytes=4 * 10**9
    )
    more = given + ["--gpus", "0, 1", "--timeout", "1h30m", "--probe-timeout", "90s"]
    parsed = settings_from_options(run.make_context("run", more).params)
    assert parsed.gpus == ("0", "1") and parsed.timeout_seconds == 5400
    assert parsed.probe_timeout_seconds == 90


def test_importing_autotune_loads_no_heavy_library():
    code = (
        "import sys, autotune\n"
        "autotune.RunSettings\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'optuna', 'transformers', 'plotly', 'rich')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


def test_the_readme_example_runs(tiny_model, tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "model").symlink_to(tiny_model)
    shutil.copy(DEMO / "train.jsonl", tmp_path / "demo" / "train.jsonl")
    (tmp_path / "autotune").symlink_to(ROOT / "autotune")
    (tmp_path / "example.py").write_text(README_EXAMPLE)  # a script, as a user saves it
    done = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "report: reports/from-python.html" in done.stdout
    assert "recipe: reports/from-python-recipe.yaml" in done.stdout
    assert "tokens/s" in done.stdout
    assert done.stdout.count("balanced pick:") == 1  # not run again by a spawned child
    assert Recipe.load(tmp_path / "reports" / "from-python-recipe.yaml").seq_len == 48
