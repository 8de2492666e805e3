"""What a job costs in privacy, computed with Opacus's accountants.

A node calibrates one noise multiplier for the whole job so that all its rounds
together spend the job's ε at the job's δ. Every round is one Opacus accountant
history entry ``(noise_multiplier, sample_rate, steps)``; lifetime spend is the
composition of all entries in the node's ledger, again by Opacus.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis
from opacus.accountants.utils import get_noise_multiplier

from fedtrain.spec import JobSpec


@dataclass(frozen=True)
class RoundPlan:
    """The DP-SGD parameters of one round on one node: one accountant history entry."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def as_history(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    # Opacus's Poisson loader keeps the loader's length and samples each example
    # with rate 1/len, so this is both the step count and the inverse sample rate.
    return max(1, math.ceil(num_examples / batch_size))


def expected_batch_size(plan: RoundPlan, dataset_size: int) -> int:
    """The batch size DP-SGD averages by: public (the declared dataset size times the sample
    rate), since dividing by a count of the real rows would scale the release by a statistic
    of the data."""
    return max(1, round(dataset_size * plan.sample_rate))


def plan_round(spec: JobSpec, num_examples: int) -> RoundPlan:
    """The noise, sample rate and steps a node uses for each round of ``spec``.

    Deterministic in (spec, dataset size): the node's pre-check, its training and
    its ledger all derive the same numbers. A node passes the size its policy declares,
    so that none of them depends on its data.
    """
    if num_examples < 1:
        raise ValueError("a node needs at least one example to train")
    per_epoch = batches_per_epoch(num_examples, spec.training.batch_size)
    steps = per_epoch * spec.training.local_epochs
    sigma = _noise(spec.privacy.epsilon, spec.privacy.delta, 1.0 / per_epoch, steps * spec.training.rounds,
                   spec.privacy.accountant)
    return RoundPlan(noise_multiplier=sigma, sample_rate=1.0 / per_epoch, steps=steps)


@functools.lru_cache(maxsize=256)
def _noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    # Calibration is a search over Opacus's accountant (seconds): once per set of DP parameters.
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant=accountant))


def epsilon(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """ε of the composition of accountant history entries at ``delta`` (0 if empty).

    The same number as Opacus's ``RDPAccountant`` over ``history``, which sums
    ``compute_rdp(q, σ, steps)`` over the entries and converts at the best order; since that
    is ``steps`` times the one-step curve, the curve of each (σ, q) is computed once per
    process (about 0.1 s) and every later ε costs a sum and Opacus's conversion.
    """
    total = None
    for sigma, rate, n in history:
        curve = n * _one_step_rdp(sigma, rate)
        total = curve if total is None else total + curve
    if total is None:
        return 0.0
    eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=total, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def _one_step_rdp(sigma: float, rate: float) -> np.ndarray:
    curve = privacy_analysis.compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.flags.writeable = False  # shared by every caller through the cache
    return curve
