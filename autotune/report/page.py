"""The report as one self-contained HTML page (plotly.js inline, works offline), and its main
chart as a PNG.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from autotune.export import write_text
from autotune.own_files import CHART_SIZE, REPORT_MARK
from autotune.report.card import PickCard, export_command, format_seconds, frontier_frame
from autotune.report.data import MIN_MEASURED_FOR_IMPORTANCE, ReportData, report_data
from autotune.report.figures import (
    importance_figure,
    memory_figure,
    pareto_figure,
    projection_figures,
    time_figure,
)
from autotune.report.table import (
    FRONTIER_COLUMNS,
    SORT_SCRIPT,
    TRIAL_COLUMNS,
    csv_text,
    html_table,
    with_memory_heading,
    with_promoted_columns,
)
from autotune.study.ranking import QualityRanking
from autotune.training.io import CPU_MEMORY_SOURCE, CUDA_MEMORY_SOURCE
from autotune.units import count_of, format_bytes

MEMORY_SOURCE_TEXT = {
    CUDA_MEMORY_SOURCE: "peak memory is torch.cuda.max_memory_reserved() over train and eval "
    "plus the CUDA context, measured in the probe process",
    CPU_MEMORY_SOURCE: "probes ran on the CPU: measured memory is the growth of the probe "
    "process's peak resident set, not GPU memory; feasibility rests on the predicted GPU peak",
}


TABLE_COLUMNS = tuple(column.key for column in TRIAL_COLUMNS)
"""The frame's columns the trial table shows (TRIAL_COLUMNS says under what heading)."""

STYLE = """body{font-family:system-ui,sans-serif;margin:1.2em 2em;color:#222}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.15em;margin:1.2em 0 .4em}
.sub{color:#555;margin:0 0 .8em} .cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #ccc;border-radius:6px;padding:.5em .8em;font-size:13px;flex:1 1 16em}
.card.primary{border:2px solid #2a6;flex:2 1 26em} .card .pick{font-weight:600;color:#2a6}
.card .pick-note{color:#555}
.card .recipe{font-family:monospace;font-size:13px;margin:.2em 0}
.card dl{display:grid;grid-template-columns:max-content auto;gap:.1em .8em;margin:.3em 0}
.card dt{color:#555} .card dd{margin:0} .card code{display:block;font-size:12px;
background:#f4f4f4;padding:.2em .4em;margin:.2em 0;white-space:pre-wrap;overflow-wrap:anywhere}
.beyond{color:#2a6} .within{color:#888}
.table-box{overflow:auto;max-width:100%;max-height:32em;border:1px solid #ddd}
table{border-collapse:collapse;font-size:12px} th{position:sticky;top:0;background:#f0f0f0;
cursor:pointer;vertical-align:bottom} td,th{border:1px solid #ddd;padding:2px 6px}
td{white-space:nowrap} th[data-order=asc]::after{content:" \\25B2"}
th[data-order=desc]::after{content:" \\25BC"} figure{margin:1em 0}
figcaption{font-size:13px;color:#444} .note{font-size:13px;color:#444}"""


def _noise_words(beyond: bool | None) -> str:
    if beyond is None:
        return ""
    kind, words = ("beyond", "beyond") if beyond else ("within", "within")
    return f' <span class="{kind}">({words} the measured noise)</span>'


