"""The HTML report renders in a real browser: headless Chromium runs plotly and draws the charts.

Debian's chromium package provides the browser (.ci/run installs it); without it the test skips.
"""

from __future__ import annotations

import pytest

from autotune.browser import find_chromium, rendered_dom
from autotune.report import render_html, report_data, write_main_chart_png
from autotune.study import prepare_run, run_study
from tests.test_study import FakeRunner, settings_for, workspace  # noqa: F401

pytestmark = pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed")


def test_charts_render_in_headless_chromium(workspace):  # noqa: F811
    tmp_path = workspace[0]
    study = run_study(prepare_run(settings_for(workspace, trials=8)), FakeRunner())
    data = report_data(study)
    page = tmp_path / "report.html"
    page.write_text(render_html(data), encoding="utf-8")
    dom = rendered_dom(page)
    charts = render_html(data).count("Plotly.newPlot")
    assert charts >= 5
    # plotly marks each drawn chart with js-plotly-plot and gives it an SVG of class main-svg.
    assert dom.count("js-plotly-plot") >= charts
    assert dom.count('class="main-svg"') >= charts
    assert "Pareto frontier" in dom  # a legend entry drawn by plotly, not in the page source


def test_png_of_the_main_chart(workspace):  # noqa: F811
    tmp_path = workspace[0]
    study = run_study(prepare_run(settings_for(workspace, trials=4)), FakeRunner())
    png = write_main_chart_png(study, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
