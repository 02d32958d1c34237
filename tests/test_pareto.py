import pytest

from autotune.pareto import (
    Point,
    best_loss_candidates,
    best_loss_note,
    dominates,
    frontier,
    pick,
)

POINTS = [
    Point(0, 10e9, 1000, 1.00),  # small and slow
    Point(1, 20e9, 5000, 1.02),  # fast
    Point(2, 15e9, 3000, 0.95),  # best loss, middle
    Point(3, 21e9, 4000, 1.10),  # dominated by 1
    Point(4, 12e9, 2900, 0.96),  # balanced
]


def test_frontier_drops_dominated_points():
    assert dominates(POINTS[1], POINTS[3])
    assert {p.number for p in frontier(POINTS)} == {0, 1, 2, 4}
    assert frontier(POINTS)[0].number == 1  # fastest first


@pytest.mark.parametrize(
    ("policy", "number"),
    [("fastest", 1), ("smallest", 0), ("best-loss", 2), ("balanced", 4)],
)
def test_pick_policies(policy, number):
    assert pick(POINTS, policy).number == number


def test_pick_needs_points_and_a_known_policy():
    with pytest.raises(ValueError):
        pick([], "fastest")
    with pytest.raises(ValueError):
        pick(POINTS, "cheapest")


NEAR_TIES = [
    Point(1, 310 * 2**20, 50, 6.0154),  # the lowest eval loss, slow and large
    Point(6, 207 * 2**20, 85, 6.0156),  # 0.0002 above it, faster and smaller
    Point(3, 132 * 2**20, 2800, 6.1026),  # far above it
]


def test_best_loss_takes_the_fastest_within_the_measured_noise():
    assert pick(NEAR_TIES, "best-loss", noise=0.0004).number == 6
    assert pick(NEAR_TIES, "best-loss", noise=0.0001).number == 1  # 6 is beyond this noise
    assert pick(NEAR_TIES, "best-loss").number == 1  # no noise probe: the lowest, as before
    front = frontier(NEAR_TIES)
    assert [p.number for p in best_loss_candidates(front, noise=0.0004)] == [1, 6]
    assert best_loss_note(best_loss_candidates(front, noise=0.0004), 0.0004) == (
        "lowest eval loss within the measured noise (0.0004): trials 1, 6; the fastest taken"
    )
    assert best_loss_note(best_loss_candidates(front, noise=0.0001), 0.0001) is None
    assert best_loss_note(best_loss_candidates(front), None) is None
    # equally fast: the least memory, then the lower trial number
    tied = [Point(7, 12e9, 2000, 1.0), Point(5, 11e9, 2000, 1.001), Point(6, 11e9, 2000, 1.002)]
    assert pick(tied, "best-loss", noise=0.01).number == 5


def test_best_loss_compares_with_the_noise_at_the_longest_probe_both_reached():
    # trial 1 was promoted to a longer probe and leads; trial 6, faster, was not: the two
    # compare at the probe both reached (6.0154 against 6.0156)
    ladders = {1: [6.0154, 5.90], 6: [6.0156], 3: [6.1026]}
    assert pick(NEAR_TIES, "best-loss", ladders).number == 1
    assert pick(NEAR_TIES, "best-loss", ladders, noise=0.0004).number == 6
    # promoted together, 6 lies beyond the noise on the longer probe
    ladders = {1: [6.0154, 5.90], 6: [6.0156, 5.95], 3: [6.1026]}
    assert pick(NEAR_TIES, "best-loss", ladders, noise=0.0004).number == 1
    assert pick(NEAR_TIES, "best-loss", ladders, noise=0.06).number == 6
