"""The one-run audit's ε lower bound (Steinke, Nasr and Jagielski 2023) against values
that follow from its definition in closed form."""

import math

import pytest
from scipy.stats import binom

from fedtrain.privacy.one_run import epsilon_lower_bound, p_value


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_guesses_right_at_delta_zero_give_the_closed_form_bound(r):
    # p(ε) = P[Binomial(r, q) ≥ r] = q^r; the bound solves q^r = 0.05, ε = log(q / (1 - q)).
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r, delta=0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-9)


def test_the_delta_term_is_two_m_delta_times_the_largest_average_tail():
    m, r, v, eps, delta = 1000, 100, 80, 1.0, 1e-5
    q = 1 / (1 + math.exp(-eps))
    alpha = max(sum(binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i for i in range(1, v + 1))
    assert p_value(m, r, v, eps, delta) == pytest.approx(binom.sf(v - 1, r, q) + 2 * m * delta * alpha)


def test_the_bound_grows_with_correct_guesses_and_shrinks_with_delta_and_confidence():
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # coin flipping refutes nothing
    bounds = [epsilon_lower_bound(1000, 100, v, 1e-5) for v in (60, 70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert epsilon_lower_bound(1000, 100, 90, 1e-3) < epsilon_lower_bound(1000, 100, 90, 1e-6)
    assert epsilon_lower_bound(1000, 100, 90, 1e-5, confidence=0.99) < epsilon_lower_bound(1000, 100, 90, 1e-5)


def test_the_bound_is_the_largest_epsilon_refuted_at_the_confidence():
    eps = epsilon_lower_bound(1000, 200, 170, 1e-5)
    assert p_value(1000, 200, 170, eps, 1e-5) < 0.05 <= p_value(1000, 200, 170, eps + 1e-6, 1e-5)


def test_impossible_counts_are_refused():
    with pytest.raises(ValueError, match="correct"):
        p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 5, 5, 0.0, confidence=1.0)
