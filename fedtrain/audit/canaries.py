"""Canaries for a classification job, and how an auditor scores them.

A canary is a row of the node's table, written as its owner's file would hold it, so that it
goes through the node's own reading and preprocessing:

- tabular: a "Dirac" row at ``s·e_j`` in the job's *scaled* feature space (raw value
  ``mean_j + s·std_j`` of ``data.scaling``, every other feature at its mean) with label ``y``.
  Its gradient is large (so it is clipped to C) and sits in the weights of feature ``j``;
  each canary gets its own (feature, class) pair, so their gradients differ.
- text: a dozen random words from the tokenizer's vocabulary, no tweet or sentence any
  real row resembles, with an alternating label.

The white-box score (:func:`white_box_scores`) reads each canary's pull out of node 0's
update by least squares against the canaries' own gradients at the round's start; the
black-box score (:func:`black_box_scores`) is the final model's loss on each canary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import TensorDataset

from fedtrain.errors import SpecError
from fedtrain.spec import JobSpec

# How far out (in public standard deviations) a tabular canary sits: large enough that its
# gradient is clipped and nearly all in its feature's weights.
SCALE = 100.0
WORDS = 12
TEXT_CANARIES = 1000  # more than an audit needs; the decoding solves for every canary at once


def capacity(spec: JobSpec) -> int:
    """How many canaries with distinct gradients the job offers."""
    if spec.task == "tabular-classification":
        features, classes = len(spec.data.features), spec.model.num_classes
        # With 2 classes one label per feature (the other's gradient is its negative); with K ≥ 3,
        # K − 1 labels per feature (the K gradients p − e_y of one feature sum to a multiple of p).
        return features * max(1, classes - 1)
    if spec.task == "text-classification":
        return TEXT_CANARIES
    raise SpecError(f"the audit crafts canaries for classification jobs, not {spec.task}")


def canary_table(spec: JobSpec, m: int, rng: np.random.Generator) -> pa.Table:
    """``m`` canaries as rows of the job's columns, raw, as a node's table holds them."""
    available = capacity(spec)
    if not 1 <= m <= available:
        raise SpecError(f"this job offers {available} canaries with distinct gradients; ask for 1..{available},"
                        f" not {m}")
    if spec.task == "text-classification":
        return _text_canaries(spec, m, rng)
    return _dirac_canaries(spec, m)


def _dirac_canaries(spec: JobSpec, m: int) -> pa.Table:
    features, classes = len(spec.data.features), spec.model.num_classes
    scaling = spec.data.scaling
    mean = np.zeros(features) if scaling is None else np.asarray(scaling.mean, dtype=np.float64)
    std = np.ones(features) if scaling is None else np.asarray(scaling.std, dtype=np.float64)
    rows = np.tile(mean, (m, 1))
    labels = []
    for i in range(m):  # feature first, so that a small audit spreads over features
        j, k = i % features, i // features
        rows[i, j] += SCALE * std[j]
        labels.append((k + j) % classes if classes == 2 else k % classes)
    columns = {name: rows[:, j] for j, name in enumerate(spec.data.features)}
    return pa.table({**columns, spec.data.label: np.asarray(labels, dtype=np.int64)})


def _text_canaries(spec: JobSpec, m: int, rng: np.random.Generator) -> pa.Table:
    from fedtrain.models.transformer import load_tokenizer, verified_base

    vocabulary = load_tokenizer(verified_base(spec)).get_vocab()
    words = sorted(w for w in vocabulary if w.isascii() and w.isalpha() and w.islower() and len(w) >= 4)
    texts = [" ".join(rng.choice(words, WORDS)) for _ in range(m)]
    classes = spec.data.classes
    return pa.table({spec.data.text: texts, spec.data.label: [classes[i % len(classes)] for i in range(m)]})


@dataclass(frozen=True)
class Observed:
    """What the auditor keeps of one round of node 0 (see ``run._AuditGrid``): the round's
    start, its update, and its round on its real rows alone from the same start without
    noise and with it; and the noise multiplier the update was trained with."""
    start: dict[str, np.ndarray]
    update: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    noisy_reference: dict[str, np.ndarray]
    noise_multiplier: float


def _flat(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([(a[k].astype(np.float64) - b[k].astype(np.float64)).ravel() for k in sorted(a)])


def example_gradients(spec: JobSpec, start: dict[str, np.ndarray], rows: TensorDataset) -> np.ndarray:
    """Each row's gradient of the job's loss at ``start``, flattened in sorted tensor order
    and scaled to unit norm (clipping keeps only a large gradient's direction): (rows, D)."""
    from fedtrain.models import build_model, load_trainable_state, loss_fn

    model = build_model(spec)
    load_trainable_state(model, start)
    model.train()
    params = dict(sorted((k, p) for k, p in model.named_parameters() if p.requires_grad))
    loss = loss_fn(spec)
    out = np.zeros((len(rows), sum(p.numel() for p in params.values())))
    for i in range(len(rows)):
        grads = torch.autograd.grad(loss(model, tuple(t[i:i + 1] for t in rows.tensors)), list(params.values()))
        g = torch.cat([x.reshape(-1) for x in grads]).double().numpy()
        out[i] = g / max(np.linalg.norm(g), 1e-12)
    return out


def white_box_scores(spec: JobSpec, observed: Observed, canaries: TensorDataset) -> np.ndarray:
    """One round's evidence of each canary in node 0's update: z-scores of a ridge fit of
    r = −(update − reference − β·noise) by the canaries' unit gradients at the start.

    ``update − reference`` is the included canaries' clipped pull plus the node's noise (the
    real rows' pull cancels). ``noise`` is the noisy reference less the noise-free one: for
    an honest node independent of the update's noise, so β (fitted by least squares over
    every coordinate) is ≈ 0 ± 1/√D and costs nothing; for a node whose noise repeats from
    a fixed seed it is the same draw, β ≈ 1, and the canaries stand bare.

    The fit solves for all canaries at once, so that a part of the gradients that many
    canaries share (a transformer's classification head sees nearly the same pooled vector
    for every text) is not read as evidence for each of them. Its ridge, 4σ², is the noise's
    variance over the prior variance of a canary's pull (in or out with probability 1/2),
    both in units of the clipped pull; without noise it is a plain least-squares fit. Each
    estimate is divided by its own noise scale, so that the rounds' scores add up."""
    residual = _flat(observed.update, observed.reference)
    noise = _flat(observed.noisy_reference, observed.reference)
    beta = float(residual @ noise / (noise @ noise)) if noise @ noise > 0 else 0.0
    target = -(residual - beta * noise)  # SGD steps against the gradient
    grads = example_gradients(spec, observed.start, canaries).T  # (D, m)
    gram = grads.T @ grads
    ridge = 4 * observed.noise_multiplier ** 2
    solve = np.linalg.pinv(gram + ridge * np.eye(len(gram)))
    estimate = solve @ (grads.T @ target)
    return estimate / np.sqrt(np.clip(np.diag(solve @ gram @ solve), 1e-24, None))


@torch.no_grad()
def black_box_scores(model: torch.nn.Module, spec: JobSpec, canaries: TensorDataset) -> np.ndarray:
    """−loss of the final global model on each canary: a member is fitted better."""
    from fedtrain.models import forward

    model.eval()
    *inputs, labels = canaries.tensors
    logits = forward(spec, model, tuple(inputs))
    return -torch.nn.functional.cross_entropy(logits, labels, reduction="none").double().numpy()
