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
from autotune.study.records import (
    OBJECTIVE_NAMES,
    TrialStatus,
    confirmations,
    measured_points,
    not_searched,
    trial_status,
)
from autotune.training.io import CPU_MEMORY_SOURCE, CUDA_MEMORY_SOURCE, PROBE_PHASES
from autotune.units import format_bytes

MEASURED = TrialStatus.MEASURED.value
DUPLICATE = TrialStatus.DUPLICATE.value

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
    data_text: str
    """The data's rows, token lengths and what truncation at seq_len cut."""
    readings: list[str]
    """One line per frontier recipe, compared with the QLoRA default where it was measured."""
    importances: dict[str, dict[str, float]]
    """Objective -> parameter -> importance (Optuna's evaluator), where it could be computed."""
    time_text: str = ""
    """Trials and probes an hour, and where the median probe's time went."""
    space_lines: tuple[str, ...] = ()
    """Choices of the space file the study left out, and why."""


def trial_seconds(trial: Any) -> float | None:
    """From the trial's start to its end (None until it ends): a study resumed later is timed
    without the pause between runs."""
    if trial.datetime_complete and trial.datetime_start:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def trials_frame(study: Any) -> Any:
    """One row per trial: recipe fields, predicted and measured figures, status and reason."""
    import pandas as pd

    front = {p.number for p in frontier(measured_points(study))}
    confirmed = confirmations(study)
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        values = trial.values or [None, None, None]
        known = trial_status(trial)
        status = known.value if known else trial.state.name.lower()
        row: dict[str, Any] = {
            "trial": trial.number,
            "state": trial.state.name,
            "status": status,
            "recipe": attrs.get("recipe_label", ""),
            "feasible": bool(trial.constraints) and all(v <= 0 for v in trial.constraints.values()),
            "on_frontier": trial.number in front,
            "predicted_peak_bytes": attrs.get("predicted_peak_bytes"),
            "memory_model": attrs.get("memory_model", "formula"),
            "trial_seconds": trial_seconds(trial),
        }
        measured = status == MEASURED
        for name, value in zip(OBJECTIVE_NAMES, values):
            row[name] = value if measured else None
        confirmation = confirmed.get(trial.number)
        row["held_up"] = None if confirmation is None else bool(confirmation["held_up"])
        row["confirm_tokens_per_second"] = confirmation and confirmation.get("tokens_per_second")
        row["baseline"] = attrs.get("baseline", "")
        row["memory_source"] = attrs.get("probe_memory_source", "")
        row["peak_allocated_bytes"] = attrs.get("probe_peak_allocated_bytes")
        row["reason"] = attrs.get("reason", "")
        for key, value in attrs.items():
            if key.startswith("probe_seconds_"):
                row[f"seconds_{key.removeprefix('probe_seconds_')}"] = value
        for key, value in (attrs.get("recipe") or {}).items():
            if key not in ("model", "autotune_recipe"):
                row[f"param_{key}"] = ",".join(value) if isinstance(value, list) else value
        rows.append(row)
    return pd.DataFrame(rows)


def report_data(study: Any) -> ReportData:
    frame = trials_frame(study)
    sources = sorted({s for s in frame.get("memory_source", []) if s}) if len(frame) else []
    return ReportData(
        data_text=data_description(study.user_attrs),
        readings=frontier_readings(
            frame,
            int(study.user_attrs.get("budget_bytes", 0)),
            study.user_attrs.get("noise"),
        ),
        importances=objective_importances(study),
        time_text=time_description(frame),
        space_lines=tuple(
            not_searched(
                study.user_attrs.get("unsupported_choices") or {},
                study.user_attrs.get("ruled_out_choices") or {},
            )
        ),
        frame=frame,
        frontier_numbers=sorted(int(n) for n in frame.loc[frame["on_frontier"], "trial"])
        if len(frame)
        else [],
        budget_bytes=int(study.user_attrs.get("budget_bytes", 0)),
        memory_sources=sources,
        study_name=study.study_name,
        model=str(study.user_attrs.get("model", "")),
    )


