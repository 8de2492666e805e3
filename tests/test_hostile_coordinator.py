"""A hostile coordinator against real node agents: it learns nothing about a node's data
outside the DP updates, not through refusals, not through accept/refuse, not through any
field it stores, reports or logs; and it cannot get a refused spec approved by offering
a compliant one under the same job id.

The attacker is a real coordinator (loopback gRPC) submitting a battery of hostile jobs;
the victims are real `NodeAgent`s. What each node sends is captured at its gRPC client
by an interceptor, below the agent's own code.
"""

import json
import logging
import shutil
import sqlite3
import threading
import time

import grpc
import pytest

from coordinator.service import serve
from fedtrain.cli.client import CoordinatorClient
from fedtrain.data import write_table
from fedtrain.policy import Decision, NodePolicy
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import decode_values
from nodes.agent import NodeAgent
from nodes.jobs import JobBook
from nodes.state import StatePaths

from conftest import FEATURES, llm_spec, make_spec, make_spec_from
from test_end_to_end import cli, wait_for

LABEL = "malignant"
NOTE, SECRET, HIDDEN = "note_q7x", "secret_q7x", "hidden_col_z9"  # the last is never named by any job
ROWS = 40


def canary_note(i):
    return f"CANARY-patient-{i:03d}-tested-negative"


def canary_number(i):
    return f"{7_391_000 + i}.{i:03d}883"


@pytest.fixture
def canary_table(tmp_path, cancer):
    """A node table with a unique canary in every row of every non-feature column, canaries in
    some feature and label cells, and a column no job names."""
    x, y = cancer
    path = tmp_path / "canary.csv"
    write_table(path, FEATURES, x[:ROWS], LABEL, y[:ROWS])
    lines = path.read_text().splitlines()
    out = [lines[0] + f",{NOTE},{SECRET},{HIDDEN}"]
    for i, line in enumerate(lines[1:]):
        cells = line.split(",")
        if i == 3:
            cells[0] = "CANARY-in-a-feature-cell"
        if i == 5:
            cells[-1] = "81391.88"  # a label that is not a class index
        out.append(",".join(cells) + f",{canary_note(i)},{canary_number(i)},CANARY-hidden-{i}")
    path.write_text("\n".join(out) + "\n")
    canaries = [canary_note(i) for i in range(ROWS)] + [canary_number(i) for i in range(ROWS)]
    canaries += [f"CANARY-hidden-{i}" for i in range(ROWS)] + [HIDDEN, "CANARY-in-a-feature-cell", "81391.88"]
    return path, canaries


class Capture(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor):
    """Every request message a node's gRPC client sends, serialised, with its method; and the
    tasks its polls received, to tell which job each result was for."""

    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []
        self.task_jobs: dict[str, str] = {}

    def intercept_unary_unary(self, continuation, details, request):
        self.sent.append((details.method, request.SerializeToString()))
        call = continuation(details, request)
        if details.method.endswith("Poll") and call.exception() is None:
            reply = call.result()
            if reply.WhichOneof("item") == "task":
                self.task_jobs[reply.task.task_id] = reply.task.job_id
        return call

    def intercept_unary_stream(self, continuation, details, request):
        self.sent.append((details.method, request.SerializeToString()))
        return continuation(details, request)

    def intercept_stream_unary(self, continuation, details, requests):
        def tap():
            for r in requests:
                self.sent.append((details.method, r.SerializeToString()))
                yield r
        return continuation(details, tap())


class CapturedAgent(NodeAgent):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.capture = Capture()
        self._stub = pb_grpc.NodeServiceStub(grpc.intercept_channel(self._channel, self.capture))


class Live:
    """A real coordinator on loopback and the capturing node agents started against it."""

    def __init__(self, state_dir):
        self.server, port, self.coord = serve(state_dir, port=0)
        self.address = f"127.0.0.1:{port}"
        self.agents = []

    def start(self, **kw) -> CapturedAgent:
        agent = CapturedAgent(coordinator=self.address, poll_seconds=0.3, **kw)
        stop = threading.Event()
        thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        thread.start()
        self.agents.append((agent, stop, thread))
        return agent

    def stop(self) -> None:
        for agent, stop, thread in self.agents:
            stop.set()
            thread.join(10)
            agent.close()
        self.agents = []
        self.coord.stop()
        self.server.stop(0).wait()