def card_html(card: PickCard, data: ReportData, primary: bool) -> str:
    """One pick as a card: recipe, memory against the budget, speed and loss against the QLoRA
    default, the confirmation, one epoch's time; the primary card says how to train it."""
    esc = html.escape
    budget = data.budget_bytes
    fraction = card.peak_memory_bytes / budget if budget else 0.0
    share = f" ({fraction:.0%})" if fraction >= 0.01 else " (under 1%)" if budget else ""
    speed = esc(f"{card.tokens_per_second:,.0f} tokens/s")
    loss = esc(f"{card.eval_loss:.4f}")
    if card.speedup is not None:
        speed += esc(f", {card.speedup:.2f}× the QLoRA default")
        speed += _noise_words(card.speed_beyond_noise)
    against_default = ""
    if card.eval_loss_change is not None:
        against_default = esc(f", {card.eval_loss_change:+.4f} vs the QLoRA default")
        if card.change_at_steps is not None:
            against_default += esc(f" at {card.change_at_steps} steps")
        against_default += _noise_words(card.loss_beyond_noise)
    if card.change_at_steps is None:
        loss += against_default
    if card.longer_probe is not None:
        steps, longer = card.longer_probe
        loss += esc(f"; {longer:.4f} on a longer probe ({steps} steps)")
    if card.change_at_steps is not None:
        loss += against_default
    if card.is_default:
        speed += " (this is the QLoRA default)"
    held = "not confirmed"
    if card.confirmation is not None:
        # after the verdict's own parenthesis, not a second one beside it
        held = f"{card.confirmation}; probed again, longer, with another seed"
    memory = f"{format_bytes(card.peak_memory_bytes)} of the {format_bytes(budget)} budget{share}"
    if data.on_cpu:  # RSS growth is no share of a GPU budget
        memory = f"CPU RSS +{format_bytes(card.peak_memory_bytes)} (a CPU probe: not GPU memory)"
    rows = [
        ("Peak memory", esc(memory)),
        ("Speed", speed),
        ("Eval loss", loss),
        ("Confirmation", esc(held)),
    ]
    if card.epoch_seconds is not None:
        epoch = format_seconds(card.epoch_seconds)
        if card.default_epoch_seconds is not None:
            epoch += f" (QLoRA default: {format_seconds(card.default_epoch_seconds)})"
        rows.append(("One epoch", esc(f"{epoch} for {data.train_tokens:,} tokens")))
    terms = "".join(f"<dt>{esc(term)}</dt><dd>{value}</dd>" for term, value in rows)
    commands = ""
    if primary and data.commands:
        commands = "".join(f"<code>{esc(c)}</code>" for c in data.commands)
    elif not primary:
        command = export_command(data.study_name, data.storage_url, card.picks[0])
        commands = f"<code>{esc(command)}</code>"
    kind = "card primary" if primary else "card"
    notes = "".join(f'<div class="pick-note">{esc(note)}</div>' for note in card.pick_notes)
    return (
        f'<div class="{kind}"><div class="pick">{esc(" · ".join(card.picks))} · trial '
        f'{card.trial}</div>{notes}<div class="recipe">{esc(card.recipe)}</div><dl>{terms}</dl>'
        f"{commands}</div>"
    )


def charts(data: ReportData) -> tuple[list[tuple[Any, str]], list[str]]:
    """The charts with their captions, and a line for each chart left out saying why."""
    budget = (
        "crosses recipes not measured, at their predicted GPU peak; no budget line, as the "
        "budget is of GPU memory and the probes measured CPU resident memory"
        if data.on_cpu
        else "the dashed line the budget, crosses recipes not measured"
    )
    drawn: list[tuple[Any, str]] = [
        (
            pareto_figure(data),
            "Each point a recipe: further left uses less memory, higher is faster, colour is "
            f"eval loss; stars are the frontier (no recipe beats them on all three), {budget}.",
        ),
        *projection_figures(data),
    ]
    left_out = []
    importance = importance_figure(data)
    rule = (
        f"shown once {MIN_MEASURED_FOR_IMPORTANCE} trials are measured, each objective over "
        "the measured trials' own values"
    )
    if importance is not None:
        drawn.append(
            (
                importance,
                f"How much of each objective's spread each parameter "
                f"explains (Optuna's importance evaluator; {rule}).",
            )
        )
    else:
        left_out.append(
            f"No parameter importances: {data.measured_count} measured trials, and "
            f"they are {rule}; from fewer they mostly rank chance."
        )
    memory = memory_figure(data)
    if memory is not None:
        drawn.append(
            (
                memory,
                "Each probe measured on a GPU: above the dotted line the memory "
                "model predicted too little, below it too much.",
            )
        )
    else:
        left_out.append(
            "No predicted-vs-measured memory chart: no probe ran on a GPU, and a CPU "
            "probe's resident-set growth is not comparable with a GPU prediction."
        )
    drawn.append(
        (
            time_figure(data),
            "Where each probe's seconds went, phase by phase: long start bars are a probe "
            "process starting (a cold one, or the first), long load bars model loading, long "
            "steps bars the training itself.",
        )
    )
    return drawn, left_out


