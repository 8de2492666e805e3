"""The coordinator's gRPC services: NodeService for nodes, JobService for operators,
plus the standard health and reflection services."""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from torch.utils.data import TensorDataset

from fedtrain.protocol.records import numpy_to_arrays
from fedtrain.errors import FedtrainError, WireError
from fedtrain.models import initial_state, load_dataset
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import (
    GRPC_OPTIONS, PROTOCOL_VERSION, decode_arrays, decode_values, encode_arrays, encode_values,
)
from fedtrain.report import REPORT_HTML, write_report
from fedtrain.spec import JobSpec, job_spec_from_json
from fedtrain.storage import private_dir
from fedtrain.tls import Identity, fingerprint, peer_certificate, role_and_name
from coordinator.grid import Mailbox
from coordinator.limits import ConcurrencyLimit, RateLimiter
from coordinator.runner import JobRunner
from coordinator.store import EnrollmentError, Store

log = logging.getLogger("fedtrain.coordinator")

MAX_POLL_SECONDS = 30.0
# Node RPCs per second per node (and per peer address for unregistered callers), and burst.
RATE_PER_SECOND = 50.0
RATE_BURST = 200
# Open long polls per node: an agent keeps one, and one more covers its restart.
MAX_POLLS_PER_NODE = 2
# Threads of the operators' service, apart from the nodes' pool.
OPERATOR_WORKERS = 8
# Characters of a node's free text (refusal reasons) that are logged and stored.
MAX_NODE_TEXT = 500
_DECISIONS = {
    pb.OfferAnswer.ACCEPTED: "accepted",
    pb.OfferAnswer.REFUSED: "refused",
    pb.OfferAnswer.PENDING_APPROVAL: "pending_approval",
}
# Flower error code carried by a node's refusal (Flower reserves small codes for itself).
REFUSAL_CODE = 100


