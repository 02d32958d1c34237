"""How far a predicted peak may be trusted: the margin a study adds before it calls a recipe
feasible, from the memory models' own measured errors.

Each margin is the worst under-prediction that the model which answered (the replay or the
formula) made on measured H100 peaks of the same kind of base (no quantization, int8, NF4),
turned into the share to add to a prediction so that the measured peak would have fitted. The
shipped table (memory_margins.json) is written by `python bench/memory_bench.py --margins` from
the committed measurements; a test checks that it still agrees with them.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARGINS_FILE = Path(__file__).resolve().parent / "memory_margins.json"


@dataclass(frozen=True)
class MemoryMargin:
    fraction: float
    """The share added to a predicted peak: predicted * (1 + fraction) must fit the budget."""
    why: str
    """Where the figure comes from, in words (for the run's output and the report)."""

    def bytes_of(self, peak_bytes: int) -> int:
        """The peak with the margin added."""
        return math.ceil(peak_bytes * (1 + self.fraction))


def fraction_for(worst_under_prediction: float) -> float:
    """The share to add so that a peak under-predicted by `worst_under_prediction` (a negative
    predicted/measured - 1) would have fitted: measured = predicted / (1 + error)."""
    if worst_under_prediction >= 0:
        return 0.0
    return 1 / (1 + worst_under_prediction) - 1


def margins_of(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The margin table of scored rows, each {"memory_model", "quantization", "error"}: per
    memory model, per quantization kind and over all kinds ("all"), the rows, the worst
    under-prediction and the fraction it asks for."""
    errors: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        by_kind = errors.setdefault(row["memory_model"], {})
        by_kind.setdefault(row["quantization"], []).append(row["error"])
        by_kind.setdefault("all", []).append(row["error"])
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for model, by_kind in sorted(errors.items()):
        table[model] = {}
        for kind, values in sorted(by_kind.items()):
            worst = min(values)
            table[model][kind] = {
                "rows": len(values),
                "worst_under_prediction": round(min(worst, 0.0), 6),
                "fraction": round(fraction_for(worst), 6),
            }
    return table


@functools.lru_cache(maxsize=1)
def _shipped_table() -> dict[str, dict[str, dict[str, Any]]]:
    table: dict[str, dict[str, dict[str, Any]]] = json.loads(
        MARGINS_FILE.read_text(encoding="utf-8")
    )["margins"]
    return table


def memory_margin(memory_model: str, quantization: str) -> MemoryMargin:
    """The margin for a peak that `memory_model` ("replay" or "formula") predicted for a recipe
    on a `quantization` base; where no row of that kind was measured, the model's worst."""
    table = _shipped_table()
    by_kind = table.get(memory_model) or table["formula"]
    entry = by_kind.get(quantization) or by_kind["all"]
    kind = "every base" if quantization not in by_kind else _KIND_WORDS.get(quantization, "")
    why = (
        f"the {memory_model}'s worst under-prediction on {entry['rows']} measured H100 peaks "
        f"({kind}): {100 * entry['worst_under_prediction']:.1f}%"
    )
    return MemoryMargin(entry["fraction"], why)


def given_margin(fraction: float) -> MemoryMargin:
    return MemoryMargin(fraction, "--memory-margin")


_KIND_WORDS = {"none": "unquantized bases", "int8": "int8 bases", "nf4": "NF4 bases"}
