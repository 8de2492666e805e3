"""Small PyTorch models over tabular features, built only from Opacus-supported layers."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedtrain.spec import JobSpec


def build_model(spec: JobSpec) -> nn.Module:
    sizes = [len(spec.data.features), *spec.model.hidden]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], spec.model.num_classes))
    return nn.Sequential(*layers)


def initial_state(spec: JobSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """The job's starting parameters, reproducible from the spec and a seed."""
    torch.manual_seed(seed)
    return state_to_numpy(build_model(spec))


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load arrays into ``model``; names and shapes must match exactly."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in arrays.items()}
    if expected != got:
        problems = [f"missing {k}" for k in sorted(set(expected) - set(got))]
        problems += [f"unexpected {k}" for k in sorted(set(got) - set(expected))]
        problems += [
            f"{k} has shape {got[k]}, expected {expected[k]}"
            for k in sorted(set(expected) & set(got))
            if expected[k] != got[k]
        ]
        raise ValueError("arrays do not fit the model: " + "; ".join(problems))
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
