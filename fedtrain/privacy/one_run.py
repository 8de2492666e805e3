"""The ε lower bound of a one-run privacy audit (Steinke, Nasr and Jagielski, "Privacy
auditing with one (1) training run", NeurIPS 2023).

The audit inserts each of ``m`` canaries independently with probability 1/2, trains
once, and guesses for ``r`` of them (the highest and lowest scores) whether they were
in. Under (ε, δ)-DP the number of correct guesses ``v`` is, up to a δ term, no more
likely to be large than a Binomial(r, e^ε / (1 + e^ε)) (their Theorem 5.2). So the
p-value of observing ``v`` if the training were (ε, δ)-DP is (their Proposition 5.7 and
the code of their Appendix D):

    q = e^ε / (1 + e^ε)
    β = P[Binomial(r, q) ≥ v]
    α = max over 1 ≤ i ≤ v of P[v − i ≤ Binomial(r, q) < v] / i
    p(ε) = β + 2 m δ α

and the bound at confidence c is the largest ε whose p-value is still below 1 − c: a
claim of a smaller ε is refuted at that confidence. The bound is at most what ``m``
canaries can show (all ``r`` guesses right), however leaky the training.
"""

from __future__ import annotations

import math

from scipy.stats import binom


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The chance of at least ``v`` correct guesses out of ``r`` (of ``m`` canaries) if the
    training were (ε, δ)-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, not {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))
    alpha, below = 0.0, 0.0  # below: P[v - i <= Binomial(r, q) < v]
    for i in range(1, v + 1):
        below += float(binom.pmf(v - i, r, q))
        alpha = max(alpha, below / i)
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that ``v`` correct guesses out of ``r`` refute at ``confidence``
    (0 when they refute none)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), not {confidence}")
    threshold = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= threshold:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < threshold:
        low, high = high, 2 * high
    for _ in range(50):  # bisection to well below any ε a report prints
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < threshold:
            low = mid
        else:
            high = mid
    return low
