"""One node's private round, from plan to ledger charge: the entry point the node agent and
the simulation's ClientApp both train through.

Modelled on Opacus's ``PrivacyEngine``: one object, with its state in plain view. It is
made from public inputs only, the parsed job spec and the dataset size the node declares
(its policy's ``dataset_size``), so the plan it quotes, trains under, reports and charges
is the same at every step and tells nothing about the data::

    private = PrivateRound(spec, policy.dataset_size)
    private.quote(ledger)                   # before anything is fetched or read
    update = private.train(dataset, start)  # DP-SGD; Opacus's recorded plan is checked
    private.charge(ledger, ...)             # committed before anything is sent
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedtrain.node.dp_sgd import LocalUpdate, train_round
from fedtrain.privacy.accounting import expected_batch_size, plan_round
from fedtrain.spec import JobSpec

if TYPE_CHECKING:
    from fedtrain.node.ledger import LedgerRow, PrivacyLedger, Quote


class PrivateRound:
    def __init__(self, spec: JobSpec, dataset_size: int, device: torch.device = torch.device("cpu")):
        """``device``: where it trains (``training.training_device`` resolves the job's
        ``training.device`` against the node's policy and hardware)."""
        self.spec = spec
        self.dataset_size = dataset_size
        self.device = device
        self.plan = plan_round(spec, dataset_size)  # noise, sample rate, steps: computed once
        self.batch_size = expected_batch_size(self.plan, dataset_size)

    def quote(self, ledger: PrivacyLedger) -> Quote:
        """What the round would do to the ledger's lifetime budget; nothing is charged."""
        return ledger.quote([self.plan])

    def train(self, dataset: TensorDataset, start: dict[str, np.ndarray]) -> LocalUpdate:
        """One round of DP-SGD on ``dataset`` from the global model's tensors ``start``;
        FedtrainError, and nothing may be sent, if Opacus recorded another plan or other
        tensors come out than went in (see ``dp_sgd.train_round``)."""
        return train_round(self.spec, dataset, start, self.plan, self.batch_size, self.device)

    def metrics(self, *, num_examples: bool) -> dict[str, int | float]:
        """The round's public metrics: its DP parameters and, with ``num_examples``, the
        declared size (Flower's strategies weigh by it; a masked update carries it inside)."""
        metrics: dict[str, int | float] = {
            "noise-multiplier": self.plan.noise_multiplier, "sample-rate": self.plan.sample_rate,
            "steps": self.plan.steps,
        }
        if num_examples:
            metrics["num-examples"] = self.dataset_size
        return metrics

    def charge(self, ledger: PrivacyLedger, *, job_id: str, round: int, task_id: str, payload: bytes,
               basis: str) -> LedgerRow:
        """Commit the round and its payload to ``ledger`` (BudgetExceeded if it no longer fits);
        ``basis`` names the global model it was trained from."""
        return ledger.charge(job_id=job_id, round=round, plan=self.plan, job_delta=self.spec.privacy.delta,
                             task_id=task_id, payload=payload, basis=basis)
