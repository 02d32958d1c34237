"""The report answers first: the pick cards against the QLoRA default and the noise, the frontier
table, charts that mean what they say, and a trial table for people."""

from __future__ import annotations

import re

import pytest

from autotune.data.token_cache import load_token_cache
from autotune.pareto import pick
from autotune.report import render_html, report_data
from autotune.report.data import MIN_MEASURED_FOR_IMPORTANCE
from autotune.report.table import TRIAL_COLUMNS
from autotune.study import measured_points, prepare_run, run_study
from autotune.training.io import CUDA_MEMORY_SOURCE, ProbeResult
from autotune.units import format_bytes
from tests.test_study import (  # noqa: F401
    FakeRunner,
    NearTiesRunner,
    NoisyRunner,
    TimedRunner,
    settings_for,
    workspace,
)


def _table(page: str, table_id: str) -> str:
    start = page.index(f'id="{table_id}"')
    return page[start : page.index("</table>", start)]


def test_the_report_opens_with_the_picks_against_the_default_and_the_noise(workspace):  # noqa: F811
    settings = settings_for(workspace, trials=8, confirm_top=1)
    prepared = prepare_run(settings)
    study = run_study(prepared, NoisyRunner())
    data = report_data(study, "reports/s-recipe.yaml")
    points = measured_points(study)
    balanced = pick(points, "balanced").number
    assert data.cards[0].trial == balanced and data.cards[0].picks[0] == "balanced"
    assert {p for card in data.cards for p in card.picks} == {
        "balanced",
        "fastest",
        "smallest",
        "best-loss",
    }
    # one epoch is the study's training tokens (as its token cache holds them) at each speed
    train_tokens = load_token_cache(prepared.token_cache).train.tokens
    assert data.train_tokens == train_tokens > 0
    frame = data.frame.set_index("trial")
    default = data.frame[data.frame["baseline"] == "qlora_default"].iloc[0]
    noise = data.noise
    assert noise is not None
    for card in data.cards:
        row = frame.loc[card.trial]
        assert card.epoch_seconds == pytest.approx(train_tokens / row["tokens_per_second"])
        if card.trial == default["trial"]:
            assert card.is_default and card.speedup is None and card.default_epoch_seconds is None
            continue
        assert not card.is_default
        assert card.speedup == pytest.approx(
            row["tokens_per_second"] / default["tokens_per_second"]
        )
        change = row["eval_loss"] - default["eval_loss"]
        assert card.eval_loss_change == pytest.approx(change)
        assert card.loss_beyond_noise is bool(abs(change) > noise.eval_loss_difference + 1e-9)
        assert card.default_epoch_seconds == pytest.approx(
            train_tokens / default["tokens_per_second"]
        )
    held = frame.loc[balanced, "held_up"]
    assert data.cards[0].held_up is (None if held != held or held is None else bool(held))
    if data.cards[0].held_up is not None:  # the verdict with what it rests on, on the card
        words = frame.loc[balanced, "confirmation"]
        assert words.startswith("held up: " if data.cards[0].held_up else "did not hold up: ")
        shown = render_html(data).replace("&#x27;", "'").replace("&#177;", "±")
        assert f"{words}; probed again, longer, with another seed</dd>" in shown
    assert data.commands[-1].startswith("autotune train --recipe reports/s-recipe.yaml --data ")

    page = render_html(data)
    # the trial count once, against --trials as status says it, then how many were measured
    heading = page[
        page.index('<p class="sub">') : page.index("</p>", page.index('<p class="sub">'))
    ]
    assert heading.endswith(f"8 of 8 trials finished; {data.measured_count} measured.")
    assert heading.count("trial") == 1
    # the answer first, then the frontier, the charts and all trials
    order = [page.index(s) for s in ('id="recommendation"', 'id="frontier-table"', "chart-0")]
    assert order == sorted(order) and order[-1] < page.index('id="trials-table"')
    card = page[page.index('id="recommendation"') : page.index('id="frontier"')]
    assert "balanced · trial" in card and data.commands[-1] in card
    # the fake probes ran on the CPU: their memory is RSS growth, no share of the GPU budget
    assert f"CPU RSS +{format_bytes(data.cards[0].peak_memory_bytes)}" in card
    assert f"of the {format_bytes(settings.budget_bytes)} budget" not in card
    on_gpu = data._replace(memory_sources=[CUDA_MEMORY_SOURCE])
    assert f"of the {format_bytes(settings.budget_bytes)} budget" in render_html(on_gpu)
    assert "the QLoRA default" in card and "measured noise" in card
    is_picked = any(c.is_default for c in data.cards)
    assert ("(this is the QLoRA default)" in card) is is_picked
    for other in data.cards[1:]:  # the other picks say how to export them
        assert f"autotune export --study s --pick {other.picks[0]}</code>" in card
    # where the run wrote no recipe (autotune report), the export that writes it comes first
    unexported = report_data(study, "reports/s-recipe.yaml", False, "sqlite:///x.db").commands
    assert unexported[0] == (
        "autotune export --study s --storage sqlite:///x.db --output reports/s-recipe.yaml"
    )
    assert unexported[1] == data.commands[-1]
    frontier = _table(page, "frontier-table")
    assert frontier.count("<tr>") == 1 + len(data.frontier_numbers)


