"""The report's charts (plotly, imported only when one is drawn)."""

from __future__ import annotations

from typing import Any

from autotune.report.data import ReportData
from autotune.report.frame import DUPLICATE, MEASURED, probed_rows
from autotune.study.records import OBJECTIVE_NAMES
from autotune.training.io import CUDA_MEMORY_SOURCE, PROBE_PHASES
from autotune.units import format_bytes

OBJECTIVE_WORDS = {
    "peak_memory_bytes": "peak memory (GiB)",
    "tokens_per_second": "tokens/s",
    "eval_loss": "eval loss",
}


CPU_MEMORY_WORDS = "CPU RSS growth (GiB)"
"""The memory axis of a study whose probes ran on a CPU: their resident-set growth, not GPU
memory (the cards and the console say so too)."""


CPU_BUDGET_WORDS = (
    "no budget line: the {budget} budget is of GPU memory, and these probes measured the "
    "growth of CPU resident memory"
)
"""What the main chart of a study whose probes ran on a CPU says in place of the budget line:
the budget holds each recipe's predicted GPU peak, which this axis does not show."""


def objective_words(data: ReportData) -> dict[str, str]:
    """OBJECTIVE_WORDS as the study measured them: memory is RSS growth where every probe ran
    on a CPU."""
    if data.on_cpu:
        return {**OBJECTIVE_WORDS, "peak_memory_bytes": CPU_MEMORY_WORDS}
    return OBJECTIVE_WORDS


PARAMETER_WORDS = {
    "micro_batch_size": "micro-batch",
    "gradient_accumulation_steps": "accumulation steps",
    "gradient_checkpointing": "checkpointing",
    "lora_target_modules": "LoRA targets",
    "lora_r": "LoRA r",
    "lora_alpha": "LoRA alpha",
    "lora_dropout": "LoRA dropout",
    "frozen_layers": "frozen layers",
    "learning_rate": "learning rate",
    "expandable_segments": "expandable segments",
    "activation_offload": "activation offload",
    "train_modules": "trained modules",
    "use_dora": "DoRA",
    "num_gpus": "GPUs",
    "lr_schedule": "LR schedule",
    "warmup_steps": "warm-up steps",
}
"""The parallel coordinates' axis names for recipe fields whose own name is not a word
(others show as they are, underscores as spaces)."""


def _parameter_words(name: str) -> str:
    return PARAMETER_WORDS.get(name, name.replace("_", " "))


def _choice_text(value: Any) -> str:
    """A recipe field's value on its axis: '-' where the recipe has none (a rank of a full
    fine-tune), whole numbers without the '.0' a column with gaps gives them."""
    if value is None or value != value:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _choice_order(text: str) -> tuple[int, float, str]:
    """Numbers in their order (4 below 16), then words, then '-'."""
    if text == "-":
        return (2, 0.0, text)
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def _in_units(frame: Any, name: str) -> Any:
    """An objective's column as its axis word says: peak memory in GiB, the others as they are."""
    return frame[name] / 2**30 if name == "peak_memory_bytes" else frame[name]


