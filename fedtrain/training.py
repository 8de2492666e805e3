"""Plain (non-private) training and evaluation loops, shared by DP training and baselines."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtrain.data import Table
from fedtrain.spec import TrainingSpec


def loader(table: Table, batch_size: int, shuffle: bool = True) -> DataLoader:
    ds = TensorDataset(torch.from_numpy(table.features), torch.from_numpy(table.labels))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DataLoader,
    epochs: int,
    after_step: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """Train for ``epochs``; returns (mean training loss, optimizer steps taken)."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    total, seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        for xb, yb in data:
            optimizer.zero_grad()
            loss = criterion(model(xb), yb)
            loss.backward()
            optimizer.step()
            steps += 1
            if after_step is not None:
                after_step()
            # Poisson sampling can draw an empty batch: it still costs a step, not a loss.
            if len(yb):
                total += loss.item() * len(yb)
                seen += len(yb)
    return (total / seen if seen else float("nan")), steps


def sgd(model: nn.Module, spec: TrainingSpec) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=spec.learning_rate, momentum=spec.momentum)


def train_plain(model: nn.Module, table: Table, spec: TrainingSpec, epochs: int) -> float:
    """Non-private training, used for centralized baselines only."""
    loss, _ = run_epochs(model, sgd(model, spec), loader(table, spec.batch_size), epochs)
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, table: Table) -> dict[str, float]:
    model.eval()
    logits = model(torch.from_numpy(table.features))
    labels = torch.from_numpy(table.labels)
    return {
        "accuracy": float((logits.argmax(dim=1) == labels).float().mean()),
        "loss": float(nn.functional.cross_entropy(logits, labels)),
    }