def render_html(data: ReportData) -> str:
    """One HTML page with plotly.js inline: the answer (pick cards), the frontier table, the
    charts, all trials, then notes."""
    drawn, left_out = charts(data)
    figures = "".join(
        "<figure>"
        + figure.to_html(full_html=False, include_plotlyjs=index == 0, div_id=f"chart-{index}")
        + f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for index, (figure, caption) in enumerate(drawn)
    )
    cards = "".join(card_html(c, data, index == 0) for index, c in enumerate(data.cards))
    if not cards:
        cards = '<p class="note">No recipe was measured within the budget yet.</p>'
    front = frontier_frame(data.frame, data.cards)
    sources = "; ".join(MEMORY_SOURCE_TEXT.get(s, s) for s in data.memory_sources) or "no probe ran"
    notes = [
        f"Memory figures: {sources}.",
        data.data_text,
        data.time_text,
        *(line[0].upper() + line[1:] + "." for line in data.space_lines),
        *(line for line in data.readings if line.startswith("Noise:")),
        *left_out,
    ]
    # the trial count once (as `autotune status` says it, of the --trials), then how many measured
    counts = f"{data.finished_text or count_of(len(data.frame), 'trial')}; "
    counts += f"{data.measured_count} measured"
    on_cpu = data.on_cpu
    frontier_columns = with_memory_heading(
        with_promoted_columns(FRONTIER_COLUMNS, data.promoted_steps), on_cpu
    )
    trial_columns = with_memory_heading(
        with_promoted_columns(TRIAL_COLUMNS, data.promoted_steps), on_cpu
    )
    return f"""<!DOCTYPE html>
{REPORT_MARK}{html.escape(data.study_name)}</title>
<style>{STYLE}</style></head><body>
<h1>autotune study {html.escape(data.study_name)}</h1>
<p class="sub">Model {html.escape(data.model)}; budget {format_bytes(data.budget_bytes)};
{counts}.</p>
<section id="recommendation"><div class="cards">{cards}</div></section>
<h2 id="frontier">Frontier: no other recipe beats these on all three objectives</h2>
{html_table(front, frontier_columns, "frontier-table") if len(front) else ""}
{"".join(f'<p class="note left">{html.escape(line)}</p>' for line in data.left_frontier)}
{"".join(f'<p class="note quality">{html.escape(line)}</p>' for line in data.quality_notes)}
<h2>Charts</h2>
{figures}
<h2 id="trials">All trials</h2>
{html_table(data.frame, trial_columns, "trials-table") if len(data.frame) else ""}
<h2>Notes</h2>
{"".join(f'<p class="note">{html.escape(line)}</p>' for line in notes if line)}
{SORT_SCRIPT}
</body></html>
"""


def write_report(
    study: Any,
    path: str | Path,
    csv_path: str | Path | None = None,
    recipe_path: str | Path | None = None,
    exported: bool = True,
    storage_url: str | None = None,
    ranking: QualityRanking | None = None,
) -> Path:
    """The HTML report (and the raw trials table as CSV); `recipe_path` and `ranking` as
    report_data's."""
    data = report_data(
        study, None if recipe_path is None else str(recipe_path), exported, storage_url, ranking
    )
    if csv_path is not None:
        write_text(csv_path, csv_text(data.frame))
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
        figure.write_image(str(png_path), width=CHART_SIZE[0], height=CHART_SIZE[1])
    except Exception:  # noqa: BLE001 - kaleido missing or without a browser: try Chromium
        from autotune.browser import find_chromium, screenshot

        if find_chromium() is None:
            raise UsageError(
                "no PNG: plotly's kaleido failed and no Chromium is on PATH (install Chromium or "
                "Chrome, or leave out --png)"
            ) from None
        with tempfile.TemporaryDirectory() as scratch:
            page = Path(scratch) / "chart.html"
            # a picture, not a page: without plotly's toolbar over the chart
            page.write_text(
                figure.to_html(
                    include_plotlyjs=True, full_html=True, config={"displayModeBar": False}
                ),
                encoding="utf-8",
            )
            try:
                screenshot(page, png_path, *CHART_SIZE)
            except RuntimeError as error:
                raise UsageError(f"no PNG: {first_line(error)}") from None
    written = png_path.is_file() and png_path.stat().st_size > 0
    if not written or (existed and png_path.stat().st_mtime_ns == before_ns):
        raise UsageError(f"no PNG was written to {png_path}")
    return png_path