class Coordinator:
    """State shared by both services: the store, the mailbox and the running jobs."""

    def __init__(self, state_dir: Path, identity: Identity | None = None, eval_dir: Path | None = None):
        private_dir(state_dir)
        # With an identity the coordinator speaks mutual TLS only, and knows nodes by certificate.
        self.identity = identity
        self.store = Store(state_dir / "coordinator.db")
        self.reports = private_dir(state_dir / "reports")  # one directory per ended job
        # The only files a job's evaluation.data may name.
        self.eval_dir = private_dir(state_dir / "eval") if eval_dir is None else eval_dir
        self.mailbox = Mailbox()
        self.runners: dict[str, JobRunner] = {}
        # Per node id for registered nodes, per peer address for Register.
        self.limits = RateLimiter(per_second=RATE_PER_SECOND, burst=RATE_BURST)
        self.polls = ConcurrencyLimit(MAX_POLLS_PER_NODE)
        # Flower stamps messages with a process-wide task identity; the coordinator plays
        # the server's role in every job.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self._resume_jobs()

    def _resume_jobs(self) -> None:
        """Jobs a stop or crash interrupted go on after their last checkpoint."""
        for job in self.store.active_jobs():
            spec = job_spec_from_json(job.spec_json)
            try:
                eval_data = self.evaluation_data(spec)
            except FedtrainError as err:
                self.store.set_job_state(job.id, "failed", f"cannot resume: {err}")
                continue
            # A job that stopped before its first checkpoint starts over (the starting model is seeded).
            initial = None if self.store.model(job.id) is not None else initial_state(spec)
            log.info("resuming job %s (%s)", job.id, job.name)
            self._start(job.id, spec, eval_data, initial)

    def _start(self, job_id: str, spec: JobSpec, eval_data: TensorDataset | None,
               initial: dict[str, np.ndarray] | None) -> None:
        runner = JobRunner(job_id, spec, self.store, self.mailbox, len(self.runners) + 1, eval_data, initial,
                           on_end=self.write_report)
        self.runners[job_id] = runner
        runner.start()
        self.mailbox.wake()

    def submit(self, spec_json: str) -> str:
        spec = job_spec_from_json(spec_json, source="submitted job spec")
        # Build the starting model (which checks a transformer base against the job's hash)
        # and read the evaluation data before storing anything: a bad job stores nothing.
        initial = initial_state(spec)
        eval_data = self.evaluation_data(spec)
        job_id = self.store.create_job(spec.name, spec.canonical_json())
        self._start(job_id, spec, eval_data, initial)
        return job_id

    def evaluation_data(self, spec: JobSpec) -> TensorDataset | None:
        """The job's evaluation table, from the evaluation directory only (symlinks and ``..``
        resolved first). Errors name the path as the job gave it, never what a file holds: the
        operator who submits a job may not read the coordinator's disk through them."""
        if spec.evaluation is None:
            return None
        name = spec.evaluation.data
        try:
            root = self.eval_dir.resolve()
            path = (root / name).resolve()
            found = path.is_relative_to(root) and path.is_file()
        except (OSError, ValueError):  # e.g. a name too long, or with a NUL byte
            found = False
        if not found:
            raise FedtrainError(f"evaluation.data {name[:200]!r} is not a file in the coordinator's evaluation"
                                " directory (`fedtrain coordinator start --eval-dir`)")
        try:
            return load_dataset(path, spec)
        except Exception as err:  # whatever the reader raises may quote the file
            log.warning("evaluation table %s cannot be read for job %s (%s)", path, spec.name, type(err).__name__)
            raise FedtrainError(f"evaluation.data {name[:200]!r} cannot be read as this job's evaluation table:"
                                " check its format, columns and labels") from None

    def write_report(self, job_id: str, state: str, error: str) -> None:
        """The report of a job that has just ended in ``state``."""
        status = self.job_status(job_id)
        status.state, status.error = state, error
        try:
            path = write_report(status, private_dir(self.reports / job_id))
        except Exception:  # a report that cannot be written costs the report, not the job
            log.exception("job %s: cannot write its report", job_id)
            return
        log.info("job %s: report written to %s", job_id, path)

    def stop(self) -> None:
        for runner in self.runners.values():
            runner.cancelled.set()
        self.mailbox.wake()

    def job_status(self, job_id: str) -> pb.JobStatus | None:
        job = self.store.job(job_id)
        if job is None:
            return None
        spec = job_spec_from_json(job.spec_json)
        status = pb.JobStatus(
            job_id=job.id, name=job.name, state=job.state, error=job.error,
            rounds_total=spec.training.rounds, spec_json=job.spec_json,
        )
        report = self.reports / job_id / REPORT_HTML
        if report.exists():
            status.report_path = str(report.resolve())
        for node_id, name, decision, reason in self.store.decisions(job_id):
            status.nodes.add(node_id=node_id, name=name, decision=decision, reason=reason)
        for round, metrics, wall in self.store.rounds(job_id):
            r = status.rounds.add(round=round, metrics=metrics, wall_seconds=wall)
            for node_id, name, node_metrics, refusal, nbytes in self.store.node_rounds(job_id, round):
                r.nodes.add(node_id=node_id, name=name, metrics=encode_values(node_metrics),
                            refusal=refusal, bytes_received=nbytes)
        return status


def _limit(coord: Coordinator, key, who: str, context: grpc.ServicerContext) -> None:
    if not coord.limits.allow(key):
        log.warning("rate limit: %s exceeds %g requests/s", who, RATE_PER_SECOND)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"{who} sends more than {RATE_PER_SECOND:g} requests per second; slow down and retry")


def _bounded(text: str) -> str:
    """A node's free text as the coordinator logs and stores it: one node cannot grow either
    by megabytes a message."""
    cut = len(text) - MAX_NODE_TEXT
    return text if cut <= 0 else f"{text[:MAX_NODE_TEXT]}… ({cut} characters cut)"


def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    log.warning("refused %s: %s", context.peer(), message)
    context.abort(code, message)


def _certificate(coord: Coordinator, context: grpc.ServicerContext, role: str):
    """The caller's verified certificate, which must be a ``role`` certificate (None on a plaintext coordinator)."""
    if coord.identity is None:
        return None
    cert = peer_certificate(context)
    cert_role, name = role_and_name(cert)
    if cert_role != role:
        _refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                f"a {cert_role or 'role-less'} certificate ({name}) may not call the {role}s' service")
    revoked = coord.store.revoked_at(fingerprint(cert))
    if revoked is not None:
        _refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                f"certificate of {name} ({fingerprint(cert)[:23]}…) was revoked"
                f" {time.strftime('%Y-%m-%d %H:%M', time.gmtime(revoked))} UTC")
    return cert


