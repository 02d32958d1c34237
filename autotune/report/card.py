"""The report's answer, computed before it is drawn: each pick of the frontier against the QLoRA
default (speed, eval loss, each change told from the measured noise), whether it held up on
confirmation, what one epoch of the study's data takes at its speed, and how to train it.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autotune.pareto import PICK_POLICIES, Point
from autotune.report.frame import MEASURED
from autotune.study.ranking import QualityRanking, pick_note, pick_number
from autotune.study.study_records import Noise


@dataclass(frozen=True)
class PickCard:
    """One recipe of the frontier and the picks that chose it (balanced first)."""

    picks: tuple[str, ...]
    trial: int
    recipe: str
    peak_memory_bytes: float
    tokens_per_second: float
    eval_loss: float
    held_up: bool | None
    """None where the recipe was not confirmed."""
    confirmation: str | None = None
    """The confirmation's verdict and what it rests on; None where there was none."""
    speedup: float | None = None
    """Tokens/s over the QLoRA default's; None where the default was not measured or this is it."""
    eval_loss_change: float | None = None
    speed_beyond_noise: bool | None = None
    loss_beyond_noise: bool | None = None
    """Whether the change exceeds what the noise probe saw; None without a noise probe."""
    epoch_seconds: float | None = None
    default_epoch_seconds: float | None = None
    """One epoch of the study's training tokens at this speed and at the default's."""
    is_default: bool = False
    """This is the QLoRA default itself."""
    longer_probe: tuple[int, float] | None = None
    """(steps, eval loss) of its longest promoted probe (--promote); None if not promoted."""
    change_at_steps: int | None = None
    """The probe length eval_loss_change compares at, where both were promoted to a longer one
    than the study's probe (None: the study's probe)."""
    pick_notes: tuple[str, ...] = ()
    """How the measured noise decided a pick of it (ranking.pick_note), where it did."""


def pick_cards(
    frame: Any,
    points: Sequence[Point],
    ranking: QualityRanking,
    noise: Noise | None,
    train_tokens: int | None,
) -> list[PickCard]:
    """One card per distinct recipe the pick policies choose from the measured `points` by
    their quality `ranking`, in PICK_POLICIES order."""
    if not points or not len(frame):
        return []
    chosen: dict[int, list[str]] = {}
    for policy in PICK_POLICIES:
        chosen.setdefault(pick_number(policy, points, ranking), []).append(policy)
    rows = frame.set_index("trial")
    default = frame[(frame["baseline"] == "qlora_default") & (frame["status"] == MEASURED)]
    base = default.iloc[0] if len(default) else None
    return [
        dataclasses.replace(
            _card(rows.loc[number], number, tuple(policies), base, noise, train_tokens, ranking),
            pick_notes=tuple(
                note for p in policies if (note := pick_note(p, points, ranking)) is not None
            ),
        )
        for number, policies in chosen.items()
    ]


def _card(
    row: Any,
    number: int,
    picks: tuple[str, ...],
    base: Any,
    noise: Noise | None,
    train_tokens: int | None,
    ranking: QualityRanking,
) -> PickCard:
    speed, loss = float(row["tokens_per_second"]), float(row["eval_loss"])
    held = row["held_up"]
    confirmation = row.get("confirmation")  # a missing one reads back as NaN, not None
    card = PickCard(
        picks,
        number,
        str(row["recipe"]),
        float(row["peak_memory_bytes"]),
        speed,
        loss,
        None if held is None or held != held else bool(held),
        epoch_seconds=train_tokens / speed if train_tokens and speed else None,
        is_default=bool(row["baseline"] == "qlora_default"),
        longer_probe=ranking.longest(number),
        confirmation=confirmation if isinstance(confirmation, str) else None,
    )
    if base is None or int(base["trial"]) == number:
        return card
    base_speed, base_loss = float(base["tokens_per_second"]), float(base["eval_loss"])
    speedup = speed / base_speed if base_speed else None
    change = loss - base_loss
    change_at_steps = None
    common = ranking.common(number, int(base["trial"]))
    if common is not None and common[0] != ranking.steps[0]:
        change_at_steps, change = common[0], common[1] - common[2]
    speed_noise = noise.tokens_per_second_change if noise else None
    return dataclasses.replace(
        card,
        speedup=speedup,
        eval_loss_change=change,
        change_at_steps=change_at_steps,
        # a change the size of the noise is chance (the tolerance: float rounding)
        loss_beyond_noise=None
        if noise is None
        else abs(change) > noise.eval_loss_difference + 1e-9,
        speed_beyond_noise=None
        if speed_noise is None or speedup is None
        else abs(speedup - 1) > abs(speed_noise) + 1e-9,
        default_epoch_seconds=train_tokens / base_speed if train_tokens and base_speed else None,
    )


def study_command(command: str, study_name: str, storage_url: str | None) -> str:
    """`autotune COMMAND` on this study (its storage named where it is not the default)."""
    storage = f" --storage {shlex.quote(storage_url)}" if storage_url else ""
    return f"autotune {command} --study {shlex.quote(study_name)}{storage}"


def export_command(
    study_name: str, storage_url: str | None, pick_name: str, output: str | None = None
) -> str:
    pick_flag = "" if pick_name == "balanced" else f" --pick {pick_name}"
    out = f" --output {shlex.quote(output)}" if output else ""
    return f"{study_command('export', study_name, storage_url)}{pick_flag}{out}"


def train_commands(
    study_name: str, data_path: str, recipe_path: str, exported: bool, storage_url: str | None
) -> list[str]:
    """How to train the balanced pick: from its exported recipe, after the export that writes
    it where none was written."""
    from autotune.study.settings import study_file_name

    commands = (
        [] if exported else [export_command(study_name, storage_url, "balanced", recipe_path)]
    )
    output = f"outputs/{study_file_name(study_name)}"
    commands.append(
        f"autotune train --recipe {shlex.quote(recipe_path)} "
        f"--data {shlex.quote(data_path or 'DATA')} --output {shlex.quote(output)}"
    )
    return commands


def study_train_command(study: Any, recipe_path: str) -> str:
    """The `autotune train` command of a recipe exported from `study`, on the study's data."""
    from autotune.study.study_records import study_setup

    data_path = study_setup(study).data_path
    return train_commands(study.study_name, data_path, recipe_path, True, None)[-1]


def format_seconds(seconds: float) -> str:
    """A duration as people say it: '42 s', '12 min', '3 h 05 min', '2.5 days'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"{hours} h {minutes:02d} min"
    return f"{seconds / 86400:.1f} days"


def frontier_frame(frame: Any, cards: list[PickCard] | tuple[PickCard, ...]) -> Any:
    """The frontier's rows, fastest first, with the picks that chose each and its speed and eval
    loss against the QLoRA default."""
    if not len(frame):
        return frame
    front = frame[frame["on_frontier"]].sort_values("tokens_per_second", ascending=False).copy()
    default = frame[(frame["baseline"] == "qlora_default") & (frame["status"] == MEASURED)]
    picks = {card.trial: ", ".join(card.picks) for card in cards}
    front["picks"] = [picks.get(int(n), "") for n in front["trial"]]
    if len(default):
        base = default.iloc[0]
        front["speedup"] = front["tokens_per_second"] / base["tokens_per_second"]
        front["eval_loss_change"] = front["eval_loss"] - base["eval_loss"]
    return front
