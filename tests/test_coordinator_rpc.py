"""The coordinator's RPCs against bad input, with the test playing a (hostile) node."""

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coordinator.service import serve
from fedtrain.errors import SpecError, UnknownNode, from_rpc
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.privacy.accounting import plan_round
from fedtrain.protocol.codec import PROTOCOL_VERSION, decode_arrays, encode_arrays, encode_values
from fedtrain.spec import job_spec_from_json

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
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'/nonexistent/test.csv' is not a file in" in details
    assert coord.job_store.jobs() == []
    code, details = code_and_details(lambda: jobs.GetJob(pb.GetJobRequest(job_id="nope")))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown job 'nope'" in details


def test_strategy_params_are_checked_at_submit_and_a_refused_job_stores_nothing(coordinator):
    channel, coord = coordinator
    jobs = pb_grpc.JobServiceStub(channel)
    robust = {"min_nodes": 3, "secure_aggregation": False}
    for strategy, why in [({"name": "krum", "params": {"num_malicious_nodes": 1.5}}, "must be a whole number, not 1.5"),
                          ({"name": "fedavg", "params": {"eta": 0.1}}, "strategy fedavg takes no param 'eta'"),
                          ({"name": "krum", "params": {"fraction_train": 0.5}}, "takes no param 'fraction_train'"),
                          ({"name": "fedtrimmedavg", "params": {"beta": 0.7}}, "`beta` must be in the range")]:
        spec = make_spec(strategy=strategy, **robust).canonical_json()
        with pytest.raises(grpc.RpcError) as err:
            jobs.SubmitJob(pb.SubmitJobRequest(spec_json=spec))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in err.value.details(), strategy
        assert from_rpc(err.value).__class__ is SpecError
    assert coord.job_store.jobs() == [] and coord.runners == {}
    assert jobs.ListJobs(pb.ListJobsRequest()).jobs == []


def test_unknown_nodes_and_protocol_versions(coordinator):
    channel, _ = coordinator
    nodes = pb_grpc.NodeServiceStub(channel)
    code, details = code_and_details(lambda: nodes.Poll(pb.PollRequest(node_id=99)))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown node id 99: call Register first" in details
    # The class crosses the wire too: a node agent re-registers on UnknownNode, not on a text.
    with pytest.raises(grpc.RpcError) as err:
        nodes.Poll(pb.PollRequest(node_id=99))
    assert isinstance(from_rpc(err.value), UnknownNode)
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
    # The metrics an honest node with 10 examples sends (the coordinator takes exactly these).
    plan = plan_round(job_spec_from_json(task.spec_json), 10)
    metrics = {"num-examples": 10, "noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate,
               "steps": plan.steps, "epsilon": 0.5, "delta": 1e-5}
    header = pb.ResultHeader(node_id=node_id, task_id=task.task_id, metrics=encode_values(metrics))
    parts = [pb.ResultPart(header=header)] + [pb.ResultPart(tensor=c) for c in encode_arrays(arrays)]
    return nodes.SubmitResult(iter(parts))


def test_bad_updates_are_rejected_with_the_reason_and_the_job_goes_on(coordinator, shards):
    channel, coord = coordinator
    nodes, jobs = pb_grpc.NodeServiceStub(channel), pb_grpc.JobServiceStub(channel)
    job_id = jobs.SubmitJob(pb.SubmitJobRequest(spec_json=make_spec(training={"rounds": 3}, round_retries=0).canonical_json())).job_id
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
        if coord.job_store.job(job_id).state == "finished":
            break
        __import__("time").sleep(0.1)
    # Rounds 1 and 2 were skipped (no valid update); round 3 aggregated the good one.
    # The operator's view of the global model, over JobService.FetchModel.
    model = decode_arrays(jobs.FetchModel(pb.GetJobRequest(job_id=job_id)))
    assert set(model) == set(good)
    for k in good:
        np.testing.assert_allclose(model[k], good[k])


def _answer(nodes, node_id, task, reply):
    header = pb.ResultHeader(node_id=node_id, task_id=task.task_id, secagg=reply)
    return nodes.SubmitResult(iter([pb.ResultPart(header=header)]))


