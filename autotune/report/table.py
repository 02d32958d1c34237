"""Tables for people: headings in words with units, sizes in GiB/MiB, rates with separators,
losses to four decimals, empty cells empty; each cell keeps its raw value for sorting, and a few
lines of inline script sort a table by the header clicked (the page stays one offline file).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from autotune.report.frame import promoted_column
from autotune.study.records import TrialStatus
from autotune.training.io import PROBE_PHASES
from autotune.units import format_bytes

STATUS_WORDS = {
    TrialStatus.MEASURED.value: "measured",
    TrialStatus.OVER_BUDGET_PREDICTED.value: "over budget (predicted, not run)",
    TrialStatus.REFUSED.value: "refused: cannot train (not run)",
    TrialStatus.DUPLICATE.value: "repeat of an earlier trial",
    TrialStatus.OOM.value: "out of memory",
    TrialStatus.NAN.value: "loss not finite",
    TrialStatus.TIMEOUT.value: "timed out",
    TrialStatus.CRASH.value: "crashed",
    TrialStatus.INTERRUPTED.value: "interrupted",
    "running": "running",
    "waiting": "queued",
    "fail": "failed",
}


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _size(value: Any) -> str:
    return format_bytes(float(value))


def _yes_no(value: Any) -> str:
    return "yes" if bool(value) else "no"


FORMATS: dict[str, Callable[[Any], str]] = {
    "bytes": _size,
    "rate": lambda v: f"{float(v):,.0f}",
    "loss": lambda v: f"{float(v):.4f}",
    "seconds": lambda v: f"{float(v):,.1f}",
    "percent": lambda v: f"{100 * float(v):.1f}%",
    "ratio": lambda v: f"{float(v):.2f}×",
    "change": lambda v: f"{float(v):+.4f}",
    "int": lambda v: f"{int(v)}",
    "yes": lambda v: "yes" if v else "",
    "yes_no": _yes_no,
    "status": lambda v: STATUS_WORDS.get(str(v), str(v).replace("_", " ")),
    "text": str,
}


@dataclass(frozen=True)
class Column:
    key: str
    """The frame's column."""
    heading: str
    """What people read: words, with the unit."""
    kind: str = "text"
    """A key of FORMATS."""

    def cell(self, value: Any) -> tuple[str, str]:
        """(what is shown, what sorts): both empty for a missing value."""
        if _empty(value):
            return "", ""
        shown = FORMATS[self.kind](value)
        numeric = self.kind not in ("text", "status", "yes", "yes_no")
        return shown, f"{float(value):.6f}" if numeric else shown


COLUMNS = {
    column.key: column
    for column in (
        Column("trial", "Trial", "int"),
        Column("status", "Status", "status"),
        Column("picks", "Picked as"),
        Column("recipe", "Recipe"),
        Column("on_frontier", "On frontier", "yes"),
        Column("held_up", "Held up on confirmation", "yes_no"),
        Column("peak_memory_bytes", "Measured peak memory", "bytes"),
        Column("predicted_peak_bytes", "Predicted peak memory", "bytes"),
        Column("memory_margin", "Margin added", "percent"),
        Column("predicted_with_margin_bytes", "Predicted with margin", "bytes"),
        Column("memory_model", "Memory model"),
        Column("host_peak_bytes", "Measured host peak", "bytes"),
        Column("predicted_host_bytes", "Predicted host peak", "bytes"),
        Column("tokens_per_second", "Tokens/s", "rate"),
        Column("confirm_tokens_per_second", "Tokens/s on confirmation", "rate"),
        Column("speedup", "Speed vs QLoRA default", "ratio"),
        Column("eval_loss", "Eval loss", "loss"),
        Column("eval_loss_change", "Eval loss vs QLoRA default", "change"),
        *(
            Column(f"seconds_{p}", f"Probe {p.replace('_', ' ')} (s)", "seconds")
            for p in PROBE_PHASES
        ),
        Column("seconds_total", "Probe total (s)", "seconds"),
        Column("reason", "Reason"),
    )
}
"""Every column a table of the report shows, by the frame's column: each heading said once."""


