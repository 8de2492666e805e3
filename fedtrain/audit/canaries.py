"""Canaries for a tabular classification job, and how an auditor scores them.

A "Dirac" canary sits at ``s·e_j`` in the job's *scaled* feature space (raw value
``mean_j + s·std_j`` of ``data.scaling``; every other feature at its mean, i.e. scaled 0)
with label ``y``. For a logistic model ``softmax(W x + b)`` its per-example gradient with
respect to ``W`` is ``s·(p − e_y) ⊗ e_j``: it lies entirely in column ``j`` of ``W``, and with
``s`` large it dwarfs the bias gradient, so after clipping it is a vector of norm ≈ C along
``(p − e_y)`` in that column. Each canary gets its own (feature, class) pair, so their
directions barely overlap and the canaries are (nearly) independent tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedtrain.errors import SpecError
from fedtrain.spec import JobSpec

# How far out (in public standard deviations) a canary sits: large enough that its clipped
# gradient is all in its column of W (the bias part is 1/s of it).
SCALE = 100.0


@dataclass(frozen=True)
class Canary:
    feature: int  # index j in data.features
    label: int    # class y


def directions(spec: JobSpec) -> list[Canary]:
    """The distinct canary directions a job offers, features first (canary i uses feature
    i mod F), so that a small audit spreads its canaries over columns.

    With 2 classes the two labels of one feature point in opposite directions (p − e_0 =
    −(p − e_1)), so one canary per feature; with ≥ 3 classes every class of a feature, since
    e_y − p and e_y' − p are nearly orthogonal when p is near uniform."""
    if spec.task != "tabular-classification":
        raise SpecError(f"the audit crafts canaries for tabular-classification jobs, not {spec.task}")
    features, classes = len(spec.data.features), spec.model.num_classes
    per_feature = 1 if classes == 2 else classes
    return [Canary(feature=i % features, label=(i // features + (i % features if classes == 2 else 0)) % classes)
            for i in range(features * per_feature)]


def make_canaries(spec: JobSpec, m: int) -> list[Canary]:
    available = directions(spec)
    if not 1 <= m <= len(available):
        raise SpecError(f"this job has {len(available)} distinct canary directions ({len(spec.data.features)}"
                        f" features, {spec.model.num_classes} classes); ask for 1..{len(available)} canaries,"
                        f" not {m}")
    return available[:m]


def canary_rows(spec: JobSpec, canaries: list[Canary]) -> tuple[torch.Tensor, torch.Tensor]:
    """The canaries as rows of the node's dataset: scaled features and labels (what
    ``load_dataset`` makes of raw ``mean_j + SCALE·std_j``)."""
    x = torch.zeros((len(canaries), len(spec.data.features)), dtype=torch.float32)
    for i, c in enumerate(canaries):
        x[i, c.feature] = SCALE
    return x, torch.tensor([c.label for c in canaries], dtype=torch.int64)


def canary_directions(canaries: list[Canary], classes: int) -> np.ndarray:
    """Unit vectors along e_y − 1/K (K classes): the part of the canary's step (e_y − p) in
    column j that is its own. Not e_y − p itself: at s = 100 the start model's p on a canary
    is nearly one-hot on some class k, so the steps of two canaries of one column, e_y − e_k
    and e_y' − e_k, would share e_k and score each other; along e_y − 1/K another canary's
    step counts −p_y ≈ 0."""
    u = np.eye(classes)[[c.label for c in canaries]] - 1.0 / classes
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def white_box_scores(canaries: list[Canary], update: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                     weight: str) -> np.ndarray:
    """One round's alignment <(update − reference)[:, j], u_i> of each canary, ``reference``
    being the same node's round without canaries and noise (see ``run._AuditGrid``)."""
    u = canary_directions(canaries, update[weight].shape[0])
    delta = update[weight].astype(np.float64) - reference[weight].astype(np.float64)
    return np.array([delta[:, c.feature] @ u[i] for i, c in enumerate(canaries)])


@torch.no_grad()
def black_box_scores(model: torch.nn.Module, spec: JobSpec, canaries: list[Canary]) -> np.ndarray:
    """−loss of the final global model on each canary row: a member is fitted better."""
    x, y = canary_rows(spec, canaries)
    model.eval()
    return -torch.nn.functional.cross_entropy(model(x), y, reduction="none").double().numpy()
