"""Rank correlation, noise groups and successive halving (autotune.fidelity), against cases
worked out by hand."""

from __future__ import annotations

import math

import pytest

from autotune.fidelity import indistinguishable_groups, ranks, spearman_rho, successive_halving


def test_ranks_share_the_mean_rank_on_ties():
    assert ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]


def test_spearman_rho_against_hand_computed_cases():
    assert spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped neighbour pair among 4: 1 - 6 * (1 + 1) / (4 * (16 - 1)) = 0.8
    assert spearman_rho([0.1, 0.2, 0.3, 0.4], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.8)
    # ties: ranks x = (1.5, 1.5, 3), y = (1, 2, 3), both of mean 2; deviations (-.5, -.5, 1)
    # and (-1, 0, 1): covariance 1.5, spreads sqrt(1.5) and sqrt(2)
    assert spearman_rho([5, 5, 7], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(1.5 * 2))
    assert math.isnan(spearman_rho([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman_rho([1], [1])


def test_recipes_within_the_noise_form_one_group():
    losses = {7: 1.50, 3: 1.52, 9: 1.60, 4: 1.61, 1: 2.0}
    assert indistinguishable_groups(losses, noise=0.03) == [[7, 3], [9, 4], [1]]
    assert indistinguishable_groups(losses, noise=0.0) == [[7], [3], [9], [4], [1]]
    assert indistinguishable_groups(losses, noise=1.0) == [[7, 3, 9, 4, 1]]


def test_successive_halving_keeps_the_better_half():
    assert successive_halving({"a": 3.0, "b": 1.0, "c": 2.0, "d": 4.0}) == ["b", "c"]
    assert successive_halving({"a": 3.0, "b": 1.0, "c": 2.0}) == ["b"]
    assert successive_halving({"a": 1.0}) == ["a"]
