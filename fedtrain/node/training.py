"""Plain (non-private) training loop, shared by DP training and baselines, and the device
a job trains on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedtrain.errors import FedtrainError
from fedtrain.spec import TrainingSpec

Batch = tuple[torch.Tensor, ...]


def loader(dataset: Dataset, batch_size: int, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def training_device(requested: str, allowed: list[str]) -> torch.device:
    """The device a job asking for ``requested`` (auto, cpu, cuda) trains on, given the
    devices a node's policy allows. auto means CUDA when allowed and present, else the CPU."""
    cuda = "cuda" in allowed and torch.cuda.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "cpu")
    if requested not in allowed:
        raise FedtrainError(f"the job asks for device {requested}; the policy allows {allowed}")
    if requested == "cuda" and not cuda:
        raise FedtrainError("the job asks for device cuda and this machine has no CUDA device")
    return torch.device(requested)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's precision: bf16 under autocast, or float32 as the weights are."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def stepped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the last ``step()`` moved the weights: Opacus's optimizer only accumulates on
    a physical batch that does not end its logical batch (BatchMemoryManager)."""
    return not getattr(optimizer, "_is_last_step_skipped", False)


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DataLoader,
    epochs: int,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    after_step: Callable[[], None] | None = None,
    on_empty_batch: Callable[[], None] | None = None,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
) -> tuple[float, int]:
    """Train for ``epochs``; returns (mean training loss, optimizer steps taken).

    Poisson sampling can draw an empty batch. It still costs a (noise-only) step;
    ``on_empty_batch`` prepares that step instead of a forward pass, which some
    models cannot run on zero rows. ``after_step`` runs after each step that moved the
    weights (not after a physical batch that only accumulated).
    """
    model.train()
    total, seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        for batch in data:
            optimizer.zero_grad()
            size = len(batch[0])
            if size == 0 and on_empty_batch is not None:
                on_empty_batch()
            else:
                with autocast(device, precision):
                    loss = loss_fn(model, tuple(t.to(device) for t in batch))
                loss.backward()
                if size:
                    total += loss.item() * size
                    seen += size
            optimizer.step()
            if stepped(optimizer):
                steps += 1
                if after_step is not None:
                    after_step()
    return (total / seen if seen else float("nan")), steps


def make_optimizer(model: nn.Module, spec: TrainingSpec) -> torch.optim.Optimizer:
    """A fresh optimizer of ``spec.optimizer`` over the trainable parameters (Opacus wraps it
    for DP training, so that it steps on the privatised gradient only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.learning_rate, betas=spec.betas)
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.learning_rate, betas=spec.betas, weight_decay=spec.weight_decay)
    return torch.optim.SGD(params, lr=spec.learning_rate, momentum=spec.momentum)


def train_plain(model: nn.Module, dataset: Dataset, spec: TrainingSpec, epochs: int,
                loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
                device: torch.device = torch.device("cpu")) -> float:
    """Non-private training, used for centralized baselines (and the bench) only."""
    loss, _ = run_epochs(model.to(device), make_optimizer(model, spec), loader(dataset, spec.batch_size), epochs, loss_fn,
                         device=device, precision=spec.precision)
    return loss