def test_the_trial_table_is_for_people(workspace):  # noqa: F811
    runner = FakeRunner(fail={"freeze": "oom"})
    study = run_study(prepare_run(settings_for(workspace, trials=8)), runner)
    page = render_html(report_data(study))
    table = _table(page, "trials-table")
    cells = re.findall(r"<t[dh][^>]*>([^<]*)</t[dh]>", table)
    raw_names = set(report_data(study).frame.columns) - {"trial", "status", "recipe", "reason"}
    assert not raw_names & set(cells) and "predicted_peak_bytes" not in table
    assert not [c for c in cells if re.search(r"\d[eE][+-]?\d", c)]  # no exponent notation
    assert not {"None", "nan", "NaN", "True", "False"} & set(cells)
    headings = [c.heading for c in TRIAL_COLUMNS]
    # FakeRunner's probes ran on the CPU: the heading says what they measured, as the cards do
    assert "Measured CPU RSS growth" in cells and "Measured peak memory" not in cells
    assert "Tokens/s" in cells and "Eval loss" in cells
    assert set(cells) & set(headings)
    assert "out of memory" in cells  # the status in words
    assert any(re.fullmatch(r"\d+\.\d (MiB|GiB)|\d+\.\d\d GiB", c) for c in cells)
    assert all(re.fullmatch(r"\d{1,3}(,\d{3})*", c) for c in re.findall(r">([\d,]+)</td>", table))
    assert '<div class="table-box">' in page and "table.sortable th" in page  # scrolls, sorts


def test_a_queued_retry_of_a_stopped_trial_is_shown_queued_not_interrupted(workspace):  # noqa: F811
    import optuna

    from autotune.study.workers import requeue_stopped_trial

    study = run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
    stopped = study.ask()  # Ctrl-C in the middle of its probe
    requeue_stopped_trial(stopped)
    study.tell(stopped, state=optuna.trial.TrialState.FAIL)
    frame = report_data(study).frame.set_index("trial")
    retry = frame.index.max()
    assert frame.loc[stopped.number, "status"] == "interrupted"
    # the retry copies the stopped trial's attributes, but has not run: one trial was stopped
    assert frame.loc[retry, "status"] == "waiting"
    assert frame.loc[retry, "reason"] == f"queued to run again in place of trial {stopped.number}"
    assert (frame["status"] == "interrupted").sum() == 1
    cells = re.findall(
        r"<td[^>]*>([^<]*)</td>", _table(render_html(report_data(study)), "trials-table")
    )
    assert cells.count("interrupted") == 1 and cells.count("queued") == 1


def test_a_retry_stopped_again_is_queued_in_place_of_the_retry(workspace):  # noqa: F811
    # the retry's reason named the first trial of its line (Optuna's failed_trial), which an
    # earlier retry had already replaced, not the trial it stands in for
    import optuna

    from autotune.study.workers import requeue_stopped_trial

    study = run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
    waiting = optuna.trial.TrialState.WAITING
    while study.get_trials(states=(waiting,)):  # the baselines the run left queued go first
        study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    stopped = []
    for _ in range(2):  # a trial stopped, then its retry stopped too
        trial = study.ask()
        requeue_stopped_trial(trial)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        stopped.append(trial.number)
    (queued,) = study.get_trials(states=(waiting,))
    assert queued.system_attrs["retry_history"] == stopped
    frame = report_data(study).frame.set_index("trial")
    assert frame.loc[queued.number, "reason"] == (
        f"queued to run again in place of trial {stopped[-1]}"
    )


