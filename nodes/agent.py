"""The node agent: the daemon a data owner runs next to their data.

It dials out to the coordinator, decides on job offers with the owner's policy,
trains rounds with the installed ClientApp under DP-SGD, charges each round to
the ledger *before* sending it, and writes every outbound message to the audit log.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
from flwr.app import DEFAULT_TTL, ConfigRecord, Context, Message, Metadata, RecordDict

from fedtrain import approval
from fedtrain.audit import AuditLog
from fedtrain.client_app import app as client_app
from fedtrain.client_app import arrays_to_numpy, numpy_to_arrays
from fedtrain.errors import BudgetExceeded, FedtrainError
from fedtrain.models import expected_manifest, load_dataset
from fedtrain.policy import Decision, NodePolicy, review_job
from fedtrain.privacy.accounting import RoundPlan, plan_round
from fedtrain.privacy.ledger import LedgerRow, PrivacyLedger
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import (
    GRPC_OPTIONS, PROTOCOL_VERSION, TensorInfo, decode_arrays, decode_values, encode_arrays, encode_values, manifest_of,
    model_digest, payload_digest,
)
from fedtrain.secagg.encoding import MASKED_TENSOR, clip_range, encode, node_weight
from fedtrain.secagg.node import SecAggNode
from fedtrain.spec import JobSpec, job_spec_from_json
from fedtrain.tls import Identity, channel
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
_SERVED = {"train": (None, "collect"), "train.secagg": ("setup", "share_keys", "unmask")}


class Failpoint(Exception):
    """Raised out of ``NodeAgent.run`` when the agent reaches its failpoint."""


class NodeAgent:
    def __init__(self, *, coordinator: str, data: Path, policy: NodePolicy, state_dir: Path, name: str,
                 poll_seconds: float = 10.0, failpoint: str = "", identity: Identity | None = None,
                 join_token: str = ""):
        """``identity``: the node's certificate for mutual TLS (None: plaintext); ``join_token``
        enrolls it at the first Register."""
        state_dir.mkdir(parents=True, exist_ok=True)
        paths = StatePaths(state_dir)
        self.coordinator = coordinator
        self.data = data
        self.policy = policy
        self.name = name
        self.poll_seconds = poll_seconds
        self.ledger = PrivacyLedger(paths.ledger, max_epsilon=policy.max_epsilon, delta=policy.delta)
        self.jobs = JobBook(paths.jobs)
        self.audit = AuditLog(paths.audit)
        self.key = approval.load_or_create_key(paths.key)
        self.node_id = 0
        self.failpoint = failpoint
        # Secure aggregation state of rounds in progress: in memory only, so a restart forgets
        # its secrets and the coordinator treats the node as dropped.
        self._secagg: dict[tuple[str, int], SecAggNode] = {}
        self._sizes: dict[tuple[str, int, int], int] = {}
        self.join_token = join_token
        self._channel = channel(coordinator, identity, GRPC_OPTIONS)
        self._stub = pb_grpc.NodeServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()
        self.ledger.close()
        self.jobs.close()

    # --- outbound: every call is audited before it leaves ------------------------
    def _send(self, message_type: str, call: Callable, request, **audit) -> object:
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

    def _examples(self, spec: JobSpec) -> int:
        """How many examples the job reads here; loading (e.g. tokenising) once per job and file version."""
        if not self.data.exists():
            return len(load_dataset(self.data, spec))  # which says what is missing
        stat = self.data.stat()
        key = (spec.digest(), stat.st_mtime_ns, stat.st_size)
        if key not in self._sizes:
            self._sizes[key] = len(load_dataset(self.data, spec))
        return self._sizes[key]

    # --- job offers -----------------------------------------------------------
    def _on_offer(self, offer: pb.JobOffer) -> None:
        try:
            spec = job_spec_from_json(offer.spec_json, source=f"job {offer.job_id}")
            review = review_job(spec, self.policy, self.ledger, self._examples(spec))
            decision, reason = review.decision, review.reason
        except FedtrainError as err:
            decision, reason = Decision.REFUSED, str(err)
        log.info("job %s: %s (%s)", offer.job_id, decision.value, reason)
        signature = None
        if decision is Decision.ACCEPTED:  # the policy approves a job within its bounds
            signature = approval.sign(self.key, offer.job_id, spec.digest())
        self.jobs.record(offer.job_id, offer.spec_json, decision, reason, signature)
        self._answer_offers()

    def _answer_offers(self) -> None:
        for job in self.jobs.unanswered():
            self._send(
                "AnswerOffer", self._stub.AnswerOffer,
                pb.OfferAnswer(node_id=self.node_id, job_id=job.job_id, decision=_PROTO_DECISION[job.decision],
                               reason=job.reason),
                job_id=job.job_id, detail=f"{job.decision.value}: {job.reason}",
            )
            self.jobs.mark_answered(job.job_id, job.decision)

    # --- training tasks -------------------------------------------------------
    def _check_task(self, task: pb.TaskHeader) -> str:
        """Why this task must not run, or '' if it may."""
        job = self.jobs.get(task.job_id)
        if job is None or job.decision is not Decision.ACCEPTED:
            state = "never offered" if job is None else job.decision.value
            return f"job {task.job_id} is not accepted on this node ({state})"
        stage = task.secagg.WhichOneof("stage")
        if stage not in _SERVED.get(task.message_type, ()):
            return f"a {task.message_type!r} task in secure aggregation stage {stage} is not served"
        spec = job.spec
        if job.signature is None or not approval.verify(self.key.public_key(), job.job_id, spec.digest(),
                                                         job.signature):
            return (f"job {task.job_id}: the spec on record carries no valid approval of this node"
                    " (was the job book changed?); nothing runs")
        try:
            sent = job_spec_from_json(task.spec_json, source="the task's job spec")
        except FedtrainError as err:
            return str(err)
        if sent.digest() != spec.digest():
            return (f"the task is for another spec than the approved one: "
                    f"{'; '.join(approval.spec_difference(spec, sent))}")
        if (spec.secagg is not None) != (stage is not None):
            # Above all, an update of a securely aggregated job never leaves unmasked.
            return (f"job {task.job_id} was accepted {'with' if spec.secagg else 'without'} secure aggregation;"
                    f" a task {'without' if spec.secagg else 'with'} it is refused")
        if not 1 <= task.round <= spec.training.rounds:
            return f"round {task.round} is outside the accepted job's {spec.training.rounds} rounds"
        if stage not in (None, "unmask") and self.ledger.row(task.job_id, task.round) is not None:
            # A masked update is never masked again: two maskings under different dropout sets
            # could reveal it. (A plain round run again gets the same release: see _release_again.)
            return f"round {task.round} of job {task.job_id} was already released; it is never trained twice"
        return ""

    def _refuse(self, task: pb.TaskHeader, refusal: str) -> None:
        log.warning("refusing task %s: %s", task.task_id, refusal)
        self._send("SubmitResult", self._stub.SubmitResult,
                   iter([pb.ResultPart(header=pb.ResultHeader(node_id=self.node_id, task_id=task.task_id,
                                                              refusal=refusal))]),
                   job_id=task.job_id, round=task.round, detail=f"refusal: {refusal}")

    def _on_task(self, task: pb.TaskHeader) -> None:
        refusal = self._check_task(task)
        if refusal:
            return self._refuse(task, refusal)
        spec = self.jobs.get(task.job_id).spec
        stage = task.secagg.WhichOneof("stage")
        if stage in ("setup", "share_keys", "unmask"):
            return self._on_secagg_stage(task, spec, stage)
        if stage is None and self.ledger.row(task.job_id, task.round) is not None:
            return self._release_again(task, spec)
        try:
            plan = plan_round(spec, self._examples(spec))
            quote = self.ledger.quote([plan])
            # The budget is checked before anything is fetched or trained.
            if not quote.allowed:
                return self._refuse(task, quote.refusal())
            secagg = None
            if stage == "collect":
                secagg = self._secagg_state(task)
                # Shares are checked before training, so a bad one costs no budget.
                secagg.receive_shares(task.secagg.collect)
                self._reach("secagg-before-masked")
            start = self._fetch(task, spec)
            bundle = self._train(task, spec, plan, secagg, start)
        except (FedtrainError, ValueError) as err:
            # Nothing was charged or sent: the round goes on without this node.
            return self._refuse(task, f"training failed: {err}")
        try:
            # Re-checked atomically with the write: the pre-check above may be stale.
            row = self.ledger.charge(job_id=task.job_id, round=task.round, plan=plan,
                                     job_delta=spec.privacy.delta, task_id=task.task_id,
                                     payload=bundle.SerializeToString(), basis=model_digest(start))
        except BudgetExceeded as err:
            return self._refuse(task, str(err))
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
                # Refuse early, before any key exists, when the round would exceed the budget.
                quote = self.ledger.quote([plan_round(spec, self._examples(spec))])
                if not quote.allowed:
                    return self._refuse(task, quote.refusal())
                # Earlier rounds of the job that never reached their unmask stage are over.
                for old in [k for k in self._secagg if k[0] == task.job_id and k[1] <= task.round]:
                    del self._secagg[old]
                self._secagg[key] = SecAggNode(task.job_id, task.round, self.node_id)
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
            return self._refuse(task, f"secure aggregation: {err}")
        header = pb.ResultHeader(node_id=self.node_id, task_id=task.task_id, secagg=reply)
        self._send("SubmitResult", self._stub.SubmitResult, iter([pb.ResultPart(header=header)]),
                   job_id=task.job_id, round=task.round, detail=detail,
                   payload_sha256=hashlib.sha256(reply.SerializeToString()).hexdigest())

    def _fetch(self, task: pb.TaskHeader, spec: JobSpec) -> dict[str, np.ndarray]:
        """The task's global model: exactly the job's trainable tensors."""
        chunks = self._send("FetchArrays", self._stub.FetchArrays,
                            pb.FetchRequest(node_id=self.node_id, task_id=task.task_id),
                            job_id=task.job_id, round=task.round)
        return decode_arrays(chunks, expected=expected_manifest(spec))

    def _release_again(self, task: pb.TaskHeader, spec: JobSpec) -> None:
        """Answer a round charged before (the coordinator restarted, or retries the round) with
        the same release: no new training, no new spend. Only for the same global model: an
        update trained from another one would be a second release of the round."""
        row, basis, payload = self.ledger.release(task.job_id, task.round)
        try:
            start = self._fetch(task, spec)
        except (FedtrainError, ValueError) as err:
            return self._refuse(task, f"cannot fetch the global model: {err}")
        if payload is None or basis != model_digest(start):
            why = "its update is no longer kept" if payload is None else "from another global model"
            return self._refuse(task, f"round {task.round} of job {task.job_id} was already released ({why});"
                                      " it is never trained twice")
        log.info("job %s round %d: sending the update charged before (no new spend)", task.job_id, task.round)
        bundle = pb.ResultBundle.FromString(payload)
        bundle.header.task_id = task.task_id
        self._deliver(row, bundle)

    def _train(self, task: pb.TaskHeader, spec: JobSpec, plan: RoundPlan,
               secagg: SecAggNode | None, arrays: dict[str, np.ndarray]) -> pb.ResultBundle:
        expected = expected_manifest(spec)
        message = Message(
            content=RecordDict({"arrays": numpy_to_arrays(arrays),
                                "config": ConfigRecord(decode_values(task.config))}),
            metadata=Metadata(run_id=0, message_id=task.task_id, src_node_id=0, dst_node_id=self.node_id,
                              reply_to_message_id="", group_id=str(task.round), created_at=time.time(),
                              ttl=DEFAULT_TTL, message_type=task.message_type),
        )
        context = Context(run_id=0, node_id=self.node_id, node_config={"data-path": str(self.data)},
                          state=RecordDict(), run_config={"job-spec": spec.canonical_json()})
        reply = client_app(message, context)
        metrics = dict(reply.content["metrics"])
        recorded = RoundPlan(metrics["noise-multiplier"], metrics["sample-rate"], int(metrics["steps"]))
        if recorded != plan:
            raise FedtrainError(f"training recorded {recorded}, not the planned {plan}; nothing is sent")
        update = arrays_to_numpy(reply.content["arrays"])
        if manifest_of(update) != expected:
            # Only the job's trainable tensors may leave: never a base-model tensor or an input.
            raise FedtrainError(f"the update holds {sorted(update)}, not the job's trainable tensors; nothing is sent")
        if secagg is not None:
            update = {MASKED_TENSOR: self._mask(spec, secagg, update, arrays, int(metrics.pop("num-examples")))}
        return pb.ResultBundle(
            header=pb.ResultHeader(node_id=self.node_id, task_id=task.task_id, metrics=encode_values(metrics)),
            tensors=list(encode_arrays(update)),
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
        for key, value in encode_values({"epsilon": row.job_epsilon, "delta": row.delta,
                                         "lifetime-epsilon-increase": row.epsilon}).items():
            header.metrics[key].CopyFrom(value)

        def parts() -> Iterator[pb.ResultPart]:
            yield pb.ResultPart(header=header)
            for chunk in bundle.tensors:
                yield pb.ResultPart(tensor=chunk)

        try:
            self._send("SubmitResult", self._stub.SubmitResult, parts(), job_id=row.job_id, round=row.round,
                       tensors={c.name: TensorInfo(c.dtype, tuple(c.shape)) for c in bundle.tensors},
                       payload_sha256=payload_digest(bundle.tensors), epsilon=row.job_epsilon)
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
