"""The study as a table (pandas) and a self-contained HTML report (plotly, works offline).

Data first, rendering second: `report_data` computes everything the page shows (frame, data),
tests check it, and `render_html` only draws it (figures, page). plotly is imported only when
a chart is drawn.
"""

from __future__ import annotations

from autotune.report.data import (
    ReportData,
    data_description,
    frontier_readings,
    objective_importances,
    report_data,
    time_description,
)
from autotune.report.frame import probed_rows, trial_seconds, trials_frame
from autotune.report.page import (
    MEMORY_SOURCE_TEXT,
    TABLE_COLUMNS,
    render_html,
    write_main_chart_png,
    write_report,
)

__all__ = [
    "MEMORY_SOURCE_TEXT",
    "TABLE_COLUMNS",
    "ReportData",
    "data_description",
    "frontier_readings",
    "objective_importances",
    "probed_rows",
    "render_html",
    "report_data",
    "time_description",
    "trial_seconds",
    "trials_frame",
    "write_main_chart_png",
    "write_report",
]