class DrivenRunner(FakeRunner):
    """Each objective follows one parameter alone: memory the micro-batch, speed gradient
    checkpointing, eval loss the optimizer."""

    memory_source = "cpu_peak_rss_delta"

    def run(self, request, workdir):
        recipe = request.recipe
        return ProbeResult(
            status="ok",
            device="cpu",
            memory_source=self.memory_source,
            peak_memory_bytes=10_000_000 * recipe.micro_batch_size,
            tokens_per_second=1000.0 if recipe.gradient_checkpointing else 3000.0,
            eval_loss=3.0 - (0.1 if recipe.optimizer == "adamw" else 0.0),
            steps_done=request.steps,
        )


def test_importances_tell_the_objectives_apart_and_wait_for_enough_trials(workspace):  # noqa: F811
    few = run_study(
        prepare_run(settings_for(workspace, trials=6, study_name="few")), DrivenRunner()
    )
    data = report_data(few)
    assert data.measured_count < MIN_MEASURED_FOR_IMPORTANCE and data.importances == {}
    assert f"No parameter importances: {data.measured_count} measured trials" in render_html(data)

    study = run_study(prepare_run(settings_for(workspace, trials=16)), DrivenRunner())
    data = report_data(study)
    assert data.measured_count >= MIN_MEASURED_FOR_IMPORTANCE
    top = {name: max(scores, key=scores.get) for name, scores in data.importances.items()}
    assert top == {
        "peak_memory_bytes": "micro_batch_size",
        "tokens_per_second": "gradient_checkpointing",
        "eval_loss": "optimizer",
    }
    assert "precision" not in data.importances["eval_loss"]  # one value: not searched
    assert "Parameter importance per objective" in render_html(data)


def test_a_cpu_run_draws_no_gpu_memory_comparison(workspace):  # noqa: F811
    study = run_study(prepare_run(settings_for(workspace, trials=4)), DrivenRunner())
    page = render_html(report_data(study))
    assert "Predicted vs measured peak memory" not in page
    assert "No predicted-vs-measured memory chart: no probe ran on a GPU" in page

    class OnGpu(DrivenRunner):
        memory_source = CUDA_MEMORY_SOURCE

    gpu = run_study(prepare_run(settings_for(workspace, trials=4, study_name="gpu")), OnGpu())
    page = render_html(report_data(gpu))
    assert "Predicted vs measured peak memory" in page and "No predicted-vs-measured" not in page
    # every drawn chart carries its caption
    assert page.count("<figcaption>") == page.count("Plotly.newPlot")


def test_every_chart_gives_peak_memory_in_the_gib_its_label_names(workspace):  # noqa: F811
    from autotune.report.figures import objective_words, projection_figures

    study = run_study(prepare_run(settings_for(workspace, trials=6)), DrivenRunner())
    data = report_data(study)
    measured = data.frame[data.frame["status"] == "measured"]
    in_gib = sorted(measured["peak_memory_bytes"] / 2**30)
    label = objective_words(data)["peak_memory_bytes"]
    seen = 0
    for figure, _ in projection_figures(data):
        for trace in figure.data:
            marker = getattr(trace, "marker", None)
            if marker is not None and marker.colorbar and marker.colorbar.title.text == label:
                assert sorted(marker.color) == pytest.approx(in_gib)
                seen += 1
            for dimension in getattr(trace, "dimensions", None) or ():
                if dimension.label == label:
                    assert sorted(dimension.values) == pytest.approx(in_gib)
                    seen += 1
        if figure.layout.xaxis.title.text == label:
            assert sorted(figure.data[0].x) == pytest.approx(in_gib)
            seen += 1
    assert seen >= 3  # the memory colour scale, the memory axis and the parallel coordinate


