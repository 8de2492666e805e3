"""Property-based tests: hostile and malformed input to the parsers and the coordinator's RPCs
gets a clear error, never a crash, and leaves what is stored intact."""

import json
import sqlite3

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.service import serve
from fedtrain.errors import SpecError
from fedtrain.policy import load_policy
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import PROTOCOL_VERSION
from fedtrain.spec import job_spec_from_json

from conftest import make_spec

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
VALID = json.loads(make_spec(min_nodes=3).canonical_json())


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))


def _replace(doc, path, new):
    if not path:
        return new
    out = dict(doc)
    out[path[0]] = _replace(doc[path[0]], path[1:], new)
    return out


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_any_text_is_a_spec_or_a_spec_error(text):
    try:
        job_spec_from_json(text)
    except SpecError:
        pass


@FUZZ
@given(st.sampled_from(list(_paths(VALID))), json_values)
def test_a_valid_spec_with_any_field_replaced_is_a_spec_or_a_spec_error_naming_it(path, value):
    doc = _replace(VALID, path, value)
    try:
        spec = job_spec_from_json(json.dumps(doc))
    except SpecError as err:
        assert "is not a valid job spec" in str(err) or "not valid JSON" in str(err)
    else:
        assert spec.digest() == job_spec_from_json(spec.canonical_json()).digest()


@FUZZ
@given(json_values)
def test_any_policy_document_is_a_policy_or_a_spec_error(tmp_path, value):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(value))
    try:
        load_policy(path)
    except SpecError:
        pass


# --- the coordinator's RPCs ---------------------------------------------------------------

# What a handler may answer: anything else (UNKNOWN, INTERNAL) is an unhandled exception.
CLEAR_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    state = tmp_path_factory.mktemp("coordinator")
    server, port, coord = serve(state, port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    nodes, jobs = pb_grpc.NodeServiceStub(channel), pb_grpc.JobServiceStub(channel)
    job_id = jobs.SubmitJob(pb.SubmitJobRequest(spec_json=make_spec().canonical_json())).job_id
    node_id = nodes.Register(pb.RegisterRequest(name="fuzz-node", protocol_version=PROTOCOL_VERSION)).node_id
    yield nodes, jobs, job_id, node_id
    # Nothing stored before the fuzzing was lost or corrupted.
    assert jobs.GetJob(pb.GetJobRequest(job_id=job_id)).spec_json == make_spec().canonical_json()
    db = sqlite3.connect(state / "coordinator.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    coord.stop()
    channel.close()
    server.stop(0).wait()


def _answers_clearly(call):
    try:
        call()
    except grpc.RpcError as err:
        assert err.code() in CLEAR_CODES, (err.code(), err.details())
        assert err.details()


ids = st.integers(0, 2**64 - 1)
names = st.text(max_size=40)
values = st.builds(pb.Value, f=st.floats(allow_nan=True)) | st.builds(pb.Value, i=st.integers(-2**63, 2**63 - 1)) \
    | st.builds(pb.Value, s=st.text(max_size=10)) | st.builds(pb.Value, b=st.booleans())
chunks = st.builds(pb.TensorChunk, name=names, dtype=st.sampled_from(["float32", "uint32", "object", "", "<f4"]),
                   shape=st.lists(st.integers(-3, 2**40), max_size=3), offset=st.integers(0, 2**64 - 1),
                   total_bytes=st.integers(0, 2**64 - 1), data=st.binary(max_size=64))


@FUZZ
@given(names, names, ids, st.floats(allow_nan=True), names)
def test_register_poll_and_answer_take_anything(live, name, version, node_id, wait, job_id):
    nodes, _, known_job, known_node = live
    _answers_clearly(lambda: nodes.Register(pb.RegisterRequest(name=name, protocol_version=version)))
    _answers_clearly(lambda: nodes.Poll(pb.PollRequest(node_id=node_id, wait_seconds=wait)))
    # A known node's poll waits as long as asked (at most 30 s), unless the wait is not a number.
    _answers_clearly(lambda: nodes.Poll(pb.PollRequest(node_id=known_node,
                                                       wait_seconds=wait if wait != wait or wait <= 0 else 0.0)))
    for nid, jid in ((node_id, job_id), (known_node, job_id), (known_node, known_job)):
        _answers_clearly(lambda: nodes.AnswerOffer(pb.OfferAnswer(node_id=nid, job_id=jid, decision=node_id % 8,
                                                                  reason=name)))


@FUZZ
@given(ids, names, st.dictionaries(names, values, max_size=3), names, st.lists(chunks, max_size=4))
def test_result_streams_take_anything(live, node_id, task_id, metrics, refusal, parts):
    nodes, _, _, known_node = live
    for nid in (node_id, known_node):
        header = pb.ResultHeader(node_id=nid, task_id=task_id, metrics=metrics, refusal=refusal)
        stream = [pb.ResultPart(header=header)] + [pb.ResultPart(tensor=c) for c in parts]
        _answers_clearly(lambda: nodes.SubmitResult(iter(stream)))
        _answers_clearly(lambda: nodes.SubmitResult(iter(stream[1:])))
        _answers_clearly(lambda: list(nodes.FetchArrays(pb.FetchRequest(node_id=nid, task_id=task_id))))


@FUZZ
@given(st.text(max_size=300) | st.sampled_from(list(_paths(VALID))).flatmap(
    lambda path: json_values.map(lambda v: json.dumps(_replace(VALID, path, v)))), names, st.integers(0, 2**32 - 1))
def test_job_service_takes_anything(live, spec_json, job_id, round):
    _, jobs, _, _ = live
    _answers_clearly(lambda: jobs.SubmitJob(pb.SubmitJobRequest(spec_json=spec_json)))
    _answers_clearly(lambda: jobs.GetJob(pb.GetJobRequest(job_id=job_id)))
    _answers_clearly(lambda: list(jobs.FetchModel(pb.GetJobRequest(job_id=job_id, round=round))))