def data_description(attrs: dict[str, Any]) -> str:
    stats = attrs.get("data_stats") or {}
    if not stats.get("token_length_percentiles"):
        return ""
    lengths = ", ".join(f"{k} {v}" for k, v in stats["token_length_percentiles"].items())
    skipped = f" ({stats['skipped_rows']} bad rows skipped)" if stats.get("skipped_rows") else ""
    return (
        f"Data: {stats['rows']} rows{skipped}; tokens per row {lengths}; "
        f"{stats['truncated_share']:.1%} longer than seq_len {attrs.get('seq_len')} and "
        f"truncated; {stats['rows_without_answer_tokens']} lose their whole answer."
    )


def probed_rows(frame: Any) -> Any:
    """Trials that ran a probe of their own (a duplicate carries its original's times)."""
    if "seconds_total" not in frame.columns:
        return frame.iloc[0:0]
    return frame[frame["seconds_total"].notna() & (frame["status"] != DUPLICATE)]


def time_description(frame: Any) -> str:
    """'Time: 40 trials in 58.0 min of trials (41 an hour), 16 probed (17 an hour); median
    probe 104.2 s: start 0.1 s, ..., eval 3.5 s.' Trial durations run from each trial's start to
    its end, so a study resumed later is timed without the pause."""
    finished = frame[frame["trial_seconds"].notna()] if len(frame) else frame
    probed = probed_rows(finished)
    busy_hours = finished["trial_seconds"].sum() / 3600 if len(finished) else 0
    if not len(probed) or not busy_hours:
        return ""
    phases = ", ".join(
        f"{phase} {probed[f'seconds_{phase}'].median():.1f} s"
        for phase in PROBE_PHASES
        if f"seconds_{phase}" in probed.columns and probed[f"seconds_{phase}"].notna().any()
    )
    return (
        f"Time: {len(finished)} trials in {60 * busy_hours:.1f} min of trials "
        f"({len(finished) / busy_hours:.0f} an hour), {len(probed)} probed "
        f"({len(probed) / busy_hours:.0f} an hour); median probe "
        f"{probed['seconds_total'].median():.1f} s: {phases}."
    )


def frontier_readings(
    frame: Any, budget_bytes: int, noise: dict[str, Any] | None = None
) -> list[str]:
    """'fastest under 24 GB: LoRA r16 q/v bf16 mb4 — 5.9x the QLoRA default, +0.030 eval loss',
    with the eval-loss noise of one recipe probed twice, so a difference can be told from chance."""
    if not len(frame):
        return []
    front = frame[frame["on_frontier"]]
    default = frame[(frame["baseline"] == "qlora_default") & (frame["status"] == MEASURED)]
    budget = f"{budget_bytes / 1e9:g} GB"
    roles = {
        "fastest": front.sort_values("tokens_per_second", ascending=False),
        "smallest": front.sort_values("peak_memory_bytes"),
        "best eval loss": front.sort_values("eval_loss"),
    }
    lines = []
    for role, ordered in roles.items():
        if not len(ordered):
            continue
        row = ordered.iloc[0]
        line = (
            f"{role} under {budget}: {row['recipe']} (trial {row['trial']}) — "
            f"{format_bytes(row['peak_memory_bytes'])}, {row['tokens_per_second']:,.0f} tok/s, "
            f"eval loss {row['eval_loss']:.4f}"
        )
        if len(default) and int(default.iloc[0]["trial"]) != int(row["trial"]):
            base = default.iloc[0]
            difference = row["eval_loss"] - base["eval_loss"]
            line += (
                f"; {row['tokens_per_second'] / base['tokens_per_second']:.1f}x the QLoRA "
                f"default, {difference:+.3f} eval loss"
            )
            if noise:
                within = abs(difference) <= noise["eval_loss_difference"]
                line += " (within noise)" if within else " (beyond noise)"
        lines.append(line)
    if noise:
        lines.append(
            f"Noise: trial {noise['trial']} probed again with seed {noise['seed']} moved eval "
            f"loss by {noise['eval_loss_difference']:.3f}, tokens/s by "
            f"{_percent(noise['tokens_per_second_change'])} and peak memory by "
            f"{_percent(noise['peak_memory_change'])}; eval-loss differences smaller than that "
            "are chance."
        )
    return lines