def test_a_cpu_studys_charts_say_their_memory_is_rss_growth(workspace):  # noqa: F811
    """The cards and the console say a CPU probe's memory is RSS growth, not GPU memory; the
    charts' memory axes, colour scales and budget line say so too."""
    from autotune.report.figures import pareto_figure, projection_figures

    def memory_titles(data) -> list[str]:
        titles = [pareto_figure(data).layout.xaxis.title.text]
        for figure, _ in projection_figures(data):
            layout = figure.layout
            titles += [layout.xaxis.title.text, layout.scene.xaxis.title.text]
            for trace in figure.data:
                marker = getattr(trace, "marker", None)
                if marker is not None and marker.colorbar:
                    titles.append(marker.colorbar.title.text)
                titles += [d.label for d in getattr(trace, "dimensions", None) or ()]
        return [t for t in titles if t and ("memory" in t or "RSS" in t)]

    cpu = report_data(run_study(prepare_run(settings_for(workspace, trials=4)), DrivenRunner()))
    titles = memory_titles(cpu)
    assert len(titles) >= 4 and set(titles) == {"CPU RSS growth (GiB)"}
    # the budget holds the predicted GPU peak: no line of it on an axis of CPU resident memory
    figure = pareto_figure(cpu)
    assert not figure.layout.shapes
    [note] = figure.layout.annotations
    assert note.text.startswith(f"no budget line: the {format_bytes(cpu.budget_bytes)} budget")
    assert "no budget line, as the budget is of GPU memory" in render_html(cpu)

    class OnGpu(DrivenRunner):
        memory_source = CUDA_MEMORY_SOURCE

    gpu_study = run_study(prepare_run(settings_for(workspace, trials=4, study_name="g")), OnGpu())
    gpu = report_data(gpu_study)
    assert set(memory_titles(gpu)) == {"peak memory (GiB)"}
    page = render_html(gpu)
    assert "Measured peak memory" in page and "Measured CPU RSS growth" not in page
    figure = pareto_figure(gpu)
    assert figure.layout.annotations[0].text == f"budget {format_bytes(gpu.budget_bytes)}"
    [line] = figure.layout.shapes
    assert line.x0 == line.x1 == pytest.approx(gpu.budget_bytes / 2**30)
    assert "the dashed line the budget" in page and "no budget line" not in page


def test_a_repeated_recipe_shows_no_probe_times_it_did_not_measure(workspace):  # noqa: F811
    """A duplicate trial reuses its original's figures without a probe: its row in the trial
    table names the original and leaves the probe's times empty, as its measured columns."""
    settings = settings_for(workspace, trials=2)
    study = run_study(prepare_run(settings), TimedRunner())
    study.enqueue_trial(study.trials[0].params)
    study = run_study(prepare_run(settings_for(workspace, trials=4)), TimedRunner())
    frame = report_data(study).frame
    repeat = frame[frame["status"] == "duplicate"].iloc[0]
    assert repeat["reason"] == "same recipe as trial 0"
    assert frame.loc[frame["trial"] == 0, "seconds_total"].notna().all()  # the original's
    times = [c for c in frame.columns if c.startswith("seconds_")]
    assert times and repeat[times].isna().all()
    row = re.search(
        rf"<tr><td[^>]*>{repeat['trial']}</td>.*?</tr>",
        _table(render_html(report_data(study)), "trials-table"),
    )
    assert row and "repeat of an earlier trial" in row.group(0)
    assert not re.search(r">\d+\.\d</td>", row.group(0))  # no seconds shown


def test_the_probe_time_chart_draws_no_recipe_inside_its_bars(workspace):  # noqa: F811
    """Each phase's bar carries its trial's recipe for the hover; drawn, it was repeated in
    every phase, clipped to the bar, and ran off the chart."""
    from autotune.report.figures import time_figure

    study = run_study(prepare_run(settings_for(workspace, trials=3)), TimedRunner())
    bars = time_figure(report_data(study)).data
    assert len(bars) >= 8 and all(len(bar.text) == 3 for bar in bars)  # hovers name the recipe
    assert {bar.textposition for bar in bars} == {"none"}
    # every phase in the legend at once: a column beside three bars scrolled, hiding start
    assert time_figure(report_data(study)).layout.legend.orientation == "h"


