"""The one Pareto-front rule (moesim.memory.sweep.pareto_front): ties kept, brute-force equal."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.memory.sweep import pareto_front


def brute_force(cost, value):
    """A point is on the front unless another has cost <= and value >= with one strict (O(n^2))."""
    cost, value = np.asarray(cost, float), np.asarray(value, float)
    return np.array([not ((cost <= c) & (value >= v) & ((cost < c) | (value > v))).any()
                     for c, v in zip(cost, value)], dtype=bool)


def test_identical_points_are_all_kept():
    cost = [1, 2, 2, 3, 1, 2]
    value = [10, 5, 20, 15, 10, 20]
    # (1, 10) twice and (2, 20) twice are non-dominated: every copy is on the front
    assert pareto_front(cost, value).tolist() == [True, False, True, False, True, True]


def test_equal_cost_or_equal_value_is_dominated_by_the_better_one():
    assert pareto_front([1, 1], [5, 6]).tolist() == [False, True]   # same cost, lower value
    assert pareto_front([1, 2], [5, 5]).tolist() == [True, False]   # same value, higher cost
    assert pareto_front([1, 2, 3, 2], [10, 20, 15, 5]).tolist() == [True, True, False, False]


def test_edges():
    assert pareto_front([], []).tolist() == []
    assert pareto_front([3.0], [-np.inf]).tolist() == [True]
    assert pareto_front([0, 1], [-np.inf, -np.inf]).tolist() == [True, False]
    with pytest.raises(ValueError, match="value is NaN at index 1"):
        pareto_front([1, 2], [3, np.nan])
    with pytest.raises(ValueError, match="cost has 2 points but value has 3"):
        pareto_front([1, 2], [3, 4, 5])


# small integers make ties (equal cost, equal value, identical points) frequent
POINTS = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), max_size=40)
FLOATS = st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.one_of(POINTS, FLOATS))
def test_matches_brute_force_on_random_points(points):
    cost = [p[0] for p in points]
    value = [p[1] for p in points]
    assert pareto_front(cost, value).tolist() == brute_force(cost, value).tolist()


@settings(max_examples=100, deadline=None)
@given(POINTS, st.randoms(use_true_random=False))
def test_front_does_not_depend_on_order(points, rnd):
    order = list(range(len(points)))
    rnd.shuffle(order)
    cost = np.array([p[0] for p in points], float)
    value = np.array([p[1] for p in points], float)
    assert pareto_front(cost[order], value[order]).tolist() == pareto_front(cost, value)[order].tolist()
