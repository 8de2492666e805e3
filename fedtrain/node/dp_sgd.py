"""DP-SGD training of one round on a node, with Opacus.

:func:`train_round`, which ``fedtrain.node.round.PrivateRound.train`` runs: from the
global model's trainable tensors it trains one round with the planned noise and sample
rate, checks that Opacus's own accountant recorded exactly that plan (what the node
charges to its ledger) and that only the job's trainable tensors come out. Only
trainable parameters are wrapped: a frozen base model (LoRA) gets no per-example
gradients and no noise.
"""

from __future__ import annotations

import functools
import logging
import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import wrap_data_loader
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, default_collate

from fedtrain.errors import FedtrainError
from fedtrain.models import build_model, example_losses, load_trainable_state, loss_fn, trainable_state
from fedtrain.protocol.codec import manifest_of
from fedtrain.privacy.accounting import RoundPlan
from fedtrain.spec import JobSpec
from fedtrain.node.training import make_optimizer, run_epochs

log = logging.getLogger("fedtrain.node")


@dataclass(frozen=True)
class TrainedRound:
    loss: float      # a statistic of the data without noise: it stays on the node
    plan: RoundPlan  # as recorded by Opacus's accountant, not as requested


@dataclass(frozen=True)
class LocalUpdate:
    arrays: dict[str, np.ndarray]  # the trained trainable tensors: the only release
    loss: float


def _poisson_loader(dataset: TensorDataset, sample_rate: float) -> DataLoader:
    """Batches that hold each row independently with probability ``sample_rate``, for
    ``round(1 / sample_rate)`` steps an epoch, whatever the number of rows (none included):
    the sampling rate is the plan's, not the data's."""
    if len(dataset):
        sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=sample_rate)
    else:  # Opacus's sampler refuses zero rows; the steps (all empty) must still be taken
        sampler = [[]] * int(1 / sample_rate)
    empty = tuple(t[:0] for t in dataset.tensors)

    def collate(rows: list) -> tuple[torch.Tensor, ...]:
        return default_collate(rows) if rows else empty

    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


@functools.cache
def _explain_known_warnings() -> None:
    """Opacus and torch warn about two things in every round that are understood here: silence
    exactly those two, and say once per process, in our words, why."""
    warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
    warnings.filterwarnings("ignore", category=UserWarning, message="Full backward hook is firing when gradients are"
                            " computed with respect to module outputs since no inputs require gradients")
    log.warning("Opacus's secure RNG is off (its secure_mode needs torchcsprng, which has no build for this torch):"
                " DP noise and batch sampling come from torch generators seeded from the OS CSPRNG every round"
                " (SECURITY.md)")
    log.info("torch's 'full backward hook is firing' warning is silenced: it says that no input needs a gradient,"
             " and none does (the inputs are data); Opacus's per-example gradients use the layers' output gradients")


def grad_sample_mode(spec: JobSpec) -> str:
    """How Opacus finds per-example gradient norms for ``spec``: its ``training.grad_sample_mode``,
    where auto means ghost clipping for the tabular models, whose dense layers make
    per-example gradients costly (measured: bench tabular), and hooks for a transformer's
    adapter, whose per-example gradients are small while ghost clipping's second backward
    runs through the whole frozen base (bench lora, bench llm)."""
    mode = spec.training.grad_sample_mode
    if mode == "auto":
        return "hooks" if spec.model.kind == "transformer" else "ghost"
    return mode


