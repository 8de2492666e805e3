"""The node agent: the daemon a data owner runs next to their data.

It dials out to the coordinator, and is the only part of the node that talks to it: every
message goes through :meth:`NodeAgent._send`, which holds it to the egress check
(``nodes/egress.py``) and writes it to the audit log before it leaves. What it sends is
decided elsewhere, and comes back to it as a reply or a typed refusal:

- ``nodes/admission.py``: the answer to a job offer, from the spec and the policy alone;
- ``nodes/tasks.py``: whether a task may run, and its charged round (DP-SGD training
  through ``fedtrain.node.round.PrivateRound``, charged to the ledger *before* it is sent);
- ``nodes/secure_stages.py``: the answers to secure aggregation's stages.

What goes wrong with the data stays in the node's log.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import yaml

from fedtrain import errors
from fedtrain.errors import (
    AlreadyAnswered, EgressViolation, FedtrainError, NotFound, PermissionDenied, ProtocolMismatch, UnknownNode,
    WireError,
)
from fedtrain.faults import Faults
from fedtrain.node import approval
from fedtrain.node.audit_log import AuditLog
from fedtrain.policy import Decision, NodePolicy
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import GRPC_OPTIONS, PROTOCOL_VERSION, TensorInfo, decode_arrays, payload_digest
from fedtrain.protocol.refusal import Reason, Refusal
from fedtrain.protocol.tls import Identity, channel
from fedtrain.secagg.peers import PeerAuth
from fedtrain.sources import DataSource
from fedtrain.spec import JobSpec
from fedtrain.storage import private_dir, write_private
from nodes import admission, egress
from nodes.admission import Problem
from nodes.dialing import GIVE_UP_AFTER, Dialer
from nodes.jobs import JobBook, parse_spec
from nodes.state import StatePaths

if TYPE_CHECKING:  # loaded after registering: see NodeAgent._load_training
    from fedtrain.node.ledger import PrivacyLedger
    from nodes.secure_stages import SecureStages, StageReply
    from nodes.tasks import Charged, TrainingTasks

log = logging.getLogger("fedtrain.node")

_PROTO_DECISION = {
    Decision.ACCEPTED: pb.OfferAnswer.ACCEPTED,
    Decision.REFUSED: pb.OfferAnswer.REFUSED,
    Decision.PENDING_APPROVAL: pb.OfferAnswer.PENDING_APPROVAL,
}
# A refused registration: retrying cannot help.
_REGISTRATION_REFUSED = (PermissionDenied, ProtocolMismatch, WireError)
# A result the coordinator will never take (round over, or refused): it is not sent again.
_RESULT_NOT_TAKEN = (NotFound, AlreadyAnswered, WireError)


def _parsed(spec_json: str) -> JobSpec | None:
    try:
        return parse_spec(spec_json)
    except FedtrainError:
        return None


class NodeAgent:
    ledger: PrivacyLedger | None = None  # opened after registering, with the training machinery
    tasks: TrainingTasks
    secure: SecureStages

    def __init__(self, *, coordinator: str, data: DataSource, policy: NodePolicy, state_dir: Path, name: str,
                 poll_seconds: float = 10.0, faults: Faults = Faults(), identity: Identity | None = None,
                 join_token: str = "", give_up_after: float = GIVE_UP_AFTER):
        """``faults``: where to stop dead, for the tests of crashes and dropouts; ``identity``: the
        node's certificate for mutual TLS (None: plaintext); ``join_token`` enrolls it at the first
        Register; ``give_up_after``: seconds of certificate errors before the node stops dialling."""
        self._paths = StatePaths(private_dir(state_dir))
        self.coordinator = coordinator
        self.data = data
        self.policy = policy
        self.name = name
        self.poll_seconds = poll_seconds
        # The owner's commands (jobs --show, approve) apply the policy in force.
        write_private(self._paths.policy, yaml.safe_dump(policy.document()).encode(), fsync=False)
        self.jobs = JobBook(self._paths.jobs)
        self.audit = AuditLog(self._paths.audit)
        self.key = approval.load_or_create_key(self._paths.key)
        self.node_id = 0
        self.faults = faults
        # Signs this node's SecAgg+ keys and authenticates its peers' (None without TLS: no secure aggregation).
        self._peer_auth = PeerAuth(identity) if identity is not None else None
        self.join_token = join_token
        self._channel = channel(coordinator, identity, GRPC_OPTIONS)
        self._dialer = Dialer(coordinator, give_up_after)
        self._stub = pb_grpc.NodeServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()
        if self.ledger is not None:
            self.ledger.close()
        self.jobs.close()

    # --- outbound: every call is checked and audited before it leaves -------------
    def _send(self, message_type: str, call: Callable, request, spec: JobSpec | None = None, **audit) -> object:
        """The one way out: the egress check (against ``spec``, the job the message is about,
        and the policy), then the audit log, then the wire."""
        request = egress.check(request, spec, self.policy)
        self.audit.record(message_type, peer=self.coordinator, **audit)
        return call(request)

    # --- main loop ------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self._register(stop)
        if stop.is_set():
            return
        self._load_training()
        while not stop.is_set():
            try:
                # Charged results that a crash or an outage kept from the coordinator go first.
                self._deliver_undelivered()
                self._answer_offers()
                reply = self._send("Poll", self._stub.Poll,
                                   pb.PollRequest(node_id=self.node_id, wait_seconds=self.poll_seconds))
                self._dialer.succeeded()
                item = reply.WhichOneof("item")
                if item == "offer":
                    self._on_offer(reply.offer)
                elif item == "ended":
                    self._on_ended(reply.ended)
                elif item == "task":
                    self._on_task(reply.task)
            except grpc.RpcError as raised:
                err = errors.from_rpc(raised)
                if isinstance(err, UnknownNode):
                    self._register(stop)  # the coordinator lost us, e.g. a new state dir
                elif isinstance(err, PermissionDenied):  # e.g. revoked: retrying cannot help
                    raise type(err)(f"the coordinator refused this node: {err}") from None
                else:
                    self._dialer.failed(raised)
                    stop.wait(2.0)

    def _register(self, stop: threading.Event) -> None:
        delay = 0.5
        while not stop.is_set():
            try:
                reply = self._send("Register", self._stub.Register,
                                   pb.RegisterRequest(name=self.name, protocol_version=PROTOCOL_VERSION,
                                                      join_token=self.join_token))
                self.node_id = reply.node_id
                self._dialer.succeeded()
                log.info("registered with %s as node %d", self.coordinator, self.node_id)
                return
            except grpc.RpcError as raised:
                err = errors.from_rpc(raised)
                if isinstance(err, _REGISTRATION_REFUSED):
                    raise type(err)(f"the coordinator refused registration: {err}") from None
                self._dialer.failed(raised)  # says what it means; raises once retrying is hopeless
                stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _load_training(self) -> None:
        """Open the ledger and load what trains and masks: torch, Opacus and Flower take
        seconds to import, and the node registers without them, so the coordinator sees it
        as soon as it starts."""
        from fedtrain.node.ledger import PrivacyLedger
        from nodes.secure_stages import SecureStages
        from nodes.tasks import TrainingTasks

        self.ledger = PrivacyLedger(self._paths.ledger, max_epsilon=self.policy.max_epsilon, delta=self.policy.delta)
        self.secure = SecureStages(self._peer_auth, self.policy, self.ledger)
        self.tasks = TrainingTasks(self.data, self.policy, self.ledger, self.key, self.secure)

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

    def _on_ended(self, ended: pb.JobEnded) -> None:
        """The coordinator ended a job this node was offered: its owner sees it (`fedtrain node
        jobs`), and can no longer approve it if it was pending."""
        if ended.state not in ("finished", "failed", "cancelled"):
            log.warning("the coordinator says job %s ended in an unknown state; ignored", ended.job_id)
        elif self.jobs.end(ended.job_id, ended.state):
            log.info("job %s has ended on the coordinator: %s", ended.job_id, ended.state)

    def _answer_offers(self) -> None:
        for job in self.jobs.unanswered():
            self._send(
                "AnswerOffer", self._stub.AnswerOffer,
                pb.OfferAnswer(node_id=self.node_id, job_id=job.job_id, decision=_PROTO_DECISION[job.decision],
                               reason=job.answer),
                spec=_parsed(job.spec_json), job_id=job.job_id, detail=f"{job.decision.value}: {job.answer}",
            )
            self.jobs.mark_answered(job.job_id, job.decision)

    # --- tasks ----------------------------------------------------------------
    def _on_task(self, task: pb.TaskHeader) -> None:
        spec = _parsed(task.spec_json)  # once: every step below takes this object
        problem = self.tasks.check(task, self.jobs.get(task.job_id), spec)
        if problem is not None:
            return self._refuse(task, problem, spec)
        # From here on ``spec`` is the approved spec (the same digest).
        stage = task.secagg.WhichOneof("stage")
        if stage in ("setup", "share_keys", "unmask"):
            return self._answer_stage(task, spec, self.secure.answer(task, spec, self.node_id))
        if stage is None and self.tasks.charged_before(task):
            return self._release_again(task, spec)
        self._train(task, spec)

    def _train(self, task: pb.TaskHeader, spec: JobSpec) -> None:
        """A charged round: budget (and shares) checked, global model fetched, trained, charged, sent."""
        prepared = self.tasks.prepare(task, spec)
        if isinstance(prepared, Problem):
            return self._refuse(task, prepared, spec)
        if prepared.secagg is not None:
            self.faults.reach("secagg-before-masked")
        start = self._fetch(task, spec)
        if isinstance(start, Problem):
            return self._refuse(task, start, spec)
        charged = self.tasks.train(task, prepared, start, self.node_id, lambda: self._task_open(task, spec))
        if charged is None:
            return None  # the coordinator no longer waits for it: nothing was charged, nothing is sent
        if isinstance(charged, Problem):
            return self._refuse(task, charged, spec)
        self.faults.reach("after-ledger-commit")
        self._deliver(charged, spec)
        if prepared.secagg is not None:
            self.faults.reach("secagg-after-masked")

    def _release_again(self, task: pb.TaskHeader, spec: JobSpec) -> None:
        """A round charged before, asked for again: the same release, if from the same global model."""
        start = self._fetch(task, spec)
        released = start if isinstance(start, Problem) else self.tasks.release_again(task, start)
        if isinstance(released, Problem):
            return self._refuse(task, released, spec)
        self._deliver(released, spec)

    def _fetch(self, task: pb.TaskHeader, spec: JobSpec) -> dict[str, np.ndarray] | Problem:
        """The task's global model: exactly the job's trainable tensors."""
        try:
            chunks = self._send("FetchArrays", self._stub.FetchArrays,
                                pb.FetchRequest(node_id=self.node_id, task_id=task.task_id),
                                spec=spec, job_id=task.job_id, round=task.round)
            return decode_arrays(chunks, expected=self.tasks.manifest(spec))
        except (FedtrainError, ValueError) as err:
            return Problem(Refusal(Reason.BAD_GLOBAL_MODEL), f"cannot fetch the global model: {err}")

    def _task_open(self, task: pb.TaskHeader, spec: JobSpec) -> bool:
        """Whether the coordinator still waits for ``task``'s result. An unreachable coordinator may:
        the round is then charged, and its result kept until it can be sent."""
        try:
            request = pb.FetchRequest(node_id=self.node_id, task_id=task.task_id)
            return self._send("TaskOpen", self._stub.TaskOpen, request, spec=spec, job_id=task.job_id,
                              round=task.round).open
        except grpc.RpcError as raised:
            log.warning("cannot ask whether task %s is still open (%s); it is charged and kept to send",
                        task.task_id, errors.from_rpc(raised))
            return True

    def _refuse(self, task: pb.TaskHeader, problem: Problem, spec: JobSpec | None) -> None:
        """Tell the coordinator the typed refusal; the detail stays in this node's log."""
        log.warning("refusing task %s (job %s round %d): %s", task.task_id, task.job_id, task.round, problem.detail)
        refusal = problem.refusal.text()
        self._send("SubmitResult", self._stub.SubmitResult,
                   iter([pb.ResultPart(header=pb.ResultHeader(node_id=self.node_id, task_id=task.task_id,
                                                              refusal=refusal))]),
                   spec=spec, job_id=task.job_id, round=task.round, detail=f"refusal: {refusal}")

    def _answer_stage(self, task: pb.TaskHeader, spec: JobSpec, answer: StageReply | Problem) -> None:
        if isinstance(answer, Problem):
            return self._refuse(task, answer, spec)
        header = pb.ResultHeader(node_id=self.node_id, task_id=task.task_id, secagg=answer.reply)
        self._send("SubmitResult", self._stub.SubmitResult, iter([pb.ResultPart(header=header)]),
                   spec=spec, job_id=task.job_id, round=task.round, detail=answer.detail,
                   payload_sha256=hashlib.sha256(answer.reply.SerializeToString()).hexdigest())

    def _deliver(self, charged: Charged, spec: JobSpec | None) -> None:
        """Send a charged result; whatever becomes of it but an outage, it is not sent again."""
        row, bundle = charged.row, charged.bundle

        def parts() -> Iterator[pb.ResultPart]:
            yield pb.ResultPart(header=bundle.header)
            for chunk in bundle.tensors:
                yield pb.ResultPart(tensor=chunk)

        try:
            self._send("SubmitResult", self._stub.SubmitResult, parts(), spec=spec, job_id=row.job_id, round=row.round,
                       tensors={c.name: TensorInfo(c.dtype, tuple(c.shape)) for c in bundle.tensors},
                       payload_sha256=payload_digest(bundle.tensors), epsilon=row.job_epsilon)
        except EgressViolation as err:
            # E.g. charged under a policy whose dataset_size has changed since: never sent.
            log.error("result for job %s round %d is not sent: %s", row.job_id, row.round, err)
        except grpc.RpcError as raised:
            err = errors.from_rpc(raised)
            if not isinstance(err, _RESULT_NOT_TAKEN):
                raise  # transient: the result stays in the ledger and is sent again later
            log.warning("result for job %s round %d not accepted: %s", row.job_id, row.round, err)
        self.tasks.mark_sent(charged)

    def _deliver_undelivered(self) -> None:
        for charged in self.tasks.undelivered():
            log.info("re-sending charged result for job %s round %d", charged.row.job_id, charged.row.round)
            self._deliver(charged, _parsed(self.jobs.get(charged.row.job_id).spec_json))
