"""Plain (non-private) training loop, shared by DP training and baselines."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedtrain.spec import TrainingSpec

Batch = tuple[torch.Tensor, ...]


def loader(dataset: Dataset, batch_size: int, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DataLoader,
    epochs: int,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    after_step: Callable[[], None] | None = None,
    on_empty_batch: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """Train for ``epochs``; returns (mean training loss, optimizer steps taken).

    Poisson sampling can draw an empty batch. It still costs a (noise-only) step;
    ``on_empty_batch`` prepares that step instead of a forward pass, which some
    models cannot run on zero rows.
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
                loss = loss_fn(model, batch)
                loss.backward()
                if size:
                    total += loss.item() * size
                    seen += size
            optimizer.step()
            steps += 1
            if after_step is not None:
                after_step()
    return (total / seen if seen else float("nan")), steps


def sgd(model: nn.Module, spec: TrainingSpec) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=spec.learning_rate, momentum=spec.momentum)


def train_plain(model: nn.Module, dataset: Dataset, spec: TrainingSpec, epochs: int,
                loss_fn: Callable[[nn.Module, Batch], torch.Tensor]) -> float:
    """Non-private training, used for centralized baselines only."""
    loss, _ = run_epochs(model, sgd(model, spec), loader(dataset, spec.batch_size), epochs, loss_fn)
    return loss
