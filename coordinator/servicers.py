"""The coordinator's gRPC servicers: NodeService for nodes, JobService for operators.

Every refusal is a typed error of ``fedtrain.errors``, raised here or in what these call
(``coordinator.auth``, the stores, ``Coordinator.submit``) and sent by ``errors.abort``:
its status code, its message, and its class's name, which the other side turns back into
the class (e.g. ``UnknownNode``: the node registers again).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from flwr.app import Error, Message, MetricRecord, RecordDict

from fedtrain import errors
from fedtrain.errors import (
    AlreadyAnswered, EnrollmentError, FedtrainError, NotFound, NotReady, PermissionDenied, ProtocolMismatch,
    WireError,
)
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import PROTOCOL_VERSION, decode_arrays, decode_values, encode_arrays, encode_values
from fedtrain.protocol.records import numpy_to_arrays
from fedtrain.protocol.tls import fingerprint, role_and_name
from coordinator.auth import Auth
from coordinator.control import Coordinator
from coordinator.mailbox import Task

log = logging.getLogger("fedtrain.coordinator")

MAX_POLL_SECONDS = 30.0
# A long poll marks its node connected again at most this often (``grid.NODE_LIVENESS_SECONDS``
# is far longer): every wake of every poll need not be a write.
TOUCH_SECONDS = 5.0
# Characters of a node's free text (refusal reasons) that are logged and stored.
MAX_NODE_TEXT = 500
_DECISIONS = {
    pb.OfferAnswer.ACCEPTED: "accepted",
    pb.OfferAnswer.REFUSED: "refused",
    pb.OfferAnswer.PENDING_APPROVAL: "pending_approval",
}
# Flower error code carried by a node's refusal (Flower reserves small codes for itself).
REFUSAL_CODE = 100


def _abort(context: grpc.ServicerContext, err: FedtrainError) -> None:
    if isinstance(err, PermissionDenied):
        log.warning("refused %s: %s", context.peer(), err)
    errors.abort(context, err)


def _typed_errors(method: Callable) -> Callable:
    """``method`` (a unary or response-streaming RPC handler) answering its typed errors with their codes."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def streaming(self, request, context: grpc.ServicerContext):
            try:
                yield from method(self, request, context)
            except FedtrainError as err:
                _abort(context, err)
        return streaming

    @functools.wraps(method)
    def unary(self, request, context: grpc.ServicerContext):
        try:
            return method(self, request, context)
        except FedtrainError as err:
            _abort(context, err)
    return unary


def _bounded(text: str) -> str:
    """A node's free text as the coordinator logs and stores it: one node cannot grow either
    by megabytes a message."""
    cut = len(text) - MAX_NODE_TEXT
    return text if cut <= 0 else f"{text[:MAX_NODE_TEXT]}… ({cut} characters cut)"