def projection_figures(data: ReportData) -> list[tuple[Any, str]]:
    """The other two objective pairs, all three in 3-D, and parameters against objectives; each
    with its caption."""
    import plotly.graph_objects as go

    measured = data.frame[data.frame["status"] == MEASURED]
    if not len(measured):
        return []
    words = objective_words(data)
    symbols = ["star" if f else "circle" for f in measured["on_frontier"]]
    pairs = [
        ("peak_memory_bytes", "eval_loss", "tokens_per_second", "Peak memory vs eval loss"),
        ("tokens_per_second", "eval_loss", "peak_memory_bytes", "Tokens/s vs eval loss"),
    ]
    captions = [
        "What memory buys in quality: lower and further left is better; stars are the frontier.",
        "What speed costs in quality: lower and further right is better; stars are the frontier.",
        "All three objectives at once (drag to turn); red points are the frontier.",
        "One line per measured recipe through its choices and its figures; drag along an axis "
        "to keep only the lines that pass there.",
    ]
    figures = []
    for x, y, colour, title in pairs:
        figures.append(
            go.Figure(
                go.Scatter(
                    x=_in_units(measured, x),
                    y=measured[y],
                    mode="markers",
                    text=measured["recipe"],
                    marker=dict(
                        symbol=symbols,
                        size=10,
                        color=_in_units(measured, colour),
                        colorscale="Viridis",
                        showscale=True,
                        colorbar=dict(title=words[colour]),
                    ),
                )
            ).update_layout(title=title, xaxis_title=words[x], yaxis_title=words[y])
        )
    figures.append(
        go.Figure(
            go.Scatter3d(
                x=_in_units(measured, "peak_memory_bytes"),
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
                xaxis_title=words["peak_memory_bytes"],
                yaxis_title=words["tokens_per_second"],
                zaxis_title=words["eval_loss"],
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
        values = [_choice_text(v) for v in measured[column]]
        codes = {v: i for i, v in enumerate(sorted(set(values), key=_choice_order))}
        dimensions.append(
            dict(
                label=_parameter_words(column.removeprefix("param_")),
                values=[codes[v] for v in values],
                tickvals=list(codes.values()),
                ticktext=list(codes),
            )
        )
    for name in OBJECTIVE_NAMES:
        dimensions.append(dict(label=words[name], values=_in_units(measured, name)))
    figures.append(
        go.Figure(
            go.Parcoords(
                line=dict(color=measured["tokens_per_second"], colorscale="Viridis"),
                dimensions=dimensions,
                labelangle=-20,  # a dozen axes side by side: level names ran into each other
            )
        ).update_layout(title="Parameters and objectives of measured recipes", margin=dict(t=140))
    )
    return list(zip(figures, captions))


def importance_figure(data: ReportData) -> Any:
    """One group of bars per objective; None where no objective has importances."""
    import plotly.graph_objects as go

    if not data.importances:
        return None
    figure = go.Figure()
    words = objective_words(data)
    for objective, scores in data.importances.items():
        figure.add_trace(go.Bar(name=words[objective], x=list(scores), y=list(scores.values())))
    return figure.update_layout(
        title="Parameter importance per objective", barmode="group", yaxis_title="share"
    )


def pareto_figure(data: ReportData) -> Any:
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
                name="not measured (infeasible or failed)"
                + (", at its predicted GPU peak" if data.on_cpu else ""),
                text=unmeasured["status"]
                + ": "
                + unmeasured["recipe"]
                + " — "
                + unmeasured["reason"].fillna(""),
                hovertemplate="%{text}<br>predicted %{x:.2f} GiB<extra></extra>",
                marker=dict(symbol="x", size=8, color="grey"),
            )
        )
    words = objective_words(data)
    if data.budget_bytes and not data.on_cpu:
        figure.add_vline(
            x=data.budget_bytes / gib,
            line_dash="dash",
            line_color="red",
            annotation_text=f"budget {format_bytes(data.budget_bytes)}",
        )
    elif data.budget_bytes:  # a GPU budget has no place on an axis of CPU resident memory
        figure.add_annotation(
            text=CPU_BUDGET_WORDS.format(budget=format_bytes(data.budget_bytes)),
            xref="paper",
            yref="paper",
            x=1,
            y=1,
            xanchor="right",
            yanchor="bottom",
            showarrow=False,
        )
    figure.update_layout(
        title="Peak memory vs tokens/s (colour: eval loss)",
        xaxis_title=words["peak_memory_bytes"],
        yaxis_title="tokens per second",
        legend=dict(orientation="h", y=-0.2),
    )
    return figure


def memory_figure(data: ReportData) -> Any:
    """Predicted against measured peak for the probes measured on a GPU; None where none was
    (a CPU probe's resident-set growth is not the GPU memory the prediction is of)."""
    import plotly.graph_objects as go

    frame = data.frame
    measured = frame[(frame["status"] == MEASURED) & (frame["memory_source"] == CUDA_MEMORY_SOURCE)]
    if not len(measured):
        return None
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


def time_figure(data: ReportData) -> Any:
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
                    textposition="none",  # the recipe is for the hover, not drawn in each phase
                    hovertemplate=f"%{{y}} %{{text}}: {phase} %{{x:.1f}} s<extra></extra>",
                )
            )
    return figure.update_layout(
        title="Where each probe's time went",
        barmode="stack",
        xaxis_title="seconds",
        yaxis=dict(autorange="reversed"),
        # under the bars, in a row: beside a short chart the legend scrolled, hiding start
        legend=dict(orientation="h", y=-0.25, traceorder="normal"),
        height=max(340, 22 * len(labels) + 190),
    )
