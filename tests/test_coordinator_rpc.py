"""The coordinator's RPCs against bad input, with the test playing a (hostile) node."""

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator.service import serve
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import PROTOCOL_VERSION, decode_arrays, encode_arrays, encode_values

from conftest import make_spec


@pytest.fixture
def coordinator(tmp_path):
    server, port, coord = serve(tmp_path / "state", port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel, coord
    coord.stop()
    channel.close()
    server.stop(0).wait()


def code_and_details(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_health_and_reflection(coordinator):
    channel, _ = coordinator
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="fedtrain.v1.NodeService"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    reply = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"fedtrain.v1.NodeService", "fedtrain.v1.JobService", "grpc.health.v1.Health"} <= names


def test_malformed_specs_are_refused_and_nothing_is_stored(coordinator, shards):
    channel, coord = coordinator
    jobs = pb_grpc.JobServiceStub(channel)
    code, details = code_and_details(lambda: jobs.SubmitJob(pb.SubmitJobRequest(spec_json='{"name": "x"}')))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "training" in details and "privacy" in details
    bad_eval = make_spec(evaluation={"data": "/nonexistent/test.csv"}).canonical_json()
    code, details = code_and_details(lambda: jobs.SubmitJob(pb.SubmitJobRequest(spec_json=bad_eval)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "/nonexistent/test.csv does not exist" in details
    assert coord.store.jobs() == []
    code, details = code_and_details(lambda: jobs.GetJob(pb.GetJobRequest(job_id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown job 'nope'" in details


def test_unknown_nodes_and_protocol_versions(coordinator):
    channel, _ = coordinator
    nodes = pb_grpc.NodeServiceStub(channel)
    code, details = code_and_details(lambda: nodes.Poll(pb.PollRequest(node_id=99)))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown node id 99: call Register first" in details
    code, details = code_and_details(lambda: nodes.Register(pb.RegisterRequest(name="a", protocol_version="v0")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and PROTOCOL_VERSION in details
    code, details = code_and_details(
        lambda: nodes.Register(pb.RegisterRequest(name="a b/../", protocol_version=PROTOCOL_VERSION)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def _next_task(nodes, node_id):
    for _ in range(20):
        reply = nodes.Poll(pb.PollRequest(node_id=node_id, wait_seconds=1))
        if reply.WhichOneof("item") == "task":
            return reply.task
    raise AssertionError("no task arrived")


def _submit(nodes, node_id, task, arrays):
    header = pb.ResultHeader(node_id=node_id, task_id=task.task_id, metrics=encode_values({"num-examples": 10}))
    parts = [pb.ResultPart(header=header)] + [pb.ResultPart(tensor=c) for c in encode_arrays(arrays)]
    return nodes.SubmitResult(iter(parts))


def test_bad_updates_are_rejected_with_the_reason_and_the_job_goes_on(coordinator, shards):
    channel, coord = coordinator
    nodes, jobs = pb_grpc.NodeServiceStub(channel), pb_grpc.JobServiceStub(channel)
    job_id = jobs.SubmitJob(pb.SubmitJobRequest(spec_json=make_spec(training={"rounds": 3}).canonical_json())).job_id
    node_id = nodes.Register(pb.RegisterRequest(name="hostile", protocol_version=PROTOCOL_VERSION)).node_id
    offer = nodes.Poll(pb.PollRequest(node_id=node_id, wait_seconds=5)).offer
    assert offer.job_id == job_id
    nodes.AnswerOffer(pb.OfferAnswer(node_id=node_id, job_id=job_id, decision=pb.OfferAnswer.ACCEPTED))

    task = _next_task(nodes, node_id)
    arrays = decode_arrays(nodes.FetchArrays(pb.FetchRequest(node_id=node_id, task_id=task.task_id)))
    poisoned = {k: np.full_like(v, np.nan) for k, v in arrays.items()}
    code, details = code_and_details(lambda: _submit(nodes, node_id, task, poisoned))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "contain NaN" in details
    # The task is answered (as a failure): a second upload for it is refused.
    code, _ = code_and_details(lambda: _submit(nodes, node_id, task, arrays))
    assert code == grpc.StatusCode.NOT_FOUND

    task = _next_task(nodes, node_id)
    assert task.round == 2
    wrong = {k: np.zeros((v.shape[0] + 1, *v.shape[1:]), v.dtype) for k, v in arrays.items()}
    code, details = code_and_details(lambda: _submit(nodes, node_id, task, wrong))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expected float32" in details
    code, details = code_and_details(lambda: nodes.FetchArrays(
        pb.FetchRequest(node_id=node_id, task_id="forged")).next())
    assert code == grpc.StatusCode.NOT_FOUND

    task = _next_task(nodes, node_id)
    good = {k: v + 1 for k, v in arrays.items()}
    _submit(nodes, node_id, task, good)
    status = jobs.GetJob(pb.GetJobRequest(job_id=job_id))
    refusals = [n.refusal for r in status.rounds for n in r.nodes if n.refusal]
    assert any("NaN" in r for r in refusals) and any("expected float32" in r for r in refusals)
    for _ in range(50):
        if coord.store.job(job_id).state == "finished":
            break
        __import__("time").sleep(0.1)
    # Rounds 1 and 2 were skipped (no valid update); round 3 aggregated the good one.
    # The operator's view of the global model, over JobService.FetchModel.
    model = decode_arrays(jobs.FetchModel(pb.GetJobRequest(job_id=job_id)))
    assert set(model) == set(good)
    for k in good:
        np.testing.assert_allclose(model[k], good[k])
