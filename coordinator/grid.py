"""Flower's ``Grid`` over fedtrain's gRPC transport.

Flower strategies (``FedAvg.start()`` and friends) talk to nodes only through a
``Grid``. ``NetworkGrid`` implements it with a ``Mailbox``: pushed messages wait
there until their node polls for them, and replies arrive there from the node's
upload. The strategy loop runs unchanged on top.
"""

from __future__ import annotations

import functools
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedtrain.protocol.records import RESULT_METRICS, arrays_to_numpy
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.errors import WireError
from fedtrain.privacy.accounting import RoundPlan
from fedtrain.protocol.codec import Manifest, decode_values, manifest_of, require_finite
from fedtrain.robust import check_plan, update_bound
from fedtrain.spec import JobSpec, job_spec_from_json
from coordinator.store import Store

# A node counts as connected while it has polled within this many seconds.
NODE_LIVENESS_SECONDS = 30.0
# How long a round waits for connected nodes to decide on the job's offer.
DECISION_GRACE_SECONDS = 10.0


class JobCancelled(Exception):
    """Raised into the strategy loop when its job can no longer run."""


@dataclass
class Task:
    task_id: str
    job_id: str
    node_id: int
    round: int
    message: Message
    arrays: dict[str, np.ndarray]       # what the node fetches: the global model, or nothing
    expect: Manifest                    # the tensors its result must hold, exactly
    # Checks (and, for secure aggregation, takes in) a result before it counts as the reply;
    # raises WireError.
    accept: Callable[[pb.ResultHeader, dict[str, np.ndarray]], None]
    secagg: pb.SecAggRequest | None = None


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
    bound = update_bound(spec, plan, sum(a.size for a in sent.values()))
    norm = math.sqrt(sum(np.sum(np.square(arrays[k].astype(np.float64) - sent[k])) for k in sent))
    if not norm <= bound:
        raise WireError(f"the update moves the global model by {norm:.4g} (L2 norm), more than the bound of"
                        f" {bound:.4g} that one round of its DP plan can (fedtrain.robust.update_bound)")


class Mailbox:
    """Tasks waiting for their nodes, and the replies waiting for their strategy loop."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[int, deque[str]] = {}
        self._tasks: dict[str, Task] = {}
        self._replies: dict[str, Message] = {}

    def post(self, task: Task) -> None:
        with self._cond:
            self._tasks[task.task_id] = task
            self._queues.setdefault(task.node_id, deque()).append(task.task_id)
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake waiting polls, e.g. because a new job can be offered."""
        with self._cond:
            self._cond.notify_all()

    def wait(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def take(self, node_id: int) -> Task | None:
        with self._cond:
            queue = self._queues.get(node_id)
            while queue:
                task = self._tasks.get(queue.popleft())
                if task is not None:
                    return task
            return None

    def task(self, task_id: str) -> Task | None:
        with self._cond:
            return self._tasks.get(task_id)

    def reply(self, task_id: str, message: Message) -> bool:
        """Store a reply; False when the task is unknown, expired or already answered."""
        with self._cond:
            if task_id not in self._tasks or task_id in self._replies:
                return False
            self._replies[task_id] = message
            self._cond.notify_all()
            return True

    def wait_replies(self, task_ids: set[str], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not task_ids <= self._replies.keys():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                self._cond.wait(remaining)

    def collect(self, task_ids: Iterable[str]) -> list[Message]:
        """Pop the replies that have arrived; their tasks are done."""
        with self._cond:
            out = []
            for tid in task_ids:
                if tid in self._replies:
                    out.append(self._replies.pop(tid))
                    del self._tasks[tid]
            return out

    def expire(self, task_ids: Iterable[str]) -> None:
        """Forget unanswered tasks, so that late results are refused."""
        with self._cond:
            for tid in task_ids:
                self._tasks.pop(tid, None)
                self._replies.pop(tid, None)


class NetworkGrid(Grid):
    """The ``Grid`` of one job: its nodes are those that accepted the job and are connected."""

    def __init__(self, job_id: str, store: Store, mailbox: Mailbox, run_id: int, cancelled: threading.Event):
        self.job_id = job_id
        self.store = store
        self.mailbox = mailbox
        self.cancelled = cancelled
        self._run = Run.create_empty(run_id)
        # Runs a training round with secure aggregation instead of in the clear (set by the runner).
        self.secure: Callable[[list[Message], float | None], list[Message]] | None = None

    @functools.cached_property
    def spec(self) -> JobSpec:
        return job_spec_from_json(self.store.job(self.job_id).spec_json)

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
        # Flower sizes a round by the nodes available when it asks, so a round that starts
        # while connected nodes are still deciding on the offer would leave them out: give
        # them a moment to answer first.
        deadline = time.monotonic() + DECISION_GRACE_SECONDS
        while self.store.undecided_nodes(self.job_id, time.time() - NODE_LIVENESS_SECONDS):
            if time.monotonic() > deadline or self.cancelled.wait(0.2):
                break
        # Flower's sampler polls this while it waits for enough nodes; cancellation
        # has to reach into that loop from here.
        if self.cancelled.is_set():
            raise JobCancelled(f"job {self.job_id} was cancelled")
        return self.store.accepted_nodes(self.job_id, seen_since=time.time() - NODE_LIVENESS_SECONDS)

    def post(self, msg: Message, arrays: dict[str, np.ndarray], expect: Manifest, accept: Callable,
             secagg: pb.SecAggRequest | None = None) -> str:
        """Queue ``msg`` for its node; returns the task id."""
        task_id = uuid.uuid4().hex
        # Flower derives message ids on its own links; ours are the task ids.
        msg.metadata.__dict__["_message_id"] = task_id
        round = int(msg.content["config"]["server-round"])
        self.mailbox.post(Task(task_id, self.job_id, msg.metadata.dst_node_id, round, msg, arrays, expect,
                               accept, secagg))
        self.store.mark_running(self.job_id)
        return task_id

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            arrays = arrays_to_numpy(msg.content["arrays"])
            ids.append(self.post(msg, arrays, expect=manifest_of(arrays),
                                 accept=functools.partial(check_update, self.spec, arrays)))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.mailbox.collect(message_ids)

    def exchange(self, task_ids: set[str], timeout: float | None) -> list[Message]:
        """Wait for the replies to ``task_ids``; the tasks still unanswered expire."""
        self.mailbox.wait_replies(task_ids, timeout)
        replies = self.mailbox.collect(task_ids)
        self.mailbox.expire(task_ids)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self.secure is not None and messages and messages[0].metadata.message_type == "train":
            return self.secure(messages, timeout)
        return self.exchange(set(self.push_messages(messages)), timeout)
