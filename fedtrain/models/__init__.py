"""Models built from a job spec: one interface over tabular models and adapted transformers.

Every node and the coordinator build the same architecture from the same spec.
Only the *trainable* tensors travel: all parameters of a tabular model, the
adapter (and task head) of a transformer; a frozen base never leaves its disk.
Datasets are ``TensorDataset``s whose last tensor is the label (classification)
or whose tensors are (input_ids, attention_mask) (causal-lm), with a response mask
for instruction tuning.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedtrain.data import DataCheck
from fedtrain.sources import DataSource
from fedtrain.models import tabular, transformer
from fedtrain.protocol.codec import TensorInfo, manifest_of
from fedtrain.spec import JobSpec

LossFn = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


def _is_transformer(spec: JobSpec) -> bool:
    return spec.model.kind == "transformer"


def build_model(spec: JobSpec, seed: int = 0) -> nn.Module:
    """The job's model; for a transformer, the base is checked against the spec's hash first.

    New weights come from ``seed``, on a forked RNG: the process's own RNG, which DP-SGD
    samples batches from, is never reset to a value anyone can know.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformer.build(spec) if _is_transformer(spec) else tabular.build(spec)


def load_dataset(path: DataSource | str, spec: JobSpec, check: DataCheck | None = None) -> TensorDataset:
    """A node's table (a local file or a database) as tensors (text is tokenised here, on the
    machine that holds it).

    Without ``check`` the first bad row raises; a node reads its own data with one, which
    skips bad rows and notes them for the owner (see ``fedtrain.data.DataCheck``).
    """
    return (transformer if _is_transformer(spec) else tabular).load_dataset(path, spec, check)


def parameter_counts(spec: JobSpec) -> tuple[int, int]:
    """(total, trainable) parameters of the job's model, counted without loading any weights."""
    if _is_transformer(spec):
        return transformer.parameter_counts(spec)
    n = spec.tabular_parameters()
    return n, n


def trainable_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The tensors that train, hence the only ones that are exchanged."""
    return {k: p.detach().cpu().numpy().copy() for k, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load exchanged tensors into ``model``; names and shapes must match its trainable ones exactly."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    expected = {k: tuple(p.shape) for k, p in params.items()}
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
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(arrays[k])))


def initial_state(spec: JobSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """The job's starting trainable tensors, reproducible from the spec and a seed."""
    return trainable_state(build_model(spec, seed))


@functools.lru_cache(maxsize=16)
def _manifest(spec_json: str) -> dict[str, TensorInfo]:
    return manifest_of(initial_state(JobSpec.model_validate_json(spec_json)))


def expected_manifest(spec: JobSpec) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of the tensors a job exchanges (built once per job)."""
    return dict(_manifest(spec.canonical_json()))


def forward(spec: JobSpec, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if _is_transformer(spec):
        input_ids, attention_mask = inputs
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    return model(*inputs)


def trim(spec: JobSpec, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A transformer batch without the padding columns that no row of it uses.

    Texts are padded to max_length on the node; attention never reaches padding (right
    padding, masked), so cutting it changes no logit of a real token, only the compute.
    """
    if not _is_transformer(spec) or not len(batch[0]):
        return batch
    width = int(batch[1].sum(1).max())
    return tuple(t[:, :width] if t.dim() == 2 else t for t in batch)


def causal_lm_losses(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Each text's next-token loss, averaged over the tokens ``target_mask`` marks (the
    text's own tokens; for instruction tuning, the response's alone).

    Averaging per text keeps each example's term a function of that example only, which
    is what per-example clipping assumes (a batch-wide token mean would not).
    """
    target, mask = input_ids[:, 1:], target_mask[:, 1:].to(logits.dtype)
    token = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none"
    ).view_as(mask)
    return (token * mask).sum(1) / mask.sum(1).clamp(min=1)


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """The batch's loss: the mean of :func:`causal_lm_losses`."""
    return causal_lm_losses(logits, input_ids, target_mask).mean()


def example_losses(spec: JobSpec) -> LossFn:
    """Each example's loss in a batch (a vector): what Opacus's ghost clipping takes."""
    def losses(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        batch = trim(spec, batch)
        if spec.generative:
            # causal-lm: (input_ids, attention_mask); instruction-tuning: (..., response_mask).
            return causal_lm_losses(forward(spec, model, batch[:2]), batch[0], batch[-1])
        return nn.functional.cross_entropy(forward(spec, model, batch[:-1]).float(), batch[-1], reduction="none")
    return losses


def loss_fn(spec: JobSpec) -> LossFn:
    """The training loss of a batch: the mean of per-example losses (Opacus's 'mean' reduction)."""
    losses = example_losses(spec)
    return lambda model, batch: losses(model, batch).mean()


def greedy_answers(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """For each pair, whether greedy decoding from its prompt gives exactly its response's
    tokens, end-of-turn token included (so that "positive" is not "positively").

    Greedy decoding emits the response iff at every response position the most likely next
    token, given the prompt and the response so far, is the response's own: one forward
    pass over prompt + response answers that for a whole batch.
    """
    predicted = logits[:, :-1].argmax(-1)
    target = response_mask[:, 1:].bool()
    right = (predicted == input_ids[:, 1:]) | ~target
    return right.all(1) & target.any(1)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, spec: JobSpec, batch_size: int = 32) -> dict[str, float]:
    """accuracy and loss (classification), or loss and perplexity (generative: over the
    responses' tokens for instruction tuning, with the accuracy of greedy answers when the
    job names its closed set of answers)."""
    model.eval()
    device = next(model.parameters()).device
    loss, correct, n = 0.0, 0, 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        batch = trim(spec, tuple(t.to(device) for t in batch))
        if spec.generative:
            logits = forward(spec, model, batch[:2])
            loss += float(causal_lm_losses(logits, batch[0], batch[-1]).sum())
            if spec.task == "instruction-tuning":
                correct += int(greedy_answers(logits, batch[0], batch[-1]).sum())
        else:
            logits = forward(spec, model, batch[:-1])
            loss += float(nn.functional.cross_entropy(logits, batch[-1], reduction="sum"))
            correct += int((logits.argmax(dim=1) == batch[-1]).sum())
        n += len(batch[0])
    if spec.generative:
        metrics = {"loss": loss / n, "perplexity": float(np.exp(loss / n))}
        if spec.task == "instruction-tuning" and spec.data.answers:
            metrics["accuracy"] = correct / n
        return metrics
    return {"accuracy": correct / n, "loss": loss / n}
