"""A client of the coordinator's JobService, for operators, the CLI and the demo."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedtrain.errors import Unavailable, from_rpc
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import GRPC_OPTIONS, decode_arrays
from fedtrain.spec import JobSpec, load_job_spec
from fedtrain.protocol.tls import Identity, channel


class CoordinatorClient:
    def __init__(self, address: str, identity: Identity | None = None, timeout: float = 30.0):
        """``identity``: an operator's certificate for a coordinator that speaks mutual TLS."""
        self.address = address
        self.timeout = timeout
        self.tls = identity is not None
        self._channel = channel(address, identity, GRPC_OPTIONS)
        self._jobs = pb_grpc.JobServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, fn, request):
        try:
            return fn(request, timeout=self.timeout)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(
                    f"no coordinator answers at {self.address} ({err.details()}); start one with `fedtrain"
                    " coordinator start` or pass --coordinator HOST:PORT"
                    + ("; over TLS, check that the coordinator trusts this certificate's CA and that it has"
                       " not expired" if self.tls else "; a coordinator that speaks TLS needs --tls-dir")
                ) from None
            raise from_rpc(err) from None

    def healthy(self) -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def submit(self, spec: JobSpec | str | Path) -> str:
        if not isinstance(spec, JobSpec):
            spec = load_job_spec(spec)
        return self._call(self._jobs.SubmitJob, pb.SubmitJobRequest(spec_json=spec.canonical_json())).job_id

    def status(self, job_id: str) -> pb.JobStatus:
        return self._call(self._jobs.GetJob, pb.GetJobRequest(job_id=job_id))

    def cancel(self, job_id: str) -> pb.JobStatus:
        """Stop a waiting or running job; its status once it has stopped (NotReady if it had ended)."""
        return self._call(self._jobs.CancelJob, pb.CancelJobRequest(job_id=job_id))

    def jobs(self) -> list[pb.JobStatus]:
        return list(self._call(self._jobs.ListJobs, pb.ListJobsRequest()).jobs)

    def model(self, job_id: str, round: int = 0) -> dict[str, np.ndarray]:
        """The job's global model (its trainable tensors) after ``round``; 0 means the latest."""
        request = pb.GetJobRequest(job_id=job_id, round=round)
        return self._call(lambda r, timeout: decode_arrays(self._jobs.FetchModel(r, timeout=timeout)), request)
