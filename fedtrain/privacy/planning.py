"""``fedtrain job plan``: what a job's DP plan will be on a node of a given size, before it runs.

Each number is the one the node computes (``accounting.plan_round``) and later charges to
its ledger, from the spec and the node's declared dataset size alone. Next to them, what
the noise does to one step: its standard deviation per coordinate of the averaged gradient,
σ·C / E (E the expected logical batch), and its norm over the d trainable parameters
against the largest norm the clipped examples' mean can have (C), σ·√d / E. That ratio
is what sets how far DP training lands from non-private training; the warnings name the
regimes that measured poorly (README, "Tuning DP jobs").
"""

from __future__ import annotations

import math

from pydantic import BaseModel

from fedtrain.errors import FedtrainError
from fedtrain.privacy.accounting import epsilon, expected_batch_size, plan_round
from fedtrain.spec import JobSpec

# Above this, each step's noise outweighs the largest gradient the batch can carry. The
# MiniLM tweets job (bench utility, README) reached 0.85 of its non-private accuracy at 2.7
# (r = 4 on all layers, 500 rows a node), 0.72 at 1.5 (the tuned job at ε = 1) and 0.92-0.95
# at 0.3 (the tuned job at ε = 8).
NOISY = 1.0
# Logical batches this small give DP-SGD too little signal per noise draw, whatever ε.
SMALL_BATCH = 64
# σ this far above 1 means the job's ε is spread over too many steps.
LARGE_SIGMA = 3.0


class NodePlan(BaseModel):
    """One node's DP plan for a job: every round's noise, rate and steps, and what they cost."""

    examples: int
    noise_multiplier: float
    sample_rate: float
    expected_batch: int
    steps_per_round: int
    total_steps: int
    noise_std: float  # σ·C / E: per coordinate of a step's averaged gradient
    trainable_parameters: int | None  # None when the base model is not on this machine
    noise_to_signal: float | None  # σ·√d / E
    epsilon: float
    delta: float
    warnings: list[str]


def trainable_parameters(spec: JobSpec) -> int | None:
    """The parameters a node trains (and sends), or None if the base model is not on this machine."""
    from fedtrain.models import parameter_counts

    try:
        return parameter_counts(spec)[1]
    except FedtrainError:
        return None


def plan_node(spec: JobSpec, examples: int, trainable: int | None) -> NodePlan:
    """The plan a node declaring ``examples`` rows will train and charge under for ``spec``,
    which trains ``trainable`` parameters (see :func:`trainable_parameters`)."""
    plan = plan_round(spec, examples)
    batch = expected_batch_size(plan, examples)
    rounds = spec.training.rounds
    ratio = None if trainable is None else plan.noise_multiplier * math.sqrt(trainable) / batch
    warnings = []
    if batch < SMALL_BATCH:
        warnings.append(f"logical batch of {batch} examples is small: raise training.batch_size towards the node's"
                        f" {examples:,} rows and use physical_batch_size to bound memory")
    if plan.noise_multiplier > LARGE_SIGMA:
        warnings.append(f"noise multiplier {plan.noise_multiplier:.2f} is far above 1: {plan.steps * rounds} steps"
                        " share the budget; take fewer rounds or local_epochs, or larger batches")
    if ratio is not None and ratio > NOISY:
        warnings.append(f"noise-to-signal {ratio:.2f} is above {NOISY:g}: each step's noise outweighs its gradient;"
                        " expect accuracy well below non-private (fewer trainable parameters, larger batches or"
                        " more rows help)")
    return NodePlan(
        examples=examples, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
        expected_batch=batch, steps_per_round=plan.steps, total_steps=plan.steps * rounds,
        noise_std=plan.noise_multiplier * spec.privacy.max_grad_norm / batch, trainable_parameters=trainable,
        noise_to_signal=ratio, epsilon=epsilon([plan.as_history()] * rounds, spec.privacy.delta),
        delta=spec.privacy.delta, warnings=warnings,
    )