def test_secure_aggregation_input_from_raw_nodes_is_checked_and_replays_are_refused(coordinator, consortium_pki):
    """Three raw-gRPC nodes run SecAgg+ with the real node-side state machine, and misbehave."""
    from fedtrain.secagg.node import SecAggNode
    from fedtrain.secagg.peers import PeerAuth

    def secagg_node(round, n):  # signs with a consortium node certificate (this coordinator runs without TLS)
        return SecAggNode(job_id, round, n, PeerAuth(consortium_pki.identity("node", f"raw{n}")))

    channel, coord = coordinator
    nodes, jobs = pb_grpc.NodeServiceStub(channel), pb_grpc.JobServiceStub(channel)
    ids = [nodes.Register(pb.RegisterRequest(name=f"raw{i}", protocol_version=PROTOCOL_VERSION)).node_id
           for i in range(3)]
    spec = make_spec(min_nodes=3, round_timeout=5, secure_aggregation={"stage_timeout": 5}, training={"rounds": 2},
                     round_retries=0)
    job_id = jobs.SubmitJob(pb.SubmitJobRequest(spec_json=spec.canonical_json())).job_id
    for node_id in ids:
        assert nodes.Poll(pb.PollRequest(node_id=node_id, wait_seconds=5)).offer.job_id == job_id
        nodes.AnswerOffer(pb.OfferAnswer(node_id=node_id, job_id=job_id, decision=pb.OfferAnswer.ACCEPTED))

    tasks = {n: _next_task(nodes, n) for n in ids}
    assert {t.secagg.WhichOneof("stage") for t in tasks.values()} == {"setup"}
    state = {n: secagg_node(1, n) for n in ids}
    keys = {n: state[n].setup(tasks[n].secagg.setup) for n in ids}
    a, b, c = ids
    bad = pb.PublicKeys(node_id=a, encryption_key=b"short", mask_key=keys[a].mask_key,
                        seed_commitment=keys[a].seed_commitment)
    code, details = code_and_details(lambda: _answer(nodes, a, tasks[a], pb.SecAggReply(keys=bad)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "three 32-byte values, got (5, 32, 32)" in details
    code, details = code_and_details(lambda: _answer(nodes, b, tasks[a], pb.SecAggReply(keys=keys[b])))
    assert code == grpc.StatusCode.NOT_FOUND and f"no open task {tasks[a].task_id!r} for node {b}" in details
    for n in (b, c):
        _answer(nodes, n, tasks[n], pb.SecAggReply(keys=keys[n]))

    # Node a is out: the round goes on with b and c.
    status = None
    for _ in range(200):
        status = jobs.GetJob(pb.GetJobRequest(job_id=job_id))
        if len(status.rounds) >= 2:
            break
        __import__("time").sleep(0.1)
    # b and c never answer the share-keys stage either.
    assert "secure aggregation failed: share keys: only 0 of 3 nodes answered" in status.error
    refusals = [n.refusal for r in status.rounds for n in r.nodes if n.refusal]
    assert any("three 32-byte values" in r for r in refusals)

    # Round 2 starts over with fresh tasks; a round-1 task id and a round-1 answer are refused.
    fresh = {n: _next_task(nodes, n) for n in ids}
    assert all(t.round == 2 and t.secagg.WhichOneof("stage") == "setup" for t in fresh.values())
    code, details = code_and_details(lambda: _answer(nodes, b, tasks[b], pb.SecAggReply(keys=keys[b])))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown, answered, or past its deadline" in details
    state = {n: secagg_node(2, n) for n in ids}
    for n in ids:
        _answer(nodes, n, fresh[n], pb.SecAggReply(keys=state[n].setup(fresh[n].secagg.setup)))
    share_tasks = {n: _next_task(nodes, n) for n in ids}
    for n in ids:
        _answer(nodes, n, share_tasks[n], pb.SecAggReply(shares=state[n].share_keys(share_tasks[n].secagg.share_keys)))
    collect = {n: _next_task(nodes, n) for n in ids}
    assert all(t.message_type == "train" and t.secagg.WhichOneof("stage") == "collect" for t in collect.values())
    header = pb.ResultHeader(node_id=a, task_id=collect[a].task_id)
    short = {"secagg.masked": np.zeros(3, dtype=np.uint32)}
    parts = [pb.ResultPart(header=header)] + [pb.ResultPart(tensor=t) for t in encode_arrays(short)]
    code, details = code_and_details(lambda: nodes.SubmitResult(iter(parts)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tensor 'secagg.masked' is uint32[3], expected uint32[11]" \
        in details


def test_a_flooding_node_is_slowed_down_and_the_others_go_on(coordinator):
    channel, _ = coordinator
    nodes = pb_grpc.NodeServiceStub(channel)
    flood, calm = (nodes.Register(pb.RegisterRequest(name=n, protocol_version=PROTOCOL_VERSION)).node_id
                   for n in ("flood", "calm"))
    refused = 0
    for _ in range(400):
        try:
            nodes.Poll(pb.PollRequest(node_id=flood, wait_seconds=0))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"node {flood} (flood) sends more than 50 requests per second" in err.details()
            refused += 1
    assert refused > 100
    nodes.Poll(pb.PollRequest(node_id=calm, wait_seconds=0))  # unaffected
    # Unregistered callers are limited by address: a flood of fake ids does not get through either.
    codes = set()
    for i in range(400):
        try:
            nodes.Poll(pb.PollRequest(node_id=10_000 + i, wait_seconds=0))
        except grpc.RpcError as err:
            codes.add(err.code())
    assert codes == {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizer_state_survives_a_checkpoint(tmp_path, name):
    """A strategy restored from a checkpoint takes the same step as one that never stopped."""
    from flwr.app import Message, MetricRecord, RecordDict

    from fedtrain.server.strategy import build_strategy, restore_strategy_state, strategy_state
    from coordinator.db import Database
    from coordinator.job_store import JobStore
    from fedtrain.protocol.records import arrays_to_numpy, numpy_to_arrays

    spec = make_spec(strategy={"name": name, "params": {"eta": 0.1}})
    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    updates = [{"w": rng.normal(size=(3, 2)).astype(np.float32)} for _ in range(3)]

    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0

    def step(strategy, server_round, arrays, update):
        strategy.current_arrays = arrays_to_numpy(arrays)  # what configure_train records
        reply = Message(RecordDict({"arrays": numpy_to_arrays(update), "metrics": MetricRecord({"num-examples": 10})}),
                        dst_node_id=1, message_type="train")
        new, _ = strategy.aggregate_train(server_round, [reply])
        return new

    straight = build_strategy(spec)
    arrays = numpy_to_arrays(start)
    for r, u in enumerate(updates, 1):
        arrays = step(straight, r, arrays, u)

    store = JobStore(Database(tmp_path / "c.db"))
    job = store.create_job("j", spec.canonical_json())
    first = build_strategy(spec)
    resumed_arrays = numpy_to_arrays(start)
    for r, u in enumerate(updates[:2], 1):
        resumed_arrays = step(first, r, resumed_arrays, u)
        store.finish_round(job, r, {}, 0.0, arrays_to_numpy(resumed_arrays), strategy_state(first))
    done, weights, state = store.checkpoint(job)
    assert done == 2 and set(state) == {"m_t/w", "v_t/w"}
    second = build_strategy(spec)
    restore_strategy_state(second, state)
    final = step(second, 3, numpy_to_arrays(weights), updates[2])
    np.testing.assert_array_equal(arrays_to_numpy(final)["w"], arrays_to_numpy(arrays)["w"])
    # Without the moments the step differs: the state is what makes the resume exact.
    fresh = step(build_strategy(spec), 3, numpy_to_arrays(weights), updates[2])
    assert not np.array_equal(arrays_to_numpy(fresh)["w"], arrays_to_numpy(final)["w"])


class _Aborted(grpc.RpcError):
    """What a grpc client raises for an aborted call: a status code, details, trailing metadata."""

    def __init__(self, code, name):
        self._code, self._name = code, name

    def code(self):
        return self._code

    def details(self):
        return "details"

    def trailing_metadata(self):
        return (("fedtrain-error", self._name),)


def test_a_peer_cannot_name_an_error_class_that_its_status_code_does_not_mean():
    from fedtrain.errors import FaultInjected, PermissionDenied, RemoteError

    assert isinstance(from_rpc(_Aborted(grpc.StatusCode.NOT_FOUND, "UnknownNode")), UnknownNode)
    # A fault point (INTERNAL) named on a PERMISSION_DENIED is taken for what the code means.
    taken = from_rpc(_Aborted(grpc.StatusCode.PERMISSION_DENIED, "FaultInjected"))
    assert isinstance(taken, PermissionDenied) and not isinstance(taken, FaultInjected)
    assert isinstance(from_rpc(_Aborted(grpc.StatusCode.DATA_LOSS, "NoSuchClass")), RemoteError)
