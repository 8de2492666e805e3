"""Small PyTorch models over tabular features, built only from Opacus-supported layers."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedtrain.data import DataCheck, load_table
from fedtrain.sources import DataSource
from fedtrain.spec import JobSpec


def build(spec: JobSpec) -> nn.Module:
    sizes = [len(spec.data.features), *spec.model.hidden]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], spec.model.num_classes))
    return nn.Sequential(*layers)


def load_dataset(path: DataSource | str, spec: JobSpec, check: DataCheck | None = None) -> TensorDataset:
    """(features, labels) of a node's table."""
    table = load_table(path, spec.data, spec.model.num_classes, check)
    return TensorDataset(torch.from_numpy(table.features), torch.from_numpy(table.labels))