def test_the_parallel_coordinates_name_their_axes_in_words_and_numbers_in_order(workspace):  # noqa: F811
    """A dozen axes side by side: field names such as gradient_accumulation_steps ran into
    their neighbours, and ranks read 8.0 (a column with gaps is float), 16 sorted before 4."""
    from autotune.report.figures import projection_figures

    study = run_study(prepare_run(settings_for(workspace, trials=8)), FakeRunner())
    [parallel] = [
        f for f, _ in projection_figures(report_data(study)) if f.data[0].type == "parcoords"
    ]
    axes = {d.label: list(d.ticktext) for d in parallel.data[0].dimensions if d.ticktext}
    assert not [label for label in axes if "_" in label]
    assert "micro-batch" in axes and "LoRA r" in axes
    assert axes["micro-batch"] == sorted(axes["micro-batch"], key=int)  # 1, 2, 4 in order
    ranks = axes["LoRA r"]
    assert all(re.fullmatch(r"\d+|-", r) for r in ranks) and ranks[-1] == "-"  # full: no rank
    assert parallel.data[0].labelangle  # angled, so neighbours' names do not overlap


def test_the_png_drawn_by_chromium_has_no_plotly_toolbar(workspace, monkeypatch):  # noqa: F811
    """Where kaleido cannot draw the PNG, Chromium screenshots the chart's page: the page must
    leave out plotly's toolbar, or the picture carries its buttons over the chart."""
    import plotly.graph_objects as go

    import autotune.browser
    from autotune.report import write_main_chart_png

    def no_kaleido(*args, **kwargs):
        raise RuntimeError("kaleido is not installed")

    pages = []

    def shoot(page, png, *args, **kwargs):
        pages.append(page.read_text(encoding="utf-8"))
        png.write_bytes(b"\x89PNG\r\n\x1a\n")
        return png

    monkeypatch.setattr(go.Figure, "write_image", no_kaleido)
    monkeypatch.setattr(autotune.browser, "find_chromium", lambda: "chromium")
    monkeypatch.setattr(autotune.browser, "screenshot", shoot)
    study = run_study(prepare_run(settings_for(workspace, trials=2)), FakeRunner())
    write_main_chart_png(study, workspace[0] / "chart.png")
    [page] = pages
    assert '"displayModeBar": false' in page and "Peak memory vs tokens" in page


def test_a_png_that_cannot_be_drawn_says_the_report_was_written(workspace, monkeypatch):  # noqa: F811
    """Without kaleido or Chromium, `report --png` wrote the HTML and the CSV, then printed only
    its error: nothing said the report was there. The line says it, and what would draw one."""
    import plotly.graph_objects as go

    import autotune.browser
    from autotune.api import write_study_report
    from autotune.errors import UsageError

    def no_kaleido(*args, **kwargs):
        raise RuntimeError("kaleido is not installed")

    monkeypatch.setattr(go.Figure, "write_image", no_kaleido)
    monkeypatch.setattr(autotune.browser, "find_chromium", lambda: None)
    settings = settings_for(workspace, trials=2)
    run_study(prepare_run(settings), FakeRunner())
    out = workspace[0] / "out"
    with pytest.raises(UsageError) as refused:
        write_study_report(settings.storage, "s", out / "r.html", out / "t.csv", out / "c.png")
    assert str(refused.value) == (
        "no PNG: plotly's kaleido failed and no Chromium is on PATH (install Chromium or "
        f"Chrome, or leave out --png); the report was written: {out / 'r.html'}, "
        f"{out / 't.csv'}"
    )
    assert (out / "r.html").stat().st_size > 0 and (out / "t.csv").stat().st_size > 0


def test_the_noise_reads_to_the_decimals_of_the_differences_held_against_it(workspace):  # noqa: F811
    """The cards and tables give eval-loss changes to four decimals and call them within or
    beyond the noise; the note gave the noise to three, so 0.0045 read 0.005 and a change of
    0.0048 read 'beyond' a noise it seemed to be under. The console gave four."""

    class NoiseOf0045(FakeRunner):
        def run(self, request, workdir):
            result = super().run(request, workdir)
            if request.seed == 1 and result.eval_loss is not None:
                result.eval_loss += 0.0045
            return result

    settings = settings_for(workspace, trials=4, confirm_top=1)
    study = run_study(prepare_run(settings), NoiseOf0045())
    page = render_html(report_data(study))
    assert "moved eval loss by 0.0045, tokens/s by" in page
    readings = [line for line in report_data(study).readings if "the QLoRA default" in line]
    assert readings, "a frontier recipe compared with the QLoRA default"
    for line in readings:  # each change against the noise reads to as many decimals as it
        assert re.search(r"[+-]\d+\.\d{4} eval loss \((within|beyond) noise\)", line), line


