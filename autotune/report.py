"""The study as a table (pandas) and a self-contained HTML report (plotly, works offline).

Data first, rendering second: `report_data` computes everything the page shows, tests check it,
and `render_html` only draws it.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, NamedTuple

from autotune.export import write_text
from autotune.pareto import frontier
from autotune.study import OBJECTIVE_NAMES, confirmations, measured_points
from autotune.training.io import CPU_MEMORY_SOURCE, CUDA_MEMORY_SOURCE
from autotune.units import format_bytes

MEMORY_SOURCE_TEXT = {
    CUDA_MEMORY_SOURCE: "peak memory is torch.cuda.max_memory_reserved() over train and eval "
    "plus the CUDA context, measured in the probe process",
    CPU_MEMORY_SOURCE: "probes ran on the CPU: measured memory is the growth of the probe "
    "process's peak resident set, not GPU memory; feasibility rests on the predicted GPU peak",
}


class ReportData(NamedTuple):
    frame: Any  # pandas.DataFrame, one row per trial
    frontier_numbers: list[int]
    budget_bytes: int
    memory_sources: list[str]
    study_name: str
    model: str


def trials_frame(study: Any) -> Any:
    """One row per trial: recipe fields, predicted and measured figures, status and reason."""
    import pandas as pd

    front = {p.number for p in frontier(measured_points(study))}
    confirmed = confirmations(study)
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        values = trial.values or [None, None, None]
        status = attrs.get("status") or trial.state.name.lower()
        row: dict[str, Any] = {
            "trial": trial.number,
            "state": trial.state.name,
            "status": status,
            "recipe": attrs.get("recipe_label", ""),
            "feasible": bool(trial.constraints) and all(v <= 0 for v in trial.constraints.values()),
            "on_frontier": trial.number in front,
            "predicted_peak_bytes": attrs.get("predicted_peak_bytes"),
        }
        measured = status == "measured"
        for name, value in zip(OBJECTIVE_NAMES, values):
            row[name] = value if measured else None
        confirmation = confirmed.get(trial.number)
        row["held_up"] = None if confirmation is None else bool(confirmation["held_up"])
        row["confirm_tokens_per_second"] = confirmation and confirmation.get("tokens_per_second")
        row["memory_source"] = attrs.get("probe_memory_source", "")
        row["peak_allocated_bytes"] = attrs.get("probe_peak_allocated_bytes")
        row["reason"] = attrs.get("reason", "")
        for key, value in attrs.items():
            if key.startswith("probe_seconds_"):
                row[f"seconds_{key.removeprefix('probe_seconds_')}"] = value
        row.update(
            {
                f"param_{k}": v
                for k, v in (attrs.get("recipe") or {}).items()
                if k not in ("model", "autotune_recipe")
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def report_data(study: Any) -> ReportData:
    frame = trials_frame(study)
    sources = sorted({s for s in frame.get("memory_source", []) if s}) if len(frame) else []
    return ReportData(
        frame=frame,
        frontier_numbers=sorted(int(n) for n in frame.loc[frame["on_frontier"], "trial"])
        if len(frame)
        else [],
        budget_bytes=int(study.user_attrs.get("budget_bytes", 0)),
        memory_sources=sources,
        study_name=study.study_name,
        model=str(study.user_attrs.get("model", "")),
    )


def _pareto_figure(data: ReportData) -> Any:
    import plotly.graph_objects as go

    frame = data.frame
    measured = frame[frame["status"] == "measured"]
    on_front = measured[measured["on_frontier"]]
    others = measured[~measured["on_frontier"]]
    unmeasured = frame[frame["status"] != "measured"]
    figure = go.Figure()
    gib = 2**30
    loss_range = (
        dict(cmin=measured["eval_loss"].min(), cmax=measured["eval_loss"].max())
        if len(measured)
        else {}
    )
    for subset, name, symbol in (
        (on_front, "Pareto frontier", "star"),
        (others, "measured", "circle"),
    ):
        figure.add_trace(
            go.Scatter(
                x=subset["peak_memory_bytes"] / gib,
                y=subset["tokens_per_second"],
                mode="markers",
                name=name,
                text=subset["recipe"],
                customdata=subset[["trial", "eval_loss"]],
                hovertemplate="trial %{customdata[0]}: %{text}<br>%{x:.2f} GiB, %{y:.0f} tok/s, "
                "eval loss %{customdata[1]:.4f}<extra></extra>",
                marker=dict(
                    symbol=symbol,
                    size=14 if symbol == "star" else 9,
                    color=subset["eval_loss"],
                    colorscale="Viridis",
                    showscale=symbol == "star",
                    colorbar=dict(title="eval loss"),
                    **loss_range,
                ),
            )
        )
    if len(unmeasured):
        figure.add_trace(
            go.Scatter(
                x=unmeasured["predicted_peak_bytes"] / gib,
                y=[0] * len(unmeasured),
                mode="markers",
                name="not measured (infeasible or failed)",
                text=unmeasured["status"]
                + ": "
                + unmeasured["recipe"]
                + " — "
                + unmeasured["reason"].fillna(""),
                hovertemplate="%{text}<br>predicted %{x:.2f} GiB<extra></extra>",
                marker=dict(symbol="x", size=8, color="grey"),
            )
        )
    if data.budget_bytes:
        figure.add_vline(
            x=data.budget_bytes / gib,
            line_dash="dash",
            line_color="red",
            annotation_text=f"budget {format_bytes(data.budget_bytes)}",
        )
    figure.update_layout(
        title="Peak memory vs tokens/s (colour: eval loss)",
        xaxis_title="peak memory (GiB)",
        yaxis_title="tokens per second",
        legend=dict(orientation="h", y=-0.2),
    )
    return figure


def _memory_figure(data: ReportData) -> Any:
    import plotly.graph_objects as go

    measured = data.frame[data.frame["status"] == "measured"]
    gib = 2**30
    figure = go.Figure(
        go.Scatter(
            x=measured["predicted_peak_bytes"] / gib,
            y=measured["peak_memory_bytes"] / gib,
            mode="markers",
            text=measured["recipe"],
            name="trials",
            hovertemplate="%{text}<br>predicted %{x:.2f} GiB, measured %{y:.2f} GiB<extra></extra>",
        )
    )
    if len(measured):
        top = (
            float(max(measured["predicted_peak_bytes"].max(), measured["peak_memory_bytes"].max()))
            / gib
        )
        figure.add_trace(
            go.Scatter(
                x=[0, top],
                y=[0, top],
                mode="lines",
                name="measured = predicted",
                line=dict(dash="dot", color="grey"),
            )
        )
    figure.update_layout(
        title="Predicted vs measured peak memory",
        xaxis_title="predicted (GiB)",
        yaxis_title="measured (GiB)",
    )
    return figure


TABLE_COLUMNS = (
    "trial",
    "status",
    "recipe",
    "on_frontier",
    "held_up",
    "predicted_peak_bytes",
    "peak_memory_bytes",
    "tokens_per_second",
    "confirm_tokens_per_second",
    "eval_loss",
    "reason",
)


def render_html(data: ReportData) -> str:
    """One HTML page with plotly.js inline: the charts and the trial table."""
    figures = [_pareto_figure(data), _memory_figure(data)]
    charts = [
        figure.to_html(full_html=False, include_plotlyjs=(index == 0), div_id=f"chart-{index}")
        for index, figure in enumerate(figures)
    ]
    table = data.frame[[c for c in TABLE_COLUMNS if c in data.frame.columns]].copy()
    for column in ("predicted_peak_bytes", "peak_memory_bytes"):
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
{"".join(charts)}
<h2>Trials</h2>
{table.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", classes="trials")}
</body></html>
"""


def write_report(study: Any, path: str | Path) -> Path:
    return write_text(path, render_html(report_data(study)))
