"""The coordinator's gRPC server: NodeService for nodes, JobService for operators
(``coordinator.servicers``), plus the standard health and reflection services."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedtrain.faults import Faults
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import GRPC_OPTIONS
from fedtrain.protocol.tls import Identity
from coordinator.auth import Auth
from coordinator.control import Coordinator
from coordinator.servicers import JobServicer, NodeServicer

# Threads of the operators' service, apart from the nodes' pool.
OPERATOR_WORKERS = 8


def serve(state_dir: Path, host: str = "127.0.0.1", port: int = 0, workers: int = 32,
          identity: Identity | None = None, eval_dir: Path | None = None,
          faults: Faults = Faults(), audit_canaries: int = 0) -> tuple[grpc.Server, int, Coordinator]:
    """Start the coordinator; returns the server, the bound port and the shared state.

    With ``identity`` it serves mutual TLS only; without, plaintext (``--insecure``).
    ``eval_dir`` holds the tables jobs may evaluate on (default: ``state_dir/eval``).
    ``faults``: where its jobs hold, for the tests of crashes (``fedtrain.faults``);
    ``audit_canaries``: audit each ended job on its evaluation table (``Coordinator.audit``).
    """
    coord = Coordinator(state_dir, identity, eval_dir, faults, audit_canaries)
    auth = Auth(identity, coord.registry)
    # Each connected node holds one worker during its long poll: size the pool for the consortium.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=GRPC_OPTIONS)
    operators = futures.ThreadPoolExecutor(max_workers=OPERATOR_WORKERS, thread_name_prefix="operator")
    pb_grpc.add_NodeServiceServicer_to_server(NodeServicer(coord, auth), server)
    pb_grpc.add_JobServiceServicer_to_server(JobServicer(coord, auth, operators), server)
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