def _columns(keys: str) -> tuple[Column, ...]:
    """The COLUMNS of `keys` (separated by spaces), in their order."""
    return tuple(COLUMNS[key] for key in keys.split())


_PHASE_KEYS = " ".join(f"seconds_{phase}" for phase in PROBE_PHASES)
TRIAL_COLUMNS = _columns(
    "trial status recipe on_frontier held_up peak_memory_bytes predicted_peak_bytes memory_margin"
    " predicted_with_margin_bytes memory_model host_peak_bytes predicted_host_bytes"
    f" tokens_per_second confirm_tokens_per_second eval_loss {_PHASE_KEYS} seconds_total reason"
)
FRONTIER_COLUMNS = _columns(
    "trial picks recipe peak_memory_bytes predicted_with_margin_bytes host_peak_bytes"
    " tokens_per_second speedup eval_loss eval_loss_change held_up"
)


CPU_MEMORY_HEADING = "Measured CPU RSS growth"
"""The measured-memory heading of a study whose probes ran on a CPU: not GPU memory."""


def with_memory_heading(columns: Sequence[Column], on_cpu: bool) -> list[Column]:
    """`columns`, the measured peak headed as what a CPU probe measured where `on_cpu`."""
    if not on_cpu:
        return list(columns)
    return [
        Column(c.key, CPU_MEMORY_HEADING, c.kind) if c.key == "peak_memory_bytes" else c
        for c in columns
    ]


def with_promoted_columns(columns: Sequence[Column], steps: Sequence[int]) -> list[Column]:
    """`columns` with, after the eval loss, one column per promotion round's probe length:
    each compares the recipes that reached it, at one length."""
    promoted = [
        Column(promoted_column(s), f"Longer probe eval loss ({s} steps)", "loss") for s in steps
    ]
    at = [c.key for c in columns].index("eval_loss") + 1
    return [*columns[:at], *promoted, *columns[at:]]


def html_table(frame: Any, columns: Sequence[Column], table_id: str) -> str:
    """The frame's rows under `columns` (those it has), in a box that scrolls, sortable."""
    shown = [c for c in columns if c.key in frame.columns]
    head = "".join(f'<th title="click to sort">{html.escape(c.heading)}</th>' for c in shown)
    body = []
    for record in frame.to_dict("records"):
        cells = []
        for column in shown:
            text, key = column.cell(record[column.key])
            cells.append(f'<td data-sort="{html.escape(key)}">{html.escape(text)}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="table-box"><table class="sortable" id="{table_id}">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


SORT_SCRIPT = """<script>
document.querySelectorAll("table.sortable th").forEach(function (th, _, all) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0];
    var index = Array.prototype.indexOf.call(th.parentNode.children, th);
    var ascending = th.dataset.order !== "asc";
    th.parentNode.querySelectorAll("th").forEach(function (h) { delete h.dataset.order; });
    th.dataset.order = ascending ? "asc" : "desc";
    var rows = Array.prototype.slice.call(body.rows);
    function key(row) { return row.cells[index].dataset.sort; }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === "" || y === "") { return (x === "") - (y === ""); }  // empty cells last
      var nx = parseFloat(x), ny = parseFloat(y);
      var order = isNaN(nx) || isNaN(ny) ? x.localeCompare(y) : nx - ny;
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
</script>"""


def csv_text(frame: Any) -> str:
    """The trials table as CSV, its byte sizes and whole-number choices (a LoRA rank) written as
    whole numbers: a column with gaps is float in pandas, which wrote them as 155275264.0 and
    8.0. A choice its dimension stores as a float (a dropout of 0.0) stays one."""
    from autotune.dimensions import DIMENSIONS

    floats = tuple(f"_{d.name}" for d in DIMENSIONS if d.cast is float)
    table = frame.copy()
    for column in table.columns:
        values = table[column]
        whole = column.endswith("_bytes") or (
            column.startswith("param_") and not f"_{column[len('param_') :]}".endswith(floats)
        )
        if whole and values.dtype.kind == "f":
            present = values.dropna()
            if len(present) and bool((present == present.round()).all()):
                table[column] = values.astype("Int64")
    return str(table.to_csv(index=False))
