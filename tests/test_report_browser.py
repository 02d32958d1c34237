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
    # known as autotune's (by its size), so that a later report --png may replace it
    from autotune.own_files import written_by_autotune

    assert written_by_autotune(png)


# Written into the page after it rendered: where the answer and the frontier table lie in the
# window, and what the trial table shows, read back from the dumped DOM.
MEASURE_SCRIPT = """<script>
window.addEventListener("load", function () {
  function box(id) { var r = document.getElementById(id).getBoundingClientRect();
    return {top: r.top, bottom: r.bottom, left: r.left, right: r.right}; }
  var firstRow = document.querySelector("#frontier-table tbody tr").getBoundingClientRect();
  var frontierBox = document.getElementById("frontier-table").parentNode;
  var out = document.createElement("pre");
  out.id = "measured";
  out.textContent = JSON.stringify({
    height: window.innerHeight, width: window.innerWidth,
    card: box("recommendation"), frontier: box("frontier-table"),
    frontierFirstRow: {top: firstRow.top, bottom: firstRow.bottom},
    frontierWidths: {table: frontierBox.scrollWidth, box: frontierBox.clientWidth},
    trials: document.getElementById("trials-table").innerText,
    pageWidth: document.documentElement.scrollWidth});
  document.body.appendChild(out);
});
</script>"""


def test_first_screen_shows_the_answer_and_the_frontier(workspace):  # noqa: F811
    import html
    import json
    import re

    from autotune.browser import screenshot

    tmp_path = workspace[0]
    study = run_study(prepare_run(settings_for(workspace, trials=8)), FakeRunner())
    data = report_data(study, "reports/s-recipe.yaml")
    page = tmp_path / "report.html"
    page.write_text(render_html(data).replace("</body>", MEASURE_SCRIPT + "</body>"), "utf-8")
    dom = rendered_dom(page, width=1280, height=900)
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, re.S)
    assert found, "the measuring script did not run"
    measured = json.loads(html.unescape(found.group(1)))
    screen = measured["height"]
    assert measured["width"] == 1280 and screen > 0
    # the whole recommendation and the frontier table's heading and first row are on screen
    assert 0 <= measured["card"]["top"] < measured["card"]["bottom"] <= screen
    assert measured["card"]["bottom"] <= measured["frontier"]["top"]
    assert measured["frontierFirstRow"]["bottom"] <= screen
    # and every column of the frontier table, its last (held up on confirmation) too, without
    # scrolling sideways
    assert measured["frontierWidths"]["table"] <= measured["frontierWidths"]["box"]
    # the wide trial table scrolls inside its box: the page itself is no wider than the window
    assert measured["pageWidth"] <= measured["width"]
    trials = measured["trials"]
    assert "Measured CPU RSS growth" in trials and "Tokens/s" in trials  # CPU probes
    raw = [c for c in data.frame.columns if "_" in c]
    assert raw and not [c for c in raw if c in trials]
    assert not re.search(r"\d[eE][+-]?\d", trials) and "None" not in trials
    shot = screenshot(page, tmp_path / "first-screen.png", width=1280, height=900)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