def test_a_stopped_browser_leaves_none_of_its_processes(tmp_path, monkeypatch):
    """The PNG's headless Chromium was killed alone on a timeout or Ctrl-C (and not at all on
    SIGTERM): its zygotes and renderers lived on and wrote the screenshot after the command
    had ended. A stand-in browser that starts a child of its own shows it."""
    import os
    import subprocess
    import time
    from pathlib import Path

    import autotune.browser

    child_pid = tmp_path / "child.pid"
    browser = tmp_path / "chromium"
    browser.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {child_pid}\nsleep 60\n")
    browser.chmod(0o755)
    monkeypatch.setattr(autotune.browser, "find_chromium", lambda: str(browser))
    with pytest.raises(subprocess.TimeoutExpired):
        autotune.browser._run(["--screenshot=x.png"], timeout_seconds=1)
    pid = int(child_pid.read_text())
    for _ in range(50):  # killed at once; its parent, init, reaps it soon after
        stat = Path(f"/proc/{pid}/stat")
        if not stat.exists() or stat.read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        raise AssertionError("the browser's child outlived it")


def test_csv_writes_whole_choices_whole_and_float_choices_as_floats():
    """A column with gaps is float in pandas: a LoRA rank and a byte size are written whole
    (8, not 8.0), and a dropout its dimension stores as a float stays one (0.0, not 0), per
    method too."""
    import pandas as pd

    from autotune.report.table import csv_text

    frame = pd.DataFrame(
        {
            "param_lora_r": [8.0, None],
            "param_lora_dropout": [0.0, None],
            "param_lora_lora_dropout": [0.0, None],
            "peak_memory_bytes": [155275264.0, None],
        }
    )
    rows = csv_text(frame).splitlines()
    assert rows[1] == "8,0.0,0.0,155275264"


def test_export_the_report_and_studies_name_one_best_loss_pick_within_the_noise(workspace):  # noqa: F811
    import html

    import yaml
    from typer.testing import CliRunner

    from autotune.cli import app
    from autotune.pareto import frontier
    from autotune.state_text import studies_text
    from autotune.study import load_existing_study, study_noise
    from autotune.study.overview import study_overview

    settings = settings_for(workspace, trials=8, confirm_top=1)
    run_study(prepare_run(settings), NearTiesRunner())
    study = load_existing_study(settings.storage, "s")  # as stored, as export and report read it
    noise = study_noise(study).eval_loss_difference
    points = measured_points(study)
    front = frontier(points)
    lowest = min(front, key=lambda p: p.eval_loss)
    within = [p for p in front if p.eval_loss - lowest.eval_loss <= noise]
    expected = max(within, key=lambda p: p.tokens_per_second).number
    assert len(within) >= 2 and expected != lowest.number  # the noise decides the pick
    note = (
        f"lowest eval loss within the measured noise ({noise:.4f}): trials "
        f"{', '.join(str(n) for n in sorted(p.number for p in within))}; the fastest taken"
    )

    args = ["export", "--storage", settings.storage, "--study", "s", "--pick", "best-loss"]
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    measured = yaml.safe_load(shown.output)["measured"]
    assert measured["trial"] == expected and measured["pick"] == f"best-loss: {note}"

    data = report_data(study)
    [card] = [c for c in data.cards if "best-loss" in c.picks]
    assert card.trial == expected and card.pick_notes == (note,)
    [best] = [line for line in data.readings if line.startswith("best eval loss")]
    assert f"(trial {expected})" in best and best.endswith(note)
    page = render_html(data)
    assert f"best-loss · trial {expected}</div>" in html.unescape(page)
    assert html.escape(note) in page

    overview = study_overview(study, points)
    assert overview.picks["best-loss"].trial == expected
    assert f"({note})" in studies_text([overview])
