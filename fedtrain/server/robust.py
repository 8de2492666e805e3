"""What one node can do to the global model, bounded by public parameters only.

A node's plain update is the global model it was sent, moved by one round of DP-SGD.
How far one round can move it follows from the job's spec and the node's DP plan, so
the coordinator rejects what no honest node could have sent: first a plan that is not
the one the spec implies (:func:`check_plan`), then an update that moves the model
further than that plan can (:func:`update_bound`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedtrain.errors import WireError
from fedtrain.privacy.accounting import RoundPlan, plan_round
from fedtrain.spec import JobSpec

# Tail slack of the bound, in standard deviations: an honest round exceeds it with
# probability below exp(-_TAIL**2 / 2), about 1e-14.
_TAIL = 8.0
# How far a reported noise multiplier may be from the coordinator's own calibration:
# Opacus's search for it stops within a tolerance, which may differ between versions.
_NOISE_TOLERANCE = 1e-2


def check_plan(spec: JobSpec, plan: RoundPlan) -> None:
    """Raise ``WireError`` unless ``plan`` is one that ``plan_round`` gives for ``spec``.

    A plan depends on the node's dataset only through its batches per epoch ``k``: the
    sample rate is 1/k and the steps k·local_epochs, at most
    ``training.max_steps_per_round``, with the noise calibrated for them. The steps name
    ``k``; the rest must match.
    """
    cap, epochs = spec.training.max_steps_per_round, spec.training.local_epochs
    if not 1 <= plan.steps <= cap or plan.steps % epochs:
        raise WireError(f"steps {plan.steps} is not a multiple of training.local_epochs={epochs}"
                        f" between 1 and training.max_steps_per_round={cap}")
    k = plan.steps // epochs
    expected = plan_round(spec, k * spec.training.batch_size)
    if not (math.isclose(plan.sample_rate, expected.sample_rate, rel_tol=1e-9)
            and math.isclose(plan.noise_multiplier, expected.noise_multiplier, rel_tol=_NOISE_TOLERANCE)):
        raise WireError(
            f"the DP plan (noise-multiplier {plan.noise_multiplier:.6g}, sample-rate {plan.sample_rate:.6g},"
            f" steps {plan.steps}) is not the job's: {plan.steps} steps mean sample-rate"
            f" {expected.sample_rate:.6g} and noise-multiplier {expected.noise_multiplier:.6g}")


def update_bound(spec: JobSpec, plan: RoundPlan, start: Mapping[str, np.ndarray]) -> float:
    """The L2 norm by which one honest round of ``plan`` (from :func:`check_plan`) moves
    the trainable parameters ``start`` (the global model the node was sent), at most (with
    SGD, but for a chance of about 1e-14).

    Adam and AdamW normalise each coordinate's step, so each moves by at most
    lr·``TrainingSpec.adam_move(T)`` over T steps, whatever the data and the noise; AdamW's
    decoupled decay adds (1 − (1 − lr·wd)^T)·‖start‖. FedProx's pull only shrinks the move.

    One DP-SGD step (Opacus, flat clipping to C = ``privacy.max_grad_norm``, Poisson
    batch b_t) moves the parameters by lr·(Σ_{i∈b_t} clipped g_i + z_t)/E, with
    z_t ~ N(0, σ²C²I) and E the expected batch size Opacus divides by. The update is
    linear in these steps: SGD momentum m weighs each by at most f = (1−m^T)/(1−m) over
    T steps, and FedProx's proximal pull multiplies by 1 − lr·μ, which the spec keeps in
    [0, 1], so it only shrinks. Over T steps:

    - data: ≤ lr·f·C·Σ|b_t| / E. The plan was made for N examples (the node's rows, or
      the count its owner declares) in k = 1/q batches an epoch, so (k−1)·B < N ≤ k·B
      (B = ``training.batch_size``) and E, N/k rounded, is at least 1 and at least
      ⌊((k−1)·B + 1)/k⌋ − 1 (one less for float rounding). A node samples from at most
      N rows: at q = 1 each batch is all of them, Σ|b_t| ≤ T·E; otherwise Σ|b_t| is
      binomial with mean at most T·N·q ≤ T·B, and Bernstein's inequality bounds it by
      mean + 8√mean + 32 (Poisson batches can exceed E: this is the slack).
    - noise: Σ_t c_t·z_t with |c_t| ≤ f is Gaussian with variance at most T·f²·σ²C²
      per coordinate; its norm is below that deviation times √d + 8 (d = ``size``).

    Both terms hold whatever the data, so an honest update is always within the bound
    (up to the tail chances); the bound is loose by design (worst-case batches, all
    gradients aligned, the smallest E the plan allows), and within it a hostile update
    still moves the average: robust strategies (``StrategySpec``) bound that.
    """
    training = spec.training
    steps, batch = plan.steps, training.batch_size
    size = sum(a.size for a in start.values())
    if training.optimizer != "sgd":
        lr = training.learning_rate
        start_norm = math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in start.values()))
        decay = (1 - (1 - lr * training.weight_decay) ** steps) * start_norm
        return lr * training.adam_move(steps) * math.sqrt(size) + decay
    k = round(1 / plan.sample_rate)
    smallest_e = max(1, ((k - 1) * batch + 1) // k - 1)
    if k == 1:
        data = float(steps)  # Σ|b_t| / E
    else:
        mean = steps * batch
        data = min(steps * k * batch, mean + _TAIL * math.sqrt(mean) + _TAIL**2 / 2) / smallest_e
    noise = plan.noise_multiplier * math.sqrt(steps) * (math.sqrt(size) + _TAIL) / smallest_e
    momentum = (1 - training.momentum ** steps) / (1 - training.momentum)
    return training.learning_rate * spec.privacy.max_grad_norm * momentum * (data + noise)
