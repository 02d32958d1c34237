"""The report as one self-contained HTML page (plotly.js inline, works offline), and its main
chart as a PNG.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from autotune.export import write_text
from autotune.report.data import ReportData, report_data
from autotune.report.figures import memory_figure, pareto_figure, projection_figures, time_figure
from autotune.training.io import CPU_MEMORY_SOURCE, CUDA_MEMORY_SOURCE, PROBE_PHASES
from autotune.units import format_bytes

MEMORY_SOURCE_TEXT = {
    CUDA_MEMORY_SOURCE: "peak memory is torch.cuda.max_memory_reserved() over train and eval "
    "plus the CUDA context, measured in the probe process",
    CPU_MEMORY_SOURCE: "probes ran on the CPU: measured memory is the growth of the probe "
    "process's peak resident set, not GPU memory; feasibility rests on the predicted GPU peak",
}


TABLE_COLUMNS = (
    "trial",
    "status",
    "recipe",
    "on_frontier",
    "held_up",
    "predicted_peak_bytes",
    "memory_margin",
    "predicted_with_margin_bytes",
    "memory_model",
    "peak_memory_bytes",
    "tokens_per_second",
    "confirm_tokens_per_second",
    "eval_loss",
    *(f"seconds_{phase}" for phase in PROBE_PHASES),
    "seconds_total",
    "reason",
)


def render_html(data: ReportData) -> str:
    """One HTML page with plotly.js inline: the charts and the trial table."""
    figures = [
        pareto_figure(data),
        *projection_figures(data),
        memory_figure(data),
        time_figure(data),
    ]
    charts = [
        figure.to_html(full_html=False, include_plotlyjs=(index == 0), div_id=f"chart-{index}")
        for index, figure in enumerate(figures)
    ]
    table = data.frame[[c for c in TABLE_COLUMNS if c in data.frame.columns]].copy()
    for column in ("predicted_peak_bytes", "predicted_with_margin_bytes", "peak_memory_bytes"):
        table[column] = table[column].map(
            lambda v: format_bytes(v) if v == v and v is not None else ""
        )
    sources = "; ".join(MEMORY_SOURCE_TEXT.get(s, s) for s in data.memory_sources) or "no probe ran"
    frontier_text = ", ".join(map(str, data.frontier_numbers)) or "none yet"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>autotune: {html.escape(data.study_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px}}</style></head><body>
<h1>autotune study {html.escape(data.study_name)}</h1>
<p>Model {html.escape(data.model)}; budget {format_bytes(data.budget_bytes)};
{len(data.frame)} trials; Pareto frontier: trials {frontier_text}.</p>
<p>Memory figures: {html.escape(sources)}.</p>
<p>{html.escape(data.data_text)}</p>
<p>{html.escape(data.time_text)}</p>
{"".join(f"<p>{html.escape(line[0].upper() + line[1:])}.</p>" for line in data.space_lines)}
<ul class="readings">{"".join(f"<li>{html.escape(line)}</li>" for line in data.readings)}</ul>
{"".join(charts)}
<h2>Trials</h2>
{table.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", classes="trials")}
</body></html>
"""


def write_report(study: Any, path: str | Path, csv_path: str | Path | None = None) -> Path:
    data = report_data(study)
    if csv_path is not None:
        write_text(csv_path, data.frame.to_csv(index=False))
    return write_text(path, render_html(data))


def write_main_chart_png(study: Any, png_path: str | Path) -> Path:
    """The Pareto chart as a PNG: plotly's kaleido where it works, else headless Chromium."""
    import tempfile

    from autotune.errors import UsageError, first_line

    png_path = Path(png_path)
    if png_path.is_dir():
        raise UsageError(f"--png {png_path} is a directory; give a file name such as chart.png")
    existed = png_path.exists()
    before_ns = png_path.stat().st_mtime_ns if existed else 0
    try:  # a place that cannot be written is said before any rendering
        png_path.parent.mkdir(parents=True, exist_ok=True)
        with png_path.open("ab"):
            pass
        if not existed:
            png_path.unlink()
    except OSError as error:
        raise UsageError(f"--png {png_path} cannot be written: {error.strerror}") from None
    figure = pareto_figure(report_data(study))
    try:
        figure.write_image(str(png_path), width=1000, height=650)
    except Exception:  # noqa: BLE001 - kaleido missing or without a browser: try Chromium
        from autotune.browser import find_chromium, screenshot

        if find_chromium() is None:
            raise UsageError("no PNG: plotly's kaleido failed and no Chromium is on PATH") from None
        with tempfile.TemporaryDirectory() as scratch:
            page = Path(scratch) / "chart.html"
            page.write_text(figure.to_html(include_plotlyjs=True, full_html=True), encoding="utf-8")
            try:
                screenshot(page, png_path)
            except RuntimeError as error:
                raise UsageError(f"no PNG: {first_line(error)}") from None
    written = png_path.is_file() and png_path.stat().st_size > 0
    if not written or (existed and png_path.stat().st_mtime_ns == before_ns):
        raise UsageError(f"no PNG was written to {png_path}")
    return png_path