def _percent(change: float | None) -> str:
    return "n/a" if change is None else f"{change:+.1%}"


def objective_importances(study: Any) -> dict[str, dict[str, float]]:
    """Parameter importances per objective over measured trials; empty where too few."""
    import warnings

    import optuna

    from autotune.study.records import DIRECTIONS

    states = (optuna.trial.TrialState.COMPLETE,)
    measured = [
        t
        for t in study.get_trials(deepcopy=False, states=states)
        if trial_status(t) == TrialStatus.MEASURED
    ]
    if len(measured) < 4:
        return {}
    result: dict[str, dict[str, float]] = {}
    for index, (name, direction) in enumerate(zip(OBJECTIVE_NAMES, DIRECTIONS)):
        # The evaluator explains low values; flip the sign of what is maximised.
        sign = -1.0 if direction == "maximize" else 1.0

        def target(trial: Any, i: int = index, s: float = sign) -> float:
            if trial_status(trial) != TrialStatus.MEASURED:
                return float("nan")
            return s * trial.values[i]

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                result[name] = dict(optuna.importance.get_param_importances(study, target=target))
        except (RuntimeError, ValueError, ZeroDivisionError):
            continue
    return result


def _projection_figures(data: ReportData) -> list[Any]:
    """The other two objective pairs, and all three in 3-D."""
    import plotly.graph_objects as go

    measured = data.frame[data.frame["status"] == MEASURED]
    if not len(measured):
        return []
    gib = 2**30
    symbols = ["star" if f else "circle" for f in measured["on_frontier"]]
    pairs = [
        ("peak_memory_bytes", "eval_loss", "tokens_per_second", "Peak memory vs eval loss"),
        ("tokens_per_second", "eval_loss", "peak_memory_bytes", "Tokens/s vs eval loss"),
    ]
    figures = []
    for x, y, colour, title in pairs:
        xs = measured[x] / gib if x == "peak_memory_bytes" else measured[x]
        figures.append(
            go.Figure(
                go.Scatter(
                    x=xs,
                    y=measured[y],
                    mode="markers",
                    text=measured["recipe"],
                    marker=dict(
                        symbol=symbols,
                        size=10,
                        color=measured[colour],
                        colorscale="Viridis",
                        showscale=True,
                        colorbar=dict(title=colour),
                    ),
                )
            ).update_layout(title=title, xaxis_title=x.replace("_bytes", " (GiB)"), yaxis_title=y)
        )
    figures.append(
        go.Figure(
            go.Scatter3d(
                x=measured["peak_memory_bytes"] / gib,
                y=measured["tokens_per_second"],
                z=measured["eval_loss"],
                mode="markers",
                text=measured["recipe"],
                marker=dict(
                    size=5, color=["crimson" if f else "steelblue" for f in measured["on_frontier"]]
                ),
            )
        ).update_layout(
            title="All three objectives (red: frontier)",
            scene=dict(
                xaxis_title="peak memory (GiB)", yaxis_title="tokens/s", zaxis_title="eval loss"
            ),
        )
    )
    params = [
        c
        for c in measured.columns
        if c.startswith("param_") and measured[c].nunique(dropna=True) > 1
    ]
    dimensions = []
    for column in params:
        values = [str(v) if v is not None and v == v else "-" for v in measured[column]]
        codes = {v: i for i, v in enumerate(sorted(set(values)))}
        dimensions.append(
            dict(
                label=column.removeprefix("param_"),
                values=[codes[v] for v in values],
                tickvals=list(codes.values()),
                ticktext=list(codes),
            )
        )
    for name in OBJECTIVE_NAMES:
        dimensions.append(dict(label=name, values=measured[name]))
    figures.append(
        go.Figure(
            go.Parcoords(
                line=dict(color=measured["tokens_per_second"], colorscale="Viridis"),
                dimensions=dimensions,
            )
        ).update_layout(title="Parameters and objectives of measured recipes")
    )
    if data.importances:
        figure = go.Figure()
        for objective, scores in data.importances.items():
            figure.add_trace(go.Bar(name=objective, x=list(scores), y=list(scores.values())))
        figures.append(
            figure.update_layout(title="Parameter importance per objective", barmode="group")
        )
    return figures