@pytest.fixture
def live(tmp_path):
    world = Live(tmp_path / "coordinator")
    yield world
    world.stop()


def headers(agent, job_id):
    """What a node told the coordinator about one job, apart from tensors: its offer answers
    and its result headers (refusal text and metrics)."""
    out = []
    for method, raw in agent.capture.sent:
        if method.endswith("AnswerOffer"):
            msg = pb.OfferAnswer.FromString(raw)
            if msg.job_id == job_id:
                out.append(("answer", msg.decision, msg.reason))
        elif method.endswith("SubmitResult"):
            part = pb.ResultPart.FromString(raw)
            if part.WhichOneof("part") == "header" and agent.capture.task_jobs.get(part.header.task_id) == job_id:
                metrics = decode_values(part.header.metrics)
                out.append(("result", part.header.refusal, json.dumps(metrics, sort_keys=True)))
    return out


@pytest.mark.slow
def test_a_battery_of_hostile_jobs_learns_nothing_about_the_data(tmp_path, live, canary_table, tiny_llama, caplog):
    caplog.set_level(logging.INFO)
    data, canaries = canary_table
    models = tmp_path / "models"
    shutil.copytree(tiny_llama, models / "tiny")
    outside = tmp_path / "elsewhere"
    shutil.copytree(tiny_llama, outside)
    policy = NodePolicy(max_epsilon=50.0, dataset_size=ROWS, model_roots=[models], max_rounds_per_job=20,
                        max_trainable_parameters=200_000, max_classes=10)
    # Two nodes with the same policy: one holds the canaries, the other no data at all.
    victim = live.start(data=data, policy=policy, state_dir=tmp_path / "victim", name="victim")
    empty = live.start(data=tmp_path / "missing.csv", policy=policy, state_dir=tmp_path / "empty", name="empty")
    base = {"min_nodes": 2, "training": {"rounds": 1}, "round_timeout": 60}
    text = llm_spec(models / "tiny").model_dump(mode="json")
    jobs = {
        "honest": make_spec(**base),
        "label is a number column": make_spec(data={"features": FEATURES, "label": SECRET}, **base),
        "label is a text column": make_spec(data={"features": FEATURES, "label": NOTE}, **base),
        "a text feature": make_spec(data={"features": [*FEATURES, NOTE], "label": LABEL}, **base),
        "a missing column": make_spec(data={"features": [*FEATURES, "no_such_column"], "label": LABEL}, **base),
        "too many classes": make_spec(model={"kind": "logistic", "num_classes": 1000}, **base),
        "oversize": make_spec(model={"kind": "mlp", "hidden": [1024, 1024]}, **base),
        "too many rounds": make_spec(**{**base, "training": {"rounds": 21}}),
        "text with guessed classes": make_spec_from(text, {
            **base, "task": "text-classification",
            "data": {"text": NOTE, "label": SECRET, "classes": [canary_number(0), "x"]}}),
        "a base outside the model roots": make_spec_from(llm_spec(outside).model_dump(mode="json"), base),
    }
    outcomes = {}
    with CoordinatorClient(live.address) as client:
        ids = {name: client.submit(spec) for name, spec in jobs.items()}  # all at once: they run side by side
        for name, job_id in ids.items():
            status = wait_for(client, job_id, lambda s: len(s.nodes) == 2 and all(
                n.decision in ("accepted", "refused") for n in s.nodes), timeout=120)
            if all(n.decision == "accepted" for n in status.nodes):
                status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"), timeout=120)
            outcomes[name] = (job_id, status)
        time.sleep(0.5)  # the last answers are in the capture
    live.stop()

    # Every hostile job ran or was refused for a reason the coordinator could read off the spec.
    decided = {name: {n.name: (n.decision, n.reason) for n in status.nodes} for name, (_, status) in outcomes.items()}
    assert decided["honest"]["victim"][0] == "accepted" and outcomes["honest"][1].state == "finished"
    assert decided["oversize"]["victim"] == ("refused", "limit-exceeded: policy.max_trainable_parameters=200000")
    assert decided["too many classes"]["victim"] == (
        "refused", "limit-exceeded: model.num_classes=1000, policy.max_classes=10")
    assert decided["too many rounds"]["victim"] == (
        "refused", "limit-exceeded: policy.max_rounds_per_job=20, training.rounds=21")
    assert decided["a base outside the model roots"]["victim"][1].startswith("base-not-allowed: model.base=")
    assert decided["label is a text column"]["victim"][0] == "accepted"  # bad rows are the owner's business
    # Accept/refuse and every refusal are functions of the spec and the policy: the node with the
    # canaries and the node with no data at all said exactly the same things about every job.
    for name, (job_id, _) in outcomes.items():
        assert headers(victim, job_id) == headers(empty, job_id), name
        assert decided[name]["victim"] == decided[name]["empty"], name

    # No canary, nor the data file's path, in any byte either node sent (the one value the
    # attacker guessed into a job's classes is its own; whether it was right did not show) ...
    secrets = [c.encode() for c in canaries if c != canary_number(0)] + [str(data).encode(), data.name.encode()]
    for agent in (victim, empty):
        for method, raw in agent.capture.sent:
            for secret in secrets:
                assert secret not in raw, (method, secret)
    # ... nor anywhere in the coordinator's state (database, reports) or its log.
    for path in (tmp_path / "coordinator").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not [s for s in secrets if s in content], path
    coordinator_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("fedtrain.node"))
    assert not [c for c in canaries if c in coordinator_log]
    # The owner's own log has the details (the canaries are really there to be found).
    node_log = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("fedtrain.node"))
    assert "81391.88" in node_log and "no_such_column" in node_log


