"""How much of its space a study has tried. Once every recipe of the space has a complete trial
(measured, over the budget, refused, out of memory...: what a repeat of it would copy), the
sampler can only propose repeats, so a run stops there as at its target of trials.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autotune.study.records import finished_trial_count
from autotune.study.study_records import stored_count
from autotune.units import count_of

if TYPE_CHECKING:
    from autotune.space import SearchSpace

SPACE_POINTS_LIMIT = 100_000
"""A space with more recipes than this is not counted (nor would a run try them all)."""

SPACE_TRIED_ATTR = "space_tried_recipes"
"""Study attribute: the count of the space's recipes, once a run found every one tried."""
SPACE_UNTRIED_ATTR = "space_untried_recipes"
"""Study attribute: the space's recipes without a complete trial, as the latest run counted them
when it started and as each of its trials ended (None where it could not count its space): the
figure its progress bar was bounded by (trials_left), which status, studies and the report
show."""

SpacePoint = tuple[tuple[str, Any], ...]


def point_of(params: dict[str, Any]) -> SpacePoint:
    """A trial's parameters as one hashable point: two trials are one recipe when their
    parameters are equal, as a repeat is found (objective._earlier_trial_with_params)."""
    return tuple(sorted(params.items()))


def space_points(space: SearchSpace) -> frozenset[SpacePoint] | None:
    """The distinct trial parameters of `space` (a conditional dimension counts only where it
    applies); None past SPACE_POINTS_LIMIT."""
    points: set[SpacePoint] = set()
    for params in space.all_params():
        points.add(point_of(params))
        if len(points) > SPACE_POINTS_LIMIT:
            return None
    return frozenset(points)


def untried_points(study: Any, points: frozenset[SpacePoint] | None) -> int | None:
    """How many of `points` have no complete trial in the study's storage yet (any run's, any
    worker's; None: the space is not counted); a failed trial does not count: a repeat of it
    is probed again."""
    from optuna.trial import TrialState

    if points is None:
        return None
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return len(points - {point_of(t.params) for t in complete})


def space_used_up(study: Any, points: frozenset[SpacePoint] | None) -> bool:
    """Whether every point has a complete trial in the study's storage."""
    return untried_points(study, points) == 0


def trials_left(study: Any, points: frozenset[SpacePoint] | None, target: int) -> int:
    """The most trials a run can still add to the study: `target` (--trials) less the trials
    the storage holds finished (every run's and worker's), and no more than the space's
    recipes without a complete trial where they are counted, since the run stops once each
    has one. (A trial the sampler proposes again copies its recipe's figures and counts among
    the finished, so after one this can stay where it was.) The untried count it bounds by is
    stored (SPACE_UNTRIED_ATTR), so that status and the run's progress bar say one figure; a
    space tried whole before that has untried recipes now (a resume searches a dimension more)
    is no longer said to be tried."""
    left = max(target - finished_trial_count(study), 0)
    untried = untried_points(study, points)
    study.set_user_attr(SPACE_UNTRIED_ATTR, untried)
    if untried and space_tried(study) is not None:
        study.set_user_attr(SPACE_TRIED_ATTR, None)
    return left if untried is None else min(left, untried)


def untried_recipes(study: Any) -> int | None:
    """The space's recipes without a complete trial, as its latest run counted them at its
    start or its latest trial's end (None: not counted): the run's trials_left, not a count of
    its own; a recipe tried under a space that has changed since (a resume that searches
    another dimension) is not one of the space's now."""
    return stored_count(study, SPACE_UNTRIED_ATTR)


def record_space_tried(study: Any, recipes: int) -> None:
    """Every recipe of the study's space has been tried: true until a resumed run's space
    searches a dimension the study did not (trials_left clears it)."""
    study.set_user_attr(SPACE_TRIED_ATTR, recipes)


def space_tried(study: Any) -> int | None:
    """The count of the space's recipes where every one has been tried, else None."""
    return stored_count(study, SPACE_TRIED_ATTR)


def space_tried_words(recipes: int) -> str:
    return f"every one of the space's {count_of(recipes, 'recipe')} has been tried"
