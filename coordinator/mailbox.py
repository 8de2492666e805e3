"""The coordinator's mailbox: tasks wait there until their node polls for them, and the
nodes' replies until their job's strategy loop collects them (``coordinator.grid``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import Manifest


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


class Mailbox:
    """Tasks waiting for their nodes, and the replies waiting for their strategy loop; and
    the two events that waiters watch: a change for the nodes' polls (a task posted, a job
    to offer) and a change in the nodes themselves (one polled or answered an offer), which
    a round waiting for its nodes watches (``NetworkGrid.get_node_ids``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[int, deque[str]] = {}
        self._tasks: dict[str, Task] = {}
        self._replies: dict[str, Message] = {}
        self._changes = 0  # tasks posted and wakes, for polls (see ``wait``)
        self._nodes = threading.Condition()
        self._node_changes = 0

    def post(self, task: Task) -> None:
        with self._cond:
            self._tasks[task.task_id] = task
            self._queues.setdefault(task.node_id, deque()).append(task.task_id)
            self._changes += 1
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake every waiter, e.g. because a new job can be offered or the coordinator stops."""
        with self._cond:
            self._changes += 1
            self._cond.notify_all()
        self.nodes_changed()

    def changes(self) -> int:
        with self._cond:
            return self._changes

    def wait(self, since: int, timeout: float) -> None:
        """Wait until a task is posted or a wake comes after ``since`` (a ``changes()`` taken before
        looking for work, so that nothing posted in between is slept through), or ``timeout`` passes."""
        with self._cond:
            self._cond.wait_for(lambda: self._changes != since, timeout)

    def nodes_changed(self) -> None:
        """A node polled, registered or answered an offer."""
        with self._nodes:
            self._node_changes += 1
            self._nodes.notify_all()

    def node_changes(self) -> int:
        with self._nodes:
            return self._node_changes

    def wait_nodes(self, since: int, timeout: float) -> None:
        """Wait until ``nodes_changed`` (or a wake) after ``since`` (a ``node_changes()``), or ``timeout``."""
        with self._nodes:
            self._nodes.wait_for(lambda: self._node_changes != since, timeout)

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

    def wait_replies(self, task_ids: set[str], timeout: float | None, stop: threading.Event) -> None:
        """Wait until every task has its reply, ``timeout`` passes, or ``stop`` is set (and ``wake`` called)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not task_ids <= self._replies.keys() and not stop.is_set():
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
