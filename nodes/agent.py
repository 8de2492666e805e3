"""The node agent: the daemon a data owner runs next to their data.

It dials out to the coordinator, decides on job offers with the owner's policy
(``nodes/admission.py``: spec and policy only, never the data), trains rounds under
DP-SGD (``fedtrain.privacy.engine.train_round``), charges each round to the ledger
*before* sending it, and sends every message through one egress check
(``nodes/egress.py``) after writing it to the audit log. What goes wrong with the data
stays in the node's log.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import yaml

from fedtrain import approval
from fedtrain.audit import AuditLog
from fedtrain.data import DataCheck
from fedtrain.errors import BudgetExceeded, FedtrainError
from fedtrain.models import expected_manifest, load_dataset
from fedtrain.policy import Decision, NodePolicy
from fedtrain.privacy.accounting import RoundPlan, plan_round
from fedtrain.privacy.engine import LocalUpdate, expected_batch_size, train_round
from fedtrain.privacy.ledger import LedgerRow, PrivacyLedger
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import (
    GRPC_OPTIONS, PROTOCOL_VERSION, TensorInfo, decode_arrays, encode_arrays, encode_values, model_digest,
    payload_digest,
)
from fedtrain.protocol.refusal import Reason, Refusal
from fedtrain.secagg.encoding import MASKED_TENSOR, clip_range, encode, node_weight
from fedtrain.secagg.node import SecAggNode
from fedtrain.secagg.peers import PeerAuth
from fedtrain.spec import JobSpec, job_spec_from_json
from fedtrain.storage import private_dir, write_private
from fedtrain.tls import Identity, channel
from nodes import admission, egress
from nodes.jobs import JobBook
from nodes.state import StatePaths

log = logging.getLogger("fedtrain.node")

# Makes the agent stop dead at a point, for the tests of crashes and dropouts:
# "after-ledger-commit" (between charging a round and sending it: no spend is lost),
# "secagg-before-masked" (shares exchanged, no masked update sent) and
# "secagg-after-masked" (masked update sent, unmask stage never answered).
FAILPOINT_ENV = "FEDTRAIN_FAILPOINT"
_PROTO_DECISION = {
    Decision.ACCEPTED: pb.OfferAnswer.ACCEPTED,
    Decision.REFUSED: pb.OfferAnswer.REFUSED,
    Decision.PENDING_APPROVAL: pb.OfferAnswer.PENDING_APPROVAL,
}


# Message types a node serves, and the secure aggregation stage each may carry.
def _parsed(spec_json: str) -> JobSpec | None:
    try:
        return job_spec_from_json(spec_json)
    except FedtrainError:
        return None


_SERVED = {"train": (None, "collect"), "train.secagg": ("setup", "share_keys", "unmask")}


class Failpoint(Exception):
    """Raised out of ``NodeAgent.run`` when the agent reaches its failpoint."""


class NodeAgent:
    def __init__(self, *, coordinator: str, data: Path, policy: NodePolicy, state_dir: Path, name: str,
                 poll_seconds: float = 10.0, failpoint: str = "", identity: Identity | None = None,
                 join_token: str = ""):
        """``identity``: the node's certificate for mutual TLS (None: plaintext); ``join_token``
        enrolls it at the first Register."""
        paths = StatePaths(private_dir(state_dir))
        self.coordinator = coordinator
        self.data = data
        self.policy = policy
        self.name = name
        self.poll_seconds = poll_seconds
        # The owner's commands (jobs --show, approve) apply the policy in force.
        write_private(paths.policy, yaml.safe_dump(policy.document()).encode(), fsync=False)
        self.ledger = PrivacyLedger(paths.ledger, max_epsilon=policy.max_epsilon, delta=policy.delta)
        self.jobs = JobBook(paths.jobs)
        self.audit = AuditLog(paths.audit)
        self.key = approval.load_or_create_key(paths.key)
        self.node_id = 0
        self.failpoint = failpoint
        # Secure aggregation state of rounds in progress: in memory only, so a restart forgets
        # its secrets and the coordinator treats the node as dropped.
        self._secagg: dict[tuple[str, int], SecAggNode] = {}
        # Signs this node's SecAgg+ keys and authenticates its peers' (None without TLS: no secure aggregation).
        self._peer_auth = PeerAuth(identity) if identity is not None else None
        self.join_token = join_token
        self._channel = channel(coordinator, identity, GRPC_OPTIONS)
        self._stub = pb_grpc.NodeServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()
        self.ledger.close()
        self.jobs.close()

    # --- outbound: every call is checked and audited before it leaves -------------
    def _send(self, message_type: str, call: Callable, request, spec: JobSpec | None = None, **audit) -> object:
        """The one way out: the egress check (against ``spec``, the job the message is about,
        and the policy), then the audit log, then the wire."""
        request = egress.check(request, spec, self.policy)
        self.audit.record(message_type, peer=self.coordinator, **audit)
        return call(request)

    def _reach(self, point: str) -> None:
        if self.failpoint == point:
            log.warning("failpoint %s reached: stopping", point)
            raise Failpoint(point)

    # --- main loop ------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self._register(stop)
        while not stop.is_set():
            try:
                # Charged results that a crash or an outage kept from the coordinator go first.
                self._deliver_undelivered()
                self._answer_offers()
                reply = self._send("Poll", self._stub.Poll,
                                   pb.PollRequest(node_id=self.node_id, wait_seconds=self.poll_seconds))
                item = reply.WhichOneof("item")
                if item == "offer":
                    self._on_offer(reply.offer)
                elif item == "task":
                    self._on_task(reply.task)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND and "Register" in (err.details() or ""):
                    self._register(stop)  # the coordinator lost us, e.g. a new state dir
                    continue
                if err.code() == grpc.StatusCode.PERMISSION_DENIED:  # e.g. revoked: retrying cannot help
                    raise FedtrainError(f"the coordinator refused this node: {err.details()}") from None
                log.warning("coordinator unreachable (%s: %s); retrying", err.code().name, err.details())
                stop.wait(2.0)

    def _register(self, stop: threading.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                reply = self._send("Register", self._stub.Register,
                                   pb.RegisterRequest(name=self.name, protocol_version=PROTOCOL_VERSION,
                                                      join_token=self.join_token))
                self.node_id = reply.node_id
                log.info("registered with %s as node %d", self.coordinator, self.node_id)
                return
            except grpc.RpcError as err:
                if err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.PERMISSION_DENIED):
                    raise FedtrainError(f"the coordinator refused registration: {err.details()}") from None
                # A refused TLS handshake looks like an absent coordinator; the details say which.
                log.info("waiting for coordinator at %s (%s: %s)", self.coordinator, err.code().name, err.details())
                stop.wait(delay)
                delay = min(delay * 2, 10.0)

    # --- job offers -----------------------------------------------------------
    def _on_offer(self, offer: pb.JobOffer) -> None:
        verdict = admission.admit(offer.job_id, offer.spec_json, self.policy, self.ledger, self.jobs.get(offer.job_id),
                                  authenticated=self._peer_auth is not None)
        log.info("job %s: %s (%s)", offer.job_id, verdict.decision.value, verdict.detail)
        if verdict.repeat:
            self.jobs.mark_unanswered(offer.job_id)
        else:
            signature = None
            if verdict.decision is Decision.ACCEPTED:
                # The policy approves a job within its bounds, for exactly these bytes.
                signature = approval.sign(self.key, offer.job_id, verdict.spec.digest())
            self.jobs.record(offer.job_id, offer.spec_json, verdict.decision, verdict.refusal.text(), verdict.detail,
                             signature)
        self._answer_offers()

    def _answer_offers(self) -> None:
        for job in self.jobs.unanswered():
            spec = _parsed(job.spec_json)
            self._send(
                "AnswerOffer", self._stub.AnswerOffer,
                pb.OfferAnswer(node_id=self.node_id, job_id=job.job_id, decision=_PROTO_DECISION[job.decision],
                               reason=job.answer),
                spec=spec, job_id=job.job_id, detail=f"{job.decision.value}: {job.answer}",
            )
            self.jobs.mark_answered(job.job_id, job.decision)

    # --- training tasks -------------------------------------------------------
    def _check_task(self, task: pb.TaskHeader) -> admission.Problem | None:
        """Why this task must not run (None if it may), from the job book, the spec and the ledger."""
        def problem(reason: Reason, detail: str, **values) -> admission.Problem:
            return admission.Problem(Refusal(reason, values), detail)

        job = self.jobs.get(task.job_id)
        if job is None or job.decision is not Decision.ACCEPTED:
            state = "never offered" if job is None else job.decision.value
            return problem(Reason.NOT_ACCEPTED, f"job {task.job_id} is not accepted on this node ({state})")
        stage = task.secagg.WhichOneof("stage")
        if stage not in _SERVED.get(task.message_type, ()):
            return problem(Reason.STAGE_NOT_SERVED,
                           f"a {task.message_type!r} task in secure aggregation stage {stage} is not served")
        spec = job.spec
        if job.signature is None or not approval.verify(self.key.public_key(), job.job_id, spec.digest(),
                                                         job.signature):
            return problem(Reason.APPROVAL_INVALID, f"job {task.job_id}: the spec on record carries no valid"
                                                    " approval of this node (was the job book changed?); nothing runs")
        sent = _parsed(task.spec_json)
        if sent is None or sent.digest() != spec.digest():
            what = "; ".join(approval.spec_difference(spec, sent)) if sent else "it does not parse"
            return problem(Reason.SPEC_MISMATCH, f"the task is for another spec than the approved one: {what}")
        if (spec.secagg is not None) != (stage is not None):
            # Above all, an update of a securely aggregated job never leaves unmasked.
            return problem(Reason.STAGE_NOT_SERVED,
                           f"job {task.job_id} was accepted {'with' if spec.secagg else 'without'} secure"
                           f" aggregation; a task {'without' if spec.secagg else 'with'} it is refused")
        if not 1 <= task.round <= spec.training.rounds:
            return problem(Reason.ROUND_OUT_OF_RANGE, f"round {task.round} is outside the accepted job's rounds",
                           **{"training.rounds": spec.training.rounds})
        if stage not in (None, "unmask") and self.ledger.row(task.job_id, task.round) is not None:
            # A masked update is never masked again: two maskings under different dropout sets
            # could reveal it. (A plain round run again gets the same release: see _release_again.)
            return problem(Reason.ALREADY_RELEASED,
                           f"round {task.round} of job {task.job_id} was already released; it is never trained twice")
        return None

    def _refuse(self, task: pb.TaskHeader, refusal: Refusal, detail: str, spec: JobSpec | None = None) -> None:
        """Tell the coordinator the typed ``refusal``; ``detail`` stays in this node's log."""
        log.warning("refusing task %s (job %s round %d): %s", task.task_id, task.job_id, task.round, detail)
        self._send("SubmitResult", self._stub.SubmitResult,
                   iter([pb.ResultPart(header=pb.ResultHeader(node_id=self.node_id, task_id=task.task_id,
                                                              refusal=refusal.text()))]),
                   spec=spec, job_id=task.job_id, round=task.round, detail=f"refusal: {refusal.text()}")

    def _budget_refusal(self) -> Refusal:
        return Refusal(Reason.BUDGET_EXCEEDED, {"policy.max_epsilon": self.policy.max_epsilon})

    def _plan(self, spec: JobSpec) -> RoundPlan:
        """The round's DP parameters: from the spec and the declared dataset size, never the data."""
        return plan_round(spec, self.policy.dataset_size)

    def _on_task(self, task: pb.TaskHeader) -> None:
        problem = self._check_task(task)
        if problem is not None:
            return self._refuse(task, problem.refusal, problem.detail, _parsed(task.spec_json))
        spec = self.jobs.get(task.job_id).spec
        stage = task.secagg.WhichOneof("stage")
        if stage in ("setup", "share_keys", "unmask"):
            return self._on_secagg_stage(task, spec, stage)
        if stage is None and self.ledger.row(task.job_id, task.round) is not None:
            return self._release_again(task, spec)
        plan = self._plan(spec)
        quote = self.ledger.quote([plan])
        # The budget is checked before anything is fetched or trained.
        if not quote.allowed:
            return self._refuse(task, self._budget_refusal(), quote.refusal(), spec)
        secagg = None
        if stage == "collect":
            try:
                secagg = self._secagg_state(task)
                # Shares are checked before training, so a bad one costs no budget.
                secagg.receive_shares(task.secagg.collect)
            except FedtrainError as err:
                self._secagg.pop((task.job_id, task.round), None)
                return self._refuse(task, Refusal(Reason.SECURE_AGGREGATION_FAILED), f"secure aggregation: {err}",
                                    spec)
            self._reach("secagg-before-masked")
        try:
            start = self._fetch(task, spec)
        except (FedtrainError, ValueError) as err:
            return self._refuse(task, Refusal(Reason.BAD_GLOBAL_MODEL), f"cannot fetch the global model: {err}", spec)
        try:
            # From here on the data is touched: whatever goes wrong, the coordinator learns only
            # that training failed (the reason is in this log), and nothing was charged or sent.
            bundle = self._train(task, spec, plan, secagg, self._local_round(spec, plan, start), start)
        except (FedtrainError, ValueError, RuntimeError) as err:
            log.exception("job %s round %d: training failed", task.job_id, task.round)
            return self._refuse(task, Refusal(Reason.TRAINING_FAILED), f"training failed: {err}", spec)
        try:
            # Re-checked atomically with the write: the pre-check above may be stale.
            row = self.ledger.charge(job_id=task.job_id, round=task.round, plan=plan,
                                     job_delta=spec.privacy.delta, task_id=task.task_id,
                                     payload=bundle.SerializeToString(), basis=model_digest(start))
        except BudgetExceeded as err:
            return self._refuse(task, self._budget_refusal(), str(err), spec)
        self._reach("after-ledger-commit")
        self._deliver(row, bundle)
        if secagg is not None:
            self._reach("secagg-after-masked")

    # --- secure aggregation -----------------------------------------------------
    def _secagg_state(self, task: pb.TaskHeader) -> SecAggNode:
        state = self._secagg.get((task.job_id, task.round))
        if state is None:
            raise FedtrainError(f"no secure aggregation under way for job {task.job_id} round {task.round}"
                                " (this node restarted, or the setup stage never reached it)")
        return state

    def _on_secagg_stage(self, task: pb.TaskHeader, spec: JobSpec, stage: str) -> None:
        key = (task.job_id, task.round)
        try:
            if stage == "setup":
                if self._peer_auth is None:
                    # Peers nobody can authenticate could be the coordinator itself, holding every share.
                    return self._refuse(task, Refusal(Reason.SECURE_AGGREGATION_UNAUTHENTICATED),
                                        "secure aggregation needs this node's TLS identity to authenticate its"
                                        " peers; a node started with --insecure takes no part in it", spec)
                # Refuse early, before any key exists, when the round would exceed the budget.
                quote = self.ledger.quote([self._plan(spec)])
                if not quote.allowed:
                    return self._refuse(task, self._budget_refusal(), quote.refusal(), spec)
                # Earlier rounds of the job that never reached their unmask stage are over.
                for old in [k for k in self._secagg if k[0] == task.job_id and k[1] <= task.round]:
                    del self._secagg[old]
                self._secagg[key] = SecAggNode(task.job_id, task.round, self.node_id, self._peer_auth)
                reply = pb.SecAggReply(keys=self._secagg[key].setup(task.secagg.setup))
                detail = "secagg setup: two public keys and a seed commitment"
            elif stage == "share_keys":
                shares = self._secagg_state(task).share_keys(task.secagg.share_keys)
                reply = pb.SecAggReply(shares=shares)
                detail = f"secagg share keys: encrypted shares for nodes {[s.dst for s in shares.shares]}"
            else:
                state = self._secagg_state(task)
                del self._secagg[key]  # answered once, whatever the answer
                reveal = state.unmask(task.secagg.unmask)
                reply = pb.SecAggReply(reveal=reveal)
                detail = (f"secagg unmask: seed shares of nodes {[s.owner for s in reveal.seed_shares]},"
                          f" key shares of nodes {[s.owner for s in reveal.key_shares]}")
        except (FedtrainError, ValueError) as err:
            self._secagg.pop(key, None)
            return self._refuse(task, Refusal(Reason.SECURE_AGGREGATION_FAILED), f"secure aggregation: {err}", spec)
        header = pb.ResultHeader(node_id=self.node_id, task_id=task.task_id, secagg=reply)
        self._send("SubmitResult", self._stub.SubmitResult, iter([pb.ResultPart(header=header)]),
                   spec=spec, job_id=task.job_id, round=task.round, detail=detail,
                   payload_sha256=hashlib.sha256(reply.SerializeToString()).hexdigest())

    def _fetch(self, task: pb.TaskHeader, spec: JobSpec) -> dict[str, np.ndarray]:
        """The task's global model: exactly the job's trainable tensors."""
        chunks = self._send("FetchArrays", self._stub.FetchArrays,
                            pb.FetchRequest(node_id=self.node_id, task_id=task.task_id),
                            spec=spec, job_id=task.job_id, round=task.round)
        return decode_arrays(chunks, expected=expected_manifest(spec))

    def _release_again(self, task: pb.TaskHeader, spec: JobSpec) -> None:
        """Answer a round charged before (the coordinator restarted, or retries the round) with
        the same release: no new training, no new spend. Only for the same global model: an
        update trained from another one would be a second release of the round."""
        row, basis, payload = self.ledger.release(task.job_id, task.round)
        try:
            start = self._fetch(task, spec)
        except (FedtrainError, ValueError) as err:
            return self._refuse(task, Refusal(Reason.BAD_GLOBAL_MODEL), f"cannot fetch the global model: {err}", spec)
        if payload is None or basis != model_digest(start):
            why = "its update is no longer kept" if payload is None else "from another global model"
            return self._refuse(task, Refusal(Reason.ALREADY_RELEASED),
                                f"round {task.round} of job {task.job_id} was already released ({why});"
                                " it is never trained twice", spec)
        log.info("job %s round %d: sending the update charged before (no new spend)", task.job_id, task.round)
        bundle = pb.ResultBundle.FromString(payload)
        bundle.header.task_id = task.task_id
        self._deliver(row, bundle)

    def _local_round(self, spec: JobSpec, plan: RoundPlan, start: dict[str, np.ndarray]) -> LocalUpdate:
        """Read the data (bad rows skipped and logged here only) and train one round on it."""
        check = DataCheck()
        dataset = load_dataset(self.data, spec, check)
        if check.count:
            log.warning("job %s: %d problem(s) in %s, those rows are skipped (the coordinator is not told): %s",
                        spec.name, check.count, self.data, check.summary())
        if len(dataset) > self.policy.dataset_size:
            # Privacy holds (each row is sampled at the planned rate), but batches run larger than
            # planned and the coordinator's bound on an update may reject this node's.
            log.warning("job %s: %d usable rows, more than the policy's dataset_size %d; declare the real count",
                        spec.name, len(dataset), self.policy.dataset_size)
        update = train_round(spec, dataset, start, plan, expected_batch_size(plan, self.policy.dataset_size))
        # The training loss is a statistic of the data without noise: it stays in this log.
        log.info("job %s: local DP-SGD training loss %.4f on %d row(s)", spec.name, update.loss, len(dataset))
        return update

    def _train(self, task: pb.TaskHeader, spec: JobSpec, plan: RoundPlan, secagg: SecAggNode | None,
               update: LocalUpdate, start: dict[str, np.ndarray]) -> pb.ResultBundle:
        """The result to charge and send: the update (masked under secure aggregation) and the
        round's public metrics."""
        arrays = update.arrays
        metrics = {"noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate, "steps": plan.steps}
        if secagg is None:
            metrics["num-examples"] = self.policy.dataset_size  # Flower's strategies weigh by it
        else:
            arrays = {MASKED_TENSOR: self._mask(spec, secagg, arrays, start, self.policy.dataset_size)}
        return pb.ResultBundle(
            header=pb.ResultHeader(node_id=self.node_id, task_id=task.task_id, metrics=encode_values(metrics)),
            tensors=list(encode_arrays(arrays)),
        )

    @staticmethod
    def _mask(spec: JobSpec, secagg: SecAggNode, update: dict[str, np.ndarray], start: dict[str, np.ndarray],
              num_examples: int) -> np.ndarray:
        """The masked field vector of this node's weighted change to the global model."""
        change = {k: update[k].astype(np.float64) - start[k] for k in update}
        if not all(np.isfinite(v).all() for v in change.values()):
            raise FedtrainError("the trained update is not finite; nothing is sent")
        clip = clip_range(spec)
        weight = node_weight(num_examples, spec.secure_aggregation.max_weight)
        vector, clipped = encode(change, weight, clip, secagg.quant_bits)
        if clipped:
            log.warning("%d update elements exceeded secure_aggregation.clip_range %.4g and were clipped",
                        clipped, clip)
        return secagg.mask(vector)

    def _deliver(self, row: LedgerRow, bundle: pb.ResultBundle) -> None:
        """Send a charged result. The ε values in its header come from the ledger row."""
        header = bundle.header
        # The job's own ε only: the lifetime increase depends on the node's other jobs, which
        # are none of this coordinator's business (it stays in the ledger).
        for key, value in encode_values({"epsilon": row.job_epsilon, "delta": row.delta}).items():
            header.metrics[key].CopyFrom(value)

        def parts() -> Iterator[pb.ResultPart]:
            yield pb.ResultPart(header=header)
            for chunk in bundle.tensors:
                yield pb.ResultPart(tensor=chunk)

        try:
            self._send("SubmitResult", self._stub.SubmitResult, parts(), spec=_parsed(self.jobs.get(row.job_id).spec_json),
                       job_id=row.job_id, round=row.round,
                       tensors={c.name: TensorInfo(c.dtype, tuple(c.shape)) for c in bundle.tensors},
                       payload_sha256=payload_digest(bundle.tensors), epsilon=row.job_epsilon)
        except egress.EgressViolation as err:
            # E.g. charged under a policy whose dataset_size has changed since: never sent.
            log.error("result for job %s round %d is not sent: %s", row.job_id, row.round, err)
        except grpc.RpcError as err:
            if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                                  grpc.StatusCode.INVALID_ARGUMENT):
                raise  # transient: the result stays in the ledger and is sent again later
            # The coordinator will never take it (round over, or refused): the spend stays charged.
            log.warning("result for job %s round %d not accepted: %s", row.job_id, row.round, err.details())
        self.ledger.mark_sent(row.job_id, row.round)

    def _deliver_undelivered(self) -> None:
        for row, payload in self.ledger.undelivered():
            log.info("re-sending charged result for job %s round %d", row.job_id, row.round)
            self._deliver(row, pb.ResultBundle.FromString(payload))
