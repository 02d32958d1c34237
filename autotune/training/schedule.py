"""The learning-rate schedule of `autotune train`: a linear warm-up to the recipe's
learning_rate (the peak), then cosine or linear decay to 0 at the run's last step, or none.

The factors multiply the peak (torch's LambdaLR); a checkpoint holds the scheduler's step, so
a resumed run continues on the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from autotune.recipe import WARMUP_FRACTION, Recipe


def warmup_steps(recipe: Recipe, total_steps: int) -> int:
    if recipe.warmup_steps is not None:
        return recipe.warmup_steps
    return max(1, int(total_steps * WARMUP_FRACTION))


def lr_factor(recipe: Recipe, total_steps: int) -> Callable[[int], float]:
    """Step (0-based) -> the share of learning_rate that step trains with."""
    warmup = warmup_steps(recipe, total_steps)
    decay_steps = max(1, total_steps - warmup)
    schedule = recipe.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / decay_steps)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "linear":
            return 1.0 - progress
        return 1.0  # constant

    return factor