def test_a_re_offer_under_the_same_job_id_cannot_get_a_refused_spec_approved(tmp_path, live, cancer):
    """The coordinator offers a spec the policy refuses, edits its database to a compliant spec
    under the same job id and offers again: the node refuses for good, and its owner can
    never sign the refused bytes."""
    x, y = cancer
    data = tmp_path / "shard.csv"
    write_table(data, FEATURES, x[:150], LABEL, y[:150])
    policy = NodePolicy(max_epsilon=10.0, dataset_size=150, max_rounds_per_job=3, require_approval=True)
    node = live.start(data=data, policy=policy, state_dir=tmp_path / "node", name="n0")
    greedy = make_spec(min_nodes=1, training={"rounds": 5}, privacy={"delta": 1e-3})
    compliant = make_spec(min_nodes=1, training={"rounds": 3})
    with CoordinatorClient(live.address) as client:
        job_id = client.submit(greedy)
        wait_for(client, job_id, lambda s: [n.decision for n in s.nodes] == ["refused"], timeout=30)
        db = sqlite3.connect(tmp_path / "coordinator" / "coordinator.db")
        db.execute("UPDATE jobs SET spec_json = ? WHERE id = ?", (compliant.canonical_json(), job_id))
        db.execute("DELETE FROM job_nodes WHERE job_id = ?", (job_id,))
        db.commit()
        live.coord.mailbox.wake()
        wait_for(client, job_id, lambda s: [(n.decision, n.reason) for n in s.nodes] == [("refused", "spec-changed")],
                 timeout=30)
    record = JobBook(StatePaths(tmp_path / "node").jobs).get(job_id)
    assert record.decision is Decision.REFUSED and record.signature is None
    # The owner cannot approve it: it is not pending, whatever spec is on record.
    proc = cli("node", "approve", job_id, "--state-dir", str(tmp_path / "node"), check=False)
    assert proc.returncode == 1 and "not pending approval" in proc.stderr
    assert not [m for m, _ in node.capture.sent if m.endswith("FetchArrays")]  # nothing ran


def test_approve_reviews_exactly_the_bytes_it_signs(tmp_path):
    """A pending record whose spec breaks the policy (a job book edited, or written by an older
    version that kept the first spec of a re-offered job) is not signed."""
    paths = StatePaths(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    paths.policy.write_text(json.dumps(NodePolicy(max_epsilon=10.0, dataset_size=150, max_rounds_per_job=3,
                                                  require_approval=True).document()))
    greedy = make_spec(training={"rounds": 5}, privacy={"delta": 1e-3})
    JobBook(paths.jobs).record("j1", greedy.canonical_json(), Decision.PENDING_APPROVAL, "pending-approval",
                               "waiting for the data owner's approval")
    proc = cli("node", "approve", "j1", "--state-dir", str(tmp_path), check=False)
    assert proc.returncode == 1
    assert "breaks this node's policy" in proc.stderr and "max_rounds_per_job" in proc.stderr
    record = JobBook(paths.jobs).get("j1")
    assert record.decision is Decision.PENDING_APPROVAL and record.signature is None
