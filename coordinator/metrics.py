"""The coordinator's Prometheus metrics, served by `fedtrain coordinator start --metrics-port`.

Each coordinator has a registry of its own (not prometheus_client's global one), so that
several coordinators in one process (the tests) count apart. Rounds, bytes, rejections and
ε are counted where they happen (``JobRunner``, ``NodeServicer.SubmitResult``); connected
nodes and jobs by state are read from the coordinator's database at each scrape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.grid import NODE_LIVENESS_SECONDS
from coordinator.job_store import JOB_STATES, JobStore
from coordinator.registry import Registry

# A tabular round takes seconds, an LLM round with slow nodes up to the round timeout.
ROUND_SECONDS_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _StateCollector(Collector):
    """Gauges read from the state database when scraped: they stay right across restarts."""

    def __init__(self, registry: Registry, jobs: JobStore):
        self.registry = registry
        self.jobs = jobs

    def collect(self) -> Iterator[Metric]:
        nodes = GaugeMetricFamily("fedtrain_nodes_connected", "Unrevoked nodes that polled within the last"
                                  f" {NODE_LIVENESS_SECONDS:g} s.")
        nodes.add_metric([], self.registry.connected_count(time.time() - NODE_LIVENESS_SECONDS))
        yield nodes
        jobs = GaugeMetricFamily("fedtrain_jobs", "Jobs by state.", labels=["state"])
        counts = self.jobs.count_by_state()
        for state in sorted({*JOB_STATES, *counts}):
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs


class Metrics:
    """One coordinator's metrics, in the registry that its /metrics serves."""

    def __init__(self, registry: Registry, jobs: JobStore):
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds_completed = Counter("fedtrain_rounds_completed", "Rounds aggregated into a new global model.",
                                        ["job"], registry=r)
        self.rounds_failed = Counter("fedtrain_rounds_failed", "Rounds given up, the global model unchanged.",
                                     ["job"], registry=r)
        self.round_duration = Histogram("fedtrain_round_duration_seconds", "Wall time of a round, retries included.",
                                        ["job"], buckets=ROUND_SECONDS_BUCKETS, registry=r)
        self.bytes_received = Counter("fedtrain_received_bytes", "Bytes of the results nodes uploaded.",
                                      ["job", "node"], registry=r)
        self.updates_rejected = Counter("fedtrain_updates_rejected", "Results the coordinator rejected (malformed,"
                                        " or beyond the update bound of their DP plan).", ["job", "node"], registry=r)
        self.epsilon = Gauge("fedtrain_node_epsilon", "The job's ε so far on the node, as the node last reported it"
                             " (its ledger's charge at the job's δ).", ["job", "node"], registry=r)
        r.register(_StateCollector(registry, jobs))

    def round_ended(self, job_id: str, seconds: float, given_up: str) -> None:
        (self.rounds_failed if given_up else self.rounds_completed).labels(job_id).inc()
        self.round_duration.labels(job_id).observe(seconds)

    def result_received(self, job_id: str, node: str, nbytes: int, metrics: dict, rejected: bool) -> None:
        """A node's upload of ``nbytes`` with its (decoded) ``metrics``; ``rejected`` by the coordinator."""
        self.bytes_received.labels(job_id, node).inc(nbytes)
        if rejected:
            self.updates_rejected.labels(job_id, node).inc()
        # The node charged its ledger before sending, whether or not the result is taken.
        epsilon = metrics.get("epsilon")
        if type(epsilon) is float and math.isfinite(epsilon):
            self.epsilon.labels(job_id, node).set(epsilon)

    def serve(self, host: str, port: int) -> WSGIServer:
        """Serve /metrics over plain HTTP on ``host:port`` (0: a free port) in a daemon thread."""
        server, _ = start_http_server(port, host, registry=self.registry)
        return server