def _known_node(coord: Coordinator, node_id: int, context: grpc.ServicerContext) -> str:
    # Ids are SQLite integers; a larger uint64 from the wire names no node.
    node = coord.store.node(node_id) if node_id < 2**63 else None
    if node is None:
        _limit(coord, context.peer().rsplit(":", 1)[0], f"peer {context.peer()}", context)
        context.abort(grpc.StatusCode.NOT_FOUND, f"unknown node id {node_id}: call Register first")
    cert = _certificate(coord, context, "node")
    if cert is not None and fingerprint(cert) != node.fingerprint:
        _refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                f"node id {node_id} is {node.name}, enrolled with another certificate than"
                f" {role_and_name(cert)[1]}'s; call Register")
    if node.revoked_at is not None:
        _refuse(context, grpc.StatusCode.PERMISSION_DENIED, f"node {node.name} was revoked")
    _limit(coord, node_id, f"node {node_id} ({node.name})", context)
    return node.name


class NodeServicer(pb_grpc.NodeServiceServicer):
    def __init__(self, coord: Coordinator):
        self.c = coord

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        _limit(self.c, context.peer().rsplit(":", 1)[0], f"peer {context.peer()}", context)
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol {request.protocol_version!r} is not supported; this coordinator speaks {PROTOCOL_VERSION}",
            )
        name = request.name
        if not (0 < len(name) <= 128 and name.replace("-", "").replace("_", "").replace(".", "").isalnum()):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"node name {name[:128]!r} must be 1-128 of [A-Za-z0-9_.-]")
        cert = _certificate(self.c, context, "node")
        if cert is None:
            node_id = self.c.store.register_node(name)
        else:
            cert_name = role_and_name(cert)[1]
            if name != cert_name:
                _refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                        f"a node registering as {name!r} holds the certificate of {cert_name!r}")
            fp = fingerprint(cert)
            try:
                if self.c.store.node_by_fingerprint(fp) is not None:
                    node_id = self.c.store.register_node(name, fp)
                elif not request.join_token:
                    raise EnrollmentError(f"certificate {fp[:23]}… of {name} is not enrolled; start the node once"
                                          " with the join token from `fedtrain coordinator token`")
                else:
                    node_id = self.c.store.enroll(request.join_token, name, fp, cert.not_valid_after_utc.timestamp())
                    log.info("node %s enrolled with certificate %s", name, fp)
            except EnrollmentError as err:
                _refuse(context, grpc.StatusCode.PERMISSION_DENIED, str(err))
        log.info("node %s registered as %d", name, node_id)
        return pb.RegisterReply(node_id=node_id)

    def Poll(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.PollReply:
        _known_node(self.c, request.node_id, context)
        if not self.c.polls.acquire(request.node_id):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"node {request.node_id} already has"
                          f" {MAX_POLLS_PER_NODE} polls open; poll again when one has returned")
        try:
            return self._poll(request, context)
        finally:
            self.c.polls.release(request.node_id)

    def _poll(self, request: pb.PollRequest, context: grpc.ServicerContext) -> pb.PollReply:
        wait = request.wait_seconds if math.isfinite(request.wait_seconds) else 0.0
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_POLL_SECONDS)
        while True:
            self.c.store.touch_node(request.node_id)
            job = self.c.store.next_offer(request.node_id)
            if job is not None:
                return pb.PollReply(offer=pb.JobOffer(job_id=job.id, spec_json=job.spec_json))
            task = self.c.mailbox.take(request.node_id)
            if task is not None:
                config = {k: v for k, v in task.message.content["config"].items() if not isinstance(v, (list, bytes))}
                return pb.PollReply(task=pb.TaskHeader(
                    task_id=task.task_id, job_id=task.job_id, round=task.round,
                    message_type=task.message.metadata.message_type, config=encode_values(config),
                    secagg=task.secagg, spec_json=self.c.store.job(task.job_id).spec_json,
                ))
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not context.is_active():
                return pb.PollReply()
            self.c.mailbox.wait(min(remaining, 1.0))

    def AnswerOffer(self, request: pb.OfferAnswer, context: grpc.ServicerContext) -> pb.Ack:
        name = _known_node(self.c, request.node_id, context)
        if self.c.store.job(request.job_id) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown job {request.job_id!r}")
        decision = _DECISIONS.get(request.decision)
        if decision is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "decision must be ACCEPTED, REFUSED or PENDING_APPROVAL")
        reason = _bounded(request.reason)
        self.c.store.set_decision(request.job_id, request.node_id, decision, reason)
        log.info("node %s: %s job %s (%r)", name, decision, request.job_id, reason)
        return pb.Ack()

    def FetchArrays(self, request: pb.FetchRequest, context: grpc.ServicerContext):
        _known_node(self.c, request.node_id, context)
        task = self.c.mailbox.task(request.task_id)
        if task is None or task.node_id != request.node_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no open task {request.task_id!r} for node {request.node_id}")
        yield from encode_arrays(task.arrays)

    def SubmitResult(self, request_iterator, context: grpc.ServicerContext) -> pb.Ack:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a result stream must start with a ResultHeader")
        header = first.header
        _known_node(self.c, header.node_id, context)
        task = self.c.mailbox.task(header.task_id)
        if task is None or task.node_id != header.node_id:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no open task {header.task_id!r} for node {header.node_id} (unknown, answered, or past its deadline)",
            )
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
            rejected = _bounded(f"rejected by coordinator: {err}")
            self.c.store.record_node_round(task.job_id, task.round, header.node_id, metrics, rejected, nbytes)
            self.c.mailbox.reply(task.task_id, Message(Error(code=REFUSAL_CODE, reason=rejected), reply_to=task.message))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        if not self.c.mailbox.reply(task.task_id, reply):
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"task {task.task_id} already has a result")
        self.c.store.record_node_round(task.job_id, task.round, header.node_id, metrics, refusal, nbytes)
        return pb.Ack()


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

    def __init__(self, coord: Coordinator, pool: futures.ThreadPoolExecutor):
        self.c = coord
        for name in ("SubmitJob", "GetJob", "ListJobs", "FetchModel"):
            setattr(self, name, _in_pool(getattr(self, name), pool))

    def SubmitJob(self, request: pb.SubmitJobRequest, context: grpc.ServicerContext) -> pb.SubmitJobReply:
        _certificate(self.c, context, "operator")
        try:
            return pb.SubmitJobReply(job_id=self.c.submit(request.spec_json))
        except (FedtrainError, ValueError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.JobStatus:
        _certificate(self.c, context, "operator")
        status = self.c.job_status(request.job_id)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown job {request.job_id!r}; `fedtrain job status` lists jobs")
        return status

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsReply:
        _certificate(self.c, context, "operator")
        return pb.ListJobsReply(jobs=[self.c.job_status(j.id) for j in self.c.store.jobs()])

    def FetchModel(self, request: pb.GetJobRequest, context: grpc.ServicerContext):
        _certificate(self.c, context, "operator")
        if self.c.store.job(request.job_id) is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown job {request.job_id!r}")
        checkpoint = self.c.store.model(request.job_id, request.round or None)
        if checkpoint is None:
            what = f"no model after round {request.round}" if request.round else "no model yet"
            context.abort(grpc.StatusCode.NOT_FOUND if request.round else grpc.StatusCode.FAILED_PRECONDITION,
                          f"job {request.job_id} has {what}")
        yield from encode_arrays(checkpoint[1])


def serve(state_dir: Path, host: str = "127.0.0.1", port: int = 0, workers: int = 32,
          identity: Identity | None = None, eval_dir: Path | None = None) -> tuple[grpc.Server, int, Coordinator]:
    """Start the coordinator; returns the server, the bound port and the shared state.

    With ``identity`` it serves mutual TLS only; without, plaintext (``--insecure``).
    ``eval_dir`` holds the tables jobs may evaluate on (default: ``state_dir/eval``).
    """
    coord = Coordinator(state_dir, identity, eval_dir)
    # Each connected node holds one worker during its long poll: size the pool for the consortium.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_OPTIONS)
    operators = futures.ThreadPoolExecutor(max_workers=OPERATOR_WORKERS, thread_name_prefix="operator")
    pb_grpc.add_NodeServiceServicer_to_server(NodeServicer(coord), server)
    pb_grpc.add_JobServiceServicer_to_server(JobServicer(coord, operators), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name[s].full_name for s in ("NodeService", "JobService")]
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    if identity is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, identity.server_credentials())
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound, coord
