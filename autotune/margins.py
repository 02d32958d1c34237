"""How far a predicted peak may be trusted: the margin a study adds before it calls a recipe
feasible, from the memory models' own measured errors.

Each margin is the worst under-prediction that the model which answered (the replay or the
formula) made on measured GPU peaks (H100, H200) of the same kind of base (no quantization,
int8, NF4), turned into the share to add to a prediction so that the measured peak would have
fitted. The shipped table (memory_margins.json) is written by
`python bench/memory_bench.py --margins` from the committed measurements; a test checks that it
still agrees with them.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune.memory import CUDA_CONTEXT_BYTES, MemoryEstimate

MARGINS_FILE = Path(__file__).resolve().parent / "memory_margins.json"


@dataclass(frozen=True)
class MemoryMargin:
    fraction: float
    """The share added to a predicted peak less its CUDA context: context + (predicted -
    context) * (1 + fraction) must fit the budget."""
    why: str
    """Where the figure comes from, in words (for the run's output and the report)."""

    def bytes_of(self, peak_bytes: int, context_bytes: int = CUDA_CONTEXT_BYTES) -> int:
        """The peak with the margin added to what the margin was measured on: the peak less the
        CUDA context (`context_bytes`), which is added back as it is. The margin's errors are of
        predicted against measured reserved peaks, both without the context (margin_rows in
        bench/memory_bench.py)."""
        context = min(context_bytes, peak_bytes)
        return context + math.ceil((peak_bytes - context) * (1 + self.fraction))

    def estimate_bytes(self, estimate: MemoryEstimate) -> int:
        """The peak of `estimate` with the margin added, less the context its breakdown names."""
        return self.bytes_of(estimate.peak_bytes, estimate.cuda_context_bytes)


def fraction_for(worst_under_prediction: float) -> float:
    """The share to add so that a peak under-predicted by `worst_under_prediction` (a negative
    predicted/measured - 1) would have fitted: measured = predicted / (1 + error)."""
    if worst_under_prediction >= 0:
        return 0.0
    return 1 / (1 + worst_under_prediction) - 1


MIN_ROWS_OF_A_KIND = 8
"""A kind of base measured fewer times than this gets its model's worst miss over all kinds
where that is worse: a few rows are thin evidence that a model is better on them (int8's eight
rows include the one its replay's outlier share was fitted to, and none above 7B)."""


def margins_of(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The margin table of scored rows, each {"memory_model", "quantization", "error"}: per
    memory model, per quantization kind and over all kinds ("all"), the rows, the worst
    under-prediction (the model's worst over all kinds for a kind of fewer than
    MIN_ROWS_OF_A_KIND rows, where that is worse) and the fraction it asks for."""
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
            entry: dict[str, Any] = {"rows": len(values)}
            if len(values) < MIN_ROWS_OF_A_KIND and min(by_kind["all"]) < worst:
                # the kind's own worst, said beside the one over every kind that is added
                entry["own_worst_under_prediction"] = round(min(worst, 0.0), 6)
                entry["all_rows"] = len(by_kind["all"])
                worst = min(by_kind["all"])
            entry["worst_under_prediction"] = round(min(worst, 0.0), 6)
            # rounded up, so that the shipped share still covers the worst miss
            entry["fraction"] = math.ceil(fraction_for(worst) * 10**6) / 10**6
            table[model][kind] = entry
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
    worst = f"{100 * entry['worst_under_prediction']:.1f}%"
    if "own_worst_under_prediction" in entry:  # too few peaks of the kind to stand alone
        why = (
            f"the {memory_model}'s worst under-prediction on {entry['all_rows']} measured GPU "
            f"peaks of every base: {worst}, taken for {kind}, measured {entry['rows']} times "
            f"(worst {100 * entry['own_worst_under_prediction']:.1f}%)"
        )
    else:
        why = (
            f"the {memory_model}'s worst under-prediction on {entry['rows']} measured GPU peaks "
            f"({kind}): {worst}"
        )
    return MemoryMargin(entry["fraction"], why)


def margin_for(given: float | None, memory_model: str, quantization: str) -> MemoryMargin:
    """The margin a study adds: the one a person gave (--memory-margin), else the measured one."""
    if given is not None:
        return MemoryMargin(given, f"--memory-margin {given:g}")
    return memory_margin(memory_model, quantization)


def stored_margin(fraction: float, memory_model: str, quantization: str) -> MemoryMargin:
    """The margin a trial stored (its fraction), with where it came from: the measured table's
    entry where the fraction is that entry's, else a margin given to the run."""
    measured = memory_margin(memory_model, quantization)
    if measured.fraction == fraction:
        return measured
    return MemoryMargin(fraction, "given to the run" if fraction else "none")


MAX_MARGIN = 1.0
"""A given margin above this (doubling every prediction) is a typo for a percentage."""


def check_margin(given: float | None) -> None:
    from autotune.errors import UsageError

    if given is not None and not 0 <= given <= MAX_MARGIN:
        raise UsageError(
            f"--memory-margin must be a share from 0 to {MAX_MARGIN:g} (0.1 is 10%), got {given}"
        )


def fit_words(
    peak_bytes: int,
    margin: MemoryMargin,
    budget_bytes: int,
    num_gpus: int = 1,
    context_bytes: int = CUDA_CONTEXT_BYTES,
) -> str:
    """How a predicted peak stands against the budget once the margin is added (to the peak
    less its CUDA context, `context_bytes`), in words; on several GPUs both are each GPU's, and
    say so."""
    from autotune.units import a_or_an, format_bytes

    each = " per GPU" if num_gpus > 1 else ""

    margined = margin.bytes_of(peak_bytes, context_bytes)
    if margined <= budget_bytes:
        spare = format_bytes(budget_bytes - margined)
        verdict = f"fits {format_bytes(budget_bytes)} with {spare} to spare"
    else:
        verdict = f"over {format_bytes(budget_bytes)} by {format_bytes(margined - budget_bytes)}"
    percent = f"{100 * margin.fraction:.1f}"
    return (
        f"predicted {format_bytes(peak_bytes)}{each}, {format_bytes(margined)} with "
        f"{a_or_an(percent)} {percent}% margin ({margin.why}): {verdict}{each}"
    )


_KIND_WORDS = {"none": "unquantized bases", "int8": "int8 bases", "nf4": "NF4 bases"}
