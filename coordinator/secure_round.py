"""``SecureGrid``: the ``NetworkGrid`` of a job with secure aggregation.

The Flower strategy asks the grid for a round of "train" replies; this grid runs the
four SecAgg+ stages of ``fedtrain.secagg`` instead and hands the strategy a single reply:
the weighted average of the updates, which is all the coordinator ever learns. Flower's own SecAgg+ workflow hands its legacy
strategies the aggregate the same way. A round whose sum no honest nodes can send
(``encoding.check_sum``) is given up like a failed one: the global model stays.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedtrain.protocol.records import arrays_to_numpy, numpy_to_arrays
from fedtrain.errors import SecAggError, WireError
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol.codec import manifest_of
from fedtrain.server.strategy import AGGREGATED_NODES
from fedtrain.secagg.encoding import (
    MASKED_TENSOR, ImpossibleAggregate, clip_range, masked_manifest, unflatten, vector_length,
)
from fedtrain.secagg.server import SecAggServer
from fedtrain.spec import JobSpec
from coordinator.grid import NetworkGrid
from coordinator.job_store import JobStore
from coordinator.mailbox import Mailbox
from coordinator.registry import Registry

log = logging.getLogger("fedtrain.coordinator")

# Flower error code of a round that secure aggregation could not finish.
SECAGG_FAILED = 101


def _answer(header: pb.ResultHeader, stage: str):
    if header.secagg.WhichOneof("stage") != stage:
        raise WireError(f"this secure aggregation task expects the node's {stage}")
    return getattr(header.secagg, stage)


class SecureGrid(NetworkGrid):
    """A job's grid whose training rounds are SecAgg+ rounds; its other messages go as on a ``NetworkGrid``."""

    def __init__(self, job_id: str, spec: JobSpec, jobs: JobStore, mailbox: Mailbox, run_id: int,
                 cancelled: threading.Event, registry: Registry):
        """``registry``: the nodes' enrolled certificates, which sign their key advertisements."""
        super().__init__(job_id, spec, jobs, mailbox, run_id, cancelled)
        self.registry = registry

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            return self.secure_round(messages, timeout)
        return super().send_and_receive(messages, timeout=timeout)

    def secure_round(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Run one SecAgg+ training round with the nodes ``messages`` are addressed to."""
        first = messages[0]
        server_round = int(first.content["config"]["server-round"])
        current = arrays_to_numpy(first.content["arrays"])
        manifest = manifest_of(current)
        by_node = {m.metadata.dst_node_id: m for m in messages}
        settings = self.spec.secure_aggregation
        lock = threading.Lock()  # answers arrive on the RPC threads

        def enrolled(node: int) -> str | None:
            row = self.registry.node(node)
            return row.fingerprint if row is not None else None

        def stage(name: str, requests: dict, take, wait: float | None, train: bool = False) -> None:
            """Send one stage's requests and wait for the answers, which ``take`` checks and keeps."""
            ids = set()
            for node, request in requests.items():
                def accept(header: pb.ResultHeader, arrays: dict[str, np.ndarray], node: int = node) -> None:
                    with lock:
                        take(node, header, arrays)
                msg = by_node[node] if train else self.create_message(
                    RecordDict({"config": ConfigRecord({"server-round": server_round})}), "train.secagg", node,
                    str(server_round))
                ids.add(self.post(msg, current if train else {}, masked_manifest(manifest) if train else {}, accept,
                                  secagg=pb.SecAggRequest(**{name: request})))
            answered = {reply.metadata.src_node_id for reply in self.exchange(ids, wait)}
            if name != "unmask":  # a node silent at unmask is still in the sum
                for node in sorted(set(requests) - answered):
                    # Refusals and rejected answers are recorded where they arrive; silence is recorded here.
                    self.jobs.record_node_round(self.job_id, server_round, node, {},
                                                f"dropped out: no answer to the {name} stage in time", 0)

        try:
            server = SecAggServer(self.job_id, server_round, by_node, settings, vector_length(manifest),
                                  clip_range(self.spec))
            stage("setup", server.setup_requests(),
                  lambda n, h, a: server.add_keys(n, _answer(h, "keys"), enrolled(n)), settings.stage_timeout)
            with lock:  # each stage's requests freeze who took part in the stage before
                requests = server.share_keys_requests()
            stage("share_keys", requests,
                  lambda n, h, a: server.add_shares(n, _answer(h, "shares")), settings.stage_timeout)
            with lock:
                requests = server.collect_requests()
            stage("collect", requests, lambda n, h, a: server.add_masked(n, a[MASKED_TENSOR]), timeout, train=True)
            with lock:
                requests = server.unmask_requests()
            stage("unmask", requests,
                  lambda n, h, a: server.add_reveal(n, _answer(h, "reveal")), settings.stage_timeout)
            with lock:
                total = server.aggregate()
        except SecAggError as err:
            reason = f"secure aggregation failed: {err}"
            log.warning("job %s round %d: %s", self.job_id, server_round, reason)
            if isinstance(err, ImpossibleAggregate):
                # The masks hide which node forged its vector: each contributor's result shows the rejection.
                for node in server.u3 or ():
                    self.jobs.record_node_round(self.job_id, server_round, node, {}, f"rejected: {reason}", 0)
            return [Message(Error(code=SECAGG_FAILED, reason=reason), reply_to=m) for m in messages]
        average = unflatten(total.update / total.weight, manifest)
        updated = {name: (current[name] + average[name]).astype(current[name].dtype) for name in current}
        log.info("job %s round %d: securely aggregated the updates of nodes %s", self.job_id, server_round,
                 list(total.nodes))
        # The sum of the nodes' example counts (each capped at max_weight) follows from the sum of weights.
        examples = max(1, round(total.weight * settings.max_weight))
        metrics = MetricRecord({"num-examples": examples, AGGREGATED_NODES: len(total.nodes)})
        return [Message(RecordDict({"arrays": numpy_to_arrays(updated), "metrics": metrics}), reply_to=first)]