def _pareto_figure(data: ReportData) -> Any:
    import plotly.graph_objects as go

    frame = data.frame
    measured = frame[frame["status"] == MEASURED]
    on_front = measured[measured["on_frontier"]]
    others = measured[~measured["on_frontier"]]
    unmeasured = frame[~frame["status"].isin([MEASURED, DUPLICATE])]
    figure = go.Figure()
    gib = 2**30
    loss_range = (
        dict(cmin=measured["eval_loss"].min(), cmax=measured["eval_loss"].max())
        if len(measured)
        else {}
    )
    for subset, name, symbol in (
        (on_front, "Pareto frontier", "star"),
        (others, MEASURED, "circle"),
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

    measured = data.frame[data.frame["status"] == MEASURED]
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


def _time_figure(data: ReportData) -> Any:
    """One bar per probe, split into the phases its time went to."""
    import plotly.graph_objects as go

    probed = probed_rows(data.frame)
    labels = [f"trial {n}" for n in probed["trial"]] if len(probed) else []
    figure = go.Figure()
    for phase in PROBE_PHASES:
        column = f"seconds_{phase}"
        if column in probed.columns:
            figure.add_trace(
                go.Bar(
                    name=phase,
                    y=labels,
                    x=probed[column].fillna(0),
                    orientation="h",
                    text=probed["recipe"],
                    hovertemplate=f"%{{y}} %{{text}}: {phase} %{{x:.1f}} s<extra></extra>",
                )
            )
    return figure.update_layout(
        title="Where each probe's time went",
        barmode="stack",
        xaxis_title="seconds",
        yaxis=dict(autorange="reversed"),
        height=max(300, 22 * len(labels) + 150),
    )


TABLE_COLUMNS = (
    "trial",
    "status",
    "recipe",
    "on_frontier",
    "held_up",
    "predicted_peak_bytes",
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
        _pareto_figure(data),
        *_projection_figures(data),
        _memory_figure(data),
        _time_figure(data),
    ]
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
    figure = _pareto_figure(report_data(study))
    try:
        figure.write_image(str(png_path), width=1000, height=650)
    except Exception:  # noqa: BLE001 - kaleido missing or without a browser: try Chromium
        from autotune.browser import find_chromium, screenshot

        if find_chromium() is None:
            raise UsageError("no PNG: plotly's kaleido failed and no Chromium is on PATH") from None
        with tempfile.TemporaryDirectory() as scratch:
            page = Path(scratch) / "chart.html"
            page.write_text(
                figure.to_html(include_plotlyjs=True, full_html=True), encoding="utf-8"
            )
            try:
                screenshot(page, png_path)
            except RuntimeError as error:
                raise UsageError(f"no PNG: {first_line(error)}") from None
    written = png_path.is_file() and png_path.stat().st_size > 0
    if not written or (existed and png_path.stat().st_mtime_ns == before_ns):
        raise UsageError(f"no PNG was written to {png_path}")
    return png_path
