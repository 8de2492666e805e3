"""Smaller holes, each attacked as a hostile node or operator would, against a real coordinator
(raw gRPC stubs on 127.0.0.1) or real processes: poll floods, evaluation data outside its
directory, oversize free text from nodes, state readable by other users, join tokens in argv."""

import logging
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import yaml
from typer.main import get_command

from coordinator.auth import MAX_POLLS_PER_NODE
from coordinator.db import Database
from coordinator.service import serve
from coordinator.servicers import MAX_NODE_TEXT
from fedtrain.protocol import tls
from fedtrain.node.audit_log import AuditLog
from fedtrain.demos.launch import LocalConsortium
from fedtrain.node.ledger import PrivacyLedger
from fedtrain.protocol import fedtrain_pb2 as pb
from fedtrain.protocol import fedtrain_pb2_grpc as pb_grpc
from fedtrain.protocol.codec import GRPC_OPTIONS, PROTOCOL_VERSION
from nodes import cli as node_cli
from nodes.jobs import JobBook

from conftest import eventually, make_spec


@pytest.fixture
def coordinator(tmp_path):
    server, port, coord = serve(tmp_path / "state", port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    yield pb_grpc.NodeServiceStub(channel), pb_grpc.JobServiceStub(channel), coord
    coord.stop()
    channel.close()
    server.stop(0).wait()


def register(nodes, name):
    return nodes.Register(pb.RegisterRequest(name=name, protocol_version=PROTOCOL_VERSION)).node_id


def submit(jobs, **spec):
    return jobs.SubmitJob(pb.SubmitJobRequest(spec_json=make_spec(**spec).canonical_json())).job_id


# --- poll flooding ----------------------------------------------------------------------------

def test_a_poll_flood_is_refused_and_operators_keep_their_own_threads(coordinator):
    nodes, jobs, _ = coordinator
    job_id = submit(jobs, min_nodes=50)  # waits for nodes forever: GetJob has a real job to show
    ids = [register(nodes, name) for name in ["flood", *(f"n{i}" for i in range(16))]]
    for node_id in ids:  # each takes its offer, so that its next polls wait the whole 30 s
        assert nodes.Poll(pb.PollRequest(node_id=node_id, wait_seconds=5)).offer.job_id == job_id
    flood = ids[0]
    polls = [nodes.Poll.future(pb.PollRequest(node_id=flood, wait_seconds=30)) for _ in range(40)]
    try:
        # All but two are refused at once.
        eventually(lambda: sum(p.done() for p in polls) >= 40 - MAX_POLLS_PER_NODE, "the extra polls to be refused", 5)
        refused = [p.exception() for p in polls if p.done()]
        assert len(refused) == 40 - MAX_POLLS_PER_NODE
        assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "polls open" in e.details() for e in refused)
        # Sixteen more nodes with two polls each: 34 open polls, more than the nodes' 32 threads.
        polls += [nodes.Poll.future(pb.PollRequest(node_id=n, wait_seconds=30)) for n in ids[1:] for _ in range(2)]
        time.sleep(1.0)
        latencies = []
        for _ in range(5):
            start = time.monotonic()
            assert jobs.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10).state == "waiting"
            latencies.append(time.monotonic() - start)
        assert max(latencies) < 2.0, latencies
    finally:
        for p in polls:
            p.cancel()
    # A cancelled poll gives its slot back (the server sees the cancellation within a second).
    eventually(lambda: _polls_again(nodes, flood), "the flooding node to poll again", 10)


def _polls_again(nodes, node_id) -> bool:
    try:
        nodes.Poll(pb.PollRequest(node_id=node_id, wait_seconds=0))
        return True
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return False


# --- evaluation data --------------------------------------------------------------------------

def _lines(data: bytes) -> list[str]:
    """The lines of a file an attacker would look for in an answer."""
    return [line.strip() for line in data.decode(errors="replace").splitlines() if len(line.strip()) >= 8]


