"""Signed owner approvals: a node runs only the exact spec it approved."""

import json
import sqlite3
import time
from pathlib import Path

import yaml

from fedtrain.node import approval
from fedtrain.node.audit_log import AuditLog
from fedtrain.policy import Decision
from nodes.state import StatePaths
from nodes.jobs import JobBook

from conftest import make_spec, owner_policy
from test_end_to_end import cli, wait_for


def test_signatures_bind_the_job_and_the_spec_and_differences_are_named(tmp_path):
    key = approval.load_or_create_key(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    same = approval.load_or_create_key(tmp_path / "k.pem")
    spec, other = make_spec(), make_spec(training={"rounds": 5, "learning_rate": 2.0})
    sig = approval.sign(key, "job1", spec.digest())
    assert approval.verify(same.public_key(), "job1", spec.digest(), sig)
    assert not approval.verify(key.public_key(), "job2", spec.digest(), sig)
    assert not approval.verify(key.public_key(), "job1", other.digest(), sig)
    assert approval.spec_difference(spec, other) == [
        "training.learning_rate: 0.5 approved, 2.0 in the task", "training.rounds: 2 approved, 5 in the task"]


def _refusals(status):
    return [n.refusal for r in status.rounds for n in r.nodes if n.refusal]


def _nothing_left(node, job_id):
    assert node.charged_rounds(job_id) == []
    sent = [e for e in AuditLog(StatePaths(node.args["state_dir"]).audit).entries() if e["type"] == "SubmitResult"]
    assert sent and all(not e["tensors"] and e["detail"].startswith("refusal") for e in sent)


def _pending(consortium, spec):
    """One node whose owner approves by hand, and a submitted job waiting for that approval."""
    start, client = consortium
    node, = start(1)
    node.halt()
    node.args["policy"] = owner_policy(node.args["data"], require_approval=True)
    node.start()
    job_id = client.submit(spec)
    wait_for(client, job_id, lambda s: any(n.decision == "pending_approval" for n in s.nodes))
    return node, client, job_id


def test_round_1_is_timed_from_the_approval_and_the_wait_for_it_is_reported_apart(consortium):
    node, client, job_id = _pending(consortium, make_spec(training={"rounds": 1}))
    time.sleep(5)  # the owner reads the offer
    approved = time.monotonic()
    cli("node", "approve", job_id, "--state-dir", str(node.args["state_dir"]))
    status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"))
    assert status.state == "finished", status.error
    # Round 1 ran after the approval; the wait before it is the job's, on its own.
    assert status.rounds[1].wall_seconds < time.monotonic() - approved
    assert status.approval_wait_seconds > 5
    report = json.loads((Path(status.report_path).parent / "report.json").read_text())
    assert report["job"]["approval_wait_seconds"] == status.approval_wait_seconds
    assert report["rounds"][1]["wall_seconds"] == status.rounds[1].wall_seconds


def test_a_task_for_another_spec_than_the_approved_one_is_refused_naming_the_difference(consortium, tmp_path):
    spec = make_spec(training={"rounds": 1})
    node, client, job_id = _pending(consortium, spec)
    # The coordinator's record of the job changes while the owner reads the offer.
    changed = make_spec(training={"rounds": 1, "learning_rate": 5.0})
    db = sqlite3.connect(tmp_path / "coordinator" / "coordinator.db")
    db.execute("UPDATE jobs SET spec_json = ? WHERE id = ?", (changed.canonical_json(), job_id))
    db.commit()
    cli("node", "approve", job_id, "--state-dir", str(node.args["state_dir"]))
    status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"))
    # The coordinator hears the reason code; the difference is in the node's own log.
    assert "spec-mismatch" in _refusals(status)
    _nothing_left(node, job_id)


def test_a_job_book_changed_behind_the_agent_voids_the_approval(consortium):
    spec = make_spec(training={"rounds": 1})
    node, client, job_id = _pending(consortium, spec)
    paths = StatePaths(node.args["state_dir"])
    book = JobBook(paths.jobs)
    book.decide(job_id, Decision.ACCEPTED, "within-policy", "approved",
                approval.sign(approval.load_or_create_key(paths.key), job_id, spec.digest()))
    # Someone edits the node's job book after the owner signed (before the agent sends the answer).
    edited = json.loads(book.get(job_id).spec_json)
    edited["privacy"]["epsilon"] = 50.0
    book._db.execute("UPDATE jobs SET spec_json = ? WHERE job_id = ?", (json.dumps(edited), job_id))
    status = wait_for(client, job_id, lambda s: s.state in ("finished", "failed"))
    assert "approval-invalid" in _refusals(status)
    _nothing_left(node, job_id)


def test_the_owner_cli_shows_the_job_and_signs_its_approval(tmp_path, shards):
    paths = StatePaths(tmp_path)
    spec = make_spec(min_nodes=3)
    book = JobBook(paths.jobs)
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(owner_policy(shards[0][0]).document()))
    book.record("j1", spec.canonical_json(), Decision.PENDING_APPROVAL, "pending-approval",
                "waiting for the data owner's approval")
    shown = cli("node", "jobs", "--state-dir", str(tmp_path), "--show", "j1", "--data", str(shards[0][0])).stdout
    for text in (spec.digest(), "not approved", "on: the coordinator sees only the sum", "secagg.masked uint32[11]",
                 "0.weight float32[2, 4]", "after each round:"):
        assert text in shown, text
    cli("node", "approve", "j1", "--state-dir", str(tmp_path))
    record = JobBook(paths.jobs).get("j1")
    key = approval.load_or_create_key(paths.key)
    assert approval.verify(key.public_key(), "j1", spec.digest(), record.signature)
    assert "signed by this node's key" in cli("node", "jobs", "--state-dir", str(tmp_path), "--show", "j1").stdout
