import pytest

from autotune.pareto import Point, dominates, frontier, pick

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