class NodeServicer(pb_grpc.NodeServiceServicer):
    def __init__(self, coord: Coordinator, auth: Auth):
        self.c = coord
        self.auth = auth

    @_typed_errors
    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        self.auth.limit_peer(context)
        if request.protocol_version != PROTOCOL_VERSION:
            raise ProtocolMismatch(f"protocol {request.protocol_version!r} is not supported;"
                                   f" this coordinator speaks {PROTOCOL_VERSION}")
        name = request.name
        if not (0 < len(name) <= 128 and name.replace("-", "").replace("_", "").replace(".", "").isalnum()):
            raise WireError(f"node name {name[:128]!r} must be 1-128 of [A-Za-z0-9_.-]")
        registry = self.c.registry
        cert = self.auth.certificate(context, "node")
        if cert is None:
            node_id = registry.register_node(name)
        else:
            cert_name = role_and_name(cert)[1]
            if name != cert_name:
                raise PermissionDenied(f"a node registering as {name!r} holds the certificate of {cert_name!r}")
            fp = fingerprint(cert)
            if registry.node_by_fingerprint(fp) is not None:
                node_id = registry.register_node(name, fp)
            elif not request.join_token:
                raise EnrollmentError(f"certificate {fp[:23]}… of {name} is not enrolled; start the node once"
                                      " with the join token from `fedtrain coordinator token`")
            else:
                node_id = registry.enroll(request.join_token, name, fp, cert.not_valid_after_utc.timestamp())
                log.info("node %s enrolled with certificate %s", name, fp)
        # A (re)started node has lost the offers it never answered: offer them again.
        self.c.job_store.forget_unanswered_offers(node_id)
        self.c.mailbox.nodes_changed()
        log.info("node %s registered as %d", name, node_id)
        return pb.RegisterReply(node_id=node_id)

    @_typed_errors
    def Poll(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.PollReply:
        self.auth.node(context, request.node_id)
        with self.auth.poll_slot(request.node_id):
            return self._poll(request, context)

    def _poll(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.PollReply:
        wait = request.wait_seconds if math.isfinite(request.wait_seconds) else 0.0
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_POLL_SECONDS)
        mailbox, touched = self.c.mailbox, -math.inf
        while True:
            since = mailbox.changes()
            if time.monotonic() - touched >= TOUCH_SECONDS:
                self.c.registry.touch_node(request.node_id)
                touched = time.monotonic()
                mailbox.nodes_changed()  # a round waiting for its nodes may count this one now
            job = self.c.job_store.next_offer(request.node_id)
            if job is not None:
                return pb.PollReply(offer=pb.JobOffer(job_id=job.id, spec_json=job.spec_json))
            job = self.c.job_store.next_ended(request.node_id)
            if job is not None:
                return pb.PollReply(ended=pb.JobEnded(job_id=job.id, state=job.state))
            task = mailbox.take(request.node_id)
            if task is not None:
                config = {k: v for k, v in task.message.content["config"].items() if not isinstance(v, (list, bytes))}
                return pb.PollReply(task=pb.TaskHeader(
                    task_id=task.task_id, job_id=task.job_id, round=task.round,
                    message_type=task.message.metadata.message_type, config=encode_values(config),
                    # As stored now (not as the job started): what the node checks against its approval.
                    secagg=task.secagg, spec_json=self.c.job_store.job(task.job_id).spec_json,
                ))
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not context.is_active():
                return pb.PollReply()
            mailbox.wait(since, min(remaining, 1.0))

    @_typed_errors
    def AnswerOffer(self, request: pb.OfferAnswer, context: grpc.ServicerContext) -> pb.Ack:
        name = self.auth.node(context, request.node_id).name
        if self.c.job_store.job(request.job_id) is None:
            raise NotFound(f"unknown job {request.job_id!r}")
        decision = _DECISIONS.get(request.decision)
        if decision is None:
            raise WireError("decision must be ACCEPTED, REFUSED or PENDING_APPROVAL")
        reason = _bounded(request.reason)
        self.c.job_store.set_decision(request.job_id, request.node_id, decision, reason)
        self.c.mailbox.nodes_changed()  # a round waiting for the job's nodes counts again
        log.info("node %s: %s job %s (%r)", name, decision, request.job_id, reason)
        return pb.Ack()

    @_typed_errors
    def FetchArrays(self, request: pb.FetchRequest, context: grpc.ServicerContext):
        self.auth.node(context, request.node_id)
        task = self.c.mailbox.task(request.task_id)
        if task is None or task.node_id != request.node_id:
            raise NotFound(f"no open task {request.task_id!r} for node {request.node_id}")
        yield from encode_arrays(task.arrays)

    @_typed_errors
    def TaskOpen(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> pb.TaskState:
        self.auth.node(context, request.node_id)
        task = self.c.mailbox.task(request.task_id)
        return pb.TaskState(open=task is not None and task.node_id == request.node_id)

    @_typed_errors
    def SubmitResult(self, request_iterator, context: grpc.ServicerContext) -> pb.Ack:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise WireError("a result stream must start with a ResultHeader")
        header = first.header
        node = self.auth.node(context, header.node_id).name
        task = self.c.mailbox.task(header.task_id)
        if task is None or task.node_id != header.node_id:
            raise NotFound(f"no open task {header.task_id!r} for node {header.node_id}"
                           " (unknown, answered, or past its deadline)")
        metrics: dict = {}
        nbytes = first.ByteSize()
        refusal = _bounded(header.refusal)
        try:
            metrics = decode_values(header.metrics)
            if refusal:
                reply = Message(Error(code=REFUSAL_CODE, reason=refusal), reply_to=task.message)
            else:
                chunks = []
                for part in request_iterator:
                    if part.WhichOneof("part") != "tensor":
                        raise WireError("only tensor chunks may follow the ResultHeader")
                    nbytes += part.ByteSize()
                    chunks.append(part.tensor)
                max_bytes = sum(i.nbytes for i in task.expect.values())
                arrays = decode_arrays(chunks, expected=task.expect, max_total_bytes=max_bytes)
                task.accept(header, arrays)
                numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                reply = Message(
                    RecordDict({"arrays": numpy_to_arrays(arrays), "metrics": MetricRecord(numeric)}),
                    reply_to=task.message,
                )
        except WireError as err:
            # The round goes on without this node; the node learns exactly what was wrong.
            reason = _bounded(f"rejected by coordinator: {err}")
            self._record(task, node, metrics, reason, nbytes, rejected=True)
            self.c.mailbox.reply(task.task_id, Message(Error(code=REFUSAL_CODE, reason=reason), reply_to=task.message))
            raise
        if not self.c.mailbox.reply(task.task_id, reply):
            raise AlreadyAnswered(f"task {task.task_id} already has a result")
        self._record(task, node, metrics, refusal, nbytes, rejected=False)
        return pb.Ack()

    def _record(self, task: Task, node: str, metrics: dict, refusal: str, nbytes: int, rejected: bool) -> None:
        """What a node sent for ``task``: stored for `job status` and the report, and counted in the metrics."""
        self.c.job_store.record_node_round(task.job_id, task.round, task.node_id, metrics, refusal, nbytes)
        self.c.metrics.result_received(task.job_id, node, nbytes, metrics, rejected)


def _in_pool(method: Callable, pool: futures.ThreadPoolExecutor) -> Callable:
    """``method`` as a handler that grpcio runs on ``pool`` rather than on the server's own."""
    handler = functools.partial(method)
    handler.experimental_thread_pool = pool  # grpcio's per-method thread pool
    return handler


class JobServicer(pb_grpc.JobServiceServicer):
    """The operators' service; over mutual TLS each method first checks for an operator certificate.

    It runs on its own ``pool``: nodes that hold every thread of the server's pool in long
    polls cannot keep `job status` waiting.
    """

    def __init__(self, coord: Coordinator, auth: Auth, pool: futures.ThreadPoolExecutor):
        self.c = coord
        self.auth = auth
        for name in ("SubmitJob", "GetJob", "ListJobs", "FetchModel", "CancelJob"):
            setattr(self, name, _in_pool(getattr(self, name), pool))

    @_typed_errors
    def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.ServicerContext) -> pb.SubmitJobReply:
        self.auth.certificate(context, "operator")
        return pb.SubmitJobReply(job_id=self.c.submit(request.spec_json))

    @_typed_errors
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.JobStatus:
        self.auth.certificate(context, "operator")
        status = self.c.job_status(request.job_id)
        if status is None:
            raise NotFound(f"unknown job {request.job_id!r}; `fedtrain job status` lists jobs")
        return status

    @_typed_errors
    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsReply:
        self.auth.certificate(context, "operator")
        return pb.ListJobsReply(jobs=[self.c.job_status(j.id) for j in self.c.job_store.jobs()])

    @_typed_errors
    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.JobStatus:
        cert = self.auth.certificate(context, "operator")
        operator = "an operator" if cert is None else f"operator {role_and_name(cert)[1]}"
        return self.c.cancel(request.job_id, operator)

    @_typed_errors
    def FetchModel(self, request: pb.GetJobRequest, context: grpc.ServicerContext):
        self.auth.certificate(context, "operator")
        if self.c.job_store.job(request.job_id) is None:
            raise NotFound(f"unknown job {request.job_id!r}")
        checkpoint = self.c.job_store.model(request.job_id, request.round or None)
        if checkpoint is None:
            if request.round:
                raise NotFound(f"job {request.job_id} has no model after round {request.round}")
            raise NotReady(f"job {request.job_id} has no model yet")
        yield from encode_arrays(checkpoint[1])
