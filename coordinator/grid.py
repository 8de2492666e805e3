"""Flower's ``Grid`` over fedtrain's gRPC transport.

Flower strategies (``FedAvg.start()`` and friends) talk to nodes only through a
``Grid``. ``NetworkGrid`` implements it with a ``Mailbox``: pushed messages wait
there until their node polls for them, and replies arrive there from the node's
upload. The strategy loop runs unchanged on top.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedtrain.protocol.records import RESULT_METRICS, arrays_to_numpy, with_message_id
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.errors import JobCancelled, JobNotStarted, WireError
from fedtrain.privacy.accounting import RoundPlan
from fedtrain.protocol.codec import Manifest, decode_values, manifest_of, require_finite
from fedtrain.server.robust import check_plan, update_bound
from fedtrain.spec import JobSpec
from coordinator.job_store import JobStore
from coordinator.mailbox import Mailbox, Task

log = logging.getLogger("fedtrain.coordinator")

# A node counts as connected while it has polled within this many seconds.
NODE_LIVENESS_SECONDS = 30.0
# How long a round waits for connected nodes to decide on the job's offer. A node registers
# before it loads torch and Opacus, so a just-started one needs that time too (about 10 s
# with three starting at once on 2 cores); the wait ends as soon as no node is undecided.
DECISION_GRACE_SECONDS = 30.0

# A node's decision on a job's offer ("" if not offered yet), as a job's start failure names it.
_STANDING = {"pending_approval": "awaiting their owner's approval", "offered": "no answer"}


def check_update(spec: JobSpec, sent: dict[str, np.ndarray], header: pb.ResultHeader,
                 arrays: dict[str, np.ndarray]) -> None:
    """What a result in the clear must be: exactly the metrics a node sends, among them the
    example count FedAvg weighs by and the job's DP plan, and finite tensors that differ
    from ``sent`` (the global model the node was sent) by no more than that plan allows."""
    require_finite(arrays)
    metrics = decode_values(header.metrics)
    if metrics.keys() != RESULT_METRICS.keys():
        raise WireError(f"metrics must be exactly {sorted(RESULT_METRICS)}, not {sorted(metrics)}")
    for key, kind in RESULT_METRICS.items():
        value = metrics[key]
        # type(), not isinstance(): a bool is an int, and neither is a float here.
        if type(value) is not kind or (kind is float and not math.isfinite(value)):
            raise WireError(f"metric {key!r} must be a finite {kind.__name__}, not {value!r}")
    if metrics["num-examples"] < 1:
        raise WireError("metric 'num-examples' must be positive")
    plan = RoundPlan(metrics["noise-multiplier"], metrics["sample-rate"], metrics["steps"])
    check_plan(spec, plan)
    bound = update_bound(spec, plan, sent)
    norm = math.sqrt(sum(np.sum(np.square(arrays[k].astype(np.float64) - sent[k])) for k in sent))
    if not norm <= bound:
        raise WireError(f"the update moves the global model by {norm:.4g} (L2 norm), more than the bound of"
                        f" {bound:.4g} that one round of its DP plan can (fedtrain.server.robust.update_bound)")


class NetworkGrid(Grid):
    """The ``Grid`` of one job: its nodes are those that accepted the job and are connected.
    Its rounds run in the clear; ``coordinator.secure_round.SecureGrid`` runs them with
    secure aggregation."""

    def __init__(self, job_id: str, spec: JobSpec, jobs: JobStore, mailbox: Mailbox, run_id: int,
                 cancelled: threading.Event):
        self.job_id = job_id
        self.spec = spec
        self.jobs = jobs
        self.mailbox = mailbox
        self.cancelled = cancelled
        self._run = Run.create_empty(run_id)
        # The job has sent its first task (a resumed job has). Until then it must find its
        # nodes by the start deadline; ``started_at`` is when it did (monotonic).
        self._running = jobs.job(job_id).state != "waiting"
        self._start_deadline = time.monotonic() + spec.start_timeout
        self.started_at = -math.inf

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The job's connected nodes that accepted it, once there are ``min_nodes`` of them.

        Flower sizes a round by the nodes available when it asks, so a round that starts while
        connected nodes are still deciding on the offer would leave them out: they get
        ``DECISION_GRACE_SECONDS`` to answer first. While fewer than ``min_nodes`` have accepted,
        this waits, woken as soon as a node polls or answers, and logs where the nodes stand
        (Flower's own wait would log them as the nodes "connected", misleadingly). A job that has not
        started fails with ``JobNotStarted`` at its ``start_timeout``.
        """
        start, logged = time.monotonic(), ""
        while True:
            since = self.mailbox.node_changes()
            # Flower's sampler polls this while it waits for enough nodes; cancellation
            # has to reach into that loop from here.
            if self.cancelled.is_set():
                raise JobCancelled(f"job {self.job_id} was cancelled")
            if not self._running and time.monotonic() >= self._start_deadline:
                raise JobNotStarted(f"fewer than min_nodes={self.spec.min_nodes} nodes accepted the job within its"
                                    f" start_timeout of {self.spec.start_timeout:g} s: {self.standing()}")
            seen_since = time.time() - NODE_LIVENESS_SECONDS
            accepted = self.jobs.accepted_nodes(self.job_id, seen_since)
            if len(accepted) < self.spec.min_nodes:
                if (standing := self.standing()) != logged:  # each change once, not every second
                    log.info("job %s waits for min_nodes=%d nodes to accept it: %s", self.job_id,
                             self.spec.min_nodes, standing)
                    logged = standing
            elif (time.monotonic() - start >= DECISION_GRACE_SECONDS
                  or not self.jobs.undecided_nodes(self.job_id, seen_since)):
                return accepted
            # Woken by a node's change; a node that stops polling only ages out, hence the bound.
            self.mailbox.wait_nodes(since, 1.0)

    def standing(self) -> str:
        """Where the job's nodes stand on its offer, e.g. "refused: n0 (budget-exceeded); no answer: n1;
        accepted: n2", with each refusal's typed reason."""
        groups: dict[str, list[str]] = {}
        for name, decision, reason, connected in self.jobs.node_standing(
                self.job_id, time.time() - NODE_LIVENESS_SECONDS):
            if not connected and decision in ("", "accepted"):  # the others stand by their answer
                what = "accepted, then disconnected" if decision else "not connected"
            else:
                what = _STANDING.get(decision, decision or "not offered yet")
            groups.setdefault(what, []).append(f"{name} ({reason})" if decision == "refused" else name)
        return "; ".join(f"{what}: {', '.join(names)}" for what, names in groups.items()) or "no nodes registered"

    def post(self, msg: Message, arrays: dict[str, np.ndarray], expect: Manifest, accept: Callable,
             secagg: pb.SecAggRequest | None = None) -> str:
        """Queue ``msg`` for its node; returns the task id, which is the message id of the
        message the node's reply answers."""
        task_id = uuid.uuid4().hex
        round = int(msg.content["config"]["server-round"])
        self.mailbox.post(Task(task_id, self.job_id, msg.metadata.dst_node_id, round,
                               with_message_id(msg, task_id), arrays, expect, accept, secagg))
        if not self._running:
            self.jobs.mark_running(self.job_id)
            self._running = True
            self.started_at = time.monotonic()
        return task_id

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        # Flower sends every node the same ArrayRecord: its tensors are converted once, and
        # the tasks share them (read only).
        converted: dict[int, tuple[object, dict[str, np.ndarray]]] = {}
        for msg in messages:
            record = msg.content["arrays"]
            if id(record) not in converted:
                converted[id(record)] = (record, arrays_to_numpy(record))  # the record kept: its id stays its own
            arrays = converted[id(record)][1]
            ids.append(self.post(msg, arrays, expect=manifest_of(arrays),
                                 accept=functools.partial(check_update, self.spec, arrays)))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.mailbox.collect(message_ids)

    def exchange(self, task_ids: set[str], timeout: float | None) -> list[Message]:
        """Wait for the replies to ``task_ids``; the tasks still unanswered expire. A cancelled job
        abandons the exchange (JobCancelled): its nodes find their tasks closed."""
        self.mailbox.wait_replies(task_ids, timeout, self.cancelled)
        replies = self.mailbox.collect(task_ids)
        self.mailbox.expire(task_ids)
        if self.cancelled.is_set():
            raise JobCancelled(f"job {self.job_id} was cancelled")
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.exchange(set(self.push_messages(messages)), timeout)
