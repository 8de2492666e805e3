"""What mutual TLS costs: per connection, and per round of a real job.

- Handshake: a new channel's first RPC (a health check) against the coordinator, with
  mutual TLS and in plaintext, many times each, interleaved; the difference of the
  medians is the handshake's cost. Nodes keep one channel open, so they pay it once.
- Round time: the same job run twice on a local consortium of real processes
  (coordinator and 3 nodes), once with mutual TLS and once with --insecure; the mean
  wall time of its rounds. At the demo's size (breast cancer, logistic model) and with
  a 1M-parameter MLP, whose update is what crosses the wire in each direction.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.consortium import NODES, run_job
from coordinator.service import serve
from fedtrain.protocol import tls
from fedtrain.data import write_table
from fedtrain.demos.tabular import demo_spec, write_shards
from fedtrain.spec import JobSpec, parse_job_spec


def handshake_ms(connections: int = 200) -> tuple[float, float]:
    """(median ms to a first answer over mutual TLS, the same in plaintext)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tls.init_ca(tmp / "ca")
        coordinator = tls.issue(tmp / "ca", "coordinator", "coordinator", tmp / "coordinator")
        node = tls.issue(tmp / "ca", "node", "n", tmp / "node")
        servers = [serve(tmp / "secure", identity=coordinator), serve(tmp / "plain")]
        try:
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(connections):
                for secure, (_, port, _) in zip((True, False), servers):
                    t = time.perf_counter()
                    with tls.channel(f"127.0.0.1:{port}", node if secure else None, []) as channel:
                        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                    times[secure].append(time.perf_counter() - t)
        finally:
            for server, _, coord in servers:
                coord.stop()
                server.stop(0).wait()
    return statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3


def million_parameter_job(root: Path) -> tuple[JobSpec, list[Path]]:
    """A 1,002,610-parameter MLP on 1,024 random rows per node (256 features)."""
    rng = np.random.default_rng(0)
    columns = [f"f{i}" for i in range(256)]
    shards = []
    for i in range(len(NODES)):
        path = root / f"wide-{i}.csv"
        write_table(path, columns, rng.normal(size=(1024, 256)), "y", rng.integers(0, 2, 1024))
        shards.append(path)
    spec = parse_job_spec({
        "name": "bench-1m", "model": {"kind": "mlp", "hidden": [1024, 720]},
        "data": {"features": columns, "label": "y"},
        "training": {"rounds": 3, "batch_size": 64, "learning_rate": 0.1}, "privacy": {"epsilon": 3.0},
        "min_nodes": len(NODES),
    })
    return spec, shards


def round_seconds(root: Path, spec: JobSpec, shards: list[Path], secure: bool) -> float:
    """Mean wall seconds of the job's rounds on a fresh local consortium."""
    status = run_job(root / ("tls" if secure else "plain"), spec, shards, secure=secure, poll_seconds=1).status
    return statistics.mean(r.wall_seconds for r in status.rounds if r.round)


def run() -> dict:
    secure_ms, plain_ms = handshake_ms()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        columns, shards, test = write_shards(tmp, len(NODES))
        demo = demo_spec(columns, test, rounds=3, epsilon=3.0)
        wide, wide_shards = million_parameter_job(tmp)
        for label, spec, data in (("demo: breast cancer, 31 params", demo, shards),
                                  ("MLP, 1,002,610 params", wide, wide_shards)):
            # Secure aggregation needs the nodes' certificates: both legs aggregate in the clear,
            # so that the difference is TLS alone.
            spec = parse_job_spec({**spec.model_dump(mode="json"), "secure_aggregation": False})
            plain = round_seconds(tmp / f"{spec.name}", spec, data, secure=False)
            secure = round_seconds(tmp / f"{spec.name}", spec, data, secure=True)
            rows.append({"job": label, "secure_aggregation": spec.secagg is not None,
                         "plain_s": plain, "tls_s": secure})
    return {"handshake_tls_ms": secure_ms, "handshake_plain_ms": plain_ms, "rounds": rows}