def train_private(model: nn.Module, dataset: TensorDataset, spec: JobSpec, plan: RoundPlan,
                  batch_size: int, device: torch.device = torch.device("cpu")) -> TrainedRound:
    """Train ``model`` in place for one round of DP-SGD (Poisson sampling, flat clipping).

    Every value that steers the round is public: the plan (from the spec and the node's
    declared dataset size), ``batch_size`` (see ``accounting.expected_batch_size``) and the spec.
    FedProx's ``strategy.params.proximal_mu`` > 0 adds its proximal pull towards the
    round's starting weights after each noisy step: it does not touch the data, so it is
    post-processing and costs no privacy. ``training.physical_batch_size`` splits each
    logical batch (Opacus's BatchMemoryManager): the same steps and noise, in less memory.
    """
    model.to(device).train()
    training = spec.training
    trainable = [p for p in model.parameters() if p.requires_grad]
    global_weights = [p.detach().clone() for p in trainable]
    proximal_mu = float(spec.strategy.params.get("proximal_mu", 0.0)) if spec.strategy.name == "fedprox" else 0.0
    mode = grad_sample_mode(spec)
    ghost = mode == "ghost"
    _explain_known_warnings()
    # Noise and batch sampling must be unpredictable. Opacus's secure_mode needs torchcsprng
    # (no build for this torch), so both RNGs are seeded from the OS's CSPRNG instead;
    # the Poisson sampler draws from the process's RNG, forked so that no caller's RNG moves.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(secrets.randbits(63))
        engine = PrivacyEngine(accountant=spec.privacy.accountant)
        # The loader already samples at the plan's rate: Opacus records 1 / len(loader) steps.
        # Ghost mode also returns a criterion wrapper, which our own loss replaces (below).
        dp_model, optimizer, *_, dp_loader = engine.make_private(
            module=model,
            optimizer=make_optimizer(model, training),
            data_loader=_poisson_loader(dataset, plan.sample_rate),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=spec.privacy.max_grad_norm,
            poisson_sampling=False,
            noise_generator=torch.Generator(device).manual_seed(secrets.randbits(63)),
            grad_sample_mode=mode,
        )
        optimizer.expected_batch_size = batch_size
        lr = training.learning_rate

        def proximal_pull() -> None:
            with torch.no_grad():
                for p, g in zip(trainable, global_weights):
                    p.sub_(lr * proximal_mu * (p - g))

        def empty_batch() -> None:
            # No example drawn: zero per-example gradients (ghost clipping: a zero clipped
            # sum), so the step adds noise only.
            for p in trainable:
                if ghost:
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

        losses = example_losses(spec)
        # Ghost clipping's loss runs its two backward passes (norms, then the clipped sum).
        loss = ((lambda m, b: DPTensorFastGradientClipping(m, optimizer, losses(m, b), "mean")) if ghost
                else loss_fn(spec))
        if training.physical_batch_size is not None:  # what BatchMemoryManager's context returns
            dp_loader = wrap_data_loader(data_loader=dp_loader, max_batch_size=training.physical_batch_size,
                                         optimizer=optimizer)
        result, _ = run_epochs(
            dp_model, optimizer, dp_loader, training.local_epochs, loss,
            proximal_pull if proximal_mu > 0 else None, empty_batch, device, training.precision,
        )
    history = engine.accountant.history
    # One (noise, rate, steps) entry, since noise and rate are fixed for the round.
    (sigma, rate, steps), = history
    return TrainedRound(loss=result, plan=RoundPlan(noise_multiplier=sigma, sample_rate=rate, steps=steps))


def train_round(spec: JobSpec, dataset: TensorDataset, start: dict[str, np.ndarray], plan: RoundPlan,
                batch_size: int, device: torch.device = torch.device("cpu")) -> LocalUpdate:
    """One node's round: the job's model from ``start``, trained under ``plan`` (see
    :func:`train_private`); raises FedtrainError, and nothing may be sent, if Opacus recorded
    another plan or the model holds other tensors than it started from."""
    model = build_model(spec)
    load_trainable_state(model, start)
    result = train_private(model, dataset, spec, plan, batch_size, device)
    if result.plan != plan:
        raise FedtrainError(f"training recorded {result.plan}, not the planned {plan}; nothing is sent")
    update = trainable_state(model)
    if manifest_of(update) != manifest_of(start):
        # Only the job's trainable tensors may leave: never a base-model tensor or an input.
        raise FedtrainError(f"the update holds {sorted(update)}, not the job's trainable tensors; nothing is sent")
    return LocalUpdate(arrays=update, loss=result.loss)
