"""What a node does with a training task, short of the network: whether the task may run
at all, the charged round (train on the data, build the result, charge it to the ledger),
and the same release again for a round charged before.

Nothing here sends. Each step returns what the agent sends next: a ``Charged`` result,
whose ε values are its ledger row's, or a ``Problem``, the typed refusal for the wire
with the detail for the owner's log. What goes wrong with the data stays in that log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtrain.data import DataCheck
from fedtrain.errors import BudgetExceeded, FedtrainError
from fedtrain.models import expected_manifest, load_dataset
from fedtrain.node import approval
from fedtrain.node.dp_sgd import LocalUpdate
from fedtrain.node.ledger import LedgerRow, PrivacyLedger
from fedtrain.node.round import PrivateRound
from fedtrain.node.training import training_device
from fedtrain.policy import Decision, NodePolicy
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import TensorInfo, encode_arrays, encode_values, model_digest
from fedtrain.protocol.refusal import Reason, Refusal
from fedtrain.secagg.encoding import MASKED_TENSOR
from fedtrain.secagg.node import SecAggNode
from fedtrain.sources import DataSource
from fedtrain.spec import JobSpec
from nodes.admission import Problem, budget_problem
from nodes.jobs import JobRecord
from nodes.secure_stages import SecureStages

log = logging.getLogger("fedtrain.node")

# Message types a node serves, and the secure aggregation stages each may carry.
SERVED = {"train": (None, "collect"), "train.secagg": ("setup", "share_keys", "unmask")}


@dataclass(frozen=True)
class Prepared:
    """A training task cleared to fetch its global model."""

    private: PrivateRound
    secagg: SecAggNode | None  # under secure aggregation: the round's state, the neighbours' shares in


@dataclass(frozen=True)
class Charged:
    """A result charged to the ledger, as it is sent."""

    row: LedgerRow
    bundle: pb.ResultBundle

    @classmethod
    def of(cls, row: LedgerRow, bundle: pb.ResultBundle) -> Charged:
        # The job's own ε only: the lifetime increase depends on the node's other jobs, which
        # are none of this coordinator's business (it stays in the ledger).
        for key, value in encode_values({"epsilon": row.job_epsilon, "delta": row.delta}).items():
            bundle.header.metrics[key].CopyFrom(value)
        return cls(row, bundle)


def _problem(reason: Reason, detail: str, **values) -> Problem:
    return Problem(Refusal(reason, values), detail)


class TrainingTasks:
    def __init__(self, data: DataSource, policy: NodePolicy, ledger: PrivacyLedger, key: Ed25519PrivateKey,
                 secure: SecureStages):
        """``key``: the node's approval key; ``secure``: its secure aggregation rounds under way."""
        self.data = data
        self.policy = policy
        self.ledger = ledger
        self.key = key
        self.secure = secure

    def check(self, task: pb.TaskHeader, job: JobRecord | None, sent: JobSpec | None) -> Problem | None:
        """Why ``task`` must not run (None if it may), from the job book's record of its job,
        the spec the task names (``sent``, None if it does not parse) and the ledger."""
        if job is None or job.decision is not Decision.ACCEPTED:
            state = "never offered" if job is None else job.decision.value
            return _problem(Reason.NOT_ACCEPTED, f"job {task.job_id} is not accepted on this node ({state})")
        stage = task.secagg.WhichOneof("stage")
        if stage not in SERVED.get(task.message_type, ()):
            return _problem(Reason.STAGE_NOT_SERVED,
                            f"a {task.message_type!r} task in secure aggregation stage {stage} is not served")
        approved = job.spec
        digest = approved.digest()
        if job.signature is None or not approval.verify(self.key.public_key(), job.job_id, digest, job.signature):
            return _problem(Reason.APPROVAL_INVALID, f"job {task.job_id}: the spec on record carries no valid"
                                                     " approval of this node (was the job book changed?); nothing runs")
        if sent is None or sent.digest() != digest:
            what = "; ".join(approval.spec_difference(approved, sent)) if sent else "it does not parse"
            return _problem(Reason.SPEC_MISMATCH, f"the task is for another spec than the approved one: {what}")
        if (approved.secagg is not None) != (stage is not None):
            # Above all, an update of a securely aggregated job never leaves unmasked.
            return _problem(Reason.STAGE_NOT_SERVED,
                            f"job {task.job_id} was accepted {'with' if approved.secagg else 'without'} secure"
                            f" aggregation; a task {'without' if approved.secagg else 'with'} it is refused")
        if not 1 <= task.round <= approved.training.rounds:
            return _problem(Reason.ROUND_OUT_OF_RANGE, f"round {task.round} is outside the accepted job's rounds",
                            **{"training.rounds": approved.training.rounds})
        if stage not in (None, "unmask") and self.charged_before(task):
            # A masked update is never masked again: two maskings under different dropout sets
            # could reveal it. (A plain round run again gets the same release: release_again.)
            return _problem(Reason.ALREADY_RELEASED,
                            f"round {task.round} of job {task.job_id} was already released; it is never trained twice")
        return None

    def charged_before(self, task: pb.TaskHeader) -> bool:
        return self.ledger.row(task.job_id, task.round) is not None

    @staticmethod
    def manifest(spec: JobSpec) -> dict[str, TensorInfo]:
        """What a task's global model must hold: exactly the job's trainable tensors."""
        return expected_manifest(spec)

    # --- the charged round --------------------------------------------------------
    def prepare(self, task: pb.TaskHeader, spec: JobSpec) -> Prepared | Problem:
        """The round of a train task (or a secure aggregation collect), if the budget pays for
        it, and its neighbours' shares, if any, check: all before anything is fetched or trained."""
        try:
            device = training_device(spec.training.device, self.policy.allowed_devices)
        except FedtrainError as err:  # admitted on a machine that has since lost its GPU
            return Problem(Refusal(Reason.DEVICE_UNAVAILABLE, {"training.device": spec.training.device}), str(err))
        private = PrivateRound(spec, self.policy.dataset_size, device)
        quote = private.quote(self.ledger)
        if not quote.allowed:
            return budget_problem(self.policy, quote.refusal())
        if task.secagg.WhichOneof("stage") != "collect":
            return Prepared(private, None)
        secagg = self.secure.collect(task)
        return secagg if isinstance(secagg, Problem) else Prepared(private, secagg)

    def train(self, task: pb.TaskHeader, prepared: Prepared, start: dict[str, np.ndarray],
              node_id: int, wanted: Callable[[], bool]) -> Charged | Problem | None:
        """Train the round from the global model ``start``, build its result and charge it, if
        ``wanted()`` still says the coordinator waits for it; None if not (the round closed while
        it trained, e.g. its job was cancelled): the update is dropped, and nothing is charged."""
        try:
            # From here on the data is touched: whatever goes wrong, the coordinator learns only
            # that training failed (the reason is in this log), and nothing was charged or sent.
            update = self.local_update(task, prepared.private, start)
            bundle = self._result(task, prepared, update, start, node_id)
        except (FedtrainError, ValueError, RuntimeError) as err:
            log.exception("job %s round %d: training failed", task.job_id, task.round)
            return Problem(Refusal(Reason.TRAINING_FAILED), f"training failed: {err}")
        # Asked last, so that a round that ended while this one trained never costs budget: the
        # spend is committed before a result is sent, and this one would never be.
        if not wanted():
            log.info("job %s round %d: the coordinator closed the task while it trained; the update is dropped"
                     " and nothing is charged", task.job_id, task.round)
            return None
        try:
            # Re-checked atomically with the write: the quote in prepare may be stale.
            row = prepared.private.charge(self.ledger, job_id=task.job_id, round=task.round, task_id=task.task_id,
                                          payload=bundle.SerializeToString(), basis=model_digest(start))
        except BudgetExceeded as err:
            return budget_problem(self.policy, str(err))
        return Charged.of(row, bundle)

    def local_update(self, task: pb.TaskHeader, private: PrivateRound, start: dict[str, np.ndarray]) -> LocalUpdate:
        """Read the data (bad rows skipped and logged here only) and train the round on it."""
        spec = private.spec
        check = DataCheck()
        dataset = load_dataset(self.data, spec, check)
        if check.count:
            log.warning("job %s: %d problem(s) in %s, those rows are skipped (the coordinator is not told): %s",
                        spec.name, check.count, self.data, check.summary())
        if len(dataset) > private.dataset_size:
            # Privacy holds (each row is sampled at the planned rate), but batches run larger than
            # planned and the coordinator's bound on an update may reject this node's.
            log.warning("job %s: %d usable rows, more than the policy's dataset_size %d; declare the real count",
                        spec.name, len(dataset), private.dataset_size)
        began = time.perf_counter()
        update = private.train(dataset, start)
        log.info("job %s round %d: local DP-SGD training took %.3f s", task.job_id, task.round,
                 time.perf_counter() - began)
        # The training loss is a statistic of the data without noise: it stays in this log.
        log.info("job %s: local DP-SGD training loss %.4f on %d row(s)", spec.name, update.loss, len(dataset))
        return update

    def _result(self, task: pb.TaskHeader, prepared: Prepared, update: LocalUpdate, start: dict[str, np.ndarray],
                node_id: int) -> pb.ResultBundle:
        """The update (masked under secure aggregation) and the round's public metrics."""
        private, arrays = prepared.private, update.arrays
        if prepared.secagg is not None:
            arrays = {MASKED_TENSOR: self.secure.mask(private.spec, prepared.secagg, arrays, start,
                                                      private.dataset_size)}
        metrics = private.metrics(num_examples=prepared.secagg is None)
        return pb.ResultBundle(
            header=pb.ResultHeader(node_id=node_id, task_id=task.task_id, metrics=encode_values(metrics)),
            tensors=list(encode_arrays(arrays)),
        )

    # --- results charged before ---------------------------------------------------
    def release_again(self, task: pb.TaskHeader, start: dict[str, np.ndarray]) -> Charged | Problem:
        """The release of a round charged before (the coordinator restarted, or retries the
        round): no new training, no new spend. Only for the same global model: an update
        trained from another one would be a second release of the round."""
        row, basis, payload = self.ledger.release(task.job_id, task.round)
        if payload is None or basis != model_digest(start):
            why = "its update is no longer kept" if payload is None else "from another global model"
            return _problem(Reason.ALREADY_RELEASED, f"round {task.round} of job {task.job_id} was already released"
                                                     f" ({why}); it is never trained twice")
        log.info("job %s round %d: sending the update charged before (no new spend)", task.job_id, task.round)
        bundle = pb.ResultBundle.FromString(payload)
        bundle.header.task_id = task.task_id
        return Charged.of(row, bundle)

    def undelivered(self) -> list[Charged]:
        """Results charged but not delivered (a crash or an outage came between)."""
        return [Charged.of(row, pb.ResultBundle.FromString(payload)) for row, payload in self.ledger.undelivered()]

    def mark_sent(self, charged: Charged) -> None:
        """Delivered, or refused for good by the coordinator: the spend stays charged either way."""
        self.ledger.mark_sent(charged.row.job_id, charged.row.round)