def test_evaluation_data_is_read_from_the_evaluation_dir_only_and_errors_never_quote_a_file(tmp_path, shards, caplog):
    caplog.set_level(logging.DEBUG)
    tls.init_ca(tmp_path / "ca")
    identity = tls.issue(tmp_path / "ca", "coordinator", "coord", tmp_path / "coordinator")
    operator = tls.issue(tmp_path / "ca", "operator", "ops", tmp_path / "operator")
    state = tmp_path / "state"
    server, port, coord = serve(state, port=0, identity=identity)
    channel = tls.channel(f"127.0.0.1:{port}", operator, [])
    jobs = pb_grpc.JobServiceStub(channel)
    try:
        key = tmp_path / "coordinator" / tls.KEY
        token = tmp_path / "token"
        token.write_text(f"join-token-canary-{uuid.uuid4()}\n")
        inside = coord.eval_dir / "notes.csv"  # in the dir, but not a table of the job
        inside.write_text(f"canary-column-{uuid.uuid4()},x\ncanary-cell-{uuid.uuid4()},1\n")
        (coord.eval_dir / "key.csv").symlink_to(key)
        (coord.eval_dir / "token.csv").symlink_to(token)
        secrets = [key, token, Path("/etc/passwd"), inside]
        attacks = [str(key), str(token), "/etc/passwd", "../../token", "../coordinator.db",
                   "key.csv", "token.csv", "notes.csv", "a\0b", "x" * 5000]
        for name in attacks:
            spec = make_spec(evaluation={"data": name}).canonical_json()
            with pytest.raises(grpc.RpcError) as err:
                jobs.SubmitJob(pb.SubmitJobRequest(spec_json=spec))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert "evaluation.data" in err.value.details()
            leaked = [line for s in secrets for line in _lines(s.read_bytes()) if line in err.value.details()]
            assert leaked == [], f"{name!r}: {leaked}"
        assert coord.job_store.jobs() == []
        stored = b"".join(p.read_bytes() for p in state.rglob("*")
                          if p.is_file() and not p.is_relative_to(coord.eval_dir))
        for s in secrets:
            for line in _lines(s.read_bytes()):
                assert line not in caplog.text and line.encode() not in stored, line

        # A table in the dir is read, by its name or its absolute path.
        (coord.eval_dir / "test.csv").write_bytes(shards[1].read_bytes())
        for name in ("test.csv", str(coord.eval_dir / "test.csv")):
            jobs.SubmitJob(pb.SubmitJobRequest(spec_json=make_spec(evaluation={"data": name}).canonical_json()))
        assert len(coord.job_store.jobs()) == 2
    finally:
        coord.stop()
        channel.close()
        server.stop(0).wait()


# --- oversize free text from nodes ------------------------------------------------------------

def test_oversize_free_text_from_a_node_is_cut_before_it_is_logged_or_stored(coordinator, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    nodes, jobs, coord = coordinator
    huge = "R" * 4_000_000  # what a hostile node sends instead of a reason
    with pytest.raises(grpc.RpcError) as err:
        nodes.Register(pb.RegisterRequest(name=huge, protocol_version=PROTOCOL_VERSION))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.details()) < 300

    job_id = submit(jobs, min_nodes=1, round_retries=0, training={"rounds": 1})
    refuser, worker = register(nodes, "refuser"), register(nodes, "worker")
    for node_id, decision in ((refuser, pb.OfferAnswer.REFUSED), (worker, pb.OfferAnswer.ACCEPTED)):
        assert nodes.Poll(pb.PollRequest(node_id=node_id, wait_seconds=5)).offer.job_id == job_id
        nodes.AnswerOffer(pb.OfferAnswer(node_id=node_id, job_id=job_id, decision=decision, reason=huge))
    task = eventually(lambda: (r := nodes.Poll(pb.PollRequest(node_id=worker, wait_seconds=1))).HasField("task")
                      and r.task, "a task")
    header = pb.ResultHeader(node_id=worker, task_id=task.task_id, refusal="F" * 4_000_000)
    nodes.SubmitResult(iter([pb.ResultPart(header=header)]))
    status = eventually(lambda: (s := jobs.GetJob(pb.GetJobRequest(job_id=job_id))).state in ("finished", "failed")
                        and s, "the job to end")

    texts = [n.reason for n in status.nodes] + [n.refusal for r in status.rounds for n in r.nodes]
    assert max(len(t) for t in texts) <= MAX_NODE_TEXT + 40 and len(status.error) < 2_000
    assert any(t.startswith("RRRR") and "characters cut" in t for t in texts)
    assert any(t.startswith("FFFF") and "characters cut" in t for t in texts)
    assert max(len(r.getMessage()) for r in caplog.records) < 2_000
    state_bytes = sum(p.stat().st_size for p in (tmp_path / "state").rglob("*") if p.is_file())
    assert state_bytes < 1_000_000


# --- file permissions -------------------------------------------------------------------------

def _not_private(root: Path) -> dict[str, str]:
    """Every directory under root that is not 0700 and every file that is not 0600."""
    wrong = {}
    for path in [root, *root.rglob("*")]:
        try:
            mode = stat.S_IMODE(path.lstat().st_mode)
        except FileNotFoundError:  # a running process's temporary file, already renamed
            continue
        if mode != (0o700 if path.is_dir() else 0o600):
            wrong[str(path.relative_to(root))] = oct(mode)
    return wrong


