"""The choices a study searches, and those of its space file it leaves out and why: the run
that starts a study stores them, a resumed run reads them back (Optuna keeps a study's choices)
and stores what changed, and the report reads them. One writer and one reader here, and no other
module spells their attribute keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SpaceChoices:
    """The choices a study searches, and those of its space file it leaves out and why."""

    fitting: dict[str, list[Any]]
    """Dimension -> the choices searched: the space file's, less those the memory model rules
    out under the budget."""
    ruled_out: dict[str, dict[str, int]] = field(default_factory=dict)
    """Dimension -> choice -> the peak (bytes) that ruled it out: the formula's least of any
    recipe with it, or the replay's of that recipe where trials are held to the replay."""
    unsupported: dict[str, dict[str, str]] = field(default_factory=dict)
    """Dimension -> choice -> why the model cannot run it."""
    ruled_out_models: dict[str, dict[str, str]] = field(default_factory=dict)
    """Dimension -> ruled out (or over_budget) choice -> the memory model whose peak ruled it
    out (none stored: the formula, as studies were sized before)."""
    over_budget: dict[str, dict[str, int]] = field(default_factory=dict)
    """Dimension -> choice the study searches (fitting) that no recipe fits the budget with
    now -> the peak that rules it out: a study resumed under a smaller budget still samples
    it (Optuna keeps a study's choices), and its trials are recorded as over the budget
    without a probe."""
    kept_out: dict[str, list[str]] = field(default_factory=dict)
    """Dimension -> choice of the space file the study does not search though a recipe fits
    the budget with it now (the study was sized under a smaller budget, or the space file
    gained it): Optuna keeps a study's choices."""
    budget_bytes: int | None = None
    """The budget the run that recorded them sized the space under: what rules out the
    ruled_out and over_budget choices, and what the kept_out ones fit (None: a study from
    before it was stored, sized under its budget)."""


SPACE_CHOICES_ATTR = "space_choices"
RULED_OUT_CHOICES_ATTR = "ruled_out_choices"
RULED_OUT_MODELS_ATTR = "ruled_out_models"
UNSUPPORTED_CHOICES_ATTR = "unsupported_choices"
OVER_BUDGET_CHOICES_ATTR = "over_budget_choices"
KEPT_OUT_CHOICES_ATTR = "kept_out_choices"
SIZED_UNDER_ATTR = "space_choices_budget"


def record_space_choices(study: Any, choices: SpaceChoices) -> None:
    study.set_user_attr(SPACE_CHOICES_ATTR, choices.fitting)
    study.set_user_attr(RULED_OUT_CHOICES_ATTR, choices.ruled_out)
    if choices.ruled_out_models:
        study.set_user_attr(RULED_OUT_MODELS_ATTR, choices.ruled_out_models)
    if choices.unsupported or study.user_attrs.get(UNSUPPORTED_CHOICES_ATTR):
        study.set_user_attr(UNSUPPORTED_CHOICES_ATTR, choices.unsupported)
    if choices.over_budget or study.user_attrs.get(OVER_BUDGET_CHOICES_ATTR):
        study.set_user_attr(OVER_BUDGET_CHOICES_ATTR, choices.over_budget)
    if choices.kept_out or study.user_attrs.get(KEPT_OUT_CHOICES_ATTR):
        study.set_user_attr(KEPT_OUT_CHOICES_ATTR, choices.kept_out)
    if choices.budget_bytes is not None:
        study.set_user_attr(SIZED_UNDER_ATTR, choices.budget_bytes)


def space_choices(study: Any) -> SpaceChoices | None:
    """None for a study that stored no choices (its space file was searched whole)."""
    attrs = study.user_attrs
    if not attrs.get(SPACE_CHOICES_ATTR):
        return None
    return SpaceChoices(
        attrs[SPACE_CHOICES_ATTR],
        attrs.get(RULED_OUT_CHOICES_ATTR) or {},
        attrs.get(UNSUPPORTED_CHOICES_ATTR) or {},
        attrs.get(RULED_OUT_MODELS_ATTR) or {},
        attrs.get(OVER_BUDGET_CHOICES_ATTR) or {},
        attrs.get(KEPT_OUT_CHOICES_ATTR) or {},
        attrs.get(SIZED_UNDER_ATTR),
    )
