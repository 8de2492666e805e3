"""DP-SGD training of one round on a node, with Opacus.

One entry point, :func:`train_private`: it trains with the round's planned noise
and sample rate and returns what Opacus's own accountant recorded, which is
what the node charges to its ledger. Only trainable parameters are wrapped: a
frozen base model (LoRA) gets no per-example gradients and no noise.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import Dataset

from fedtrain.models import loss_fn
from fedtrain.privacy.accounting import RoundPlan
from fedtrain.spec import JobSpec
from fedtrain.training import loader, run_epochs, sgd


@dataclass(frozen=True)
class PrivateRound:
    loss: float
    plan: RoundPlan  # as recorded by Opacus's accountant, not as requested


def train_private(
    model: nn.Module, dataset: Dataset, spec: JobSpec, plan: RoundPlan, proximal_mu: float = 0.0
) -> PrivateRound:
    """Train ``model`` in place for one round of DP-SGD (Poisson sampling, flat clipping).

    ``proximal_mu`` > 0 adds FedProx's proximal pull towards the round's starting
    weights. It is applied after the noisy step: it does not touch the data, so it
    is post-processing and costs no privacy.
    """
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    global_weights = [p.detach().clone() for p in trainable]
    # Noise and batch sampling must be unpredictable. Opacus's secure_mode needs torchcsprng
    # (no build for this torch), so both RNGs are seeded from the OS's CSPRNG instead;
    # Opacus's Poisson sampler draws from the process's RNG.
    torch.manual_seed(secrets.randbits(63))
    engine = PrivacyEngine(accountant=spec.privacy.accountant)
    dp_model, optimizer, dp_loader = engine.make_private(
        module=model,
        optimizer=sgd(model, spec.training),
        data_loader=loader(dataset, spec.training.batch_size),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=spec.privacy.max_grad_norm,
        poisson_sampling=True,
        noise_generator=torch.Generator().manual_seed(secrets.randbits(63)),
    )
    lr = spec.training.learning_rate

    def proximal_pull() -> None:
        with torch.no_grad():
            for p, g in zip(trainable, global_weights):
                p.sub_(lr * proximal_mu * (p - g))

    def empty_batch() -> None:
        # No example drawn: zero per-example gradients, so the step adds noise only.
        for p in trainable:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)

    loss, _ = run_epochs(
        dp_model, optimizer, dp_loader, spec.training.local_epochs, loss_fn(spec),
        proximal_pull if proximal_mu > 0 else None, empty_batch,
    )
    history = engine.accountant.history
    # One (noise, rate, steps) entry, since noise and rate are fixed for the round.
    (sigma, rate, steps), = history
    return PrivateRound(loss=loss, plan=RoundPlan(noise_multiplier=sigma, sample_rate=rate, steps=steps))