def test_state_files_are_private_even_under_a_permissive_umask_and_when_left_readable(tmp_path):
    old = os.umask(0o022)
    try:
        # Files as an earlier version left them, readable by all: opened again, they are not.
        earlier = tmp_path / "earlier"
        earlier.mkdir()
        stores = [Database(earlier / "coordinator.db")]  # open: its -wal and -shm files stay
        AuditLog(earlier / "audit.jsonl").record("Register", peer="coordinator")
        for path in earlier.iterdir():
            path.chmod(0o644)
        stores.append(Database(earlier / "coordinator.db"))
        AuditLog(earlier / "audit.jsonl")
        state = tmp_path / "state"
        serve_state = serve(state, port=0)
        serve_state[2].stop()
        serve_state[0].stop(0).wait()
        node = state / "node"
        node.mkdir(mode=0o700)
        PrivacyLedger(node / "ledger.db", max_epsilon=1.0, delta=1e-5).close()
        JobBook(node / "jobs.db")
        AuditLog(node / "audit.jsonl").record("Register", peer="coordinator")
    finally:
        os.umask(old)
    assert _not_private(state) == {}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in earlier.iterdir()} == {
        name: "0o600" for name in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm", "audit.jsonl",
                                   "audit.jsonl.head")}


def test_reissuing_a_certificate_replaces_a_readable_key_atomically_with_a_private_one(tmp_path):
    tls.init_ca(tmp_path / "ca")
    out = tmp_path / "hospital-a"
    first = tls.issue(tmp_path / "ca", "node", "hospital-a", out)
    (out / tls.KEY).chmod(0o644)
    second = tls.issue(tmp_path / "ca", "node", "hospital-a", out, force=True)
    assert stat.S_IMODE((out / tls.KEY).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca" / tls.CA_KEY).stat().st_mode) == 0o600
    assert sorted(p.name for p in out.iterdir()) == [tls.CA_CERT, tls.CERT, tls.KEY]  # no temporary file left
    assert second.fingerprint != first.fingerprint and tls.load_identity(out, "node").key_pem == second.key_pem


def test_the_join_token_is_an_option_no_more():
    options = {o for p in get_command(node_cli.app).commands["start"].params for o in p.opts}
    assert "--join-token-file" in options and "--join-token" not in options


@pytest.mark.slow
def test_real_processes_keep_their_state_private_and_the_join_token_out_of_argv(tmp_path, shards):
    paths, test = shards
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"max_epsilon": 10.0, "delta": 1e-5, "dataset_size": 150}))
    spec = make_spec(min_nodes=2, secure_aggregation=False, training={"rounds": 1}, evaluation={"data": str(test)})
    with LocalConsortium(tmp_path / "run", poll_seconds=1, eval_dir=tmp_path) as c:
        address = c.start_coordinator()
        c.enroll(["n0", "n1"])
        # n0 as LocalConsortium starts it (token in the environment), n1 with a token file.
        n0 = c.start_node("n0", paths[0], policy)
        token_file = tmp_path / "n1-token"
        token_file.write_text(c.tokens["n1"] + "\n")
        env = {k: v for k, v in os.environ.items() if k != "FEDTRAIN_JOIN_TOKEN"}
        with (c.logs / "node-n1.log").open("w") as log:
            n1 = subprocess.Popen(
                [sys.executable, "-m", "fedtrain", "node", "start", "--coordinator", address, "--data", str(paths[1]),
                 "--policy", str(policy), "--state-dir", str(c.node_state("n1")), "--poll-seconds", "1",
                 "--tls-dir", str(c.pki / "nodes" / "n1"), "--join-token-file", str(token_file)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            for proc, name in ((n0, "n0"), (n1, "n1")):
                argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
                assert c.tokens[name].encode() not in argv
            with c.client() as client:
                job_id = client.submit(spec)
                status = eventually(lambda: (s := client.status(job_id)).state in ("finished", "failed") and s,
                                    "the job", 180)
            assert status.state == "finished", status.error  # both nodes enrolled with their tokens
            # While they run (SQLite's -wal and -shm files exist), and after.
            states = (c.root / "coordinator", c.node_state("n0"), c.node_state("n1"))
            assert {str(s): _not_private(s) for s in states} == {str(s): {} for s in states}
            assert (c.node_state("n0") / "ledger.db-wal").exists()
        finally:
            os.killpg(n1.pid, signal.SIGTERM)
            n1.wait(15)
    assert {str(s): _not_private(s) for s in states} == {str(s): {} for s in states}
    assert (c.root / "coordinator" / "reports" / job_id / "report.json").exists()
    assert {p.name for p in c.node_state("n0").iterdir()} >= {"ledger.db", "jobs.db", "audit.jsonl", "policy.yaml"}
